"""What the command line prints of the user's text (paths, names, findings) is printed as it is,
never read as rich markup: '[me]' in a folder's name is not lost, 'no[/such]' does not crash the
command; and a rejected set's findings are the table `check` prints, not Python dicts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from selfie_lora import console as console_module
from selfie_lora import wiring
from selfie_lora.cli import app
from selfie_lora.config import get_settings
from selfie_lora.services.intake import IntakeService
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services
from tests.conftest import one_person_analyzer
from tests.support.photos import synthetic_photo


@pytest.fixture
def cli(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    """The command line on a fresh home, faces found by the fake analyzer (the photos are
    drawings), fake backends, wide enough that rich wraps nothing."""
    monkeypatch.setenv("SELFIE_LORA_MIN_PHOTOS", "5")
    monkeypatch.setenv("COLUMNS", "400")
    # COLUMNS alone is read by a console made without a width: in a full run another test's
    # settings may have fixed the shared consoles' width first (as in test_cli_check), and the
    # findings table then wrapped its advice across lines.
    monkeypatch.setattr(console_module.console, "_width", 400)
    monkeypatch.setattr(console_module.err_console, "_width", 400)
    get_settings.cache_clear()
    real, real_checks = wiring.build_services, wiring.build_photo_checks

    def build(*args: Any, **kwargs: Any) -> Services:
        return real(*args, **{"face_analyzer": one_person_analyzer(),
                              "trainers": {"local": FakeTrainer()},
                              "generators": {"local": FakeGenerator()}, **kwargs})

    def checks(*args: Any, **kwargs: Any) -> IntakeService:
        return real_checks(*args, face_analyzer=one_person_analyzer(), **kwargs)

    monkeypatch.setattr(wiring, "build_services", build)
    monkeypatch.setattr(wiring, "build_photo_checks", checks)
    yield CliRunner()
    get_settings.cache_clear()


def four_photos(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"[{i}] selfie.jpg").write_bytes(synthetic_photo(i, size=256))
    return folder


def test_a_folder_with_brackets_in_its_name_is_named_whole(cli: CliRunner,
                                                           tmp_path: Path) -> None:
    folder = four_photos(tmp_path / "Pictures" / "[me] selfies")
    result = cli.invoke(app, ["check", str(folder)])
    assert result.exit_code == 1, result.output  # 4 photos, 5 needed
    # The table's title wraps at the terminal's width, anywhere in a long path: compared
    # without whitespace ('[me]' lost still shows).
    title = "".join(f"Findings for {folder}".split())
    assert title in "".join(result.output.split()), result.output
    assert "few_photos" in result.output


def test_a_folder_ending_in_a_backslash_is_named_as_it_is(cli: CliRunner,
                                                          tmp_path: Path) -> None:
    """rich's escape doubled the final backslash and rich printed both: the title named
    '.../photos\\\\', a folder that does not exist, and the path did not paste back."""
    folder = four_photos(tmp_path / "photos \\")
    result = cli.invoke(app, ["check", str(folder)])
    assert result.exit_code == 1, result.output
    said = "".join(result.output.split())
    assert "".join(f"Findings for {folder}".split()) in said, result.output
    assert "\\\\" not in said, result.output


def test_a_path_that_looks_like_markup_is_no_crash(cli: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "no[/such]"
    result = cli.invoke(app, ["check", str(path)])
    assert isinstance(result.exception, SystemExit), result.exception  # not a MarkupError
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {path} is neither a folder nor a zip file"


def test_train_prints_a_rejected_sets_findings_as_check_does(cli: CliRunner,
                                                             tmp_path: Path) -> None:
    assert cli.invoke(app, ["users", "create", "ann"]).exit_code == 0
    folder = four_photos(tmp_path / "photos")
    result = cli.invoke(app, ["train", str(folder), "--user", "ann"])
    assert result.exit_code == 1, result.output
    assert "{'severity'" not in result.output
    assert "'code':" not in result.output
    assert "error: these photos cannot be trained on:" in result.output
    table = result.output[result.output.index("Findings"):]
    for column in ("severity", "photo", "code", "message", "advice"):
        assert column in table
    assert "few_photos" in table


def test_a_set_too_small_names_the_setting_to_try_with_fewer_photos(cli: CliRunner,
                                                                     tmp_path: Path) -> None:
    """4 photos, 5 needed: `check` and `train` said only "add 1 or more clear photos", and a
    newcomer trying the tool (the demo accepts 2) did not learn of SELFIE_LORA_MIN_PHOTOS."""
    folder = four_photos(tmp_path / "photos")
    hint = ("to try selfie-lora with fewer photos anyway, set SELFIE_LORA_MIN_PHOTOS (now 5) to "
            "how many you have")
    checked = cli.invoke(app, ["check", str(folder)])
    assert checked.exit_code == 1, checked.output
    # The finding's own advice is a table cell, which wraps with the terminal's width (the
    # advice's words are tested in the set checks' tests): the refusal itself is what counts.
    assert "too_few_photos" in checked.output
    assert hint in checked.output
    assert cli.invoke(app, ["users", "create", "ann"]).exit_code == 0
    trained = cli.invoke(app, ["train", str(folder), "--user", "ann"])
    assert trained.exit_code == 1, trained.output
    assert hint in trained.output


def test_piped_lines_a_script_reads_are_never_wrapped(tmp_path: Path) -> None:
    # Off a terminal rich wrapped at 80 columns: a long --out path was cut in the middle of a
    # file's name, and the one-time API key went to a line of its own.

    home = tmp_path / ("a-rather-long-folder-name-for-the-data-of-this-deployment" * 2) / "home"
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}}
    env.update(SELFIE_LORA_HOME=str(home), SELFIE_LORA_BACKEND="tiny")

    def run(*args: str) -> list[str]:
        command = [sys.executable, "-c", "from selfie_lora.cli import main; main()", *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    lines = run("users", "create", "ann")
    [key_line] = [line for line in lines if line.startswith("API key")]
    assert "sl_" in key_line, lines
    lines = run("users", "keys", "create", "ann", "--name", "ci")
    [key_line] = [line for line in lines if line.startswith("API key")]
    assert "sl_" in key_line, lines


@pytest.mark.parametrize("argv", [
    ["generate", "hi", "--user", "bob", "--out", "{out}"], ["export", "--user", "bob"],
    ["compare", "--user", "bob"], ["resume", "--user", "bob"]],
    ids=["generate", "export", "compare", "resume"])
def test_a_user_with_no_model_is_told_to_the_operator_with_the_train_command(
        cli: CliRunner, tmp_path: Path, argv: list[str]) -> None:
    """The service's words are the user's ('upload photos', as the web app says them); the
    command line names whose model is missing and its own command to start one."""
    assert cli.invoke(app, ["users", "create", "bob"]).exit_code == 0
    result = cli.invoke(app, [a.replace("{out}", str(tmp_path)) for a in argv])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == ("error: bob has no model yet: run 'selfie-lora train PATH "
                                     "--user bob' to start one")


def test_a_prompt_with_a_right_to_left_override_is_refused_naming_it(cli: CliRunner) -> None:
    """'generations list' printed a stored U+202E raw, reversing the rest of its row."""
    assert cli.invoke(app, ["users", "create", "bob"]).exit_code == 0
    result = cli.invoke(app, ["generate", "hi \u202eevil", "--user", "bob"])
    assert result.exit_code == 1, result.output
    assert "U+202E (RIGHT-TO-LEFT OVERRIDE)" in result.output, result.output


@pytest.mark.parametrize(("value", "said"), [
    ("-1", "the number of pictures must be a whole number 1 to 4, written with the digits 0-9 "
           "only (not '-1')"),
    ("0", "the number of pictures must be 1 to 4"),
    ("5", "the number of pictures must be 1 to 4")])
def test_a_number_of_pictures_out_of_range_is_named_as_the_user_typed_it(
        cli: CliRunner, tmp_path: Path, value: str, said: str) -> None:
    """`generate -n 0` said "num_outputs must be 1 to 4", the API's JSON field, which names
    nothing a command line user typed (nor the Generate page's "Pictures")."""
    assert cli.invoke(app, ["users", "create", "bob"]).exit_code == 0
    result = cli.invoke(app, ["generate", "a hat", "--user", "bob", "-n", value,
                              "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"error: {said}"


def test_photos_in_a_subfolder_are_said_to_be_read_only_from_that_folder(
        cli: CliRunner, tmp_path: Path) -> None:
    """`check Pictures` with the selfies in Pictures/2024 said "2024 was skipped: a folder (only
    the top level is read)" with the advice "nothing to do: only photos are read", beside "0
    usable photos": the user was told to do nothing about the one thing to fix."""
    four_photos(tmp_path / "Pictures" / "2024")
    result = cli.invoke(app, ["check", str(tmp_path / "Pictures")])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert "nothing to do" not in said, result.output
    assert "if your photos are in it, name the folder 2024 itself" in said, result.output


def test_a_folder_with_no_usable_photo_is_not_told_to_lower_the_minimum(
        cli: CliRunner, tmp_path: Path) -> None:
    """`check` of a folder with no photo said "set SELFIE_LORA_MIN_PHOTOS (now 5) to how many
    you have": 0, which the setting refuses (at least 1), and no minimum trains on nothing."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("not a photo")
    checked = cli.invoke(app, ["check", str(folder)])
    assert checked.exit_code == 1, checked.output
    assert "too_few_photos" in checked.output
    assert "SELFIE_LORA_MIN_PHOTOS" not in checked.output
    assert cli.invoke(app, ["users", "create", "ann"]).exit_code == 0
    trained = cli.invoke(app, ["train", str(folder), "--user", "ann"])
    assert trained.exit_code == 1, trained.output
    assert "too_few_photos" in trained.output
    assert "SELFIE_LORA_MIN_PHOTOS" not in trained.output
