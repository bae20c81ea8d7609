"""Named training recipes. A training stores the recipe it used, so a rerun is reproducible.

For the local backend the recipe name *is* the trainer version (pinned on the model like a
Replicate trainer version); for Replicate the recipe supplies steps, rank, learning rate and resolution.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from selfie_lora.domain.entities import Recipe
from selfie_lora.errors import ConfigError, ErrorCode, ForbiddenError, InvalidInputError

# owner/name, as Replicate names a model; owner/name:<64 hex>, as it names one of its versions.
_REPLICATE_NAME_PATTERN = r"[a-z0-9][a-z0-9_.-]{0,99}"
_REPLICATE_MODEL_PATTERN = rf"{_REPLICATE_NAME_PATTERN}/{_REPLICATE_NAME_PATTERN}"
_REPLICATE_OWNER = re.compile(_REPLICATE_NAME_PATTERN)
_REPLICATE_MODEL = re.compile(_REPLICATE_MODEL_PATTERN)
_REPLICATE_VERSION = re.compile(rf"{_REPLICATE_MODEL_PATTERN}:[0-9a-f]{{64}}")

# The local backend's recipe for a new model of each base model: the tiny one, or a real FLUX.1.
# A model keeps the recipe it was first trained with (its trainer version): models made before
# v2 retrain on v1.
_LOCAL_TINY_RECIPE = "local-tiny-v2"
_LOCAL_FLUX_RECIPE = "local-flux-v2"

RECIPES: dict[str, Recipe] = {
    # ostris/flux-dev-lora-trainer's defaults for a person LoRA (steps, rank, learning rate), but
    # for its resolution: sent as "1024" where the trainer's default is "512,768,1024", as the
    # photos are prepared at 1024 px, so it trains one 1024 bucket. Kept: models pinned to it
    # retrain as they first trained.
    "replicate-person-v1": Recipe(
        name="replicate-person-v1", steps=1000, lora_rank=16, learning_rate=4e-4, resolution=1024
    ),
    # A real FLUX.1 from a folder on a GPU: ai-toolkit-like settings, a checkpoint every 250 steps
    # (ai-toolkit's save_every; a few minutes of work at most is lost to a crash).
    "local-flux-v1": Recipe(
        name="local-flux-v1", steps=1500, lora_rank=16, learning_rate=1e-4, resolution=512,
        checkpoint_every=250,
    ),
    # The offline tiny model on a CPU: few steps, a high learning rate so training visibly moves it.
    # Checkpoints every 10 steps: the tests kill and resume it, and its checkpoints are tiny.
    "local-tiny-v1": Recipe(
        name="local-tiny-v1", steps=40, lora_rank=4, learning_rate=1e-2, resolution=64,
        checkpoint_every=10,
    ),
    # v2: the quality knobs at the peers' settings. ostris/flux-dev-lora-trainer (ai-toolkit, what
    # Replicate runs) trains 1000 steps at rank 16 and 4e-4 on every linear layer of both streams,
    # up to 1024 px in aspect buckets; SimpleTuner shifts FLUX's timesteps by resolution as FLUX's
    # own sampler does; masked (face-weighted) loss and sample images every 250 steps are
    # ai-toolkit/SimpleTuner features. Models pinned to v1 keep training as v1.
    "local-flux-v2": Recipe(
        name="local-flux-v2", steps=1000, lora_rank=16, learning_rate=4e-4, resolution=1024,
        checkpoint_every=250, timestep_sampling="flux_shift", lora_targets="all_linear",
        aspect_buckets=True, face_loss_weight=2.0, sample_every=250,
    ),
    "local-tiny-v2": Recipe(
        name="local-tiny-v2", steps=40, lora_rank=4, learning_rate=1e-2, resolution=64,
        checkpoint_every=10, timestep_sampling="flux_shift", lora_targets="all_linear",
        aspect_buckets=True, face_loss_weight=2.0, sample_every=20,
    ),
}

DEFAULT_REPLICATE_TRAINER_VERSION = (
    "ostris/flux-dev-lora-trainer:f463fbfc97389e10a2f443a8a84b6953b1058eafbf0c9af4d84457ff07cb04db"
)
DEFAULT_REPLICATE_RECIPE = "replicate-person-v1"


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        known = ", ".join(sorted(RECIPES))
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {known}") from None


def default_local_trainer_version(base_model: str) -> str:
    return _LOCAL_TINY_RECIPE if base_model == "tiny" else _LOCAL_FLUX_RECIPE


def recipe_for(*, backend: str, trainer_version: str, replicate_recipe: str) -> Recipe:
    """The recipe a training of a model pinned to ``trainer_version`` uses."""
    if backend == "local":
        return get_recipe(trainer_version)
    return get_recipe(replicate_recipe)


class CheckTarget(StrEnum):
    """The trainings photos can be judged for (``selfie-lora check --for``). Each stands for the
    recipe a new model of it trains with, so for the resolution its photos are cropped to."""

    REPLICATE = "replicate"
    LOCAL_FLUX = "local-flux"
    TINY = "tiny"

    @classmethod
    def of(cls, *, backend: str, trainer_version: str) -> CheckTarget:
        """The target of a model of ``backend`` pinned to ``trainer_version``."""
        if backend != "local":
            return cls.REPLICATE
        return cls.TINY if trainer_version.startswith("local-tiny-") else cls.LOCAL_FLUX

    def recipe(self, *, replicate_recipe: str, backend: str | None = None,
               trainer_version: str | None = None) -> Recipe:
        """The recipe a new model of this target trains with: on Replicate, the configured
        ``replicate_recipe``; locally, the configured ``trainer_version`` when it is one of this
        target's (a new model is pinned to it, so SELFIE_LORA_TRAINER_VERSION=local-flux-v1
        trains at 512 px, not the newest recipe's 1024), else this target's newest recipe."""
        if self is CheckTarget.REPLICATE:
            return get_recipe(replicate_recipe)
        if (backend == "local" and trainer_version
                and CheckTarget.of(backend=backend, trainer_version=trainer_version) is self):
            return get_recipe(trainer_version)
        return get_recipe(_LOCAL_TINY_RECIPE if self is CheckTarget.TINY else _LOCAL_FLUX_RECIPE)


# What each family of local recipes is made for, as a user or operator knows it.
_TRAINS_ON = {CheckTarget.TINY: "the tiny test model", CheckTarget.LOCAL_FLUX: "FLUX.1"}


def base_model_target(base_model: str) -> CheckTarget:
    """The family of local recipes made for ``base_model`` (``SELFIE_LORA_BASE_MODEL``): the
    tiny test model's, or a real FLUX.1's for any folder."""
    return CheckTarget.TINY if base_model == "tiny" else CheckTarget.LOCAL_FLUX


def local_versions_for(base_model: str) -> tuple[str, ...]:
    """The local trainer versions that fit ``base_model``: the one a new model gets first, then
    the others of its family, newest first."""
    default = default_local_trainer_version(base_model)
    target = base_model_target(base_model)
    others = sorted((name for name in RECIPES if name.startswith("local-") and name != default
                     and CheckTarget.of(backend="local", trainer_version=name) is target),
                    reverse=True)
    return (default, *others)


def base_model_mismatch(*, trainer_version: str, base_model: str) -> str | None:
    """None when the local ``trainer_version`` is a recipe made for ``base_model``; else what it
    is and what this server trains on ("a trainer version for the tiny test model, and this
    server trains on FLUX.1"), for a sentence that names it first. The tiny recipes (64 px, 40
    steps, rank 4) give a useless LoRA of a real FLUX.1, and FLUX.1's (up to 1024 px, 1000+
    steps) run for hours on the tiny model that stands in for it on CPUs."""
    made_for = CheckTarget.of(backend="local", trainer_version=trainer_version)
    here = base_model_target(base_model)
    if made_for is here:
        return None
    return (f"a trainer version for {_TRAINS_ON[made_for]}, and this server trains on "
            f"{_TRAINS_ON[here]}")


def validate_trainer_version(*, backend: str, trainer_version: str) -> str:
    """``trainer_version`` when a model of ``backend`` can train with it (422 otherwise): a
    known local recipe, or a Replicate version reference ``owner/name:<64 hex>``. Checked before
    a model is re-pinned, so a pin can never make every later training fail."""
    version = trainer_version.strip()
    if backend == "local":
        known = sorted(name for name in RECIPES if name.startswith("local-"))
        if version not in known:
            raise InvalidInputError(
                f"{trainer_version[:100]!r} is not a local trainer version; known: "
                f"{', '.join(known)}", code=ErrorCode.INVALID_TRAINER_VERSION)
        return version
    if not _REPLICATE_VERSION.fullmatch(version):
        raise InvalidInputError(
            f"{trainer_version[:100]!r} is not a Replicate trainer version: expected "
            "owner/name:<64 hex digits>", code=ErrorCode.INVALID_TRAINER_VERSION)
    return version


def validate_replicate_model(name: str) -> str:
    """``name`` stripped when it names a Replicate model, ``owner/name`` without a version (422
    otherwise)."""
    model = name.strip()
    if not _REPLICATE_MODEL.fullmatch(model):
        raise InvalidInputError(f"{name[:100]!r} is not a Replicate model: expected owner/name "
                                "(lowercase, no version)", code=ErrorCode.INVALID_TRAINER_VERSION)
    return model


def validate_replicate_owner(owner: str) -> str:
    """``owner`` stripped when it is a Replicate account name, the owner part of ``owner/name``
    (ConfigError otherwise): every new model's destination is ``<owner>/selfie-lora-...``."""
    name = owner.strip()
    if not _REPLICATE_OWNER.fullmatch(name):
        raise ConfigError("is not a Replicate account name: lowercase letters, digits, '-', "
                          "'_' or '.', no '/' or space (the user or organisation alone, not "
                          "owner/model)")
    return name


