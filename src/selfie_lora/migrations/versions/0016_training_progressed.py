"""Whether a training's current attempt made progress its successor keeps (a checkpoint past the
one it resumed from, a poll of its remote run): the take-over of such an attempt starts the count
of recoveries again, so that only attempts in a row that got nowhere fail a training.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No backfill: an attempt under way now sets it at its next checkpoint or poll.
    op.add_column("trainings", sa.Column("progressed", sa.Boolean(), nullable=False,
                                         server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("trainings", "progressed")
