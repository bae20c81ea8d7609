"""The Replicate settings a new model's destination is made from, and the token its trainings
need. Found in review: SELFIE_LORA_REPLICATE_OWNER was never checked ('My Org', 'me/you x' or an
env file's 'me ' were pinned into every new model's destination, which Replicate refuses), and
TRAINER=replicate without REPLICATE_API_TOKEN started serve and worker without a word, each
training then failing 'no replicate trainer configured'."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from selfie_lora import wiring
from selfie_lora.config import Settings, settings_errors
from selfie_lora.domain.plan import destination_for
from selfie_lora.domain.recipes import validate_replicate_model


@pytest.mark.parametrize("owner", ["My Org", "me/you x", "me/you", "Acme", "-acme", "a b",
                                   "acme!", " "])
def test_an_owner_replicate_would_refuse_is_a_settings_error(tmp_path: Path, owner: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, trainer="replicate", replicate_owner=owner)
    lines = settings_errors(caught.value)
    assert len(lines) == 1, lines
    assert lines[0].startswith("SELFIE_LORA_REPLICATE_OWNER: is not a Replicate account name"), \
        lines


@pytest.mark.parametrize(("owner", "kept"), [("acme", "acme"), ("me ", "me"),
                                             ("my-org_2", "my-org_2"), ("a.b", "a.b")])
def test_an_owner_makes_destinations_replicate_takes(tmp_path: Path, owner: str,
                                                     kept: str) -> None:
    settings = Settings(home=tmp_path, trainer="replicate", replicate_owner=owner)
    assert settings.destination_owner == kept
    destination = destination_for(owner=settings.destination_owner,
                                  model_id="0123456789abcdef0123")
    assert validate_replicate_model(destination) == destination


@pytest.mark.parametrize("recipe", ["nope", "local-tiny-v2", "local-flux-v2", " replicate-person-v1"])
def test_a_replicate_recipe_that_is_not_one_is_a_settings_error(tmp_path: Path,
                                                                 recipe: str) -> None:
    # Old code: accepted; every Replicate upload and training then failed on get_recipe, or a
    # local recipe's steps were sent to Replicate.
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path, replicate_recipe=recipe)
    assert settings_errors(caught.value) == [
        "SELFIE_LORA_REPLICATE_RECIPE: must be a Replicate recipe: replicate-person-v1"]
    assert Settings(home=tmp_path).replicate_recipe == "replicate-person-v1"


def test_replicate_without_a_token_is_said_once_naming_both_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(wiring, "_no_token_said", threading.Event())
    caplog.set_level("WARNING", logger="selfie_lora.wiring")
    settings = Settings(home=tmp_path, trainer="replicate", replicate_owner="acme",
                        replicate_api_token=None)
    assert "replicate" not in wiring.default_trainers(settings)
    wiring.default_trainers(settings)
    said = [r.getMessage() for r in caplog.records if "REPLICATE_API_TOKEN" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("SELFIE_LORA_TRAINER is replicate but REPLICATE_API_TOKEN is not "
                              "set"), said


def test_a_local_trainer_without_a_token_says_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(wiring, "_no_token_said", threading.Event())
    caplog.set_level("WARNING", logger="selfie_lora.wiring")
    wiring.default_trainers(Settings(home=tmp_path, trainer="local", replicate_api_token=None))
    assert not [r for r in caplog.records if "REPLICATE_API_TOKEN" in r.getMessage()]
