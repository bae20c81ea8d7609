"""Each dataset photo's face box (fractions of the stored photo), for the face-weighted loss.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no backfill: a dataset stored before this has no boxes (its photos were cropped
    # without keeping where the face went), and trains with an unweighted loss.
    op.add_column("datasets", sa.Column("face_boxes", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("datasets", "face_boxes")
