"""Whether an ended training's remote run is still to be canceled, so that the cancel of a
remote run survives a crash right after the training ended, or an outage of the backend: the
reconciler asks again until the backend has it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No backfill: trainings that ended before this had their remote run canceled once, best
    # effort, and asking again for runs long over would only cost requests.
    op.add_column("trainings", sa.Column("remote_cancel_pending", sa.Boolean(), nullable=False,
                                         server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("trainings", "remote_cancel_pending")
