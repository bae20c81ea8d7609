"""Whether a worker began the create of a training's remote run, so that a training whose
worker died with the create's answer (Replicate acted, its id never stored) and that is then
canceled still has its run found, by the upload's marker, and canceled.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No backfill: a training under way now gets the flag at its next create, and one whose
    # create was lost before this is adopted by the next attempt as before.
    op.add_column("trainings", sa.Column("remote_create_started", sa.Boolean(), nullable=False,
                                         server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("trainings", "remote_create_started")
