"""When a held version's alert is next due to be sent (NULL: nothing to send), so that an
alert whose sender died, or whose delivery failed, is sent again.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No backfill: alerts recorded before this were sent once, or logged as failed, and an old
    # alert sent days later would only confuse the operator.
    op.add_column("versions", sa.Column("alert_due_at", sa.DateTime(timezone=True),
                                        nullable=True))
    op.create_index("ix_versions_alert_due_at", "versions", ["alert_due_at"])


def downgrade() -> None:
    op.drop_index("ix_versions_alert_due_at", table_name="versions")
    op.drop_column("versions", "alert_due_at")
