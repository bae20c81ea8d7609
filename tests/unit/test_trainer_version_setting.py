"""SELFIE_LORA_TRAINER_VERSION is pinned on every new model at its first training, for good: a
value its backend's trainer would refuse is a settings error when the settings are built (the same
check as a re-pin's), never a pin that fails every training of the model."""

from __future__ import annotations

import pytest

from selfie_lora.config import Settings
from selfie_lora.domain.recipes import DEFAULT_REPLICATE_TRAINER_VERSION, validate_trainer_version

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


@pytest.mark.parametrize("value", ["local-tiny-v1", "local-tiny-v2", "local-flux-v1",
                                   "local-flux-v2"])
def test_the_local_backends_own_versions_are_valid(value: str) -> None:
    assert Settings(trainer="local", trainer_version=value).effective_trainer_version == value


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
