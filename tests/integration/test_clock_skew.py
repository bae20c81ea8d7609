"""The clock check (``services.clock``): every time shared across machines is written on one
machine's clock and compared on another's, so a process whose clock is further from the
database's than SELFIE_LORA_MAX_CLOCK_SKEW_SECONDS refuses to start, and a running worker that
drifts takes no training (nor any other worker's) and says so on /readyz. The database's clock is
a fake one here (SQLite has none: one machine, one clock); the PostgreSQL test reads the real
server's."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, inspect, pool
from typer.testing import CliRunner

from selfie_lora import cli, wiring
from selfie_lora.adapters.db.repository import server_clock
from selfie_lora.api.app import create_app
from selfie_lora.domain.entities import Training, TrainingStatus
from selfie_lora.errors import ClockSkewError, DatabaseUnreachableError
from selfie_lora.services.clock import ClockGuard
from selfie_lora.services.common import utcnow
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services
from selfie_lora.worker import Identity, Worker
from tests.conftest import auth, make_settings, one_person_analyzer, serving, wait_terminal
from tests.integration.test_api import upload
from tests.integration.test_busy_refusal import add_training
from tests.support.backends import database_url, fresh_engine
from tests.support.clock import sqlite_server_clock
from tests.support.hung import HungDatabase
from tests.support.photos import photo_zip

FIVE_MINUTES = timedelta(minutes=5)


@dataclasses.dataclass
class Drift:
    """This process's clock, ``ahead`` of the database's (the real time here)."""

    ahead: timedelta = timedelta(0)

    def now(self) -> datetime:
        return utcnow() + self.ahead


def database_time() -> datetime:
    return utcnow()


def build(tmp_path: Path, drift: Drift, **settings: object) -> Services:
    return build_services(make_settings(tmp_path, **settings),
                          trainers={"local": FakeTrainer()}, face_analyzer=one_person_analyzer(),
                          generators={"local": FakeGenerator()}, clock=drift.now,
                          database_clock=database_time)


@pytest.mark.parametrize("ahead", [FIVE_MINUTES, -FIVE_MINUTES])
def test_a_process_5_minutes_off_the_database_s_clock_is_refused_at_start(
        tmp_path: Path, ahead: timedelta) -> None:
    # An empty database: refused before the migrations, it is left so (they created the whole
    # schema, then it refused).
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(ClockSkewError) as refused:
        build(tmp_path, Drift(ahead), database_url=url)
    engine = create_engine(url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    message = refused.value.message
    assert message.startswith("refusing to start: this machine's clock is 300.0 s "
                              + ("ahead of" if ahead > timedelta(0) else "behind"))
    # Both clocks, the limit, and what to do.
    assert "this machine 20" in message
    assert "database 20" in message
    assert "SELFIE_LORA_MAX_CLOCK_SKEW_SECONDS (10)" in message
    assert "NTP" in message
    assert "\n" not in message


def test_within_the_limit_or_with_the_check_off_a_process_starts(tmp_path: Path) -> None:
    build(tmp_path / "a", Drift(timedelta(seconds=3))).close()
    build(tmp_path / "b", Drift(FIVE_MINUTES), max_clock_skew_seconds=0).close()
    build(tmp_path / "c", Drift(FIVE_MINUTES), max_clock_skew_seconds=600).close()


def test_a_slow_answer_never_makes_a_right_clock_look_skewed() -> None:
    """The reading is uncertain by half its round trip: that much is given to the process."""
    ticks = iter([utcnow(), utcnow() + timedelta(seconds=30)])
    guard = ClockGuard(database_clock=lambda: utcnow() + timedelta(seconds=15), max_skew=10,
                       clock=lambda: next(ticks))
    guard.require()  # 15 s off the midpoint's time at most, ±15 s of round trip


@pytest.mark.parametrize("command", [["users", "create", "ann"],
                                     ["users", "keys", "revoke", "ann", "k"],
                                     ["gc"], ["activate", "1", "--user", "ann"]])
def test_a_command_on_a_skewed_machine_says_so_in_one_line_and_exits_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    settings = make_settings(tmp_path)
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    # The database's clock 5 minutes behind this machine's (the review's SKEW=300 revoke).
    monkeypatch.setattr(wiring, "server_clock",
                        lambda _engine: lambda: utcnow() - FIVE_MINUTES)
    result = CliRunner().invoke(cli.app, command)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: refusing to start: this machine's clock is 300")
    assert "ahead of the database's" in lines[0]
    assert "NTP" in lines[0]


def add_held_training(services: Services, *, owner: str, expires: datetime) -> Training:
    """ann's training, run by ``owner`` on another machine whose lease runs to ``expires``."""
    user, _secret = services.users.create(name="ann")
    services.training.upload_zip(user=user, data=photo_zip(4), start=False)
    return add_training(services, user, status=TrainingStatus.PROCESSING, attempt=1, step=3,
                        total_steps=40, lease_owner=owner, lease_expires_at=expires,
                        heartbeat_at=utcnow())


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_worker_that_drifts_takes_no_training_over_and_is_not_ready(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The review's repro A: a worker 5 minutes ahead saw a live training's lease (written by
    its holder, heartbeating, on the database's time) as expired, queued it again and took it
    over, throwing its work away. Now, drifted past the limit after its start, it takes
    nothing (from the queue nor from another worker), logs one WARNING, and /readyz is 503
    {"clock": "skewed"}; back within, it logs its end and is ready again."""
    drift = Drift()
    services = build(tmp_path, drift, reconcile_seconds=0.05)
    try:
        held = add_held_training(services, owner="otherhost/abc/w0",
                                 expires=utcnow() + timedelta(seconds=30))
        services.queue.enqueue_training(held.id)  # a duplicate message, as reconcilers send
        drift.ahead = FIVE_MINUTES
        worker = Worker(training=services.training, queue=services.queue,
                        identity=Identity(name="skewed/abc/w0"), threads=1,
                        reconcile_seconds=0.05, clock=services.clock)
        with caplog.at_level(logging.INFO):
            worker.start()
            try:
                time.sleep(0.5)  # ten reconciler rounds
                after = services.repo.get_training(held.id)
                assert after is not None
                assert (after.lease_owner, after.attempt, after.recoveries) == \
                    ("otherhost/abc/w0", 1, 0)
                assert services.queue.pending() == 1  # left for a worker whose clock is right
                with TestClient(create_app(services.settings, services=services,
                                           run_worker=False)) as client:
                    ready = client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["checks"]["clock"] == "skewed"
                warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                            and r.name == "selfie_lora.services.clock"]
                assert len(warnings) == 1, [r.getMessage() for r in warnings]
                assert "300.0 s ahead of the database's" in warnings[0].getMessage()

                drift.ahead = timedelta(0)
                wait_for(lambda: not worker.clock_skewed)
                assert any("back within" in r.getMessage() for r in caplog.records)
                with TestClient(create_app(services.settings, services=services,
                                           run_worker=False)) as client:
                    ready = client.get("/readyz")
                assert ready.status_code == 200, ready.text
                assert ready.json()["checks"]["clock"] == "ok"
            finally:
                worker.stop()
        # The live lease was never taken over, skewed or not.
        after = services.repo.get_training(held.id)
        assert after is not None
        assert after.lease_owner == "otherhost/abc/w0"
        assert after.attempt == 1
    finally:
        services.close()


def test_within_the_limit_a_training_runs_and_the_server_is_ready(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, reconcile_seconds=0.05)
    with serving(settings, run_worker=True, clock=Drift(timedelta(seconds=3)).now,
                 database_clock=database_time) as (client, services):
        h = auth(services, "ann")
        done = wait_terminal(client, h, upload(client, h)["training"]["id"])
        assert done["training"]["status"] == "succeeded"
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["clock"] == "ok"


@pytest.mark.parametrize("with_the_read", [False, True],
                         ids=["clock-read-apart", "clock-read-with-it"])
def test_readyz_waits_once_on_a_hung_database_not_again_for_its_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_the_read: bool) -> None:
    """Found in review: /readyz's clock check read the database's clock on a connection of its
    own after the readiness read, so on a hung PostgreSQL a probe waited twice (the readiness
    read's answer timeout, then the clock read's). A readiness read that got no answer leaves
    the clock's last verdict standing, unread: one wait a probe. The server's own clock is read
    in the readiness read's statement (one pool connection a probe, ``ClockGuard.check_with``;
    SQLite's clock stands in for PostgreSQL's): the guard then knows the database gave no answer
    (a serve's worker skips its stop's last write)."""
    database = HungDatabase(hang=0.3)
    if with_the_read:
        monkeypatch.setattr(wiring, "server_clock", sqlite_server_clock)
    drift = Drift()
    services = build_services(make_settings(tmp_path), trainers={}, generators={},
                              clock=drift.now,
                              database_clock=None if with_the_read else database.clock)
    try:
        assert services.clock.reads_server is with_the_read
        name = "takes_writes_at" if with_the_read else "takes_writes"
        read = getattr(services.repo, name)

        def readiness_read() -> Any:
            database.meet("readiness", repository=True)
            return read()

        monkeypatch.setattr(services.repo, name, readiness_read)
        assert services.operations.readiness().checks["clock"] == "ok"
        database.hung.set()
        started = time.monotonic()
        ready = services.operations.readiness()
        took = time.monotonic() - started
        assert database.calls == ["readiness"]  # not the clock's read after it
        assert ready.checks["database"].startswith("database error: no answer from the server")
        assert ready.checks["clock"] == "ok"  # the last verdict
        assert took < 2 * database.hang, took
        assert services.clock.answered is not with_the_read
        database.hung.clear()
        # Found in review: the last verdict above is "ok", which a probe that forgot it (or
        # said "ok" whenever the statement failed) says too; a skewed one must stand as well,
        # or a skewed server whose database hangs a moment turns green on the load balancer.
        drift.ahead = FIVE_MINUTES
        assert services.operations.readiness().checks["clock"] == "skewed"
        database.calls.clear()
        database.hung.set()
        started = time.monotonic()
        ready = services.operations.readiness()
        took = time.monotonic() - started
        assert database.calls == ["readiness"]
        assert ready.checks["database"].startswith("database error: no answer from the server")
        assert ready.checks["clock"] == "skewed"  # the last verdict
        assert took < 2 * database.hang, took
        database.hung.clear()
        drift.ahead = timedelta(0)
        assert services.operations.readiness().checks == {
            "database": "ok", "queue": "ok", "storage": "ok", "clock": "ok"}
        assert services.clock.answered
    finally:
        services.close()


@pytest.mark.postgres
def test_postgresql_s_clock_is_the_yardstick(tmp_path: Path) -> None:
    """The real server's clock: this machine's (run with NTP) agrees, one 5 minutes ahead is
    refused by the check and by a process starting on it."""
    url = database_url("postgres", tmp_path)  # skips without SELFIE_LORA_TEST_POSTGRES_URL
    engine: Engine = fresh_engine(url)
    try:
        read = server_clock(engine)
        assert read is not None
        reading = ClockGuard(database_clock=read, max_skew=10).read()
        assert reading is not None
        assert abs(reading.skew) < 5, reading
        with pytest.raises(ClockSkewError):
            ClockGuard(database_clock=read, max_skew=10, clock=Drift(FIVE_MINUTES).now).require()
    finally:
        engine.dispose()
    with pytest.raises(ClockSkewError):
        build_services(make_settings(tmp_path, database_url=url),
                       trainers={"local": FakeTrainer()}, face_analyzer=one_person_analyzer(),
                       generators={"local": FakeGenerator()}, clock=Drift(FIVE_MINUTES).now)
    build_services(make_settings(tmp_path, database_url=url),
                   trainers={"local": FakeTrainer()}, face_analyzer=one_person_analyzer(),
                   generators={"local": FakeGenerator()}).close()


def test_sqlite_has_no_other_clock_to_check(tmp_path: Path) -> None:
    engine = fresh_engine(database_url("sqlite", tmp_path))
    try:
        assert server_clock(engine) is None
    finally:
        engine.dispose()
    services = build_services(make_settings(tmp_path), trainers={"local": FakeTrainer()},
                              face_analyzer=one_person_analyzer(),
                              generators={"local": FakeGenerator()},
                              clock=Drift(FIVE_MINUTES).now)
    services.close()


@pytest.mark.parametrize(("said", "unanswered"), [
    ("no answer from the server in 20 s (the connection is closed)", True),
    ('connection to server at "db" (10.0.0.5), port 5432 failed: timeout expired', True),
    ('connection to server at "127.0.0.1", port 5432 failed: Connection refused', False)],
    ids=["no-answer", "connect-timeout", "refused"])
def test_a_clock_read_that_got_no_answer_says_so_and_a_refused_one_does_not(
        said: str, unanswered: bool) -> None:
    """Found in review: a clock read that failed was always an error with ``unanswered`` False
    (a hung server's told as one that refused), and ``answered`` turned False on any error (a
    refused connection, an answer at once, taken for a hung server)."""
    def clock() -> datetime:
        raise OSError(said)

    guard = ClockGuard(database_clock=clock, max_skew=10)
    with pytest.raises(DatabaseUnreachableError) as raised:
        guard.answered_check()
    assert raised.value.unanswered is unanswered
    assert guard.answered is not unanswered


def test_a_clock_read_on_an_exhausted_pool_is_not_a_hung_server() -> None:
    """Found in review: the clock read (a bare ``engine.connect()``, not one of the repository's
    translated calls) that met this process's own pool exhausted (SQLAlchemy's QueuePool
    TimeoutError, whose words say "connection timed out") was taken for a hung server, so a
    stop under load left its worker's row: the server answered, only the pool was taken (the
    repository says ``DatabaseBusyError``, answered)."""
    engine = create_engine("sqlite://", poolclass=pool.QueuePool, pool_size=1, max_overflow=0,
                           pool_timeout=0.05)
    held = engine.connect()

    def clock() -> datetime:
        with engine.connect():
            raise AssertionError("the pool's one connection is held")

    guard = ClockGuard(database_clock=clock, max_skew=10)
    try:
        with pytest.raises(DatabaseUnreachableError) as raised:
            guard.answered_check()
        assert "QueuePool limit" in raised.value.message
        assert raised.value.unanswered is False
        assert guard.answered is True
    finally:
        held.close()
        engine.dispose()
