"""Garbage collection: which rows and blobs nothing refers to any more. Pure: the collector
(``services/gc.py``) reads the references from the database, lists the storage and the work
folders, and deletes what ``plan_collection`` returns.

Collected:

- **datasets never trained** (no training in any status, no likeness record refers to them)
  created more than ``dataset_age`` ago: the row, and with it their manifest, their reference
  embeddings and every photo or original no remaining dataset refers to;
- **generations** created more than ``generation_age`` ago (unset: kept forever): the row and
  its images;
- **work folders** of trainings that ended (or that the database does not know, once older than
  the grace period): what a worker that died while training left behind;
- **orphans**: blobs no row refers to (an upload or a training that died between writing its
  blobs and its row, a collection killed between deleting a row and its blobs).

Never collected, whatever the settings:

- a blob written less than ``grace`` ago: uploads, trainings and generations write their blobs
  before their rows, so a young blob without a row is most likely one whose row is coming;
- a version's weights, any gate status, nor weights written since the oldest unfinished training
  began (they may be that training's, its version not written yet);
- the photos, manifest or reference embeddings of a dataset any training used, in any status;
- a probe image of an existing version, a model's chart, a grid of two existing versions;
- a sample image of an existing training (in any status: the training page shows them);
- the work folder of a training that has not ended;
- a key the storage layout does not describe (written by a newer release, or by hand).

Rows go before blobs: a collection killed at any point leaves rows whose blobs all exist, and
blobs without rows, which are orphans that the next collection deletes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

# The job name of the garbage collection in the job leases (one collector at a time).
GC_JOB = "gc"
# How long a collector's lease lasts without a renewal; it renews it between steps and every
# few hundred deletions. Short: a collector killed on another machine (where this one cannot
# see that its process is gone) blocks the next collection only this long. One that runs past it
# unrenewed (a long listing) keeps it unless another collector took it meanwhile; then it stops.
GC_LEASE = timedelta(minutes=2)
# How long a webhook's id is kept to refuse a replay. A webhook whose signed timestamp is more
# than 5 minutes off is refused before its id is looked at, so an older id can never be
# accepted again anyway; a day leaves room for clocks that disagree.
WEBHOOK_MEMORY = timedelta(days=1)


class Owner(enum.StrEnum):
    """What a blob belongs to, read from its key (``services.layout.owner_of``)."""

    PHOTO = "photo"  # photos/<sha256>.jpg: owner id is the sha256
    ORIGINAL = "original"  # originals/<sha256>: owner id is the key
    DATASET = "dataset"  # the manifest and reference embeddings of a dataset
    WEIGHTS = "weights"  # weights/<sha256>.safetensors: owner id is the key
    GENERATION = "generation"  # a generation's images
    VERSION = "version"  # a version's probe images
    COMPARISON = "comparison"  # a grid of two versions: owner id is "<a>-<b>"
    MODEL = "model"  # a model's chart
    TRAINING = "training"  # a training's sample images
    CHECKPOINT = "checkpoint"  # a local training's checkpoint: owner id is the training's


class Kind(enum.StrEnum):
    """What a deletion is reported under."""

    DATASETS = "datasets"
    GENERATIONS = "generations"
    ORPHANS = "orphans"
    WORK = "work folders"


@dataclass(frozen=True)
class GcPolicy:
    """``dataset_age``/``generation_age``: None never collects them. ``grace``: blobs and
    unknown work folders younger than this are never collected."""

    grace: timedelta
    dataset_age: timedelta | None = None
    generation_age: timedelta | None = None


@dataclass(frozen=True)
class DatasetRef:
    id: str
    created_at: datetime
    photo_hashes: tuple[str, ...]
    trained: bool  # a training (any status) or a likeness record refers to it


@dataclass(frozen=True)
class GenerationRef:
    id: str
    created_at: datetime
    image_keys: tuple[str, ...]


@dataclass(frozen=True)
class TrainingRef:
    id: str
    created_at: datetime
    ended: bool
    # Canceled before its version was stored: ``resume`` may still continue it from its checkpoint.
    resumable: bool = False


@dataclass(frozen=True)
class References:
    """Everything rows refer to, as the database says now."""

    datasets: tuple[DatasetRef, ...] = ()
    generations: tuple[GenerationRef, ...] = ()
    trainings: tuple[TrainingRef, ...] = ()
    model_ids: frozenset[str] = frozenset()
    version_ids: frozenset[str] = frozenset()
    weights_keys: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Blob:
    """A listed blob and what its key says it belongs to (``owner`` None: a key the layout does
    not describe, which is kept)."""

    key: str
    size: int
    modified: datetime
    owner: Owner | None
    owner_id: str


@dataclass(frozen=True)
class WorkFolder:
    """A folder under the work folder, named after the training that used it."""

    name: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class Planned:
    """One thing to delete: a blob's key, or a work folder's ``work/<name>``."""

    kind: Kind
    key: str
    size: int


@dataclass(frozen=True)
class GcPlan:
    datasets: tuple[str, ...] = ()  # rows to delete
    generations: tuple[str, ...] = ()  # rows to delete
    blobs: tuple[Planned, ...] = ()
    work_folders: tuple[Planned, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.datasets or self.generations or self.blobs or self.work_folders)


def datasets_to_collect(refs: References, *, now: datetime, policy: GcPolicy) -> tuple[str, ...]:
    if policy.dataset_age is None:
        return ()
    cutoff = now - policy.dataset_age
    return tuple(sorted(d.id for d in refs.datasets if not d.trained and d.created_at < cutoff))


def generations_to_collect(refs: References, *, now: datetime,
                           policy: GcPolicy) -> tuple[str, ...]:
    if policy.generation_age is None:
        return ()
    cutoff = now - policy.generation_age
    return tuple(sorted(g.id for g in refs.generations if g.created_at < cutoff))


@dataclass(frozen=True)
class _Live:
    """What the rows that stay refer to."""

    datasets: frozenset[str]
    photos: frozenset[str]
    generations: frozenset[str]
    keys: frozenset[str]  # exact keys rows name: weights, generation images
    originals: frozenset[str] | None  # None: unknown (a manifest could not be read): keep all
    version_ids: frozenset[str]
    model_ids: frozenset[str]
    training_ids: frozenset[str]
    # Trainings whose checkpoints are still of use: running (or queued), or resumable.
    checkpointing_ids: frozenset[str]


def _live(refs: References, *, collected_datasets: frozenset[str],
          collected_generations: frozenset[str],
          originals: Mapping[str, frozenset[str]] | None) -> _Live:
    datasets = [d for d in refs.datasets if d.id not in collected_datasets]
    generations = [g for g in refs.generations if g.id not in collected_generations]
    kept_originals: frozenset[str] | None = None
    if originals is not None:
        kept_originals = frozenset(k for d in datasets for k in originals.get(d.id, frozenset()))
    return _Live(
        datasets=frozenset(d.id for d in datasets),
        photos=frozenset(sha for d in datasets for sha in d.photo_hashes),
        generations=frozenset(g.id for g in generations),
        keys=refs.weights_keys | frozenset(k for g in generations for k in g.image_keys),
        originals=kept_originals, version_ids=refs.version_ids, model_ids=refs.model_ids,
        training_ids=frozenset(t.id for t in refs.trainings),
        checkpointing_ids=frozenset(t.id for t in refs.trainings if not t.ended or t.resumable),
    )


def _referenced(blob: Blob, live: _Live) -> bool:
    if blob.key in live.keys:
        return True
    match blob.owner:
        case Owner.PHOTO:
            return blob.owner_id in live.photos
        case Owner.ORIGINAL:
            return live.originals is None or blob.owner_id in live.originals
        case Owner.DATASET:
            return blob.owner_id in live.datasets
        case Owner.WEIGHTS:
            return False  # referenced only by its exact key (live.keys)
        case Owner.GENERATION:
            return blob.owner_id in live.generations
        case Owner.VERSION:
            return blob.owner_id in live.version_ids
        case Owner.COMPARISON:
            return _names_two_versions(blob.owner_id, live.version_ids)
        case Owner.MODEL:
            return blob.owner_id in live.model_ids
        case Owner.TRAINING:
            return blob.owner_id in live.training_ids
        case Owner.CHECKPOINT:
            # The training service deletes a training's checkpoints when it ends with a version
            # or fails; a worker that died between the two leaves them here.
            return blob.owner_id in live.checkpointing_ids
        case None:
            return True  # not ours to judge: kept
    return True  # pragma: no cover - every owner is matched above


def _names_two_versions(name: str, version_ids: frozenset[str]) -> bool:
    """Whether ``name`` is ``<a>-<b>`` for two existing versions (ids hold dashes too)."""
    return any(name[i] == "-" and name[:i] in version_ids and name[i + 1:] in version_ids
               for i in range(len(name)))


def plan_collection(
    *, refs: References, blobs: Iterable[Blob], work_folders: Iterable[WorkFolder],
    now: datetime, policy: GcPolicy, originals: Mapping[str, frozenset[str]] | None,
) -> GcPlan:
    """What to delete, given the references (``refs``), the listed blobs and work folders, and
    ``originals``: each dataset's originals, from its manifest (None: unknown, keep them all)."""
    datasets = datasets_to_collect(refs, now=now, policy=policy)
    generations = generations_to_collect(refs, now=now, policy=policy)
    live = _live(refs, collected_datasets=frozenset(datasets),
                 collected_generations=frozenset(generations), originals=originals)
    by_id = {d.id: d for d in refs.datasets}
    of_datasets = {sha for d in datasets for sha in by_id[d].photo_hashes}
    if originals is not None:
        of_datasets |= {k for d in datasets for k in originals.get(d, frozenset())}
    of_generations = frozenset(generations)
    old = now - policy.grace
    # Weights are written before their version: any written since the oldest unfinished
    # training began may be that training's.
    unfinished = [t.created_at for t in refs.trainings if not t.ended]
    weights_cutoff = min([old, *unfinished])

    planned: list[Planned] = []
    for blob in blobs:
        if blob.modified >= old or _referenced(blob, live):
            continue
        if blob.owner is Owner.WEIGHTS and blob.modified >= weights_cutoff:
            continue
        if blob.owner in (Owner.DATASET, Owner.PHOTO, Owner.ORIGINAL) and (
                blob.owner_id in datasets or blob.owner_id in of_datasets):
            kind = Kind.DATASETS
        elif blob.owner is Owner.GENERATION and blob.owner_id in of_generations:
            kind = Kind.GENERATIONS
        else:
            kind = Kind.ORPHANS
        planned.append(Planned(kind=kind, key=blob.key, size=blob.size))

    ended = {t.id: t.ended for t in refs.trainings}
    folders = [Planned(kind=Kind.WORK, key=f"work/{w.name}", size=w.size) for w in work_folders
               if ended.get(w.name, w.modified < old)]
    return GcPlan(datasets=datasets, generations=generations,
                  blobs=tuple(sorted(planned, key=lambda p: p.key)),
                  work_folders=tuple(sorted(folders, key=lambda p: p.key)))


