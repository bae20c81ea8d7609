"""``selfie-lora check PATH`` exits 0 when the photos are trainable, 1 when they are not, and 2
when it could not judge them: scripts branch on 1. It needs no database, queue, storage or
writable HOME (judging stores nothing), so none of them being out of reach, nor a crash, can
read as 'not trainable'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from selfie_lora import console as printing
from selfie_lora import wiring
from selfie_lora.cli import app
from selfie_lora.config import get_settings
from selfie_lora.services.intake import IntakeService
from tests.conftest import one_person_analyzer
from tests.support.hostile import zip_of
from tests.support.photos import synthetic_photo

PASSWORD = "pw_SECRET_db"


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        (folder / f"selfie{i}.jpg").write_bytes(synthetic_photo(i, size=256))
    return folder


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The command line with faces found by the fake analyzer (the photos are drawings), a
    database that cannot be reached and a HOME that is a file."""
    home = tmp_path / "home"
    home.write_text("mine")
    monkeypatch.setenv("SELFIE_LORA_HOME", str(home))
    monkeypatch.setenv("SELFIE_LORA_DATABASE_URL",
                       f"postgresql+psycopg://u:{PASSWORD}@127.0.0.1:1/db?connect_timeout=2")
    monkeypatch.setenv("SELFIE_LORA_MIN_PHOTOS", "4")
    real = wiring.build_photo_checks

    def with_fake_faces(*args: Any, **kwargs: Any) -> IntakeService:
        return real(*args, face_analyzer=one_person_analyzer(), **kwargs)

    monkeypatch.setattr(wiring, "build_photo_checks", with_fake_faces)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def one_line(result: Result) -> str:
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_trainable_photos_need_no_database_nor_home(cli: CliRunner, photos: Path,
                                                    tmp_path: Path) -> None:
    result = cli.invoke(app, ["check", str(photos)])
    assert result.exit_code == 0, result.output
    assert "4 of 4 photos usable" in " ".join(result.output.split())
    assert (tmp_path / "home").read_text() == "mine"


def test_photos_that_are_not_trainable_exit_1(cli: CliRunner, photos: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFIE_LORA_MIN_PHOTOS", "5")
    get_settings.cache_clear()
    result = cli.invoke(app, ["check", str(photos)])
    assert result.exit_code == 1, result.output
    assert "not trainable" in result.output


def test_an_upload_refused_as_a_whole_is_not_trainable(cli: CliRunner, tmp_path: Path) -> None:
    fake = tmp_path / "photos.zip"
    fake.write_text("not a zip at all")
    result = cli.invoke(app, ["check", str(fake)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("not trainable:"), result.output


def test_one_photo_named_for_its_folder_says_to_name_the_folder(cli: CliRunner,
                                                              photos: Path) -> None:
    """`selfie-lora check selfie0.jpg` answered "not trainable: the upload is not a zip
    archive": it named neither the file nor what to name (walk-through of First steps). Still
    exit 1, as any upload refused as a whole; `train` reads the path the same way."""
    result = cli.invoke(app, ["check", str(photos / "selfie0.jpg")])
    assert result.exit_code == 1, result.output
    assert one_line(result) == (
        "not trainable: selfie0.jpg is a photo (a JPEG image), not a folder or a zip of "
        "photos: name the folder it is in, or a zip of the photos")


def test_one_oversized_file_and_one_zip_in_the_folder_are_their_own_findings(
        cli: CliRunner, photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 51 MB ProRAW DNG or a zip among good photos refused the whole folder ("not trainable:
    IMG_0042.DNG is larger than 50 MB"): now the good photos are checked, and each bad file has
    its finding and what to do."""
    with open(photos / "IMG_0042.DNG", "wb") as fh:
        fh.truncate(51 * 1024 * 1024)  # sparse: nothing to write
    # The findings table unwrapped: COLUMNS alone is read by a console made without a width,
    # and in a full run another test's console settings may be there first.
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setattr(printing.console, "_width", 400)
    (photos / "x.zip").write_bytes(zip_of({"more.jpg": synthetic_photo(9, size=256)}))
    result = cli.invoke(app, ["check", str(photos)])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "4 of 6 photos usable" in said
    assert "IMG_0042.DNG is 51 MB, over the 50 MB a photo may be" in said, result.output
    assert "export it as JPEG" in said, result.output
    assert "x.zip is an archive in the folder (a zip archive)" in said, result.output
    assert "unpack it and upload its photos" in said, result.output


@pytest.mark.parametrize("where", ["missing", "under-a-file"])
def test_a_path_that_is_not_there_exits_2(cli: CliRunner, tmp_path: Path, where: str) -> None:
    (tmp_path / "afile").write_text("mine")
    path = tmp_path / ("no-such-folder" if where == "missing" else "afile/photos")
    result = cli.invoke(app, ["check", str(path)])
    assert result.exit_code == 2, result.output
    assert one_line(result) == f"error: {path} is neither a folder nor a zip file"


def test_invalid_settings_exit_2(cli: CliRunner, photos: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFIE_LORA_TRAINER", "foo")
    get_settings.cache_clear()
    result = cli.invoke(app, ["check", str(photos)])
    assert result.exit_code == 2, result.output
    assert one_line(result).startswith("invalid setting: SELFIE_LORA_TRAINER")


class CrashingChecks:
    """Photo checks with a bug."""

    def check_path(self, path: Path, **_: Any) -> None:
        raise RuntimeError("a bug")


def test_a_crash_exits_2_not_1(cli: CliRunner, photos: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wiring, "build_photo_checks", lambda *_, **__: CrashingChecks())
    result = cli.invoke(app, ["check", str(photos)])
    assert result.exit_code == 2, result.output
    assert "could not run" in result.output


def test_a_zip_over_the_upload_limit_states_the_configured_limit(
        cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The API's guard and upload routes state it in the same words (test_hostile_uploads).
    monkeypatch.setenv("SELFIE_LORA_MAX_UPLOAD_BYTES", str(3 * 512 * 1024))  # 1.5 MB
    path = tmp_path / "selfies.zip"
    path.write_bytes(bytes(2 * 1024 * 1024))
    result = cli.invoke(app, ["check", str(path)])
    assert result.exit_code == 1, result.output  # not trainable, as the API's 413 refuses it
    assert one_line(result) == "not trainable: selfies.zip is larger than 1.5 MB"
