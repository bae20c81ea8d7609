"""``selfie-lora backup`` and ``restore``: the default deployment's data (SQLite and the files in
SELFIE_LORA_HOME) copied out consistently and back whole. A deployment on PostgreSQL or object
storage is refused with what to use instead: those services have their own tools, made for
their size and their consistency (a dump of the files here would be neither)."""

from __future__ import annotations

import logging
from pathlib import Path

from selfie_lora.domain.backup import BackupSummary
from selfie_lora.errors import ConfigError
from selfie_lora.services.ports import Backups

logger = logging.getLogger(__name__)

# What a deployment whose data is not all in HOME is told to use instead, one line.
_INSTEAD = {
    "postgres": "its database is PostgreSQL: back it up with pg_dump (restore with pg_restore)",
    "sqlite": "its database is a SQLite file outside SELFIE_LORA_HOME "
              "(SELFIE_LORA_DATABASE_URL): back it up with sqlite3's .backup command",
    "storage": "its photos and weights are in object storage (SELFIE_LORA_STORAGE_URL): keep "
               "them with the bucket's own versioning or replication",
    # The database elsewhere, the files still in HOME: a dump alone restores rows naming blobs
    # the HOME may not have, and a lost secret_key ends every web session.
    "files": "its photos and weights are files in SELFIE_LORA_HOME/blobs (its deployment.json "
             "too): copy that folder after the database, and SELFIE_LORA_HOME/secret_key (the "
             "web sessions' key) unless SELFIE_LORA_SECRET_KEY is set",
}


class BackupService:
    def __init__(self, *, backups: Backups, database: str = "home",
                 storage_elsewhere: bool = False) -> None:
        """``database``: "home" (the SQLite file in HOME), "sqlite" (one elsewhere) or
        "postgres"."""
        self._backups = backups
        self._instead = [_INSTEAD[what] for what, yes in (
            (database, database != "home"), ("storage", storage_elsewhere),
            ("files", database != "home" and not storage_elsewhere)) if yes]

    def _refuse_elsewhere(self) -> None:
        if self._instead:
            raise ConfigError("selfie-lora backup and restore cover SQLite and the files in "
                              "SELFIE_LORA_HOME only; " + "; ".join(self._instead))

    def backup(self, *, dest: Path) -> BackupSummary:
        """A consistent copy of the live data (servers and workers may keep running)."""
        self._refuse_elsewhere()
        summary = self._backups.backup(dest=dest)
        logger.debug("backed up %d blob(s) to %s", summary.blobs, dest)
        return summary

    def restore(self, *, source: Path, force: bool = False) -> BackupSummary:
        """The backup at ``source`` in place of HOME's data (stop servers and workers first)."""
        self._refuse_elsewhere()
        summary = self._backups.restore(source=source, force=force)
        logger.debug("restored %s from %s", summary.path, source)
        return summary
