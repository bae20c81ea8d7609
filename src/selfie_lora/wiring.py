"""Building the services from settings: the only place adapters are chosen.

Entry points (``api.app.create_app``, ``cli``, ``worker``) call ``build_services``; tests call it
with their own adapters (a stand-in Replicate URL, an inline local trainer, a fake generator).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

# The database's, the queue's and the LoRA files' adapters (SQLAlchemy, Alembic, huey and the
# drivers it loads, numpy) are imported where they are built: `selfie-lora check`, `backup`
# and `restore` build none of them, and loading them cost each such command ~0.5 s of CPU.
if TYPE_CHECKING:
    from sqlalchemy import Engine

    from selfie_lora.adapters.replicate.session import ReplicateConnection

from selfie_lora.adapters.sqlite_files import tighten
from selfie_lora.config import DATABASE_FILE, Settings
from selfie_lora.dataset.checks import CheckPolicy
from selfie_lora.dataset.limits import UploadLimits
from selfie_lora.domain.plan import TrainingDefaults
from selfie_lora.errors import ConfigError
from selfie_lora.services.backup import BackupService
from selfie_lora.services.clock import ClockGuard
from selfie_lora.services.common import utcnow
from selfie_lora.services.deployment import DeploymentBinding
from selfie_lora.services.erasure import AccountEraser
from selfie_lora.services.gc import GarbageCollector
from selfie_lora.services.generation import GenerationService
from selfie_lora.services.intake import IntakeService
from selfie_lora.services.likeness import LikenessService
from selfie_lora.services.models import ModelService
from selfie_lora.services.operations import OperationsService
from selfie_lora.services.owners import remove_stale_files
from selfie_lora.services.ports import (
    Alerter,
    AnalyzerFactory,
    BlobStore,
    FaceAnalyzer,
    Generator,
    PasswordHasher,
    Repository,
    Telemetry,
    Trainer,
    WebhookVerifier,
    WorkQueue,
)
from selfie_lora.services.training import TrainingService
from selfie_lora.services.users import UserService

logger = logging.getLogger(__name__)


@dataclass
class Services:
    """The services of one process, and the ports they run on. Entry points (``api``, ``cli``,
    ``worker``, ``demo``) call the services only; ``repo`` is here for tests and
    operators' scripts, never for an entry point."""

    settings: Settings
    engine: Engine
    repo: Repository
    blobs: BlobStore
    queue: WorkQueue
    users: UserService
    intake: IntakeService
    training: TrainingService
    models: ModelService
    generation: GenerationService
    likeness: LikenessService
    operations: OperationsService
    telemetry: Telemetry
    gc: GarbageCollector
    erasure: AccountEraser
    clock: ClockGuard
    trainers: dict[str, Trainer] = field(default_factory=dict)

    def close(self) -> None:
        """Lets go of what the services hold. The caller stops its worker first (the entry
        points' worker, or ``embedded_worker``): a consumer still reading the queue would meet
        it closed (``QueueClosedError``)."""
        # Each in its own ``finally``: one that fails (its error still raised) does not leave
        # the others open.
        try:
            self.generation.close()
        finally:
            try:
                # huey's SQLite connection (and its -wal file), or the Redis pool.
                self.queue.close()
            finally:
                self.engine.dispose()


def training_defaults(settings: Settings) -> TrainingDefaults:
    return TrainingDefaults(
        backend=settings.trainer,
        trainer_version=settings.effective_trainer_version,
        owner=settings.destination_owner,
        replicate_recipe=settings.replicate_recipe,
        probe_count=settings.probe_count,
        base_model=settings.base_model,
    )


_face_analyzers: dict[AnalyzerFactory, FaceAnalyzer] = {}
_face_analyzer_lock = threading.Lock()


