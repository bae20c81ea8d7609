"""What an operator asks of a running service: is it ready, and its figures."""

from __future__ import annotations

import hmac
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from selfie_lora.domain.lease import OUTAGE_WAITS, outage_waited
from selfie_lora.errors import (
    ConfigError,
    DatabaseRefusedError,
    DatabaseUnreachableError,
    SelfieLoraError,
    StorageError,
    StorageFullError,
    describe,
)
from selfie_lora.services.clock import SKEWED, ClockGuard
from selfie_lora.services.common import Outage, utcnow
from selfie_lora.services.deployment import DeploymentBinding
from selfie_lora.services.ports import BlobStore, Repository, Telemetry, WorkQueue

logger = logging.getLogger(__name__)


# What /readyz says of a check that failed, to anyone: why it failed (an error's own words) may
# name the storage's absolute path, a database host or a bucket, and /readyz needs no sign-in.
UNAVAILABLE = "unavailable"
# ... and of a storage that answers but whose disk is full (``StorageFullError``): no path in it.
FULL = "full"
# What a /metrics request without the token is told (a 401), by the API servers and a worker alike.
METRICS_TOKEN_REQUIRED = "send the metrics token as a bearer token"


@dataclass(frozen=True)
class Readiness:
    """Each dependency's answer: "ok", or why it failed."""

    checks: dict[str, str]
    # The checks that failed for a full disk: said as FULL, not UNAVAILABLE, to anyone.
    full: frozenset[str] = frozenset()

    @property
    def ready(self) -> bool:
        return all(v == "ok" for v in self.checks.values())

    @property
    def http_status(self) -> int:
        return 200 if self.ready else 503

    def as_json(self, *, detailed: bool = False) -> dict[str, object]:
        """The answer of ``/readyz`` (the API's and a worker's alike): each check "ok" or
        ``UNAVAILABLE``, or with ``detailed`` (the operator's) why it failed."""
        checks = (self.checks if detailed else
                  {name: "ok" if answer == "ok" else SKEWED if name == "clock"
                   else FULL if name in self.full else UNAVAILABLE
                   for name, answer in self.checks.items()})
        return {"status": "ready" if self.ready else "not ready", "checks": checks}