# --------------------------------------------------------------------------- the summary


@dataclass(frozen=True)
class KindTotal:
    rows: int = 0
    items: int = 0  # blobs, or work folders
    size: int = 0


@dataclass(frozen=True)
class GcSummary:
    """What a collection deleted (or, dry, would delete): counts and bytes per kind, and the
    keys (and row ids) themselves."""

    dry_run: bool
    datasets: tuple[str, ...] = ()
    generations: tuple[str, ...] = ()
    deleted: tuple[Planned, ...] = ()
    # Planned, then found referenced again, or written again, when it came to deleting it (a
    # dataset trained meanwhile, a photo uploaded again): kept.
    kept: tuple[str, ...] = ()
    # Their bytes (``users delete`` only): the deleted account's answer counts them as deleted.
    kept_size: int = 0
    notes: tuple[str, ...] = field(default=())
    # Ids of webhooks received more than WEBHOOK_MEMORY ago, forgotten (rows of their own).
    webhook_ids: int = 0
    # Expired browser sessions and sign-in/sign-up records older than the rate limit's window
    # (they count for no limit any more), deleted.
    sign_in_rows: int = 0

    @classmethod
    def of_plan(cls, plan: GcPlan, *, dry_run: bool) -> GcSummary:
        return cls(dry_run=dry_run, datasets=plan.datasets, generations=plan.generations,
                   deleted=(*plan.blobs, *plan.work_folders))

    @property
    def empty(self) -> bool:
        return not (self.datasets or self.generations or self.deleted)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.deleted)

    def totals(self) -> dict[Kind, KindTotal]:
        rows = {Kind.DATASETS: len(self.datasets), Kind.GENERATIONS: len(self.generations)}
        out = {}
        for kind in Kind:
            mine = [p for p in self.deleted if p.kind is kind]
            out[kind] = KindTotal(rows=rows.get(kind, 0), items=len(mine),
                                  size=sum(p.size for p in mine))
        return out

    def lines(self, *, verbose: bool = False) -> list[str]:
        """The summary as a person reads it: one line per kind, a total, and with ``verbose``
        every row id and key."""
        verb = "would delete" if self.dry_run else "deleted"
        totals = self.totals()
        out = [f"garbage collection{' (dry run: nothing deleted)' if self.dry_run else ''}:"]
        for kind, total in totals.items():
            unit = "folder" if kind is Kind.WORK else "blob"
            rows = f"{total.rows} row(s), " if kind in (Kind.DATASETS, Kind.GENERATIONS) else ""
            out.append(f"  {kind:<12} {verb} {rows}{total.items} {unit}(s), "
                       f"{format_bytes(total.size)}")
        size = sum(t.size for t in totals.values())
        out.append(f"  {'total':<12} {verb} {len(self.datasets) + len(self.generations)} row(s), "
                   f"{len(self.deleted)} blob(s) or folder(s), {format_bytes(size)}")
        if self.webhook_ids:
            out.append(f"  {'webhooks':<12} forgot {self.webhook_ids} id(s) received over "
                       f"{WEBHOOK_MEMORY.days} day(s) ago")
        if self.sign_in_rows:
            out.append(f"  {'sign-ins':<12} forgot {self.sign_in_rows} expired session(s) and "
                       "sign-in or sign-up record(s) older than the rate limit's window")
        out.extend(f"  note: {note}" for note in self.notes)
        if verbose:
            out.extend(f"  {verb} dataset row {d}" for d in self.datasets)
            out.extend(f"  {verb} generation row {g}" for g in self.generations)
            out.extend(f"  {verb} {p.kind}: {p.key} ({format_bytes(p.size)})"
                       for p in self.deleted)
            out.extend(f"  kept (referenced or written again): {k}" for k in self.kept)
        return out


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def intersect(first: Sequence[Planned], second: Sequence[Planned]) -> tuple[Planned, ...]:
    """The planned items of ``first`` that ``second`` plans too (a plan checked again against
    fresher references just before deleting)."""
    again = {p.key for p in second}
    return tuple(p for p in first if p.key in again)
