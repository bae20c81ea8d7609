"""SQLAlchemy implementation of the ``Repository`` port (SQLite or PostgreSQL)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Engine,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    literal_column,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import (
    TimeoutError as PoolTimeoutError,
)
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from selfie_lora.adapters.db.tables import (
    ApiKeyRow,
    DatasetRow,
    DeploymentRow,
    EventRow,
    GenerationRow,
    JobLeaseRow,
    ModelRow,
    SignInFailureRow,
    TrainingRow,
    UploadClaimRow,
    UserRow,
    VersionLikenessRow,
    VersionRow,
    WebhookDeliveryRow,
    WebSessionRow,
    WorkerRow,
)
from selfie_lora.adapters.sqlite_files import keep_private
from selfie_lora.database_url import database_url_shown
from selfie_lora.disk_space import full_disk_words, is_full_error, is_quota_error
from selfie_lora.domain.accounts import (
    AccountErasingError,
    ErasurePlan,
    HoldingsChangedError,
    UserHoldings,
    fold_name,
)
from selfie_lora.domain.entities import (
    ACTIVE_STATUSES,
    ApiKey,
    Dataset,
    Finding,
    GateStatus,
    Generation,
    GenerationPosition,
    JobLease,
    Model,
    Probe,
    Recipe,
    Training,
    TrainingStatus,
    User,
    UserSummary,
    Version,
    WebSession,
    face_box_from,
)
from selfie_lora.domain.gc import DatasetRef, GenerationRef, References, TrainingRef
from selfie_lora.domain.lease import WORKER_STALE_FOR
from selfie_lora.domain.likeness import (
    IdentityScores,
    LikenessStatus,
    LikenessSummary,
    ProbeMark,
    ProbeResult,
    VersionLikeness,
)
from selfie_lora.driver_errors import driver_says, gave_no_answer
from selfie_lora.errors import (
    ConfigError,
    ConflictError,
    DatabaseBusyError,
    DatabaseLockedError,
    DatabaseRefusedError,
    DatabaseUnreachableError,
    ErrorCode,
    InvalidInputError,
    StorageError,
    StorageFullError,
)

logger = logging.getLogger(__name__)

# What a write refused for another row's clash (a unique or foreign key, not one told apart in
# ``_translate``) is answered with.
WRITE_CONFLICT_MESSAGE = ("the change clashed with another one made at the same moment, so "
                          "nothing was changed; send the request again")


# The execution option of the sessions that read one statement (``SqlRepository._read``).
READ_ONLY = "selfie_lora_read_only"
# Connections per process. The API runs blocking work in anyio's thread pool (40 threads)
# beside the worker's threads. With SQLAlchemy's default (5 kept, 10 more opened and closed
# again for every checkout beyond them) requests queued for a connection under load, and paid
# for a new one (its PRAGMAs included) while they held it: on SQLite, where a connection costs a
# file handle, the pool holds one per thread. On PostgreSQL, where it costs a server process,
# the most stays SQLAlchemy's 15 unless SELFIE_LORA_DB_POOL_SIZE says otherwise (``pool_size``:
# what a server's max_connections allows, divided among the deployment's processes), all of
# them kept instead of forked again and again. No overflow: the size is the most it opens.
SQLITE_POOL = {"pool_size": 48, "max_overflow": 16}
POSTGRES_POOL_SIZE = 15
# How long a thread waits for a free connection of the pool before its call fails (SQLAlchemy's
# own default; SELFIE_LORA_DB_POOL_TIMEOUT): a process whose connections are all held that long
# is overloaded, and its callers get an error instead of queueing without end.
POOL_TIMEOUT_S = 30.0


def make_engine(url: str, *, statement_timeout_s: float | None = None,
                answer_timeout_s: float | None = None,
                pool_size: int = POSTGRES_POOL_SIZE,
                pool_timeout_s: float = POOL_TIMEOUT_S) -> Engine:
    """An engine for ``url``. SQLite gets WAL and a busy timeout so the API, the in-process worker
    and a CLI can share one file, and transactions that take the write lock when they begin,
    except those that only read.

    Why the write lock: Python's sqlite3 starts a transaction only at the first write, so the read
    of a read-modify-write (``SELECT ... FOR UPDATE`` is a no-op on SQLite) ran outside it and a
    writer could save a stale row over a newer one (a webhook's progress over the worker's
    finished training). ``BEGIN IMMEDIATE`` makes every transaction see the latest rows and keep
    them until it commits, as the row locks do on PostgreSQL.

    Why not for reads: the write lock is one per database, so every ``GET`` of every user waited
    for every other one (and for the worker's writes) in SQLite's busy handler, which sleeps up to
    100 ms a try: 200 concurrent model reads took 1.6 s at p99 (``bench/api_load.py``). A read
    (``SqlRepository._read``: one statement) begins no transaction at all: in WAL mode a
    statement on its own reads a consistent snapshot of the latest commit without taking any
    lock, and it writes nothing that could be stale. (A ``BEGIN`` and ``COMMIT`` around it would
    only add two calls into SQLite, each a hand-over of the GIL between busy threads.)

    PostgreSQL connections time out (``adapters/db/postgres.py``): making one, a peer gone
    silent, a statement (``statement_timeout_s``, 300 s unless given), and the answer to one
    (``answer_timeout_s``, 30 s more unless given). ``pool_size``: the most connections this
    engine holds to a PostgreSQL server; SQLite's pool is its own (a connection there is a file
    handle, not a server process). ``pool_timeout_s``: how long a checkout waits for a free
    connection of either pool.
    A database that does not answer is a ``StorageError`` then, never a wait for ever."""
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and (
                parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"):
            # Each connection of the pool would get an empty database of its own, and every
            # process too: nothing written would be seen again (it failed on the pool's
            # arguments with a TypeError before).
            raise ConfigError("SELFIE_LORA_DATABASE_URL is an in-memory SQLite database, which "
                              "nothing else sees: use a file (sqlite:////path/selfie-lora.db) "
                              "or PostgreSQL")
        return _make_engine(url, statement_timeout_s=statement_timeout_s,
                            answer_timeout_s=answer_timeout_s, pool_size=pool_size,
                            pool_timeout_s=pool_timeout_s)
    except NoSuchModuleError:  # before ArgumentError: it is one
        raise ConfigError(f"SELFIE_LORA_DATABASE_URL ({database_url_shown(url)}) names a "
                          "database this cannot use: postgresql+psycopg://... or sqlite:///...") from None
    except ImportError as exc:  # create_engine imports the URL's driver
        raise ConfigError(f"SELFIE_LORA_DATABASE_URL ({database_url_shown(url)}) needs a "
                          f"driver that is not installed: {exc}") from None
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError("SELFIE_LORA_DATABASE_URL is not a database URL") from None


def server_clock(engine: Engine) -> Callable[[], datetime] | None:
    """The database server's clock, read by one short statement (``services.clock``), for
    PostgreSQL, which every machine of a deployment shares; None for SQLite, whose only clock is
    this machine's. ``clock_timestamp()``, not ``now()``: the time of the answer, not of the
    transaction's start."""
    if engine.dialect.name != "postgresql":
        return None

    def read() -> datetime:
        with engine.connect() as conn:
            value = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
        return _req_utc(value)

    return read


def _make_engine(url: str, *, statement_timeout_s: float | None,
                 answer_timeout_s: float | None, pool_size: int,
                 pool_timeout_s: float) -> Engine:
    if url.startswith("sqlite"):
        keep_private(make_url(url).database)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               pool_timeout=pool_timeout_s, **SQLITE_POOL)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # The driver must not begin transactions itself: SQLAlchemy's begin does (below).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            if conn.get_execution_options().get(READ_ONLY, False):
                return
            if not _brief_waits():
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                return
            # The write lock is taken here, once: the statements after it wait for nothing more
            # (WAL), so the connection's usual wait comes back as soon as it is held.
            conn.exec_driver_sql(f"PRAGMA busy_timeout={BRIEF_LOCK_WAIT_MS}")
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            finally:
                conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")

        return engine
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() != "psycopg":
        return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=0,
                             pool_timeout=pool_timeout_s)
    from selfie_lora.adapters.db import postgres

    statement_s = (statement_timeout_s if statement_timeout_s is not None
                   else postgres.STATEMENT_TIMEOUT_S)
    # The pool's ping is ours (``_ping``): SQLAlchemy's would wait for the statement's bound.
    engine = create_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=pool_timeout_s,
                           connect_args=postgres.connect_args(
                               dict(parsed.query), statement_timeout_s=statement_s))

    answer_s = (answer_timeout_s if answer_timeout_s is not None
                else statement_s + postgres.ANSWER_MARGIN_S)

    @event.listens_for(engine, "do_connect")
    def _bounded_connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        return postgres.connect(*cargs, answer_timeout=answer_s, **cparams)

    @event.listens_for(engine, "begin")
    def _brief_begin(conn: Any) -> None:
        if _brief_waits():
            # This transaction's own (SET LOCAL): the pool's connection keeps no trace of it.
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {BRIEF_LOCK_WAIT_MS}")

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        # What pool_pre_ping does (a connection the server dropped is replaced before a call
        # uses it), with a bound of its own: the pool tries again with a new connection.
        postgres.ping(dbapi_conn, engine.dialect.do_ping)

    return engine


# The first half of the PostgreSQL advisory locks that guard sign-in attempts (the second is a
# hash of the name or address tried): any constant of ours, so they never meet another lock.
SIGN_IN_LOCK_SPACE = 0x5E1F


def _sign_in_lock_id(key: str) -> int:
    # A signed 32-bit number, as pg_advisory_xact_lock(int, int) takes; two keys that share one
    # only wait for each other a moment longer.
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big", signed=True)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every datetime we write is UTC. PostgreSQL hands back
    # the instant in the session's TimeZone (a server or role set to Asia/Tokyo): the same
    # instant, but printed as it is it shows Tokyo's hour where a message says UTC.
    if value is None:
        return None
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _req_utc(value: datetime) -> datetime:
    out = _utc(value)
    assert out is not None
    return out


def _user(row: UserRow) -> User:
    return User(id=row.id, name=row.name, created_at=_req_utc(row.created_at),
                disabled_at=_utc(row.disabled_at),
                erasure_requested_at=_utc(row.erasure_requested_at))