def default_analyzer_factory(settings: Settings) -> AnalyzerFactory:
    """dlib's analyzer, as the photo-analysis processes build it."""
    from selfie_lora.adapters.faces.dlib_regions import DlibAnalyzerFactory

    # The ResNet's ONNX conversion goes where SELFIE_LORA_CACHE_DIR says when it is set; else to
    # the machine user's cache (~/.cache/selfie-lora/faces), which every service home shares.
    return DlibAnalyzerFactory(
        landmarks=68 if settings.face_landmarks_68_noncommercial else 5,
        model_cache_dir=settings.cache_dir / "faces" if settings.cache_dir else None)


def default_face_analyzer(settings: Settings) -> FaceAnalyzer:
    """dlib's analyzer, one per process and landmark model: it loads ~100 MB of models on first
    use and is thread-safe."""
    factory = default_analyzer_factory(settings)
    with _face_analyzer_lock:
        if factory not in _face_analyzers:
            # The region analyzer also describes a face found at low resolution without a
            # second detection; the intake's worker processes build the same one.
            _face_analyzers[factory] = factory()
        return _face_analyzers[factory]


def default_webhooks(settings: Settings) -> WebhookVerifier | None:
    """Replicate's webhooks, when a secret is set to verify them with."""
    if settings.webhook_secret is None:
        return None
    from selfie_lora.adapters.replicate.webhooks import ReplicateWebhooks

    return ReplicateWebhooks(secret=settings.webhook_secret.get_secret_value())


# Each setup warning below is said once a process: its flag is set by the first caller that
# finds it unset, under this lock (``_first_time``).
_said_lock = threading.Lock()


def _first_time(said: threading.Event) -> bool:
    """Sets ``said``; True for the one caller that set it. A compare-and-set: checked, then
    set, as it was, two threads building services at once (an alerter, trainers) could both
    find it unset and both warn."""
    with _said_lock:
        if said.is_set():
            return False
        said.set()
        return True


_unsigned_webhooks_said = threading.Event()


def default_webhook_url(settings: Settings, *, replicate_trainer: bool) -> str | None:
    """Where Replicate sends a training's webhooks: ``{SELFIE_LORA_PUBLIC_URL}/api/webhooks/
    replicate`` whenever the URL is set, as the contract says. Without
    ``SELFIE_LORA_WEBHOOK_SECRET`` this server cannot verify a delivery and answers each 401
    (the worker polls and ends the training all the same), so a process that built a Replicate
    trainer (``replicate_trainer``: serve, worker, train) says so once: the URL alone is also
    the alerts' links setting, and every other command (users, gc, backup: no trainer) printing
    a warning on stderr had cron mail it each run."""
    if not settings.public_url:
        # The reverse (a secret, no URL) is as sure a sign of a setup half done, and was silent:
        # no training is sent a webhook, so the secret verifies nothing.
        if (settings.webhook_secret is not None and replicate_trainer
                and settings.trainer == "replicate" and _first_time(_unsigned_webhooks_said)):
            logger.warning("SELFIE_LORA_WEBHOOK_SECRET is set but SELFIE_LORA_PUBLIC_URL is "
                           "not: trainings are created without a webhook (Replicate has no "
                           "address to send it to) and followed by polling; set the URL to use "
                           "webhooks")
        return None
    if (settings.webhook_secret is None and replicate_trainer and settings.trainer == "replicate"
            and _first_time(_unsigned_webhooks_said)):
        logger.warning("SELFIE_LORA_PUBLIC_URL is set but SELFIE_LORA_WEBHOOK_SECRET is not: "
                       "Replicate's webhooks to this server are answered 401 (nothing to verify "
                       "them with) and trainings are followed by polling; set the secret to use "
                       "webhooks")
    return f"{settings.public_url_base}/api/webhooks/replicate"


_unsent_alerts_said = threading.Event()


