"""The retraining plan: the one function that decides what a (re)training uses.

Every entry point that can start a training (HTTP upload-zip, HTTP start, CLI, demo) reaches this
function through ``services.training.TrainingService.start``, and an upload that starts nothing
makes the user's model with ``new_model`` (``TrainingService.upload``); nothing else creates a
model or picks a trigger word, destination, trainer version or LoRA scale. That is how the five
retraining bugs are made impossible rather than merely avoided.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import string
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from selfie_lora.domain.entities import Model, Recipe, Version
from selfie_lora.domain.likeness import DEFAULT_PROBE_COUNT, choose_probes
from selfie_lora.domain.recipes import (
    base_model_mismatch,
    get_recipe,
    local_versions_for,
    recipe_for,
)
from selfie_lora.errors import ConflictError, ErrorCode, InvalidInputError

DEFAULT_LORA_SCALE = 1.0
LORA_SCALE_MIN = -1.0
LORA_SCALE_MAX = 3.0
# A re-pin's longest trainer version and reason, for PATCH /api/model, the Model page and the
# CLI alike (ModelService.change checks them; the API's schema says them too).
TRAINER_VERSION_MAX_CHARS = 300
REASON_MAX_CHARS = 500

# Consonants only: with digits mixed in, a trigger word can never be an English word or a name
# the base model already knows, which is what makes it a "rare token".
_CONSONANTS = "bcdfghjklmnpqrstvwxz"


def new_trigger_word(rng: random.Random) -> str:
    """A rare token of lowercase letters and digits, such as ``zkr47v``."""
    letters = [rng.choice(_CONSONANTS) for _ in range(4)]
    digits = [rng.choice(string.digits) for _ in range(2)]
    return f"{letters[0]}{letters[1]}{letters[2]}{digits[0]}{digits[1]}{letters[3]}"


def is_valid_trigger_word(word: str) -> bool:
    return (
        4 <= len(word) <= 16
        and all(c in string.ascii_lowercase + string.digits for c in word)
        and any(c.isdigit() for c in word)
        and any(c.isalpha() for c in word)
    )


def destination_for(*, owner: str, model_id: str) -> str:
    """The destination name: derived from the model id once, never from a clock."""
    return f"{owner}/selfie-lora-{model_id.replace('-', '')[:16].lower()}"


@dataclass(frozen=True)
class TrainingDefaults:
    """What the configuration says now. A new model (``new_model``: its user's first upload or
    start) takes the owner from here, and a model's first training its backend and trainer
    version (``pin_for_training``); the Replicate recipe applies to every Replicate training."""

    backend: str
    trainer_version: str
    owner: str
    replicate_recipe: str
    # Only a new model uses it: the probe set is chosen once and stored with the model.
    probe_count: int = DEFAULT_PROBE_COUNT
    # The local trainer's base model (SELFIE_LORA_BASE_MODEL): a local model trains only on a
    # recipe made for it (``check_fits_base_model``). None: not checked.
    base_model: str | None = None


@dataclass(frozen=True)
class TrainingPlan:
    model: Model
    is_new_model: bool
    is_retraining: bool
    recipe: Recipe
    preserved: dict[str, Any]

    @property
    def trigger_word(self) -> str:
        return self.model.trigger_word

    @property
    def destination(self) -> str:
        return self.model.destination

    @property
    def trainer_version(self) -> str:
        return self.model.trainer_version

    @property
    def backend(self) -> str:
        return self.model.backend


def new_model(*, user_id: str, model_id: str, defaults: TrainingDefaults, rng: random.Random,
              now: datetime) -> Model:
    """A user's model, made once (by the first accepted upload or the first start, whichever
    comes first): a fresh trigger word, a destination derived from its id, the configured
    trainer version and backend (pinned by its first training: ``pin_for_training``), the
    default scale (not custom) and its fixed probe set
    for likeness tracking."""
    trigger_word = new_trigger_word(rng)
    return Model(
        id=model_id,
        user_id=user_id,
        backend=defaults.backend,
        trigger_word=trigger_word,
        destination=destination_for(owner=defaults.owner, model_id=model_id),
        trainer_version=defaults.trainer_version,
        lora_scale=DEFAULT_LORA_SCALE,
        lora_scale_is_custom=False,
        active_version_id=None,
        created_at=now,
        probes=choose_probes(trigger_word=trigger_word, rng=rng, count=defaults.probe_count),
    )


def plan_training(
    model: Model | None,
    *,
    user_id: str,
    new_model_id: str,
    defaults: TrainingDefaults,
    rng: random.Random,
    now: datetime,
    trained_before: bool,
    has_version: bool,
    repinned_by_user: bool = False,
) -> TrainingPlan:
    """Decide everything a training needs.

    With no model: a new one (``new_model``). With a model: all of that is taken from the
    model, whatever the configuration says now, except the trainer version and backend of its
    first training, and the destination when that moves it to another backend
    (``pin_for_training``). ``trained_before`` says whether the model has had a
    training (of any outcome): the first training that started pinned it, a canceled or failed
    one included, so a later start keeps that pin. ``has_version`` says whether it has a
    version to retrain: only then is the training a retraining (contract invariant 6's log,
    the pages' words). A model an upload made has neither, nor has one whose first training
    was canceled or failed: its next training is still its first, though its trigger word,
    destination and scale are preserved all the same.
    ``repinned_by_user``: the user moved its trainer version explicitly (PATCH) before it ever
    trained, which is the pin then.
    """
    if model is None:
        created = new_model(user_id=user_id, model_id=new_model_id, defaults=defaults, rng=rng,
                            now=now)
        return TrainingPlan(
            model=created, is_new_model=True, is_retraining=False,
            recipe=_recipe(created, defaults), preserved={},
        )
    if model.user_id != user_id:
        raise InvalidInputError("model belongs to another user")
    made_with = model
    model = pin_for_training(model, defaults, trained_before=trained_before,
                             repinned_by_user=repinned_by_user)
    preserved: dict[str, Any] = {
        "trigger_word": model.trigger_word,
        "destination": model.destination,
        "trainer_version": model.trainer_version,
        "backend": model.backend,
        "lora_scale": model.lora_scale,
        "lora_scale_is_custom": model.lora_scale_is_custom,
    }
    if model is not made_with:
        # Contract invariant 3: pinned at the first training, so logged as pinned now (the
        # model an upload made held the configuration of then, never trained on).
        preserved["pinned_at_first_training"] = {
            "backend": model.backend, "trainer_version": model.trainer_version,
            "destination": model.destination,
            "replaces": {"backend": made_with.backend,
                         "trainer_version": made_with.trainer_version,
                         "destination": made_with.destination},
        }
    if defaults.trainer_version != model.trainer_version or defaults.backend != model.backend:
        # Not an error: the pin wins. Recorded so the log shows the configuration moved on.
        preserved["configured_default_ignored"] = {
            "backend": defaults.backend,
            "trainer_version": defaults.trainer_version,
        }
    return TrainingPlan(
        model=model, is_new_model=False, is_retraining=has_version,
        recipe=_recipe(model, defaults), preserved=preserved,
    )


def pin_for_training(model: Model, defaults: TrainingDefaults, *, trained_before: bool,
                     repinned_by_user: bool = False) -> Model:
    """``model`` with the trainer version and backend its next training uses (contract
    invariant 3: pinned at the first training). A model that has trained, or that its user
    re-pinned explicitly, keeps its pin (a re-pinned one never trained still takes the
    configured owner's destination on the configured backend); one never trained (an upload
    that started nothing made it) takes the configured ones, which may have changed since that
    upload: with another backend that backend's destination, and the configured owner's (an
    operator who moved SELFIE_LORA_REPLICATE_OWNER to another account since the upload). The
    same object when nothing changes."""
    if trained_before:
        return model
    # The destination derived at the upload names the owner of then (the local backend's is
    # the literal "local"), which another backend, or Replicate on another account, cannot
    # train into: the training tried to create the old account's model with the new account's
    # token (refused: the first training failed), or trained there when the token reached
    # both. It is derived again as a new model's would be; a never-trained model has no remote
    # destination created yet, so this is still before it is made (contract invariant 2).
    destination = destination_for(owner=defaults.owner, model_id=model.id)
    if repinned_by_user:
        # The user chose the trainer version (and with it the backend), not the account: on the
        # configured backend, the destination still follows the configured owner until the
        # first training creates it. On another backend its owner is not configured here.
        if model.backend != defaults.backend or model.destination == destination:
            return model
        return dataclasses.replace(model, destination=destination)
    if (model.backend, model.trainer_version, model.destination) == (
            defaults.backend, defaults.trainer_version, destination):
        return model
    return dataclasses.replace(model, backend=defaults.backend,
                               trainer_version=defaults.trainer_version,
                               destination=destination)


def repin_is_recorded(*, pinned: str, requested: str, trained_before: bool,
                      repinned_before: bool) -> bool:
    """Whether an explicit re-pin of a model pinned to ``pinned`` to ``requested`` is recorded
    (its ``trainer_version_changed`` event written): when it moves the pin, and on a model never
    trained nor re-pinned yet, always, even to the version it shows. Until its first training
    such a model's version follows the configured one (``pin_for_training``), so the version it
    shows is only what it would take today: the event is what makes the user's choice its pin.
    Always rather than only when the request differs from what the next training would take:
    a choice equal to today's configuration must survive the configuration changing before the
    first training too, and the rule needs no configuration. Sent again (its answer lost), the
    model is re-pinned already and nothing more is recorded."""
    return requested != pinned or not (trained_before or repinned_before)


def _recipe(model: Model, defaults: TrainingDefaults) -> Recipe:
    # For the local backend the pinned trainer version names the recipe, so it is pinned too.
    return recipe_for(
        backend=model.backend, trainer_version=model.trainer_version,
        replicate_recipe=defaults.replicate_recipe,
    )


def check_fits_base_model(model: Model, defaults: TrainingDefaults) -> None:
    """Refuse (409 ``base_model_mismatch``) to train ``model`` when it is a local model pinned
    to a recipe made for another base model than the configured one: one pinned while the
    server ran on the tiny test model, after the operator moved it to a FLUX.1 folder, would
    train the tiny recipe (64 px, 40 steps, rank 4) on the real FLUX.1."""
    if model.backend != "local" or defaults.base_model is None:
        return
    mismatch = base_model_mismatch(trainer_version=model.trainer_version,
                                   base_model=defaults.base_model)
    if mismatch is None:
        return
    fits = local_versions_for(defaults.base_model)
    # The photos stored for a tiny recipe are 64 px crops (``photos_fit``).
    then = (", then upload your photos again so they are prepared for it"
            if get_recipe(fits[0]).resolution > get_recipe(model.trainer_version).resolution
            else "")
    raise ConflictError(
        f"your model is pinned to {model.trainer_version}, {mismatch}: re-pin it to "
        f'{fits[0]} (PATCH /api/model {{"trainer_version": "{fits[0]}", "reason": "..."}}, '
        f'or "Move to another trainer version" on the model page; {" or ".join(fits)} fit '
        f"this server){then}",
        code=ErrorCode.BASE_MODEL_MISMATCH)


def check_version_fits_base_model(*, backend: str, version: Version, base_model: str | None,
                                  use: str = "make pictures") -> None:
    """Refuse (409 ``base_model_mismatch``) to ``use`` a local ``version`` trained with a recipe
    made for another base model than the server's (SELFIE_LORA_BASE_MODEL moved since): its LoRA
    does not fit the pipeline's layers, so loading it fails every time, whatever is retried."""
    if backend != "local" or base_model is None:
        return
    mismatch = base_model_mismatch(trainer_version=version.trainer_version,
                                   base_model=base_model)
    if mismatch is None:
        return
    raise ConflictError(
        f"version {version.number} cannot {use} on this server: it was trained with "
        f"{version.trainer_version}, {mismatch}, so its LoRA does not fit; use a version "
        f"trained here, or train again (re-pin to {local_versions_for(base_model)[0]} first)",
        code=ErrorCode.BASE_MODEL_MISMATCH)


def photos_fit(*, prepared_resolution: int | None, recipe: Recipe) -> bool:
    """Whether photos cropped at ``prepared_resolution`` when they were uploaded can train
    ``recipe``: at its resolution or above (the trainer only shrinks them), never below, where
    the trainer would upscale every photo (512 px crops for a 1024 px recipe, after a re-pin).
    Unknown (None: neither recorded nor readable from the photos) trains as it always did."""
    return prepared_resolution is None or prepared_resolution >= recipe.resolution


def photos_too_small(*, prepared_resolution: int, recipe: Recipe, trainer_version: str) -> str:
    """Why photos prepared at ``prepared_resolution`` cannot train ``recipe`` (see
    ``photos_fit``), and what the user does about it."""
    return (f"these photos were prepared at {prepared_resolution} px when they were uploaded, "
            f"and your model now trains with {trainer_version} at {recipe.resolution} px, so "
            "every photo would be upscaled: upload your photos again (they are then prepared "
            f"at {recipe.resolution} px) and train on them")


def validate_lora_scale(scale: float) -> float:
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale):
        raise InvalidInputError("lora_scale must be a finite number", code=ErrorCode.INVALID_LORA_SCALE)
    if not LORA_SCALE_MIN <= float(scale) <= LORA_SCALE_MAX:
        raise InvalidInputError(
            f"lora_scale must be between {LORA_SCALE_MIN} and {LORA_SCALE_MAX}",
            code=ErrorCode.INVALID_LORA_SCALE,
        )
    # + 0.0: -0.0 is 0.0 (-0.0 + 0.0 == +0.0), the same scale, which was kept and shown as "-0"
    # ("?lora_scale=-0", a -0.0 in PostgreSQL; SQLite stores it as 0).
    return float(scale) + 0.0


