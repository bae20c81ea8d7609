"""The ``JobQueue`` port on huey's storages: SQLite by default, Redis for workers on several
machines.

Only huey's storage is used: a message is the bytes ``training:<id>``, nothing else, and workers
(``selfie_lora.worker``) take them with ``next_training``. The queue is a doorbell, not a record
of work: huey does not acknowledge messages, so one taken by a worker that then dies is gone. That
is fine, because the training's row holds its state and its lease; the reconciler rings again for
any unfinished training that nobody holds and no message will reach (``queued_training_ids``).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import urlparse

from selfie_lora.adapters.sqlite_files import keep_private
from selfie_lora.errors import ConfigError, QueueClosedError
from selfie_lora.services.common import EnqueueListeners

if TYPE_CHECKING:
    # At run time huey is imported where a queue is first used (``_huey_maker``).
    from huey import Huey
    from huey.storage import BaseStorage

logger = logging.getLogger(__name__)

_PREFIX = b"training:"
# How long a Redis worker waits on an empty queue per call (it returns sooner with a message).
REDIS_READ_TIMEOUT_S = 1
# How long a Redis client waits to connect, and for any answer (the blocking read's included,
# which the server gives after REDIS_READ_TIMEOUT_S): a Redis that accepts and never answers (a
# stopped server, a partition that drops packets) fails the call, which every caller takes as
# the queue being away. redis-py before 8.0 (``redis>=5`` is allowed) waits for ever by default,
# and the queue is asked inside requests (a start's message), by /readyz and by the reconciler,
# whose thread then stopped for good. A URL that names either (``?socket_timeout=...``) keeps it.
CONNECT_TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 5.0
# How long ``close`` waits for calls under way to end on their connections before it lets go of
# them itself: a Redis call is answered within ANSWER_TIMEOUT_S (its blocking read within
# REDIS_READ_TIMEOUT_S), a SQLite one as its statement ends. A call still under way after that is
# stuck, and its thread may be a daemon that the interpreter's exit kills before it ends: a
# release left to it might never come, while ``Services.close`` has returned as if done.
CLOSE_WAIT_S = ANSWER_TIMEOUT_S + REDIS_READ_TIMEOUT_S


# The name of every release before the queue's name became a setting.
DEFAULT_NAME = "selfie-lora"


def make_huey(url: str, *, name: str = DEFAULT_NAME) -> Huey:
    """huey on ``url``, its queue called ``name``: deployments that share one Redis database
    (or SQLite file) each take only their own queue's messages, and count only theirs."""
    return _huey_maker(url, name=name)()


