"""``selfie-lora export VERSION [--format ...] [--out FILE]`` as the contract writes it: no
``--user`` needed when only one user can be meant (VERSION is a version's id, or one user has a
model here); when several could be, one line saying to name the user, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfie_lora import cli
from selfie_lora.config import Settings
from selfie_lora.errors import NotFoundError
from selfie_lora.wiring import Services
from tests.conftest import auth, make_settings, serving, wait_terminal
from tests.integration.test_api import upload
from tests.integration.test_cli_out import trained as trained  # the fixtures, re-exported:
from tests.integration.test_cli_out import trained_home as trained_home  # ann's two trainings
from tests.support.homes import copy_home


def export(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, ["export", *args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_one_user_here_needs_no_user(trained: Services, tmp_path: Path) -> None:
    code, said = export("1", "--out", str(tmp_path / "v1.safetensors"))
    assert code == 0, said
    ann = trained.users.get_by_name(name="ann")
    v1 = trained.models.version(user=ann, version_id="1")
    assert (tmp_path / "v1.safetensors").read_bytes() == trained.models.weights(
        user=ann, version_id=v1.id)
    code, said = export("--out", str(tmp_path / "active.safetensors"))  # the active one
    assert code == 0, said
    assert "version 2" in said


@pytest.fixture(scope="module")
def two_users_home(trained_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``trained_home`` where bob has a model of his own too, trained once per module
    (bob's training was most of each ``two_users`` test's time); closed before it is used."""
    base = tmp_path_factory.mktemp("two-users")
    copy_home(trained_home, base)
    with serving(make_settings(base), run_worker=True) as (client, services):
        h = auth(services, "bob")
        done = wait_terminal(client, h, upload(client, h)["training"]["id"])
        assert done["training"]["status"] == "succeeded"
    return base / "home"


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """conftest's, on a copy of ``two_users_home`` for a test that takes ``two_users``, or of
    ``trained_home`` for one that takes ``trained`` (a copy each)."""
    if "two_users" in request.fixturenames:
        copy_home(request.getfixturevalue("two_users_home"), tmp_path)
    elif "trained" in request.fixturenames:
        copy_home(request.getfixturevalue("trained_home"), tmp_path)
    return make_settings(tmp_path)


@pytest.fixture
def two_users(trained: Services) -> Services:
    """ann with two versions and bob with one, on this test's copy of ``two_users_home``."""
    return trained


def test_with_several_users_a_number_is_ambiguous(two_users: Services, tmp_path: Path) -> None:
    code, said = export("1", "--out", str(tmp_path / "v1.safetensors"))
    assert code == 2, said
    assert said.strip() == ("error: several users have a model here: name the user "
                            "(--user NAME) or the version by its id")
    assert not (tmp_path / "v1.safetensors").exists()
    code, said = export("1", "--user", "bob", "--out", str(tmp_path / "bob.safetensors"))
    assert code == 0, said


def test_with_several_users_an_id_names_its_owners_version(two_users: Services,
                                                            tmp_path: Path) -> None:
    bob = two_users.users.get_by_name(name="bob")
    version = two_users.models.versions(user=bob)[0]
    code, said = export(version.id, "--out", str(tmp_path / "bob.safetensors"))
    assert code == 0, said
    assert (tmp_path / "bob.safetensors").read_bytes() == two_users.models.weights(
        user=bob, version_id=version.id)


def test_a_version_nobody_has_is_one_line(two_users: Services, tmp_path: Path) -> None:
    code, said = export("no-such-id", "--user", "bob", "--out", str(tmp_path / "x"))
    assert code == 1, said
    assert said.strip() == "error: no such version: no-such-id"


def test_nobody_with_a_model_is_said(services: Services) -> None:
    services.users.create(name="ann")
    with pytest.raises(NotFoundError, match="nobody has a model yet"):
        services.models.owner_for_export(version_id="1")


@pytest.mark.parametrize("name", ["file", "folder/", "in a folder"])
def test_an_out_whose_name_is_too_long_is_one_line(trained: Services, tmp_path: Path,
                                                   name: str) -> None:
    """Looking at the path was an OSError (ENAMETOOLONG) from is_dir() or exists(): a
    traceback, where a place that cannot be written is one line and exit status 1."""
    folder = tmp_path / "exports"
    folder.mkdir()
    long = "x" * 300
    out = {"file": f"{folder / long}.safetensors", "folder/": f"{folder / long}/",
           "in a folder": str(folder / long / "v1.safetensors")}[name]
    result = CliRunner().invoke(cli.app, ["export", "1", "--out", out])
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: cannot write ")
    assert line.endswith(": File name too long")
    assert list(folder.iterdir()) == []  # nothing written
