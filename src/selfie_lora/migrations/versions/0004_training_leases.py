"""Training leases (owner, attempt, expiry, heartbeat), the trainer's figures on the training,
upload claims and received webhook ids.

Trainings that were running when this migration ran have no lease: the reconciler of the first
worker to start takes them over like any orphan.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (nullable or with a server default): no table copy, even on SQLite.
    op.add_column("trainings", sa.Column("metrics", sa.JSON(), nullable=True))
    op.add_column("trainings", sa.Column("attempt", sa.Integer(), server_default="0",
                                         nullable=False))
    op.add_column("trainings", sa.Column("recoveries", sa.Integer(), server_default="0",
                                         nullable=False))
    op.add_column("trainings", sa.Column("lease_owner", sa.String(length=200), nullable=True))
    op.add_column("trainings", sa.Column("lease_expires_at", sa.DateTime(timezone=True),
                                         nullable=True))
    op.add_column("trainings", sa.Column("heartbeat_at", sa.DateTime(timezone=True),
                                         nullable=True))
    op.create_table(
        "upload_claims",
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("token", sa.String(length=36), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("user_id"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_deliveries_received_at", "webhook_deliveries", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_received_at", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_table("upload_claims")
    for column in ("heartbeat_at", "lease_expires_at", "lease_owner", "recoveries", "attempt",
                   "metrics"):
        op.drop_column("trainings", column)
