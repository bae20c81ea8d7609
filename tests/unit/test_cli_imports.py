"""What the ``selfie-lora`` command loads before it knows what it will do. Every command (and the
hundreds the tests start) paid for sqlalchemy and httpx, which selfie_lora.config imported for
two of its validators: about 0.45 of the 1.1 CPU-seconds ``selfie-lora --help`` took. Run in
fresh interpreters: this one has imported everything already."""

from __future__ import annotations

import json
import os
import py_compile
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from selfie_lora.config import REPLICATE_API_URL, Settings, _http_url

# None of these is needed to print the help or to read the settings; a module-level import of
# one of them (in cli, config, console, logs, errors, the domain) would load it for every command.
HEAVY = ("sqlalchemy", "httpx", "alembic", "huey", "numpy", "PIL", "torch", "diffusers",
         "selfie_lora.wiring", "selfie_lora.adapters")

REPORT = """
import json, sys
heavy = {heavy!r}
try:
    {body}
finally:
    sys.stderr.write("LOADED " + json.dumps([m for m in heavy if m in sys.modules]) + "\\n")
"""


def _loaded(tmp_path: Path, body: str, *, heavy: tuple[str, ...] = HEAVY,
            ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFIE_LORA_")}
    env["SELFIE_LORA_HOME"] = str(tmp_path / "home")
    code = REPORT.format(heavy=heavy, body=body)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=False, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.startswith("LOADED ")]
    assert len(lines) == 1, done.stderr
    loaded: list[str] = json.loads(lines[0].removeprefix("LOADED "))
    return done, loaded


def test_importing_the_command_line_loads_no_database_network_or_image_library(
        tmp_path: Path) -> None:
    done, loaded = _loaded(tmp_path, "import selfie_lora.cli")
    assert done.returncode == 0, done.stderr
    assert loaded == []


def test_reading_the_settings_loads_neither_sqlalchemy_nor_httpx(tmp_path: Path) -> None:
    done, loaded = _loaded(tmp_path, "from selfie_lora.config import get_settings; get_settings()")
    assert done.returncode == 0, done.stderr
    assert loaded == []


@pytest.mark.parametrize("args", [["--help"], ["users", "--help"], ["users", "create", "--help"]])
def test_a_help_loads_none_of_them(tmp_path: Path, args: list[str]) -> None:
    # users --help runs the top group's callback first, which reads the settings.
    body = (f"sys.argv = ['selfie-lora', *{args!r}]\n"
            "    from selfie_lora.__main__ import main\n"
            "    try:\n"
            "        main()\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code in (0, None), exc.code")
    done, loaded = _loaded(tmp_path, body)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    assert loaded == []
    assert not (tmp_path / "home").exists()  # a help makes no HOME


def test_the_default_replicate_address_is_one_the_check_accepts(tmp_path: Path) -> None:
    # The validator skips its httpx check for the default (no httpx at each start): the default
    # must be what the check accepts, and any other value is still checked.
    assert _http_url(REPLICATE_API_URL, form="x").host == "api.replicate.com"
    assert Settings(home=tmp_path).replicate_base_url == REPLICATE_API_URL
    with pytest.raises(ValueError, match="must be Replicate's API address"):
        Settings(home=tmp_path, replicate_base_url="api.replicate.com")


# What a model's work loads (train, generate, serve, worker, compare): a command that only reads
# or writes rows must never load it, or every such command pays seconds for it (diffusers alone
# is ~4.5 s of CPU to import).
MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "dlib", "cv2")


def _command_loads(tmp_path: Path, args: list[str], heavy: tuple[str, ...]) -> tuple[int, list[str]]:
    """Runs ``selfie-lora ARGS`` in a fresh interpreter on ``tmp_path``'s HOME, in-process (the
    entry point's ``main``): its exit status, and which of ``heavy`` it loaded."""
    code, loaded, _stderr = _command_run(tmp_path, args, heavy)
    return code, loaded


