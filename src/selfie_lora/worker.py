"""Workers: ``selfie-lora worker`` (the scale path: many of these, on GPU machines), and the worker
that ``selfie-lora serve`` and ``selfie-lora train`` run inside themselves.

A worker takes training ids from the queue on a few threads and hands each to
``TrainingService.run``, which claims the training's lease before doing anything. A reconciler
thread calls ``TrainingService.reconcile`` at start-up and every ``reconcile_seconds``, so a
training whose worker died, or whose message was lost, is picked up again.

Every worker has a stable name, its **identity**, held with an exclusive file lock under
``SELFIE_LORA_HOME/workers`` while it runs: ``<host>/<home>/w<slot>``. A worker that restarts
gets the lowest free slot, usually its old one; leases still held in that name can only be left
over from a process that died (the kernel drops the file lock with it), so the new worker takes
them over at once instead of waiting for them to expire.

Before any thread starts, a worker binds the blob store to its database
(``OperationsService.bind_deployment``): it refuses to start on a store that belongs to another
deployment, whose garbage collection would otherwise delete this one's blobs, and vice versa.

A third thread collects garbage (``services.gc``): it asks every ``gc_check_seconds`` whether a
collection is due (the last one, by any process, started ``SELFIE_LORA_GC_INTERVAL_HOURS`` ago)
and runs it when this worker wins the database's lease, so one worker collects at a time. Its
own thread, not the reconciler's: listing a large bucket must not delay the recovery of a
training. In ``serve --no-worker``'s reconciler-only worker it runs only this machine's part,
once per interval (``GarbageCollector.run_machine_due``: the holds of erasures killed midway,
the cached copies of deleted weights, stale work folders): an API server erases and caches too.

A fourth thread, in every worker that collects and in ``serve --no-worker``'s reconciler-only
worker, settles every ``erase_check_seconds`` this machine's holds of erasures killed midway and
finishes the account deletions whose process died (``AccountEraser.finish_pending``: a server
killed while answering ``DELETE /api/me``).

A worker that consumes the queue (not ``train``'s, which runs one training) also keeps its row
of the ``workers`` table alive on a thread of its own, every heartbeat, and deletes it when it
stops (``TrainingService.worker_alive``): every server's ``/metrics`` counts the live workers
and those that died (``selfie_lora_workers{state}``).

Stopping (SIGTERM or SIGINT for ``selfie-lora worker``; the server's shutdown for ``serve``):
no new message is taken, every running training is handed back at its next safe point (lease
released, message queued again: another worker, or this one restarted, resumes it) and the
threads are joined.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import IO, Protocol

from selfie_lora.errors import (
    ConfigError,
    DatabaseUnreachableError,
    DeploymentMismatchError,
    ErrorCode,
    QueueClosedError,
    StorageError,
    describe,
)
from selfie_lora.logs import training_context
from selfie_lora.services.clock import ClockGuard
from selfie_lora.services.common import LoopOutages, Outage
from selfie_lora.services.erasure import AccountEraser
from selfie_lora.services.gc import GarbageCollector
from selfie_lora.services.operations import METRICS_TOKEN_REQUIRED, OperationsService
from selfie_lora.services.ports import EnqueueBell
from selfie_lora.services.training import TrainingService
from selfie_lora.wiring import Services

logger = logging.getLogger(__name__)

MAX_SLOTS = 256
STOP_GRACE_S = 30.0
# Under this much of the grace left for the removal of a stopping worker's row, a removal that
# did not end is said as the threads' spending it, not the database's slowness: a healthy
# database's DELETE takes milliseconds. Not a wait of its own: the stop's bound is its grace
# (serve's unit stops it at TimeoutStopSec=30, the grace itself).
_REMOVAL_SHORT_S = 1.0
_IDLE_MIN_S = 0.05
_IDLE_MAX_S = 1.0
# How often a worker asks whether a garbage collection is due (collections are hours apart).
GC_CHECK_SECONDS = 60.0
# How often a worker looks for account deletions whose process died (they are due minutes after
# they were asked for: AccountEraser.resume_after).
ERASE_CHECK_SECONDS = 60.0


class MessageSource(Protocol):
    def next_training(self) -> str | None: ...


class OneTraining:
    """A message source that rings for one training only: the worker inside
    ``selfie-lora train`` runs the training that command queued, never another user's training
    waiting in the shared queue (which a ``serve`` or ``worker`` takes). It rings at most once
    every ``every`` seconds: a message is only a doorbell, so a ring for a training that another
    worker holds, or that has ended, does nothing, and one its holder stepped away from is
    claimed again. The queue's own message for it stays, and does nothing once it has ended."""

    def __init__(self, training_id: str, *, every: float = 1.0) -> None:
        self.training_id = training_id
        self._every = every
        self._last: float | None = None

    def next_training(self) -> str | None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self._every:
            return None
        self._last = now
        return self.training_id