# A scale as the text fronts (the Generate page's form and address, the CLI) take it, by the
# API's rules for its JSON numbers: ASCII digits, a sign, a decimal point, an exponent (a number
# field may send "1e-7", and lora_scale_text writes a tiny scale so). Python's float() also took
# "0.2_5" (0.25), other scripts' digits ("٣") and "inf", and each front read its own set.
_SCALE_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def lora_scale_from_text(text: str | None) -> float | None:
    """The scale a text front was given (None: empty, the saved one), refused with one message
    whatever is wrong with it (not a number, out of the range, not finite), which names the
    range and what was typed (its start)."""
    if text is None or not text.strip():
        return None
    written = text.strip()
    refused = InvalidInputError(f"the LoRA scale must be a number from {LORA_SCALE_MIN} to "
                                f"{LORA_SCALE_MAX} (not {text[:40]!r})",
                                code=ErrorCode.INVALID_LORA_SCALE)
    if not _SCALE_TEXT.fullmatch(written):
        raise refused
    try:
        return validate_lora_scale(float(written))
    except InvalidInputError:
        raise refused from None


def lora_scale_text(scale: float) -> str:
    """``scale`` as every front end shows it (and a PNG stores it): the shortest text that reads
    back as exactly this float, "1" for 1.0. Rounded to 6 digits (``:g``), 0.123456789 was shown
    as 0.123457, and generating again with the scale shown made a different picture."""
    text = repr(float(scale))
    return text[:-2] if text.endswith(".0") else text