def _huey_maker(url: str, *, name: str) -> Callable[[], Huey]:
    """What builds ``make_huey``'s huey, when called. The URL is read and a SQLite queue's file
    made private now (an earlier release's 0644 file too, as every start did); huey itself is
    imported and built only when it is called: its storage module imports redis and psycopg
    whenever they are installed (~0.1-0.3 s of CPU), which every command that built the
    services paid, ``users create`` on SQLite included, where none of them is used."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        # sqlite:////abs/path or sqlite:///rel/path, as SQLAlchemy spells it.
        path = url.removeprefix("sqlite:///")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        keep_private(path)
        return functools.partial(_sqlite_huey, path, name=name)
    if parsed.scheme in ("redis", "rediss"):
        return functools.partial(_redis_huey, url, name=name)
    raise ConfigError(f"unsupported SELFIE_LORA_QUEUE_URL scheme {parsed.scheme!r}")


# How long a call on the SQLite queue waits for a file another process holds locked before it
# fails as busy (huey's own default, named here so that a test of a held file waits less).
SQLITE_BUSY_TIMEOUT_S = 5.0


def _sqlite_huey(path: str, *, name: str) -> Huey:
    from huey import SqliteHuey

    return SqliteHuey(name=name, filename=path, results=False, timeout=SQLITE_BUSY_TIMEOUT_S)


def _redis_huey(url: str, *, name: str) -> Huey:
    from huey import RedisHuey
    from redis import ConnectionPool  # the redis extra, needed only here

    # The URL's own options win over these (redis-py's from_url).
    pool = ConnectionPool.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                   socket_timeout=ANSWER_TIMEOUT_S)
    # Blocking reads: an idle worker waits on Redis instead of polling it.
    return RedisHuey(name=name, connection_pool=pool, results=False, blocking=True,
                     read_timeout=REDIS_READ_TIMEOUT_S)


def _decode(message: bytes | str) -> str | None:
    data = message.encode() if isinstance(message, str) else message
    if not data.startswith(_PREFIX):
        return None
    return data[len(_PREFIX):].decode("utf-8", errors="replace") or None


class HueyJobQueue:
    def __init__(self, make: Callable[[], Huey]) -> None:
        """``make``: builds its huey (``_huey_maker``), called at the queue's first use, not
        before: a command that never uses the queue (``users create`` ...) loads neither huey
        nor the redis and psycopg its import brings."""
        self._make = make
        self._huey: Huey | None = None
        # The build's own lock, not ``_state``: a build can take seconds (a SQLite queue file
        # another process holds: its busy timeout, then huey's WAL retries), or fail at each
        # try, and ``close`` and every call's count take ``_state``: behind a build, ``close``
        # waited past CLOSE_WAIT_S, and /readyz and the requests' enqueues with it.
        self._building = threading.Lock()
        self._enqueued = EnqueueListeners()
        # ``close``: calls begun before it finish on the storage's connections (it waits for
        # them, CLOSE_WAIT_S at most), then it lets go of them; none begins after it. huey's
        # SQLite storage would otherwise open a new connection at the next call, which nothing
        # would close (its -wal file stays).
        self._state = threading.Condition()
        self._calls = 0
        self._closed = False
        # Set by ``close`` as it lets go: a call still under way then is late (it fails).
        self._released = False

    @classmethod
    def from_url(cls, url: str, *, name: str = DEFAULT_NAME) -> HueyJobQueue:
        return cls(_huey_maker(url, name=name))

    @property
    def huey(self) -> Huey:
        """Its huey, built at the first call that needs it (once: under ``_building``, then
        published under ``_state``, which ``_release`` reads it under). ``QueueClosedError``
        after ``close``, as every call: the huey it gave then (built again, or the one let go
        of) opened connections at its next use that nothing would close (SQLite's, and its -wal
        file; the Redis pool's)."""
        return self._built(under_way=False)

    def open(self) -> None:
        """Builds its huey now rather than at the first use: a process that will use the queue
        (``serve``, ``worker``, ``train``, ``resume``, the demo: ``build_services(open_queue=
        True)``) then stops at its start on one it cannot use (a queue file that is not
        SQLite's, a Redis URL option redis-py refuses, the redis extra not installed), instead
        of running on and saying an outage at every poll. Building connects to no Redis: one
        that is down is still a start, and so is a queue file another process holds locked past
        the busy timeout (a worker stopped inside its transaction, an operator's sqlite3 shell):
        that passes as an outage does, so it is logged and left to the first use, which tries
        again (review report1 R1: refused, ``train`` turned away a training that the reconciler
        would have queued). ``QueueClosedError`` after ``close``: a closed queue is never opened
        again."""
        import sqlite3

        try:
            self._built(under_way=False)
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            logger.warning("the job queue's SQLite file is busy (another process holds it "
                           "locked): %s; it is tried again at its first use", exc)

    def _built(self, *, under_way: bool) -> Huey:
        """``under_way``: for a call counted in ``_calls`` (``_using``), begun before any
        ``close``: it may still build (its first use), as ``close`` waits for it and lets go of
        what it built after it. Any other use (``open``, ``huey``) is refused once closed."""
        with self._state:
            if self._closed and not under_way:
                raise QueueClosedError(QueueClosedError.AFTER_CLOSE)
            built = self._huey
        if built is not None:
            return built
        with self._building:
            with self._state:
                # Again: a close may have come while it waited behind another call's build,
                # whose huey that close lets go of (review report1 N1).
                if self._closed and not under_way:
                    raise QueueClosedError(QueueClosedError.AFTER_CLOSE)
                built = self._huey
            if built is None:
                built = self._make()
                with self._state:
                    # A close that came while it was built (seconds, at worst) found nothing to
                    # let go of: this one is let go of here, never published nor used.
                    refused = self._closed and not under_way
                    if not refused:
                        self._huey = built
                if refused:
                    _let_go(built)
                    raise QueueClosedError(QueueClosedError.AFTER_CLOSE)
            return built

    def enqueue_training(self, training_id: str) -> None:
        with self._using() as storage:
            storage.enqueue(_PREFIX + training_id.encode())
        self._enqueued.ring()

    def on_enqueue(self, listener: Callable[[], None]) -> Callable[[], None]:
        """``EnqueueBell``: this process's worker (``serve``'s) takes what this process queues
        at once; another process's messages it finds at its next poll (SQLite), or at once
        from its blocking read (Redis)."""
        return self._enqueued.add(listener)

    def next_training(self) -> str | None:
        """The next training id, or None when the queue is empty (Redis waits up to a second
        for one). Messages this version does not know (e.g. left by an older one) are dropped:
        the reconciler queues their trainings again."""
        while True:
            message = self._dequeue()
            if message is None:
                return None
            training_id = _decode(message)
            if training_id is not None:
                return training_id
            logger.warning("dropped a queue message of unknown shape (%d bytes)", len(message))

    def _dequeue(self) -> bytes | str | None:
        """huey's ``dequeue``, but for Redis's blocking read: huey takes that read's timing out
        as an empty queue, so a worker facing a Redis that accepts and never answers (a
        stopped server, a partition dropping packets) logged nothing while it lasted (/readyz
        and the reconciler said it). An empty queue is answered (nil) after the read's wait;
        only a server that said nothing for ANSWER_TIMEOUT_S times out: raised, the worker
        says the outage once, and its end once (``Worker._queue_unreachable``)."""
        from huey.storage import RedisStorage  # here: huey is loaded at the first use

        with self._using() as storage:
            if not (isinstance(storage, RedisStorage) and storage.blocking):
                return cast("bytes | str | None", storage.dequeue())
            answer_s = storage.conn.connection_pool.connection_kwargs.get("socket_timeout")
            wait_s = storage.read_timeout
            if answer_s:
                # A URL's own shorter ?socket_timeout=: the wait stays within it, so that an
                # empty queue's answer is never taken for silence.
                wait_s = max(min(wait_s, answer_s / 2), 0.01)
            reply = storage.conn.brpop(storage.queue_key, timeout=wait_s)
            return None if reply is None else cast("bytes | str", reply[1])

    def queued_training_ids(self) -> set[str]:
        with self._using() as storage:
            return {tid for m in storage.enqueued_items() if (tid := _decode(m))}

    def pending(self) -> int:
        with self._using() as storage:
            return int(storage.queue_size())

    def ping(self) -> None:
        """Raises when the queue's storage cannot be reached."""
        with self._using() as storage:
            storage.queue_size()

    def flush(self) -> None:
        with self._using() as storage:
            storage.flush_queue()

    def close(self) -> None:
        """``WorkQueue.close``: lets go of the storage's connections (SQLite's connection, which
        checkpoints and removes its -wal file; every connection of the Redis pool) once the
        calls under way on other threads have ended (a Redis read waits up to a second), or
        after CLOSE_WAIT_S even if some have not: those then fail (``QueueClosedError``), and
        the last of them lets go again of whatever it opened. Every call after it raises
        ``QueueClosedError``; a second close does nothing."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._state.wait_for(lambda: self._calls == 0, timeout=CLOSE_WAIT_S)
            stuck = self._calls
            self._released = True
        if stuck:
            logger.warning("closing the job queue: %d call(s) still under way after %.0f s; "
                           "their connections are let go of under them (they fail)", stuck,
                           CLOSE_WAIT_S)
        self._release()

    @contextmanager
    def _using(self) -> Iterator[BaseStorage]:
        with self._state:
            if self._closed:
                raise QueueClosedError(QueueClosedError.AFTER_CLOSE)
            self._calls += 1
        try:
            yield self._built(under_way=True).storage
        finally:
            with self._state:
                self._calls -= 1
                if self._calls == 0:
                    self._state.notify_all()  # a ``close`` waiting for the calls under way
                late = self._released
                last = late and self._calls == 0
            if last:
                # Whatever a late call opened again (SQLite reconnects on use; so does Redis).
                self._release()
            if late:
                # Its connection was let go of under it: whatever it got is not to be trusted
                # (a message it enqueued is a duplicate doorbell at worst; one it took, the
                # reconciler rings again).
                raise QueueClosedError("the job queue was closed while this call was under way: "
                                       "this process is stopping")

    def _release(self) -> None:
        """Lets go of the storage's connections. An error of it is logged, not raised: raised
        at a late call's end it would stand for that call's own outcome, and from ``close`` it
        would cut ``Services.close`` short (the queue is closed whatever it says)."""
        with self._state:
            huey = self._huey
        if huey is None:  # never used: nothing was opened (nor huey loaded) to let go of
            return
        _let_go(huey)


def _busy(exc: BaseException) -> bool:
    """Whether SQLite said its file is held by another connection (SQLITE_BUSY, SQLITE_LOCKED,
    extended codes included): for a while, unlike a file that is not a database."""
    import sqlite3

    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _let_go(huey: Huey) -> None:
    """Lets go of ``huey``'s connections, logging (not raising) what fails: ``_release``'s."""
    from huey.storage import RedisStorage

    storage = huey.storage
    # SQLite: its connection; huey's Redis storage has nothing of its own. Then every
    # connection of the Redis pool: make_huey's own, which no one else uses.
    steps = [storage.close]
    if isinstance(storage, RedisStorage):
        steps.append(storage.pool.disconnect)
    for step in steps:
        try:
            step()
        except Exception:
            logger.warning("closing the job queue: its connections could not all be let go "
                           "of cleanly", exc_info=True)
