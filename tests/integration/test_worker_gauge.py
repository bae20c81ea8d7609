"""``selfie_lora_workers{state}``: the workers consuming the queue, read from the database at
each scrape, so every API server reports the same. Found in review: /metrics had no figure of
the live workers, so an operator could not alert on "no worker is consuming trainings" (the
queue depth grows for other reasons too: a burst, slow trainings)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from selfie_lora.adapters.metrics.prometheus import PrometheusTelemetry
from selfie_lora.domain.entities import Training
from selfie_lora.errors import StorageError, StorageFullError
from selfie_lora.services.common import utcnow
from selfie_lora.wiring import Services, build_services
from selfie_lora.worker import start_embedded
from tests.conftest import fake_services_on, make_settings, serving
from tests.integration.test_operations import samples
from tests.support.backends import DATABASES
from tests.support.hung import HungDatabase, until


def workers_in(client: TestClient) -> dict[str, float]:
    """The gauge's two series; a KeyError when one is missing (a dashboard needs both)."""
    found = samples(client.get("/metrics").text)
    return {state: found[("selfie_lora_workers", (("state", state),))]
            for state in ("live", "stale")}


def test_the_gauge_is_exported_from_the_start_and_set_at_each_scrape() -> None:
    telemetry = PrometheusTelemetry()
    text = telemetry.exposition()[0].decode()
    assert "# TYPE selfie_lora_workers gauge" in text
    assert 'selfie_lora_workers{state="live"} 0.0' in text
    assert 'selfie_lora_workers{state="stale"} 0.0' in text
    telemetry.set_service_gauges(trainings={}, queue_depth=0, waiting={},
                                 workers={"live": 3, "stale": 1})
    text = telemetry.exposition()[0].decode()
    assert 'selfie_lora_workers{state="live"} 3.0' in text
    assert 'selfie_lora_workers{state="stale"} 1.0' in text


def test_the_app_s_own_worker_is_live(client: TestClient) -> None:
    until(lambda: workers_in(client) == {"live": 1, "stale": 0},
          "the embedded worker is never counted live")


def test_a_worker_counts_while_it_runs_and_one_that_died_counts_as_stale(
        tmp_path: Path) -> None:
    with serving(make_settings(tmp_path)) as (client, svc):  # no worker in the app
        assert workers_in(client) == {"live": 0, "stale": 0}
        # A worker killed on another machine: its row stopped being renewed a minute ago.
        now = utcnow()
        svc.repo.worker_alive("other-host/abc/w0", now=now - timedelta(seconds=90),
                              expires_at=now - timedelta(seconds=60),
                              forget_before=now - timedelta(days=1))
        assert workers_in(client) == {"live": 0, "stale": 1}
        worker = start_embedded(svc, threads=1)
        try:
            until(lambda: workers_in(client) == {"live": 1, "stale": 1},
                  "a started worker is never counted live")
        finally:
            assert worker.stop()
        # Stopped, it is not one that died: it is counted no more.
        assert workers_in(client) == {"live": 0, "stale": 1}


def test_a_server_that_runs_no_worker_is_not_counted(tmp_path: Path) -> None:
    with serving(make_settings(tmp_path)) as (client, svc):
        upkeep = start_embedded(svc, consume=False)  # serve --no-worker's reconciler
        try:
            time.sleep(0.3)  # a presence thread would have said so by now
            assert workers_in(client) == {"live": 0, "stale": 0}
        finally:
            assert upkeep.stop()


def test_a_worker_past_its_lease_is_stale_and_forgotten_later(tmp_path: Path) -> None:
    with serving(make_settings(tmp_path, heartbeat_seconds=1, lease_seconds=2)) as (_c, svc):
        now = utcnow()
        svc.repo.worker_alive("old-host/abc/w0", now=now - timedelta(days=2),
                              expires_at=now - timedelta(days=2) + timedelta(seconds=30),
                              forget_before=now - timedelta(days=3))
        svc.training.worker_alive("this-host/abc/w0")  # expires in lease_seconds
        assert svc.repo.count_workers(now=utcnow()) == {"live": 1, "stale": 0}  # old forgotten
        assert svc.repo.count_workers(now=utcnow() + timedelta(seconds=3)) == {
            "live": 0, "stale": 1}


