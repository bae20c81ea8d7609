"""bench/checks_eval.py's worker pool when a job fails: the error shows at once and the queued
jobs are cancelled, not run first (the edits of 45 photos take minutes)."""

from __future__ import annotations

import io
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _fail() -> None:
    raise ValueError("a photo the bench cannot edit")


def test_a_failing_job_cancels_the_queued_ones_and_shows_at_once() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import checks_eval
    finally:
        sys.path.remove(str(ROOT / "bench"))
    ran: list[int] = []
    futures: list[Future[Any]] = []
    raised_after: list[float] = []

    def run() -> None:
        # Two workers (threads: the pool's handling is the bench's, the jobs need no process):
        # the first job in the list is long, the second fails at once, the third keeps the other
        # worker busy, and the rest wait in the queue.
        with checks_eval._cancelling(ThreadPoolExecutor(2)) as pool:
            futures.extend([pool.submit(time.sleep, 2.0), pool.submit(_fail),
                            pool.submit(time.sleep, 2.0)])
            futures.extend(pool.submit(ran.append, i) for i in range(8))
            started = time.perf_counter()
            try:
                checks_eval._gather(futures)
            finally:
                raised_after.append(time.perf_counter() - started)

    with pytest.raises(ValueError, match="cannot edit"):
        run()
    # Not after the long job ahead of it in the list.
    assert raised_after[0] < 1.5
    assert ran == []
    assert all(f.cancelled() for f in futures[3:])


def test_edits_out_of_order_stop_the_run_even_under_python_o(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The edits' order numbers follow EDITS: edits made in another order are an error (a raise,
    not an assert, which ``python -O`` would drop)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import checks_eval
    finally:
        sys.path.remove(str(ROOT / "bench"))
    monkeypatch.setattr(checks_eval, "edits_of",
                        lambda image, analysis, index: dict.fromkeys(reversed(checks_eval.EDITS),
                                                                     b""))
    photo = io.BytesIO()
    Image.new("RGB", (64, 48)).save(photo, format="JPEG")
    with pytest.raises(RuntimeError, match="not EDITS"):
        checks_eval._edit_and_analyse("p.jpg", photo.getvalue(), None, 0, photo.getvalue(), 0, 1)
