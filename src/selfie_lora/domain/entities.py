"""Entities of selfie-lora, as immutable values. Persistence maps them to rows."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any


class TrainingStatus(enum.StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def is_active(self) -> bool:
        """Queued or running: occupies the model's one training slot."""
        return not self.is_terminal


TERMINAL_STATUSES = frozenset(
    {TrainingStatus.SUCCEEDED, TrainingStatus.FAILED, TrainingStatus.CANCELED}
)
ACTIVE_STATUSES = frozenset(set(TrainingStatus) - TERMINAL_STATUSES)


class GateStatus(enum.StrEnum):
    """Whether a new version may replace the active one (the likeness gate).

    ``pending``: stored, being scored; ``passed``: activated (or the first version); ``held``:
    kept but not activated because its likeness dropped or it could not be scored."""

    PENDING = "pending"
    PASSED = "passed"
    HELD = "held"


@dataclass(frozen=True)
class Probe:
    """One fixed test prompt (it holds the trigger word) and seed. A model's probes are chosen
    when it is made and every version of it is judged on exactly these."""

    index: int
    prompt: str
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": self.prompt, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Probe:
        return cls(index=int(data["index"]), prompt=str(data["prompt"]), seed=int(data["seed"]))


@dataclass(frozen=True)
class User:
    id: str
    name: str
    created_at: datetime
    # When the operator disabled it: its keys and sessions are refused, its data kept.
    disabled_at: datetime | None = None
    # When its deletion was asked for (it is disabled too): finished by a later collection if
    # the process that began it died.
    erasure_requested_at: datetime | None = None


@dataclass(frozen=True)
class UserSummary:
    """A line of ``selfie-lora users list``."""

    user: User
    keys: int  # API keys that work now
    has_password: bool


@dataclass(frozen=True)
class ApiKey:
    """One of a user's API keys. Only its SHA-256 is stored; ``prefix`` (the first characters)
    tells a user's keys apart in a list.

    ``revoked_at`` is when it stops (or stopped) working: a revoked key's is when it was revoked;
    a rotated key's (``replaced_by``: the key that replaced it) may lie ahead, the end of the
    rotation's grace, during which it still works."""

    id: str
    user_id: str
    name: str
    key_hash: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None
    replaced_by: str | None = None
    # The SHA-256 of the settings page form's one-time nonce that made it (None: made otherwise).
    form_nonce_hash: str | None = None

    def works_at(self, now: datetime) -> bool:
        return self.revoked_at is None or self.revoked_at > now

    def in_grace_at(self, now: datetime) -> bool:
        """Rotated, and still working until ``revoked_at``."""
        return self.replaced_by is not None and self.works_at(now) and self.revoked_at is not None


@dataclass(frozen=True)
class WebSession:
    """A signed-in browser. The cookie carries a random token; only its SHA-256 (``id``) is
    stored. ``csrf_token`` is what every form of this session must send back."""

    id: str
    user_id: str
    csrf_token: str
    created_at: datetime
    expires_at: datetime


# The quality knobs' values (see Recipe). The first of each is what the v1 recipes did.
# The origin of a gallery cursor's microseconds (``GenerationPosition.cursor``).
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

TIMESTEP_SAMPLINGS = ("sigmoid", "flux_shift")
LORA_TARGET_SETS = ("attention", "all_linear")