def _api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(id=row.id, user_id=row.user_id, name=row.name, key_hash=row.key_hash,
                  prefix=row.prefix, created_at=_req_utc(row.created_at),
                  revoked_at=_utc(row.revoked_at), replaced_by=row.replaced_by,
                  form_nonce_hash=row.form_nonce_hash)


def _model(row: ModelRow) -> Model:
    return Model(
        id=row.id, user_id=row.user_id, backend=row.backend, trigger_word=row.trigger_word,
        destination=row.destination, trainer_version=row.trainer_version,
        lora_scale=row.lora_scale, lora_scale_is_custom=row.lora_scale_is_custom,
        active_version_id=row.active_version_id, created_at=_req_utc(row.created_at),
        probes=tuple(Probe.from_dict(p) for p in row.probes or ()),
    )


def _dataset(row: DatasetRow) -> Dataset:
    return Dataset(
        id=row.id, user_id=row.user_id, images_total=row.images_total,
        images_accepted=row.images_accepted, photo_hashes=tuple(row.photo_hashes),
        findings=tuple(Finding.from_dict(f) for f in row.findings), accepted=row.accepted,
        sha256=row.sha256, created_at=_req_utc(row.created_at), verdict=dict(row.verdict or {}),
        face_boxes=tuple(face_box_from(b) for b in row.face_boxes or ()),
    )


def _training(row: TrainingRow) -> Training:
    return Training(
        id=row.id, model_id=row.model_id, dataset_id=row.dataset_id, backend=row.backend,
        status=TrainingStatus(row.status), is_retraining=row.is_retraining,
        trigger_word=row.trigger_word, destination=row.destination,
        trainer_version=row.trainer_version, recipe=Recipe.from_dict(row.recipe),
        preserved=dict(row.preserved), created_at=_req_utc(row.created_at), step=row.step,
        total_steps=row.total_steps, remote_id=row.remote_id, version_id=row.version_id,
        error=row.error, loss=row.loss, weights_method=row.weights_method,
        cancel_requested=row.cancel_requested, remote_cancel_pending=row.remote_cancel_pending,
        remote_create_started=row.remote_create_started, remote_marker=row.remote_marker,
        progressed=row.progressed,
        started_at=_utc(row.started_at),
        completed_at=_utc(row.completed_at), history=tuple(row.history),
        metrics=dict(row.metrics or {}), attempt=row.attempt, recoveries=row.recoveries,
        lease_owner=row.lease_owner, lease_expires_at=_utc(row.lease_expires_at),
        heartbeat_at=_utc(row.heartbeat_at),
        loss_curve=tuple((int(s), float(v)) for s, v in (row.loss_curve or ())),
    )


def _training_values(t: Training) -> dict[str, Any]:
    return {
        "id": t.id, "model_id": t.model_id, "dataset_id": t.dataset_id, "backend": t.backend,
        "status": str(t.status), "is_retraining": t.is_retraining,
        "trigger_word": t.trigger_word, "destination": t.destination,
        "trainer_version": t.trainer_version, "recipe": t.recipe.as_dict(),
        "preserved": t.preserved, "step": t.step, "total_steps": t.total_steps,
        "remote_id": t.remote_id, "version_id": t.version_id, "error": t.error, "loss": t.loss,
        "weights_method": t.weights_method, "cancel_requested": t.cancel_requested,
        "remote_cancel_pending": t.remote_cancel_pending,
        "remote_create_started": t.remote_create_started, "remote_marker": t.remote_marker,
        "progressed": t.progressed,
        "history": list(t.history), "created_at": t.created_at, "started_at": t.started_at,
        "completed_at": t.completed_at, "metrics": t.metrics or None, "attempt": t.attempt,
        "recoveries": t.recoveries, "lease_owner": t.lease_owner,
        "lease_expires_at": t.lease_expires_at, "heartbeat_at": t.heartbeat_at,
        "loss_curve": [[s, v] for s, v in t.loss_curve] or None,
    }


def _version(row: VersionRow) -> Version:
    return Version(
        id=row.id, model_id=row.model_id, number=row.number, training_id=row.training_id,
        trainer_version=row.trainer_version, weights_key=row.weights_key,
        weights_sha256=row.weights_sha256, weights_method=row.weights_method,
        remote_version=row.remote_version, version_mismatch=row.version_mismatch,
        created_at=_req_utc(row.created_at), gate_status=GateStatus(row.gate_status),
        gate_reason=row.gate_reason, gate_details=dict(row.gate_details or {}),
        alert=dict(row.alert) if row.alert else None,
    )


# A likeness record's probes as [[index, lora_scale, image_key], ...] (``ProbeMark``), made in
# the database from the probes' JSON: a summary reads these, not the embeddings.
_PROBE_MARKS_SQLITE = (
    "(SELECT json_group_array(json_array(json_extract(p.value, '$.index'), "
    "json_extract(p.value, '$.lora_scale'), json_extract(p.value, '$.image_key'))) "
    "FROM json_each(version_quality.probes) AS p)")
_PROBE_MARKS_PG = (
    "(SELECT coalesce(json_agg(json_build_array(e.p -> 'index', e.p -> 'lora_scale', "
    "e.p ->> 'image_key') ORDER BY e.n), '[]'::json) "
    "FROM json_array_elements(version_quality.probes) WITH ORDINALITY AS e(p, n))")


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _likeness(row: VersionLikenessRow) -> VersionLikeness:
    return VersionLikeness(
        version_id=row.version_id, model_id=row.model_id, status=LikenessStatus(row.status),
        created_at=_req_utc(row.created_at), embedding_model=row.embedding_model,
        reference_dataset_id=row.reference_dataset_id,
        scores=IdentityScores.from_dict(row.scores) if row.scores else None,
        probes=tuple(ProbeResult.from_dict(p) for p in row.probes),
        training=dict(row.training), error=row.error, scored_at=_utc(row.scored_at),
    )


def _likeness_values(q: VersionLikeness) -> dict[str, Any]:
    scores = q.scores
    return {
        "version_id": q.version_id, "model_id": q.model_id, "status": str(q.status),
        "embedding_model": q.embedding_model, "reference_dataset_id": q.reference_dataset_id,
        "identity": scores.identity if scores else None,
        "identity_nearest": scores.identity_nearest if scores else None,
        "face_share": scores.face_share if scores else None,
        "sane_share": scores.sane_share if scores else None,
        "sharpness": scores.sharpness if scores else None,
        "scores": scores.as_dict() if scores else None,
        "probes": [p.as_dict() for p in q.probes], "training": q.training, "error": q.error,
        "created_at": q.created_at, "scored_at": q.scored_at,
    }


def _generation(row: GenerationRow) -> Generation:
    return Generation(
        id=row.id, user_id=row.user_id, model_id=row.model_id, version_id=row.version_id,
        prompt=row.prompt, lora_scale=row.lora_scale, seed=row.seed,
        image_keys=tuple(row.image_keys), created_at=_req_utc(row.created_at),
        withheld=tuple(row.withheld or ()),
    )


# ``get_model_overview``'s query, built once: building it cost as much as running it.
_MODEL_OVERVIEW = (
    select(ModelRow, VersionRow, VersionLikenessRow)
    .outerjoin(VersionRow, VersionRow.id == ModelRow.active_version_id)
    .outerjoin(VersionLikenessRow, VersionLikenessRow.version_id == ModelRow.active_version_id)
    .where(ModelRow.user_id == bindparam("user_id"))
)


def _named(name: str) -> ColumnElement[bool]:
    """The users that hold ``name``, whatever its case: by the folded name, or, for a user an
    older process wrote without it (a rolling upgrade to 0013, until the next start fills it in,
    ``migrate.fill_folded_names``), by its name lowered. Names are ASCII (``services.users``),
    where SQL's lower() folds as ``fold_name`` does. Two can match only when the older process
    made one beside the other: the first made is the one."""
    folded = fold_name(name)
    return or_(UserRow.name_folded == folded,
               and_(UserRow.name_folded.is_(None), func.lower(UserRow.name) == folded))


def _resumes(training_id: str | InstrumentedAttribute[str]) -> ColumnElement[bool]:
    """The events that queued a training resuming ``training_id`` (its ``resumed_from``): the
    one record of a resume (``TrainingService.resume``), on SQLite and PostgreSQL alike."""
    return and_(EventRow.kind == "training_queued",
                EventRow.data["resumed_from"].as_string() == training_id)


# The engines on which this thread holds an ``atomic()`` transaction (by id).
_held = threading.local()


# SQLite's wait for its write lock, held by another connection (``DatabaseLockedError`` past it).
SQLITE_BUSY_TIMEOUT_MS = 30000
# A lock's wait in ``atomic_briefly()`` (SQLite's busy timeout, PostgreSQL's lock_timeout): long
# enough for another's ordinary write, short of a lock held for long (that one is refused).
BRIEF_LOCK_WAIT_MS = 1000


def _brief_waits() -> bool:
    """Whether this thread's transaction is one of ``atomic_briefly()``."""
    return bool(getattr(_held, "brief", False))


def _held_engines() -> set[int]:
    engines: set[int] | None = getattr(_held, "engines", None)
    if engines is None:
        engines = set()
        _held.engines = engines
    return engines


# Ids bound in one ``IN (...)``: under SQLite's oldest limit (999) on a statement's parameters.
_IN_CHUNK = 900

# SQLSTATEs of text PostgreSQL cannot hold in its encoding (a NUL sent as bytes among them).
_UNSTORABLE_TEXT_STATES = frozenset({"22021", "22P05"})


def _unstorable_text(exc: DataError) -> bool:
    """Whether the database refused a text for a character it cannot hold: the input's fault
    whoever sent it, and the same at every try. psycopg refuses a NUL itself, before the
    statement is sent (no SQLSTATE; its words are matched); the server says the others."""
    orig = exc.orig
    return ("(0x00)" in str(orig)
            or getattr(orig, "sqlstate", None) in _UNSTORABLE_TEXT_STATES)