def default_alerter(settings: Settings, *, announce: bool = False) -> Alerter | None:
    """The alerts' sender: POSTs to ``SELFIE_LORA_ALERT_URL`` (signed with
    ``SELFIE_LORA_ALERT_SECRET`` when set), or None when the URL is unset (alerts are recorded
    and logged only). ``announce``: this process built a trainer (serve, worker, train), where
    versions are judged and alerts made; only such a process says once that the secret is set
    without the URL, as ``default_webhook_url`` does, so that cron's commands (users, gc,
    backup) do not have cron mail it each run."""
    url = settings.alert_url.get_secret_value() if settings.alert_url is not None else ""
    if not url:
        # A secret without the URL is a setup half done that was silent: it signs nothing.
        # (The URL without the secret is the usual Slack or Discord hook: nothing to say.)
        if settings.alert_secret is not None and announce and _first_time(_unsent_alerts_said):
            logger.warning("SELFIE_LORA_ALERT_SECRET is set but SELFIE_LORA_ALERT_URL is not: "
                           "alerts are recorded and logged only, nothing is signed; set the URL "
                           "to send them")
        return None
    from selfie_lora.adapters.alerts.http import HttpAlerter

    secret = (settings.alert_secret.get_secret_value() if settings.alert_secret is not None
              else None)
    return HttpAlerter(url, timeout=settings.alert_timeout, secret=secret)


def default_password_hasher() -> PasswordHasher | None:
    """Argon2id, when argon2-cffi is installed (without it, signing in with a password is a
    setup error that says what to install; API keys still work)."""
    try:
        from selfie_lora.adapters.passwords.argon2 import Argon2Hasher
    except ImportError:
        return None
    return Argon2Hasher()