@dataclasses.dataclass
class Clocks:
    """The database's clock (``later``: how much time went by) and this machine's, ``off`` it."""

    later: timedelta = timedelta(0)
    off: timedelta = timedelta(0)

    def database(self) -> datetime:
        return utcnow() + self.later

    def machine(self) -> datetime:
        return self.database() + self.off


@pytest.mark.parametrize("rounds", [0.05, 600.0], ids=["rounds", "no-round"])
@pytest.mark.parametrize("off", [timedelta(hours=-2), timedelta(hours=2)],
                         ids=["behind", "ahead"])
def test_a_worker_whose_clock_is_skewed_counts_as_stale_for_as_long_as_it_runs(
        tmp_path: Path, off: timedelta, rounds: float) -> None:
    """Found in review: a worker whose clock check failed (its clock past
    SELFIE_LORA_MAX_CLOCK_SKEW_SECONDS from the database's) stopped renewing its row, so it was
    stale for an hour and then counted in neither state though it still ran; and a beat
    written on its own clock before the check saw the skew was off by as much for every server
    (2 h behind: in neither state at once; ahead: live for 2 h). Each scrape, by a server whose
    clock is the database's, counts it in exactly one state: live, stale while skewed (an hour
    on too), live again once its clock is right. ``rounds``: the reconciler's (which checked
    the clock, and alone did); with none due, each beat checks it first.

    So does a server whose clock is off the database's by up to the limit (10 s), behind or
    ahead: found in review, a row expired only a lease (2 s) ago was live for a server 5 s
    behind, which the limit allows."""
    clocks = Clocks()
    settings = make_settings(tmp_path, heartbeat_seconds=0.1, lease_seconds=2,
                             reconcile_seconds=rounds, max_clock_skew_seconds=10)
    svc = build_services(settings, trainers={}, generators={}, clock=clocks.machine,
                         database_clock=clocks.database)
    try:
        worker = start_embedded(svc, threads=1)
        try:
            def counted() -> dict[str, int]:
                return svc.repo.count_workers(now=clocks.database())

            def by_servers_within_the_limit() -> set[tuple[tuple[str, int], ...]]:
                return {tuple(sorted(svc.repo.count_workers(
                    now=clocks.database() + timedelta(seconds=off_by)).items()))
                    for off_by in (-9.9, -5, 0, 5, 9.9)}

            skewed_for_all = {(("live", 0), ("stale", 1))}

            until(lambda: counted() == {"live": 1, "stale": 0}, "never live")
            clocks.off = off
            until(lambda: counted() == {"live": 0, "stale": 1}, "a skewed worker is not stale")
            assert worker.clock_skewed  # it takes no training
            assert by_servers_within_the_limit() == skewed_for_all
            clocks.later += timedelta(minutes=61)  # an hour on, skewed all along
            until(lambda: counted() == {"live": 0, "stale": 1},
                  "a worker skewed for an hour is counted in neither state")
            for _ in range(10):  # every beat keeps it there: never live, never forgotten
                assert counted() == {"live": 0, "stale": 1}
                assert by_servers_within_the_limit() == skewed_for_all
                time.sleep(0.05)
            clocks.off = timedelta(0)
            until(lambda: counted() == {"live": 1, "stale": 0},
                  "a worker whose clock is right again is not live")
        finally:
            assert worker.stop()
        assert counted() == {"live": 0, "stale": 0}
    finally:
        svc.close()


@pytest.mark.parametrize("database", DATABASES)
def test_the_repository_counts_live_and_stale_workers(database: str, tmp_path: Path) -> None:
    svc: Services = fake_services_on(database, tmp_path)
    try:
        now = utcnow()
        assert svc.repo.count_workers(now=now) == {"live": 0, "stale": 0}
        for name, expires in (("a/x/w0", 30), ("a/x/w1", 30), ("b/y/w0", -30)):
            svc.repo.worker_alive(name, now=now, expires_at=now + timedelta(seconds=expires),
                                  forget_before=now - timedelta(days=1))
        svc.repo.worker_alive("a/x/w0", now=now, expires_at=now + timedelta(seconds=60),
                              forget_before=now - timedelta(days=1))  # a beat: no second row
        assert svc.repo.count_workers(now=now) == {"live": 2, "stale": 1}
        svc.repo.worker_gone("a/x/w1")
        assert svc.repo.count_workers(now=now) == {"live": 1, "stale": 1}
    finally:
        svc.close()


