"""A Redis that does not answer is an error in bounded time, never a wait for ever: the queue is
asked inside API requests (a start's message), by ``/readyz`` and by the worker's threads,
reconciler included, none of which may hang on it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from selfie_lora.adapters.queue import huey_queue
from selfie_lora.adapters.queue.huey_queue import HueyJobQueue
from selfie_lora.errors import QueueClosedError
from tests.support.backends import queue_url
from tests.support.silent import SilentServer


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def _within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """What ``call`` raised, if it ended within ``seconds``; fails the test if it still waits."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # shown by the assertions of the caller
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting for a Redis that does not answer after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("call", ["enqueue_training", "next_training", "pending",
                                  "queued_training_ids", "ping"])
def test_a_redis_that_accepts_and_never_answers_fails_each_call_in_bounded_time(
        silent: SilentServer, monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    # Half a second, not 2 s: each of the five calls waited it out (the test's 10 s).
    monkeypatch.setattr(huey_queue, "ANSWER_TIMEOUT_S", 0.5, raising=False)
    queue = HueyJobQueue.from_url(f"redis://127.0.0.1:{silent.port}/0")
    method = getattr(queue, call)
    began = time.monotonic()
    error = _within(15, lambda: method("t1") if call == "enqueue_training" else method())
    took = time.monotonic() - began
    # the bound set, not redis-py's own (5 s since 8.0)
    assert 0.5 <= took < 4, took
    # next_training too: huey took its blocking read's timing out for an empty queue, so a
    # worker said nothing of the outage (an empty queue is answered: test_queue_contract).
    assert error is not None
    assert "Timeout" in type(error).__name__, repr(error)


def test_the_wait_of_a_blocking_read_is_well_within_the_answer_timeout() -> None:
    # An idle worker's read waits REDIS_READ_TIMEOUT_S for a message on the server: the
    # client's own bound must leave it that long, and more for the answer to travel.
    assert huey_queue.ANSWER_TIMEOUT_S >= huey_queue.REDIS_READ_TIMEOUT_S + 3


# ``open`` builds huey and connects to nothing (``serve``, ``worker``, ``train`` open it at their
# start): a Redis that is down is still a start, where each then says the outage (/readyz, the
# worker's one line) and ``train`` is accepted for the reconciler. A port nothing listens on:
# refused at once, no Redis needed.
def test_open_on_a_redis_that_is_down_starts_and_the_first_call_says_the_outage() -> None:
    redis = pytest.importorskip("redis")
    queue = HueyJobQueue.from_url("redis://127.0.0.1:1/0")
    try:
        assert _within(5, queue.open) is None
        error = _within(huey_queue.CONNECT_TIMEOUT_S + 5, queue.ping)
        assert isinstance(error, redis.ConnectionError), repr(error)
        error = _within(huey_queue.CONNECT_TIMEOUT_S + 5,
                        lambda: queue.enqueue_training("t1"))
        assert isinstance(error, redis.ConnectionError), repr(error)
    finally:
        queue.close()
    # Closed: refused, not built nor connected again.
    assert isinstance(_within(5, queue.open), QueueClosedError)


def test_a_url_that_names_its_own_timeouts_keeps_them() -> None:
    queue = HueyJobQueue.from_url("redis://127.0.0.1:1/0?socket_timeout=42&socket_connect_timeout=7")
    kwargs = queue.huey.storage.pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (42.0, 7.0)
    queue = HueyJobQueue.from_url("redis://127.0.0.1:1/0")
    kwargs = queue.huey.storage.pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (
        huey_queue.ANSWER_TIMEOUT_S, huey_queue.CONNECT_TIMEOUT_S)



@pytest.mark.redis
def test_an_empty_queue_is_not_taken_for_silence_even_with_a_short_answer_timeout(
        tmp_path: Path) -> None:
    # The wait of the blocking read stays within a URL's own shorter socket_timeout: else each
    # empty wait timed out, and the worker said the queue was away while it answered.
    url = queue_url("redis", tmp_path)
    queue = HueyJobQueue.from_url(f"{url}?socket_timeout=0.5", name="short_answers")
    queue.flush()
    began = time.monotonic()
    assert queue.next_training() is None
    assert time.monotonic() - began < 0.5
    queue.enqueue_training("t1")
    assert queue.next_training() == "t1"
