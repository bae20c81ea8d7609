"""The photo set's verdict (trainable, quality, score, reasons) on each dataset.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Adding a nullable column needs no table copy, even on SQLite.
    op.add_column("datasets", sa.Column("verdict", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("datasets", "verdict")