def _command_run(tmp_path: Path, args: list[str], heavy: tuple[str, ...]
                 ) -> tuple[int, list[str], str]:
    """``_command_loads``, and what the command wrote to stderr."""
    body = (f"sys.argv = ['selfie-lora', *{args!r}]\n"
            "    from selfie_lora.__main__ import main\n"
            "    try:\n"
            "        main()\n"
            "        code = 0\n"
            "    except SystemExit as exc:\n"
            "        code = exc.code or 0\n"
            "    sys.stderr.write(f'EXIT {code}\\n')")
    done, loaded = _loaded(tmp_path, body, heavy=heavy)
    exits = [line for line in done.stderr.splitlines() if line.startswith("EXIT ")]
    assert len(exits) == 1, done.stderr
    return int(exits[0].removeprefix("EXIT ")), loaded, done.stderr


# huey's import loads redis and psycopg whenever they are installed (its storage module tries
# both): ~0.1-0.3 s of CPU, which every command that built the services paid, on SQLite with
# the embedded queue too. A command that queues nothing must load none of them.
QUEUE_LIBRARIES = ("huey", "redis", "psycopg")


def test_the_commands_on_rows_load_no_model_nor_queue_library(tmp_path: Path) -> None:
    # One run of each command for both sets (each is a fresh interpreter, ~1 s of CPU).
    # (command, its exit status here: ann has no model yet, which model and versions say)
    for args, status in ((["users", "create", "ann"], 0), (["users", "list"], 0),
                         (["users", "keys", "list", "ann"], 0), (["model", "--user", "ann"], 1),
                         (["versions", "--user", "ann"], 1),
                         (["generations", "list", "--user", "ann"], 0), (["gc", "--dry-run"], 0),
                         (["gc"], 0)):
        code, loaded = _command_loads(tmp_path, args, MODEL_LIBRARIES + QUEUE_LIBRARIES)
        assert (code, [m for m in loaded if m in MODEL_LIBRARIES]) == (status, []), args
        # On SQLite: the queue is built at its first use, which none of these makes (old code:
        # huey, redis and psycopg, for each).
        assert [m for m in loaded if m in QUEUE_LIBRARIES] == [], args
    assert (tmp_path / "home" / "queue.db").is_file()  # made (private) all the same


def test_check_loads_no_database_nor_queue(tmp_path: Path) -> None:
    # check opens no database (wiring.build_photo_checks): SQLAlchemy, Alembic and huey (with
    # the redis and psycopg it imports) were ~0.5 s of CPU of each check, loaded for nothing.
    code, loaded = _command_loads(
        tmp_path, ["check", str(tmp_path / "no-such-folder")],
        ("sqlalchemy", "alembic", "huey", "redis", "psycopg", "selfie_lora.adapters.db",
         "selfie_lora.adapters.queue", *MODEL_LIBRARIES))
    assert (code, loaded) == (2, [])
    assert not (tmp_path / "home").exists()  # and makes no HOME


def test_a_command_on_a_database_at_this_release_s_schema_loads_no_alembic(
        tmp_path: Path) -> None:
    # Every command compares the database's revision with this release's head; Alembic (~0.1 s
    # of CPU, its scripts read too) is for a migration, which the first command here runs. A
    # merge migration (its down_revision a tuple) leaves the head to Alembic (migrate._chain):
    # teach _chain a merge's tuple then, or accept Alembic here.
    code, loaded = _command_loads(tmp_path, ["users", "create", "ann"], ())
    assert code == 0
    for args in (["users", "list"], ["users", "create", "bob"], ["gc", "--dry-run"]):
        code, loaded = _command_loads(tmp_path, args, ("alembic",))
        assert (code, loaded) == (0, []), args


def test_the_head_and_the_revisions_read_without_alembic_are_alembic_s() -> None:
    from selfie_lora.adapters.db import migrate

    # What matters is Alembic's answer; whether the files were read as text (they are today)
    # is the next test's, and a merge migration (its down_revision a tuple) is left to Alembic.
    scripts = migrate._scripts()
    assert migrate.head_revision() == scripts.get_current_head()
    assert migrate.known_revisions() == frozenset(s.revision for s in scripts.walk_revisions())