def session_secret(settings: Settings) -> str:
    """The key that signs session cookies: the setting, or a random one kept (mode 0600) in
    HOME/secret_key, made on first use. Several API servers must share one: set it."""
    if settings.secret_key is not None:
        value = settings.secret_key.get_secret_value()
        if len(value) < 32:
            raise ConfigError("SELFIE_LORA_SECRET_KEY must be at least 32 characters")
        return value
    path = settings.home / "secret_key"
    _remove_dead_key_candidates(settings.home)
    try:
        existing = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    else:
        # Made 0644 by hand or copied in, it was used as it was while the database beside it is
        # made 0600 when opened: any local account could sign cookies as any user.
        before = tighten(path)
        if before is not None:
            logger.warning("%s was readable by other local accounts (mode %o): made 0600; "
                           "anyone who read it could sign in as any user, so delete it to make "
                           "a new one (every session ends) if that may have happened",
                           path, before)
        if not existing:
            raise ConfigError(f"{path} is empty (it would sign every cookie with an empty key): "
                              "delete it, and a new one is made at the next start (every "
                              "session ends), or set SELFIE_LORA_SECRET_KEY")
        return existing
    make_home(settings)
    candidate = secrets.token_urlsafe(48)
    tmp = path.with_name(f".secret_key.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(candidate)
    try:
        # Two processes starting at once: the first link wins, both read the same key.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text(encoding="ascii").strip()


def _remove_dead_key_candidates(home: Path) -> None:
    """A start killed between writing its candidate key and linking it (``session_secret``) left
    ``.secret_key.<pid>.tmp``, which no later start looked at (the key is there by then, or is
    made under another pid): removed once old (``remove_stale_files``)."""
    remove_stale_files(home, ".secret_key.*.tmp", left_by="a start that made the secret key")


def default_blob_store(settings: Settings) -> BlobStore:
    """Files under HOME, or the object storage that SELFIE_LORA_STORAGE_URL names."""
    if settings.storage_url is None:
        from selfie_lora.adapters.storage.fs import FileSystemBlobStore

        return FileSystemBlobStore(settings.blob_dir)
    from selfie_lora.adapters.storage.s3 import S3BlobStore

    secret = settings.storage_secret_access_key
    return S3BlobStore(
        url=settings.storage_url, cache_dir=settings.blob_cache_dir,
        endpoint=settings.storage_endpoint, region=settings.storage_region,
        access_key_id=settings.storage_access_key_id,
        secret_access_key=secret.get_secret_value() if secret is not None else None,
        allow_http=settings.storage_allow_http,
        cache_max_bytes=max(1, round(settings.blob_cache_gb * 1e9)),
        connect_timeout=settings.storage_connect_timeout, timeout=settings.storage_timeout,
        retry_timeout=settings.storage_retry_timeout, max_retries=settings.storage_max_retries,
        name_downloads=settings.download_url_names,
    )


def replicate_connection(settings: Settings) -> ReplicateConnection:
    """How this process reaches Replicate: one object for the trainer and the generator."""
    from selfie_lora.adapters.replicate.session import ReplicateConnection

    assert settings.replicate_api_token is not None
    return ReplicateConnection(api_token=settings.replicate_api_token.get_secret_value(),
                               base_url=settings.replicate_base_url,
                               max_retries=settings.replicate_max_retries)


_no_token_said = threading.Event()


def _say_replicate_has_no_token(settings: Settings) -> None:
    """Warned, not refused: every process that builds trainers (serve, worker, train, generate,
    export, users delete) gets here, and only the ones that train or generate on Replicate need
    the token. But left unsaid, such a process started in silence and each training of a new
    model (made with backend replicate) failed 'This server has no replicate trainer
    configured'."""
    if settings.trainer != "replicate" or not _first_time(_no_token_said):
        return
    logger.warning("SELFIE_LORA_TRAINER is replicate but REPLICATE_API_TOKEN is not set: this "
                   "process has no Replicate trainer, so every training it takes fails and "
                   "Replicate versions cannot generate here; set REPLICATE_API_TOKEN (or "
                   "SELFIE_LORA_REPLICATE_API_TOKEN) on every API server and worker")


_base_model_said = threading.Event()


def _say_the_base_model_is_missing(settings: Settings) -> None:
    """Warned, not refused: API servers may share the GPU workers' settings without their
    FLUX.1 folder. But a mistyped path started every process in silence while each model made
    meanwhile was pinned to a FLUX.1 recipe (anything but 'tiny' is FLUX.1), which the operator's
    fix then answered with 409 base_model_mismatch."""
    from selfie_lora.adapters.flux.loader import base_model_problem

    if settings.trainer != "local" or _base_model_said.is_set():
        return  # the folder is not even looked at: a Replicate deployment need not have it
    problem = base_model_problem(settings.base_model)
    if problem is None or not _first_time(_base_model_said):
        return
    logger.warning("SELFIE_LORA_BASE_MODEL: %s: this process cannot train or generate locally, "
                   "and each model made meanwhile is pinned to a FLUX.1 recipe (%s)", problem,
                   settings.effective_trainer_version)


def default_trainers(settings: Settings, *,
                     telemetry: Telemetry | None = None) -> dict[str, Trainer]:
    """``telemetry``: where the local trainer counts the restarts of its training processes."""
    from selfie_lora.adapters.flux.trainer import LocalTrainer

    _say_the_base_model_is_missing(settings)
    trainers: dict[str, Trainer] = {
        "local": LocalTrainer(
            base_model=settings.base_model, cache_dir=settings.model_cache_dir,
            isolation=settings.local_isolation, device=settings.device,
            log_format=settings.log_format, memory_mode=settings.local_memory_mode,
            stall_timeout_s=settings.local_stall_seconds, telemetry=telemetry,
        )
    }
    if settings.replicate_api_token is None:
        _say_replicate_has_no_token(settings)
    else:
        # Here, not at wiring's module level, as lora_formats imports numpy (build_services has
        # it loaded already, for FluxLoraConverter: this defers nothing there).
        from selfie_lora.adapters.flux.lora_formats import normalize_lora
        from selfie_lora.adapters.replicate.trainer import ReplicateTrainer

        trainers["replicate"] = ReplicateTrainer(
            connection=replicate_connection(settings),
            owner=settings.replicate_owner or settings.destination_owner,
            hardware=settings.replicate_hardware,
            poll_interval=settings.replicate_poll_interval,
            normalize_weights=normalize_lora,
        )
    return trainers


def default_generators(settings: Settings) -> dict[str, Generator]:
    from selfie_lora.adapters.flux.generator import LocalGenerator

    generators: dict[str, Generator] = {
        "local": LocalGenerator(base_model=settings.base_model, cache_dir=settings.model_cache_dir,
                                device=settings.device, memory_mode=settings.local_memory_mode),
    }
    if settings.replicate_api_token is not None:
        from selfie_lora.adapters.replicate.generator import ReplicateGenerator

        generators["replicate"] = ReplicateGenerator(
            connection=replicate_connection(settings),
            poll_interval=min(settings.replicate_poll_interval, 2.0),
        )
    return generators


def server_clock(engine: Engine) -> Callable[[], datetime] | None:
    """The database server's clock (``adapters.db.repository.server_clock``): a name of this
    module, so that tests can stand in a skewed one."""
    from selfie_lora.adapters.db.repository import server_clock as read_server_clock

    return read_server_clock(engine)


def database_engine(settings: Settings) -> Engine:
    """The engine of SELFIE_LORA_DATABASE_URL, its PostgreSQL pool SELFIE_LORA_DB_POOL_SIZE, its
    bounds SELFIE_LORA_DB_POOL_TIMEOUT, _DB_STATEMENT_TIMEOUT and _DB_ANSWER_TIMEOUT."""
    from selfie_lora.adapters.db.repository import make_engine

    return make_engine(settings.effective_database_url, pool_size=settings.db_pool_size,
                       pool_timeout_s=settings.db_pool_timeout,
                       statement_timeout_s=settings.db_statement_timeout_in_effect,
                       answer_timeout_s=settings.db_answer_timeout)


def make_home(settings: Settings) -> None:
    """HOME, made when it is not there, as 0700: it holds the database, the queue, the secret
    key and the photos of every user (one that exists is left as it is: it may be the
    operator's own folder)."""
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)


