"""The deployment: one row naming the deployment this database belongs to, so that the blob
store's marker (``deployment.json``, written by the first server or worker to start) binds the
store to this database, and a garbage collection run with another database refuses instead of
deleting every photo and every version's weights as orphans.

The row is made by the first server or worker that starts, not here: a database upgraded by a
mistaken ``selfie-lora gc`` must not get an id that a store could then be bound to.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deployment",
        # Always 1: the primary key allows one row, so racing first starts agree on one id.
        sa.Column("singleton", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("singleton = 1", name="deployment_singleton"),
        sa.PrimaryKeyConstraint("singleton"),
    )


def downgrade() -> None:
    op.drop_table("deployment")