def replicate_model_of(trainer_version: str) -> str:
    """The ``owner/name`` of a Replicate version reference ``owner/name:<version>``."""
    return trainer_version.partition(":")[0]


@dataclass(frozen=True)
class RepinPolicy:
    """Which trainer versions a user may move their model to (``ModelService
    .change_trainer_version``).

    A Replicate trainer runs on the operator's account and bills it, and the worker downloads
    what its output names: a user may choose any version of the trainer models the operator
    chose (the configured default's, so that moving to a newer version of the same trainer
    stays a user's call, and those of SELFIE_LORA_ALLOWED_TRAINERS), never a model of their own
    choosing. A local trainer version is a recipe of this code base run on the operator's own
    machine, so every known local recipe stays open (``validate_trainer_version``).
    """

    replicate_models: frozenset[str] = frozenset(
        {replicate_model_of(DEFAULT_REPLICATE_TRAINER_VERSION)})
    # The local trainer's base model (SELFIE_LORA_BASE_MODEL): a local model moves only to a
    # recipe made for it. None: any local recipe.
    base_model: str | None = None

    @classmethod
    def of(cls, *, default_trainer_version: str, allowed: Iterable[str] = (),
           base_model: str | None = None) -> RepinPolicy:
        """Versions of the model of ``default_trainer_version`` (a Replicate reference) and of
        each ``owner/name`` in ``allowed``; local recipes made for ``base_model``."""
        return cls(replicate_models=frozenset(
            {replicate_model_of(default_trainer_version), *allowed}), base_model=base_model)

    def check(self, *, backend: str, trainer_version: str) -> str:
        """``trainer_version`` (stripped) when a user may re-pin a model of ``backend`` to it:
        422 when the backend could not train with it (a local recipe made for another base
        model than this server's included), 403 when it is a Replicate model the operator has
        not allowed."""
        version = validate_trainer_version(backend=backend, trainer_version=trainer_version)
        if backend == "local":
            if self.base_model is not None:
                mismatch = base_model_mismatch(trainer_version=version,
                                               base_model=self.base_model)
                if mismatch is not None:
                    raise InvalidInputError(
                        f"{version} is {mismatch}: re-pin to "
                        f"{' or '.join(local_versions_for(self.base_model))}",
                        code=ErrorCode.INVALID_TRAINER_VERSION)
            return version
        model = replicate_model_of(version)
        if model not in self.replicate_models:
            allowed = ", ".join(sorted(self.replicate_models))
            raise ForbiddenError(
                f"{model!r} is not a trainer this service runs: re-pin to a version of "
                f"{allowed} (the operator can allow more with SELFIE_LORA_ALLOWED_TRAINERS)",
                code=ErrorCode.TRAINER_NOT_ALLOWED)
        return version