def open_database(settings: Settings) -> None:
    """Connects to the database and brings its schema up to date, then lets go: a check that it
    can be reached before a server starts."""
    from selfie_lora.adapters.db.migrate import upgrade

    make_home(settings)
    engine = database_engine(settings)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def _intake(settings: Settings, *, repo: Repository | None, blobs: BlobStore | None,
            face_analyzer: FaceAnalyzer | None, telemetry: Telemetry | None) -> IntakeService:
    return IntakeService(
        repo=repo, blobs=blobs,
        limits=UploadLimits(max_upload_bytes=settings.max_upload_bytes),
        policy=CheckPolicy(min_photos=settings.min_photos, max_photos=settings.max_photos),
        analyzer=face_analyzer or default_face_analyzer(settings),
        defaults=lambda: training_defaults(settings),
        # Worker processes build dlib's analyzer themselves; a given one (tests) runs in threads.
        analyzer_factory=default_analyzer_factory(settings) if face_analyzer is None else None,
        workers=settings.intake_workers, keep_originals=settings.keep_originals,
        telemetry=telemetry, gate_enabled=settings.quality_gate,
    )


def build_photo_checks(settings: Settings, *,
                       face_analyzer: FaceAnalyzer | None = None) -> IntakeService:
    """The photo checks alone (``selfie-lora check``): judging photos stores nothing, so no
    database, queue, storage or HOME is opened, and none of them being out of reach (or a crash
    of theirs) can be mistaken for photos that are not trainable."""
    return _intake(settings, repo=None, blobs=None, face_analyzer=face_analyzer,
                   telemetry=None)


