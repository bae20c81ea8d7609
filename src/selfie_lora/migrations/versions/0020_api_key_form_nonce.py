"""A key made by the settings page's form: the SHA-256 of the form's one-time nonce, or NULL (a
key made by the API, the CLI or a rotation). Unique: a form sent again (a reload, Back) finds
its key made and makes no other.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every key so far was made without such a form's nonce.
    op.add_column("api_keys", sa.Column("form_nonce_hash", sa.String(64), nullable=True))
    op.create_index("ux_api_keys_form_nonce_hash", "api_keys", ["form_nonce_hash"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_api_keys_form_nonce_hash", table_name="api_keys")
    op.drop_column("api_keys", "form_nonce_hash")