@pytest.mark.parametrize("database", DATABASES)
def test_a_stale_worker_counts_for_an_hour_even_with_no_worker_beating(
        database: str, tmp_path: Path) -> None:
    """Found in review: a stale row counted until a beat deleted it a day after it expired, so
    the README's ``stale > 0`` alert fired a day after every unclean stop of a worker that came
    back under a new name (a container's new hostname), and for ever with every worker dead
    (no beat deletes then)."""
    svc: Services = fake_services_on(database, tmp_path)
    try:
        now = utcnow()
        for name, expired in (("gone-long/x/w0", timedelta(hours=2)),
                              ("gone-lately/y/w0", timedelta(minutes=30))):
            svc.repo.worker_alive(name, now=now - expired - timedelta(seconds=30),
                                  expires_at=now - expired,
                                  forget_before=now - timedelta(days=30))  # nothing deleted
        # No worker beats: the row that expired 2 h ago is not counted all the same.
        assert svc.repo.count_workers(now=now) == {"live": 0, "stale": 1}
        # Counted as an hour and a half ago, the older row is still there (stale then), the
        # other one was live.
        assert svc.repo.count_workers(now=now - timedelta(minutes=90)) == {
            "live": 1, "stale": 1}
        svc.training.worker_alive("this-host/abc/w0")  # a beat deletes rows past the hour
        assert svc.repo.count_workers(now=now - timedelta(minutes=90)) == {
            "live": 2, "stale": 0}  # the older row is gone
        assert svc.repo.count_workers(now=now) == {"live": 1, "stale": 1}
    finally:
        svc.close()


@pytest.mark.parametrize("refusal", [
    StorageFullError("database error: /srv is full: database or disk is full"),
    StorageError("database error: QueuePool limit of size 2 overflow 0 reached, connection "
                 "timed out, timeout 30.00"),
    StorageError("database error: cannot execute UPDATE in a read-only transaction")],
    ids=["disk-full", "pool-exhausted", "read-only"])
def test_a_beat_the_database_refuses_is_said_once_and_its_end_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        refusal: StorageError) -> None:
    """Found in review: each refused beat (a full disk, the pool's connections all taken, a
    standby read-only after a fail-over) logged a traceback at ERROR, one every heartbeat for as
    long as it lasted (11 in a second at a 0.1 s heartbeat)."""
    with serving(make_settings(tmp_path, heartbeat_seconds=0.1, lease_seconds=2)) as (_c, svc):
        alive = svc.repo.worker_alive
        beats: list[bool] = []
        refusing = threading.Event()
        refusing.set()

        def worker_alive(name: str, *, now: datetime, expires_at: datetime,
                         forget_before: datetime) -> None:
            beats.append(refusing.is_set())
            if refusing.is_set():
                raise refusal
            alive(name, now=now, expires_at=expires_at, forget_before=forget_before)

        monkeypatch.setattr(svc.repo, "worker_alive", worker_alive)
        caplog.set_level(logging.DEBUG, logger="selfie_lora")
        worker = start_embedded(svc, threads=1)
        try:
            until(lambda: beats.count(True) >= 6, "the presence thread stopped beating")
            refusing.clear()
            until(lambda: svc.repo.count_workers(now=utcnow()) == {"live": 1, "stale": 0},
                  "the worker is not live again once the database takes its beats")
        finally:
            assert worker.stop()
    said = [r for r in caplog.records if "alive" in r.getMessage() and r.levelno > logging.DEBUG]
    assert [(r.levelname, bool(r.exc_info)) for r in said] == [("WARNING", False),
                                                               ("INFO", False)]
    assert refusal.message in said[0].getMessage()
    assert "goes through again" in said[1].getMessage()


