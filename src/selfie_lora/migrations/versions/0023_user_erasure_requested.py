"""When a deletion of the user was asked for (``users delete``, ``DELETE /api/me``, the web
page's delete): set in the transaction that disables the account, so that a deletion whose
process died is known as one, and the periodic collection finishes it without anyone acting.

NULL on every user so far: a release that did not store it cannot say which disabled account
was half deleted (the command run again still finishes one).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("erasure_requested_at", sa.DateTime(timezone=True),
                                     nullable=True))


def downgrade() -> None:
    op.drop_column("users", "erasure_requested_at")