# Altered copies of the migrations folder (what a developer's checkout or an edited install may
# hold): the revisions read as text must be Alembic's, or left to Alembic (``_chain()`` None),
# never a head that skips a migration or refuses a database Alembic accepts.
_MIGRATION = ('"""x"""\nfrom alembic import op\n{revision}\n{down}\nbranch_labels = None\n'
              'depends_on = None\n\n\ndef upgrade() -> None:\n    pass\n\n\n'
              'def downgrade() -> None:\n    pass\n')


def _next(versions: Path, name: str, revision: str, down: str, *, tail: str = "",
          revision_line: str = "revision = {!r}", down_line: str = "down_revision = {!r}",
          ) -> None:
    (versions / name).write_text(_MIGRATION.format(
        revision=revision_line.format(revision), down=down_line.format(down)) + tail)


def _alter(case: str, versions: Path, head: str) -> None:
    newest = sorted(versions.glob("0*.py"))[-1]
    if case == "an editor's lock file beside a migration":  # Emacs: a dangling symlink
        os.symlink("ann@host.123:1700000000", versions / f".#{newest.name}")
    elif case == "a migration whose name starts with _":
        _next(versions, "_9001_fix.py", "9001", head)
    elif case == "a migration whose name starts with .":
        _next(versions, ".9001_tmp.py", "9001", head)
    elif case == "a migration with CRLF line ends":
        newest.write_bytes(newest.read_bytes().replace(b"\n", b"\r\n"))
    elif case == "depends_on and branch_labels set":
        _next(versions, "9001.py", "9001", head)
        text = (versions / "9001.py").read_text()
        (versions / "9001.py").write_text(text.replace("depends_on = None", 'depends_on = "0001"')
                                          .replace("branch_labels = None", 'branch_labels = ("x",)'))
    elif case == "a revision line in a string after the real one":
        _next(versions, "9001.py", "9001", head, tail='\nSQL = """\nrevision = "9099"\n"""\n')
    elif case == "a revision line Alembic reads and the text does not, and one in a string":
        _next(versions, "9001.py", "9001", head, revision_line="revision = {!r}  # new",
              tail='\nSQL = """\nrevision = "9099"\n"""\n')
    elif case == "a trailing comment":
        _next(versions, "9001.py", "9001", head, revision_line="revision = {!r}  # new")
    elif case == "a copy of a migration":
        shutil.copy(newest, versions / f"{newest.stem} copy.py")
    elif case == "two heads":
        _next(versions, "9001a.py", "9001a", head)
        _next(versions, "9001b.py", "9001b", head)
    elif case == "a merge":
        _next(versions, "9001a.py", "9001a", head)
        _next(versions, "9001b.py", "9001b", head)
        _next(versions, "9002.py", "9002", "", down_line='down_revision = ("9001a", "9001b")')
    elif case == "the first migration deleted (a squash)":
        sorted(versions.glob("0*.py"))[0].unlink()
    elif case == "a helper module beside the migrations":
        (versions / "_helpers.py").write_text("X = 1\n")
    elif case == "a latin-1 file with its coding line":
        _next(versions, "9001.py", "9001", head)
        text = (versions / "9001.py").read_text()
        (versions / "9001.py").write_bytes(
            b"# -*- coding: latin-1 -*-\n# caf\xe9\n" + text.encode())
    elif case == "a migration that is a symlink":
        (versions.parent / "elsewhere.txt").write_text(_MIGRATION.format(
            revision='revision = "9001"', down=f"down_revision = {head!r}"))
        os.symlink(versions.parent / "elsewhere.txt", versions / "9001.py")
    elif case == "compiled files only":
        for path in versions.glob("*.py"):
            py_compile.compile(str(path), cfile=f"{path}c")
            path.unlink()
    else:
        assert case == "as shipped", case


