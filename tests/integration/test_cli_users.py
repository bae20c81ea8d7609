"""``selfie-lora users create NAME --password`` and ``users password NAME``: the password is
read twice (two lines of standard input when it is not a terminal), and a mismatch or a weak
password changes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfie_lora import console as console_module
from selfie_lora.cli import app
from selfie_lora.config import Settings
from selfie_lora.wiring import build_services
from tests.support.passwords import fast_password_hashing

PASSWORD = "a long password"


def sign_in(home: Path, name: str, password: str) -> str:
    services = build_services(Settings(home=home), trainers={}, generators={})
    try:
        return services.users.sign_in(name=name, password=password, client="test").user.name
    finally:
        services.close()


@pytest.fixture
def fast_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2 at a test cost for the commands and ``sign_in`` here: at the default cost each
    hash and each check took up to a second on a loaded machine. The test of ``users create
    --password`` keeps the default, the hasher the command line is wired with."""
    fast_password_hashing(monkeypatch)


def test_create_with_a_password_read_from_standard_input(home: Path) -> None:
    result = CliRunner().invoke(app, ["users", "create", "ann", "--password", "--json"],
                                input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["user"] == "ann"
    assert answer["password_set"] is True
    assert answer["api_key"].startswith("sl_")
    assert sign_in(home, "ann", PASSWORD) == "ann"


@pytest.mark.parametrize(("lines", "why"), [
    (f"{PASSWORD}\nanother password\n", "differ"),
    (f"{PASSWORD}\n", "two lines"),
    ("short\nshort\n", "at least 10"),
])
def test_a_bad_password_creates_nobody(home: Path, lines: str, why: str) -> None:
    result = CliRunner().invoke(app, ["users", "create", "ann", "--password"], input=lines)
    assert result.exit_code == 1
    assert why in result.output
    services = build_services(Settings(home=home), trainers={}, generators={})
    try:
        assert services.repo.get_user_by_name("ann") is None
    finally:
        services.close()


def test_users_password_sets_and_changes_it(home: Path, fast_passwords: None) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["users", "create", "bob"]).exit_code == 0
    result = runner.invoke(app, ["users", "password", "bob"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert sign_in(home, "bob", PASSWORD) == "bob"
    assert runner.invoke(app, ["users", "password", "nobody"],
                         input=f"{PASSWORD}\n{PASSWORD}\n").exit_code == 1


@pytest.mark.parametrize("columns", [80, 120])
def test_keys_list_shows_the_whole_id_that_revoke_takes(
        home: Path, monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    """At an 80-column terminal the id was cut ('679bdd9f-d184-4e2…'), at 120 too once a key was
    revoked, and revoke and rotate take nothing less than the whole id."""
    runner = CliRunner()
    assert runner.invoke(app, ["users", "create", "bob"]).exit_code == 0
    made = runner.invoke(app, ["users", "keys", "create", "bob", "--name", "the nightly ci job",
                               "--json"])
    ci_key = json.loads(made.stdout.strip().splitlines()[-1])["id"]
    listed = json.loads(runner.invoke(app, ["users", "keys", "list", "bob", "--json"]).stdout)
    assert [k["name"] for k in listed["keys"]] == ["default", "the nightly ci job"]
    assert set(listed["keys"][0]) == {"id", "name", "prefix", "created_at", "revoked_at",
                                      "replaced_by", "active"}  # GET /api/keys's, no secret
    first = listed["keys"][0]["id"]
    assert runner.invoke(app, ["users", "keys", "revoke", "bob", first]).exit_code == 0

    # The consoles' width: COLUMNS is read once, when they are made.
    monkeypatch.setattr(console_module.console, "_width", columns)
    monkeypatch.setattr(console_module.err_console, "_width", columns)
    table = runner.invoke(app, ["users", "keys", "list", "bob"])
    assert table.exit_code == 0, table.output
    shown = [line.split("│")[1].strip() for line in table.stdout.splitlines()
             if line.startswith("│") and line.split("│")[1].strip()]
    assert shown == [first, ci_key]
    assert max(len(line) for line in table.stdout.splitlines()) <= columns
    # Each time whole on its line: at 80 columns the created one was '2026-12' '-06' '16:51'.
    times = [line.split("│")[3].strip() for line in table.stdout.splitlines()
             if line.startswith("│")]
    minute = r"\d{4}-\d\d-\d\d \d\d:\d\d"
    assert len(re.findall(minute, " ".join(times))) == 3, table.stdout  # 2 made, 1 revoked
    assert all(re.search(minute, t) for t in times if t[:1].isdigit()), table.stdout
    assert "revoked" in " ".join(times)
    rotated = runner.invoke(app, ["users", "keys", "rotate", "bob", shown[1], "--json"])
    assert rotated.exit_code == 0, rotated.output
    # A rotated key still working says so ('rotated: works until ...'), in the same width.
    table = runner.invoke(app, ["users", "keys", "list", "bob"])
    shown = [line.split("│")[1].strip() for line in table.stdout.splitlines()
             if line.startswith("│") and line.split("│")[1].strip()]
    assert shown == [first, ci_key, json.loads(rotated.stdout)["id"]]
    revoked = "".join(line.split("│")[3].strip() for line in table.stdout.splitlines()
                      if line.startswith("│"))
    assert "rotated:worksuntil" in revoked.replace(" ", "")
    assert max(len(line) for line in table.stdout.splitlines()) <= columns


def test_users_password_names_itself_looks_the_user_up_first_and_says_the_account(
        home: Path, fast_passwords: None) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["users", "create", "bob"]).exit_code == 0
    # Nothing on standard input: the error named '--password', an option this command lacks.
    empty = runner.invoke(app, ["users", "password", "bob"], input="")
    assert empty.exit_code == 1
    assert "error: users password reads the new password twice" in empty.output
    assert "--password" not in empty.output
    # An unknown name is said before any password is read (at a terminal: typed twice first).
    nobody = runner.invoke(app, ["users", "password", "nobody"], input="")
    assert nobody.exit_code == 1
    assert "no user named 'nobody'" in nobody.output
    assert "password" not in nobody.output.replace("users password", "")
    # Another case finds the account, and the account's own name is what is said.
    done = runner.invoke(app, ["users", "password", "BOB"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert done.exit_code == 0, done.output
    assert "password of bob set" in done.stdout
    assert sign_in(home, "bob", PASSWORD) == "bob"


def test_a_command_that_makes_a_new_data_folder_says_where(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from another folder, 'users create' silently made a second, empty database there,
    and the key it printed got 401 from the server running on the first."""
    from selfie_lora.config import get_settings

    monkeypatch.delenv("SELFIE_LORA_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        made = runner.invoke(app, ["users", "create", "ann", "--json"])
        assert made.exit_code == 0, made.output
        assert json.loads(made.stdout)["user"] == "ann"  # stdout stays one JSON object
        said = made.stderr.replace("\n", "")
        assert f"made a new data folder, {tmp_path.resolve() / '.selfie-lora'}" in said
        assert "with the same SELFIE_LORA_HOME" in said
        # The migration's INFO line ('created the database schema ...') is a server's: a
        # one-shot command says the new folder in its own words only (-v shows the rest).
        assert " INFO " not in made.stderr, made.stderr
        again = runner.invoke(app, ["users", "create", "bob"])
        assert again.exit_code == 0, again.output
        assert "new data folder" not in again.output
    finally:
        get_settings.cache_clear()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [["serve", "--no-worker", "--port", "0"], ["worker"]])
def test_a_server_or_worker_that_makes_a_new_data_folder_says_where(
        home: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    """'serve' and 'worker' made HOME without a word where every other command says it: one
    started from another folder than its users' served an empty new database."""
    import selfie_lora.api.server
    import selfie_lora.worker

    # Started, then back at once: what is said before serving is what is tested.
    monkeypatch.setattr(selfie_lora.api.server, "run_server", lambda *_a, **_k: None)
    monkeypatch.setattr(selfie_lora.worker, "run_worker", lambda *_a, **_k: None)
    runner = CliRunner()
    first = runner.invoke(app, command)
    assert first.exit_code == 0, first.output
    said = first.stderr.replace("\n", "")
    assert f"selfie-lora: made a new data folder, {home.resolve()}" in said
    assert "with the same SELFIE_LORA_HOME" in said
    # A server's log is what its operator reads: its INFO lines stay.
    assert " INFO selfie_lora.adapters.db.migrate: created the database schema" in said
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    assert "new data folder" not in again.output


def test_rotating_a_rotated_key_again_is_refused_in_words(home: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(app, ["users", "create", "bob", "--json"])
    assert created.exit_code == 0, created.output
    listed = runner.invoke(app, ["users", "keys", "list", "bob", "--json"])
    [key] = json.loads(listed.stdout)["keys"]
    rotated = runner.invoke(app, ["users", "keys", "rotate", "bob", key["id"], "--json"])
    assert rotated.exit_code == 0, rotated.output
    again = runner.invoke(app, ["users", "keys", "rotate", "bob", key["id"]])
    assert again.exit_code == 1, again.output
    assert "that key was rotated already" in again.output
    # The details were a Python dict: "  - {'replaced_by': '...', 'works_until': '...'}".
    assert "{'" not in again.output, again.output
    assert f"replaced by: {json.loads(rotated.stdout)['id']}, works until: " in again.output