def build_services(
    settings: Settings,
    *,
    trainers: Mapping[str, Trainer] | None = None,
    generators: Mapping[str, Generator] | None = None,
    rng: random.Random | None = None,
    migrate: bool | Literal["require"] = True,
    face_analyzer: FaceAnalyzer | None = None,
    alerter: Alerter | None = None,
    password_hasher: PasswordHasher | None = None,
    blobs: BlobStore | None = None,
    telemetry: Telemetry | None = None,
    clock: Callable[[], datetime] | None = None,
    database_clock: Callable[[], datetime] | None = None,
    open_queue: bool = False,
) -> Services:
    """``clock``: the training service's (tests: a fake one, to let a wait pass), which the
    clock check compares with ``database_clock``: the database server's (tests: a fake one, a
    machine whose clock drifted; by default PostgreSQL's own, and none on SQLite).
    ``migrate``: True brings the schema to this release's; ``"require"`` (a command that only
    reads) refuses one that is not at it, changing nothing (``migrate.require_head``); either
    first checks this machine's clock against the database's (``services.clock``), so that a
    refused start changes nothing. False touches neither.
    ``open_queue``: True builds the queue now (``HueyJobQueue.open``), for a process that will
    use it (``serve``, ``worker``, ``train``, ``resume``, the demo): one it cannot use stops the
    start, before the database is opened (made, migrated) or anything stored. Otherwise huey
    is loaded at the queue's first use, which most commands never make."""
    from selfie_lora.adapters.db.migrate import require_head, upgrade
    from selfie_lora.adapters.db.repository import SqlRepository
    from selfie_lora.adapters.flux.lora_formats import FluxLoraConverter
    from selfie_lora.adapters.queue.huey_queue import HueyJobQueue

    make_home(settings)
    queue = HueyJobQueue.from_url(settings.effective_queue_url, name=settings.queue_name)
    if open_queue:
        # Before the database is opened, compared or migrated: one it cannot use refuses a
        # start that made no database and changed no schema (review report1 R3: refused after
        # the migrations, a newer release's train migrated a shared database, then refused).
        try:
            queue.open()
        except ValueError as exc:
            # A URL option redis-py refuses: said of the setting that holds it, which its own
            # words ('Invalid value for ... in connection URL') do not name (nor any password).
            raise ConfigError(f"SELFIE_LORA_QUEUE_URL cannot be used: {exc}") from exc
    engine = database_engine(settings)
    # Before anything is written or compared, the migrations too: every shared time is this
    # machine's clock's. A process whose clock is too far from the database's refuses to start
    # (ClockSkewError) having written nothing: checked after them, a skewed machine's
    # 'users create' created the whole schema, then refused. ``migrate=False`` (a library
    # user's: the database is not touched while building) leaves it to the reconciler's rounds
    # and /readyz.
    clock_guard = ClockGuard(database_clock=database_clock or server_clock(engine),
                             max_skew=settings.max_clock_skew_seconds, clock=clock or utcnow,
                             reads_server=database_clock is None)
    if migrate:
        try:
            clock_guard.require()
            if migrate == "require":
                require_head(engine)
            else:
                upgrade(engine)
        except BaseException:
            engine.dispose()
            queue.close()  # whatever its open made, let go of (a fresh one holds nothing)
            raise
    repo = SqlRepository(engine)
    blobs = blobs if blobs is not None else default_blob_store(settings)
    if telemetry is None:
        from selfie_lora.adapters.metrics.prometheus import PrometheusTelemetry

        telemetry = PrometheusTelemetry()
    chosen_trainers = (dict(trainers) if trainers is not None
                       else default_trainers(settings, telemetry=telemetry))
    chosen_generators = (dict(generators) if generators is not None
                         else default_generators(settings))
    webhook_url = default_webhook_url(
        settings, replicate_trainer="replicate" in chosen_trainers)
    faces = face_analyzer or default_face_analyzer(settings)
    generation = GenerationService(repo=repo, blobs=blobs, generators=chosen_generators,
                                   max_per_user=settings.max_generations_per_user,
                                   threads=settings.generation_threads,
                                   base_model=settings.base_model, telemetry=telemetry)
    likeness = LikenessService(
        repo=repo, blobs=blobs, generation=generation,
        faces=faces,
        alerter=(alerter if alerter is not None
                 else default_alerter(settings, announce=bool(chosen_trainers))),
        tolerance=settings.gate_tolerance, probe_count=settings.probe_count,
        probe_size=settings.probe_size, gate_enabled=settings.quality_gate,
        telemetry=telemetry, public_url=settings.public_url,
        alert_timeout=settings.alert_timeout,
    )
    intake = _intake(settings, repo=repo, blobs=blobs, face_analyzer=face_analyzer,
                     telemetry=telemetry)
    training = TrainingService(
        repo=repo, blobs=blobs, queue=queue, trainers=chosen_trainers,
        defaults=lambda: training_defaults(settings), work_dir=settings.work_dir,
        likeness=likeness, intake=intake, webhook_url=webhook_url,
        webhooks=default_webhooks(settings), rng=rng, lease=settings.lease_policy,
        telemetry=telemetry, clock=clock or utcnow,
    )
    deployment = DeploymentBinding(repo=repo, blobs=blobs)
    users = UserService(repo=repo, hasher=password_hasher or default_password_hasher(),
                        policy=settings.sign_in_policy, signup_enabled=settings.signup,
                        rotation_grace=settings.key_rotation_grace)
    gc = GarbageCollector(repo=repo, blobs=blobs, work_dir=settings.work_dir,
                          policy=settings.gc_policy, interval=settings.gc_interval,
                          deployment=deployment, forget_sign_ins=users.forget_expired)
    return Services(
        settings=settings, engine=engine, repo=repo, blobs=blobs, queue=queue,
        users=users,
        intake=intake,
        training=training,
        models=ModelService(
            repo=repo, blobs=blobs, converter=FluxLoraConverter(),
            repin_policy=settings.repin_policy,
            defaults=lambda: training_defaults(settings),
            download_url_expiry=(timedelta(seconds=settings.download_url_seconds)
                                 if settings.download_urls else None)),
        generation=generation,
        likeness=likeness,
        operations=OperationsService(
            repo=repo, queue=queue, blobs=blobs, telemetry=telemetry, deployment=deployment,
            metrics_token=(settings.metrics_token.get_secret_value()
                           if settings.metrics_token is not None else None),
            clock=clock_guard, now=clock or utcnow),
        telemetry=telemetry,
        gc=gc,
        erasure=AccountEraser(repo=repo, blobs=blobs, users=users, training=training, gc=gc),
        clock=clock_guard,
        trainers=chosen_trainers,
    )


