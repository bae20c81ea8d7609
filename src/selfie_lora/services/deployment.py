"""The deployment: which database a blob store belongs to.

Nothing else ties a store to its database, and the garbage collector takes every blob that no
row of *its* database names for an orphan: ``selfie-lora gc`` run with SELFIE_LORA_DATABASE_URL
unset (a fresh SQLite in HOME) or wrong, or a staging deployment given production's
SELFIE_LORA_STORAGE_URL, would delete every photo and every version's weights of the real one.

So the database holds a deployment id (one row) and the store a marker, ``deployment.json`` at
its root, naming the same id. The first server or worker that starts (``bind``) makes both: the
id if the database has none, the marker if the store has none (put only if absent: processes
that start at once agree on the first one's). An upgraded deployment binds at its first start
with this release. ``bind`` refuses when the marker names another id: two deployments would
share the store, and a collector of either would delete the other's blobs.

The marker also holds the store's own random id (``storage_id``), which the database's row
records at the first binding: a process whose store carries another one, or no marker and none
of the deployment's blobs, was given another storage (on the scale path without
SELFIE_LORA_STORAGE_URL each process falls back to its own empty HOME/blobs, and an API
server's photos would never reach a worker), and refuses to start, naming the setting. One
folder mounted at different paths, or one bucket reached through another endpoint, keeps its
marker and so its id. A deployment bound before the database recorded it adopts the marker the
first start finds (one from before ``storage_id`` is known by its bytes).

A store with no marker is bound only on evidence that it is this database's (``doubt``): it
holds no photo and no weights while the database names none either (a new deployment: nothing a
mistaken collector could take), or it holds one of
the blobs only this database names (a dataset's manifest, keyed by the dataset's random id; a
version's weights). Otherwise the marker would bind another deployment's store, one not
restarted on this release yet, to whatever database this process was given (an empty SQLite
when SELFIE_LORA_DATABASE_URL is unset), and this process's scheduled collection would then
delete everything of the real one, which would be refused at its next start. Such a store is
left unbound with a warning; collections keep to the collector's guard for unbound stores, and
``selfie-lora gc --force`` is the operator's way past it.

Only a process that serves or works on the data binds; ``selfie-lora gc`` and the other commands
never do, since a mistaken command binding a store to the wrong database is the very failure this
guards against. The collector checks (``check``) before it deletes anything, and so does an
account's deletion (``services.erasure``): a marker naming another id than its database's (or a
database with none) stops it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from datetime import datetime

from selfie_lora.domain.gc import References
from selfie_lora.errors import BlobMissingError, DeploymentMismatchError, StorageError
from selfie_lora.services.common import new_id, utcnow
from selfie_lora.services.layout import DEPLOYMENT_KEY, manifest_key
from selfie_lora.services.ports import BlobStore, Repository

logger = logging.getLogger(__name__)

SETTINGS_HINT = "check SELFIE_LORA_DATABASE_URL and SELFIE_LORA_STORAGE_URL"
# What a collector could take for an orphan and no one could bring back.
PRECIOUS_PREFIXES = ("photos", "weights")
# Lookups (a HEAD each on object storage) for the blobs only this database names, before an
# unmarked store that holds photos or weights is taken for another's: a store that is this
# database's holds the first one looked up, so more only cost a foreign store's start.
EVIDENCE_LOOKUPS = 20


def own_keys(refs: References) -> list[str]:
    """The keys of blobs only this database can have written, most telling first: each
    dataset's manifest (keyed by the dataset's random id), then each version's weights
    (content-addressed, so two deployments share one only for identical weights). Photos are
    content-addressed too, and the same selfies uploaded to staging and production are
    likely: they prove nothing."""
    return [*(manifest_key(d.id) for d in refs.datasets), *sorted(refs.weights_keys)]


def unbound_doubt(refs: References, *, found: Iterable[str], photos: int | None = None,
                  weights: int | None = None, just_bound: bool = False,
                  empty: bool = False) -> str | None:
    """Why a store with no marker (or one this process only just marked) does not look like
    this database's, as one line; None when it does: ``found`` holds one of ``own_keys``.
    ``photos``/``weights``: what a collection would delete (None: a start, which deletes
    nothing). ``empty``: the store holds no photo and no weights at all (a start only)."""
    if set(found) & set(own_keys(refs)):
        return None
    if empty and photos is None:
        return (f"not binding the storage to this database: it holds no photo and no weights, "
                f"yet this database names {len(refs.datasets)} upload(s) and "
                f"{len(refs.version_ids)} version(s), none of which is in it: is "
                "SELFIE_LORA_STORAGE_URL set for this process? Without it a process uses its "
                "own folder (HOME/blobs), which no other server or worker sees; "
                f"{SETTINGS_HINT}. It stays unbound, and trainings and generations on this "
                "process will not find their photos or weights until it is given the "
                "deployment's storage.")
    if refs.datasets or refs.version_ids:
        named = (f"none of the {len(refs.datasets)} upload(s) and {len(refs.version_ids)} "
                 "version(s) this database names is in the storage")
    else:
        named = "this database names no upload and no version"
    unbound = (f"this process only just wrote the storage's {DEPLOYMENT_KEY}"
               if just_bound else
               f"the storage has no {DEPLOYMENT_KEY} to say which database it belongs to "
               "(no server or worker of this release has started on it)")
    if photos is None:
        return (f"not binding the storage to this database: {named}, yet it holds photos or "
                f"weights, and {unbound}: is this the storage's database? {SETTINGS_HINT}. "
                "It stays unbound, and no garbage collection here deletes photos or weights "
                "from it until a server or worker of the storage's own database has started "
                "on it, or 'selfie-lora gc --force' is run.")
    return (f"refusing to collect garbage: {named}, yet the collection would delete {photos} "
            f"photo(s) and {weights} weights file(s), and {unbound}: is this the storage's "
            f"database? {SETTINGS_HINT}. If those blobs really are orphans, run "
            "'selfie-lora gc --force'.")


def adoption_doubt(refs: References) -> str:
    """Why a store marked by a release before migration 0021 is not recorded as the deployment's
    storage, as one line: it holds none of the photos or weights the database names."""
    return (f"not recording this storage as the deployment's: its {DEPLOYMENT_KEY} names this "
            f"deployment, yet it holds none of the {len(refs.datasets)} upload(s) and "
            f"{len(refs.version_ids)} version(s) this database names: is "
            "SELFIE_LORA_STORAGE_URL set for this process? Without it a process uses its own "
            "folder (HOME/blobs), which no other server or worker sees; "
            f"{SETTINGS_HINT}. Trainings and generations on this process will not find their "
            "photos or weights; the storage that holds them becomes the deployment's when a "
            "server or worker on it starts.")


def worker_elsewhere(refs: References) -> str:
    """What a worker whose storage holds no photo and no weights, while the database names
    uploads or versions, refuses to start with (``storage_elsewhere``)."""
    return (f"this worker's storage holds no photo and no weights, yet this database names "
            f"{len(refs.datasets)} upload(s) and {len(refs.version_ids)} version(s): is "
            "SELFIE_LORA_STORAGE_URL set for this worker as for the API servers? Without it a "
            "worker uses its own folder (HOME/blobs), where no training finds its photos. It "
            "takes no training until it is given the deployment's storage; the trainings stay "
            "queued for a worker that has it")


class DeploymentBinding:
    def __init__(self, *, repo: Repository, blobs: BlobStore,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._repo = repo
        self._blobs = blobs
        self._clock = clock
        # This process wrote the store's marker (``bind``): the collector still guards its
        # next collection as an unbound store's (``services.gc``).
        self.wrote_marker = False
        # Why ``bind`` left the store unbound when it is empty while the database names uploads
        # or versions: this process's storage is not the deployment's (SELFIE_LORA_STORAGE_URL
        # unset, so HOME/blobs), and a training it took would find none of its photos. A
        # worker refuses to start on it (``OperationsService.check_worker_storage``).
        self.storage_elsewhere: str | None = None

    def bind(self) -> str | None:
        """Binds the store to this database (a server or worker starting); the deployment's id.
        None, with a warning logged, when the store has no marker and does not look like this
        database's (module docstring): it stays unbound. A store a release before migration
        0021 marked for this deployment is recorded as its storage only when it holds one of
        the database's own blobs, or the database names none (else warned, left unrecorded,
        the id returned). ``DeploymentMismatchError`` when the store is another deployment's,
        or not the storage this deployment was bound to; ``StorageError`` when it cannot be
        reached."""
        # Read before writing: a put-if-absent that finds the marker rewrites it (it makes an
        # existing blob fresh), which every start of every process would do for nothing.
        marker = self._marker()
        if marker is None:
            doubt, elsewhere, empty, evidence = self._judge()
            bound_storage = (self._repo.get_deployment_storage_id() if empty and not evidence
                             else None)
            if bound_storage is not None:
                # Read again first: a process of this deployment starting beside this one (one
                # bucket, processes started at once) may have marked this very store, and
                # recorded it, between the first read and the database's answer.
                marker = self._marker()
                if marker is None:
                    # Nothing of the deployment's here, and the deployment was bound to a store
                    # whose marker was written before the database recorded it: this is another
                    # store (a process without SELFIE_LORA_STORAGE_URL: its own HOME/blobs), and
                    # marking it too would send each process's photos where no other one looks.
                    raise self._storage_elsewhere(bound_storage, here=None)
            else:
                if doubt is not None:
                    logger.warning("%s", doubt)
                    self.storage_elsewhere = elsewhere
                    return None
                database_id = self._repo.ensure_deployment_id(new_id(), now=self._clock())
                # The store's own id: two empty folders (each process's HOME/blobs) get two, while
                # one folder shared at different paths, or a bucket reached through another
                # endpoint, keeps the one its marker holds.
                storage_id = new_id()
                content = {"deployment_id": database_id, "storage_id": storage_id,
                           "created_at": self._clock().isoformat(),
                           "about": "the selfie-lora deployment this storage belongs to: the id its "
                                    "database holds (README, 'Garbage collection')"}
                if self._blobs.put(DEPLOYMENT_KEY, json.dumps(content, indent=1).encode(),
                                   if_absent=True):
                    # Bound on a start's evidence only: the collector's next collection checks
                    # again, against the whole listing (``services.gc``).
                    self.wrote_marker = True
                    self._bind_storage(storage_id, wrote=True, replace=evidence)
                    return database_id
                marker = self._marker()  # another process wrote it meanwhile
                if marker is None:  # pragma: no cover - the marker that refused ours is there
                    raise StorageError(f"the storage's {DEPLOYMENT_KEY} vanished while binding")
        store_id, storage_id = marker
        database_id = self._repo.ensure_deployment_id(new_id(), now=self._clock())
        if store_id != database_id:
            raise self._mismatch(database_id=database_id, store_id=store_id, action="start")
        if self._repo.get_deployment_storage_id() is None:
            # A deployment bound before the database recorded its storage (migration 0021)
            # adopts this store's marker, but only a store that holds the data, or when the
            # database names none: the release before marked every process's store, its own
            # empty HOME/blobs too when SELFIE_LORA_STORAGE_URL was missing, and adopting the
            # first one to start (a worker's) would refuse the API server holding every photo.
            refs = self._repo.gc_references()
            keys = own_keys(refs)
            if keys and not any(self._blobs.exists(key) for key in keys[:EVIDENCE_LOOKUPS]):
                # Left unadopted, as before 0021: warned, and a worker refuses to start on it
                # when it is empty; the store that holds the data is adopted when its own
                # process starts.
                logger.warning("%s", adoption_doubt(refs))
                if not any(self._holds(prefix) for prefix in PRECIOUS_PREFIXES):
                    self.storage_elsewhere = worker_elsewhere(refs)
                return database_id
        self._bind_storage(storage_id, wrote=False, replace=False)
        return database_id

    def _bind_storage(self, storage_id: str, *, wrote: bool, replace: bool) -> None:
        """Records ``storage_id`` as the deployment's storage when the database names none
        (or ``replace``: the store holds this database's own blobs); refuses when it names
        another."""
        bound = self._repo.bind_deployment_storage(storage_id, replace=replace)
        if bound == storage_id:
            return
        if wrote:
            # The marker this start wrote was never the deployment's (another process bound
            # its own store first): the store is left as it was found.
            self._blobs.delete(DEPLOYMENT_KEY)
            self.wrote_marker = False
        raise self._storage_elsewhere(bound, here=None if wrote else storage_id)

    def _storage_elsewhere(self, bound: str, *, here: str | None) -> DeploymentMismatchError:
        this = (f"this process's storage carries another marker ({here})" if here is not None
                else f"this process's storage has no {DEPLOYMENT_KEY} and holds none of this "
                     "database's photos or weights")
        return DeploymentMismatchError(
            f"refusing to start: this process's storage is not the deployment's: the "
            f"deployment was bound to the storage whose {DEPLOYMENT_KEY} has storage_id "
            f"{bound}, and {this}: is SELFIE_LORA_STORAGE_URL set for this process as for the "
            "deployment's other servers and workers? Without it each process uses its own "
            "folder (HOME/blobs), which no other one sees: a worker would find none of the "
            "photos an API server stored, and every training would fail. Give every process "
            "the same SELFIE_LORA_STORAGE_URL; to make a new storage the deployment's, copy "
            f"the deployment's storage into it, {DEPLOYMENT_KEY} included.")

    def doubt(self) -> str | None:
        """Why this unmarked store may not be bound to this database, as one line; None when
        it may: it holds one of the blobs only this database names (``own_keys``, up to
        ``EVIDENCE_LOOKUPS`` lookups: cheap on object storage too, and nothing is listed past
        the first key of each prefix), or it holds no photo and no weights and this database
        names none either (a new deployment). An empty store while the database names uploads
        or versions is not this database's: a process started without SELFIE_LORA_STORAGE_URL
        falls back to its own empty folder, and binding it would stamp that mistake as the
        deployment's storage."""
        return self._judge()[0]

    def _judge(self) -> tuple[str | None, str | None, bool, bool]:
        """``doubt``'s line; when the store is empty while the database names uploads or
        versions, what a worker on it is told (``storage_elsewhere``); whether the store holds
        no photo and no weights; whether it holds one of this database's own blobs."""
        empty = not any(self._holds(prefix) for prefix in PRECIOUS_PREFIXES)
        refs = self._repo.gc_references()
        keys = own_keys(refs)
        if empty and not keys:
            return None, None, True, False
        found = next((key for key in keys[:EVIDENCE_LOOKUPS] if self._blobs.exists(key)), None)
        doubt = unbound_doubt(refs, found=() if found is None else (found,), empty=empty)
        if doubt is None or not empty:
            return doubt, None, empty, found is not None
        return doubt, worker_elsewhere(refs), True, False

    def _holds(self, prefix: str) -> bool:
        listing = self._blobs.list(prefix)
        try:
            return next(listing, None) is not None
        finally:
            # A generator: closed now, not when collected (an S3 listing holds a connection).
            if (close := getattr(listing, "close", None)) is not None:
                close()

    def check(self, *, action: str = "collect garbage") -> str | None:
        """Before a collection, or an account's deletion (``action``, said in the refusal): the
        deployment's id when the store is bound to this database, None when the store has no
        marker yet (nothing started with this release binds it: the caller's own rule applies).
        ``DeploymentMismatchError`` when the marker names another deployment, or this database
        has none."""
        store_id = self.store_id()
        if store_id is None:
            return None
        database_id = self._repo.get_deployment_id()
        if database_id != store_id:
            raise self._mismatch(database_id=database_id, store_id=store_id, action=action)
        return store_id

    def store_id(self) -> str | None:
        """The id the store's marker names; None when it has none."""
        marker = self._marker()
        return None if marker is None else marker[0]

    def _marker(self) -> tuple[str, str] | None:
        """The deployment id the store's marker names, and the store's own id; None when it
        has none. A marker written before it held a storage_id is known by its bytes (its
        creation time differs between two stores)."""
        try:
            raw = self._blobs.get(DEPLOYMENT_KEY)
        except BlobMissingError:
            return None
        try:
            content = json.loads(raw)
            value = content["deployment_id"]
            storage = content.get("storage_id")
        except (ValueError, KeyError, TypeError, AttributeError):
            value = storage = None
        if not isinstance(value, str) or not value:
            # Not ours to judge, and not to be replaced: whoever wrote it may rely on it.
            raise DeploymentMismatchError(
                f"the storage's {DEPLOYMENT_KEY} names no deployment id: it is not one this "
                f"service wrote; {SETTINGS_HINT}")
        if not isinstance(storage, str) or not storage:
            storage = "marker-sha256-" + hashlib.sha256(raw).hexdigest()[:32]
        return value, storage

    def _mismatch(self, *, database_id: str | None, store_id: str | None,
                  action: str) -> DeploymentMismatchError:
        database = (f"this database's is {database_id}" if database_id is not None
                    else "this database has none (it was never used by a server or worker)")
        return DeploymentMismatchError(
            f"refusing to {action}: the storage ({DEPLOYMENT_KEY}) belongs to deployment "
            f"{store_id}, {database}: two deployments would share one storage, and each one's "
            f"garbage collection would delete the other's blobs; {SETTINGS_HINT} (one storage "
            "prefix per deployment). If this database really is that storage's (restored from "
            f"a backup made before {DEPLOYMENT_KEY} existed), delete {DEPLOYMENT_KEY} from the "
            "storage and start a server or worker again.")
