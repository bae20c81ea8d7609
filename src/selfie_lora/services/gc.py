"""Garbage collection: deleting what nothing refers to any more (``domain.gc`` decides what, and
says what is never deleted).

A collection runs in this order, so that one killed at any line leaves no row referring to a
deleted blob:

1. list the blobs (every prefix of ``services.layout``) and this machine's work folders;
2. read the references from the database and plan (pure); a dry run stops here;
3. delete the rows planned: each dataset only if nothing refers to it in the deleting statement
   itself (a training started on it meanwhile keeps it), generations past their retention;
4. read the references again and plan again: a blob is deleted only if both plans have it (a
   dataset trained meanwhile, or an upload that brought the same photo again, keeps it);
5. delete those blobs, each only if it is still older than the grace period when it comes to
   it (written again since the listing: kept), settle the holds a ``users delete`` killed
   midway left (``erase``), then the work folders.

A writer whose row commits after step 4 is covered by step 5 and by itself: every write of a
blob (``if_absent`` ones included) makes it young, and once its row has committed the writer
checks that its blobs are there and writes any missing again (``IntakeService.keep_stored``,
the training service after storing a version).

A blob whose row went in step 3 but that a crash left behind is an orphan the next collection
deletes, exactly once: deleting a missing blob or row is no error and counts nothing.

**One collector at a time.** ``selfie-lora gc`` and every worker (``selfie-lora worker``,
``serve``'s embedded one) take the database's job lease ``gc`` first (SQLite and PostgreSQL
alike: a row, locked while it is claimed), renewed between steps; a worker collects only when
the last collection started ``interval`` ago or more, so N workers collect once per interval,
not N times. The lease is for economy, not safety: every step is idempotent and checks its
references itself, so two collectors that overlap (one outliving its lease) delete nothing that
either alone would have kept. Work folders are per machine (each worker's HOME): every worker
cleans its own, whoever holds the lease.

**Only this database's store.** A key no row of this database names is an orphan: run with
another database (SELFIE_LORA_DATABASE_URL unset or wrong, a staging deployment given
production's storage), a collection would delete every photo and every version's weights. So
before deleting anything, or planning a dry run, the collector checks the store's deployment
marker (``services.deployment``): one naming another deployment than this database's stops it.
A store with no marker yet (no server or worker of this release has started on it, or none
whose database it looked like: ``services.deployment``) is bound to no database; then a
collection that would delete photos or weights while the store holds none of the blobs only
this database names (its datasets' manifests, its versions' weights: none at all for an empty
database) stops too, unless forced. A worker's collection tries to bind the store first, as the
worker's start did, on the same evidence; ``selfie-lora gc`` never binds. A store this process
only just marked gets the same guard at its next collection: the start bound it on a few
lookups, the collection has the whole listing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from selfie_lora.disk_space import full_disk_words, is_full_error, is_quota_error
from selfie_lora.domain.gc import (
    GC_JOB,
    GC_LEASE,
    WEBHOOK_MEMORY,
    Blob,
    GcPlan,
    GcPolicy,
    GcSummary,
    Owner,
    Planned,
    References,
    WorkFolder,
    intersect,
    plan_collection,
)
from selfie_lora.errors import (
    BlobMissingError,
    ConflictError,
    DeploymentMismatchError,
    ErrorCode,
    SelfieLoraError,
    StorageFullError,
)
from selfie_lora.services.common import utcnow
from selfie_lora.services.deployment import DeploymentBinding, unbound_doubt
from selfie_lora.services.layout import (
    PREFIXES,
    is_valid_key,
    manifest_key,
    owner_of,
)
from selfie_lora.services.owners import default_owner, owner_is_gone
from selfie_lora.services.ports import BlobStore, Repository
from selfie_lora.services.private_files import (
    fsync_dir,
    private_folders,
    private_replacement,
)

logger = logging.getLogger(__name__)

# Blob deletions between two renewals of the lease.
RENEW_EVERY = 200
# Keyed by their content: another user's upload or training may name the same key.
_BY_CONTENT = frozenset({Owner.PHOTO, Owner.ORIGINAL, Owner.WEIGHTS})
# The folders in HOME/work where ``erase`` holds copies of what it deletes (``_Hold``): settled,
# never removed as a stale training's work folder.
HOLD_PREFIX = "erase-hold-"
_HOLD_MANIFEST = "held.json"
# The release before the holds moved to HOME/work held a users delete's photos in the system's
# temporary folder, with no manifest: one its kill left there is a deleted user's photos, which
# nothing settles. Removed by every machine's pass once surely not a live erase's (a day old).
_OLD_HOLD_PREFIX = "selfie-lora-erase-"
_OLD_HOLD_AGE = timedelta(days=1)
_HOLD_LOCK = ".lock"


class _InterruptedError(Exception):
    """Stop collecting (what is done stays done; the next collection goes on from there)."""


class _Hold:
    """Copies of the content-keyed blobs an ``erase`` deletes, kept until a third reading of the
    references says whether a row named one meanwhile (another user's upload of the same bytes):
    the folder HOME/work/erase-hold-*, private (0700, files 0600), with its manifest (copy name
    to blob key), written before each delete, and a lock (``flock`` on ``.lock``) held by its
    process until it is settled; a process's death releases the lock, and the hold stays for
    the command run again or the next collection (``GarbageCollector.settle_holds``)."""

    def __init__(self, folder: Path, lock: int, held: dict[str, str]) -> None:
        self.folder = folder
        self._lock = lock
        self.held = held  # copy name -> blob key

    @classmethod
    def create(cls, work_dir: Path) -> _Hold:
        with _room_for_hold(work_dir):
            return cls._create(work_dir)

    @classmethod
    def _create(cls, work_dir: Path) -> _Hold:
        private_folders(work_dir)
        # Made and locked under a name no settler looks at, then renamed into view: a settler
        # never finds it unlocked. One killed before the rename holds no copy: a stale work
        # folder, removed as one.
        staging = Path(tempfile.mkdtemp(prefix=f".{HOLD_PREFIX}", dir=work_dir))  # 0700
        lock = os.open(staging / _HOLD_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            folder = staging.with_name(staging.name.removeprefix("."))
            staging.rename(folder)
            # Its name on disk before any blob is deleted: after a power cut the settler finds
            # the hold under it, not a staging folder it removes as a stale work folder.
            fsync_dir(work_dir)
        except BaseException:
            # No hold is returned to release it: left open, this process's own lock kept its
            # settler (``settle_holds``, ``found``) off a renamed hold for as long as it lived.
            os.close(lock)
            raise
        return cls(folder, lock, {})

    @classmethod
    def found(cls, folder: Path) -> _Hold | None:
        """The hold in ``folder``, locked, when no living process holds it; None while its erase
        (or another settler) still does, or once it is settled."""
        try:
            lock = os.open(folder / _HOLD_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        except FileNotFoundError:
            return None  # settled meanwhile
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            return None
        if not folder.is_dir():  # settled between the open and the lock
            os.close(lock)
            return None
        try:
            held = json.loads((folder / _HOLD_MANIFEST).read_bytes())
        except FileNotFoundError:
            held = {}  # killed before its first delete: its copies' blobs are all stored
        except ValueError:
            held = None
        if not isinstance(held, dict):
            # Written whole (renamed into place): only a hand could have made it so.
            logger.warning("users delete: the manifest of %s cannot be read; it is kept for "
                           "the operator", folder)
            os.close(lock)
            return None
        return cls(folder, lock, {str(name): str(key) for name, key in held.items()})

    def keep(self, key: str, blobs: BlobStore) -> bool:
        """Copies ``key`` here and names it in the manifest, before it is deleted; False when
        it is gone already."""
        try:
            stream = blobs.open(key)
        except BlobMissingError:
            return False
        name = str(len(self.held))
        with _room_for_hold(self.folder):
            with contextlib.closing(stream):
                fd = os.open(self.folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                with os.fdopen(fd, "wb") as out:
                    for chunk in stream.chunks:
                        out.write(chunk)
                    _sync(out)
                self.held[name] = key
                with private_replacement(self.folder / _HOLD_MANIFEST) as fh:
                    fh.write(json.dumps(self.held).encode())
                    _sync(fh)
            # The copy's name and the manifest's rename, both entries of this folder, on disk
            # before the blob is deleted: the files' own fsync does not write them, and a power
            # cut could leave a manifest naming a copy that has no name, or the manifest before
            # it. Inside the mapping: a folder's fsync may say ENOSPC too (NFS, thin
            # provisioning), which is the same full disk.
            fsync_dir(self.folder)
        return True

    def copies(self) -> dict[str, Path]:
        """Each held key's copy (one a removal cut short already took is not)."""
        return {key: self.folder / name for name, key in self.held.items()
                if (self.folder / name).is_file()}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def release(self) -> None:
        os.close(self._lock)


class GarbageCollector:
    def __init__(
        self, *, repo: Repository, blobs: BlobStore, work_dir: Path, policy: GcPolicy,
        interval: timedelta | None = None, clock: Callable[[], datetime] = utcnow,
        lease: timedelta = GC_LEASE, owner: str | None = None,
        deployment: DeploymentBinding | None = None,
        forget_sign_ins: Callable[[], int] | None = None,
    ) -> None:
        self._repo = repo
        # ``UserService.forget_expired`` (wiring): expired browser sessions and sign-in/sign-up
        # records past the rate limit's window. Here because a collection is what runs
        # periodically on every deployment (SQLite and PostgreSQL, every worker and
        # ``selfie-lora gc``); the user service keeps the window it is judged by.
        self._forget_sign_ins = forget_sign_ins
        self._blobs = blobs
        self._work_dir = work_dir
        self.policy = policy
        # None: the workers never collect (``selfie-lora gc`` still does).
        self.interval = interval
        self._clock = clock
        self._lease = lease
        self.owner = owner or default_owner()
        self._work_due_at: datetime | None = None
        # Shared with the operations service (wiring): whether this process wrote the marker.
        self._deployment = deployment or DeploymentBinding(repo=repo, blobs=blobs, clock=clock)

    # ------------------------------------------------------------------ entry points
    def collect(self, *, dry_run: bool = False, force: bool = False) -> GcSummary:
        """``selfie-lora gc``: collect now, whenever the last collection ran. A dry run only
        plans (and takes no lease). ``ConflictError`` while another collector holds the lease;
        ``DeploymentMismatchError`` when the store is not this database's (module docstring),
        or, with no marker and unless ``force``, may not be."""
        if dry_run:
            listing = self._listing()
            plan, _now, refs = self._plan(listing, self._work_folders())
            self._guard(refs, plan, listing, force=force)
            return dataclasses.replace(GcSummary.of_plan(plan, dry_run=True),
                                       notes=_refused(listing))
        now = self._clock()
        if not self._claim(now):
            job = self._repo.get_job(GC_JOB)
            if job is None or not job.owner or job.expires_at is None:
                holder = ""
            else:
                # A holder on another machine cannot be seen from here: it may have been killed
                # (kill -9, a machine that went away), and then only its lease's end frees it.
                holder = (f" by {job.owner} until {job.expires_at:%Y-%m-%d %H:%M:%S} UTC "
                          "unless it renews its lease (if that collector was killed, its lease "
                          "lapses then)")
            raise ConflictError(f"another garbage collection is running{holder}; try again "
                                "when it has ended", code=ErrorCode.GC_IN_PROGRESS)
        return self._run_claimed(work=True, force=force)

    def _claim(self, now: datetime, *, due_before: datetime | None = None) -> bool:
        """Take the lease, also from a collector of this machine whose process is gone (killed
        with ``kill -9``, or by the OOM killer): its lease would block every collection until
        it lapses."""
        expires_at = now + self._lease
        if self._repo.claim_job(GC_JOB, owner=self.owner, now=now, expires_at=expires_at,
                                due_before=due_before):
            return True
        job = self._repo.get_job(GC_JOB)
        if job is None or not owner_is_gone(job.owner):
            return False
        logger.warning("garbage collection: taking the lease over from %s, whose process is "
                       "gone", job.owner)
        # Only while the dead owner still holds it: another collector that took it meanwhile
        # keeps it.
        return self._repo.claim_job(GC_JOB, owner=self.owner, now=now, expires_at=expires_at,
                                    due_before=due_before, take_over=job.owner)

    def run_due(self, *, stopping: threading.Event | None = None) -> GcSummary | None:
        """The workers' periodic call (often: it does nothing until a collection is due).
        Collects when the last collection anywhere started ``interval`` ago or more and this
        process wins the lease; otherwise cleans only this machine's work folders, once per
        interval. None when there was nothing to do. ``stopping`` set: the collection stops
        at its next deletion (the worker shuts down)."""
        if self.interval is None:
            return None
        now = self._clock()
        if not self._claim(now, due_before=now - self.interval):
            return self.run_machine_due()
        self._work_due_at = now + self.interval
        summary = self._run_claimed(work=True, stopping=stopping, bind=True)
        _log(summary)
        return summary

    def run_machine_due(self) -> GcSummary | None:
        """This machine's part of a collection alone, once per ``interval`` (the first call
        runs it): settle the holds of erasures killed midway, drop the cached copies of deleted
        blobs, remove stale work folders. Never the lease, never the store's listing: every
        process that erases or caches weights runs it, ``serve --no-worker`` included (it
        answers ``DELETE /api/me`` and its generations cache weights, and its machine may run
        no worker). None when not due or there was nothing to do."""
        if self.interval is None:
            return None
        now = self._clock()
        if self._work_due_at is not None and now < self._work_due_at:
            return None
        self._work_due_at = now + self.interval
        summary = self._collect_work_only()
        _log(summary)
        return summary

    def check_deployment(self, *, action: str) -> None:
        """Before an account's deletion (``services.erasure``), which deletes blobs by the keys
        and prefixes its rows name: ``DeploymentMismatchError`` when the store's marker names
        another deployment than this database's, as before a collection. Another deployment's
        store holds blobs under the same keys (a staging database restored from production's
        backup has the same user, dataset and training ids, and photos are keyed by content),
        and deleting them there is the very failure the marker guards against.

        A store with no marker passes: the collector's rule for it (``_guard``) judges a whole
        listing, where every blob no row names is an orphan, while a deletion takes only what
        this database's own rows name for one account. Refusing it would hold a person's
        deletion hostage to a start that may never come (``users delete`` on a deployment no
        server of this release has started on, or one whose store stayed unbound), and the
        store gets its marker, and this check its teeth, at the first server or worker start."""
        self._deployment.check(action=action)

    def erase(self, *, keys: Sequence[str], prefixes: Sequence[str],
              work_folders: Sequence[str]) -> GcSummary:
        """Delete the blobs of rows just deleted (``users delete``): ``keys`` and every blob
        under ``prefixes``, planned as a collection is, twice, against the references as they
        are now, so that a photo or weights another row still names is kept, however young
        (the rows are gone: the grace period, which spares a blob whose row is coming, does not
        apply). A photo, an original or weights is keyed by its content: another upload may be
        storing the same bytes right now, its row committing after the second plan; so one
        written within the grace period is held aside (copied to a private folder) while deleted
        and written back if a third reading of the references finds a row naming it.
        Deleting a missing blob is no error and counts nothing. Takes no lease: every deletion
        checks the references itself, as two overlapping collections do.

        The hold lies in this machine's work folders (``_Hold``), so a process killed while
        holding leaves it to be settled, exactly once, by this command run again (first thing)
        or by the next collection's pass over the work folders: each copy whose key a row names
        and the store lacks is written back, then the hold is removed."""
        self.settle_holds()
        listing: dict[str, Blob] = {}
        for prefix in prefixes:
            for info in self._blobs.list(prefix):
                listing[info.key] = self._owned(info.key, info.size)
        for key in keys:
            if key in listing or self._blobs.modified(key) is None:
                continue
            try:
                stream = self._blobs.open(key)
            except BlobMissingError:
                continue  # gone meanwhile
            stream.close()  # only its size is wanted
            listing[key] = self._owned(key, stream.size)
        blobs = sorted(listing.values(), key=lambda b: b.key)
        # The trainings are gone (and were stopped): their folders are no one's now.
        folders = [dataclasses.replace(f, modified=datetime.min.replace(tzinfo=UTC))
                   for f in self._work_folders() if f.name in set(work_folders)]
        plan, _now, _refs = self._plan(blobs, folders)
        again, _, _ = self._plan(blobs, folders)
        chosen = intersect(plan.blobs, again.blobs)
        kept = sorted({b.key for b in blobs} - {p.key for p in chosen})
        deleted: list[Planned] = []
        # Held on disk, not in memory: weights can be GBs. In this machine's work folders
        # (HOME/work), not the system's temporary folder: a process killed while holding leaves
        # the hold where the command run again, and every collection's pass over the work
        # folders, finds it and settles it (``settle_holds``).
        with self._holding() as hold:
            for item in chosen:
                modified = self._blobs.modified(item.key)
                if modified is None:
                    continue  # gone already: counts nothing
                owner = owner_of(item.key)
                if (owner is not None and owner[0] in _BY_CONTENT
                        and modified >= self._clock() - self.policy.grace
                        and not hold.keep(item.key, self._blobs)):
                    continue  # gone meanwhile
                self._blobs.delete(item.key)
                deleted.append(item)
            named = self._settle(hold)
        for key in sorted(named):  # a row named it meanwhile: written back, or there again
            kept.append(key)
            deleted = [p for p in deleted if p.key != key]
            logger.info("users delete: %s was stored again meanwhile; kept", key)
        for item in intersect(plan.work_folders, again.work_folders):
            if self._remove_folder(item):
                deleted.append(item)
        return GcSummary(dry_run=False, deleted=tuple(deleted), kept=tuple(kept),
                         kept_size=sum(listing[k].size for k in set(kept) if k in listing))

    @contextlib.contextmanager
    def _holding(self) -> Iterator[_Hold]:
        """A new hold for ``erase``, which settles it; one whose erase raised (Ctrl-C, SIGTERM
        through the command's ``_terminate_as_interrupt``, a store or database that failed) is
        settled on the way out if it can be, else left to the next erase or collection."""
        hold = _Hold.create(self._work_dir)
        try:
            yield hold
        except BaseException:
            try:
                self._settle(hold)
            except Exception:
                logger.warning("users delete: %s is left for the next run or collection to "
                               "settle", hold.folder, exc_info=True)
            raise
        finally:
            hold.release()

    def _settle(self, hold: _Hold) -> frozenset[str]:
        """Writes back each held copy whose key a row names (another user's upload of the same
        bytes) and the store lacks, then removes the hold. Returns the keys a row names. Run
        twice (killed before the removal), it writes back nothing twice: the store has them."""
        copies = hold.copies()
        named: frozenset[str] = frozenset()
        if copies:
            blobs = [self._owned(key, path.stat().st_size) for key, path in copies.items()]
            third, _, _ = self._plan(blobs, [])
            named = frozenset(copies) - {p.key for p in third.blobs}
            for key in sorted(named):
                if self._blobs.modified(key) is None:
                    self._blobs.put_file(key, copies[key])
                    logger.info("users delete: %s, which a row names, was written back", key)
        hold.remove()
        return named

    def settle_holds(self) -> int:
        """Settles the holds ``erase`` runs killed midway left (kill -9, the OOM killer, a
        machine that went down) in this machine's work folders; how many. A hold whose erase
        still runs is locked and skipped. Only this machine's: with a database and storage that
        several machines share (PostgreSQL and S3), a hold lies on the machine whose erase was
        killed, and only that machine settles it: its next erase, its next pass over its work
        folders (a collection, ``run_machine_due``), or its next check of interrupted deletions
        (``Worker.finish_erasures``, every minute in every worker and ``serve``); until then a
        photo another user's upload named meanwhile is missing from the store (their training
        says so), and should that machine never come back, its copies went with it."""
        if not self._work_dir.is_dir():
            return 0
        settled = 0
        for folder in sorted(self._work_dir.glob(f"{HOLD_PREFIX}*")):
            if folder.is_symlink() or not folder.is_dir():
                continue
            hold = _Hold.found(folder)
            if hold is None:
                continue
            try:
                self._settle(hold)
            finally:
                hold.release()
            settled += 1
            logger.info("users delete: settled %s, left by a run killed midway", folder)
        return settled

    def _owned(self, key: str, size: int) -> Blob:
        """A blob of deleted rows, as the plan sees it: old, so only references keep it."""
        owner = owner_of(key)
        return Blob(key=key, size=size, modified=datetime.min.replace(tzinfo=UTC),
                    owner=owner[0] if owner else None, owner_id=owner[1] if owner else "")

    # ------------------------------------------------------------------ the collection
    def _run_claimed(self, *, work: bool, stopping: threading.Event | None = None,
                     bind: bool = False, force: bool = False) -> GcSummary:
        finished = False
        try:
            # A worker's collection: its start bound the store unless the store was away or
            # did not look like this database's; unbound, the guard decides. The id bind()
            # gives was checked against the marker there: the guard need not read both again.
            bound = self._deployment.bind() if bind else None
            summary = self._collect(work=work, stopping=stopping or threading.Event(),
                                    force=force, bound=bound)
            finished = True
            return summary
        finally:
            try:
                self._repo.release_job(GC_JOB, owner=self.owner, now=self._clock(),
                                       finished=finished)
            except SelfieLoraError:  # the lease runs out by itself
                logger.warning("garbage collection: could not release the lease", exc_info=True)

    def _collect(self, *, work: bool, stopping: threading.Event, force: bool,
                 bound: str | None = None) -> GcSummary:
        listing = self._listing()
        folders = self._work_folders() if work else []
        plan, now, refs = self._plan(listing, folders)
        # Before the first row or blob goes.
        self._guard(refs, plan, listing, force=force, bound=bound)
        deleted: list[Planned] = []
        notes = list(_refused(listing))
        datasets: list[str] = []
        generations: tuple[str, ...] = ()
        kept: list[str] = []
        webhook_ids = 0
        sign_in_rows = 0
        try:
            self._renew()
            age = self.policy.dataset_age
            for dataset_id in plan.datasets:
                assert age is not None
                _check(stopping)
                if self._repo.delete_dataset_if_unused(dataset_id, created_before=now - age):
                    datasets.append(dataset_id)
                else:
                    kept.append(f"dataset row {dataset_id}")
            if plan.generations:
                assert self.policy.generation_age is not None
                count = self._repo.delete_generations(
                    plan.generations, created_before=now - self.policy.generation_age)
                generations = plan.generations
                if count != len(plan.generations):
                    notes.append(f"{len(plan.generations) - count} generation row(s) were "
                                 "already gone")
            webhook_ids = self._repo.forget_webhooks(received_before=now - WEBHOOK_MEMORY)
            if self._forget_sign_ins is not None:
                sign_in_rows = self._forget_sign_ins()
            self._renew()
            # Checked again against the references as they are now, just before deleting.
            again, _, _ = self._plan(listing, folders)
            blobs = intersect(plan.blobs, again.blobs)
            kept.extend(sorted({p.key for p in plan.blobs} - {p.key for p in blobs}))
            for i, item in enumerate(blobs):
                _check(stopping)
                if i and i % RENEW_EVERY == 0:
                    self._renew()
                # The listing's time is from before both plans: a writer that wrote this blob
                # again since (an upload of the same photo, weights found already stored) may
                # be about to commit a row naming it, after our second read. Its write made it
                # young again, and a young blob is spared.
                modified = self._blobs.modified(item.key)
                if modified is None:
                    continue  # gone already: counts nothing
                if modified >= self._clock() - self.policy.grace:
                    kept.append(item.key)
                    continue
                self._blobs.delete(item.key)
                deleted.append(item)
            if leftovers := self._blobs.remove_leftovers():
                notes.append(f"removed {leftovers} temporary file(s) left by writes killed "
                             "midway")
            if work:
                notes.extend(self._machine_chores())
            for item in intersect(plan.work_folders, again.work_folders):
                if self._remove_folder(item):
                    deleted.append(item)
        except _InterruptedError as stop:
            notes.append(f"stopped: {stop}; the next collection goes on from here")
        return GcSummary(dry_run=False, datasets=tuple(datasets), generations=generations,
                         deleted=tuple(deleted), kept=tuple(kept), notes=tuple(notes),
                         webhook_ids=webhook_ids, sign_in_rows=sign_in_rows)

    def _collect_work_only(self) -> GcSummary | None:
        notes = self._machine_chores()
        deleted: tuple[Planned, ...] = ()
        if folders := self._work_folders():
            refs = self._repo.gc_references()
            plan = plan_collection(refs=refs, blobs=(), work_folders=folders, now=self._clock(),
                                   policy=self.policy, originals={})
            deleted = tuple(item for item in plan.work_folders if self._remove_folder(item))
        return GcSummary(dry_run=False, deleted=deleted, notes=notes) if deleted or notes else None

    def _machine_chores(self) -> tuple[str, ...]:
        """What every collection does on its own machine besides the work folders, the lease
        winner's and ``selfie-lora gc``'s as well as each worker's or API server's pass:
        settle the holds of erasures killed midway, drop the cached copies of deleted blobs,
        remove the earlier release's holds left in the system's temporary folder."""
        return (*_settled_note(self.settle_holds()), *self._forget_deleted_copies(),
                *self._remove_old_temp_holds())

    def _remove_old_temp_holds(self) -> tuple[str, ...]:
        """This machine's ``selfie-lora-erase-*`` folders in the system's temporary folder
        (``_OLD_HOLD_PREFIX``), this user's and older than ``_OLD_HOLD_AGE``: removed, and
        counted in a note (logged by a worker's pass)."""
        before = (self._clock() - _OLD_HOLD_AGE).timestamp()
        removed = 0
        for folder in Path(tempfile.gettempdir()).glob(f"{_OLD_HOLD_PREFIX}*"):
            try:
                if (folder.is_symlink() or not folder.is_dir()
                        or folder.stat().st_uid != os.getuid()
                        or _measure(folder)[1] >= before):
                    continue
                shutil.rmtree(folder)
            except OSError as exc:  # another process's, or gone meanwhile: tried next pass
                logger.warning("garbage collection: could not remove %s: %s", folder, exc)
                continue
            removed += 1
        if not removed:
            return ()
        return (f"removed {removed} folder(s) {_OLD_HOLD_PREFIX}* from "
                f"{tempfile.gettempdir()} that a users delete of an earlier release killed "
                "midway left (copies of a deleted user's photos)",)

    def _forget_deleted_copies(self) -> tuple[str, ...]:
        """This machine's cached copies of blobs deleted from the store, by this machine or
        another (a user's erasure, a collection): per machine, as the work folders are, so
        every worker drops its own whoever holds the lease."""
        if dropped := self._blobs.forget_deleted_local_copies():
            return (f"removed {dropped} cached copy(ies) of deleted blobs from this machine",)
        return ()

    def _plan(self, listing: list[Blob], folders: list[WorkFolder]
              ) -> tuple[GcPlan, datetime, References]:
        refs = self._repo.gc_references()
        now = self._clock()
        return plan_collection(refs=refs, blobs=listing, work_folders=folders, now=now,
                               policy=self.policy,
                               originals=self._originals(refs, listing)), now, refs

    def _guard(self, refs: References, plan: GcPlan, listing: list[Blob], *,
               force: bool, bound: str | None = None) -> None:
        """Stops a collection that could be deleting another deployment's blobs (module
        docstring): a store bound to another database always; a store bound to none, or
        only just bound by this process, when the plan deletes photos or weights and the
        store holds none of the blobs only this database names, unless ``force``."""
        just_bound = self._deployment.wrote_marker
        if ((bound or self._deployment.check()) is not None and not just_bound) or force:
            return
        owners = [owner[0] for p in plan.blobs if (owner := owner_of(p.key)) is not None]
        photos = owners.count(Owner.PHOTO)
        weights = owners.count(Owner.WEIGHTS)
        doubt = (unbound_doubt(refs, found=(b.key for b in listing), photos=photos,
                               weights=weights, just_bound=just_bound)
                 if photos or weights else None)
        if doubt is not None:
            raise DeploymentMismatchError(doubt)
        # The listing confirmed what the start's lookups found: guarded as any bound store.
        self._deployment.wrote_marker = False

    def _renew(self) -> None:
        now = self._clock()
        if not self._repo.renew_job(GC_JOB, owner=self.owner, expires_at=now + self._lease):
            raise _InterruptedError("another collector took the lease over")

    # ------------------------------------------------------------------ what there is
    def _listing(self) -> list[Blob]:
        """Every blob under the layout's prefixes. Listed before the references are read: a
        blob written after this is not seen, one whose row commits after the read is young."""
        out = []
        for prefix in PREFIXES:
            for info in self._blobs.list(prefix):
                owner = owner_of(info.key)
                out.append(Blob(key=info.key, size=info.size, modified=info.modified,
                                owner=owner[0] if owner else None,
                                owner_id=owner[1] if owner else ""))
        return out

    def _originals(self, refs: References, listing: list[Blob]
                   ) -> Mapping[str, frozenset[str]] | None:
        """Each dataset's originals, from its manifest (the rows do not name them); read only
        when the storage holds originals at all. None when a manifest cannot be read: then no
        original is collected."""
        if not any(b.owner is Owner.ORIGINAL for b in listing):
            return {}
        out: dict[str, frozenset[str]] = {}
        for dataset in refs.datasets:
            try:
                manifest = json.loads(self._blobs.get(manifest_key(dataset.id)))
                out[dataset.id] = frozenset(str(p["original"]) for p in manifest["photos"]
                                            if p.get("original"))
            except (SelfieLoraError, ValueError, KeyError, TypeError):
                logger.warning("garbage collection: the manifest of dataset %s cannot be read; "
                               "no original is collected this time", dataset.id)
                return None
        return out

    def _work_folders(self) -> list[WorkFolder]:
        if not self._work_dir.is_dir():
            return []
        out = []
        for entry in self._work_dir.iterdir():
            if (entry.is_symlink() or not entry.is_dir()
                    or entry.name.startswith(HOLD_PREFIX)):  # an erase's hold: settled instead
                continue
            try:
                size, newest = _measure(entry)
            except FileNotFoundError:
                continue  # removed meanwhile
            out.append(WorkFolder(name=entry.name, size=size,
                                  modified=datetime.fromtimestamp(newest, UTC)))
        return out

    def _remove_folder(self, item: Planned) -> bool:
        path = self._work_dir / item.key.removeprefix("work/")
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            logger.warning("garbage collection: could not remove %s", path)
            return False
        return True


def _refused(listing: list[Blob]) -> tuple[str, ...]:
    """A note naming the listed keys that no store takes (a folder renamed by hand: "copy of g"),
    which are kept: deleting one would raise at that key on every run, and nothing after it
    would ever be collected."""
    keys = [b.key for b in listing if not is_valid_key(b.key)]
    if not keys:
        return ()
    shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
    return (f"kept {len(keys)} blob(s) whose key the store refuses (renamed by hand?): "
            f"{shown}",)


def _settled_note(settled: int) -> tuple[str, ...]:
    if not settled:
        return ()
    return (f"settled {settled} hold(s) of photos or weights left by a users delete killed "
            "midway (each copy a row names written back, the rest deleted)",)


@contextlib.contextmanager
def _room_for_hold(folder: Path) -> Iterator[None]:
    """A full disk under a hold (its folder, a copy, its manifest) raised as
    ``StorageFullError``, as the blob store says its own: an outage of this machine, over once
    space is freed. A raw OSError ENOSPC was taken for what no wait mends: the check of
    interrupted deletions parked the deletion for 24 h, and ``DELETE /api/me`` answered 500."""
    try:
        yield
    except OSError as exc:
        if not is_full_error(exc):
            raise
        raise StorageFullError(f"a copy held aside while blobs are deleted cannot be written: "
                               f"{full_disk_words(folder, exc)}: {exc.strerror or exc}",
                               quota=is_quota_error(exc)) from exc


def _sync(out: BinaryIO) -> None:
    """On disk before the blob it copies is deleted: a machine that goes down then keeps it."""
    out.flush()
    os.fsync(out.fileno())


def _check(stopping: threading.Event) -> None:
    if stopping.is_set():
        raise _InterruptedError("this worker stops")


def _measure(folder: Path) -> tuple[int, float]:
    """A folder's bytes, and the newest modification time in it (a training still writing
    there keeps it young)."""
    size, newest = 0, folder.stat().st_mtime
    for path in folder.rglob("*"):
        try:
            stat = path.lstat()
        except FileNotFoundError:
            continue  # removed while measured
        newest = max(newest, stat.st_mtime)
        if S_ISREG(stat.st_mode):
            size += stat.st_size
    return size, newest


def _log(summary: GcSummary | None) -> None:
    """The periodic collection's summary, in the worker's log (the command prints its own)."""
    if summary is None:
        return
    if (summary.empty and not summary.notes and not summary.webhook_ids
            and not summary.sign_in_rows):
        logger.info("garbage collection: nothing to delete")
        return
    for line in summary.lines():
        logger.info("%s", line)
