"""The training-quality knobs of a recipe: stored with every training, absent (and so v1's
behaviour) in recipes stored before them, checked when a recipe is made."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfie_lora.domain.entities import LORA_TARGET_SETS, TIMESTEP_SAMPLINGS, Recipe
from selfie_lora.domain.recipes import RECIPES, CheckTarget, get_recipe, validate_trainer_version

recipes = st.builds(
    Recipe,
    name=st.text(min_size=1, max_size=20),
    steps=st.integers(1, 5000),
    lora_rank=st.integers(1, 128),
    learning_rate=st.floats(1e-6, 1e-1),
    resolution=st.integers(16, 2048),
    batch_size=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    lora_alpha=st.none() | st.integers(1, 128),
    checkpoint_every=st.integers(0, 1000),
    timestep_sampling=st.sampled_from(TIMESTEP_SAMPLINGS),
    lora_targets=st.sampled_from(LORA_TARGET_SETS),
    aspect_buckets=st.booleans(),
    face_loss_weight=st.floats(1.0, 10.0),
    sample_every=st.integers(0, 1000),
)


@given(recipes)
def test_any_recipe_round_trips_through_its_stored_form(recipe: Recipe) -> None:
    assert Recipe.from_dict(recipe.as_dict()) == recipe
    # What a version records holds every value, and reads back as the same recipe too.
    values = recipe.values()
    assert Recipe.from_dict(values) == recipe
    assert set(values) >= {"timestep_sampling", "lora_targets", "aspect_buckets",
                           "face_loss_weight", "sample_every", "lora_alpha"}


def test_a_v1_recipe_stores_exactly_what_it_stored_before_the_knobs() -> None:
    # The stored form of a v1 recipe, as trainings and checkpoint fingerprints hold it.
    assert get_recipe("local-tiny-v1").as_dict() == {
        "name": "local-tiny-v1", "steps": 40, "lora_rank": 4, "learning_rate": 1e-2,
        "resolution": 64, "batch_size": 1, "seed": 0, "checkpoint_every": 10}
    old = Recipe.from_dict({"name": "local-flux-v1", "steps": 1500, "lora_rank": 16,
                            "learning_rate": 1e-4, "resolution": 512})
    assert (old.timestep_sampling, old.lora_targets, old.aspect_buckets, old.face_loss_weight,
            old.sample_every) == ("sigmoid", "attention", False, 1.0, 0)


def test_v2_recipes_turn_every_knob_on_and_are_local_trainer_versions() -> None:
    for name in ("local-flux-v2", "local-tiny-v2"):
        recipe = get_recipe(name)
        assert recipe.timestep_sampling == "flux_shift"
        assert recipe.lora_targets == "all_linear"
        assert recipe.aspect_buckets
        assert recipe.face_loss_weight > 1.0
        assert 0 < recipe.sample_every < recipe.steps
        assert validate_trainer_version(backend="local", trainer_version=name) == name
    assert CheckTarget.of(backend="local", trainer_version="local-tiny-v2") is CheckTarget.TINY
    assert CheckTarget.of(backend="local", trainer_version="local-flux-v2") is CheckTarget.LOCAL_FLUX
    assert set(RECIPES) >= {"local-flux-v1", "local-tiny-v1", "local-flux-v2", "local-tiny-v2"}


@pytest.mark.parametrize("knob", [
    {"timestep_sampling": "uniform"}, {"lora_targets": "everything"},
    {"face_loss_weight": 0.5}, {"sample_every": -1},
])
def test_a_recipe_with_an_unknown_knob_value_is_refused(knob: dict[str, object]) -> None:
    stored = {"name": "x", "steps": 10, "lora_rank": 4, "learning_rate": 1e-3, "resolution": 64,
              **knob}
    with pytest.raises(ValueError, match="recipe x"):
        Recipe.from_dict(stored)
