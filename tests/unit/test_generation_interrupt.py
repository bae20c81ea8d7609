"""Ctrl-C on ``selfie-lora generate`` (and the demo) stops the generation it interrupts."""

from __future__ import annotations

import signal
import threading
import time
from datetime import UTC, datetime

import pytest

from selfie_lora.domain.entities import User
from selfie_lora.errors import RateLimitedError
from selfie_lora.services.generation import GenerationRequest, GenerationService

ANN = User(id="u1", name="ann", created_at=datetime(2026, 1, 1, tzinfo=UTC))
REQUEST = GenerationRequest(prompt="a portrait", seed=1)


def _service() -> GenerationService:
    return GenerationService(repo=None, blobs=None, generators={}, max_per_user=1)  # type: ignore[arg-type]


def test_an_interrupt_in_the_work_of_generate_reaches_its_caller_and_frees_the_slot() -> None:
    """``generate`` was ``submit().result()``: the work ran on the executor's thread, where a
    Ctrl-C never arrives (it interrupted only the wait, and the work ran on for minutes)."""
    svc = _service()
    ran_in: list[threading.Thread] = []

    def interrupted(*, user: User, request: GenerationRequest,
            client_gone: threading.Event | None = None) -> object:
        ran_in.append(threading.current_thread())
        raise KeyboardInterrupt

    svc._generate = interrupted  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            svc.generate(user=ANN, request=REQUEST)
        assert ran_in == [threading.current_thread()]
        # The user's one slot is free again: the next one is not refused as too many.
        with pytest.raises(KeyboardInterrupt):
            svc.generate(user=ANN, request=REQUEST)
    finally:
        svc.close()


def test_generate_holds_the_user_s_slot_while_it_runs() -> None:
    svc = _service()
    refused: list[BaseException] = []

    def work(*, user: User, request: GenerationRequest,
            client_gone: threading.Event | None = None) -> object:
        try:
            svc.submit(user=user, request=request).result()
        except RateLimitedError as exc:
            refused.append(exc)
        return "made"

    svc._generate = work  # type: ignore[method-assign,assignment]
    try:
        assert svc.generate(user=ANN, request=REQUEST) == "made"
        assert len(refused) == 1
    finally:
        svc.close()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="SIGINT is delivered to the main thread")
def test_sigint_during_generate_stops_the_work_at_once() -> None:
    svc = _service()
    running = threading.Event()
    stopped_early = threading.Event()

    def slow(*, user: User, request: GenerationRequest,
            client_gone: threading.Event | None = None) -> object:
        running.set()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.02)
        except BaseException:
            stopped_early.set()
            raise
        return "made"

    svc._generate = slow  # type: ignore[method-assign,assignment]
    threading.Thread(target=lambda: running.wait(5) and signal.raise_signal(signal.SIGINT),
                     daemon=True).start()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            svc.generate(user=ANN, request=REQUEST)
        assert time.monotonic() - started < 5
        assert stopped_early.is_set()  # the work itself was interrupted, not just the wait
    finally:
        signal.signal(signal.SIGINT, previous)
        svc.close()
