"""Bring a database to the newest schema with Alembic (SQLite and PostgreSQL alike)."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

from selfie_lora.database_url import database_url_shown
from selfie_lora.domain.accounts import fold_name
from selfie_lora.errors import ConfigError

# Alembic is imported where a migration runs (``_migrate``) or its scripts are walked: every
# command compares the database's revision with this release's head, and loading Alembic (and
# its scripts) for that one comparison cost each command ~0.1 s of CPU.
if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

logger = logging.getLogger(__name__)

# An arbitrary 64-bit key that names "selfie-lora's schema migration" among advisory locks.
MIGRATION_LOCK_KEY = 0x5E1F_1E10_4A00_0001
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://"))


# A migration's own lines ``revision: str = "0024"`` and ``down_revision: str | None = "0023"``.
_REVISION_LINE = re.compile(
    r"""^(?P<key>revision|down_revision)\b[^=\n]*=\s*(?:None|(?P<q>["'])(?P<id>[^"'\n]+)(?P=q))\s*$""",
    re.M)
# Any column-0 assignment to either name, read or not: more of these than of the lines above
# (a form the text does not read beside one in a string, say) and the text cannot tell which
# one Python keeps.
_ANY_REVISION_LINE = re.compile(r"^(?:revision|down_revision)\b\s*[:=]", re.M)
# Alembic's own rule for a migration's file name (``alembic.script.base._only_source_rev_file``):
# every ``*.py`` but ``__init__*`` and the ``.#*`` lock files Emacs leaves beside an edited one.
_MIGRATION_FILE = re.compile(r"(?!\.\#|__init__)(.*\.py)$")


@functools.cache
def _chain() -> tuple[str, ...] | None:
    """The migrations' revisions from the first to the head, read from the files as text, as
    Alembic reads them but without loading Alembic. None, and Alembic's own reading is used
    (~0.1 s more), whenever the text could disagree with it: a file not read as UTF-8 or not
    saying both lines once in their plain form (a merge's tuple, a computed id, a trailing
    comment), a symlink (Alembic reads the file it points to, under that name), a revision in
    two files, or revisions that are not one straight chain (two heads, a missing one). A
    wrong head would leave a database unmigrated, or refuse one Alembic migrated."""
    try:
        entries = sorted(os.scandir(MIGRATIONS_DIR / "versions"), key=lambda e: e.name)
    except OSError:
        return None
    revises: dict[str, str | None] = {}
    for entry in entries:
        if not _MIGRATION_FILE.match(entry.name) or entry.is_dir(follow_symlinks=False):
            continue
        if entry.is_symlink():
            return None
        try:
            text = Path(entry.path).read_text("utf-8")
        except (OSError, ValueError):  # UnicodeDecodeError: a file with a coding line of its own
            return None
        found = {m["key"]: m["id"] for m in _REVISION_LINE.finditer(text)}
        if (set(found) != {"revision", "down_revision"} or found["revision"] is None
                or len(_ANY_REVISION_LINE.findall(text)) != 2 or found["revision"] in revises):
            return None
        revises[found["revision"]] = found["down_revision"]
    revised_by = {down: revision for revision, down in revises.items()}
    if len(revised_by) != len(revises):  # two revise one (a branch), or two are first
        return None
    # From the first up: each revision is revised by at most one, so this visits each once.
    chain: list[str] = []
    while (revision := revised_by.get(chain[-1] if chain else None)) is not None:
        chain.append(revision)
    if not chain or len(chain) != len(revises):  # none, or some not reached from the first
        return None
    return tuple(chain)


def head_revision() -> str | None:
    """The newest migration's revision (read from the scripts once per process)."""
    chain = _chain()
    if chain is not None:
        return chain[-1]
    return _scripts().get_current_head()  # several heads: Alembic says so as it always did


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every revision this release's migrations know."""
    chain = _chain()
    if chain is not None:
        return frozenset(chain)
    return frozenset(script.revision for script in _scripts().walk_revisions())


def _schema_revisions(connection: Connection) -> list[str] | None:
    """The revisions the database says it is at; None: it has no schema of ours yet."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    return [r[0] for r in connection.execute(text("SELECT version_num FROM alembic_version"))]


def _refuse_unknown(revisions: list[str]) -> None:
    """A revision this release does not know was written by a newer one: Alembic would fail on
    it with a traceback ("Can't locate revision"), and this release's code would read and write
    tables whose meaning it does not know."""
    unknown = [r for r in revisions if r not in known_revisions()]
    if unknown:
        raise ConfigError(
            f"the database's schema ({', '.join(unknown)}) is newer than this release's "
            f"({head_revision()}): upgrade selfie-lora here to the release that upgraded the "
            "database (every process of a deployment runs the same one); nothing was changed")


def _known_revisions(engine: Engine) -> list[str] | None:
    """The database's schema revisions (None: no schema yet), one query; ``ConfigError`` when
    it is at one newer than this release knows."""
    with engine.connect() as connection:
        revisions = _schema_revisions(connection)
    if revisions is not None:
        _refuse_unknown(revisions)
    return revisions


def at_head(engine: Engine) -> bool:
    """Whether the database is already at the newest schema (one query, no Alembic run).
    Raises ``ConfigError`` when it is at one newer than this release knows."""
    return _known_revisions(engine) == [head_revision()]


def require_head(engine: Engine) -> None:
    """Refuses (``ConfigError``) a database that is not at this release's schema, migrating
    nothing: for the commands that only read (``gc --dry-run``, ``users list``). Upgrading is for
    good: once a newly installed release has upgraded it, the older release's processes refuse
    to start on it, so a look at the data must not do it behind the operator's back."""
    revisions = _known_revisions(engine) or []
    if revisions == [head_revision()]:
        return
    if not revisions:
        # A new SELFIE_LORA_DATABASE_URL (or a database downgraded to nothing) read as "the
        # database's schema (none) is older than ...": say it is empty and what creates it.
        raise ConfigError(
            "the database has no selfie-lora schema yet (a new or empty database), and this "
            "command only reads: 'selfie-lora serve' or 'selfie-lora worker' creates it, as "
            "does any command that changes data (such as 'selfie-lora users create NAME'); "
            "nothing was changed")
    raise ConfigError(
        f"the database's schema ({', '.join(revisions)}) is older than this "
        f"release's ({head_revision()}), and this command only reads: 'selfie-lora serve' or "
        "'selfie-lora worker' of this release upgrades it, as does any command that changes "
        "data (the older release then no longer starts on it); nothing was changed")


@contextmanager
def _unbounded(connection: Connection) -> Iterator[None]:
    if connection.dialect.driver != "psycopg":
        yield
        return
    from selfie_lora.adapters.db.postgres import answering_within

    with answering_within(connection.connection.dbapi_connection, None):
        yield


def upgrade(engine: Engine) -> None:
    """Run every pending migration on ``engine``'s database. Every command and process calls
    this at start-up; a database already at head costs one query, not an Alembic run (and one
    more, ``fill_folded_names``)."""
    if not at_head(engine):
        _migrate(engine)
    fill_folded_names(engine)


def fill_folded_names(engine: Engine) -> None:
    """Users written without ``name_folded`` get it: a process of the release before 0013 went
    on signing users up during a rolling upgrade. Until then the repository finds them by their
    name lowered; from here the unique index holds them too. Names that differ only in case
    (one such user beside another) are refused as 0013 refuses them, and nothing is changed."""
    with engine.begin() as connection:
        unfolded = connection.execute(text(
            "SELECT id, name FROM users WHERE name_folded IS NULL ORDER BY created_at, id")).all()
        if not unfolded:
            return
        if connection.dialect.name == "postgresql":  # one start fills them in, the rest wait
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": MIGRATION_LOCK_KEY})
        users = connection.execute(text(
            "SELECT id, name, name_folded FROM users ORDER BY created_at, id")).all()
        groups: dict[str, list[str]] = defaultdict(list)
        for _id, name, folded in users:
            groups[folded if folded is not None else fold_name(name)].append(name)
        clashes = [names for names in groups.values() if len(names) > 1]
        if clashes:
            raise ConfigError(
                "cannot start: user names must differ by more than case, and these accounts' "
                f"names do not: {_listed(clashes)} (an older release made one beside the other "
                f"during the upgrade). {rename_advice(clashes[0][-1])}")
        connection.execute(
            text("UPDATE users SET name_folded = :folded WHERE id = :id AND name_folded IS NULL"),
            [{"folded": fold_name(name), "id": id_} for id_, name in unfolded])
    logger.info("filled in the folded name of %d user(s) written by an older release",
                len(unfolded))


def _listed(clashes: list[list[str]]) -> str:
    return "; ".join(" and ".join(repr(n) for n in names) for names in clashes)


def rename_advice(example: str) -> str:
    """How to rename one account of a clash. The new name fits the column (100 characters)."""
    renamed = f"{example[:98]}-2"
    return (f"Rename all but one of each (a renamed account keeps its keys and models), e.g. "
            f"UPDATE users SET name = '{renamed}' WHERE name = '{example}'; then start again "
            "(nothing was changed)")


def _migrate(engine: Engine) -> None:
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection, _unbounded(connection):
        if connection.dialect.name == "postgresql":
            # A migration takes as long as it takes (an index on a large table), and so does
            # the wait for another process's: no statement or answer time-out while it runs.
            connection.execute(text("SET LOCAL statement_timeout = 0"))
            # Every API server and worker of a deployment upgrades at start-up, often at the
            # same moment: one at a time (the lock ends with this transaction), and the next
            # finds the schema at head.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": MIGRATION_LOCK_KEY})
        # Again under the lock: a newer release may have upgraded it since ``at_head``.
        before = _schema_revisions(connection)
        _refuse_unknown(before or [])
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
        after = _schema_revisions(connection) or []
    _log_migration(engine, before=before, after=after)


def _log_migration(engine: Engine, *, before: list[str] | None, after: list[str]) -> None:
    where = database_url_shown(engine.url)
    if before == after:
        # Another process of the deployment upgraded it while this one waited for the lock.
        logger.debug("database already at %s (upgraded by another process): %s",
                     ", ".join(after), where)
    elif not before:
        logger.info("created the database schema at %s: %s", ", ".join(after), where)
    else:
        # WARNING, not INFO: the upgrade is for good (the older release refuses the database
        # from now on), so it must reach an operator whose log pipeline keeps warnings only;
        # it comes once per deployment and release, from the one process that ran it.
        logger.warning(
            "database schema upgraded from %s to %s: %s; a release older than this one refuses "
            "it from now on: see README 'Rolling back to the previous release'",
            ", ".join(before), ", ".join(after), where)
