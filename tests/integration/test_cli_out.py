"""``--out`` of the commands that write files (generate, compare, export): a path that cannot
hold them is one line and exit status 1, and generate and compare say so before they generate
or score anything (a generation was stored, and paid for on Replicate, before its images failed
to be written); and what compare prints about the comparison it wrote."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import selfie_lora.wiring as wiring
from selfie_lora import cli
from selfie_lora import console as console_module
from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.config import Settings
from selfie_lora.domain.entities import User, Version
from selfie_lora.errors import DatabaseLockedError
from selfie_lora.outputs import partial_path
from selfie_lora.services.models import ModelService
from selfie_lora.services.ports import GenerationJob
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer, SimulatedCrash
from selfie_lora.wiring import Services
from tests.conftest import auth, make_settings, one_person_analyzer, wait_terminal
from tests.integration.test_api import upload
from tests.support.homes import copy_home, made_once


def _train_ann_twice(client: TestClient, services: Services) -> None:
    h = auth(services, "ann")
    for _ in range(2):
        done = wait_terminal(client, h, upload(client, h)["training"]["id"])
        assert done["training"]["status"] == "succeeded"


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home where ann has two versions, trained once per module on the fake backends that
    ``trained`` wires (the two trainings were most of each test's second or more): each test
    that takes ``trained`` starts from a copy of it (``settings`` below)."""
    return made_once(tmp_path_factory, _train_ann_twice).home


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """conftest's, on a copy of ``trained_home`` for a test that takes ``trained``."""
    if "trained" in request.fixturenames:
        copy_home(request.getfixturevalue("trained_home"), tmp_path)
    return make_settings(tmp_path)


@pytest.fixture
def trained(client: TestClient, services: Services, settings: Settings,
            fake_trainer: FakeTrainer, fake_generator: FakeGenerator,
            monkeypatch: pytest.MonkeyPatch) -> Services:
    """ann with two versions; the CLI on the same data and fake backends. A module that takes
    this fixture without this module's ``settings`` (and so starts from an empty home) has
    ann's two trainings run here."""
    if services.repo.get_user_by_name("ann") is None:
        _train_ann_twice(client, services)
    real = wiring.build_services

    def build(s: Settings, **kw: Any) -> Services:
        return real(s, **{"trainers": {"local": fake_trainer},
                          "face_analyzer": one_person_analyzer(),
                          "generators": {"local": fake_generator}, **kw})

    monkeypatch.setattr(cli, "_settings", lambda: settings)
    monkeypatch.setattr(wiring, "build_services", build)
    return services


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "afile"
    path.write_text("mine")
    return path


def refused_in_one_line(result: Result, path: Path) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not an OSError's traceback
    assert f"error: cannot write {path}" in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_generate_to_a_file_is_refused_before_it_generates(
        trained: Services, fake_generator: FakeGenerator, tmp_path: Path) -> None:
    ann = trained.users.get_by_name(name="ann")
    before = len(fake_generator.jobs)
    target = a_file(tmp_path)
    refused = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann",
                                           "--out", str(target)])
    refused_in_one_line(refused, target)
    assert len(fake_generator.jobs) == before
    assert trained.generation.history(user=ann) == []
    assert target.read_text() == "mine"

    under = target / "images"  # a file on the way
    refused = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann",
                                           "--out", str(under)])
    refused_in_one_line(refused, under)
    assert trained.generation.history(user=ann) == []

    folder = tmp_path / "new" / "images"
    done = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann",
                                        "--out", str(folder)])
    assert done.exit_code == 0, done.output
    assert len(list(folder.glob("*.png"))) == 1
    assert len(trained.generation.history(user=ann)) == 1


# Old code: the picture was written straight under its name; a process killed midway left a
# truncated PNG there for good (the name holds the generation's id: nothing writes it again).
def test_a_generate_killed_while_it_writes_a_picture_leaves_none_of_it_under_its_name(
        trained: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_bytes

    def dying(path: Path, data: Any) -> int:
        if ".png" not in path.name:
            return real(path, data)
        real(path, bytes(data)[: len(data) // 2])
        raise SimulatedCrash("killed halfway through the picture")

    folder = tmp_path / "images"
    with monkeypatch.context() as killing:
        killing.setattr(Path, "write_bytes", dying)
        with pytest.raises(SimulatedCrash):
            CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann",
                                         "--out", str(folder)])
    assert list(folder.glob("*.png")) == []  # only the hidden partial file, if anything
    done = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann",
                                        "--out", str(folder)])
    assert done.exit_code == 0, done.output
    (written,) = folder.glob("*.png")
    assert written.read_bytes().startswith(b"\x89PNG")
    assert not partial_path(written).exists()