def _refuse_erasing_owner(s: Session, user_id: str) -> None:
    """``AccountErasingError`` when the user whose row is about to be written is being deleted
    (or gone). The user's row is share-locked until the write commits: the deletion's step 2
    (which marks it) waits for the write, whose row its step 3 then reads; a write after the
    mark finds it here. Unchecked, an upload still running as its account was deleted stored
    its photo set after the deletion took the account's rows, and the removal of the user's
    row failed on that set's foreign key (the deletion parked for a day). The deletion itself
    holds no lock on the user's row while it waits for another, so this share lock deadlocks
    with nothing (``delete_user_data``)."""
    erasing = s.execute(select(UserRow.erasure_requested_at).where(UserRow.id == user_id)
                        .with_for_update(read=True)).first()
    if erasing is None or erasing.erasure_requested_at is not None:
        raise AccountErasingError


class SqlRepository:
    """Each public call runs in its own transaction, unless the repository came from
    ``atomic()``, in which case all calls share one transaction committed at the end.

    Inside ``atomic()`` use the repository it gives, never the outer one: a second transaction
    from the same thread would wait for the first (on SQLite for the whole busy timeout), so such
    a call raises at once instead."""

    def __init__(self, engine: Engine, *, _session: Session | None = None) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._readers = (sessionmaker(engine.execution_options(**{READ_ONLY: True}),
                                      expire_on_commit=False) if _session is None else None)
        self._session = _session

    @property
    def engine(self) -> Engine:
        return self._engine

    @contextmanager
    def atomic(self) -> Iterator[SqlRepository]:
        if self._session is not None:
            yield self
            return
        held = _held_engines()
        key = id(self._engine)
        if key in held:
            raise RuntimeError("atomic() inside atomic(): use the repository the first one gave")
        held.add(key)
        try:
            with self._translate(), self._sessions.begin() as session:
                yield SqlRepository(self._engine, _session=session)
        finally:
            held.discard(key)

    @contextmanager
    def atomic_briefly(self) -> Iterator[SqlRepository]:
        """``atomic()``, its locks waited for ``BRIEF_LOCK_WAIT_MS`` at most, not the database's
        usual wait (SQLite's busy timeout, PostgreSQL's statement timeout): a lock held longer
        raises ``DatabaseLockedError`` then. Inside ``atomic()``: that transaction, as it is."""
        if self._session is not None:
            yield self
            return
        _held.brief = True
        try:
            with self.atomic() as tx:
                yield tx
        finally:
            _held.brief = False

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        if self._session is not None:
            with self._translate():
                yield self._session
                self._session.flush()
            return
        if id(self._engine) in _held_engines():
            raise RuntimeError("a repository call outside the atomic() transaction this thread "
                               "holds: use the repository atomic() gave")
        with self._translate(), self._sessions.begin() as session:
            yield session

    def _unsynchronized(self) -> dict[str, Any]:
        """Execution options for an UPDATE that is the first statement of its ``_tx``: outside
        ``atomic()`` the session is new and holds no rows, so the ORM's default
        ``synchronize_session`` ("evaluate": matching the statement's columns to the mapper's
        and compiling an evaluator for each value, ~1 ms of the ~2 ms of CPU a training's save
        took) has nothing to bring up to date. Inside ``atomic()`` the session may hold rows
        read earlier in the transaction (the ORM keeps those something still refers to: the
        reads here convert theirs and let go, but a row changed in place stays until it is
        flushed), so there the default keeps them in step, as before."""
        return {"synchronize_session": False} if self._session is None else {}

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """A session for a read of **one statement** (see ``make_engine``: on SQLite it takes no
        lock and begins no transaction, so the statement is its own snapshot); inside
        ``atomic()``, the atomic transaction. Nothing may be written through it, and reads of
        several statements that must agree with each other belong in ``atomic()``."""
        if self._session is not None:
            with self._translate():
                yield self._session
            return
        if id(self._engine) in _held_engines():
            raise RuntimeError("a repository call outside the atomic() transaction this thread "
                               "holds: use the repository atomic() gave")
        assert self._readers is not None
        with self._translate(), self._readers.begin() as session:
            yield session

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except IntegrityError as exc:
            msg = str(exc.orig).lower()
            # SQLite names the column (users.name, users.name_folded), PostgreSQL the index
            # (users_name_key, ux_users_name_folded): a name taken by a racing sign-up.
            if "users.name" in msg or "users_name" in msg:
                raise ConflictError("that user name is taken",
                                    code=ErrorCode.USER_EXISTS) from exc
            if "one_active" in msg or "trainings.model_id" in msg or "models.user_id" in msg or (
                "user_id" in msg and "models" in msg
            ):
                raise ConflictError(
                    "a training of this model is already queued or running",
                ) from exc
            # The API answers a conflict's message as it is (a 4xx's words are the client's):
            # the driver's text (a constraint's and a table's names, PostgreSQL's DETAIL with
            # the values of another row) is the operator's, in the log. At INFO: a race a
            # caller expects (a webhook delivered twice at once) meets it too.
            logger.info("conflicting write (answered %s): %s", ErrorCode.WRITE_CONFLICT.value,
                        exc.orig)
            raise ConflictError(WRITE_CONFLICT_MESSAGE, code=ErrorCode.WRITE_CONFLICT) from exc
        except DataError as exc:
            if _unstorable_text(exc):
                raise InvalidInputError(
                    "the text holds a character the database cannot store (such as NUL, 0x00)",
                    code=ErrorCode.UNSTORABLE_TEXT) from exc
            # Any other value the database refused (too long, out of range) is a bound this
            # code failed to check: a defect to see as one, not the client's fault.
            raise StorageError(f"database error: {exc.orig}") from exc
        except DBAPIError as exc:
            if is_full_error(exc.orig):
                # An outage the operator ends by freeing space, not a failing database: the
                # worker says it once and waits (``StorageFullError``), naming the disk. A quota
                # (PostgreSQL's words for it) said as one: its mend is to raise it, and the
                # heartbeat and the loops say so only for an error that says a quota.
                raise StorageFullError(f"database error: {self._full_disk(exc.orig)}: "
                                       f"{exc.orig}", quota=is_quota_error(exc.orig)) from exc
            if _unreachable(exc):
                raise DatabaseUnreachableError(f"database error: {exc.orig}",
                                               unanswered=_unanswered(exc)) from exc
            if _read_only(exc.orig):
                # A standby after a fail-over, a read-only file: every write refused until the
                # operator acts, said once by a worker's loops, not a traceback each round.
                raise DatabaseRefusedError(f"database error: {exc.orig}") from exc
            if _kept_waiting(exc.orig):
                # A lock held elsewhere past the database's wait, a statement past its timeout:
                # the database busy, as a pool taken is ("busy, send it again" to a client,
                # said once by a worker's loops), where it was any database error's 500 and a
                # traceback at every round.
                raise DatabaseLockedError(f"database error: {exc.orig}",
                                          lock=_lock_ran_out(exc.orig)) from exc
            # Whatever else the driver raised (a refused login, a statement refused): its own
            # words, not the statement and parameters sqlalchemy adds to them. A lost
            # connection or a fail-over is an outage (above).
            raise StorageError(f"database error: {exc.orig}") from exc
        except SQLAlchemyError as exc:
            # sqlalchemy's own (a pool that stayed exhausted past its timeout, a connection
            # invalidated under a session): callers see one error for a database that failed.
            reason = exc.args[0] if exc.args else type(exc).__name__
            # A pool exhausted lasts as long as the load that took its connections: a refusal,
            # said once by a worker's loops, and "busy, send it again" to a client.
            if isinstance(exc, PoolTimeoutError):
                raise DatabaseBusyError(f"database error: {reason}") from exc
            raise StorageError(f"database error: {reason}") from exc

    def _full_disk(self, orig: BaseException | None) -> str:
        """The disk a full-disk error ``orig`` of this database is about, as the operator finds
        it: a quota on it used up said as one (``is_quota_error``)."""
        url = self._engine.url
        if url.get_backend_name() == "sqlite" and url.database:
            return full_disk_words(url.database, orig)
        if is_quota_error(orig):
            return "a disk quota of the database server is used up"
        return "the database server's disk is full"

    # users ------------------------------------------------------------------------------
    def add_user(self, user: User) -> None:
        with self._tx() as s:
            # A user an older process wrote without the folded name (mid-upgrade, see
            # ``_named``) holds the name too: the unique index cannot see it.
            if s.scalars(select(UserRow.id).where(
                    UserRow.name_folded.is_(None),
                    func.lower(UserRow.name) == fold_name(user.name)).limit(1)).first():
                raise ConflictError("that user name is taken", code=ErrorCode.USER_EXISTS)
            # The legacy column must be unique and non-null (see UserRow).
            s.add(UserRow(id=user.id, name=user.name, name_folded=fold_name(user.name),
                          api_key_hash=f"unused:{user.id}", created_at=user.created_at))

    def get_user(self, user_id: str, *, for_update: bool = False) -> User | None:
        with self._tx() if for_update else self._read() as s:
            stmt = select(UserRow).where(UserRow.id == user_id)
            if for_update:
                stmt = stmt.with_for_update()
            row = s.scalars(stmt).first()
            return _user(row) if row else None

    def get_user_by_name(self, name: str) -> User | None:
        with self._read() as s:
            row = s.scalars(select(UserRow).where(_named(name))
                            .order_by(UserRow.created_at, UserRow.id).limit(1)).first()
            return _user(row) if row else None

    def get_user_by_key_hash(self, key_hash: str, *, at: datetime) -> User | None:
        with self._read() as s:
            row = s.scalars(
                select(UserRow).join(ApiKeyRow, ApiKeyRow.user_id == UserRow.id)
                .where(ApiKeyRow.key_hash == key_hash,
                       or_(ApiKeyRow.revoked_at.is_(None), ApiKeyRow.revoked_at > at))
            ).first()
            return _user(row) if row else None

    def list_users(self, *, at: datetime) -> Sequence[UserSummary]:
        with self._read() as s:
            working = (select(ApiKeyRow.user_id, func.count().label("n"))
                       .where(or_(ApiKeyRow.revoked_at.is_(None), ApiKeyRow.revoked_at > at))
                       .group_by(ApiKeyRow.user_id).subquery())
            rows = s.execute(select(UserRow, func.coalesce(working.c.n, 0))
                             .outerjoin(working, working.c.user_id == UserRow.id)
                             .order_by(UserRow.created_at, UserRow.id)).all()
            return [UserSummary(user=_user(row), keys=int(n),
                                has_password=row.password_hash is not None)
                    for row, n in rows]

    def set_user_disabled(self, user_id: str, *, at: datetime | None) -> None:
        with self._tx() as s:
            result = s.execute(update(UserRow).where(UserRow.id == user_id)
                               .values(disabled_at=at))
            if getattr(result, "rowcount", 1) == 0:
                raise StorageError(f"no user {user_id}")

    def request_erasure(self, user_id: str, *, at: datetime,
                        requested_before: datetime | None = None) -> bool:
        where = UserRow.id == user_id
        if requested_before is not None:
            # A compare-and-set in one statement: of two finishers, the second finds the time
            # moved on (PostgreSQL re-reads the row once the first commits) and changes nothing.
            where = where & (UserRow.erasure_requested_at <= requested_before)
        with self._tx() as s:
            result = s.execute(update(UserRow).where(where).values(erasure_requested_at=at))
            return bool(getattr(result, "rowcount", 0))

    def pending_erasures(self, *, requested_before: datetime | None = None) -> Sequence[User]:
        where = (UserRow.erasure_requested_at.is_not(None) if requested_before is None
                 else UserRow.erasure_requested_at <= requested_before)
        with self._read() as s:
            rows = s.scalars(select(UserRow).where(where)
                             .order_by(UserRow.erasure_requested_at, UserRow.id)).all()
            return [_user(row) for row in rows]

    def user_holdings(self, user_id: str) -> UserHoldings:
        with self._tx() as s:
            model_id = s.scalar(select(ModelRow.id).where(ModelRow.user_id == user_id))
            datasets = s.execute(select(DatasetRow.id, DatasetRow.photo_hashes)
                                 .where(DatasetRow.user_id == user_id)).all()
            trainings = s.execute(select(TrainingRow.id, TrainingRow.status)
                                  .where(TrainingRow.model_id == model_id)).all()
            versions = s.execute(select(VersionRow.id, VersionRow.weights_key)
                                 .where(VersionRow.model_id == model_id)).all()
            generations = s.execute(select(GenerationRow.id, GenerationRow.image_keys)
                                    .where(GenerationRow.user_id == user_id)).all()
        return UserHoldings(
            model_id=model_id, dataset_ids=tuple(d.id for d in datasets),
            photo_hashes=tuple(sorted({h for d in datasets for h in d.photo_hashes})),
            training_ids=tuple(t.id for t in trainings),
            active_training_ids=tuple(t.id for t in trainings
                                      if not TrainingStatus(t.status).is_terminal),
            version_ids=tuple(v.id for v in versions),
            weights_keys=tuple(sorted({v.weights_key for v in versions})),
            generation_ids=tuple(g.id for g in generations),
            image_keys=tuple(k for g in generations for k in g.image_keys))

    def delete_user_data(self, user_id: str, *, plan: ErasurePlan,
                         held: UserHoldings) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._tx() as s:
            # The model's row locked first (PostgreSQL; on SQLite the write lock taken at BEGIN
            # already orders every writer): a row still being written that names the model (a
            # generation finishing as the account goes) holds a key-share lock on it until it
            # commits, so the deletes below begin once it has and see it, and one written later
            # waits for this transaction and then finds the model gone. Without it, the READ
            # COMMITTED statements missed such a generation and the versions' delete failed on
            # it (a write conflict that parked the deletion). Only this one lock: a generation's
            # insert checks its model before its user, and an upload's start its user (the new
            # photo set) before it locks the model, so a second lock, in either order, could
            # deadlock with one of them.
            model_id = s.scalar(select(ModelRow.id).where(ModelRow.user_id == user_id)
                                .with_for_update())
            # What each delete took (RETURNING), compared with what the plan was made from
            # (``held``): a generation or photo set saved since it was read would lose its row
            # here and keep its pictures in storage, named by nothing, until a collection's
            # grace ran out. Such a deletion is rolled back and the caller plans again.
            taken: dict[str, list[Any]] = {}

            def gone(name: str, query: Any) -> None:
                taken[name] = list(s.execute(query).all())
                counts[name] = len(taken[name])

            # Children before parents, so the foreign keys never refuse (PostgreSQL checks
            # them per statement). Another user's generations never name this user's versions.
            gone("generations", delete(GenerationRow).where(
                (GenerationRow.user_id == user_id) | (GenerationRow.model_id == model_id))
                .returning(GenerationRow.id, GenerationRow.image_keys))
            if model_id is not None:
                s.execute(update(ModelRow).where(ModelRow.id == model_id)
                          .values(active_version_id=None))
                gone("likeness records", delete(VersionLikenessRow)
                     .where(VersionLikenessRow.model_id == model_id)
                     .returning(VersionLikenessRow.version_id))
                gone("versions", delete(VersionRow).where(VersionRow.model_id == model_id)
                     .returning(VersionRow.id, VersionRow.weights_key))
                gone("trainings", delete(TrainingRow).where(TrainingRow.model_id == model_id)
                     .returning(TrainingRow.id))
                gone("events", delete(EventRow).where(EventRow.model_id == model_id)
                     .returning(EventRow.id))
                gone("models", delete(ModelRow).where(ModelRow.id == model_id)
                     .returning(ModelRow.id))
            gone("datasets", delete(DatasetRow).where(DatasetRow.user_id == user_id)
                 .returning(DatasetRow.id, DatasetRow.photo_hashes))
            deleted = UserHoldings(
                model_id=model_id,
                dataset_ids=tuple(r.id for r in taken["datasets"]),
                photo_hashes=tuple(h for r in taken["datasets"] for h in r.photo_hashes),
                training_ids=tuple(r.id for r in taken.get("trainings", ())),
                version_ids=tuple(r.id for r in taken.get("versions", ())),
                weights_keys=tuple(r.weights_key for r in taken.get("versions", ())),
                generation_ids=tuple(r.id for r in taken["generations"]),
                image_keys=tuple(k for r in taken["generations"] for k in r.image_keys))
            if not held.covers(deleted):
                raise HoldingsChangedError(
                    "the account's rows changed while it was being deleted (a generation or "
                    "photos saved meanwhile): nothing was deleted; plan again")
            gone("upload claims", delete(UploadClaimRow).where(UploadClaimRow.user_id == user_id)
                 .returning(UploadClaimRow.user_id))
            gone("api keys", delete(ApiKeyRow).where(ApiKeyRow.user_id == user_id)
                 .returning(ApiKeyRow.id))
            gone("browser sessions", delete(WebSessionRow)
                 .where(WebSessionRow.user_id == user_id).returning(WebSessionRow.id))
            # In the same transaction: once the rows are gone, nothing else names the blobs.
            s.execute(update(UserRow).where(UserRow.id == user_id).values(
                erasure_plan=plan.as_json()))
        return {name: n for name, n in counts.items() if n}

    def erasure_plan(self, user_id: str) -> ErasurePlan | None:
        with self._read() as s:
            stored = s.scalar(select(UserRow.erasure_plan).where(UserRow.id == user_id))
        return None if stored is None else ErasurePlan.from_json(stored)

    def delete_user(self, user_id: str) -> bool:
        with self._tx() as s:
            return bool(getattr(s.execute(delete(UserRow).where(UserRow.id == user_id)),
                                "rowcount", 0))

    # api keys ---------------------------------------------------------------------------
    def add_api_key(self, key: ApiKey) -> None:
        with self._tx() as s:
            s.add(ApiKeyRow(id=key.id, user_id=key.user_id, name=key.name,
                            key_hash=key.key_hash, prefix=key.prefix,
                            created_at=key.created_at, revoked_at=key.revoked_at,
                            replaced_by=key.replaced_by,
                            form_nonce_hash=key.form_nonce_hash))

    def get_api_key(self, key_id: str, *, for_update: bool = False) -> ApiKey | None:
        with self._tx() if for_update else self._read() as s:
            stmt = select(ApiKeyRow).where(ApiKeyRow.id == key_id)
            if for_update:
                stmt = stmt.with_for_update()
            row = s.scalars(stmt).first()
            return _api_key(row) if row else None

    def list_api_keys(self, user_id: str) -> Sequence[ApiKey]:
        with self._read() as s:
            rows = s.scalars(select(ApiKeyRow).where(ApiKeyRow.user_id == user_id)
                             .order_by(ApiKeyRow.created_at)).all()
            return [_api_key(r) for r in rows]

    def revoke_api_key(self, key_id: str, *, at: datetime) -> None:
        with self._tx() as s:
            # A key in its rotation's grace stops at ``at`` too; one that stopped before stays.
            s.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id,
                                              or_(ApiKeyRow.revoked_at.is_(None),
                                                  ApiKeyRow.revoked_at > at))
                      .values(revoked_at=at))

    def replace_api_key(self, key_id: str, *, by: str, stops_at: datetime) -> None:
        with self._tx() as s:
            s.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id)
                      .values(replaced_by=by, revoked_at=stops_at))

    # passwords, sessions, sign-in failures ------------------------------------------------
    def set_user_password(self, user_id: str, password_hash: str | None) -> None:
        with self._tx() as s:
            result = s.execute(update(UserRow).where(UserRow.id == user_id)
                               .values(password_hash=password_hash))
            if getattr(result, "rowcount", 1) == 0:
                raise StorageError(f"no user {user_id}")

    def get_password_hash(self, user_id: str) -> str | None:
        with self._read() as s:
            return s.scalars(select(UserRow.password_hash).where(UserRow.id == user_id)).first()

    def add_session(self, session: WebSession) -> None:
        with self._tx() as s:
            s.add(WebSessionRow(id=session.id, user_id=session.user_id,
                                csrf_token=session.csrf_token, created_at=session.created_at,
                                expires_at=session.expires_at))

    def get_session(self, session_id: str) -> WebSession | None:
        with self._read() as s:
            row = s.get(WebSessionRow, session_id)
            if row is None:
                return None
            return WebSession(id=row.id, user_id=row.user_id, csrf_token=row.csrf_token,
                              created_at=_req_utc(row.created_at),
                              expires_at=_req_utc(row.expires_at))

    def delete_session(self, session_id: str) -> None:
        with self._tx() as s:
            s.execute(delete(WebSessionRow).where(WebSessionRow.id == session_id))

    def delete_sessions(self, *, user_id: str | None = None,
                        expired_before: datetime | None = None) -> int:
        if user_id is None and expired_before is None:
            raise ValueError("name the user or the expiry: never every session at once")
        query = delete(WebSessionRow)
        if user_id is not None:
            query = query.where(WebSessionRow.user_id == user_id)
        if expired_before is not None:
            query = query.where(WebSessionRow.expires_at <= expired_before)
        with self._tx() as s:
            return int(getattr(s.execute(query), "rowcount", 0) or 0)

    def lock_sign_in_keys(self, keys: Sequence[str]) -> None:
        with self._tx() as s:
            if self._engine.dialect.name != "postgresql":
                # SQLite: beginning the transaction takes the database's write lock (BEGIN
                # IMMEDIATE, see make_engine), which already shuts out every other writer.
                s.connection()
                return
            # One lock per key, taken in a fixed order so two attempts that share a name and a
            # client address cannot each hold one and wait for the other.
            for lock_id in sorted({_sign_in_lock_id(key[:200]) for key in keys}):
                s.execute(text("SELECT pg_advisory_xact_lock(:space, :id)"),
                          {"space": SIGN_IN_LOCK_SPACE, "id": lock_id})

    def add_sign_in_failure(self, keys: Sequence[str], *, at: datetime) -> Sequence[int]:
        with self._tx() as s:
            rows = [SignInFailureRow(key=key[:200], at=at) for key in keys]
            s.add_all(rows)
            s.flush()
            return [row.id for row in rows]

    def delete_sign_in_failures(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        with self._tx() as s:
            result = s.execute(delete(SignInFailureRow).where(SignInFailureRow.id.in_(list(ids))))
            return int(getattr(result, "rowcount", 0) or 0)

    def sign_in_failures(self, key: str, *, since: datetime) -> Sequence[datetime]:
        with self._read() as s:
            rows = s.scalars(select(SignInFailureRow.at).where(
                SignInFailureRow.key == key[:200], SignInFailureRow.at > since)).all()
            return [_req_utc(t) for t in rows]

    def prune_sign_in_failures(self, *, before: datetime) -> int:
        with self._tx() as s:
            result = s.execute(delete(SignInFailureRow).where(SignInFailureRow.at <= before))
            return int(getattr(result, "rowcount", 0) or 0)

    # models -----------------------------------------------------------------------------
    def add_model(self, model: Model) -> None:
        with self._tx() as s:
            _refuse_erasing_owner(s, model.user_id)
            s.add(ModelRow(**_model_values(model)))

    def _update_model(self, model_id: str, values: dict[str, Any]) -> None:
        with self._tx() as s:
            result = s.execute(update(ModelRow).where(ModelRow.id == model_id).values(**values),
                               execution_options=self._unsynchronized())
            if getattr(result, "rowcount", 1) == 0:
                raise StorageError(f"model {model_id} does not exist")

    def set_model_active_version(self, model_id: str, version_id: str | None) -> None:
        self._update_model(model_id, {"active_version_id": version_id})

    def set_model_lora_scale(self, model_id: str, scale: float, *, is_custom: bool) -> None:
        self._update_model(model_id, {"lora_scale": scale, "lora_scale_is_custom": is_custom})

    def set_model_pin(self, model_id: str, *, backend: str, trainer_version: str,
                      destination: str) -> None:
        self._update_model(model_id, {"backend": backend, "trainer_version": trainer_version,
                                      "destination": destination})

    def set_model_probes(self, model_id: str, probes: Sequence[Probe]) -> None:
        with self._tx() as s:
            row = s.scalars(select(ModelRow).where(ModelRow.id == model_id).with_for_update()).first()
            if row is None:
                raise StorageError(f"model {model_id} does not exist")
            if not row.probes:  # fixed once: a model's probe set never changes
                row.probes = [p.as_dict() for p in probes]

    def get_model(self, model_id: str, *, for_update: bool = False) -> Model | None:
        if not for_update:
            with self._read() as s:
                row = s.get(ModelRow, model_id)
                return _model(row) if row else None
        with self._tx() as s:
            row = s.scalars(select(ModelRow).where(ModelRow.id == model_id)
                            .with_for_update()).first()
            return _model(row) if row else None

    def get_model_for_user(self, user_id: str, *, for_update: bool = False) -> Model | None:
        with self._tx() if for_update else self._read() as s:
            stmt = select(ModelRow).where(ModelRow.user_id == user_id)
            if for_update:
                stmt = stmt.with_for_update()
            row = s.scalars(stmt).first()
            return _model(row) if row else None

    def list_model_owners(self, *, limit: int) -> Sequence[str]:
        with self._read() as s:
            return list(s.scalars(select(ModelRow.user_id)
                                  .order_by(ModelRow.created_at, ModelRow.id).limit(limit)))

    def get_model_overview(self, user_id: str
                           ) -> tuple[Model, Version | None, VersionLikeness | None] | None:
        # One query for the hottest read of the API (GET /api/model, the progress polls): the
        # model, its active version and that version's likeness record.
        with self._read() as s:
            found = s.execute(_MODEL_OVERVIEW, {"user_id": user_id}).first()
            if found is None:
                return None
            model, version, record = found
            return (_model(model), _version(version) if version else None,
                    _likeness(record) if record else None)

    # datasets ---------------------------------------------------------------------------
    def add_dataset(self, dataset: Dataset) -> None:
        with self._tx() as s:
            _refuse_erasing_owner(s, dataset.user_id)
            s.add(DatasetRow(
                id=dataset.id, user_id=dataset.user_id, images_total=dataset.images_total,
                images_accepted=dataset.images_accepted, photo_hashes=list(dataset.photo_hashes),
                findings=[f.as_dict() for f in dataset.findings], accepted=dataset.accepted,
                sha256=dataset.sha256, created_at=dataset.created_at, verdict=dataset.verdict,
                face_boxes=[list(b) if b is not None else None for b in dataset.face_boxes]
                if dataset.face_boxes else None,
            ))

    def get_dataset(self, dataset_id: str) -> Dataset | None:
        with self._read() as s:
            row = s.get(DatasetRow, dataset_id)
            return _dataset(row) if row else None

    def dataset_sizes(self, dataset_ids: Collection[str]) -> dict[str, int]:
        ids = sorted(set(dataset_ids))
        sizes: dict[str, int] = {}
        with self._read() as s:
            # Only the count, not the rows' JSON columns (hashes, findings, face boxes); in
            # chunks below any database's limit on bound parameters.
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start:start + _IN_CHUNK]
                for dataset_id, accepted in s.execute(
                        select(DatasetRow.id, DatasetRow.images_accepted)
                        .where(DatasetRow.id.in_(chunk))):
                    sizes[dataset_id] = accepted
        return sizes

    def latest_accepted_dataset(self, user_id: str) -> Dataset | None:
        with self._read() as s:
            row = s.scalars(
                select(DatasetRow)
                .where(DatasetRow.user_id == user_id, DatasetRow.accepted.is_(True))
                .order_by(DatasetRow.created_at.desc())
            ).first()
            return _dataset(row) if row else None

    # trainings --------------------------------------------------------------------------
    def add_training(self, training: Training) -> None:
        with self._tx() as s:
            s.add(TrainingRow(**_training_values(training)))

    def save_training(self, training: Training) -> None:
        values = _training_values(training)
        values.pop("cancel_requested")
        with self._tx() as s:
            result = s.execute(
                update(TrainingRow).where(TrainingRow.id == training.id).values(**values),
                execution_options=self._unsynchronized(),
            )
            if getattr(result, "rowcount", 1) == 0:
                raise StorageError(f"training {training.id} does not exist")

    def request_cancel(self, training_id: str) -> None:
        with self._tx() as s:
            s.execute(
                update(TrainingRow).where(TrainingRow.id == training_id)
                .values(cancel_requested=True)
            )

    def get_training(self, training_id: str, *, for_update: bool = False) -> Training | None:
        with self._tx() if for_update else self._read() as s:
            stmt = select(TrainingRow).where(TrainingRow.id == training_id)
            if for_update:
                stmt = stmt.with_for_update()
            row = s.scalars(stmt).first()
            return _training(row) if row else None

    def renew_lease(self, training_id: str, *, owner: str, attempt: int, now: datetime,
                    expires_at: datetime) -> bool:
        # One targeted UPDATE, no read: a heartbeat every few seconds from every running
        # training must stay cheap. False when the lease is no longer this holder's.
        with self._tx() as s:
            result = s.execute(
                update(TrainingRow)
                .where(TrainingRow.id == training_id, TrainingRow.lease_owner == owner,
                       TrainingRow.attempt == attempt,
                       TrainingRow.status.in_([str(x) for x in ACTIVE_STATUSES]))
                .values(lease_expires_at=expires_at, heartbeat_at=now)
            )
            return bool(getattr(result, "rowcount", 0))

    def get_training_by_remote_id(self, remote_id: str) -> Training | None:
        with self._read() as s:
            row = s.scalars(select(TrainingRow).where(TrainingRow.remote_id == remote_id)).first()
            return _training(row) if row else None

    def list_trainings(self, model_id: str) -> Sequence[Training]:
        with self._read() as s:
            rows = s.scalars(
                select(TrainingRow).where(TrainingRow.model_id == model_id)
                .order_by(TrainingRow.created_at.desc())
            ).all()
            return [_training(r) for r in rows]

    def list_trainings_page(self, model_id: str, *, limit: int,
                            before: Training | None = None) -> Sequence[Training]:
        row = TrainingRow
        query = select(row).where(row.model_id == model_id)
        if before is not None:
            query = query.where(or_(row.created_at < before.created_at,
                                    and_(row.created_at == before.created_at,
                                         row.id < before.id)))
        with self._read() as s:
            return [_training(r) for r in s.scalars(
                query.order_by(row.created_at.desc(), row.id.desc()).limit(limit)).all()]

    def get_user_training(self, user_id: str, training_id: str | None
                          ) -> tuple[Training, Version | None] | None:
        # One query for the progress poll, which every waiting client sends every second or two:
        # the training found through the user's model (another user's id finds nothing) and its
        # version, instead of the model, the training (or all of them) and the version apart.
        stmt = (select(TrainingRow, VersionRow)
                .join(ModelRow, ModelRow.id == TrainingRow.model_id)
                .outerjoin(VersionRow, VersionRow.id == TrainingRow.version_id)
                .where(ModelRow.user_id == user_id))
        if training_id is None:
            stmt = stmt.order_by(TrainingRow.created_at.desc()).limit(1)
        else:
            stmt = stmt.where(TrainingRow.id == training_id)
        with self._read() as s:
            found = s.execute(stmt).first()
            if found is None:
                return None
            row, version = found
            return _training(row), _version(version) if version else None

    def active_trainings(self) -> Sequence[Training]:
        with self._read() as s:
            rows = s.scalars(
                select(TrainingRow).where(TrainingRow.status.in_([str(x) for x in ACTIVE_STATUSES]))
                .order_by(TrainingRow.created_at)
            ).all()
            return [_training(r) for r in rows]

    def undecided_versions_of_ended_trainings(
            self, *, limit: int) -> Sequence[tuple[Version, Training]]:
        with self._read() as s:
            rows = s.execute(
                select(VersionRow, TrainingRow)
                .join(TrainingRow, TrainingRow.id == VersionRow.training_id)
                .where(VersionRow.gate_status == str(GateStatus.PENDING),
                       TrainingRow.status.not_in([str(x) for x in ACTIVE_STATUSES]))
                .order_by(VersionRow.created_at, VersionRow.id).limit(limit)).all()
            return [(_version(v), _training(t)) for v, t in rows]

    def remote_cancels_pending(self) -> Sequence[Training]:
        with self._read() as s:
            rows = s.scalars(select(TrainingRow).where(TrainingRow.remote_cancel_pending)
                             .order_by(TrainingRow.completed_at)).all()
            return [_training(r) for r in rows]

    def clear_remote_cancel(self, training_id: str) -> None:
        with self._tx() as s:
            s.execute(update(TrainingRow).where(TrainingRow.id == training_id)
                      .values(remote_cancel_pending=False))

    def count_trainings_by_status(self) -> dict[str, int]:
        with self._read() as s:
            rows = s.execute(select(TrainingRow.status, func.count())
                             .group_by(TrainingRow.status)).all()
            return {str(status): int(count) for status, count in rows}

    def takes_writes(self) -> bool:
        return self.takes_writes_at()[0]

    def takes_writes_at(self) -> tuple[bool, datetime]:
        # One statement on one connection: /readyz's whole database check, where a read and then
        # SHOW took two pool checkouts a probe (each with its ping on PostgreSQL), and the
        # clock's read (server_clock's) a third.
        read = select(TrainingRow.id).limit(1).scalar_subquery()
        with self._read() as s:
            if self._engine.dialect.name != "postgresql":
                # SQLite's clock is this machine's, read by no clock check (server_clock gives
                # SQLite none): the port's answer given whole, for a strftime.
                at = s.execute(select(func.strftime("%Y-%m-%d %H:%M:%f", "now"), read)).one()[0]
                return True, datetime.fromisoformat(at).replace(tzinfo=UTC)
            read_only, at, _ = s.execute(select(func.current_setting("transaction_read_only"),
                                                func.clock_timestamp(), read)).one()
            return bool(read_only != "on"), _req_utc(at)

    def held_trainings(self, *, now: datetime) -> Sequence[Training]:
        with self._read() as s:
            rows = s.scalars(
                select(TrainingRow).where(
                    TrainingRow.status.in_([str(x) for x in ACTIVE_STATUSES]),
                    TrainingRow.lease_expires_at > now, TrainingRow.heartbeat_at.is_(None))
            ).all()
            return [_training(r) for r in rows]

    # upload claims ----------------------------------------------------------------------
    def claim_upload(self, user_id: str, *, token: str, now: datetime,
                     expires_at: datetime) -> datetime | None:
        with self._tx() as s:
            _refuse_erasing_owner(s, user_id)
            row = s.scalars(select(UploadClaimRow).where(UploadClaimRow.user_id == user_id)
                            .with_for_update()).first()
            if row is not None and row.token != token and _req_utc(row.expires_at) > now:
                return _req_utc(row.expires_at)
            if row is None:
                s.add(UploadClaimRow(user_id=user_id, token=token, expires_at=expires_at))
            else:
                row.token, row.expires_at = token, expires_at
            return None

    def upload_claim_expiry(self, user_id: str, *, now: datetime,
                            except_token: str | None) -> datetime | None:
        with self._read() as s:
            row = s.get(UploadClaimRow, user_id)
            if row is None or row.token == except_token:
                return None
            expires_at = _req_utc(row.expires_at)
            return expires_at if expires_at > now else None

    def renew_upload_claim(self, user_id: str, *, token: str, expires_at: datetime) -> bool:
        with self._tx() as s:
            result = s.execute(update(UploadClaimRow).where(UploadClaimRow.user_id == user_id,
                                                            UploadClaimRow.token == token)
                               .values(expires_at=expires_at))
            return bool(getattr(result, "rowcount", 0))

    def release_upload(self, user_id: str, *, token: str) -> None:
        with self._tx() as s:
            s.execute(delete(UploadClaimRow).where(UploadClaimRow.user_id == user_id,
                                                   UploadClaimRow.token == token))

    # webhooks ---------------------------------------------------------------------------
    def record_webhook(self, webhook_id: str, *, now: datetime) -> bool:
        """False when ``webhook_id`` was received before (a replay)."""
        with self._tx() as s:
            if s.get(WebhookDeliveryRow, webhook_id) is not None:
                return False
            s.add(WebhookDeliveryRow(id=webhook_id, received_at=now))
            return True

    def forget_webhooks(self, *, received_before: datetime) -> int:
        with self._tx() as s:
            result = s.execute(delete(WebhookDeliveryRow).where(
                WebhookDeliveryRow.received_at < received_before))
            return int(getattr(result, "rowcount", 0) or 0)

    # versions ---------------------------------------------------------------------------
    def add_version(self, version: Version) -> None:
        with self._tx() as s:
            s.add(VersionRow(
                id=version.id, model_id=version.model_id, number=version.number,
                training_id=version.training_id, trainer_version=version.trainer_version,
                weights_key=version.weights_key, weights_sha256=version.weights_sha256,
                weights_method=version.weights_method, remote_version=version.remote_version,
                version_mismatch=version.version_mismatch, created_at=version.created_at,
                gate_status=str(version.gate_status), gate_reason=version.gate_reason,
                gate_details=version.gate_details, alert=version.alert,
            ))

    def set_version_gate(self, version_id: str, *, status: GateStatus, reason: str | None,
                         details: dict[str, Any]) -> None:
        self._update_version(version_id, {"gate_status": str(status), "gate_reason": reason,
                                          "gate_details": details})

    def set_version_override(self, version_id: str, override: dict[str, Any]) -> None:
        # Read and written under the row's lock: a gate decision committed meanwhile is kept.
        with self._tx() as s:
            row = s.scalars(select(VersionRow).where(VersionRow.id == version_id)
                            .with_for_update()).first()
            if row is None:
                raise StorageError(f"version {version_id} does not exist")
            row.gate_details = {**(row.gate_details or {}), "override": override}

    def set_version_alert(self, version_id: str, alert: dict[str, Any] | None, *,
                          due_at: datetime | None = None) -> None:
        self._update_version(version_id, {"alert": alert, "alert_due_at": due_at})

    def due_alerts(self, now: datetime, *, limit: int) -> Sequence[str]:
        with self._read() as s:
            return list(s.scalars(
                select(VersionRow.id).where(VersionRow.alert_due_at <= now)
                .order_by(VersionRow.alert_due_at).limit(limit)))

    def claim_alert(self, version_id: str, *, now: datetime, until: datetime) -> Version | None:
        # Compare-and-set on the due time: of two processes that found the alert due, the
        # second's condition fails on the row the first updated (PostgreSQL re-checks it after
        # the first commits; SQLite runs one writer at a time).
        with self._tx() as s:
            result = s.execute(update(VersionRow).where(
                VersionRow.id == version_id, VersionRow.alert_due_at <= now,
            ).values(alert_due_at=until))
            if not getattr(result, "rowcount", 0):
                return None
            row = s.get(VersionRow, version_id)
            return _version(row) if row else None

    def record_alert_delivery(self, version_id: str, alert: dict[str, Any], *, claim: datetime,
                              due_at: datetime | None) -> bool:
        # Compare-and-set on the claim, in one statement: a later claim (a greater due time) or a
        # recorded outcome (NULL, or a retry's time) means another sender took the alert over, and
        # its record must stand. Due times are all written as UTC, so equality is exact on both
        # databases.
        with self._tx() as s:
            result = s.execute(update(VersionRow).where(
                VersionRow.id == version_id, VersionRow.alert_due_at == claim,
            ).values(alert=alert, alert_due_at=due_at))
            return bool(getattr(result, "rowcount", 0))

    def _update_version(self, version_id: str, values: dict[str, Any]) -> None:
        with self._tx() as s:
            result = s.execute(update(VersionRow).where(VersionRow.id == version_id).values(**values),
                               execution_options=self._unsynchronized())
            if getattr(result, "rowcount", 1) == 0:
                raise StorageError(f"version {version_id} does not exist")

    def get_version(self, version_id: str) -> Version | None:
        with self._read() as s:
            row = s.get(VersionRow, version_id)
            return _version(row) if row else None

    def list_versions(self, model_id: str, *, limit: int | None = None,
                      below: int | None = None) -> Sequence[Version]:
        query = select(VersionRow).where(VersionRow.model_id == model_id)
        if below is not None:
            query = query.where(VersionRow.number < below)
        with self._read() as s:
            rows = s.scalars(query.order_by(VersionRow.number.desc()).limit(limit)).all()
            return [_version(r) for r in rows]

    def versions_by_ids(self, model_id: str, version_ids: Collection[str]) -> Sequence[Version]:
        if not version_ids:
            return []
        query = select(VersionRow).where(VersionRow.model_id == model_id,
                                         VersionRow.id.in_(sorted(set(version_ids))))
        with self._read() as s:
            return [_version(r) for r in s.scalars(query).all()]

    # quality ----------------------------------------------------------------------------
    def save_likeness(self, quality: VersionLikeness) -> None:
        values = _likeness_values(quality)
        # One statement, an upsert: UPDATE-then-INSERT let two scorers of one version (the
        # worker and ``selfie-lora compare``) both find no row and both INSERT, and on
        # PostgreSQL the second failed on the primary key.
        insert = pg_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        stmt = insert(VersionLikenessRow).values(**values)
        with self._tx() as s:
            s.execute(stmt.on_conflict_do_update(
                index_elements=[VersionLikenessRow.version_id],
                set_={k: v for k, v in values.items() if k != "version_id"}))

    def get_likeness(self, version_id: str) -> VersionLikeness | None:
        with self._read() as s:
            row = s.get(VersionLikenessRow, version_id)
            return _likeness(row) if row else None

    def list_likeness(self, model_id: str, *, version_ids: Collection[str] | None = None
                      ) -> Sequence[VersionLikeness]:
        query = select(VersionLikenessRow).where(VersionLikenessRow.model_id == model_id)
        if version_ids is not None:
            if not version_ids:
                return []
            query = query.where(VersionLikenessRow.version_id.in_(sorted(version_ids)))
        with self._read() as s:
            return [_likeness(r) for r in s.scalars(query).all()]

    def list_likeness_summaries(self, model_id: str, *,
                                version_ids: Collection[str] | None = None
                                ) -> Sequence[LikenessSummary]:
        row = VersionLikenessRow
        # Each probe's [index, scale, key], taken out of the probes' JSON in the database (one
        # parse of it a row): their embeddings, ~3 KB a probe, never come to Python.
        marks = type_coerce(literal_column(
            _PROBE_MARKS_PG if self._engine.dialect.name == "postgresql" else _PROBE_MARKS_SQLITE),
            JSON)
        query = select(row.version_id, row.model_id, row.status, row.created_at,
                       row.embedding_model, row.reference_dataset_id, row.scores, row.training,
                       row.error, row.scored_at, marks).where(row.model_id == model_id)
        if version_ids is not None:
            if not version_ids:
                return []
            query = query.where(row.version_id.in_(sorted(version_ids)))
        with self._read() as s:
            found = s.execute(query).all()
        return [LikenessSummary(
            version_id=r[0], model_id=r[1], status=LikenessStatus(r[2]),
            created_at=_req_utc(r[3]), embedding_model=r[4], reference_dataset_id=r[5],
            scores=IdentityScores.from_dict(r[6]) if r[6] else None, training=dict(r[7]),
            error=r[8], scored_at=_utc(r[9]),
            probe_marks=tuple(ProbeMark(index=int(index), lora_scale=_opt_float(scale),
                                        image_key=key) for index, scale, key in r[10] or ()))
            for r in found]

    # generations ------------------------------------------------------------------------
    def add_generation(self, generation: Generation) -> None:
        with self._tx() as s:
            s.add(GenerationRow(
                id=generation.id, user_id=generation.user_id, model_id=generation.model_id,
                version_id=generation.version_id, prompt=generation.prompt,
                lora_scale=generation.lora_scale, seed=generation.seed,
                image_keys=list(generation.image_keys), created_at=generation.created_at,
                withheld=list(generation.withheld),
            ))

    def get_generation(self, generation_id: str) -> Generation | None:
        with self._read() as s:
            row = s.get(GenerationRow, generation_id)
            return _generation(row) if row else None

    def list_generations(self, user_id: str, *, limit: int = 50,
                         before: GenerationPosition | None = None) -> Sequence[Generation]:
        with self._read() as s:
            query = select(GenerationRow).where(GenerationRow.user_id == user_id)
            if before is not None:
                # (created_at, id) below the cursor's: two generations of the same instant
                # are neither skipped nor shown twice across pages.
                query = query.where(or_(
                    GenerationRow.created_at < before.created_at,
                    and_(GenerationRow.created_at == before.created_at,
                         GenerationRow.id < before.id)))
            rows = s.scalars(query.order_by(GenerationRow.created_at.desc(),
                                            GenerationRow.id.desc()).limit(limit)).all()
            return [_generation(r) for r in rows]

    # events -----------------------------------------------------------------------------
    def add_event(self, *, model_id: str, kind: str, data: dict[str, Any]) -> None:
        with self._tx() as s:
            s.add(EventRow(model_id=model_id, kind=kind, data=data, created_at=datetime.now(UTC)))

    def list_events(self, model_id: str, *, since: datetime | None = None,
                    until: datetime | None = None) -> Sequence[dict[str, Any]]:
        query = select(EventRow).where(EventRow.model_id == model_id)
        if since is not None:
            query = query.where(EventRow.created_at >= since)
        if until is not None:
            query = query.where(EventRow.created_at < until)
        with self._read() as s:
            rows = s.scalars(query.order_by(EventRow.id)).all()
            return [
                {"kind": r.kind, "data": r.data, "created_at": _req_utc(r.created_at).isoformat()}
                for r in rows
            ]

    def count_events(self, model_id: str, *, kind: str) -> int:
        with self._read() as s:
            return int(s.scalar(select(func.count()).select_from(EventRow).where(
                EventRow.model_id == model_id, EventRow.kind == kind)) or 0)

    def resumed_as(self, model_id: str, training_id: str) -> str | None:
        with self._read() as s:
            data = s.scalars(select(EventRow.data).where(
                EventRow.model_id == model_id, _resumes(training_id)
            ).order_by(EventRow.id).limit(1)).first()
            return str(data["training_id"]) if data is not None else None

    # garbage collection -------------------------------------------------------------------
    def gc_references(self) -> References:
        used = (exists().where(TrainingRow.dataset_id == DatasetRow.id)
                | exists().where(VersionLikenessRow.reference_dataset_id == DatasetRow.id))
        with self._tx() as s:
            datasets = tuple(
                DatasetRef(id=r.id, created_at=_req_utc(r.created_at),
                           photo_hashes=tuple(r.photo_hashes), trained=bool(r.trained))
                for r in s.execute(select(DatasetRow.id, DatasetRow.created_at,
                                          DatasetRow.photo_hashes, used.label("trained"))))
            generations = tuple(
                GenerationRef(id=r.id, created_at=_req_utc(r.created_at),
                              image_keys=tuple(r.image_keys))
                for r in s.execute(select(GenerationRow.id, GenerationRow.created_at,
                                          GenerationRow.image_keys)))
            # Resumable as ``TrainingService.resume`` decides: canceled before its version was
            # stored, and its model still trains as it did (the checkpoint fits only that run).
            # One that can no longer be resumed would otherwise keep its checkpoints for ever.
            # Not resumed already: a resume killed after it committed its new training, and
            # before it deleted these checkpoints, left them to this collection.
            same_run = ((ModelRow.trainer_version == TrainingRow.trainer_version)
                        & (ModelRow.trigger_word == TrainingRow.trigger_word)
                        & (ModelRow.backend == TrainingRow.backend)
                        & ~exists().where(EventRow.model_id == TrainingRow.model_id,
                                          _resumes(TrainingRow.id)))
            trainings = tuple(
                TrainingRef(id=r.id, created_at=_req_utc(r.created_at),
                            ended=TrainingStatus(r.status).is_terminal,
                            resumable=(TrainingStatus(r.status) is TrainingStatus.CANCELED
                                       and r.version_id is None and bool(r.same_run)))
                for r in s.execute(
                    select(TrainingRow.id, TrainingRow.created_at, TrainingRow.status,
                           TrainingRow.version_id, same_run.label("same_run"))
                    .outerjoin(ModelRow, ModelRow.id == TrainingRow.model_id)))
            versions = s.execute(select(VersionRow.id, VersionRow.weights_key)).all()
            models = s.scalars(select(ModelRow.id)).all()
        return References(datasets=datasets, generations=generations, trainings=trainings,
                          model_ids=frozenset(models),
                          version_ids=frozenset(v.id for v in versions),
                          weights_keys=frozenset(v.weights_key for v in versions))

    def delete_dataset_if_unused(self, dataset_id: str, *, created_before: datetime) -> bool:
        # One statement: the row goes only if nothing refers to it at that moment. A training
        # inserted concurrently on PostgreSQL makes the foreign key refuse the delete instead.
        query = delete(DatasetRow).where(
            DatasetRow.id == dataset_id, DatasetRow.created_at < created_before,
            ~exists().where(TrainingRow.dataset_id == DatasetRow.id),
            ~exists().where(VersionLikenessRow.reference_dataset_id == DatasetRow.id))
        try:
            with self._tx() as s:
                return bool(getattr(s.execute(query), "rowcount", 0))
        except ConflictError:
            return False

    def delete_generation(self, generation_id: str, *, user_id: str) -> Generation | None:
        with self._tx() as s:
            row = s.get(GenerationRow, generation_id)
            if row is None or row.user_id != user_id:
                return None
            generation = _generation(row)
            # By id and owner: a concurrent delete of the same one deletes it once.
            result = s.execute(delete(GenerationRow).where(GenerationRow.id == generation_id,
                                                           GenerationRow.user_id == user_id))
            return generation if int(getattr(result, "rowcount", 0) or 0) else None

    def delete_generations(self, generation_ids: Sequence[str], *,
                           created_before: datetime) -> int:
        ids = list(generation_ids)
        deleted = 0
        with self._tx() as s:
            for start in range(0, len(ids), 500):  # bound the statement's parameters
                result = s.execute(delete(GenerationRow).where(
                    GenerationRow.id.in_(ids[start:start + 500]),
                    GenerationRow.created_at < created_before))
                deleted += int(getattr(result, "rowcount", 0) or 0)
        return deleted

    # workers ----------------------------------------------------------------------------
    def worker_alive(self, name: str, *, now: datetime, expires_at: datetime,
                     forget_before: datetime) -> None:
        with self._tx() as s:
            # One UPDATE every heartbeat; the INSERT only at a worker's first beat. The name is
            # this worker's alone (a file lock: worker.claim_identity), so no other process
            # inserts it meanwhile.
            result = s.execute(update(WorkerRow).where(WorkerRow.name == name)
                               .values(seen_at=now, expires_at=expires_at))
            if not getattr(result, "rowcount", 0):
                s.add(WorkerRow(name=name, seen_at=now, expires_at=expires_at))
            s.execute(delete(WorkerRow).where(WorkerRow.expires_at < forget_before))

    def worker_gone(self, name: str) -> None:
        with self._tx() as s:
            s.execute(delete(WorkerRow).where(WorkerRow.name == name))

    def count_workers(self, *, now: datetime) -> dict[str, int]:
        with self._read() as s:
            live = WorkerRow.expires_at > now
            # Stale for WORKER_STALE_FOR only, whether or not a beat deleted the older rows
            # yet: with every worker dead none does, and they were counted for ever.
            stale = ~live & (WorkerRow.expires_at >= now - WORKER_STALE_FOR)
            row = s.execute(select(func.count().filter(live),
                                   func.count().filter(stale))).one()
            return {"live": int(row[0]), "stale": int(row[1])}

    # job leases -------------------------------------------------------------------------
    def claim_job(self, name: str, *, owner: str, now: datetime, expires_at: datetime,
                  due_before: datetime | None = None, take_over: str | None = None) -> bool:
        try:
            with self._tx() as s:
                row = s.scalars(select(JobLeaseRow).where(JobLeaseRow.name == name)
                                .with_for_update()).first()
                if row is None:
                    s.add(JobLeaseRow(name=name, owner=owner, expires_at=expires_at,
                                      last_started_at=now))
                    return True
                expiry = _utc(row.expires_at)
                if (row.owner not in (None, owner, take_over) and expiry is not None
                        and expiry > now):
                    return False
                started = _utc(row.last_started_at)
                if due_before is not None and started is not None and started > due_before:
                    return False
                row.owner, row.expires_at, row.last_started_at = owner, expires_at, now
                return True
        except ConflictError:
            return False  # two first claims raced to insert the row: the other one won

    def renew_job(self, name: str, *, owner: str, expires_at: datetime) -> bool:
        # The owner is the fence: an expired lease that nobody took over is still ours.
        with self._tx() as s:
            result = s.execute(update(JobLeaseRow).where(JobLeaseRow.name == name,
                                                         JobLeaseRow.owner == owner)
                               .values(expires_at=expires_at))
            return bool(getattr(result, "rowcount", 0))

    def release_job(self, name: str, *, owner: str, now: datetime, finished: bool) -> None:
        values: dict[str, Any] = {"owner": None, "expires_at": None}
        if finished:
            values["last_finished_at"] = now
        with self._tx() as s:
            s.execute(update(JobLeaseRow).where(JobLeaseRow.name == name,
                                                JobLeaseRow.owner == owner).values(**values))

    def get_job(self, name: str) -> JobLease | None:
        with self._tx() as s:
            row = s.get(JobLeaseRow, name)
            if row is None:
                return None
            return JobLease(name=row.name, owner=row.owner, expires_at=_utc(row.expires_at),
                            last_started_at=_utc(row.last_started_at),
                            last_finished_at=_utc(row.last_finished_at))


    # the deployment ------------------------------------------------------------------------
    def get_deployment_id(self) -> str | None:
        with self._read() as s:
            return s.scalar(select(DeploymentRow.id).where(DeploymentRow.singleton == 1))

    def ensure_deployment_id(self, candidate: str, *, now: datetime) -> str:
        try:
            with self._tx() as s:
                stored = s.scalar(select(DeploymentRow.id).where(DeploymentRow.singleton == 1))
                if stored is not None:
                    return stored
                s.add(DeploymentRow(singleton=1, id=candidate, created_at=now))
            return candidate
        except ConflictError:
            pass  # another process inserted the row first: its id is the deployment's
        stored = self.get_deployment_id()
        if stored is None:  # pragma: no cover - the row that refused ours is there
            raise StorageError("database error: the deployment's row is missing")
        return stored

    def get_deployment_storage_id(self) -> str | None:
        with self._read() as s:
            return s.scalar(select(DeploymentRow.storage_id)
                            .where(DeploymentRow.singleton == 1))

    def bind_deployment_storage(self, candidate: str, *, replace: bool = False) -> str:
        with self._tx() as s:
            # One statement: of processes that race to bind theirs, the first one's stays.
            cond = [DeploymentRow.singleton == 1]
            if not replace:
                cond.append(DeploymentRow.storage_id.is_(None))
            s.execute(update(DeploymentRow).where(*cond).values(storage_id=candidate))
        stored = self.get_deployment_storage_id()
        if stored is None:
            raise StorageError("database error: the deployment's row is missing")
        return stored


