"""Where a worker uploaded the photos of a training's newest remote create (Replicate: the
file's URL, echoed by the run as ``input.input_images``), stored before the create: a run whose
create's answer was lost with its worker is then found by an exact match in the list, by the
next attempt and by a cancel alike, however many other trainings the account has.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No backfill: a training whose create began before this has no marker and is looked for
    # by its upload's metadata, as before.
    op.add_column("trainings", sa.Column("remote_marker", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("trainings", "remote_marker")
