"""SELFIE_LORA_BASE_MODEL: anything but exactly 'tiny' is taken as a FLUX.1 folder, and each
model made then is pinned to a FLUX.1 recipe. Found in review: 'Tiny', '/nonexistent/FLUX.1-dev'
or a file started serve and worker in silence, and once the operator fixed the typo those models
were answered 409 base_model_mismatch. A tiny look-alike is a settings error; a path with no
FLUX.1 folder there is said once where trainers are built (API servers may share the GPU
workers' settings without their folder)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from selfie_lora import wiring
from selfie_lora.config import Settings, settings_errors


@pytest.mark.parametrize("value", ["Tiny", "TINY", "tiny ", " tiny", "tiny\n", " "])
def test_a_tiny_look_alike_is_a_settings_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, base_model=value)
    assert settings_errors(caught.value) == [
        "SELFIE_LORA_BASE_MODEL: must be exactly tiny (lowercase, no spaces) or the path of a "
        "FLUX.1 diffusers folder"]


def said_about_the_base_model(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture) -> list[str]:
    monkeypatch.setattr(wiring, "_base_model_said", threading.Event())
    caplog.set_level("WARNING", logger="selfie_lora.wiring")
    wiring.default_trainers(settings)
    wiring.default_trainers(settings)
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("SELFIE_LORA_BASE_MODEL")]


@pytest.mark.parametrize("where", ["nonexistent/FLUX.1-dev", "a-file", "empty-folder"])
def test_a_base_model_that_is_no_flux_folder_is_said_once_where_trainers_are_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        where: str) -> None:
    (tmp_path / "a-file").write_text("not a model")
    (tmp_path / "empty-folder").mkdir()
    source = str(tmp_path / where)
    said = said_about_the_base_model(Settings(home=tmp_path, base_model=source), monkeypatch,
                                     caplog)
    assert said == [f"SELFIE_LORA_BASE_MODEL: base model {source!r} is neither 'tiny' nor a "
                    "diffusers FLUX.1 folder (no model_index.json there): this process cannot "
                    "train or generate locally, and each model made meanwhile is pinned to a "
                    "FLUX.1 recipe (local-flux-v2)"]


def test_tiny_or_a_flux_folder_says_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    flux = tmp_path / "FLUX.1-dev"
    flux.mkdir()
    (flux / "model_index.json").write_text("{}")
    for source in ("tiny", str(flux)):
        assert said_about_the_base_model(Settings(home=tmp_path, base_model=source),
                                         monkeypatch, caplog) == []


# A name no file system takes (over 255 bytes): is_file() raises instead of answering, as it does
# for a folder this user may not read (which root, running the suite, always may).
UNREADABLE = "/" + "x" * 300 + "/FLUX.1-dev"


def test_a_base_model_that_cannot_be_read_is_said_not_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Review setrev 1: Python 3.11's is_file() raised for it, and every command that builds the
    # trainers stopped with one line blaming SELFIE_LORA_HOME.
    said = said_about_the_base_model(Settings(home=tmp_path, base_model=UNREADABLE),
                                     monkeypatch, caplog)
    assert len(said) == 1
    assert f"base model {UNREADABLE!r} cannot be read (File name too long)" in said[0]


def test_a_replicate_deployment_does_not_look_at_the_base_model_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(home=tmp_path, base_model=UNREADABLE, trainer="replicate",
                        replicate_owner="acme", replicate_api_token="r8_dummy")
    looked = []
    monkeypatch.setattr("selfie_lora.adapters.flux.loader.base_model_problem",
                        lambda source: looked.append(source))
    assert said_about_the_base_model(settings, monkeypatch, caplog) == []
    assert looked == []
