"""SELFIE_LORA_TRAINER_VERSION is pinned on every new model when it is made, for good: a
value its backend's trainer would refuse is a settings error when the settings are built (the same
check as a re-pin's), never a pin that fails every training of the model. A user's re-pin is held
to the Replicate trainers the operator chose (that setting's model, SELFIE_LORA_ALLOWED_TRAINERS)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from selfie_lora.config import Settings, settings_errors
from selfie_lora.domain.recipes import (
    DEFAULT_REPLICATE_TRAINER_VERSION,
    RepinPolicy,
    validate_trainer_version,
)
from selfie_lora.errors import ErrorCode, ForbiddenError, InvalidInputError

HASH = "a" * 64


@pytest.mark.parametrize("value", [
    "ostris/flux-dev-lora-trainer",  # no version hash
    f"ostris/flux-dev-lora-trainer:{HASH[:12]}",  # a short hash
    f"ostris/flux-dev-lora-trainer:{HASH.upper()}",
    HASH,  # a hash without its model
    "local-tiny-v2",  # the local backend's name
])
def test_a_replicate_trainer_version_it_would_refuse_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, value: str,
) -> None:
    monkeypatch.setenv("SELFIE_LORA_TRAINER", "replicate")
    monkeypatch.setenv("SELFIE_LORA_REPLICATE_OWNER", "acme")
    monkeypatch.setenv("SELFIE_LORA_TRAINER_VERSION", value)
    with pytest.raises(ValueError, match="SELFIE_LORA_TRAINER_VERSION") as caught:
        Settings()
    assert "owner/name:<64 hex digits>" in str(caught.value)


def test_a_replicate_version_reference_is_kept() -> None:
    value = f"ostris/flux-dev-lora-trainer:{HASH}"
    pinned = Settings(trainer="replicate", replicate_owner="acme", trainer_version=value)
    assert pinned.effective_trainer_version == value
    padded = Settings(trainer="replicate", replicate_owner="acme", trainer_version=f" {value}\n")
    assert padded.effective_trainer_version == value  # pinned as the trainer reads it


@pytest.mark.parametrize(("value", "base_model"), [
    ("local-tiny-v1", "tiny"), ("local-tiny-v2", "tiny"),
    ("local-flux-v1", "/models/flux"), ("local-flux-v2", "/models/flux")])
def test_the_local_backends_own_versions_are_valid(value: str, base_model: str) -> None:
    assert Settings(trainer="local", base_model=base_model,
                    trainer_version=value).effective_trainer_version == value


@pytest.mark.parametrize(("value", "base_model", "made_for", "fits"), [
    ("local-tiny-v2", "/models/flux", "the tiny test model", "local-flux-v2 or local-flux-v1"),
    ("local-tiny-v1", "/models/flux", "the tiny test model", "local-flux-v2 or local-flux-v1"),
    ("local-flux-v1", "tiny", "FLUX.1", "local-tiny-v2 or local-tiny-v1"),
])
def test_a_local_trainer_version_for_another_base_model_is_a_settings_error(
        value: str, base_model: str, made_for: str, fits: str) -> None:
    # local-tiny-v2 was accepted with a FLUX.1 folder: every new model was pinned to the tiny
    # recipe (64 px, 40 steps, rank 4) and trained it on the real FLUX.1.
    with pytest.raises(ValidationError) as caught:
        Settings(trainer="local", base_model=base_model, trainer_version=value)
    [line] = settings_errors(caught.value)
    assert line.startswith("SELFIE_LORA_TRAINER_VERSION: ")
    assert f"{value} is a trainer version for {made_for}" in line
    assert f"SELFIE_LORA_BASE_MODEL): use {fits}, or leave it unset" in line
    # Unset, the default fits whatever the base model.
    assert Settings(trainer="local", base_model=base_model).effective_trainer_version == (
        fits.split(" or ")[0])


@pytest.mark.parametrize("value", ["local-tiny-v9", f"ostris/flux-dev-lora-trainer:{HASH}"])
def test_a_local_trainer_version_without_a_recipe_is_a_settings_error(value: str) -> None:
    with pytest.raises(ValueError, match=r"SELFIE_LORA_TRAINER_VERSION.*not a local trainer"):
        Settings(trainer="local", trainer_version=value)


@pytest.mark.parametrize(("trainer", "base_model"), [("local", "tiny"), ("local", "/models/flux"),
                                                     ("replicate", "tiny")])
def test_unset_the_default_of_each_backend_is_valid(trainer: str, base_model: str) -> None:
    settings = Settings(trainer=trainer, base_model=base_model, trainer_version=None,
                        replicate_owner="acme")
    pinned = settings.effective_trainer_version
    assert validate_trainer_version(backend=trainer, trainer_version=pinned) == pinned
    if trainer == "replicate":
        assert pinned == DEFAULT_REPLICATE_TRAINER_VERSION


def test_the_replicate_trainer_needs_an_owner_for_its_destinations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Unset, the owner used to default to "selfie-lora": every new model was given (and pinned
    # for good) a destination under an account the operator does not own.
    monkeypatch.setenv("SELFIE_LORA_TRAINER", "replicate")
    monkeypatch.delenv("SELFIE_LORA_REPLICATE_OWNER", raising=False)
    with pytest.raises(ValueError, match="needs SELFIE_LORA_REPLICATE_OWNER"):
        Settings()
    monkeypatch.setenv("SELFIE_LORA_REPLICATE_OWNER", "acme")
    assert Settings().destination_owner == "acme"
    # The local trainer names its destinations itself: no owner needed.
    monkeypatch.setenv("SELFIE_LORA_TRAINER", "local")
    monkeypatch.delenv("SELFIE_LORA_REPLICATE_OWNER")
    assert Settings().destination_owner == "local"


OSTRIS = "ostris/flux-dev-lora-trainer"


def test_a_repin_moves_only_to_a_version_of_a_trainer_the_operator_chose() -> None:
    # Any owner/name:<64 hex> was accepted: a user re-pinned to a model of their own choosing,
    # which then ran on (and billed) the operator's Replicate account.
    policy = RepinPolicy.of(default_trainer_version=DEFAULT_REPLICATE_TRAINER_VERSION,
                            allowed=["acme/better-trainer"])
    newer = f"{OSTRIS}:{'b' * 64}"  # a newer version of the same trainer: the legitimate move
    assert policy.check(backend="replicate", trainer_version=f" {newer}\n") == newer
    assert policy.check(backend="replicate", trainer_version=f"acme/better-trainer:{HASH}") == (
        f"acme/better-trainer:{HASH}")
    for other in (f"attacker/anything-expensive:{HASH}", f"ostris/flux-dev-lora-trainer2:{HASH}",
                  f"acme/better:{HASH}"):
        with pytest.raises(ForbiddenError) as caught:
            policy.check(backend="replicate", trainer_version=other)
        assert caught.value.code is ErrorCode.TRAINER_NOT_ALLOWED
        assert caught.value.http_status == 403
        assert "acme/better-trainer, ostris/flux-dev-lora-trainer" in caught.value.message
    # What no trainer could run is still a 422, whatever the list says.
    with pytest.raises(InvalidInputError):
        policy.check(backend="replicate", trainer_version="acme/better-trainer")


@pytest.mark.parametrize("value", ["local-tiny-v1", "local-tiny-v2", "local-flux-v1",
                                   "local-flux-v2"])
def test_a_local_model_moves_to_any_local_recipe(value: str) -> None:
    # A local trainer version names a recipe of this code base, run on the operator's machine.
    assert RepinPolicy().check(backend="local", trainer_version=value) == value
    with pytest.raises(InvalidInputError):
        RepinPolicy().check(backend="local", trainer_version=f"{OSTRIS}:{HASH}")


def test_a_local_model_moves_only_to_a_recipe_of_the_server_s_base_model() -> None:
    # A re-pin to the tiny recipe on a FLUX.1 server would train 64 px, 40 steps, rank 4 on it.
    flux = RepinPolicy(base_model="/models/flux")
    assert flux.check(backend="local", trainer_version="local-flux-v1") == "local-flux-v1"
    with pytest.raises(InvalidInputError) as refused:
        flux.check(backend="local", trainer_version="local-tiny-v2")
    assert refused.value.code is ErrorCode.INVALID_TRAINER_VERSION
    assert refused.value.message == (
        "local-tiny-v2 is a trainer version for the tiny test model, and this server trains "
        "on FLUX.1: re-pin to local-flux-v2 or local-flux-v1")
    tiny = Settings(trainer="local", base_model="tiny").repin_policy
    assert tiny.check(backend="local", trainer_version="local-tiny-v1") == "local-tiny-v1"
    with pytest.raises(InvalidInputError, match="re-pin to local-tiny-v2 or local-tiny-v1"):
        tiny.check(backend="local", trainer_version="local-flux-v2")


def test_allowed_trainers_is_a_comma_separated_list_of_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SELFIE_LORA_TRAINER", "replicate")
    monkeypatch.setenv("SELFIE_LORA_REPLICATE_OWNER", "acme")
    assert Settings().allowed_trainers == ()
    assert Settings().repin_policy.replicate_models == {OSTRIS}
    monkeypatch.setenv("SELFIE_LORA_ALLOWED_TRAINERS", " acme/one, acme/two ,")
    assert Settings().allowed_trainers == ("acme/one", "acme/two")
    assert Settings().repin_policy.replicate_models == {OSTRIS, "acme/one", "acme/two"}
    # The configured trainer's model is the default's; the built-in one is no longer allowed.
    monkeypatch.setenv("SELFIE_LORA_TRAINER_VERSION", f"acme/own-trainer:{HASH}")
    assert Settings().repin_policy.replicate_models == {"acme/own-trainer", "acme/one",
                                                        "acme/two"}


@pytest.mark.parametrize("value", [f"{OSTRIS}:{HASH}", "ostris", "Ostris/Flux", "a/b/c"])
def test_an_allowed_trainer_that_is_no_model_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, value: str,
) -> None:
    monkeypatch.setenv("SELFIE_LORA_ALLOWED_TRAINERS", f"acme/one,{value}")
    with pytest.raises(ValidationError) as caught:
        Settings()
    [line] = settings_errors(caught.value)
    assert line.startswith("SELFIE_LORA_ALLOWED_TRAINERS: ")
    assert "owner/name" in line
