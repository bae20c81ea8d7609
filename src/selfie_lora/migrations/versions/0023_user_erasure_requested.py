"""When a deletion of the user was asked for (``users delete``, ``DELETE /api/me``, the web
page's delete): set in the transaction that disables the account, so that a deletion whose
process died is known as one, and the periodic collection finishes it without anyone acting.

Set on a user the previous release left half deleted, one whose row holds an erasure plan
(0022: a ``users delete`` killed after deleting her rows): asked for when she was disabled (now
if that is not known), so due at once, shown as pending, refused by ``users enable`` and
finished by the next collection. NULL on every other user: a release before 0022 did not store
which disabled account was half deleted (the command run again still finishes one).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("erasure_requested_at", sa.DateTime(timezone=True),
                                     nullable=True))
    stamp = sa.DateTime(timezone=True)
    users = sa.table("users", sa.column("disabled_at", stamp),
                     sa.column("erasure_requested_at", stamp),
                     sa.column("erasure_plan", sa.JSON()))
    # A JSON 'null' is no plan either (the repository reads it as None); compared as text,
    # the one comparison SQLite and PostgreSQL's json both accept.
    half_deleted = (users.c.erasure_plan.is_not(None)
                    & (sa.cast(users.c.erasure_plan, sa.Text()) != "null"))
    now = sa.literal(datetime.now(UTC), stamp)
    op.execute(users.update().where(half_deleted)
               .values(erasure_requested_at=sa.func.coalesce(users.c.disabled_at, now)))


def downgrade() -> None:
    op.drop_column("users", "erasure_requested_at")
