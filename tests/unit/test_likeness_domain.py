"""The pure part of likeness tracking: probe sets, similarity, scores and the gate."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfie_lora.dataset.checks.policy import CheckPolicy
from selfie_lora.domain.entities import GateStatus
from selfie_lora.domain.likeness import (
    MAX_PROBES,
    SAME_PERSON_IDENTITY,
    IdentityScores,
    ImageSanity,
    ProbeResult,
    choose_probes,
    decide_gate,
    held_but_user_activated,
    probes_for_existing_model,
    score_probes,
    similarity,
    training_figures,
)
from selfie_lora.domain.plan import TrainingDefaults, plan_training
from selfie_lora.errors import InvalidInputError

SANE = ImageSanity(mean=120, std=40, saturated_share=0.01, sharpness=300, blank=False,
                   saturated=False, nan=False)
BLANK = ImageSanity(mean=120, std=0, saturated_share=0, sharpness=0, blank=True,
                    saturated=False, nan=False)
E0 = (0.0, 0.0, 0.0)


def result(index: int, embedding: tuple[float, ...] | None, sanity: ImageSanity = SANE
           ) -> ProbeResult:
    return ProbeResult(index=index, prompt=f"p{index}", seed=index, image_key=None,
                       faces=int(embedding is not None), embedding=embedding, sanity=sanity)


@given(seed=st.integers(0, 2**32), count=st.integers(1, MAX_PROBES),
       word=st.from_regex(r"[a-z]{3}[0-9]{2}[a-z]", fullmatch=True))
def test_probe_sets_hold_the_trigger_word_and_are_reproducible(seed: int, count: int,
                                                               word: str) -> None:
    probes = choose_probes(trigger_word=word, rng=random.Random(seed), count=count)
    assert [p.index for p in probes] == list(range(count))
    assert len({p.prompt for p in probes}) == count
    assert all(word in p.prompt for p in probes)
    assert all(0 <= p.seed < 2**31 for p in probes)
    assert probes == choose_probes(trigger_word=word, rng=random.Random(seed), count=count)


def test_probe_count_is_bounded_and_older_models_get_a_stable_set() -> None:
    for bad in (0, MAX_PROBES + 1):
        with pytest.raises(InvalidInputError):
            choose_probes(trigger_word="abc12d", rng=random.Random(0), count=bad)
    a = probes_for_existing_model(model_id="m1", trigger_word="abc12d", count=4)
    assert a == probes_for_existing_model(model_id="m1", trigger_word="abc12d", count=4)
    assert a != probes_for_existing_model(model_id="m2", trigger_word="abc12d", count=4)


def test_the_first_training_fixes_the_probe_set_and_retraining_keeps_it() -> None:
    from datetime import UTC, datetime

    defaults = TrainingDefaults(backend="local", trainer_version="local-tiny-v1", owner="local",
                                replicate_recipe="replicate-person-v1", probe_count=3)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    first = plan_training(None, user_id="u", new_model_id="m", defaults=defaults,
                          rng=random.Random(1), now=now, trained_before=False,
                         has_version=False)
    assert len(first.model.probes) == 3
    assert all(first.model.trigger_word in p.prompt for p in first.model.probes)
    again = plan_training(first.model, user_id="u", new_model_id="x",
                          defaults=TrainingDefaults(**{**defaults.__dict__, "probe_count": 5}),
                          rng=random.Random(2), now=now, trained_before=True,
                          has_version=True)
    assert again.model.probes == first.model.probes


@given(st.floats(min_value=0, max_value=10, allow_nan=False))
def test_similarity_is_bounded_and_falls_with_distance(d: float) -> None:
    s = similarity(d)
    assert 0.0 <= s <= 1.0
    assert similarity(d + 0.1) <= s
    assert similarity(0.0) == 1.0
    assert similarity(0.6) == pytest.approx(0.5)  # dlib's threshold
    assert similarity(float("nan")) == 0.0


def test_a_probe_without_a_face_counts_zero_and_scores_are_means() -> None:
    scores = score_probes([result(0, E0), result(1, None, BLANK), result(2, (0.6, 0.0, 0.0))],
                          [E0])
    assert scores.face_share == pytest.approx(2 / 3)
    assert scores.identity == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert scores.sane_share == pytest.approx(2 / 3)
    assert [p.face_found for p in scores.per_probe] == [True, False, True]
    assert scores.per_probe[1].similarity is None
    assert scores.reference_faces == 1
    none = score_probes([result(0, E0)], [])  # no face in the training photos
    assert none.identity is None
    assert none.face_share == 1.0


def test_nearest_is_at_least_the_mean() -> None:
    reference = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0)]
    scores = score_probes([result(0, (0.95, 0.0, 0.0))], reference)
    assert scores.identity_nearest is not None
    assert scores.identity is not None
    assert scores.identity_nearest > scores.identity


def scores_of(identity: float | None, face_share: float = 1.0, faces: int = 4) -> IdentityScores:
    return IdentityScores(identity=identity, identity_nearest=identity, face_share=face_share,
                          sane_share=1.0, sharpness=100.0, probes=4, faces=faces,
                          reference_faces=3)


unit = st.floats(min_value=0, max_value=1, allow_nan=False)


@given(before=unit, after=unit, tolerance=st.floats(min_value=0, max_value=0.5))
def test_the_gate_holds_exactly_the_drops_beyond_the_tolerance(before: float, after: float,
                                                               tolerance: float) -> None:
    decision = decide_gate(candidate=scores_of(after), baseline=scores_of(before),
                           tolerance=tolerance, candidate_number=2, baseline_number=1)
    # The scores as stored and shown (4 decimals) decide: what the user reads is what was judged.
    drop = round(round(before, 4) - round(after, 4), 4)
    held = drop > tolerance
    assert decision.status is (GateStatus.HELD if held else GateStatus.PASSED)
    assert decision.details["drop"] == drop
    assert decision.details["before"]["identity"] == round(before, 4)
    assert decision.details["after"]["identity"] == round(after, 4)
    assert decision.reason


@pytest.mark.parametrize(("before", "after", "tolerance"), [(0.52, 0.50, 0.02), (0.3, 0.2, 0.1),
                                                           (0.7, 0.6, 0.1)])
def test_a_drop_of_exactly_the_tolerance_passes(before: float, after: float,
                                                tolerance: float) -> None:
    """In floats 0.52 - 0.50 is 0.020000000000000018: "more than the tolerance" for the
    arithmetic, not for the user who reads a drop of 0.02 against a tolerance of 0.02."""
    for share in (False, True):  # identity, and the face share when the photos have no face
        decision = decide_gate(
            candidate=scores_of(None, after) if share else scores_of(after),
            baseline=scores_of(None, before) if share else scores_of(before),
            tolerance=tolerance, candidate_number=2, baseline_number=1)
        assert decision.status is GateStatus.PASSED, decision.reason
        assert decision.details["drop"] == tolerance


def test_the_gate_also_measures_on_the_active_version_s_own_photos() -> None:
    """A retraining on another person's photos: on its own photos it beats the active version
    (0.95 against 0.30), on the active version's photos it falls from 0.75 to 0.30. Held, and the
    reason says on whose photos; within the tolerance on both, it passes saying both."""
    held = decide_gate(candidate=scores_of(0.95), baseline=scores_of(0.30), tolerance=0.02,
                       candidate_number=2, baseline_number=1,
                       on_baseline_photos=(scores_of(0.30), scores_of(0.75)))
    assert held.status is GateStatus.HELD
    assert held.details["measured_on"] == "baseline_photos"
    assert held.details["on_baseline_photos"]["drop"] == 0.45
    assert ("likeness dropped on the training photos of the active version 1: identity 0.300 "
            "against 0.750 for the active version 1 there, under 0.567") in held.reason
    passed = decide_gate(candidate=scores_of(0.80), baseline=scores_of(0.79), tolerance=0.02,
                         candidate_number=2, baseline_number=1,
                         on_baseline_photos=(scores_of(0.74), scores_of(0.75)))
    assert passed.status is GateStatus.PASSED
    assert passed.details["measured_on"] == "new_photos"
    assert "on the training photos of version 2" in passed.reason
    assert "on the training photos of the active version 1" in passed.reason
    # A drop on the new photos holds it whatever the active version's photos say.
    dropped = decide_gate(candidate=scores_of(0.30), baseline=scores_of(0.80), tolerance=0.02,
                          candidate_number=2, baseline_number=1,
                          on_baseline_photos=(scores_of(0.80), scores_of(0.80)))
    assert dropped.status is GateStatus.HELD
    assert "on the training photos of version 2" in dropped.reason


def test_on_the_active_version_s_photos_only_losing_the_person_holds() -> None:
    """The check on the active version's photos asks whether the new version still shows that
    person, not whether it drifted: a change of look (new photos of the same person) that falls
    0.18 there passed nowhere before (any drop over 0.02 held it). It holds only when the new
    version falls under the photo checks' "someone else" line (0.52 apart: 0.567) while the
    active version is at or above it, and then says the photo sets disagree, not which is wrong
    (the user may have activated another person's version by hand and be back on their own)."""
    assert SAME_PERSON_IDENTITY == round(
        similarity(CheckPolicy().identity_centre_distance), 4) == 0.5667
    drift = decide_gate(candidate=scores_of(0.85), baseline=scores_of(0.60), tolerance=0.02,
                        candidate_number=3, baseline_number=2,
                        on_baseline_photos=(scores_of(0.62), scores_of(0.80)))
    assert drift.status is GateStatus.PASSED, drift.reason
    assert drift.details["measured_on"] == "new_photos"
    assert "still the same person (0.567 or more)" in drift.reason
    # Neither shows the active version's person well: nothing lost there.
    both_low = decide_gate(candidate=scores_of(0.85), baseline=scores_of(0.60), tolerance=0.02,
                           candidate_number=3, baseline_number=2,
                           on_baseline_photos=(scores_of(0.30), scores_of(0.55)))
    assert both_low.status is GateStatus.PASSED, both_low.reason
    held = decide_gate(candidate=scores_of(0.80), baseline=scores_of(0.33), tolerance=0.02,
                       candidate_number=3, baseline_number=2,
                       on_baseline_photos=(scores_of(0.301), scores_of(1.0)))
    assert held.status is GateStatus.HELD
    assert held.details["measured_on"] == "baseline_photos"
    assert "may show another person" not in held.reason
    assert ("identity 0.301 against 1.000 for the active version 2 there, under 0.567"
            in held.reason)
    assert "on its own training photos version 3 has 0.800 against 0.330" in held.reason
    assert "the two photo sets seem to show different people" in held.reason


def test_a_version_whose_probe_images_went_bad_is_held_even_without_faces() -> None:
    """No face on either side, but every probe image of the new version is broken or blank
    (sane 100% -> 0%): there is something to lose. It passed "nothing to lose"."""
    sane = dataclasses.replace(scores_of(0.0, 0.0, 0), sane_share=1.0)
    broken = dataclasses.replace(scores_of(0.0, 0.0, 0), sane_share=0.0)
    for candidate, baseline in ((broken, sane), (dataclasses.replace(scores_of(0.8),
                                                                     sane_share=0.25),
                                                 scores_of(0.8))):
        held = decide_gate(candidate=candidate, baseline=baseline, tolerance=0.02,
                           candidate_number=2, baseline_number=1)
        assert held.status is GateStatus.HELD, held.reason
        assert "nothing to lose" not in held.reason
        assert "sane" in held.reason
        assert held.details["sane_drop"] == baseline.sane_share - candidate.sane_share
    # Equally broken on both sides: nothing more to lose.
    both = decide_gate(candidate=broken, baseline=broken, tolerance=0.02, candidate_number=2,
                       baseline_number=1)
    assert both.status is GateStatus.PASSED


@pytest.mark.parametrize(("before", "after", "tolerance", "held", "shown"), [
    # Stored 0.8 and 0.78: a drop of 0.02, within the tolerance (it was held on 0.02008).
    (0.80004, 0.77996, 0.02, False, "identity 0.780 against 0.800"),
    # Stored 0.5 and 0.4999: a drop of 0.0001, more than 0; 3 decimals would show 0.500 twice.
    (0.5, 0.49994, 0.0, True, "identity 0.4999 against 0.5000"),
    (0.8004, 0.7802, 0.02, True, "identity 0.7802 against 0.8004"),
    (0.8004, 0.7806, 0.02, False, "identity 0.781 against 0.800"),
])
def test_the_gate_decides_on_the_scores_it_stores_and_shows(
    before: float, after: float, tolerance: float, held: bool, shown: str,
) -> None:
    decision = decide_gate(candidate=scores_of(after), baseline=scores_of(before),
                           tolerance=tolerance, candidate_number=2, baseline_number=1)
    assert decision.status is (GateStatus.HELD if held else GateStatus.PASSED), decision.reason
    stored_before = decision.details["before"]["identity"]
    stored_after = decision.details["after"]["identity"]
    assert (round(stored_before - stored_after, 4) > tolerance) is held
    assert shown in decision.reason


def test_the_gate_without_a_baseline_or_a_score() -> None:
    nothing = decide_gate(candidate=scores_of(0.1), baseline=None, tolerance=0.02,
                          candidate_number=1, baseline_number=None)
    assert nothing.status is GateStatus.PASSED
    unscored = decide_gate(candidate=None, baseline=scores_of(0.9), tolerance=0.02,
                           candidate_number=2, baseline_number=1, candidate_error="boom")
    assert unscored.status is GateStatus.HELD
    assert "boom" in unscored.reason
    # An active version that exists but has no scores: a drop cannot be ruled out.
    unjudged = decide_gate(candidate=scores_of(0.1), baseline=None, tolerance=0.02,
                           candidate_number=2, baseline_number=1, baseline_error="503")
    assert unjudged.status is GateStatus.HELD
    assert "the active version 1 could not be scored (503)" in unjudged.reason
    with pytest.raises(ValueError, match="tolerance"):
        decide_gate(candidate=None, baseline=None, tolerance=2, candidate_number=1,
                    baseline_number=None)


def test_a_faceless_pass_measured_on_other_photos_says_it_is_active_once() -> None:
    """The tiny model retrained on new photos: no face on either side, also measured on the
    active version's photos (or not, those gone). The reason said "nothing to lose, it is
    active; on the training photos of ...: it is active": the ending decide_gate strips before
    adding the second comparison was ": it is active", and this reason's was ", it is active"."""
    none = scores_of(0.0, 0.0, 0)
    there = decide_gate(candidate=none, baseline=none, tolerance=0.02, candidate_number=2,
                        baseline_number=1, on_baseline_photos=(none, none))
    gone = decide_gate(candidate=none, baseline=none, tolerance=0.02, candidate_number=2,
                       baseline_number=1,
                       baseline_photos_unmeasured="the training photos of version 1 are gone")
    for passed in (there, gone):
        assert passed.status is GateStatus.PASSED
        assert passed.reason.count("it is active") == 1, passed.reason
        assert passed.reason.endswith(": it is active")
        assert "nothing to lose" in passed.reason
    alone = decide_gate(candidate=none, baseline=none, tolerance=0.02, candidate_number=2,
                        baseline_number=1)
    assert alone.reason.count("it is active") == 1, alone.reason


def test_the_gate_on_faceless_versions() -> None:
    # Faces before, none now: a drop, said plainly.
    lost = decide_gate(candidate=scores_of(0.0, 0.0, 0), baseline=scores_of(0.8),
                       tolerance=0.02, candidate_number=2, baseline_number=1)
    assert lost.status is GateStatus.HELD
    assert "no face was found" in lost.reason
    # No face on either side (the tiny model): nothing to lose.
    neither = decide_gate(candidate=scores_of(0.0, 0.0, 0), baseline=scores_of(0.0, 0.0, 0),
                          tolerance=0.02, candidate_number=2, baseline_number=1)
    assert neither.status is GateStatus.PASSED
    assert "nothing to lose" in neither.reason
    # No face in the training photos: the face share decides.
    fewer = decide_gate(candidate=scores_of(None, 0.25, 1), baseline=scores_of(None, 1.0),
                        tolerance=0.02, candidate_number=2, baseline_number=1)
    assert fewer.status is GateStatus.HELD
    same = decide_gate(candidate=scores_of(None, 1.0), baseline=scores_of(None, 1.0),
                       tolerance=0.02, candidate_number=2, baseline_number=1)
    assert same.status is GateStatus.PASSED


def test_training_figures_take_what_the_backend_reports() -> None:
    local = training_figures({"final_loss": 0.3, "steps": 40, "seconds": 2.5, "device": "cpu"},
                             loss=0.9, steps=1, seconds=99.0)
    assert (local["final_loss"], local["steps"], local["seconds"], local["cost"]) == (
        0.3, 40, 2.5, None)
    remote = training_figures({"predict_time": 500.0, "cost": "1.25"}, loss=None, steps=1000,
                              seconds=620.0)
    assert (remote["final_loss"], remote["steps"], remote["seconds"], remote["cost"]) == (
        None, 1000, 500.0, 1.25)


def test_training_figures_say_how_many_steps_the_time_is_for() -> None:
    """A resumed local training times only its last run (review localtrain finding 5: '40
    steps in 15 s' for a training killed at 15 and resumed from 10): steps_run says which."""
    resumed = training_figures({"steps": 40, "steps_run": 30, "seconds": 15.2,
                                "resumed_from_step": 10}, loss=0.5, steps=40, seconds=80.0)
    assert (resumed["steps"], resumed["steps_run"], resumed["seconds"]) == (40, 30, 15.2)
    # A backend that does not say: all its steps, in the time it reports.
    remote = training_figures({"predict_time": 500.0}, loss=None, steps=1000, seconds=620.0)
    assert (remote["steps"], remote["steps_run"], remote["seconds"]) == (1000, 1000, 500.0)


def test_records_round_trip_through_dicts() -> None:
    r = ProbeResult(index=1, prompt="p", seed=7, image_key="k", faces=2, face_box=(1, 2, 3, 4),
                    embedding=(0.1, 0.2), sanity=SANE, error=None)
    assert ProbeResult.from_dict(r.as_dict()) == r
    s = score_probes([result(0, E0), result(1, None)], [E0])
    assert IdentityScores.from_dict(s.as_dict()).per_probe == s.per_probe


@pytest.mark.parametrize(("candidate", "baseline", "baseline_number"), [
    (None, scores_of(0.9), 1),  # the new version not scored
    (scores_of(0.9), None, 1),  # the active version not scored
    (scores_of(0.1), scores_of(0.9), 1),  # identity dropped
    (scores_of(0.0, 0.0, faces=0), scores_of(0.9), 1),  # no face in any probe
    (scores_of(None, 0.1), scores_of(None, 0.9), 1),  # fewer faces, photos without one
])
def test_every_held_reason_reads_right_once_its_user_activated_the_version(
        candidate: IdentityScores | None, baseline: IdentityScores | None,
        baseline_number: int) -> None:
    decision = decide_gate(candidate=candidate, baseline=baseline, tolerance=0.02,
                           candidate_number=2, baseline_number=baseline_number,
                           candidate_error="out of memory", baseline_error="out of memory")
    assert decision.status is GateStatus.HELD
    assert "kept but not activated" in decision.reason
    reason = held_but_user_activated(decision.reason)
    assert reason.endswith("; you activated it yourself, so it stays active"), reason
    assert "not activated" not in reason
    assert "activate it yourself" not in reason
    assert reason.split("; you activated")[0] in decision.reason  # the why is kept whole