def _model_values(m: Model) -> dict[str, Any]:
    return {
        "id": m.id, "user_id": m.user_id, "backend": m.backend, "trigger_word": m.trigger_word,
        "destination": m.destination, "trainer_version": m.trainer_version,
        "lora_scale": m.lora_scale, "lora_scale_is_custom": m.lora_scale_is_custom,
        "active_version_id": m.active_version_id, "created_at": m.created_at,
        "probes": [p.as_dict() for p in m.probes] if m.probes else None,
    }


# SQLSTATEs of a server that cannot be reached or went away: a connection that failed or was
# lost (class 08, less 08004's rejected start and 08P01's protocol violation, which are a
# client's fault), a server shutting down, crashed or starting (57P01-57P03) and one at its
# connection limit (53300: a failed connect, its code read by ``postgres.connect``).
_OUTAGE_STATES = frozenset({"08000", "08001", "08003", "08006", "08007",
                            "57P01", "57P02", "57P03", "53300"})

# What psycopg says, with no SQLSTATE, of a connection it could not make or keep for want of a
# server: libpq's network errors, and the FATALs of a server that takes no connection now
# (57P03: starting up, shutting down, in recovery; 53300: at its connection limit). A server
# that answered with another FATAL (a database or role that does not exist, a refused login,
# a pg_hba.conf rule) or a client that refused a statement (over 65,535 parameters) is a
# defect that comes back every time: counted, not waited out. The network words are libpq's
# own, always English (psycopg[binary]'s libpq is built without translations). The server's
# words are its lc_messages': a failed connect's 57P03 or 53300 is told by its code instead
# (``postgres.connect`` reads it), these English ones are only what remains when that second
# look found no answer (the server gone meanwhile).
_NETWORK_WORDS = (
    "connection refused", "connection reset", "connection timed out", "timeout expired",
    "no route to host", "network is unreachable", "host is unreachable",
    "server closed the connection unexpectedly", "could not receive data from server",
    "could not send data to server", "failed to resolve host", "could not translate host name",
    "no answer from the server", "the connection is lost", "the connection is closed",
)
_BUSY_SERVER_WORDS = (
    "the database system is starting up", "the database system is shutting down",
    "the database system is in recovery mode", "the database system is not yet accepting",
    "the database system is not accepting", "terminating connection due to administrator",
    "sorry, too many clients already", "remaining connection slots are reserved",
)


