"""Stopping the local training's child: it ignores SIGTERM (a worker's stop signals the whole
process group, and the worker decides), so the stop that ends every child run goes straight to
SIGKILL. A terminate() first was a no-op followed by a 10 s join, on every cancel, stall and
worker stop (found in review: ``_stop took 10.0 s, exit code -9``)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from selfie_lora.adapters.flux.trainer import LocalTrainer


class _ChildIgnoringSigterm:
    """A child process as ``_child_main`` makes it: SIGTERM ignored, SIGKILL ends it. Records
    every join that waited on it while it was alive (each one a real wait of its timeout)."""

    def __init__(self, *, alive: bool = True) -> None:
        self.alive = alive
        self.signals: list[str] = []
        self.waits_while_alive: list[float | None] = []

    def is_alive(self) -> bool:
        return self.alive

    def terminate(self) -> None:
        self.signals.append("SIGTERM")  # ignored

    def kill(self) -> None:
        self.signals.append("SIGKILL")
        self.alive = False

    def join(self, timeout: float | None = None) -> None:
        if self.alive:
            self.waits_while_alive.append(timeout)


def test_a_live_child_is_killed_without_waiting_for_a_sigterm_it_ignores() -> None:
    child = _ChildIgnoringSigterm()
    LocalTrainer._stop(child)
    assert not child.alive
    assert child.signals == ["SIGKILL"]  # old code: SIGTERM, then SIGKILL
    assert child.waits_while_alive == []  # old code: [10], a 10 s join before the kill


def test_a_child_that_has_ended_is_only_reaped() -> None:
    child = _ChildIgnoringSigterm(alive=False)
    LocalTrainer._stop(child)
    assert child.signals == []
