"""Small helpers shared by the services: clock, ids, and a per-user count of work under way."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from selfie_lora.errors import SelfieLoraError


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class PerUserSlots:
    """How many of something each user has under way in this process, ``limit`` at most (a
    user's generations, a user's uploads being taken in). ``take`` one, or get the error
    ``refused(held)`` makes; ``release`` it when done (``hold``: both around a block). A user
    with none under way has no entry left."""

    def __init__(self, limit: int, *, refused: Callable[[int], SelfieLoraError]) -> None:
        self._limit = limit
        self._refused = refused
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, user_id: str) -> None:
        with self._lock:
            held = self._held.get(user_id, 0)
            if held >= self._limit:
                raise self._refused(held)
            self._held[user_id] = held + 1

    def release(self, user_id: str) -> None:
        with self._lock:
            left = self._held.get(user_id, 0) - 1
            if left > 0:
                self._held[user_id] = left
            else:
                self._held.pop(user_id, None)

    def held(self, user_id: str) -> int:
        with self._lock:
            return self._held.get(user_id, 0)

    @contextmanager
    def hold(self, user_id: str) -> Iterator[None]:
        self.take(user_id)
        try:
            yield
        finally:
            self.release(user_id)
