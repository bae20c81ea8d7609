"""An index on when a user's deletion was asked for (``users.erasure_requested_at``): the
periodic check of every worker, ``serve`` and ``gc`` (``AccountEraser.finish_pending``) and
``gc``'s list of the pending deletions filter users on it and sort by it, and each went through
every user without one.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_users_erasure_requested_at", "users", ["erasure_requested_at"])


def downgrade() -> None:
    op.drop_index("ix_users_erasure_requested_at", table_name="users")