def check_repin_lengths(*, trainer_version: str, reason: str) -> None:
    """A trainer version or a reason over its length is refused, by every entry point alike
    (only the API's schema capped them: the CLI logged a 5000-character reason). The reason's
    is invalid_request, as the API's schema answered it; the trainer version's
    invalid_trainer_version, as any other version it cannot take."""
    if len(trainer_version) > TRAINER_VERSION_MAX_CHARS:
        raise InvalidInputError(
            f"the trainer version is at most {TRAINER_VERSION_MAX_CHARS} characters (this one "
            f"has {len(trainer_version)})", code=ErrorCode.INVALID_TRAINER_VERSION)
    if len(reason) > REASON_MAX_CHARS:
        raise InvalidInputError(
            f"the reason is at most {REASON_MAX_CHARS} characters (this one has {len(reason)})",
            code=ErrorCode.INVALID_REQUEST)


def with_lora_scale(model: Model, scale: float) -> Model:
    """The user set a scale: it is custom from now on and survives every retraining."""
    return dataclasses.replace(model, lora_scale=validate_lora_scale(scale), lora_scale_is_custom=True)


def with_trainer_version(model: Model, trainer_version: str) -> Model:
    """The one explicit way to move a model to another trainer version."""
    if not trainer_version.strip():
        raise InvalidInputError("trainer_version must not be empty", code=ErrorCode.INVALID_TRAINER_VERSION)
    return dataclasses.replace(model, trainer_version=trainer_version.strip())