@dataclass
class Identity:
    """A worker's stable name, and the lock that makes it this process's alone."""

    name: str
    _lock: IO[bytes] | None = None

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # the kernel drops the lock with the file
            self._lock = None


def claim_identity(home: Path) -> Identity:
    """The lowest free worker slot of this host and ``home``, locked until ``close`` (or the
    process's death)."""
    folder = home / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:8]
    host = socket.gethostname()
    for slot in range(MAX_SLOTS):
        handle = (folder / f"slot-{slot}.lock").open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return Identity(name=f"{host}/{tag}/w{slot}", _lock=handle)
    raise RuntimeError(f"more than {MAX_SLOTS} workers on {home}")


class Worker:
    """Queue consumer threads and a reconciler thread around one ``TrainingService``."""

    def __init__(
        self, *, training: TrainingService, queue: MessageSource, identity: Identity,
        threads: int = 2, reconcile_seconds: float = 10.0,
        gc: GarbageCollector | None = None, gc_check_seconds: float = GC_CHECK_SECONDS,
        erasure: AccountEraser | None = None, erase_check_seconds: float = ERASE_CHECK_SECONDS,
        clock: ClockGuard | None = None, announce: bool = False,
    ) -> None:
        self._training = training
        # A consuming worker that announces keeps a row alive in the database while it runs
        # (``TrainingService.worker_alive``), so /metrics can count the live workers whichever
        # server answers; off for the tests' stand-ins, which have no database.
        self._announce = announce and threads > 0
        # Checked at each reconciler round (and each presence beat): while this machine's clock
        # is too far from the database's, every lease it reads or writes means something else
        # to the other workers, so it takes no training from the queue and re-queues none (a
        # clock ahead saw every live training as abandoned and took them all over). What it
        # runs goes on: its heartbeats are fenced by owner and attempt, not by the clock.
        self._clock = clock
        self._queue = queue
        self.identity = identity
        # 0: no consumer, only the reconciler (``serve --no-worker``: cancels of trainings whose
        # worker died end even while no worker runs).
        self._threads_wanted = max(0, threads)
        self._reconcile_seconds = reconcile_seconds
        # Only workers that consume collect; ``serve --no-worker`` API servers run only this
        # machine's part (``GarbageCollector.run_machine_due``): they erase and cache weights.
        self._gc = gc
        self._gc_check_seconds = gc_check_seconds
        self._erasure = erasure
        self._erase_check_seconds = erase_check_seconds
        self._stop = threading.Event()
        # Rung when this process enqueues (an ``EnqueueBell`` queue) and when the worker stops:
        # an idle consumer waits on it, not out its backoff, so a training ``serve`` starts is
        # taken at once (it waited up to _IDLE_MAX_S). Counted, so that a ring between a poll
        # and the wait after it is not lost.
        self._rings = 0
        self._rung = threading.Condition()
        self._unsubscribe: Callable[[], None] | None = None
        self._threads: list[threading.Thread] = []
        self._started = False  # a ``start`` ran to its end (and said so)
        self._busy = 0
        self._busy_lock = threading.Lock()
        # An outage of the queue is said once (a WARNING) and its end once (INFO), whichever
        # consumer thread meets them, instead of a traceback from every thread every second
        # while Redis is down.
        self._queue_outage = Outage()
        # The same for the database refusing a training's claim (a full disk, a lock past its
        # timeout): the claim is the only write of ``run`` it does not step away from.
        self._claim_outage = Outage()
        # A database outage, said once per loop (its start and its end) where each round
        # logged a traceback while PostgreSQL was down.
        self._reconcile_outage = LoopOutages("reconciling trainings",
                                                 retried="retrying later")
        # Whether the last beat's write got no answer (a hung database): ``stop`` then writes
        # nothing more.
        self._beat_unanswered = False
        self._presence_outage = LoopOutages("saying this worker is alive",
                                            retried="tried again at the next heartbeat",
                                            refusals_are_outages=True)
        self._gc_outage = LoopOutages("garbage collection",
                                          retried="it is tried again when next due")
        self._holds_outage = LoopOutages(
            "settling this machine's erasure holds", retried=f"tried again in "
            f"{erase_check_seconds:.0f} s")
        self._erasures_outage = LoopOutages(
            "finishing interrupted account deletions", retried=f"tried again in "
            f"{erase_check_seconds:.0f} s")

    def start(self) -> None:
        self._stop.clear()
        if isinstance(self._queue, EnqueueBell) and self._unsubscribe is None:
            self._unsubscribe = self._queue.on_enqueue(self._ring)
        # Anything still held under this worker's name belongs to a dead predecessor (a process
        # that only reconciles holds nothing, and has no name to take over).
        self._reconcile(dead_owners=(self.identity.name,) if self._threads_wanted else ())
        threads = [threading.Thread(target=self._consume, name=f"worker-{i}", daemon=True)
                   for i in range(self._threads_wanted)]
        threads.append(threading.Thread(target=self._reconcile_loop, name="reconciler",
                                        daemon=True))
        if self._gc is not None:
            threads.append(threading.Thread(target=self._gc_loop, name="gc", daemon=True))
        if self._announce:
            # The first beat here, before any thread runs: the worker counts as live once
            # started, and no beat of its own thread comes in the first HEARTBEAT_SECONDS (a
            # test that forks right after the app starts met its first beat mid-transaction,
            # and SQLite's per-process lock records, copied by the fork, left the child's
            # database "locked").
            self._beat()
            threads.append(threading.Thread(target=self._presence_loop, name="presence",
                                            daemon=True))
        if self._erasure is not None:
            # Its own thread: a deletion waits for a training to stop and deletes GBs of blobs,
            # which must delay neither the recovery of a training nor a collection.
            threads.append(threading.Thread(target=self._erase_loop, name="erasures",
                                            daemon=True))
        # Each thread is recorded once it runs: ``stop`` after a start that failed midway (a
        # thread that could not be started) joins only those, where joining one never started
        # raised "cannot join thread before it is started", hid the start's error and kept the
        # name's lock open.
        self._threads = []
        for thread in threads:
            thread.start()
            self._threads.append(thread)
        self._started = True
        if self._threads_wanted:
            logger.info("worker %s (pid %d) started: %d thread(s)", self.identity.name,
                        os.getpid(), self._threads_wanted)

    def stop(self, *, grace: float = STOP_GRACE_S) -> bool:
        """Stop taking work, hand running trainings back, join. True when every thread ended
        within ``grace`` seconds."""
        if self._stop.is_set() and not self._threads:
            return True
        # A start that failed is told by its error, raised to the caller: "stopping" and
        # "stopped" lines after it read as the shutdown of a worker never said to have started.
        started = self._started
        if started and self._threads_wanted:
            logger.info("worker %s stopping (%d training(s) running)", self.identity.name,
                        self._busy)
        elif started:
            # serve --no-worker: no worker runs here, only the reconciler and the upkeep; a
            # "worker stopping" line read as if one had been started against the operator's ask.
            logger.info("background upkeep (reconciler, garbage collection) stopping")
        self._stop.set()  # running trainings see it at their next safe point
        self._ring()  # idle consumers see it now
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        if self._threads:
            # A training past its last safe point still runs, and renews its lease, under this
            # name: a worker that took the name now would think it a dead predecessor's and take
            # the training over while it runs. The name stays held until those threads end (a
            # later ``stop``) or the process exits.
            logger.warning("worker %s: %d thread(s) did not end within %.0f s; its name stays "
                           "held until they end or the process exits", self.identity.name,
                           len(self._threads), grace)
            return False
        if self._announce and not self._database_unanswered():
            # Not counted as a worker that died: its row goes (the presence thread has ended).
            # The name is given back once the removal ends.
            left = max(0.0, deadline - time.monotonic())
            if not self._leave_count(deadline=deadline):
                # Which of the two spent the grace: a training that reached its safe point late
                # leaves a healthy database's removal (milliseconds) no time, and "the database
                # slow" would send the operator to look at a database that answered.
                cause = ("the worker's threads spent the rest" if left < _REMOVAL_SHORT_S
                         else "the database slow to answer, or hung")
                logger.info("worker %s: its removal from the workers' count did not end in the "
                            "%.2f s left of the stop's %.0f s grace (%s); its name is held "
                            "until it does, and a row left runs out and counts as stale for an "
                            "hour", self.identity.name, left, grace, cause)
        else:
            if self._announce:
                # The database gave this worker's last call no answer (hung): removing the row
                # would wait the driver's answer timeout again (~20 s on PostgreSQL) after the
                # threads' joins, to the end of the stop's grace. Left to run out as a dead
                # worker's does.
                logger.info("worker %s: not removed from the workers' count, the database did "
                            "not answer its last call; its row runs out and counts as stale for "
                            "an hour", self.identity.name)
            self.identity.close()
        self._started = False
        if started and self._threads_wanted:
            logger.info("worker %s stopped", self.identity.name)
        return True

    def run_until_signal(self) -> None:
        """``start``, then block until SIGTERM or SIGINT, then ``stop``."""
        stop = threading.Event()

        def handle(signum: int, _frame: FrameType | None) -> None:
            logger.info("received %s", signal.Signals(signum).name)
            stop.set()

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        installed: list[signal.Signals] = []
        try:
            # In the ``try``: a handler that cannot be set (not the main thread: ValueError)
            # still gives the name back through ``stop``; it escaped with the name held.
            for sig in previous:
                signal.signal(sig, handle)
                installed.append(sig)
            self.start()
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()
            for sig in installed:
                signal.signal(sig, previous[sig])

    # ------------------------------------------------------------------ threads
    def _consume(self) -> None:
        idle = _IDLE_MIN_S
        while not self._stop.is_set():
            if self.clock_skewed:
                # The message stays in the queue for a worker whose clock is right.
                self._stop.wait(_IDLE_MAX_S)
                continue
            ticket = self._queue_outage.attempt()
            rings = self._rings  # before the poll: a message queued after it rings
            try:
                training_id = self._queue.next_training()
            except QueueClosedError:
                # Closed by ``Services.close`` while this thread outlived the worker's stop:
                # it never opens again, and its messages wait in it for the next start.
                logger.info("worker %s: the job queue is closed (this process is stopping); "
                            "a consumer ends, the trainings queued are taken at the next "
                            "start", self.identity.name)
                return
            except Exception as exc:
                self._queue_unreachable(exc, ticket=ticket)
                self._stop.wait(_IDLE_MAX_S)
                continue
            self._queue_answers(ticket=ticket)
            if training_id is None:
                self._wait_for_ring(after=rings, timeout=idle)
                idle = min(idle * 1.5, _IDLE_MAX_S)
                continue
            idle = _IDLE_MIN_S
            if self._stop.is_set():
                # Taken just as the worker stops: ring again for whoever runs next. Watched as
                # the reconciler's loop is: a database away then is one line, not a traceback
                # that ends this thread (the message is handed back by the next reconcile).
                self._reconcile()
                return
            with self._busy_lock:
                self._busy += 1
            claim_ticket = self._claim_outage.attempt()
            try:
                self._training.run(training_id, owner=self.identity.name, stopping=self._stop)
            except StorageError as exc:
                # The claim's transaction failed: an outage, not a bug. Nothing was claimed,
                # so the reconciler queues the training again, and this thread waits as for a
                # queue outage instead of taking that message back at once (a traceback a
                # second on a full disk).
                self._claim_failed(exc, ticket=claim_ticket)
                self._stop.wait(_IDLE_MAX_S)
            except Exception:
                # ``run`` ends trainings itself, and steps away from one on any error of ours
                # (the database going away): this is a bug. The lease expires and the
                # reconciler retries.
                with training_context(training_id):
                    logger.exception("training %s: the worker failed to run it", training_id)
            else:
                if self._claim_outage.ends(ticket=claim_ticket):
                    logger.info("worker %s: the database takes trainings' claims again",
                                self.identity.name)
            finally:
                with self._busy_lock:
                    self._busy -= 1

    def _ring(self) -> None:
        with self._rung:
            self._rings += 1
            self._rung.notify_all()

    def _wait_for_ring(self, *, after: int, timeout: float) -> None:
        """Until the queue or ``stop`` rings after the ``after``-th ring, or ``timeout``."""
        with self._rung:
            self._rung.wait_for(lambda: self._rings != after or self._stop.is_set(), timeout)

    def _claim_failed(self, exc: StorageError, *, ticket: int) -> None:
        if self._claim_outage.begins(ticket=ticket):
            logger.warning("worker %s: a training cannot be claimed: %s; trainings wait and are "
                           "tried again every %.0f s (its end is logged)", self.identity.name,
                           exc.message, _IDLE_MAX_S)
        logger.debug("claiming a training failed", exc_info=True)

    def _queue_unreachable(self, exc: Exception, *, ticket: int) -> None:
        if self._queue_outage.begins(ticket=ticket):
            logger.warning("worker %s: the queue cannot be reached (%s); no training is taken "
                           "from it until it answers, asked again every %.0f s (its end is "
                           "logged)", self.identity.name, describe(exc), _IDLE_MAX_S)
        # The traceback only for whoever debugs: every second of an outage would repeat it.
        logger.debug("reading the queue failed", exc_info=True)

    def _queue_answers(self, *, ticket: int) -> None:
        if self._queue_outage.ends(ticket=ticket):
            logger.info("worker %s: the queue answers again; taking trainings from it",
                        self.identity.name)

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self._reconcile_seconds):
            self._reconcile()

    def _beat(self) -> None:
        reading = None
        if self._clock is not None and self._clock.enabled:
            # Checked at every beat, not only at the reconciler's rounds: a beat between a jump
            # of this machine's clock and the next round was written on the wrong clock (2 h
            # behind: in neither state; ahead: live, and older rows deleted by its clock).
            reading = self._clock.observe()
            if reading is None:
                # The database did not answer: the write would wait on it as long again (on a
                # hung PostgreSQL, two waits of ~20 s a beat outlasted stop's 30 s grace). Its
                # outage is said by the reconciler; the row is renewed at the next beat.
                return
        with self._presence_outage.watch(failed="saying this worker is alive failed"):
            unanswered = False
            try:
                if not self.clock_skewed:
                    self._training.worker_alive(self.identity.name)
                elif self._clock is not None and reading is not None:
                    # Skewed, it takes no training: stale, on the database's clock (the
                    # reading's, no second question), while it runs so. Left to run out, its
                    # row was in neither state an hour on.
                    self._training.worker_skewed(self.identity.name,
                                                 database_now=reading.database,
                                                 max_skew=self._clock.max_skew)
            except DatabaseUnreachableError as exc:
                # With the clock check off no read before the write knows a hung database:
                # the write's own wait does (``stop``).
                unanswered = exc.unanswered
                raise
            finally:
                self._beat_unanswered = unanswered

    def _presence_loop(self) -> None:
        # start() gave the first beat.
        while not self._stop.wait(self._training.lease.heartbeat.total_seconds()):
            self._beat()

    def _gc_loop(self) -> None:
        while not self._stop.wait(self._gc_check_seconds):
            self.collect_garbage()

    def _erase_loop(self) -> None:
        while not self._stop.wait(self._erase_check_seconds):
            self.finish_erasures()

    def finish_erasures(self) -> None:
        """Settle this machine's holds of erasures killed midway, then finish the account
        deletions whose process died (``AccountEraser.finish_pending`` logs each); a failure
        is logged, and tried again at the next check."""
        if self._erasure is None or self.clock_skewed:
            # A clock ahead took a deletion another process was still doing for abandoned.
            return
        if self._gc is not None:
            # Whatever is claimed below: a hold lies on the machine whose erase was killed, and
            # only it can settle it, while the deletion itself is usually claimed and finished
            # by another machine (every worker tries). Without this a killed API server's hold
            # (it answers ``DELETE /api/me``) kept her photos until its next collection pass.
            # A glob of HOME/work when there is none.
            # Logged, not raised: the deletions below must not wait on it.
            with self._holds_outage.watch(failed="settling this machine's erasure holds "
                                                 "failed"):
                self._gc.settle_holds()
        with self._erasures_outage.watch(failed="finishing interrupted account deletions "
                                                "failed"):
            # Stopped with the worker: it may be waiting on another worker's training.
            self._erasure.finish_pending(stopping=self._stop)

    def collect_garbage(self) -> None:
        """Collect if a collection is due and this worker wins the lease, or (an API server,
        which consumes nothing) run this machine's part only (it logs what it deleted); a
        failure is logged, and tried again when the next collection is due."""
        if self._gc is None or self.clock_skewed:
            # A clock ahead saw fresh blobs past their grace and deleted them.
            return
        with self._gc_outage.watch(failed="garbage collection failed"):
            try:
                if self._threads_wanted:
                    self._gc.run_due(stopping=self._stop)
                else:
                    self._gc.run_machine_due()
            except DeploymentMismatchError as exc:
                # A refusal, not a failure: its message says what to check; no traceback.
                logger.warning("garbage collection: %s", exc.message)

    def _leave_count(self, *, deadline: float) -> bool:
        """Removes this worker's row (``worker_gone``) and then gives its name back, on a thread
        of its own waited for until ``deadline`` (monotonic): True when it ended by then. A
        database that hangs on a call that nothing before it met (a reconciler's, a consumer's,
        with the clock check off) would keep the stop waiting the answer timeout (~20 s on
        PostgreSQL) past its grace. The name is held until the removal ends: one taken
        meanwhile could see its fresh row removed by this one's late answer."""
        def leave() -> None:
            try:
                with self._presence_outage.watch(failed="removing this worker from the count "
                                                        "failed"):
                    self._training.worker_gone(self.identity.name)
            finally:
                self.identity.close()

        # A daemon: a process that exits does not wait for it (a removal not yet committed is
        # rolled back with the connection).
        removal = threading.Thread(target=leave, name=f"{self.identity.name}-gone", daemon=True)
        removal.start()
        removal.join(timeout=max(0.0, deadline - time.monotonic()))
        return not removal.is_alive()

    def _database_unanswered(self) -> bool:
        """Whether the database gave this worker's last call no answer: its last beat's write,
        or the last clock read (a beat's, a reconciler round's, and on ``serve`` a ``/readyz``'s
        database check that read the server's clock in its statement, ``ClockGuard.check_with``).

        A probe's read counts as the worker's own, one read deciding either way: it is the same
        question on the same pool (each checkout pinged, 10 s at most), so its no-answer is no
        weaker a sign of a hung server than a beat's, and it is the freshest (a load balancer
        probes every few seconds, and the next probe that answers sets this back). Ignoring it
        would make the stop's guess depend on which thread read the clock last, not on what the
        database did. Wrong either way, the cost is bounded: a row left stale for an hour (a
        gauge, no training), or a removal that waits out the rest of the grace (``_leave_count``)."""
        return self._beat_unanswered or (self._clock is not None and not self._clock.answered)

    @property
    def clock_skewed(self) -> bool:
        """Whether the last clock check found this machine too far from the database's."""
        return self._clock is not None and self._clock.skewed

    def _reconcile(self, *, dead_owners: tuple[str, ...] = ()) -> None:
        report = None
        with self._reconcile_outage.watch(failed="reconciling trainings failed"):
            # In the watch, and raising when the database does not answer: a round went on to
            # reconcile after a clock read that got no answer (``check`` swallowed it), so on a
            # hung PostgreSQL it waited out two answer timeouts (~20 s each) and a stop overran
            # its 30 s grace. Now one wait a round; the outage is said once, as the round's own
            # (the presence beats, which skip their write alike, leave it to this loop).
            if self._clock is not None and not self._clock.answered_check():
                return  # skewed: logged by the check, once per episode
            # The stop ends the pass's alert sends after the one in flight: ten sends to a slow
            # endpoint (5 s each) outlasted the stop's grace.
            report = self._training.reconcile(dead_owners=dead_owners, stopping=self._stop)
        if report is None:
            return
        if report.enqueued or report.canceled:
            logger.info("reconciled: %d training(s) queued again, %d canceled",
                        len(report.enqueued), len(report.canceled))


