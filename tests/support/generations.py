"""Generations held in a ``FakeGenerator`` while a test looks at what else the service does."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from selfie_lora.testing.fakes import FakeGenerator


@contextmanager
def held_generations(generator: FakeGenerator, send: Callable[[], object], *,
                     count: int = 2) -> Iterator[None]:
    """``count`` calls of ``send``, each in a thread of its own, all waiting inside
    ``generator`` for as long as the block runs; then let through, their threads joined and the
    generator ungated."""
    generator.gate = threading.Event()
    threads = [threading.Thread(target=send) for _ in range(count)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while generator.waiting < count:
            assert time.monotonic() < deadline, f"the {count} generations never started"
            time.sleep(0.01)
        yield
    finally:
        generator.gate.set()
        for thread in threads:
            thread.join(timeout=10)
        generator.gate = None
