"""The pictures of a generation that its generator withheld (Replicate's safety checker), by their
place in the batch: the generation keeps the pictures that came instead of failing, and says
which are missing and with which seeds.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every generation stored so far has all its pictures: a withheld one failed it.
    op.add_column("generations", sa.Column("withheld", sa.JSON(), nullable=False,
                                           server_default="[]"))


def downgrade() -> None:
    op.drop_column("generations", "withheld")
