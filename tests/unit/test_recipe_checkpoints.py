"""``Recipe.checkpoint_every``: stored with every training, absent from recipes stored before it."""

from __future__ import annotations

from selfie_lora.domain.entities import Recipe
from selfie_lora.domain.gc import Owner
from selfie_lora.domain.recipes import RECIPES, get_recipe
from selfie_lora.services.layout import checkpoint_key, checkpoint_step, owner_of


def test_a_recipe_stored_before_checkpoints_reads_back_without_them() -> None:
    stored = {"name": "local-flux-v1", "steps": 1500, "lora_rank": 16, "learning_rate": 1e-4,
              "resolution": 512, "batch_size": 1, "seed": 0}
    assert Recipe.from_dict(stored).checkpoint_every == 0


def test_every_recipe_round_trips_with_its_checkpoint_interval() -> None:
    for recipe in RECIPES.values():
        assert Recipe.from_dict(recipe.as_dict()) == recipe
    flux, tiny = get_recipe("local-flux-v1"), get_recipe("local-tiny-v1")
    assert 0 < flux.checkpoint_every < flux.steps
    assert 0 < tiny.checkpoint_every < tiny.steps  # small: the tests kill and resume it


def test_checkpoint_keys_read_back_as_their_trainings() -> None:
    key = checkpoint_key("t-1", 250)
    assert key == "checkpoints/t-1/step-00000250.ckpt"
    assert checkpoint_step(key) == 250
    assert checkpoint_step("checkpoints/t-1/other") is None
    assert owner_of(key) == (Owner.CHECKPOINT, "t-1")  # the collector judges them by it