# Old code: a Ctrl-C ended generate with exit status 130 and no word, and a SIGTERM (a time
# limit's) killed it outright: whether the pictures were in the gallery, though not in --out,
# was not said.
@pytest.mark.parametrize(("interrupt", "status"), [(KeyboardInterrupt, 130),
                                                   (cli._Terminated, 143)])
def test_an_interrupted_generate_says_whether_its_pictures_were_stored(
        trained: Services, fake_generator: FakeGenerator, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, interrupt: type[KeyboardInterrupt],
        status: int) -> None:
    ann = trained.users.get_by_name(name="ann")
    folder = tmp_path / "images"

    def rendering(job: GenerationJob) -> list[bytes | None]:
        raise interrupt

    with monkeypatch.context() as interrupting:
        interrupting.setattr(fake_generator, "generate", rendering)
        result = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann",
                                              "--out", str(folder)])
    assert (result.exit_code, result.output.strip()) == (status, "interrupted: nothing was stored")
    assert trained.generation.history(user=ann) == []

    real = Path.write_bytes

    def writing(path: Path, data: Any) -> int:
        if ".png" in path.name:
            raise interrupt
        return real(path, data)

    with monkeypatch.context() as interrupting:
        interrupting.setattr(Path, "write_bytes", writing)
        result = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann", "-n", "2",
                                              "--out", str(folder)])
    [stored] = trained.generation.history(user=ann)
    assert result.exit_code == status, result.output
    said = result.output.strip().splitlines()[-1]
    assert said == (f"interrupted: generation {stored.id} is stored (2 pictures), but not all of "
                    f"them were written to {folder}: 'selfie-lora generations list --user ann' "
                    f"lists it, and GET /api/generations/{stored.id}/images/<n> gives them")
    assert list(folder.glob("*.png")) == []


@pytest.mark.parametrize(("interrupt", "status"), [(KeyboardInterrupt, 130),
                                                   (cli._Terminated, 143)])
def test_a_second_ctrl_c_during_the_lookup_of_an_interrupted_generate_is_one_line(
        trained: Services, fake_generator: FakeGenerator, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, interrupt: type[KeyboardInterrupt],
        status: int) -> None:
    """Ctrl-C pressed again while the interrupted generate looked up whether its pictures were
    stored (a slow database, an impatient user): the second KeyboardInterrupt escaped the
    handler of the first, and the command ended (exit status 130 through typer) without a word
    of whether anything was stored. Now one line that names the generation (as the line of a
    lookup the database failed does), and the first stop's status: a SIGTERM's 143 stays 143
    (the second Ctrl-C's 130 before)."""
    from selfie_lora.services.generation import GenerationService

    looked_up: list[str] = []

    def rendering(job: GenerationJob) -> list[bytes | None]:
        raise interrupt

    def looking_up(_service: GenerationService, *, user: User, generation_id: str) -> None:
        looked_up.append(generation_id)
        raise KeyboardInterrupt  # the second Ctrl-C

    monkeypatch.setattr(fake_generator, "generate", rendering)
    monkeypatch.setattr(GenerationService, "find", looking_up)
    result = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann",
                                          "--out", str(tmp_path / "images")])
    assert result.exit_code == status, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    [generation_id] = looked_up
    assert result.output.strip() == (
        f"interrupted: whether generation {generation_id} was stored is unknown; 'selfie-lora "
        "generations list --user ann' lists it if it was")


@pytest.mark.parametrize("command", [["generate", "a hat"], ["compare"]])
def test_an_out_that_is_a_file_is_said_to_be_one(trained: Services, tmp_path: Path,
                                                  command: list[str]) -> None:
    # mkdir's own words were 'File exists' and 'Not a directory'.
    target = a_file(tmp_path)
    for out, said in ((target, "it is a file, not a folder"),
                      (target / "images", f"{target} is a file, not a folder")):
        refused = CliRunner().invoke(cli.app, [*command, "--user", "ann", "--out", str(out)])
        refused_in_one_line(refused, out)
        assert f"{said} (--out names a folder)" in refused.output.replace("\n", "")


def test_compare_to_a_file_is_refused_before_it_compares(trained: Services,
                                                         tmp_path: Path) -> None:
    target = a_file(tmp_path)
    refused = CliRunner().invoke(cli.app, ["compare", "--user", "ann", "--out", str(target)])
    refused_in_one_line(refused, target)
    assert "identity" not in refused.output  # no comparison was printed


