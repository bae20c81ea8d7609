"""Seeds past 2**31 and weights methods of any length fit on PostgreSQL.

The API takes unsigned 32-bit seeds (0 to 2**32-1) and every generation now records its seed, but
``generations.seed`` was a 32-bit INTEGER: a seed of 2**31 or more failed the save after the
images were made and stored. ``weights_method`` (trainings and versions) is built from the
trainer's output, file names inside Replicate's archive included, and VARCHAR(200) refused a long
one when the training succeeded.

SQLite is left as it is: its INTEGER holds 64 bits and it never enforces a VARCHAR's length, and
changing a declared type there means copying ``trainings`` and ``versions``, which other tables'
foreign keys point at (the tables declare the SQLite types as variants).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-11
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INT32_MAX = 2**31 - 1
OLD_METHOD_LENGTH = 200


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column("generations", "seed", type_=sa.BigInteger(), existing_type=sa.Integer(),
                    existing_nullable=True)
    for table, nullable in (("trainings", True), ("versions", False)):
        op.alter_column(table, "weights_method", type_=sa.Text(),
                        existing_type=sa.String(length=OLD_METHOD_LENGTH),
                        existing_nullable=nullable)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # The old columns cannot hold what the new ones may: a seed past 2**31-1 is forgotten (the
    # code of 0010 records generations without a seed too) and a weights method is cut to 200
    # characters (it is a description for the log), rather than a downgrade that fails.
    op.alter_column("generations", "seed", type_=sa.Integer(), existing_type=sa.BigInteger(),
                    existing_nullable=True,
                    postgresql_using=f"CASE WHEN seed > {INT32_MAX} THEN NULL ELSE seed END")
    for table, nullable in (("trainings", True), ("versions", False)):
        op.alter_column(table, "weights_method", type_=sa.String(length=OLD_METHOD_LENGTH),
                        existing_type=sa.Text(), existing_nullable=nullable,
                        postgresql_using=f"left(weights_method, {OLD_METHOD_LENGTH})")
