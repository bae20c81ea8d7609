"""Contract invariant 3: the trainer version is pinned at a model's first training. A model an
upload made (``start=false``) holds the configuration of its upload until then; its first
training takes the configured one, and every later training keeps that pin."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime

from selfie_lora.domain.plan import TrainingDefaults, new_model, plan_training, repin_is_recorded

NOW = datetime(2026, 1, 1, tzinfo=UTC)
V2 = TrainingDefaults(backend="local", trainer_version="local-tiny-v2", owner="local",
                      replicate_recipe="replicate-person-v1")
V1 = dataclasses.replace(V2, trainer_version="local-tiny-v1")


def test_a_first_training_takes_the_configured_version_not_the_upload_s() -> None:
    model = new_model(user_id="u", model_id="m", defaults=V2, rng=random.Random(0), now=NOW)
    plan = plan_training(model, user_id="u", new_model_id="x", defaults=V1,
                         rng=random.Random(1), now=NOW, trained_before=False,
                         has_version=False)
    # Old code: local-tiny-v2 (the upload's), with the configured v1 logged as ignored.
    assert (plan.trainer_version, plan.model.trainer_version) == ("local-tiny-v1",) * 2
    assert plan.recipe.name == "local-tiny-v1"
    assert not plan.is_new_model
    assert not plan.is_retraining
    assert "configured_default_ignored" not in plan.preserved
    assert plan.preserved["trainer_version"] == "local-tiny-v1"
    assert plan.preserved["pinned_at_first_training"] == {
        "backend": "local", "trainer_version": "local-tiny-v1", "destination": model.destination,
        "replaces": {"backend": "local", "trainer_version": "local-tiny-v2",
                     "destination": model.destination}}
    # What the upload fixed is kept.
    assert (plan.trigger_word, plan.destination) == (model.trigger_word, model.destination)


def test_a_model_that_trained_or_was_re_pinned_keeps_its_pin() -> None:
    model = new_model(user_id="u", model_id="m", defaults=V2, rng=random.Random(0), now=NOW)
    for trained_before, repinned in ((True, False), (False, True)):
        plan = plan_training(model, user_id="u", new_model_id="x", defaults=V1,
                             rng=random.Random(1), now=NOW, trained_before=trained_before,
                             has_version=trained_before,
                             repinned_by_user=repinned)
        assert plan.model is model
        assert plan.trainer_version == "local-tiny-v2"
        assert plan.preserved["configured_default_ignored"]["trainer_version"] == "local-tiny-v1"
        assert "pinned_at_first_training" not in plan.preserved


def test_a_first_training_on_the_unchanged_default_logs_no_new_pin() -> None:
    model = new_model(user_id="u", model_id="m", defaults=V2, rng=random.Random(0), now=NOW)
    plan = plan_training(model, user_id="u", new_model_id="x", defaults=V2,
                         rng=random.Random(1), now=NOW, trained_before=False,
                         has_version=False)
    assert plan.model is model
    assert "pinned_at_first_training" not in plan.preserved


def test_a_first_training_on_another_backend_derives_that_backend_s_destination() -> None:
    """Contract invariant 2: nothing was created under the upload's destination (the local
    backend's owner is the literal "local"), so a first training that moves the model to
    Replicate takes the destination a new model would get there."""
    replicate = TrainingDefaults(backend="replicate", owner="acme",
                                 trainer_version="ostris/flux-dev-lora-trainer:" + "a" * 64,
                                 replicate_recipe="replicate-person-v1")
    model = new_model(user_id="u", model_id="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", defaults=V2,
                      rng=random.Random(0), now=NOW)
    assert model.destination == "local/selfie-lora-0f1e2d3c4b5a6978"
    plan = plan_training(model, user_id="u", new_model_id="x", defaults=replicate,
                         rng=random.Random(1), now=NOW, trained_before=False,
                         has_version=False)
    # Old code: local/selfie-lora-0f1e2d3c4b5a6978 on the Replicate backend.
    assert (plan.backend, plan.destination) == ("replicate", "acme/selfie-lora-0f1e2d3c4b5a6978")
    assert plan.trigger_word == model.trigger_word
    fresh = plan_training(None, user_id="u", new_model_id=model.id, defaults=replicate,
                          rng=random.Random(0), now=NOW, trained_before=False,
                         has_version=False)
    assert plan.destination == fresh.destination
    assert plan.preserved["destination"] == plan.destination
    pin = plan.preserved["pinned_at_first_training"]
    assert (pin["destination"], pin["replaces"]["destination"]) == (
        plan.destination, model.destination)
    # Once trained, the pin (destination included) is kept whatever is configured.
    again = plan_training(plan.model, user_id="u", new_model_id="x", defaults=V2,
                          rng=random.Random(1), now=NOW, trained_before=True,
                          has_version=True)
    assert (again.backend, again.destination) == ("replicate", plan.destination)


def test_after_a_first_training_made_no_version_the_next_is_first_but_keeps_its_pin() -> None:
    """A first training canceled (or failed) before any version took the pin; the next training
    keeps that pin but is no retraining: there is no version to retrain (browser review 2; old
    code: is_retraining True, from trained_before)."""
    model = new_model(user_id="u", model_id="m", defaults=V2, rng=random.Random(0), now=NOW)
    plan = plan_training(model, user_id="u", new_model_id="x", defaults=V1,
                         rng=random.Random(1), now=NOW, trained_before=True, has_version=False)
    assert not plan.is_retraining
    assert plan.model is model
    assert plan.trainer_version == "local-tiny-v2"


def test_an_explicit_re_pin_of_a_model_never_trained_is_recorded_even_to_the_version_shown() -> None:
    # Old code: a re-pin to the stored version recorded nothing, so the first training took the
    # configured version instead of the user's choice.
    assert repin_is_recorded(pinned="v2", requested="v2", trained_before=False,
                             repinned_before=False)
    # Sent again, or on a model whose pin is its own already: only a move is recorded.
    for trained_before, repinned_before in ((False, True), (True, False)):
        assert not repin_is_recorded(pinned="v2", requested="v2", trained_before=trained_before,
                                     repinned_before=repinned_before)
        assert repin_is_recorded(pinned="v2", requested="v1", trained_before=trained_before,
                                 repinned_before=repinned_before)


def test_a_first_training_after_the_replicate_owner_moved_trains_into_the_new_account() -> None:
    """Contract invariant 2: the destination is created at the first training, so one derived
    at the upload under the account of then (nothing created there yet) follows the configured
    owner, as the backend and trainer version do; once trained, it never moves."""
    acme = TrainingDefaults(backend="replicate", owner="acme",
                            trainer_version="ostris/flux-dev-lora-trainer:" + "a" * 64,
                            replicate_recipe="replicate-person-v1")
    moved = dataclasses.replace(acme, owner="acme-studio")
    model = new_model(user_id="u", model_id="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                      defaults=acme, rng=random.Random(0), now=NOW)
    plan = plan_training(model, user_id="u", new_model_id="x", defaults=moved,
                         rng=random.Random(1), now=NOW, trained_before=False, has_version=False)
    # Old code: acme/selfie-lora-0f1e2d3c4b5a6978, an account the server no longer trains on.
    assert plan.destination == "acme-studio/selfie-lora-0f1e2d3c4b5a6978"
    assert (plan.backend, plan.trainer_version, plan.trigger_word) == (
        "replicate", acme.trainer_version, model.trigger_word)
    assert plan.preserved["pinned_at_first_training"]["replaces"]["destination"] == (
        "acme/selfie-lora-0f1e2d3c4b5a6978")
    # Trained once, the destination is the model's for good.
    kept = plan_training(model, user_id="u", new_model_id="x", defaults=moved,
                         rng=random.Random(1), now=NOW, trained_before=True, has_version=True)
    assert kept.model is model
    assert kept.destination == "acme/selfie-lora-0f1e2d3c4b5a6978"
    # Re-pinned by its user and never trained: the trainer version is the user's, the account
    # is still the server's (old code: the old account's destination).
    repinned = dataclasses.replace(model, trainer_version="ostris/flux-dev-lora-trainer:"
                                   + "b" * 64)
    chosen = plan_training(repinned, user_id="u", new_model_id="x", defaults=moved,
                           rng=random.Random(1), now=NOW, trained_before=False,
                           has_version=False, repinned_by_user=True)
    assert (chosen.trainer_version, chosen.destination) == (
        repinned.trainer_version, "acme-studio/selfie-lora-0f1e2d3c4b5a6978")
    # Re-pinned to a backend the server no longer runs: whose account that is, is not known.
    local = dataclasses.replace(repinned, backend="local", trainer_version="local-tiny-v1",
                                destination="local/selfie-lora-0f1e2d3c4b5a6978")
    assert plan_training(local, user_id="u", new_model_id="x", defaults=moved,
                         rng=random.Random(1), now=NOW, trained_before=False,
                         has_version=False, repinned_by_user=True).model is local
    # Unchanged configuration: the same model, no new pin logged.
    same = plan_training(model, user_id="u", new_model_id="x", defaults=acme,
                         rng=random.Random(1), now=NOW, trained_before=False, has_version=False)
    assert same.model is model
    assert "pinned_at_first_training" not in same.preserved