@pytest.mark.parametrize("lock", [True, False], ids=["a-lock", "a-statement-timeout"])
def test_compare_kept_waiting_by_a_database_lock_says_to_run_it_again(
        trained: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lock: bool) -> None:
    """A lock held elsewhere past the database's wait while compare reads the versions' records
    (``DatabaseLockedError``, the API's 503 with Retry-After): one line that says the database
    was busy and to run the command again, where it was the driver's words alone ("database is
    locked"), read as a fault to report."""
    def get_likeness(repo: SqlRepository, version_id: str) -> None:
        raise DatabaseLockedError("database error: database is locked", lock=lock)

    monkeypatch.setattr(SqlRepository, "get_likeness", get_likeness)
    refused = CliRunner().invoke(cli.app, ["compare", "--user", "ann", "--out", str(tmp_path)])
    assert refused.exit_code == 1, refused.output
    said = " ".join(refused.output.split())
    assert said.startswith("error: database error: database is locked: the database was busy "
                           "(a lock held by another process, a backup or a long command"), said
    assert said.endswith("); run the command again in a moment"), said
    assert ("a statement past the database's timeout" in said) is not lock, said
    assert "Traceback" not in refused.output
    assert not list(tmp_path.glob("*.png"))  # nothing written


@pytest.mark.parametrize(("a", "b", "said"), [
    ("1", "2", "identity against version 2's (B's) training photos"),
    ("2", "1", "identity against version 2's (A's) training photos"),  # A is the newer
])
def test_compare_names_the_photos_it_measured_against(trained: Services, tmp_path: Path,
                                                      a: str, b: str, said: str) -> None:
    """Both versions are scored against the newer one's training photos, which is A when A is
    the newer version: the table says whose, not always B's."""
    done = CliRunner().invoke(cli.app, ["compare", "--user", "ann", "--out", str(tmp_path),
                                        "--a", a, "--b", b])
    assert done.exit_code == 0, done.output
    printed = " ".join(done.output.split())
    assert f"version {a} (A) against version {b} (B), {said}" in printed
    assert "B's training photos" not in printed.replace("(B's) training photos", "")


