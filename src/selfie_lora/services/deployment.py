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

Only a process that serves or works on the data binds; ``selfie-lora gc`` and the other commands
never do, since a mistaken command binding a store to the wrong database is the very failure this
guards against. The collector checks (``check``) before it deletes anything: a marker naming
another id than its database's (or a database with none) stops it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from selfie_lora.errors import BlobMissingError, DeploymentMismatchError
from selfie_lora.services.common import new_id, utcnow
from selfie_lora.services.layout import DEPLOYMENT_KEY
from selfie_lora.services.ports import BlobStore, Repository

SETTINGS_HINT = "check SELFIE_LORA_DATABASE_URL and SELFIE_LORA_STORAGE_URL"


class DeploymentBinding:
    def __init__(self, *, repo: Repository, blobs: BlobStore,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._repo = repo
        self._blobs = blobs
        self._clock = clock

    def bind(self) -> str:
        """Binds the store to this database (a server or worker starting); the deployment's id.
        ``DeploymentMismatchError`` when the store is another deployment's; ``StorageError``
        when the store cannot be reached."""
        database_id = self._repo.ensure_deployment_id(new_id(), now=self._clock())
        # Read before writing: a put-if-absent that finds the marker rewrites it (it makes an
        # existing blob fresh), which every start of every process would do for nothing.
        store_id = self.store_id()
        if store_id is None:
            marker = {"deployment_id": database_id, "created_at": self._clock().isoformat(),
                      "about": "the selfie-lora deployment this storage belongs to: the id its "
                               "database holds (README, 'Garbage collection')"}
            if self._blobs.put(DEPLOYMENT_KEY, json.dumps(marker, indent=1).encode(),
                               if_absent=True):
                return database_id
            store_id = self.store_id()  # another process wrote it meanwhile
        if store_id != database_id:
            raise self._mismatch(database_id=database_id, store_id=store_id, action="start")
        return database_id

    def check(self) -> str | None:
        """Before a collection: the deployment's id when the store is bound to this database,
        None when the store has no marker yet (nothing started with this release binds it:
        the collector's own guard applies). ``DeploymentMismatchError`` when the marker names
        another deployment, or this database has none."""
        store_id = self.store_id()
        if store_id is None:
            return None
        database_id = self._repo.get_deployment_id()
        if database_id != store_id:
            raise self._mismatch(database_id=database_id, store_id=store_id,
                                 action="collect garbage")
        return store_id

    def store_id(self) -> str | None:
        """The id the store's marker names; None when it has none."""
        try:
            raw = self._blobs.get(DEPLOYMENT_KEY)
        except BlobMissingError:
            return None
        try:
            value = json.loads(raw)["deployment_id"]
        except (ValueError, KeyError, TypeError):
            value = None
        if not isinstance(value, str) or not value:
            # Not ours to judge, and not to be replaced: whoever wrote it may rely on it.
            raise DeploymentMismatchError(
                f"the storage's {DEPLOYMENT_KEY} names no deployment id: it is not one this "
                f"service wrote; {SETTINGS_HINT}")
        return value

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
