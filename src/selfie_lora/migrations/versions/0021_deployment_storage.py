"""The storage a deployment was bound to: the random id of the store's marker
(``deployment.json``) that the first server or worker bound, so that a process given another,
empty store (SELFIE_LORA_STORAGE_URL unset on the scale path: each process's own HOME/blobs)
refuses to start instead of marking that store as the deployment's too.

NULL on every database bound before: the first server or worker that starts with this release
adopts the marker of the store it finds (``services.deployment``).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("deployment", sa.Column("storage_id", sa.String(128), nullable=True))


def downgrade() -> None:
    op.drop_column("deployment", "storage_id")