def test_export_under_a_file_is_refused_in_one_line(trained: Services, tmp_path: Path) -> None:
    target = a_file(tmp_path) / "lora.safetensors"
    refused = CliRunner().invoke(cli.app, ["export", "1", "--user", "ann", "--out", str(target)])
    refused_in_one_line(refused, target)
    # Not the raw strerror ('File exists'), which said the opposite of the problem.
    assert f"{target.parent} is a file, not a folder" in refused.output.replace("\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "home"]  # no partial file


def test_export_replaces_what_a_killed_export_of_the_same_name_left(trained: Services,
                                                                    tmp_path: Path) -> None:
    target = tmp_path / "lora-v1.safetensors"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not the LoRA's")
    # A killed export's .part, and one that is a link to another file (made in a shared folder).
    for leftover in ("short", "link"):
        if leftover == "short":
            partial_path(target).write_bytes(b"cut short")
        else:
            partial_path(target).symlink_to(elsewhere)
        done = CliRunner().invoke(cli.app, ["export", "1", "--user", "ann", "--out",
                                            str(target), "--force"])
        assert done.exit_code == 0, done.output
        assert not target.is_symlink()
        sha = hashlib.sha256(target.read_bytes()).hexdigest()
        assert f"sha256 {sha}" in " ".join(done.output.split())
        assert not partial_path(target).is_symlink()
        assert not partial_path(target).exists()
    assert elsewhere.read_text() == "not the LoRA's"


def test_export_to_a_path_ending_in_a_slash_makes_that_folder(trained: Services,
                                                               tmp_path: Path) -> None:
    folder = tmp_path / "newdir" / "loras"
    done = CliRunner().invoke(cli.app, ["export", "1", "--user", "ann",
                                        "--out", f"{folder}/"])
    assert done.exit_code == 0, done.output
    assert folder.is_dir()
    assert [p.name for p in folder.iterdir()] == ["lora-v1.safetensors"]


def test_compare_and_its_grid_number_the_probes_as_the_api_does(
        trained: Services, client: TestClient, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI said probes 1-4 and the API 0-3, so 'probe 4' read in the table was a 404 (or
    another probe's image) from .../quality/probes/4."""
    import selfie_lora.services.likeness as likeness

    labels: list[str] = []
    real_render = likeness.render_grid

    def render(**kw: Any) -> bytes:
        labels.extend(row.label[0] for row in kw["rows"])
        return real_render(**kw)

    monkeypatch.setattr(likeness, "render_grid", render)
    monkeypatch.setenv("COLUMNS", "200")
    done = CliRunner().invoke(cli.app, ["compare", "--user", "ann", "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    shown = [line.split("│")[1].strip() for line in done.stdout.splitlines()
             if line.startswith("│") and line.split("│")[1].strip().isdigit()]

    _key, secret = trained.users.create_key(user=trained.users.get_by_name(name="ann"),
                                            name="test")
    h = {"Authorization": f"Bearer {secret}"}
    compared = client.get("/api/model/compare", headers=h).json()
    indexes = [str(p["index"]) for p in compared["probes"]]
    assert indexes
    assert shown == indexes
    assert labels == [f"probe {i}, seed {p['seed']}"
                      for i, p in zip(indexes, compared["probes"], strict=True)]
    b = compared["b"]["id"]
    for number in shown:
        assert client.get(f"/api/model/versions/{b}/quality/probes/{number}",
                          headers=h).status_code == 200
    past = client.get(f"/api/model/versions/{b}/quality/probes/{len(shown)}", headers=h)
    assert past.status_code == 404


def test_generate_says_the_seed_it_drew(trained: Services, tmp_path: Path) -> None:
    # The seed drawn when none is given, which makes the pictures again, was only in a log line.
    ann = trained.users.get_by_name(name="ann")
    done = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann", "-n", "2",
                                        "--out", str(tmp_path / "images")])
    assert done.exit_code == 0, done.output
    [generation] = trained.generation.history(user=ann)
    assert generation.seed is not None
    assert (f"generation {generation.id}: version 2, LoRA scale {generation.lora_scale:g}, "
            f"seed {generation.seed} (picture n: that + n - 1)") in done.stdout.replace("\n", "")


def test_the_seed_line_says_the_batch_wraps_past_the_largest_seed(
        trained: Services, tmp_path: Path) -> None:
    """-n 2 --seed 4294967295 said 'picture n: that + n - 1': picture 2 is seed 0, not
    4294967296, which --seed refuses (found in review)."""
    done = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann", "-n", "2",
                                        "--seed", "4294967295", "--out", str(tmp_path / "i")])
    assert done.exit_code == 0, done.output
    assert ("seed 4294967295 (picture n: that + n - 1, wrapping to 0 after 4294967295)"
            in done.stdout.replace("\n", ""))
    below = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann", "-n", "2",
                                         "--seed", "4294967294", "--out", str(tmp_path / "j")])
    assert below.exit_code == 0, below.output
    assert "seed 4294967294 (picture n: that + n - 1)" in below.stdout.replace("\n", "")


def test_a_withheld_picture_is_numbered_from_1_as_the_api_and_the_page_number_it(
        trained: Services, fake_generator: FakeGenerator, tmp_path: Path) -> None:
    """The CLI said 'picture 1 (seed 41) was withheld' where POST /api/generate answers
    {"picture": 2, "seed": 41} and the generate page 'picture 2 (seed 41)' (found in review):
    one picture, two numbers. It counts from 1 too, and names the file it would have had."""
    fake_generator.withhold = frozenset({1})
    out = tmp_path / "images"
    done = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann", "-n", "4",
                                        "--seed", "40", "--out", str(out)])
    assert done.exit_code == 0, done.output
    [generation] = trained.generation.history(user=trained.users.get_by_name(name="ann"))
    assert (f"picture 2 (seed 41; no {generation.id}-1.png) was withheld by Replicate's "
            "safety checker") in done.stdout.splitlines()
    assert sorted(path.name for path in out.iterdir()) == [
        f"{generation.id}-{place}.png" for place in (0, 2, 3)]


def test_the_wrote_lines_are_whole_when_piped(trained: Services, tmp_path: Path) -> None:
    # Off a terminal rich wrapped at 80 columns: the path was cut in the middle of a file's
    # name (`grep wrote | awk '{print $2}'` gave an empty line) and the sha256 went to a line
    # of its own.
    out = tmp_path / "a" / "rather" / "long" / "folder" / "name" / "for" / "the" / "pictures"
    done = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann", "--out", str(out)])
    assert done.exit_code == 0, done.output
    [wrote] = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
    [picture] = out.iterdir()
    assert wrote == f"wrote {picture}"
    target = out / "lora.safetensors"
    done = CliRunner().invoke(cli.app, ["export", "--user", "ann", "--out", str(target)])
    assert done.exit_code == 0, done.output
    [wrote] = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert wrote.startswith(f"wrote {target}: version 2, ")
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    assert wrote.endswith(f"sha256 {sha}"), wrote