def with_active_version(model: Model, version_id: str | None) -> Model:
    return dataclasses.replace(model, active_version_id=version_id)


# "Inside a longer word" in any script: a letter or digit of any alphabet ("élkk88w",
# "lkk88wé" are other words, not the trigger word), or a combining accent written after the
# letter it sits on ("lkk88w\u0301"). An underscore, like any punctuation, is no letter.
_NOT_AFTER_A_LETTER = r"(?<![^\W_])(?<![\u0300-\u036f])"
_NOT_BEFORE_A_LETTER = r"(?![^\W_])(?![\u0300-\u036f])"


def ensure_trigger_word(prompt: str, trigger_word: str) -> str:
    """The prompt with the trigger word as it was trained: wherever it stands in any case, not
    inside a longer word ("zkr47v's", "(zkr47v:1.2)", "zkr47v-style" all have it), it is written
    back exactly (T5 keeps case: a phone's "Zkr47v" is another token); a prompt without it gets
    "a photo of <trigger word>, " in front."""
    pattern = re.compile(rf"{_NOT_AFTER_A_LETTER}{re.escape(trigger_word)}{_NOT_BEFORE_A_LETTER}",
                         re.IGNORECASE)
    exact, found = pattern.subn(trigger_word, prompt)
    if found:
        return exact
    prompt = prompt.strip()
    return f"a photo of {trigger_word}, {prompt}" if prompt else f"a photo of {trigger_word}"
