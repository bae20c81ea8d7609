"""What ``users delete`` still has to delete in storage for a user whose rows it deleted: the
blob keys, the prefixes and the training work folders it computed, stored in the transaction
that deleted the rows, so that the command run again after a kill deletes those blobs at once
instead of leaving them to a later collection's grace period.

NULL on every user so far: none is half deleted by a release that stores it.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("erasure_plan", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "erasure_plan")