def test_a_scale_is_shown_exactly_as_used_so_that_it_makes_the_picture_again(
        trained: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--lora-scale 0.123456789 was said as 'LoRA scale 0.123457' (here, in 'generations list'
    and in the PNG), and generating again at 0.123457 made another picture (found in review)."""
    # The table unwrapped: COLUMNS alone is read by a console made without a width, and in a
    # full run another test's console settings may be there first (as in test_cli_check).
    monkeypatch.setattr(console_module.console, "_width", 200)
    done = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann", "--seed", "7",
                                        "--lora-scale", "0.123456789", "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert "LoRA scale 0.123456789, seed 7" in done.stdout.replace("\n", "")
    listed = CliRunner().invoke(cli.app, ["generations", "list", "--user", "ann"],
                                env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "LoRA scale 0.123456789 " in listed.stdout, listed.stdout


def test_generate_makes_another_version_s_pictures_without_activating_it(
        trained: Services, tmp_path: Path) -> None:
    """generate had no --version (the API's version_id): a v1 picture while v2 was active took
    'activate 1', every client's default, and back (found in review)."""
    ann = trained.users.get_by_name(name="ann")
    v1 = trained.models.version(user=ann, version_id="1")
    done = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann", "--version", "v1",
                                        "--seed", "7", "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    [generation] = trained.generation.history(user=ann)
    assert generation.version_id == v1.id
    assert f"generation {generation.id}: version 1," in done.stdout
    assert trained.models.get(user=ann).active_version_id != v1.id  # still v2
    unknown = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann", "--version",
                                           "3", "--out", str(tmp_path)])
    assert unknown.exit_code == 1
    assert "no such version: 3" in unknown.output