# PostgreSQL's SQLSTATE read_only_sql_transaction (a hot standby, default_transaction_read_only),
# and SQLite's SQLITE_READONLY (primary code; a read-only file, folder or mount).
_PG_READ_ONLY = "25006"
_SQLITE_READONLY = 8


def _read_only(orig: BaseException | None) -> bool:
    """Whether the driver's error says the database takes no writes (``DatabaseRefusedError``)."""
    return driver_says(orig, sqlstate=_PG_READ_ONLY, sqlite_code=_SQLITE_READONLY,
                       words="readonly database")


def _unanswered(exc: DBAPIError) -> bool:
    """Whether ``exc``, an outage (``_unreachable``), is a wait that ran out with no answer from
    the server (``DatabaseUnreachableError.unanswered``): each further call waits as long."""
    return gave_no_answer(exc.orig)


# PostgreSQL's SQLSTATEs of a statement the server stopped waiting: lock_not_available (its
# lock_timeout, or NOWAIT) and query_canceled (its statement_timeout, or a cancel asked for);
# SQLite's SQLITE_BUSY (primary code: "database is locked", its write lock held by another
# connection past the busy timeout).
_PG_LOCK_NOT_AVAILABLE = "55P03"
_PG_QUERY_CANCELED = "57014"
_SQLITE_BUSY = 5


