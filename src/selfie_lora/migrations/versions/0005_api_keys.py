"""API keys of their own: several per user, listed, revoked and rotated.

Each user's key moves from ``users.api_key_hash`` to a row named "default" in ``api_keys``
(its prefix is unknown: only its hash was kept). The old column stays, unused and filled with
"unused:<user id>": SQLite cannot drop a UNIQUE column without copying ``users``, which every
other table refers to.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    # The user's id doubles as the id of its first key: unique, and known without a lookup.
    op.execute("INSERT INTO api_keys (id, user_id, name, key_hash, prefix, created_at) "
               "SELECT id, id, 'default', api_key_hash, 'sl_', created_at FROM users")
    op.execute("UPDATE users SET api_key_hash = 'unused:' || id")


def downgrade() -> None:
    # Each user gets back the oldest of its keys that is not revoked (if any).
    op.execute("UPDATE users SET api_key_hash = COALESCE((SELECT k.key_hash FROM api_keys k "
               "WHERE k.user_id = users.id AND k.revoked_at IS NULL "
               "ORDER BY k.created_at LIMIT 1), api_key_hash)")
    op.drop_index("ix_api_keys_user_id", table_name="api_keys")
    op.drop_table("api_keys")