def test_compare_after_a_rollback_does_not_call_version_b_active(trained: Services,
                                                                 tmp_path: Path) -> None:
    """The gate's stored reason for version 2 ends 'it is active' (true when it was judged);
    after a rollback to version 1, compare (and the Versions page) printed it as if it still
    were. The stored reason is kept; what is shown says which version is active now."""
    from selfie_lora.web.pages import version_rows

    ann = trained.users.get_by_name(name="ann")
    stored = trained.models.version(user=ann, version_id="2").gate_reason
    assert stored is not None
    assert stored.endswith("it is active"), stored
    rolled = CliRunner().invoke(cli.app, ["activate", "1", "--user", "ann"])
    assert rolled.exit_code == 0, rolled.output

    done = CliRunner().invoke(cli.app, ["compare", "--user", "ann", "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    printed = " ".join(done.output.split())
    assert (f"gate on version 2: passed: {stored} (when it was judged; version 1 is active "
            "now)") in printed
    assert trained.models.version(user=ann, version_id="2").gate_reason == stored

    rows = version_rows(trained.models.versions_with_likeness(user=ann),
                        active_version_id=trained.models.get(user=ann).active_version_id,
                        photos={})
    shown = {row["version"].number: row["gate_reason"] for row in rows}
    assert shown[2] == f"{stored} (when it was judged; version 1 is active now)"
    assert shown[1] == trained.models.version(user=ann, version_id="1").gate_reason


@pytest.mark.parametrize("command", [["generate", "a hat"], ["compare"]])
@pytest.mark.parametrize("name", ["folder", "folder/", "in a folder"])
def test_an_out_whose_name_is_too_long_is_one_line(
        trained: Services, fake_generator: FakeGenerator, tmp_path: Path, command: list[str],
        name: str) -> None:
    """Looking at --out was an OSError (ENAMETOOLONG) from file_in_the_way's exists(): a
    traceback, where a place that cannot be written is one line and exit status 1 (as export's
    --out since 8c67ad5), before anything is generated or scored."""
    ann = trained.users.get_by_name(name="ann")
    before = len(fake_generator.jobs)
    folder = tmp_path / "out"
    folder.mkdir()
    long = "x" * 300
    out = {"folder": str(folder / long), "folder/": f"{folder / long}/",
           "in a folder": str(folder / long / "images")}[name]
    refused = CliRunner().invoke(cli.app, [*command, "--user", "ann", "--out", out])
    assert refused.exit_code == 1, (refused.output, refused.exception)
    assert isinstance(refused.exception, SystemExit), repr(refused.exception)
    (line,) = refused.output.strip().splitlines()
    assert line.startswith("error: cannot write ")
    assert line.endswith(": File name too long")
    assert list(folder.iterdir()) == []  # nothing written
    assert len(fake_generator.jobs) == before
    assert trained.generation.history(user=ann) == []


def _generate_signalled(services: Services, folder: Path, tmp_path: Path, *,
                        hold: Callable[[Callable[[], None]], None], sig: signal.Signals
                        ) -> tuple[int, str]:
    """``selfie-lora generate`` in a child process, which ``hold`` stops at a point of its own
    (calling the function it is given there: the child says so and waits); this process then
    sends the child ``sig``, as a shell's Ctrl-C or ``timeout`` does. The child's exit status
    (-N: killed by signal N) and what the command printed."""
    said = tmp_path / f"said-{sig.name}"
    said.unlink(missing_ok=True)  # a call before this one's
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, which never returns into pytest
        code = 1
        try:
            os.close(ready_r)
            # A Ctrl-C raises here as at a terminal, whatever pytest was started with (conftest's
            # pytest_configure does so for the run; test_cli_prompts.py resets its child too).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            services.engine.dispose(close=False)  # the parent's connections stay the parent's

            def held() -> None:
                os.write(ready_w, b"x")
                time.sleep(60)  # the signal ends it

            hold(held)
            result = CliRunner().invoke(cli.app, ["generate", "a hat", "--user", "ann", "-n",
                                                  "2", "--out", str(folder)])
            # What the command raised, if not its exit: else an exit 1 says nothing (a signal
            # that never came shows as the fake generator's AssertionError, after the sleep).
            raised = result.exception
            said.write_text(result.output + ("" if raised is None or isinstance(raised, SystemExit)
                                             else f"\n{raised!r}"))
            code = result.exit_code
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        ready, _, _ = select.select([ready_r], [], [], 60)
        assert ready, "the child never reached the point where it is signalled"
        assert os.read(ready_r, 1) == b"x", "the child ended before it was signalled"
        os.kill(pid, sig)
    finally:
        os.close(ready_r)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), said.read_text() if said.exists() else ""


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl_c", "sigterm"])
def test_a_real_signal_anywhere_in_generate_says_whether_its_pictures_were_stored(
        trained: Services, fake_generator: FakeGenerator, tmp_path: Path,
        sig: signal.Signals, status: int) -> None:
    """A real SIGTERM or SIGINT sent to the command (the test above raises the exception the
    handler would): while the pictures are made, nothing stored; after the generation returned
    and before its pictures were written (the version read, the seed printed), which no
    handler covered: a SIGTERM killed the command outright (-15, no word) and a Ctrl-C ended it
    with no word, the generation stored; and while they are written."""
    ann = trained.users.get_by_name(name="ann")
    folder = tmp_path / "images"

    def rendering(held: Callable[[], None]) -> None:
        def generate(job: GenerationJob) -> list[bytes | None]:
            held()
            raise AssertionError("not interrupted")
        fake_generator.generate = generate  # type: ignore[method-assign]

    code, said = _generate_signalled(trained, folder, tmp_path, hold=rendering, sig=sig)
    assert (code, said.strip().splitlines()[-1:]) == (status, ["interrupted: nothing was stored"])
    assert trained.generation.history(user=ann) == []

    def between(held: Callable[[], None]) -> None:
        real = ModelService.version

        def version(self: ModelService, **kw: Any) -> Version:
            held()
            return real(self, **kw)
        ModelService.version = version  # type: ignore[method-assign]

    def writing(held: Callable[[], None]) -> None:
        real = Path.write_bytes

        def write_bytes(path: Path, data: Any) -> int:
            if ".png" in path.name:
                held()
            return real(path, data)
        Path.write_bytes = write_bytes  # type: ignore[method-assign]

    for hold in (between, writing):
        code, said = _generate_signalled(trained, folder, tmp_path, hold=hold, sig=sig)
        stored = trained.generation.history(user=ann)[0]
        assert (code, said.strip().splitlines()[-1:]) == (status, [
            f"interrupted: generation {stored.id} is stored (2 pictures), but not all of them "
            f"were written to {folder}: 'selfie-lora generations list --user ann' lists it, and "
            f"GET /api/generations/{stored.id}/images/<n> gives them"]), (hold.__name__, said)
    assert len(trained.generation.history(user=ann)) == 2
    assert list(folder.glob("*.png")) == []