class OperationsService:
    def __init__(self, *, repo: Repository, queue: WorkQueue, blobs: BlobStore,
                 telemetry: Telemetry, deployment: DeploymentBinding | None = None,
                 metrics_token: str | None = None, clock: ClockGuard | None = None,
                 now: Callable[[], datetime] = utcnow) -> None:
        self._repo = repo
        # The training service's clock: whether a wait's hold is over is its to say.
        self._now = now
        self._clock = clock
        self._metrics_token = metrics_token
        self._queue = queue
        self._blobs = blobs
        self._telemetry = telemetry
        # Shared with the collector (wiring): it guards its next collection when this
        # process wrote the store's marker.
        self._deployment = deployment or DeploymentBinding(repo=repo, blobs=blobs)
        # What this process's first start decided: a command binds before it builds what it
        # starts (to refuse in one line), and what it starts binds again for library users;
        # the second start is the first one's answer, not a second warning.
        self._decided: tuple[str | None] | None = None
        # Each check's failures, said once an outage (and its end once): a load balancer
        # probing every few seconds made every outage a WARNING per probe per process.
        self._outages = {name: Outage() for name in ("database", "queue", "storage", "clock")}

    def bind_deployment(self) -> str | None:
        """A server or worker starting: binds the blob store to this database
        (``services.deployment``) and returns the deployment's id. ``DeploymentMismatchError``
        when the store is another deployment's: the process must not start. None, with a
        warning, when the store has no marker and does not look like this database's (it
        stays unbound: collections keep to the collector's guard), or cannot be reached now
        (it starts as before: a store that comes back is bound by the worker's next
        collection, and every collection checks first)."""
        if self._decided is not None:
            return self._decided[0]
        try:
            deployment_id = self._deployment.bind()
        except StorageError as exc:
            logger.warning("the storage's deployment marker could not be checked now (%s); "
                           "garbage collection checks it before it deletes anything",
                           exc.message)
            # Decided too: the command's bind and its app's would otherwise each wait out the
            # storage's timeouts (a hung endpoint: minutes before the server listens).
            self._decided = (None,)
            return None
        self._decided = (deployment_id,)
        return deployment_id

    def check_worker_storage(self) -> None:
        """A queue worker starting, after ``bind_deployment``: ``ConfigError`` when its store was
        left unbound for being empty while the database names uploads or versions (its
        SELFIE_LORA_STORAGE_URL is missing): every training it took would fail for want of
        photos the deployment's storage holds, told to the user as theirs to upload again. It
        refuses to start instead, so the trainings stay queued for a worker that has the
        storage. Not ``serve``: its own API writes the uploads it trains to the same store."""
        if (reason := self._deployment.storage_elsewhere) is not None:
            raise ConfigError(f"refusing to start: {reason}")

    def is_operator(self, *, authorization: str | None) -> bool:
        """Whether a request's ``Authorization`` header carries SELFIE_LORA_METRICS_TOKEN as a
        bearer token; never when no token is set (then nothing tells the operator apart)."""
        if self._metrics_token is None:
            return False
        return hmac.compare_digest((authorization or "").encode(),
                                   f"Bearer {self._metrics_token}".encode())

    def may_read_metrics(self, *, authorization: str | None) -> bool:
        """Whether a request may read ``GET /metrics`` (the API servers' and a worker's alike):
        anyone when no SELFIE_LORA_METRICS_TOKEN is set, else only a caller sending it."""
        return self._metrics_token is None or self.is_operator(authorization=authorization)

    def readiness(self) -> Readiness:
        """The database, the queue and the storage, each asked once (``GET /readyz``), and on
        PostgreSQL this machine's clock against the database's ("skewed": past
        SELFIE_LORA_MAX_CLOCK_SKEW_SECONDS, ``services.clock``)."""
        checks, full = {}, set()
        tickets = {name: outage.attempt() for name, outage in self._outages.items()}
        hung = False  # the database gave the readiness read no answer
        for name, probe in (("database", self._database_ready),
                            ("queue", self._queue.pending),
                            ("storage", self._blobs.check)):
            try:
                probe()
                checks[name] = "ok"
            except StorageFullError as exc:
                checks[name] = exc.message
                full.add(name)
            except SelfieLoraError as exc:
                checks[name] = exc.message
                hung = hung or (isinstance(exc, DatabaseUnreachableError) and exc.unanswered)
            except Exception as exc:  # a driver's own error: the answer names it, never raises
                checks[name] = describe(exc)
        if self._clock is not None and self._clock.enabled:
            # Asked again at every probe: a load balancer takes a server whose clock drifted out
            # of its pool (its sessions and key checks compare times other machines wrote). The
            # server's clock is read in the database check's own statement (_database_ready):
            # one pool connection a probe, not one more for the clock. Another clock (one given
            # to build_services) is read here, but not on a database that just gave the
            # readiness read no answer: it would wait as long again (a probe's two waits past a
            # load balancer's timeout). Unread, the last verdict stands, as when its own read
            # gets none.
            fresh = not (hung or self._clock.reads_server)
            checks["clock"] = ("ok" if (self._clock.check() if fresh else not self._clock.skewed)
                               else SKEWED)
        readiness = Readiness(checks=checks, full=frozenset(full))
        for name, result in checks.items():
            outage = self._outages[name]
            if result != "ok":
                began = outage.begins(ticket=tickets[name])
                logger.log(logging.WARNING if began else logging.DEBUG,
                           "not ready: %s: %s (said once until it is ready again)", name, result)
            elif outage.ends(ticket=tickets[name]):
                logger.info("ready again: %s ok", name)
        return readiness

    def _database_ready(self) -> None:
        """The database answers a read, and takes writes: a read alone passed on a fail-over's
        read-only standby or a replica's URL, and a load balancer kept sending a server whose
        every write was refused (a 500) its requests. Both asked at once, and the server's
        clock with them where the clock check reads it: one pool connection a probe."""
        if self._clock is not None and self._clock.reads_server:
            writes = self._clock.check_with(self._repo.takes_writes_at)
        else:
            writes = self._repo.takes_writes()
        if not writes:
            raise DatabaseRefusedError(
                "the database takes no writes (read-only: a standby, a replica's URL, or "
                "default_transaction_read_only)")

    def metrics(self) -> tuple[bytes, str]:
        """The figures in the Prometheus text format, with the service-wide gauges read now
        (``GET /metrics``). A gauge that cannot be read keeps its last value: the scrape
        itself still answers, and /readyz says what is wrong."""
        try:
            self._telemetry.set_service_gauges(
                trainings=self._repo.count_trainings_by_status(),
                queue_depth=self._queue.pending(), waiting=self._waiting(),
                workers=self._repo.count_workers(now=self._now()))
        except Exception:
            logger.warning("could not read the service's gauges", exc_info=True)
        return self._telemetry.exposition()

    def _waiting(self) -> dict[str, int]:
        """Trainings waiting out an outage now, by reason (``lease.outage_waited``): each is one
        more ``processing`` (or ``queued``) in the count by status, its wait only in its row."""
        now = self._now()
        reasons = Counter(outage_waited(t, now) for t in self._repo.held_trainings(now=now))
        return {reason: reasons[reason] for reason in OUTAGE_WAITS}

    def record_http(self, *, method: str, route: str, status: int, seconds: float) -> None:
        """One HTTP answer (the app's middleware calls this for every request)."""
        self._telemetry.http_request(method=method, route=route, status=status, seconds=seconds)

    def record_error(self, *, code: str) -> None:
        """One error answer of the API, by its code."""
        self._telemetry.api_error(code=code)