@dataclass(frozen=True)
class Recipe:
    """A named set of training hyper-parameters, stored with every training.

    The quality knobs after ``checkpoint_every`` default to what the ``local-*-v1`` recipes did,
    and :meth:`as_dict` leaves a knob out while it has its default: a recipe stored before the knob
    existed reads back as what it trained with, and its checkpoints still match it.
    """

    name: str
    steps: int
    lora_rank: int
    learning_rate: float
    resolution: int
    batch_size: int = 1
    seed: int = 0
    # None: alpha = rank (a LoRA scale of 1 means the LoRA as trained).
    lora_alpha: int | None = None
    # Save a resumable checkpoint every this many optimizer steps (0: never). Stored recipes
    # from before checkpoints lack it and read back as 0.
    checkpoint_every: int = 0
    # How training timesteps are drawn: "sigmoid" (logit-normal) or "flux_shift" (logit-normal
    # shifted towards noise by FLUX's resolution-dependent shift, as its sampler does).
    timestep_sampling: str = "sigmoid"
    # Which linear layers get a LoRA: "attention" (the attention projections of both block kinds)
    # or "all_linear" (every linear of both streams: attention, MLPs, modulation).
    lora_targets: str = "attention"
    # Photos keep their own aspect ratio (the nearest of a few buckets at about resolution**2
    # pixels) instead of one square crop.
    aspect_buckets: bool = False
    # The loss weight of pixels inside each photo's face box (1: an unweighted loss).
    face_loss_weight: float = 1.0
    # Generate a sample image with the LoRA so far every this many steps (0: never).
    sample_every: int = 0

    def __post_init__(self) -> None:
        # Recipes are written in code or read from storage: a wrong value is a programming error.
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"recipe {self.name}: timestep_sampling {self.timestep_sampling!r} "
                             f"is not one of {TIMESTEP_SAMPLINGS}")
        if self.lora_targets not in LORA_TARGET_SETS:
            raise ValueError(f"recipe {self.name}: lora_targets {self.lora_targets!r} "
                             f"is not one of {LORA_TARGET_SETS}")
        if self.face_loss_weight < 1.0 or self.sample_every < 0:
            raise ValueError(f"recipe {self.name}: face_loss_weight must be >= 1 and "
                             "sample_every >= 0")

    @property
    def alpha(self) -> float:
        """The LoRA alpha trained with: ``lora_alpha``, else the rank."""
        return float(self.lora_rank) if self.lora_alpha is None else float(self.lora_alpha)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "steps": self.steps,
            "lora_rank": self.lora_rank,
            "learning_rate": self.learning_rate,
            "resolution": self.resolution,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "checkpoint_every": self.checkpoint_every,
        }
        if self.lora_alpha is not None:  # absent when alpha = rank: stored recipes stay as they were
            data["lora_alpha"] = self.lora_alpha
        for key, default in _KNOB_DEFAULTS.items():
            value = getattr(self, key)
            if value != default:
                data[key] = value
        return data

    def values(self) -> dict[str, Any]:
        """Every value the recipe trains with, the knobs at their defaults included (what a version
        records; :meth:`as_dict` is the compact stored form)."""
        return {**self.as_dict(), "lora_alpha": self.lora_alpha,
                **{key: getattr(self, key) for key in _KNOB_DEFAULTS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return cls(
            name=str(data["name"]),
            steps=int(data["steps"]),
            lora_rank=int(data["lora_rank"]),
            learning_rate=float(data["learning_rate"]),
            resolution=int(data["resolution"]),
            batch_size=int(data.get("batch_size", 1)),
            seed=int(data.get("seed", 0)),
            lora_alpha=None if data.get("lora_alpha") is None else int(data["lora_alpha"]),
            checkpoint_every=int(data.get("checkpoint_every", 0)),
            timestep_sampling=str(data.get("timestep_sampling", "sigmoid")),
            lora_targets=str(data.get("lora_targets", "attention")),
            aspect_buckets=bool(data.get("aspect_buckets", False)),
            face_loss_weight=float(data.get("face_loss_weight", 1.0)),
            sample_every=int(data.get("sample_every", 0)),
        )


# The quality knobs and their defaults (the v1 behaviour): left out of a stored recipe when so.
_KNOB_DEFAULTS: dict[str, Any] = {
    "timestep_sampling": "sigmoid",
    "lora_targets": "attention",
    "aspect_buckets": False,
    "face_loss_weight": 1.0,
    "sample_every": 0,
}


@dataclass(frozen=True)
class Model:
    """One training model per user: everything that must survive retraining lives here."""

    id: str
    user_id: str
    backend: str
    trigger_word: str
    destination: str
    trainer_version: str
    lora_scale: float
    lora_scale_is_custom: bool
    active_version_id: str | None
    created_at: datetime
    # Empty only for models created before likeness tracking; filled at their next scoring.
    probes: tuple[Probe, ...] = ()


@dataclass(frozen=True)
class Finding:
    """Something wrong or weak about a photo (``photo`` set) or the whole set (``photo`` None)."""

    severity: str  # "reject" | "warn" | "info"
    code: str
    message: str
    advice: str
    photo: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "advice": self.advice,
            "photo": self.photo,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(
            severity=str(data["severity"]),
            code=str(data["code"]),
            message=str(data["message"]),
            advice=str(data.get("advice", "")),
            photo=data.get("photo"),
        )


# A face's box in a stored training photo: (left, top, right, bottom) as fractions of the photo's
# width and height, each in [0, 1], left < right and top < bottom.
FaceBox = tuple[float, float, float, float]


def face_box_from(value: Any) -> FaceBox | None:
    """A stored face box (a list of four numbers, or null) read back, checked.

    Raises ValueError for anything else: boxes are written by the intake only, so a bad one means
    the stored data is corrupt, and training on it would weight the wrong pixels."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise ValueError(f"a face box is four numbers, not {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"a face box is fractions in [0, 1] with left < right and top < bottom, "
                         f"not {value!r}")
    return (x0, y0, x1, y1)


@dataclass(frozen=True)
class Dataset:
    id: str
    user_id: str
    images_total: int
    images_accepted: int
    photo_hashes: tuple[str, ...]
    findings: tuple[Finding, ...]
    accepted: bool
    sha256: str
    created_at: datetime
    # The set's verdict: trainable, quality ("excellent".."poor"), score 0-100, reasons.
    verdict: dict[str, Any] = field(default_factory=dict)
    # The main face's box in each stored photo, aligned with ``photo_hashes`` (None: no face
    # found); empty for a dataset stored before the boxes were kept.
    face_boxes: tuple[FaceBox | None, ...] = ()

    def __post_init__(self) -> None:
        if self.face_boxes and len(self.face_boxes) != len(self.photo_hashes):
            raise ValueError(f"dataset {self.id}: {len(self.face_boxes)} face boxes for "
                             f"{len(self.photo_hashes)} photos")
        for box in self.face_boxes:
            face_box_from(box)  # raises for a box that is not one

    def face_box(self, index: int) -> FaceBox | None:
        """The face box of the ``index``-th photo (None when unknown or no face was found)."""
        return self.face_boxes[index] if self.face_boxes else None

    @property
    def prepared_resolution(self) -> int | None:
        """The resolution its photos were cropped to when they were uploaded (the pinned
        recipe's then), as its verdict records it; None for a dataset stored before uploads
        recorded it."""
        value = self.verdict.get("resolution")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Training:
    id: str
    model_id: str
    dataset_id: str
    backend: str
    status: TrainingStatus
    is_retraining: bool
    trigger_word: str
    destination: str
    trainer_version: str
    recipe: Recipe
    preserved: dict[str, Any]
    created_at: datetime
    step: int = 0
    total_steps: int = 0
    remote_id: str | None = None
    version_id: str | None = None
    error: str | None = None
    loss: float | None = None
    weights_method: str | None = None
    cancel_requested: bool = False
    # Ended before its version was stored, with a remote run still to cancel: set in the
    # transaction that ends it, cleared once the backend has the cancel (the reconciler asks
    # again until then), so a remote run never goes on, billed, after a crash or an outage.
    remote_cancel_pending: bool = False
    # A worker uploaded the photos to create a remote run (set before the create, kept): a
    # training that ends with no ``remote_id`` may still have a run, its create's answer lost
    # with the worker, and its cancel finds the run by the upload's marker.
    remote_create_started: bool = False
    # Where the photos of the newest create were uploaded (Replicate: the file's URL, which the
    # run echoes as ``input.input_images``), stored before that create: the next attempt and a
    # cancel find a run whose create's answer was lost by it exactly, with no file lookups.
    remote_marker: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    history: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # The trainer's own figures (losses, time, device, cost), kept for the likeness record.
    metrics: dict[str, Any] = field(default_factory=dict)
    # (step, loss) as the trainer reported them, bounded (``domain.progress``): the page's chart.
    loss_curve: tuple[tuple[int, float], ...] = ()
    # Who runs it (see ``domain.lease``): ``attempt`` counts the times a worker took it,
    # ``recoveries`` the times a worker took it over from one that had died holding it.
    attempt: int = 0
    recoveries: int = 0
    # The current attempt got somewhere its successor keeps: stored a checkpoint past the one it
    # resumed from, or (a remote run) polled its run. Its take-over then starts the count of
    # ``recoveries`` again: only take-overs in a row that got nowhere fail a training.
    progressed: bool = False
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    heartbeat_at: datetime | None = None

    @property
    def is_scoring(self) -> bool:
        """The trainer is done and its version stored; the likeness gate has not decided yet.
        The training keeps its slot (and stays ``processing``) until it has."""
        return not self.status.is_terminal and self.version_id is not None

    @property
    def progress(self) -> float:
        if self.status is TrainingStatus.SUCCEEDED:
            return 1.0
        if self.total_steps <= 0:
            return 0.0
        return max(0.0, min(1.0, self.step / self.total_steps))


@dataclass(frozen=True)
class Version:
    id: str
    model_id: str
    number: int
    training_id: str
    trainer_version: str
    weights_key: str
    weights_sha256: str
    weights_method: str
    remote_version: str | None
    version_mismatch: bool
    created_at: datetime
    gate_status: GateStatus = GateStatus.PASSED
    gate_reason: str | None = None
    # The decision's figures (baseline version, both scores, tolerance) and, when the user
    # activated the version against or ahead of the gate, ``override``.
    gate_details: dict[str, Any] = field(default_factory=dict)
    alert: dict[str, Any] | None = None



# No id holds a control character (the API's Id refuses one in a path), and PostgreSQL cannot
# even be asked about a NUL (psycopg refuses it in bound text, a 422 unstorable_text), where
# SQLite answers that nothing has it.
_ID_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def names_no_row(ref: str) -> bool:
    """Whether ``ref`` (a page's ``before``) names nothing whatever is stored: it holds a
    control character, which no id has. Answered so before any lookup, every database
    answers it alike."""
    return _ID_CONTROL.search(ref) is not None


@dataclass(frozen=True)
class GenerationPosition:
    """A place in a user's gallery (newest first, then by id, for those of the same instant):
    the page after it holds the generations below it. A position, not a row that must still
    exist: the generation it was taken from may be deleted between two pages (the Delete
    button, ``DELETE /api/generations/{id}``, the retention of the garbage collection), and
    every older one stays reachable. As a cursor (``older``, ``?before=``) it is
    ``<microseconds since 1970 UTC>~<id>``: opaque to clients, short, and safe in a URL."""

    created_at: datetime
    id: str

    @classmethod
    def of(cls, generation: Generation) -> GenerationPosition:
        return cls(created_at=generation.created_at, id=generation.id)

    def cursor(self) -> str:
        # Integer microseconds: exact, so the page after it neither skips nor repeats one.
        micros = (self.created_at - _EPOCH) // timedelta(microseconds=1)
        return f"{micros}~{self.id}"

    @classmethod
    def parse(cls, cursor: str) -> GenerationPosition | None:
        """The position a ``cursor`` names; None when it is not one (a bare generation id,
        the cursor of before positions, is looked up by the caller)."""
        micros, sep, generation_id = cursor.partition("~")
        # ASCII digits only, as cursor() writes them: isdigit() takes a superscript two, which
        # int() refuses (a 500), and any script's digits, which int() reads as a position.
        if (not sep or not generation_id or not (micros.isascii() and micros.isdigit())
                or len(micros) > 20 or names_no_row(generation_id)):
            return None
        try:
            created_at = _EPOCH + timedelta(microseconds=int(micros))
        except OverflowError:
            return None
        return cls(created_at=created_at, id=generation_id)

@dataclass(frozen=True)
class Generation:
    id: str
    user_id: str
    model_id: str
    version_id: str
    prompt: str
    lora_scale: float
    seed: int | None
    image_keys: tuple[str, ...]
    created_at: datetime
    # The places in the batch (0-based) of the pictures the generator withheld (Replicate's
    # safety checker): the pictures that came are ``image_keys``, in the batch's order, so
    # image i of ``image_keys`` is picture ``pictures()[i]``, made with that place's seed.
    withheld: tuple[int, ...] = ()

    def pictures(self) -> tuple[int, ...]:
        """The places in the batch of the stored images, ``image_keys``' order."""
        total = len(self.image_keys) + len(self.withheld)
        return tuple(i for i in range(total) if i not in self.withheld)


@dataclass(frozen=True)
class JobLease:
    """A periodic job that one process at a time runs (the garbage collection): who holds it
    and until when, and when it last started and finished."""

    name: str
    owner: str | None
    expires_at: datetime | None
    last_started_at: datetime | None
    last_finished_at: datetime | None