@contextmanager
def using_home(settings: Settings) -> Iterator[None]:
    """Held by ``serve`` and ``worker`` while they run: ``restore`` refuses a HOME in use
    (``adapters.home_lock``). Once held, the copies of a backup that a restore killed midway
    left beside HOME go (``clear_killed_restores``): no restore runs then."""
    from selfie_lora.adapters.backup import clear_killed_restores
    from selfie_lora.adapters.home_lock import using_home as hold

    with hold(settings.home):
        clear_killed_restores(settings.home)
        yield


def sharing_home(settings: Settings, *, make: bool = False) -> AbstractContextManager[None]:
    """Held by a one-shot command while it opens and uses HOME's data: refused
    (``ConfigError``) during a restore, and a restore is refused meanwhile
    (``adapters.home_lock``). ``make``: a missing HOME is made first, to be locked."""
    from selfie_lora.adapters.home_lock import sharing_home as hold

    return hold(settings.home, make=make)


def clearing_home(home: Path, *, refused: str) -> AbstractContextManager[None]:
    """Held by ``demo`` while it deletes an earlier demo's HOME: refused (``ConfigError``)
    while a ``serve`` or ``worker`` runs on it (``adapters.home_lock``)."""
    from selfie_lora.adapters.home_lock import clearing_home as hold

    return hold(home, refused=refused)


def build_backups(settings: Settings) -> BackupService:
    """Backup and restore of the data in HOME, without opening the database as the services
    do (a restore must not migrate, nor make, the HOME it is about to replace)."""
    from selfie_lora.adapters.backup import HomeBackups

    database = "home"
    if settings.database_url is not None:
        from sqlalchemy.engine import make_url

        url = make_url(settings.database_url)
        if not url.drivername.startswith("sqlite"):
            database = "postgres"
        elif Path(url.database or ":memory:").resolve() != (
                settings.home / DATABASE_FILE).resolve():
            database = "sqlite"
    return BackupService(backups=HomeBackups(home=settings.home), database=database,
                         storage_elsewhere=settings.storage_url is not None)