def start_embedded(services: Services, *, consume: bool = True, threads: int | None = None,
                   collect_garbage: bool = False, only: str | None = None) -> Worker:
    """A worker inside another process (``serve``, ``train``): its consumer threads and
    reconciler, started. ``consume=False``: the reconciler, and this machine's part of the
    collection and the interrupted deletions' finishing (``serve --no-worker``).
    ``collect_garbage``: also the garbage collection thread (``serve``'s worker; not the
    short-lived ones of ``train`` and the demo). ``only``: run that training alone, not the
    queue (``train``: one training's time, and a Ctrl-C hands back only its own)."""
    # Every process that serves or works on the data starts here or in run_worker: the store is
    # bound to its database before any collection could run with another one.
    services.operations.bind_deployment()
    identity = claim_identity(services.settings.home) if consume else Identity(name="api")
    worker: Worker | None = None
    try:
        if consume:
            services.training.owner = identity.name
            services.gc.owner = identity.name
        queue: MessageSource = services.queue if only is None else OneTraining(only)
        # Where collections run, and in ``serve --no-worker`` (which may be all that runs, and
        # erases and caches weights on its machine: its part of the collection only); not in
        # ``train``'s and the demo's short-lived ones.
        periodic = collect_garbage or not consume
        worker = Worker(training=services.training, queue=queue, identity=identity,
                        threads=(threads or services.settings.worker_threads) if consume else 0,
                        reconcile_seconds=services.settings.reconcile_seconds,
                        gc=services.gc if periodic else None,
                        erasure=services.erasure if periodic else None, clock=services.clock,
                        announce=only is None)
        worker.start()
    except BaseException:
        # The name is given back (its lock's file closed): the open file was left for the
        # garbage collector to close (until then a retry in this process took the next name),
        # and a start that failed midway left its threads running under it. ``stop`` joins
        # what started and keeps the name only while some thread still runs.
        if worker is not None:
            worker.stop()
        else:
            identity.close()
        raise
    return worker


