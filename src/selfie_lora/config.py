"""Typed settings (environment variables with the ``SELFIE_LORA_`` prefix).

Nothing here is built at import time: entry points call ``get_settings()`` (cached) or build a
``Settings`` themselves, which is what the tests do.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import quote, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from selfie_lora.domain.accounts import SignInPolicy
from selfie_lora.domain.alerts import CLAIM, MAX_SEND_SECONDS
from selfie_lora.domain.gc import GcPolicy
from selfie_lora.domain.lease import (
    DEFAULT_HEARTBEAT_SECONDS,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RECONCILE_SECONDS,
    LeasePolicy,
)
from selfie_lora.domain.likeness import DEFAULT_GATE_TOLERANCE, DEFAULT_PROBE_COUNT, MAX_PROBES
from selfie_lora.domain.recipes import (
    DEFAULT_REPLICATE_RECIPE,
    DEFAULT_REPLICATE_TRAINER_VERSION,
    RECIPES,
    RepinPolicy,
    base_model_mismatch,
    default_local_trainer_version,
    local_versions_for,
    validate_replicate_model,
    validate_replicate_owner,
    validate_trainer_version,
)
from selfie_lora.domain.storage_url import parse_storage_url
from selfie_lora.domain.webhook_secrets import ALERT_SECRET_SOURCE, webhook_secret_problem
from selfie_lora.errors import ConfigError, InvalidInputError

# httpx and sqlalchemy are imported by the validators that use them (a URL setting that is set):
# at import they cost every command, `selfie-lora --help` included, a few tenths of a second.
if TYPE_CHECKING:
    import httpx

# Replicate's API, SELFIE_LORA_REPLICATE_BASE_URL's default.
REPLICATE_API_URL = "https://api.replicate.com"
# The queue's name in its storage unless SELFIE_LORA_QUEUE_NAME says another.
DEFAULT_QUEUE_NAME = "selfie-lora"
# The SQLite database in HOME (the default deployment's).
DATABASE_FILE = "selfie-lora.db"
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
# SELFIE_LORA_DEVICE's form, checked without torch (importing it costs seconds, and every
# command loads the settings); whether torch sees that device is asked where it is used
# (flux.loader.resolve_device).
_DEVICE = re.compile(r"auto|cpu|cuda|cuda:[0-9]{1,3}|mps")
# The default's name in huey's Redis keys (huey's RedisStorage.clean_name keeps [A-Za-z0-9_]).
_DEFAULT_QUEUE_KEY_NAME = re.sub(r"[^A-Za-z0-9_]", "", DEFAULT_QUEUE_NAME)

# The GC_* settings' upper bounds (README's settings table says them).
GC_MAX_DAYS = 36500
GC_MAX_INTERVAL_HOURS = 8760

# The most trainings one worker runs at once (SELFIE_LORA_WORKER_THREADS, `worker --threads`):
# each is a thread started at once, and an unbounded count (a stray digit, 1e20) held serve and
# worker starting threads for ever, gigabytes deep, deaf to SIGTERM.
MAX_WORKER_THREADS = 256
# The most photos a photo-count limit may name (an upload holds at most 200 files).
MAX_PHOTO_LIMIT = 1000
# The longest SELFIE_LORA_DB_STATEMENT_TIMEOUT and _DB_ANSWER_TIMEOUT (a week): PostgreSQL takes
# a statement_timeout of at most 2^31-1 ms (24.8 days), and refuses every connect that sets more.
DB_MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
# The least a set SELFIE_LORA_DB_ANSWER_TIMEOUT outlasts the statement timeout by: the server's
# cancel of a statement answers after its timer fires and the answer's way back (a round trip,
# a busy server's scheduling), which no millisecond covers (300.001 s was taken).
DB_ANSWER_MIN_MARGIN_S = 1.0

# PostgreSQL's time units for statement_timeout (in milliseconds; a bare number is milliseconds).
_PG_MS_PER_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60_000.0, "h": 3_600_000.0,
                   "d": 86_400_000.0}
# A value as PostgreSQL reads it, where it reads it as we do: no leading zero (strtol reads 010
# as octal), no exponent, a unit (case-sensitive) after optional blanks.
_PG_TIME = re.compile(r"((?:0|[1-9][0-9]*)(?:\.[0-9]+)?)[ \t]*([a-z]*)")


def _pg_split_options(options: str) -> list[str]:
    # The server's pg_split_opts: words split at blanks, a backslash keeps the next character.
    words, word, escaped = [], "", False
    for char in options + " ":
        if escaped:
            word, escaped = word + char, False
        elif char == "\\":
            escaped = True
        elif char.isspace():
            if word:
                words.append(word)
            word = ""
        else:
            word += char
    return words


def url_statement_timeout(url: str | None) -> float | None:
    """The statement_timeout, in seconds, that a PostgreSQL URL's own ``options`` set, or None
    where they set none. libpq hands the server our options and then the URL's, so the URL's
    is the one in effect; read as the server reads them (split at blanks, a backslash keeps the
    next character; ``-c name=value``, ``-cname=value`` or ``--name=value``; names in any case,
    ``-`` for ``_``; the last one wins). ValueError for one this cannot read as the server
    would, or one that is no bound (0) or longer than DB_MAX_TIMEOUT_SECONDS."""
    if not url:
        return None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    options = parsed.query.get("options")
    if parsed.get_backend_name() != "postgresql" or not isinstance(options, str):
        return None
    unread = ValueError("its options' statement_timeout cannot be read here: set "
                        "SELFIE_LORA_DB_STATEMENT_TIMEOUT instead")
    words, value, index = _pg_split_options(options), None, 0
    while index < len(words):
        word = words[index]
        if word == "-c" and index + 1 < len(words):
            setting, index = words[index + 1], index + 2
        elif word.startswith(("-c", "--")):
            setting, index = word[2:], index + 1
        else:  # another switch, or a form the server may read otherwise
            if "statement" in word.lower():
                raise unread
            index += 1
            continue
        name, equals, found = setting.partition("=")
        if name.lower().replace("-", "_") == "statement_timeout":
            if not equals:
                raise unread
            value = found
    if value is None:
        return None
    matched = _PG_TIME.fullmatch(value.strip(" \t"))
    if matched is None or matched[2] not in ("", *_PG_MS_PER_UNIT):
        raise unread
    # Rounded as the server rounds (rint: half to even, as round is).
    ms = round(float(matched[1]) * _PG_MS_PER_UNIT[matched[2] or "ms"])
    if ms == 0:
        raise ValueError("its options' statement_timeout is 0, PostgreSQL's no bound: set "
                         "SELFIE_LORA_DB_STATEMENT_TIMEOUT instead (0.001 to "
                         f"{DB_MAX_TIMEOUT_SECONDS} s), not the URL's")
    if ms > DB_MAX_TIMEOUT_SECONDS * 1000:
        raise ValueError("its options' statement_timeout is over a week, at most "
                         f"{DB_MAX_TIMEOUT_SECONDS} s, as SELFIE_LORA_DB_STATEMENT_TIMEOUT")
    return ms / 1000


# How to make a SELFIE_LORA_SECRET_KEY, said where one is refused.
MAKE_SECRET_KEY = ("set it to 32 or more random characters, the same on every API server "
                   "(python -c 'import secrets; print(secrets.token_urlsafe(48))'), or leave it "
                   "unset on a single server to keep a random one in HOME/secret_key")

# The example settings file's placeholders all hold this (CHANGE-ME-TO-32-..., CHANGE-ME-TOO,
# CHANGE-ME-METRICS-TOKEN, the database URL's password CHANGE-ME): a secret that holds it is one
# anyone who read that public file knows, refused as the settings are read.
PLACEHOLDER = "change-me"
# A metrics token shorter than this is one a client could guess (it opens /metrics and /readyz's
# reasons); token_urlsafe(32) gives 43 characters.
MIN_METRICS_TOKEN = 16
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def is_placeholder(secret: str) -> bool:
    """``secret`` holds the example settings file's placeholder (``PLACEHOLDER``), any case."""
    return PLACEHOLDER in secret.lower()


