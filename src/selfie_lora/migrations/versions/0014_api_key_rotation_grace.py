"""A rotated API key keeps working for a grace period (``SELFIE_LORA_KEY_ROTATION_GRACE_MINUTES``)
so that a client whose rotation answer was lost can ask again with the key it holds: its
``revoked_at`` is then the end of the grace, and ``replaced_by`` names the key that replaced it
(a rotation asked again within the grace revokes that one, whose secret nobody received).

A nullable column and nothing to fill in: keys rotated before it were revoked at once. During a
rolling upgrade an older process reads a key in its grace as revoked (its ``revoked_at`` is set),
which only ends the grace early there; after a downgrade the same holds everywhere.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-20
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("replaced_by", sa.String(length=36), nullable=True))


def downgrade() -> None:
    # Not in batch mode: SQLite would copy ``api_keys`` (see 0013).
    op.execute("ALTER TABLE api_keys DROP COLUMN replaced_by")
