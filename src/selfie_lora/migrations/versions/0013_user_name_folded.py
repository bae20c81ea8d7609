"""User names are unique whatever their case: "Ann" and "ann" were two accounts (the name was
matched exactly, while the sign-in limit already folded case). Each user gets ``name_folded``,
its name case-folded, under a unique index; sign-in and every lookup by name go through it.

A database that already holds names differing only in case is refused, naming them: which of two
people keeps "ann" is the operator's call, not this migration's. Rename all but one of each
group (the error says how), then start again; nothing was changed by the refused upgrade.

The column stays nullable: making it NOT NULL on SQLite means copying ``users``, which other
tables' keys refer to. Every user this version writes has it; the repository still finds by its
exact name a user written without it (by an older process during a rolling upgrade).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-14
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from selfie_lora.errors import ConfigError

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _fold(name: str) -> str:
    # domain.accounts.fold_name as of this migration (a copy: a migration must not change when
    # the code after it does).
    return name.casefold()


def upgrade() -> None:
    connection = op.get_bind()
    users = connection.execute(sa.text("SELECT id, name FROM users ORDER BY created_at, id")).all()
    groups: dict[str, list[str]] = defaultdict(list)
    for _id, name in users:
        groups[_fold(name)].append(name)
    clashes = [names for names in groups.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" and ".join(repr(n) for n in names) for names in clashes)
        example = clashes[0][-1]
        renamed = f"{example[:98]}-2"  # a name fits in 100 characters
        raise ConfigError(
            "cannot upgrade the database: user names must now differ by more than case, and "
            f"these accounts' names do not: {listed}. Rename all but one of each (a renamed "
            f"account keeps its keys and models), e.g. UPDATE users SET name = '{renamed}' "
            f"WHERE name = '{example}'; then start again (nothing was changed)")
    op.add_column("users", sa.Column("name_folded", sa.String(length=100), nullable=True))
    if users:
        connection.execute(sa.text("UPDATE users SET name_folded = :folded WHERE id = :id"),
                           [{"folded": _fold(name), "id": id_} for id_, name in users])
    op.create_index("ux_users_name_folded", "users", ["name_folded"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_users_name_folded", table_name="users")
    # Not in batch mode: SQLite would copy ``users`` (see 0006).
    op.execute("ALTER TABLE users DROP COLUMN name_folded")