class Settings(BaseSettings):
    # populate_by_name: code (and tests) pass fields by name even where the environment uses
    # an alias (the AWS variables).
    # hide_input_in_errors: an invalid value must never print the settings (API tokens, storage
    # keys, the secret key) into a terminal or a log.
    # env_ignore_empty: a variable set to nothing (an env file's `SELFIE_LORA_SECRET_KEY=` or
    # `=${UNSET}`) is unset, as a shell user means it, not a value to refuse (a worker does not
    # use the secret key, and an empty one stopped it) or to use (an empty trainer version).
    # allow_inf_nan=False: "inf" (a natural way to type "forever") passed every ge= bound and
    # overflowed the first timedelta or int built from it, with a traceback, after HOME and the
    # databases were made; every number here has a finite upper bound instead.
    model_config = SettingsConfigDict(env_prefix="SELFIE_LORA_", extra="ignore",
                                      populate_by_name=True, hide_input_in_errors=True,
                                      env_ignore_empty=True, allow_inf_nan=False)

    home: Path = Path("./.selfie-lora")
    database_url: str | None = None
    # The most connections each process holds to a PostgreSQL server (SQLite's pool is its
    # own: a connection there costs a file handle, not a server process). Every process of the
    # deployment holds up to this many, so their sum must stay under the server's
    # max_connections; a thread that finds them all taken waits up to DB_POOL_TIMEOUT seconds
    # for one (SQLite's pool too), then its call fails.
    db_pool_size: int = Field(default=15, ge=1, le=1000)
    db_pool_timeout: float = Field(default=30.0, gt=0, le=3600)
    # PostgreSQL: the longest a statement runs before the server cancels it (its
    # statement_timeout; migrations lift it), and how long the client waits for any answer
    # before it drops the connection (unset: DB_STATEMENT_TIMEOUT + 30 s; at least a second
    # more than it, or the client would stop waiting before the server's cancel could
    # answer). No 0 for "no bound": a hung server held every request and worker step for
    # ever; at least a millisecond, PostgreSQL's unit (a shorter one would be rounded down to
    # that 0).
    db_statement_timeout: float = Field(default=300.0, ge=0.001, le=DB_MAX_TIMEOUT_SECONDS)
    db_answer_timeout: float | None = Field(default=None, gt=0, le=DB_MAX_TIMEOUT_SECONDS)
    queue_url: str | None = None
    # Which queue in SELFIE_LORA_QUEUE_URL's storage: deployments that share one Redis database
    # need one each, or each one's workers take the other's messages. The default is the name
    # every release before this one used.
    queue_name: str = DEFAULT_QUEUE_NAME
    trainer: Literal["local", "replicate"] = "local"
    trainer_version: str | None = Field(
        default=None,
        description="The ONE place the trainer version is configured (default per backend).",
    )
    base_model: str = "tiny"
    cache_dir: Path | None = Field(
        default=None, description="Built or downloaded base models (default: HOME/cache)."
    )

    # Blobs (photos, weights, images): unset, files under HOME/blobs; "s3://bucket/prefix",
    # S3-compatible object storage, which every API server and worker of one service shares (each
    # keeps only caches in its own HOME). Endpoint, region and keys come from the usual AWS
    # variables or these settings; a plain-http endpoint (a local server) is allowed by default.
    storage_url: str | None = None
    storage_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SELFIE_LORA_STORAGE_ENDPOINT", "AWS_ENDPOINT_URL_S3",
                                      "AWS_ENDPOINT_URL"))
    storage_region: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SELFIE_LORA_STORAGE_REGION", "AWS_REGION",
                                      "AWS_DEFAULT_REGION"))
    storage_access_key_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SELFIE_LORA_STORAGE_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"))
    storage_secret_access_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("SELFIE_LORA_STORAGE_SECRET_ACCESS_KEY",
                                      "AWS_SECRET_ACCESS_KEY"))
    storage_allow_http: bool | None = None
    # Object storage calls: how long one connect and one request may take, and how long a call
    # goes on retrying (5xx, dropped connections, timeouts). obstore's own defaults (10 retries
    # within 3 minutes) held a thread for ~180 s per call on an endpoint that never answers: a
    # restart waited that long to listen, and every upload or generation held a request thread.
    storage_connect_timeout: float = Field(default=5.0, gt=0, le=600)
    storage_timeout: float = Field(default=30.0, gt=0, le=3600)
    storage_retry_timeout: float = Field(default=15.0, ge=0, le=600)
    storage_max_retries: int = Field(default=3, ge=0, le=20)
    # Each machine keeps copies of the weights it generates with in HOME/blob-cache, the most
    # recently used first, within this many GB (object storage only).
    blob_cache_gb: float = Field(default=20.0, gt=0, le=1_000_000)
    # Weights downloads answer 307 to a presigned URL valid DOWNLOAD_URL_SECONDS (object storage
    # only), so gigabytes do not pass through the API servers.
    download_urls: bool = False
    download_url_seconds: int = Field(default=300, ge=10, le=7 * 24 * 3600)
    # The presigned URL names the file to save (S3's response-content-disposition); false for a
    # storage that refuses that parameter: the file is then saved under the object's name.
    download_url_names: bool = True

    replicate_api_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("REPLICATE_API_TOKEN", "SELFIE_LORA_REPLICATE_API_TOKEN"),
    )
    replicate_owner: str | None = None
    replicate_base_url: str = REPLICATE_API_URL
    replicate_recipe: str = DEFAULT_REPLICATE_RECIPE
    replicate_poll_interval: float = Field(default=5.0, gt=0, le=3600)
    replicate_max_retries: int = Field(default=5, ge=0, le=100)
    replicate_hardware: str = "cpu"
    # Replicate models (owner/name, comma-separated) whose versions a user may re-pin their model
    # to, besides the configured default trainer's: a trainer runs on this account and bills it.
    # NoDecode: the environment gives "a/b,c/d", not the JSON list pydantic-settings expects.
    allowed_trainers: Annotated[tuple[str, ...], NoDecode] = ()
    public_url: str | None = None
    webhook_secret: SecretStr | None = None

    # How the local trainer runs: "process" isolates it in a child process (crash isolation, GPU
    # memory freed on exit); "inline" runs it in the worker thread (tests, to load torch once).
    local_isolation: Literal["process", "inline"] = "process"
    # How the local trainer stores the frozen base transformer on the GPU: auto (from the free
    # memory), bf16 (unquantized), int8 (24 GB cards) or nf4 (16 GB cards). See flux.memory.
    local_memory_mode: Literal["auto", "bf16", "int8", "nf4"] = "auto"
    # Seconds a training child may send nothing (no step, checkpoint or sample) before it is
    # taken as stuck, stopped and its training failed. Generous: loading FLUX.1 from a slow disk
    # and its first step send nothing for minutes. Process isolation only.
    local_stall_seconds: float = Field(default=1800.0, gt=0, le=7 * 24 * 3600)
    device: str = "auto"

    # Generations (services/generation.py) run on GENERATION_THREADS threads of their own, never
    # the server's shared pool (the rest queue there, holding none); a user has at most
    # MAX_GENERATIONS_PER_USER in flight in one process, more are refused with 429. Counted per
    # process: `serve --processes N` lets a user have N times as many.
    max_generations_per_user: int = Field(default=2, ge=1, le=1000)
    generation_threads: int = Field(default=8, ge=1, le=1000)

    # Likeness tracking (see services/quality.py). The gate holds back a new version whose
    # identity score is lower than the active version's by more than the tolerance (a difference
    # of similarities, 0..1); off, every new version is activated at once (and still scored).
    quality_gate: bool = True
    gate_tolerance: float = Field(default=DEFAULT_GATE_TOLERANCE, ge=0.0, le=1.0)
    # Probes per model (fixed when it is made) and their image side (default: the
    # generator's own, 64 px for tiny and 1024 for FLUX.1; 512 is faster and enough for faces).
    probe_count: int = Field(default=DEFAULT_PROBE_COUNT, ge=1, le=MAX_PROBES)
    probe_size: int | None = Field(default=None, ge=64, le=2048)
    # Where a held-back version is reported (POST, JSON); unset, it is recorded and logged only.
    # ALERT_TIMEOUT: seconds one POST may take in all, at most MAX_SEND_SECONDS so that a send
    # ends well within the sender's claim on the alert (domain.alerts). The URL is a secret: a
    # Slack or Discord hook's path is its credential (SecretStr keeps it out of reprs and logs).
    alert_url: SecretStr | None = None
    alert_timeout: float = Field(default=5.0, gt=0)
    # Set (whsec_..., as WEBHOOK_SECRET): each alert is signed as a Standard Webhook, for a
    # receiver to tell it from a forged one and drop a repeat by its webhook-id.
    alert_secret: SecretStr | None = None

    # Logs: plain text, or JSON lines (one object a line, with the training id on every line
    # about a training) for a log collector.
    log_format: Literal["text", "json"] = "text"
    # `selfie-lora worker` answers GET /metrics (Prometheus) and /healthz on this port, on
    # METRICS_HOST; unset, it serves none (an API server always has /metrics).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # Set: GET /metrics needs "Authorization: Bearer <token>" (otherwise keep it off the public
    # side of the proxy).
    metrics_token: SecretStr | None = None

    worker_threads: int = Field(default=2, ge=1, le=MAX_WORKER_THREADS)
    # Leases (domain/lease.py): a running training's worker renews its lease every
    # HEARTBEAT_SECONDS; another worker may take the training over once LEASE_SECONDS pass
    # without one. Shorter means faster recovery from a dead worker, at one database write per
    # running training per heartbeat. Workers look for orphans every RECONCILE_SECONDS, and a
    # training whose workers died MAX_ATTEMPTS times is failed.
    heartbeat_seconds: float = Field(default=DEFAULT_HEARTBEAT_SECONDS, gt=0, le=300)
    lease_seconds: float = Field(default=DEFAULT_LEASE_SECONDS, gt=0, le=3600)
    reconcile_seconds: float = Field(default=DEFAULT_RECONCILE_SECONDS, gt=0, le=3600)
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=100)
    # The most this machine's clock may differ from the database's (services/clock.py): the
    # times shared across machines are each written on one machine's clock and compared on
    # another's. Checked at the start of every command that opens a PostgreSQL database and at
    # every reconciler round; 0 turns the check off. Under the lease's and three heartbeats'
    # margins (15 s by default), so a skew is caught before it takes a live training over.
    max_clock_skew_seconds: float = Field(default=10.0, ge=0, le=3600)
    # HTTP clients: the request headers must arrive within HEADER_TIMEOUT seconds, and a body
    # must not stall for BODY_TIMEOUT seconds nor average less than MIN_BODY_RATE bytes/s (after
    # its first BODY_TIMEOUT seconds). JSON bodies are at most MAX_JSON_BYTES.
    header_timeout: float = Field(default=10.0, gt=0, le=600)
    body_timeout: float = Field(default=30.0, gt=0, le=3600)
    min_body_rate: int = Field(default=1024, ge=0, le=1024**3)
    max_json_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    max_upload_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    # The addresses (IPs or networks, comma-separated; "*" for any) whose X-Forwarded-For and
    # X-Forwarded-Proto the API server believes: its TLS proxy's. Unset: uvicorn's own
    # FORWARDED_ALLOW_IPS, else 127.0.0.1 and ::1 only. A proxy elsewhere (Docker's gateway, a
    # load balancer) left out made every browser the proxy's address for the sign-in limits.
    # uvicorn's own FORWARDED_ALLOW_IPS is read here too (the README named it first), so that a
    # typo there is refused as one here is, not taken as a literal no client address equals.
    forwarded_allow_ips: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SELFIE_LORA_FORWARDED_ALLOW_IPS", "FORWARDED_ALLOW_IPS"))
    # Hard limits on usable photos (15-25 is best; fewer or more only warn within these).
    min_photos: int = Field(default=5, ge=1, le=MAX_PHOTO_LIMIT)
    max_photos: int = Field(default=50, ge=1, le=MAX_PHOTO_LIMIT)
    # Uploads are judged on two processes (dlib holds the GIL); 1 runs inline.
    intake_workers: int = Field(default=2, ge=1, le=16)
    # Whether a server starts its photo-analysis processes at its start (serve, each process of
    # serve --processes N), so the first upload does not wait for them: ~1 s of CPU and two
    # processes' memory (dlib, ONNX Runtime) spent whether or not an upload comes. false: they
    # start at the first upload instead (a small box, an API server that takes no uploads).
    intake_warm_up: bool = True
    # Originals (with their metadata) are kept only when the operator asks for it.
    keep_originals: bool = False
    # Face alignment for the photo checks and likeness scores: dlib's 5-point model (public
    # domain) by default; true loads its 68-point model instead, trained on iBUG 300-W, whose
    # terms forbid commercial use. Pose, cut-off and skin checks are a little better with it
    # (README: "Photo checks, measured"); scores of one model are never compared with the other's.
    face_landmarks_68_noncommercial: bool = False

    # The web app. SECRET_KEY signs the session cookies: every API server of one service needs the
    # same one (unset: a random key kept in HOME/secret_key). SIGNUP lets anyone create an
    # account from the sign-in page. Sign-in allows SIGN_IN_MAX_FAILURES failures per name (and
    # 4x that per client address) per SIGN_IN_WINDOW_MINUTES, sign-up SIGN_UP_MAX_ATTEMPTS
    # attempts per client address (made or refused alike) in the same window; a session lasts
    # SESSION_DAYS.
    secret_key: SecretStr | None = None
    signup: bool = False
    session_days: float = Field(default=14.0, gt=0, le=366)
    sign_in_max_failures: int = Field(default=5, ge=1, le=1000)
    sign_in_window_minutes: float = Field(default=15.0, gt=0, le=24 * 60)
    sign_up_max_attempts: int = Field(default=5, ge=1, le=1000)
    # How often the Train page asks for a running training's figures (seconds): once a second
    # is what a person watching needs; the browser tests set less, where a test waits for a
    # number of polls or for one that shows a change.
    page_poll_seconds: float = Field(default=1.0, ge=0.1, le=60)
    # How long a rotated API key keeps working, so that a client that lost the rotation's answer
    # can ask again with it (0: it stops at once; revoking a key always stops it at once).
    key_rotation_grace_minutes: float = Field(default=10.0, ge=0, le=24 * 60)

    # Garbage collection (services/gc.py): `selfie-lora gc`, and the workers every
    # GC_INTERVAL_HOURS (one at a time, through a lease in the database; 0: workers never
    # collect). Photos uploaded but never trained are kept GC_DATASET_DAYS, long enough for a
    # user who uploaded without training to come back and start one (0: forever). Generated
    # pictures are the user's, so they are kept forever unless GC_GENERATION_DAYS says otherwise.
    # A blob no row refers to is deleted only once GC_GRACE_HOURS old, because uploads, trainings
    # and generations write their blobs before the rows that refer to them (at least an hour:
    # the slowest of those writes must have committed its row by then).
    # At most a century (days) or a year between collections: beyond, timedelta overflowed; 0
    # is how "forever" / "never" is said.
    gc_dataset_days: float = Field(default=7.0, ge=0, le=GC_MAX_DAYS)
    gc_generation_days: float | None = Field(default=None, ge=0, le=GC_MAX_DAYS)
    gc_grace_hours: float = Field(default=24.0, ge=1, le=GC_MAX_DAYS * 24)
    gc_interval_hours: float = Field(default=6.0, ge=0, le=GC_MAX_INTERVAL_HOURS)

    @field_validator("alert_timeout")
    @classmethod
    def _alert_send_fits_its_claim(cls, value: float) -> float:
        if value > MAX_SEND_SECONDS:
            raise ValueError(
                f"SELFIE_LORA_ALERT_TIMEOUT is at most {MAX_SEND_SECONDS:g} seconds: a sender "
                f"holds an alert for {CLAIM.total_seconds() / 60:g} minutes, and a send that "
                "outlasted that would run alongside another process's send of the same alert")
        return value

    # The URL checks below run when the settings are read, so that one that cannot work stops
    # every command in one line naming the variable, before anything is built on it; none of
    # them repeats the value (a URL may hold a password).
    @field_validator("database_url")
    @classmethod
    def _database_url_parses(cls, value: str | None) -> str | None:
        if value:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                make_url(value)
            except (ArgumentError, ValueError):  # ValueError: a port that is not a number
                raise ValueError("is not a database URL: dialect+driver://user:password@host:"
                                 "port/database, e.g. postgresql+psycopg://...") from None
            # The example file's password (CHANGE-ME), which compose.yaml gave PostgreSQL too.
            password = make_url(value).password
            if password is not None and is_placeholder(str(password)):
                raise ValueError("its password is a placeholder: set one of your own (with "
                                 f"deploy/compose.yaml, before the first start: {MAKE_TOKEN})")
            # Its own statement_timeout is the one in effect: the answer timeout follows it.
            url_statement_timeout(value)
        return value

    @field_validator("queue_url")
    @classmethod
    def _queue_url_is_known(cls, value: str | None) -> str | None:
        # The schemes adapters.queue builds a queue for, in the forms it reads. The scheme alone
        # let through redis://host/abc (redis-py then uses database 0, which another deployment
        # may use), redis:/host (refused only once HOME and its database were made),
        # sqlite:///:memory: (a queue of its own in each process: no training ever reached a
        # worker) and sqlite:// (a folder named 'sqlite:' in the current one).
        if not value:
            return value
        form = ("must be unset (a SQLite file in HOME), sqlite:///path or "
                "redis://host[:port]/db (rediss:// with TLS)")
        parts = urlsplit(value)
        if parts.scheme == "sqlite":
            path = value.removeprefix("sqlite:///") if value.startswith("sqlite:///") else ""
            if not path:
                raise ValueError(f"{form}; a sqlite URL names no file (sqlite:///path)")
            if path == ":memory:" or path.startswith("file::memory:"):
                raise ValueError(f"{form}; an in-memory SQLite queue is one per process, which "
                                 "no worker sees")
            return value
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(form)
        try:
            parts.port  # noqa: B018 - raises ValueError when the port is not 0-65535
        except ValueError:
            raise ValueError(f"{form}; its port is not a number 0-65535") from None
        if not parts.hostname:
            raise ValueError(f"{form}; it names no host")
        database = parts.path.removeprefix("/")
        if database.isdecimal() and not database.isascii():
            # isdecimal() takes any script's digits, and redis-py reads redis://h/\u0661
            # (Arabic-Indic 1) as database 1: a form no one means, refused as the rest of
            # the tree refuses such numbers.
            raise ValueError(f"{form}; its database is not a number in ASCII digits "
                             "(redis://host:6379/0)")
        if database and not database.isdecimal():
            raise ValueError(f"{form}; its database is not a number (redis://host:6379/0), and "
                             "Redis would use database 0 instead")
        return value

    @field_validator("queue_name")
    @classmethod
    def _queue_name_is_a_word(cls, value: str) -> str:
        # huey's Redis storage drops every other character from the name it is given, so
        # 'prod-a' and 'proda' would be one queue there; the default keeps its '-' (every
        # release had it), so 'selfielora' is its queue there and is refused too.
        if value == DEFAULT_QUEUE_NAME:
            return value
        if not _QUEUE_NAME.fullmatch(value):
            raise ValueError("must be 1-64 letters, digits or '_'")
        if value == _DEFAULT_QUEUE_KEY_NAME:
            raise ValueError(f"is the default {DEFAULT_QUEUE_NAME!r} in Redis, where '-' is "
                             "dropped: leave it unset for that queue, or choose another name")
        return value

    @field_validator("device")
    @classmethod
    def _device_is_one_torch_names(cls, value: str) -> str:
        # Unchecked, a typo failed the user's training ("local training failed: RuntimeError")
        # and answered generations with a 500 and a traceback.
        if not _DEVICE.fullmatch(value):
            raise ValueError("must be auto, cpu, cuda, cuda:N (N the GPU's index) or mps, "
                             f"not {value!r}")
        return value

    @field_validator("base_model")
    @classmethod
    def _base_model_is_not_a_tiny_look_alike(cls, value: str) -> str:
        # Anything but exactly 'tiny' is taken as a FLUX.1 folder, and every model made then is
        # pinned to a FLUX.1 recipe: 'Tiny' or 'tiny ' (an env file's space) did that in
        # silence. Whether a folder is there is asked where trainers are built (a warning: API
        # servers may share GPU workers' settings without their folder).
        if value != "tiny" and value.strip().lower() in ("tiny", ""):
            raise ValueError("must be exactly tiny (lowercase, no spaces) or the path of a "
                             "FLUX.1 diffusers folder")
        return value

    @field_validator("home")
    @classmethod
    def _home_can_be_looked_at(cls, value: Path) -> Path:
        # A name longer than the file system takes (or a folder above it this user may not
        # read) made every command die with a traceback at its first look (OSError: File name
        # too long, from missing_database's exists()). A file in the way is said later, by each
        # command, more precisely.
        _setting_in_the_way(value)
        return value

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_can_be_a_folder(cls, value: Path | None) -> Path | None:
        # A file there (or above) started serve, and each model and face-model download then
        # warned 'Not a directory' without naming this setting.
        in_the_way = _setting_in_the_way(value) if value is not None else None
        if in_the_way is not None:
            raise ValueError(f"{in_the_way} is a file, not a folder; name a folder")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url_is_absolute(cls, value: str | None) -> str | None:
        # Replicate is sent <PUBLIC_URL>/api/webhooks/replicate: one without a scheme or host
        # (example.com) made every training's create fail at Replicate, not here.
        # Nor one with a port out of range, a space or a host that is none; and a query,
        # fragment or user:password would have the webhook path appended after them.
        if value:
            form = "must be the service's address as others reach it: https://host[:port][/path]"
            url = _http_url(value, form=form)
            # The raw text too: httpx reads a bare trailing "?" or "#" as an empty query or
            # fragment, and the webhook path was then appended after it.
            if url.query or url.fragment or url.userinfo or "?" in value or "#" in value:
                raise ValueError(f"{form}; it holds a query (?...), a fragment (#...) or "
                                 "user:password@")
        return value

    @field_validator("replicate_base_url")
    @classmethod
    def _replicate_base_url_is_http(cls, value: str) -> str:
        if value == REPLICATE_API_URL:
            return value  # the default (tests/unit/test_cli_imports.py): no httpx per start
        # Every Replicate call goes there: one without a scheme (api.replicate.com), of another
        # scheme or with a port out of range started serve and worker and failed each call.
        _http_url(value, form="must be Replicate's API address: https://api.replicate.com (or "
                              "a stand-in's http(s)://host[:port])")
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _forwarded_allow_ips_are_addresses(cls, value: str | None) -> str | None:
        # uvicorn takes a malformed entry as a literal that no client address ever equals: a
        # typo trusted nobody, silently.
        if not value:
            return None
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        if entries == ["*"]:
            return "*"
        for entry in entries:
            try:
                if "/" in entry:
                    ipaddress.ip_network(entry)  # strict, as uvicorn reads it: no host bits
                else:
                    ipaddress.ip_address(entry)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network: the addresses "
                                 "the TLS proxy connects from, comma-separated "
                                 "(10.0.0.5,172.16.0.0/12), or * for any (read from this "
                                 "variable, else from uvicorn's FORWARDED_ALLOW_IPS)") from None
        return ",".join(entries)

    @field_validator("alert_url")
    @classmethod
    def _alert_url_is_http(cls, value: SecretStr | None) -> SecretStr | None:
        # Every held version's alert is POSTed here: one without a scheme (hooks.slack.com/...),
        # of another scheme or that httpx cannot read failed each delivery, ten times over four
        # hours, seen only in warnings and in the users' "could not be sent".
        if value is None or not value.get_secret_value():
            return value  # unset: alerts are recorded and logged only
        _http_url(value.get_secret_value(),
                  form="must be where alerts are POSTed: https://host[:port]/path (or http://)")
        return value

    @field_validator("allowed_trainers", mode="before")
    @classmethod
    def _allowed_trainers_are_models(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple):
            return value  # pydantic says what is wrong with it
        models = []
        for item in value:
            if not isinstance(item, str):
                return value
            if not item.strip():
                continue  # "a/b," or an empty variable: nothing more allowed
            try:
                models.append(validate_replicate_model(item))
            except InvalidInputError as exc:
                raise ValueError(f"{exc.message} (a comma-separated list of owner/name)") from None
        return tuple(models)

    @field_validator("replicate_recipe")
    @classmethod
    def _replicate_recipe_is_known(cls, value: str) -> str:
        # Read at every Replicate upload and training (recipe_for): an unknown name failed each
        # of them, and a local recipe's steps and resolution were sent to Replicate's trainer.
        known = sorted(name for name in RECIPES if name.startswith("replicate-"))
        if value not in known:
            raise ValueError(f"must be a Replicate recipe: {', '.join(known)}")
        return value

    @field_validator("replicate_owner")
    @classmethod
    def _replicate_owner_is_an_account(cls, value: str | None) -> str | None:
        # Formatted as it is into each new model's destination (domain.plan.destination_for),
        # pinned for good: 'My Org', 'me/you' or an env file's trailing space made destinations
        # Replicate refuses, failing every training of those models for ever.
        if value is None:
            return value
        try:
            return validate_replicate_owner(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None

    @field_validator("secret_key")
    @classmethod
    def _secret_key_is_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # Said here, not when the web app first signs a cookie: `serve` stopped with a
        # traceback after it had opened the database.
        if value is None:
            return value
        if len(value.get_secret_value()) < 32:
            raise ValueError(f"must be at least 32 characters: {MAKE_SECRET_KEY}")
        # The settings file's example (CHANGE-ME-TO-32-OR-MORE-RANDOM-CHARACTERS) is long
        # enough, and every copy of it signed cookies with a key anyone can read.
        if is_placeholder(value.get_secret_value()):
            raise ValueError(f"is a placeholder, not a key: {MAKE_SECRET_KEY}")
        return value

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token_is_a_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # The example file's CHANGE-ME-METRICS-TOKEN, or "x", opened /metrics and /readyz's
        # reasons to anyone who read that file or tried a few (the secret key's rule, and a
        # length a client cannot guess).
        if value is None:
            return value
        if is_placeholder(value.get_secret_value()):
            raise ValueError(f"is a placeholder, not a token: set it to {MIN_METRICS_TOKEN} or "
                             f"more random characters ({MAKE_TOKEN})")
        if len(value.get_secret_value()) < MIN_METRICS_TOKEN:
            raise ValueError(f"must be at least {MIN_METRICS_TOKEN} characters: {MAKE_TOKEN}")
        return value

    @field_validator("storage_secret_access_key")
    @classmethod
    def _storage_secret_is_not_the_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        # The example file's CHANGE-ME-TOO was the secret of the Admin identity deploy/ shipped:
        # storage published for downloads gave every face and weights to anyone.
        if value is not None and is_placeholder(value.get_secret_value()):
            # Named as the file sets it too: the line names the setting, not its alias.
            raise ValueError("is a placeholder, not a key (AWS_SECRET_ACCESS_KEY in the example "
                             "settings file): set it to the storage's own secret "
                             f"(for deploy/compose.yaml's SeaweedFS, one you choose: {MAKE_TOKEN})")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_is_a_signing_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Here, not at the first delivery: a malformed one failed every signature (401s that
        # only Replicate's retry log showed).
        problem = webhook_secret_problem(value.get_secret_value()) if value is not None else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("alert_secret")
    @classmethod
    def _alert_secret_is_a_signing_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Here, as WEBHOOK_SECRET: standardwebhooks takes a malformed one leniently (what is not
        # base64 dropped) as some other, shorter key, which a receiver in another language
        # decodes otherwise or refuses: every alert then fails its signature there.
        problem = (webhook_secret_problem(value.get_secret_value(), source=ALERT_SECRET_SOURCE)
                   if value is not None else None)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_url_is_s3(cls, value: str | None) -> str | None:
        # The store reads it the same way (S3Location.parse): what passes here never fails
        # there, and a key put in the URL is refused before it is sent or printed.
        if value is not None:
            parse_storage_url(value)
        return value

    @model_validator(mode="after")
    def _trainer_version_fits_the_backend(self) -> Settings:
        # A new model (made by its user's first upload or start) pins this for good: one the
        # trainer would refuse must stop the process now (as a re-pin to it would be refused),
        # not fail every training of every new model later.
        if self.trainer_version:
            try:
                self.trainer_version = validate_trainer_version(
                    backend=self.trainer, trainer_version=self.trainer_version)
            except InvalidInputError as exc:
                raise ValueError(f"SELFIE_LORA_TRAINER_VERSION (trainer {self.trainer}): "
                                 f"{exc.message}") from None
            # A tiny recipe on a real FLUX.1 (or the reverse) would be pinned on every new
            # model, each then refused at its start (TrainingService.start).
            mismatch = (base_model_mismatch(trainer_version=self.trainer_version,
                                             base_model=self.base_model)
                        if self.trainer == "local" else None)
            if mismatch is not None:
                raise ValueError(
                    f"SELFIE_LORA_TRAINER_VERSION: {self.trainer_version} is {mismatch} "
                    "(SELFIE_LORA_BASE_MODEL): use "
                    f"{' or '.join(local_versions_for(self.base_model))}, or leave it unset")
        return self

    @model_validator(mode="after")
    def _replicate_has_an_owner(self) -> Settings:
        # The owner goes into the destination a new model is given when it is made, and
        # that destination is pinned for good: a made-up one (an account the operator does not
        # own) would fail every training of that model for ever, not just this process.
        if self.trainer == "replicate" and not self.replicate_owner:
            raise ValueError("SELFIE_LORA_TRAINER=replicate needs SELFIE_LORA_REPLICATE_OWNER: "
                             "the Replicate account (user or organisation) that owns the "
                             "users' destination models")
        return self

    @model_validator(mode="after")
    def _photo_limits_leave_a_trainable_set(self) -> Settings:
        # Otherwise every set is refused, one way or the other, only once it is uploaded.
        if self.min_photos > self.max_photos:
            raise ValueError(f"SELFIE_LORA_MIN_PHOTOS ({self.min_photos}) is more than "
                             f"SELFIE_LORA_MAX_PHOTOS ({self.max_photos}): no set of photos "
                             "could be trained on")
        return self

    @model_validator(mode="after")
    def _answer_outlasts_the_statement(self) -> Settings:
        # An answer timeout within the statement's: every statement slower than it would lose
        # its connection ("no answer from the server") instead of getting PostgreSQL's cancel.
        statement = self.db_statement_timeout_in_effect
        if (self.db_answer_timeout is not None
                and self.db_answer_timeout < statement + DB_ANSWER_MIN_MARGIN_S):
            named = ("SELFIE_LORA_DB_STATEMENT_TIMEOUT"
                     if url_statement_timeout(self.database_url) is None
                     else "the statement_timeout in SELFIE_LORA_DATABASE_URL's options")
            raise ValueError(f"SELFIE_LORA_DB_ANSWER_TIMEOUT ({self.db_answer_timeout:g}) must "
                             f"be at least {DB_ANSWER_MIN_MARGIN_S:g} s more than {named} "
                             f"({statement:g}): the client would stop waiting before the "
                             "server cancels a statement that runs too long")
        return self

    @model_validator(mode="after")
    def _lease_fits_heartbeats(self) -> Settings:
        try:
            self.lease_policy  # noqa: B018 - raises ValueError when the lease is under 2 beats
        except ValueError as exc:  # said in the variables' names, which the user sets
            raise ValueError(f"SELFIE_LORA_LEASE_SECONDS ({self.lease_seconds:g}) and "
                             f"SELFIE_LORA_HEARTBEAT_SECONDS ({self.heartbeat_seconds:g}): "
                             f"{exc}") from None
        return self

    @property
    def lease_policy(self) -> LeasePolicy:
        return LeasePolicy(ttl=timedelta(seconds=self.lease_seconds),
                           heartbeat=timedelta(seconds=self.heartbeat_seconds),
                           max_attempts=self.max_attempts)

    @property
    def gc_policy(self) -> GcPolicy:
        return GcPolicy(
            grace=timedelta(hours=self.gc_grace_hours),
            dataset_age=timedelta(days=self.gc_dataset_days) if self.gc_dataset_days else None,
            generation_age=(timedelta(days=self.gc_generation_days)
                            if self.gc_generation_days else None))

    @property
    def key_rotation_grace(self) -> timedelta:
        return timedelta(minutes=self.key_rotation_grace_minutes)

    @property
    def gc_interval(self) -> timedelta | None:
        return timedelta(hours=self.gc_interval_hours) if self.gc_interval_hours else None

    @property
    def sign_in_policy(self) -> SignInPolicy:
        return SignInPolicy(max_failures=self.sign_in_max_failures,
                            max_failures_per_client=4 * self.sign_in_max_failures,
                            max_sign_ups_per_client=self.sign_up_max_attempts,
                            window=timedelta(minutes=self.sign_in_window_minutes),
                            session_lifetime=timedelta(days=self.session_days))

    @property
    def public_url_base(self) -> str:
        """What the URLs of answers start with: SELFIE_LORA_PUBLIC_URL (the service's address as
        clients reach it) without its trailing slash, so they are absolute; unset, nothing, and
        they are paths on this service. Never the request's Host header: anyone can send one,
        and a forged Host would make the answer point clients (and their API key) elsewhere."""
        return self.public_url.rstrip("/") if self.public_url else ""

    @property
    def root_path(self) -> str:
        """The prefix the service is reached under, from SELFIE_LORA_PUBLIC_URL's path
        (``https://example.com/sl``: ``/sl``; none: nothing): the server's ASGI root path, for a
        proxy that serves the app under it and strips it on the way in. Percent-encoded, as a
        browser sends it: uvicorn writes the root path in ASCII (``/sélfie`` dropped every
        request); one encoded already is kept as it is."""
        if not self.public_url:
            return ""
        return quote(urlsplit(self.public_url).path.rstrip("/"), safe="/:@!$&'()*+,;=%")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / DATABASE_FILE).resolve()}"

    @property
    def db_statement_timeout_in_effect(self) -> float:
        """PostgreSQL's statement_timeout, in seconds: the URL's own options' (which libpq puts
        after ours, so it wins) or SELFIE_LORA_DB_STATEMENT_TIMEOUT. The client's answer timeout
        must outlast this one, not the setting."""
        own = url_statement_timeout(self.database_url)
        return own if own is not None else self.db_statement_timeout

    def missing_database(self) -> str | None:
        """Why there is no data here to read: the SQLite database in HOME is not there (a
        mistyped SELFIE_LORA_HOME, a command run from another folder). None when it is, or with
        SELFIE_LORA_DATABASE_URL (a server's database is never made by a command)."""
        if self.database_url is None and not (self.home / DATABASE_FILE).exists():
            return f"no database in {self.home} (SELFIE_LORA_HOME)"
        return None

    @property
    def effective_queue_url(self) -> str:
        return self.queue_url or f"sqlite:///{(self.home / 'queue.db').resolve()}"

    @property
    def effective_trainer_version(self) -> str:
        if self.trainer_version:
            return self.trainer_version
        if self.trainer == "replicate":
            return DEFAULT_REPLICATE_TRAINER_VERSION
        return default_local_trainer_version(self.base_model)

    @property
    def repin_policy(self) -> RepinPolicy:
        """Which trainer versions a user may re-pin to: versions of the configured Replicate
        trainer model (the built-in default's when this service trains locally) and of
        ALLOWED_TRAINERS; local recipes made for BASE_MODEL."""
        default = (self.effective_trainer_version if self.trainer == "replicate"
                   else DEFAULT_REPLICATE_TRAINER_VERSION)
        return RepinPolicy.of(default_trainer_version=default, allowed=self.allowed_trainers,
                              base_model=self.base_model)

    @property
    def destination_owner(self) -> str:
        if self.trainer == "replicate" and self.replicate_owner:  # always, once validated
            return self.replicate_owner
        return "local"

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def blob_cache_dir(self) -> Path:
        """Copies of remote blobs this process needs as files (weights for the generator)."""
        return self.home / "blob-cache"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def model_cache_dir(self) -> Path:
        return self.cache_dir or self.home / "cache"


class EmbeddedSettings(Settings):
    """Settings from code alone: no environment variable (nor .env or secrets file) is read. The
    demo runs on these: it is offline on the embedded defaults whatever the operator's
    environment says, so it never writes to their bucket (SELFIE_LORA_STORAGE_URL), posts to
    their alert hook (SELFIE_LORA_ALERT_URL) or fails on a setting it does not use."""

    @classmethod
    def settings_customise_sources(  # pydantic-settings passes every source by name
        cls,
        settings_cls: type[BaseSettings],  # noqa: ARG003
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


# A DNS name as httpx sends it (IDNA-encoded): labels of letters, digits, '-' (and '_', which
# internal names use), dot-separated.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def file_in_the_way(path: Path) -> Path | None:
    """``path`` or the nearest of its parents that exists, when that is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def _setting_in_the_way(path: Path) -> Path | None:
    """``file_in_the_way`` for a folder setting's validator: where looking fails (a folder above
    it this user may not read, a name too long), a ValueError that names the cause, which the
    settings error shows, instead of the OSError's traceback."""
    try:
        return file_in_the_way(path)
    except OSError as exc:
        raise ValueError(f"cannot be checked ({exc.strerror or exc}); name a folder this user "
                         "can write") from None


def _http_url(value: str, *, form: str) -> httpx.URL:
    """``value`` as httpx reads it, when it is an http(s) URL that can be reached: ValueError
    saying ``form`` (and what is wrong, never the URL, which may hold a secret) otherwise."""
    import httpx

    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError, ValueError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ValueError(form)
    # httpx takes these and every call then fails (a connect error) instead of the settings
    # saying so.
    if any(char.isspace() for char in value):
        raise ValueError(f"{form}; it holds a space or other whitespace")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"{form}; its port is not 1-65535")
    if not _is_host(url.raw_host.decode("ascii", "replace")):
        raise ValueError(f"{form}; its host is not a host name or IP address")
    return url


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return len(host) <= 253 and _HOST_NAME.fullmatch(host) is not None
    return True


def settings_errors(exc: ValidationError) -> list[str]:
    """One line per invalid setting, ``VARIABLE: message``, naming the environment variable and
    never its value (it may be a secret)."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        loc = error.get("loc", ())
        if loc and isinstance(loc[0], str):
            name = loc[0] if loc[0].isupper() else f"SELFIE_LORA_{loc[0].upper()}"
            lines.append(f"{name}: {message}")
        else:  # a check across settings names the variables in its message
            lines.append(message)
    return lines


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