def test_a_worker_stops_within_its_grace_while_the_database_hangs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: a beat read the database's clock, then wrote its row, each call on
    PostgreSQL hung (not refusing) waiting about 20 s (the pool's ping, then the connect), so a
    beat took two of them (40 s) and ``stop`` overran its 30 s grace: the worker said its name
    stayed held, and skipped removing its row. A beat whose clock read gets no answer writes
    nothing: one hung call a beat, and ``stop`` (more than one, less than two) ends in time."""
    database = HungDatabase()
    settings = make_settings(tmp_path, heartbeat_seconds=0.2, lease_seconds=2,
                             reconcile_seconds=600)
    svc = build_services(settings, trainers={}, generators={}, database_clock=database.clock)
    try:
        worker = start_embedded(svc, threads=1)
        alive = svc.repo.worker_alive

        def worker_alive(name: str, *, now: datetime, expires_at: datetime,
                         forget_before: datetime) -> None:
            database.meet("write")
            alive(name, now=now, expires_at=expires_at, forget_before=forget_before)

        monkeypatch.setattr(svc.repo, "worker_alive", worker_alive)
        until(lambda: svc.repo.count_workers(now=utcnow()) == {"live": 1, "stale": 0},
              "never live")
        # That beat writes nothing on a database that did not answer its clock's read.
        database.stops_in_time(worker, round_="beat")
    finally:
        svc.close()


@pytest.mark.parametrize("clock_check", [True, False], ids=["clock-check", "no-clock-check"])
def test_a_stopping_worker_does_not_wait_on_a_hung_database_to_leave_the_count(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock_check: bool) -> None:
    """Found in review: once its threads were joined, ``stop`` removed the worker's row
    (``worker_gone``), one call more on a database that had just given its beat none: on a hung
    PostgreSQL a wait of the answer timeout (~20 s) past the 30 s grace. The database's last
    answer is known (the clock check's last read; with the check off, the beat's write): none,
    the row is left to run out, and ``stop`` ends within its grace."""
    database = HungDatabase()
    settings = make_settings(tmp_path, heartbeat_seconds=0.2, lease_seconds=2,
                             reconcile_seconds=600)
    svc = build_services(settings, trainers={}, generators={},
                         database_clock=database.clock if clock_check else None)
    assert svc.clock.enabled is clock_check
    try:
        worker = start_embedded(svc, threads=1)
        alive = svc.repo.worker_alive

        def worker_alive(name: str, *, now: datetime, expires_at: datetime,
                         forget_before: datetime) -> None:
            database.meet("write", repository=True)
            alive(name, now=now, expires_at=expires_at, forget_before=forget_before)

        def worker_gone(name: str) -> None:
            database.meet("gone", repository=True)

        monkeypatch.setattr(svc.repo, "worker_alive", worker_alive)
        monkeypatch.setattr(svc.repo, "worker_gone", worker_gone)
        until(lambda: svc.repo.count_workers(now=utcnow()) == {"live": 1, "stale": 0},
              "never live")
        database.stops_in_time(worker, round_="beat", first="clock" if clock_check else "write")
    finally:
        svc.close()


@pytest.mark.parametrize("clock_check", [True, False], ids=["clock-check", "no-clock-check"])
def test_a_stop_while_the_reconciler_waits_on_a_hung_database_ends_within_its_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock_check: bool) -> None:
    """Found in review: a hang met first by a reconciler round's call (the clock check off, or
    the hang begun after the round's clock read), neither the beat's write nor the clock's read
    knew of it, so ``stop``, once it had joined the round, removed the worker's row: a wait of
    the answer timeout again, past its grace. The removal is waited for until the grace ends.
    Hangs of 3 s: the old stop took two (~6 s) against a bound of the grace and 1 s (5.5 s),
    room for a loaded machine's scheduling that 1.5 s hangs (3.0 s against 2.65) left too thin."""
    database = HungDatabase(hang=3.0)
    settings = make_settings(tmp_path, heartbeat_seconds=100, lease_seconds=600,
                             reconcile_seconds=0.1)
    svc = build_services(settings, trainers={}, generators={},
                         database_clock=utcnow if clock_check else None)
    try:
        worker = start_embedded(svc, threads=1)
        active = svc.repo.active_trainings

        def active_trainings() -> list[Training]:
            database.meet("trainings", repository=True)
            return list(active())

        def worker_gone(name: str) -> None:
            database.meet("gone", repository=True)

        monkeypatch.setattr(svc.repo, "active_trainings", active_trainings)
        monkeypatch.setattr(svc.repo, "worker_gone", worker_gone)
        database.hung.set()
        until(lambda: "trainings" in database.calls, "no reconciler round met the hang")
        started = time.monotonic()
        grace = 1.5 * database.hang  # the round's wait, and part of one more
        assert worker.stop(grace=grace)
        took = time.monotonic() - started
        assert took < grace + 1.0, f"stop took {took:.1f} s: {database.calls}"
        assert database.calls == ["trainings", "gone"]
        # The removal goes on, its name held, until its own wait ends: ended now (the rest of
        # its 3 s was 1.5 s of the test's time), it fails as at its end, and its thread ends.
        database.released.set()
        until(lambda: not any(t.name.endswith("-gone") for t in threading.enumerate()),
              "the removal never ended")
    finally:
        svc.close()


class RefusingClock:
    """A database clock that, while ``refusing`` is set, fails at once with a refused
    connection's words (PostgreSQL restarting: an answer, no wait)."""

    def __init__(self) -> None:
        self.refusing = threading.Event()
        self.refused = 0

    def clock(self) -> datetime:
        if self.refusing.is_set():
            self.refused += 1
            raise OSError('connection to server at "127.0.0.1", port 5432 failed: '
                          "Connection refused")
        return utcnow()


def test_a_refused_clock_read_then_a_database_back_still_removes_the_row(
        tmp_path: Path) -> None:
    """Found in review: any error of the clock's read counted as the database giving no answer,
    a refused connection too (a restart; a refusal fails at once): a stop within a heartbeat
    of it, the database back, left the row to count stale for an hour."""
    database = RefusingClock()
    settings = make_settings(tmp_path, heartbeat_seconds=0.2, lease_seconds=2,
                             reconcile_seconds=600)
    svc = build_services(settings, trainers={}, generators={}, database_clock=database.clock)
    assert svc.clock.enabled
    try:
        worker = start_embedded(svc, threads=1)
        until(lambda: svc.repo.count_workers(now=utcnow()) == {"live": 1, "stale": 0},
              "never live")
        database.refusing.set()
        until(lambda: database.refused >= 1, "no beat read the clock")
        database.refusing.clear()  # back: every call from now on is answered
        assert worker.stop(grace=5)
        assert svc.repo.count_workers(now=utcnow()) == {"live": 0, "stale": 0}
    finally:
        svc.close()


def test_a_refused_readiness_clock_read_in_serve_leaves_the_worker_s_removal_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: the ClockGuard is shared with /readyz (serve), so a probe whose clock
    read was refused made the embedded worker's stop skip removing its row."""
    database = RefusingClock()
    settings = make_settings(tmp_path, heartbeat_seconds=100, lease_seconds=600,
                             reconcile_seconds=600)
    svc = build_services(settings, trainers={}, generators={}, database_clock=database.clock)
    gone: list[str] = []
    monkeypatch.setattr(svc.repo, "worker_gone", gone.append)
    try:
        worker = start_embedded(svc, threads=1)
        database.refusing.set()
        svc.operations.readiness()  # a probe in a restart's refused second
        database.refusing.clear()
        assert worker.stop(grace=5)
        assert gone == [worker.identity.name]
    finally:
        svc.close()


@pytest.mark.parametrize("max_skew", [10.0, 600.0, 1800.0, 3600.0])
def test_a_skewed_worker_s_row_is_stale_for_every_server_the_limit_allows(
        tmp_path: Path, max_skew: float) -> None:
    """Found in review: the row of a worker whose clock is skewed was expired a lease ago only,
    so with SELFIE_LORA_MAX_CLOCK_SKEW_SECONDS over the lease (allowed up to an hour) a server
    behind the database, within the limit, counted it live. Every server up to the limit off
    counts it stale; past half the stale window (an hour) no one margin holds for a server
    behind and one ahead alike, so servers up to half an hour off do."""
    svc: Services = fake_services_on("sqlite", tmp_path)
    try:
        now = utcnow()
        svc.training.worker_skewed("skewed-host/abc/w0", database_now=now, max_skew=max_skew)
        reach = min(max_skew, 1800.0) - 0.1
        for off_by in (-reach, -reach / 2, 0.0, reach / 2, reach):
            assert svc.repo.count_workers(now=now + timedelta(seconds=off_by)) == {
                "live": 0, "stale": 1}, f"counted by a server {off_by:+.1f} s off"
    finally:
        svc.close()


def test_a_reconciler_stops_within_its_grace_while_the_database_hangs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review, as the beat's above: a reconciler round read the database's clock (its
    failure swallowed), then reconciled anyway, each call on a hung PostgreSQL waiting its
    answer timeout, so a round took two waits and ``stop`` overran its 30 s grace. A round whose
    clock read gets no answer reconciles nothing: one hung call a round, and ``stop`` ends in
    time."""
    database = HungDatabase()
    settings = make_settings(tmp_path, reconcile_seconds=0.2)
    svc = build_services(settings, trainers={}, generators={}, database_clock=database.clock)
    try:
        upkeep = start_embedded(svc, consume=False)  # the reconciler alone (its round's calls)
        active = svc.repo.active_trainings

        def active_trainings() -> list[Training]:
            database.meet("reconcile")
            return list(active())

        monkeypatch.setattr(svc.repo, "active_trainings", active_trainings)
        # That round does not reconcile on a database that did not answer its clock's read.
        database.stops_in_time(upkeep, round_="reconciler round")
    finally:
        svc.close()


def test_a_reconciler_round_whose_clock_read_gets_no_answer_says_the_outage_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The rounds that skip reconciling (above) say the database's outage once, at WARNING with
    its words and no traceback, and its end once (the beats say nothing of it: they leave it to
    the reconciler); none of them reconciles."""
    away = threading.Event()
    clock_reads: list[bool] = []
    reconciled: list[bool] = []

    def database() -> datetime:
        clock_reads.append(away.is_set())
        if away.is_set():
            raise OSError("connection timeout expired")
        return utcnow()

    settings = make_settings(tmp_path, reconcile_seconds=0.05)
    svc = build_services(settings, trainers={}, generators={}, database_clock=database)
    try:
        reconcile = svc.training.reconcile

        def counted(**kwargs: Any) -> Any:
            reconciled.append(away.is_set())
            return reconcile(**kwargs)

        monkeypatch.setattr(svc.training, "reconcile", counted)
        caplog.set_level(logging.DEBUG, logger="selfie_lora")
        away.set()
        upkeep = start_embedded(svc, consume=False)
        try:
            until(lambda: clock_reads.count(True) >= 5, "the reconciler stopped its rounds")
            away.clear()
            until(lambda: reconciled.count(False) >= 2, "no round reconciled once it answered")
        finally:
            assert upkeep.stop()
    finally:
        svc.close()
    assert True not in reconciled  # no round reconciled while its clock read got no answer
    said = [r for r in caplog.records if r.getMessage().startswith("reconciling trainings")
            and r.levelno > logging.DEBUG]
    assert [(r.levelname, bool(r.exc_info)) for r in said] == [("WARNING", False),
                                                               ("INFO", False)]
    assert "connection timeout expired" in said[0].getMessage()
    assert "answers again" in said[1].getMessage()


@pytest.mark.parametrize(("threads_take", "cause"), [
    (3.5, "the worker's threads spent the rest"),
    (0.0, "the database slow to answer, or hung")], ids=["threads-spent-it", "database-slow"])
def test_a_removal_cut_short_by_the_grace_says_what_spent_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        threads_take: float, cause: str) -> None:
    """Found in review: a removal cut short was always said as "the database slow to answer, or
    hung", also when a training reached its safe point just before the grace ended and left a
    database that answers in milliseconds no time (the stop's bound is its grace: no wait of its
    own). The removal here waits until released, so the stop never sees it end; a thread that
    ends 0.5 s before a 4 s grace leaves it under a second on a loaded machine too."""
    settings = make_settings(tmp_path, heartbeat_seconds=100, lease_seconds=600,
                             reconcile_seconds=600)
    svc = build_services(settings, trainers={}, generators={})
    released = threading.Event()
    try:
        worker = start_embedded(svc, threads=1)
        gone = svc.repo.worker_gone

        def held_gone(name: str) -> None:
            released.wait(timeout=60)
            gone(name)

        monkeypatch.setattr(svc.repo, "worker_gone", held_gone)
        late = threading.Thread(target=time.sleep, args=(threads_take,), daemon=True)
        late.start()
        worker._threads.append(late)
        with caplog.at_level(logging.INFO, logger="selfie_lora.worker"):
            assert worker.stop(grace=4.0)
        said = [r.getMessage() for r in caplog.records
                if "removal from the workers'" in r.getMessage()]
        assert len(said) == 1, said
        assert cause in said[0]
    finally:
        released.set()
        until(lambda: not any(t.name.endswith("-gone") for t in threading.enumerate()),
              "the removal never ended")
        svc.close()
