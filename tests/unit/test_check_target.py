"""``CheckTarget``: each training photos can be judged for stands for the recipe a new model of
it trains with, and a model's pinned backend and trainer version name its target."""

from __future__ import annotations

import pytest

from selfie_lora.domain.recipes import (
    DEFAULT_REPLICATE_RECIPE,
    DEFAULT_REPLICATE_TRAINER_VERSION,
    CheckTarget,
    default_local_trainer_version,
    recipe_for,
)

# What a new model of each target is pinned to: (backend, trainer version).
NEW_MODEL = {
    CheckTarget.REPLICATE: ("replicate", DEFAULT_REPLICATE_TRAINER_VERSION),
    CheckTarget.LOCAL_FLUX: ("local", default_local_trainer_version("/models/FLUX.1-dev")),
    CheckTarget.TINY: ("local", default_local_trainer_version("tiny")),
}


@pytest.mark.parametrize(("target", "resolution"), [
    (CheckTarget.REPLICATE, 1024), (CheckTarget.LOCAL_FLUX, 1024), (CheckTarget.TINY, 64)])
def test_each_target_is_the_recipe_its_training_uses(target: CheckTarget,
                                                     resolution: int) -> None:
    backend, version = NEW_MODEL[target]
    recipe = target.recipe(replicate_recipe=DEFAULT_REPLICATE_RECIPE)
    assert recipe == recipe_for(backend=backend, trainer_version=version,
                                replicate_recipe=DEFAULT_REPLICATE_RECIPE)
    assert recipe.resolution == resolution
    assert CheckTarget.of(backend=backend, trainer_version=version) is target


def test_names_are_the_command_line_values() -> None:
    assert [t.value for t in CheckTarget] == ["replicate", "local-flux", "tiny"]
    assert CheckTarget("local-flux") is CheckTarget.LOCAL_FLUX


def test_a_replicate_model_is_judged_for_replicate_whatever_version_it_pinned() -> None:
    other = "someone/their-trainer:" + "0" * 64
    assert CheckTarget.of(backend="replicate", trainer_version=other) is CheckTarget.REPLICATE