def _kept_waiting(orig: BaseException | None) -> bool:
    """Whether the driver's error says the database kept the statement waiting past its bound
    (``DatabaseLockedError``)."""
    return any(driver_says(orig, sqlstate=state, sqlite_code=_SQLITE_BUSY,
                           words="database is locked")
               for state in (_PG_LOCK_NOT_AVAILABLE, _PG_QUERY_CANCELED))


def _lock_ran_out(orig: BaseException | None) -> bool:
    """Whether a ``_kept_waiting`` error says a lock's wait alone (SQLite's busy timeout,
    PostgreSQL's lock_timeout), not 57014 (a statement timeout, or a cancel from outside)."""
    return driver_says(orig, sqlstate=_PG_LOCK_NOT_AVAILABLE, sqlite_code=_SQLITE_BUSY,
                       words="database is locked")


def _unreachable(exc: DBAPIError) -> bool:
    """Whether ``exc`` says the database server could not be reached or dropped the connection
    (PostgreSQL down or restarting: refused, reset, "terminating connection due to administrator
    command"), not that it refused a statement or a login. A connection lost under a statement
    is one SQLAlchemy invalidated; psycopg's other errors carry a SQLSTATE (``_OUTAGE_STATES``)
    or, for the client's own (a failed connect among them, unless ``postgres.connect`` read the
    server's 57P03 or 53300 and gave it one), none: those are told by their words
    (``_NETWORK_WORDS``, ``_BUSY_SERVER_WORDS``). SQLite's ("database is locked": busy,
    ``_kept_waiting``) are not outages."""
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)) or not hasattr(exc.orig,
                                                                               "sqlstate"):
        return False
    state = getattr(exc.orig, "sqlstate", None)
    if state is not None:
        return str(state) in _OUTAGE_STATES
    said = str(exc.orig).lower()
    if any(word in said for word in _BUSY_SERVER_WORDS):
        return True
    # A server that answered with a FATAL of its own (of several hosts, any one) is reached.
    return "fatal:" not in said and any(word in said for word in _NETWORK_WORDS)