# The cases the text reads itself (the rest fall back to Alembic).
_READ_AS_TEXT = ("an editor's lock file beside a migration",
                 "a migration whose name starts with _", "a migration whose name starts with .",
                 "a migration with CRLF line ends", "depends_on and branch_labels set")
_FALLING_BACK = ("a revision line in a string after the real one",
                 "a revision line Alembic reads and the text does not, and one in a string",
                 "a trailing comment", "a copy of a migration", "two heads", "a merge",
                 "the first migration deleted (a squash)", "a helper module beside the migrations",
                 "a latin-1 file with its coding line", "a migration that is a symlink",
                 "compiled files only")


def _outcome(read: Callable[[], object]) -> object:
    try:
        return read()
    except Exception as exc:  # Alembic's refusals differ by case
        return f"raises {type(exc).__name__}"


@pytest.mark.parametrize("case", ["as shipped", *_READ_AS_TEXT, *_FALLING_BACK])
def test_an_altered_migrations_folder_reads_as_alembic_reads_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    from selfie_lora.adapters.db import migrate

    def forget() -> None:
        for cached in (migrate._chain, migrate._scripts, migrate.known_revisions):
            cached.cache_clear()

    forget()
    head = migrate._scripts().get_current_head()
    assert head is not None
    # Read as text when the shipped files are (a merge among them would be left to Alembic).
    shipped_as_text = migrate._chain() is not None
    copy = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    _alter(case, copy / "versions", head)
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", copy)
    forget()
    try:
        chain = _outcome(migrate._chain)
        ours = (_outcome(migrate.head_revision), _outcome(migrate.known_revisions))
        forget()
        scripts = _outcome(migrate._scripts)
        alembics = (_outcome(lambda: migrate._scripts().get_current_head()),
                    _outcome(lambda: frozenset(s.revision
                                               for s in migrate._scripts().walk_revisions())))
    finally:
        monkeypatch.undo()
        forget()
    assert not isinstance(scripts, str), scripts
    assert ours == alembics
    # Reading a file as text must never fail a start: it is left to Alembic then.
    if case in _FALLING_BACK:
        assert chain is None, chain
    elif case in _READ_AS_TEXT and shipped_as_text:
        assert chain is not None, chain


def test_serve_on_a_taken_port_is_refused_before_the_web_app_is_imported(tmp_path: Path) -> None:
    # The port was bound after the web app's imports: ~0.7 s of the ~1.1 s of CPU the refusal
    # took (tests/e2e/test_serve_port starts one).
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, loaded, stderr = _command_run(
            tmp_path, ["serve", "--host", "127.0.0.1", "--port", str(port)],
            ("fastapi", "selfie_lora.api.app", "selfie_lora.wiring", "sqlalchemy"))
    assert (code, loaded) == (1, [])
    # Refused for the port, not for anything before it (which would pass the above too).
    assert f"cannot listen on 127.0.0.1:{port}: " in stderr, stderr
    assert not (tmp_path / "home").exists()  # and makes no HOME


def test_serve_without_the_web_framework_installed_says_so_in_one_line(tmp_path: Path) -> None:
    # The web app's imports moved after the bind, outside the start's error handling: a module
    # missing (fastapi, its extra not installed) was a traceback, not the start's one line.
    body = ("sys.modules['fastapi'] = None  # as if not installed: its import raises\n"
            "    sys.argv = ['selfie-lora', 'serve', '--no-worker', '--host', '127.0.0.1',"
            " '--port', '0']\n"
            "    from selfie_lora.__main__ import main\n"
            "    try:\n"
            "        main()\n"
            "    except SystemExit as exc:\n"
            "        sys.stderr.write(f'EXIT {exc.code}\\n')")
    done, _loaded_modules = _loaded(tmp_path, body, heavy=())
    said = [line for line in done.stderr.splitlines() if not line.startswith("LOADED ")]
    assert said == ["error: a module this needs is not installed: fastapi", "EXIT 1"], done.stderr