@contextlib.contextmanager
def embedded_worker(services: Services, *, threads: int = 1) -> Iterator[Worker]:
    """A worker in this process for the length of the block (``selfie-lora train``, the
    demo): what they queue is run while they watch it."""
    worker = start_embedded(services, threads=threads)
    try:
        yield worker
    finally:
        worker.stop()


# What a worker's operator port serves, each to GET and HEAD alone.
OPERATOR_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


class _OperatorHandler(BaseHTTPRequestHandler):
    """``GET /metrics``, ``/healthz`` and ``/readyz`` of a worker, which has no web app."""

    operations: OperationsService  # set on the subclass made for one server
    _head = False  # answering a HEAD: the headers GET would send, no body

    def do_HEAD(self) -> None:
        # Every path as its GET, as the API servers answer HEAD (api.head.HeadAsGet): load
        # balancers probe with HEAD, and /metrics (501 here before) answers it there, behind
        # the same token. The status and headers GET sends, Content-Length included; no body.
        self._head = True
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            # The same figures as the API servers' /metrics, so the same token guards them
            # (a worker's port may be reachable from more than the scraper).
            if not self.operations.may_read_metrics(
                    authorization=self.headers.get("Authorization")):
                self._error(401, ErrorCode.UNAUTHORIZED, METRICS_TOKEN_REQUIRED,
                            headers={"WWW-Authenticate": "Bearer"})
                return
            body, content_type = self.operations.metrics()
            self._answer(200, body, content_type)
        elif path == "/healthz":
            self._answer(200, b'{"status": "ok"}', "application/json")
        elif path == "/readyz":
            readiness = self.operations.readiness()
            detailed = self.operations.is_operator(authorization=self.headers.get("Authorization"))
            self._answer(readiness.http_status,
                         json.dumps(readiness.as_json(detailed=detailed)).encode(),
                         "application/json")
        else:
            self._not_found()

    def __getattr__(self, name: str) -> Callable[[], None]:
        # http.server answers a method without its do_<METHOD> with 501 "Unsupported method",
        # as if the server did not know it; the API servers answer 405 and the methods the
        # path takes. Every method but GET and HEAD, whatever its name, gets that here too.
        if name.startswith("do_"):
            return self._wrong_method
        raise AttributeError(name)

    def _wrong_method(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in OPERATOR_PATHS:
            self._not_found()
            return
        # The body is never read: the connection is not used again (HTTP/1.0, http.server's).
        self._error(405, ErrorCode.METHOD_NOT_ALLOWED, "Method Not Allowed",
                    headers={"Allow": "GET, HEAD"})

    def _not_found(self) -> None:
        # The API's JSON 404 (an unknown /api path), not a shape of its own: one parser for
        # every error answer of the service, whichever process gave it.
        self._error(404, ErrorCode.NOT_FOUND, "Not Found")

    def _error(self, status: int, code: ErrorCode, message: str,
               headers: dict[str, str] | None = None) -> None:
        """The contract's error answer, ``{"error": {"code", "message", "details"}}``."""
        body = {"error": {"code": code, "message": message, "details": []}}
        self._answer(status, json.dumps(body).encode(), "application/json", headers=headers)

    def _answer(self, status: int, body: bytes, content_type: str,
                headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not self._head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("metrics: " + format, *args)


def serve_operator_endpoints(operations: OperationsService, *, host: str,
                             port: int) -> ThreadingHTTPServer:
    """Starts the worker's /metrics, /healthz and /readyz on a daemon thread."""
    handler = type("Handler", (_OperatorHandler,), {"operations": operations})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    logger.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server


def run_worker(services: Services, *, threads: int | None = None) -> None:
    """``selfie-lora worker`` on ``services`` (closed at the end): consume the queue until
    SIGTERM or SIGINT. ConfigError when it cannot start: SELFIE_LORA_METRICS_PORT taken."""
    settings = services.settings
    try:
        services.operations.bind_deployment()  # refuses another deployment's store
        # Before it claims anything: a worker without the deployment's storage would fail each
        # training it took, blaming the user's photos.
        services.operations.check_worker_storage()
        metrics = (serve_operator_endpoints(services.operations, host=settings.metrics_host,
                                            port=settings.metrics_port)
                   if settings.metrics_port is not None else None)
    except OSError as exc:  # the metrics port in use, or an address this machine does not have
        with contextlib.suppress(Exception):
            services.close()
        raise ConfigError(f"SELFIE_LORA_METRICS_PORT {settings.metrics_port} on "
                          f"SELFIE_LORA_METRICS_HOST {settings.metrics_host} cannot be used: "
                          f"{exc.strerror or exc}") from None
    except BaseException:
        services.close()
        raise
    identity: Identity | None = None
    worker: Worker | None = None
    try:
        # In the ``try``: no name left (MAX_SLOTS workers on this HOME) closes them too.
        identity = claim_identity(settings.home)
        services.training.owner = identity.name
        services.gc.owner = identity.name
        worker = Worker(training=services.training, queue=services.queue, identity=identity,
                        threads=threads or settings.worker_threads,
                        reconcile_seconds=settings.reconcile_seconds, gc=services.gc,
                        erasure=services.erasure, clock=services.clock, announce=True)
        # Stops the worker before the ``finally`` closes the queue it reads; its ``stop`` gives
        # the name back.
        worker.run_until_signal()
    finally:
        if worker is None and identity is not None:
            # The worker was never built: the name is given back here, as ``start_embedded``
            # does. Left to the garbage collector, it stayed taken in this process until then.
            identity.close()
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        with contextlib.suppress(Exception):
            services.close()
