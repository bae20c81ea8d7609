"""A backup of a deployment's data (``selfie-lora backup`` / ``restore``): what it holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The manifest's format: a restore refuses one it does not know.
BACKUP_FORMAT = 1
# Written last: a backup without it was cut short and is never restored.
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class BackupSummary:
    """What a backup holds (or a restore brought back)."""

    path: Path
    created_at: str
    schema_revision: str | None
    counts: dict[str, int] = field(default_factory=dict)  # rows per table
    blobs: int = 0
    blob_bytes: int = 0
    # Blobs the database names that the storage did not hold when the backup was taken.
    missing: tuple[str, ...] = ()
    # A restore: where the HOME it replaced was kept (None: HOME was empty or missing).
    replaced: Path | None = None
    # A restore: what went wrong after HOME was already the backup's (it is still restored).
    warnings: tuple[str, ...] = ()
