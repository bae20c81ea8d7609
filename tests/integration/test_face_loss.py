"""The face-weighted (masked) loss of the local trainer: each photo's face box, kept by the intake,
becomes per-token loss weights for its packed latents (``face_loss_weight`` inside, 1 outside,
mean 1); without a box or at weight 1 the loss is exactly the unweighted one.

The geometry and the loss are tested on their own (fast); the trainings run the tiny FLUX on the
CPU (slow).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfie_lora.domain.entities import FaceBox, Recipe
from selfie_lora.errors import TrainingInterruptedError
from selfie_lora.services.ports import TrainingJob
from tests.integration.test_checkpoints import KeptCheckpoints
from tests.integration.test_local_backend import PHOTOS, RECIPE, FakeSink, _job

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from selfie_lora.adapters.flux import loader as flux_loader  # noqa: E402
from selfie_lora.adapters.flux import train_loop  # noqa: E402
from selfie_lora.adapters.flux.checkpoints import step_of  # noqa: E402
from selfie_lora.adapters.flux.trainer import LocalTrainer  # noqa: E402

# The drawn face of test_local_backend's photos (96 x 80): the skin ellipse (26, 6, 70, 74).
FACE: FaceBox = (26 / 96, 6 / 80, 70 / 96, 74 / 80)
SHORT = replace(RECIPE, steps=12, checkpoint_every=4)
WEIGHTED = replace(SHORT, face_loss_weight=3.0)


# --------------------------------------------------------------------------- geometry


def test_the_box_follows_load_photos_centred_square() -> None:
    # A square photo is only resized: the box is unchanged.
    assert train_loop.training_face_box((0.25, 0.5, 0.75, 1.0), photo_size=(64, 64)) == (
        0.25, 0.5, 0.75, 1.0)
    # 96 x 80: the centred 80 x 80 square starts 8 px in; fractions of it.
    assert train_loop.training_face_box(FACE, photo_size=(96, 80)) == pytest.approx(
        (18 / 80, 6 / 80, 62 / 80, 74 / 80))
    # Portrait 100 x 200: the square is the middle 100 px; a face above it is cut off.
    assert train_loop.training_face_box((0.2, 0.3, 0.6, 0.5), photo_size=(100, 200)) == (
        pytest.approx(0.2), 0.1, pytest.approx(0.6), 0.5)
    assert train_loop.training_face_box((0.2, 0.0, 0.6, 0.2), photo_size=(100, 200)) is None


def test_the_box_follows_load_photos_bucket_crop() -> None:
    # A photo the intake stored at its bucket's size has the bucket's aspect: the box stays.
    box = (0.3, 0.2, 0.7, 0.5)
    assert train_loop.training_face_box(box, photo_size=(832, 1248),
                                        target_size=(832, 1248)) == pytest.approx(box)
    # 100 x 200 fitted to a 2:3 bucket (48 x 80 is 3:5): the crop keeps the whole width and the
    # middle 100 * 5 / 3 px of the height.
    crop_h = 100 * 80 / 48
    top = (200 - crop_h) / 2
    assert train_loop.training_face_box(box, photo_size=(100, 200), target_size=(48, 80)) == (
        pytest.approx(0.3), pytest.approx((40 - top) / crop_h), pytest.approx(0.7),
        pytest.approx((100 - top) / crop_h))


def test_the_photos_size_is_read_as_load_photo_turns_it() -> None:
    import io

    from PIL import Image

    for orientation, size in ((1, (96, 80)), (6, (80, 96))):
        image = Image.new("RGB", (96, 80))
        exif = image.getexif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", exif=exif)
        data = buffer.getvalue()
        assert train_loop.photo_size(data) == size
        assert train_loop.load_photo(data, resolution=80).size == (80, 80)


def test_weights_are_the_face_weight_inside_one_outside_and_mean_one() -> None:
    # A 4 x 4 grid, the box exactly the middle 2 x 2 tokens.
    weights = train_loop.face_token_weights((0.25, 0.25, 0.75, 0.75), rows=4, cols=4, weight=3.0)
    grid = weights.view(4, 4)
    assert weights.dtype == torch.float32
    assert float(weights.mean()) == pytest.approx(1.0, abs=1e-6)
    inside, outside = grid[1:3, 1:3], grid[[0, 3]]
    assert torch.allclose(inside, torch.full_like(inside, 3 / 1.5))  # raw mean: 1 + 2 * 4/16
    assert torch.allclose(outside, torch.full_like(outside, 1 / 1.5))


def test_a_token_the_face_half_covers_weighs_half_way() -> None:
    # The box covers the left half of the one token in the middle column of a 1 x 3 row.
    weights = train_loop.face_token_weights((1 / 3, 0.0, 0.5, 1.0), rows=1, cols=3, weight=3.0)
    first, middle, last = (float(w) for w in weights)
    assert first == pytest.approx(last)
    assert middle == pytest.approx(2 * first)  # 1 + (3 - 1) * 0.5


def test_weight_one_is_uniform_exactly() -> None:
    weights = train_loop.face_token_weights((0.1, 0.2, 0.3, 0.9), rows=5, cols=7, weight=1.0)
    assert torch.equal(weights, torch.ones(35))


boxes = st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)).filter(
    lambda b: min(b[2], b[0]) < max(b[2], b[0]) and min(b[1], b[3]) < max(b[1], b[3])
).map(lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])))


@given(box=boxes, rows=st.integers(1, 12), cols=st.integers(1, 12), weight=st.floats(1.0, 10.0))
def test_any_box_weights_mean_one_and_the_face_by_its_weight(
        box: FaceBox, rows: int, cols: int, weight: float) -> None:
    weights = train_loop.face_token_weights(box, rows=rows, cols=cols, weight=weight).view(rows, cols)
    assert float(weights.mean()) == pytest.approx(1.0, abs=1e-5)
    # The mean coverage of the tokens is the box's area: so a token outside weighs
    # 1 / (1 + (weight - 1) * area), one inside ``weight`` times that, and any other between.
    x0, y0, x1, y1 = box
    outside = 1.0 / (1.0 + (weight - 1.0) * (x1 - x0) * (y1 - y0))
    assert float(weights.min()) >= outside * (1 - 1e-5)
    assert float(weights.max()) <= weight * outside * (1 + 1e-5)
    for r in range(rows):
        for c in range(cols):
            cell = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
            expected = None
            if x0 <= cell[0] and cell[2] <= x1 and y0 <= cell[1] and cell[3] <= y1:
                expected = weight * outside
            elif cell[2] <= x0 or x1 <= cell[0] or cell[3] <= y0 or y1 <= cell[1]:
                expected = outside
            if expected is not None:
                assert float(weights[r, c]) == pytest.approx(expected, rel=1e-5), (r, c)


# --------------------------------------------------------------------------- the loss


class ZeroVelocity:
    """A transformer that predicts no velocity: the loss is then the target's squares."""

    config = SimpleNamespace(guidance_embeds=False)

    def __call__(self, *, hidden_states: Any, **_: Any) -> tuple[Any]:
        return (torch.zeros_like(hidden_states),)


def _example(tokens: int, *, seed: int, weights: Any = None) -> train_loop.TrainingExample:
    generator = torch.Generator().manual_seed(seed)
    return train_loop.TrainingExample(
        latents=torch.randn((1, tokens, 8), generator=generator), image_ids=torch.zeros(tokens, 3),
        prompt_embeds=torch.zeros(1, 2, 4), pooled_embeds=torch.zeros(1, 4),
        text_ids=torch.zeros(2, 3), loss_weights=weights)


def test_the_loss_is_the_weighted_mean_over_tokens_and_channels() -> None:
    weights = train_loop.face_token_weights((0.0, 0.0, 0.5, 0.5), rows=2, cols=2, weight=4.0)
    example = _example(4, seed=1, weights=weights.view(1, 4, 1))
    noise = torch.randn((1, 4, 8), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.3])
    weighted = train_loop.flow_matching_loss(ZeroVelocity(), example, sigmas=sigma, noise=noise,
                                             weights=example.loss_weights)
    plain = train_loop.flow_matching_loss(ZeroVelocity(), example, sigmas=sigma, noise=noise)
    squares = ((noise - example.latents) ** 2).double()
    assert float(plain) == pytest.approx(float(squares.mean()), rel=1e-6)
    by_token = squares.mean(dim=-1).flatten()
    expected = float((by_token * weights.double()).sum() / weights.double().sum())
    assert float(weighted) == pytest.approx(expected, rel=1e-6)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-3)
    # Uniform weights are the plain mean.
    ones = train_loop.flow_matching_loss(ZeroVelocity(), example, sigmas=sigma, noise=noise,
                                         weights=torch.ones(1, 4, 1))
    assert float(ones) == pytest.approx(float(plain), rel=1e-6)


def test_a_batch_weighs_a_photo_without_a_box_uniformly() -> None:
    weights = train_loop.face_token_weights((0.0, 0.0, 0.5, 1.0), rows=1, cols=4, weight=2.0)
    with_box = _example(4, seed=1, weights=weights.view(1, 4, 1))
    without = _example(4, seed=3)
    batch = train_loop._batch([with_box, without])
    assert batch.loss_weights is not None
    assert torch.equal(batch.loss_weights[0], weights.view(4, 1))
    assert torch.equal(batch.loss_weights[1], torch.ones(4, 1))
    assert train_loop._batch([without, _example(4, seed=4)]).loss_weights is None


# --------------------------------------------------------------------------- on the tiny FLUX


@pytest.fixture(scope="module")
def pipe(one_torch_thread: None, shared_model_cache: Path) -> Any:
    return flux_loader.load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")


@pytest.mark.slow
def test_examples_carry_weights_only_for_a_box_at_a_weight_above_one(pipe: Any) -> None:
    boxes = [FACE, None, FACE, FACE]
    plain = train_loop.prepare_examples(pipe, PHOTOS, resolution=64)
    at_one = train_loop.prepare_examples(pipe, PHOTOS, resolution=64, face_boxes=boxes)
    weighted = train_loop.prepare_examples(pipe, PHOTOS, resolution=64, face_boxes=boxes,
                                           face_loss_weight=3.0)
    assert all(e.loss_weights is None for e in plain + at_one)
    assert weighted[1].loss_weights is None  # no face found: the unweighted loss
    example = weighted[0]
    assert torch.equal(example.latents, plain[0].latents)
    weights = example.loss_weights
    assert weights is not None
    tokens = example.latents.shape[1]
    side = math.isqrt(tokens)
    assert weights.shape == (1, tokens, 1)
    assert float(weights.mean()) == pytest.approx(1.0, abs=1e-6)
    grid = weights.view(side, side)
    # The face, mapped through load_photo's centred square, in the middle of it: the tokens it
    # covers wholly weigh 3 times a token outside (none here is: the edges are partly covered).
    x0, y0, x1, y1 = train_loop.training_face_box(FACE, photo_size=(96, 80)) or FACE
    outside = 1 / (1 + 2 * (x1 - x0) * (y1 - y0))
    middle = side // 2
    assert float(grid[middle, middle]) == pytest.approx(3 * outside, rel=1e-5)
    assert float(grid[0, 0]) == pytest.approx(float(grid[0, -1]))
    assert outside < float(grid.min()) < float(grid[middle, middle])
    with pytest.raises(ValueError, match="face boxes for"):
        train_loop.prepare_examples(pipe, PHOTOS, resolution=64, face_boxes=[FACE])


def _trainer(cache_dir: Path) -> LocalTrainer:
    return LocalTrainer(base_model="tiny", cache_dir=cache_dir, isolation="inline", device="cpu",
                        num_threads=1, progress_interval_s=0.0)


def _boxed(tmp: Path, recipe: Recipe) -> TrainingJob:
    job = _job(tmp, recipe)
    return replace(job, photos=tuple(replace(p, face_box=FACE) for p in job.photos))


def _run(cache_dir: Path, job: TrainingJob) -> dict[str, Any]:
    sink = FakeSink()
    result = _trainer(cache_dir).train(job, sink=sink)
    return {"metrics": result.metrics, "losses": [loss for _, _, _, loss in sink.steps],
            "lora": load_file(str(result.weights_path))}


@pytest.fixture(scope="module")
def runs(one_torch_thread: None, shared_model_cache: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Trainings on the same photos: unweighted, and weighted by the faces (checkpointed)."""
    tmp = tmp_path_factory.mktemp("face-loss")
    kept = KeptCheckpoints(tmp / "kept")
    return {
        "plain": _run(shared_model_cache, _job(tmp / "plain", SHORT)),
        "weighted": _run(shared_model_cache,
                         replace(_boxed(tmp / "weighted", WEIGHTED), checkpoints=kept)),
        "kept": kept,
    }


@pytest.mark.slow
def test_a_face_weighted_training_trains_and_reports_its_own_loss(runs: dict[str, Any]) -> None:
    plain, weighted = runs["plain"]["metrics"], runs["weighted"]["metrics"]
    assert weighted["eval_loss_after"] < weighted["eval_loss_before"]
    # The same first step (same LoRA, timestep and noise) weighed otherwise.
    assert weighted["first_loss"] != pytest.approx(plain["first_loss"], rel=1e-4)
    # The evaluation is unweighted: before training both runs measure the same thing.
    assert weighted["eval_loss_before"] == plain["eval_loss_before"]


@pytest.mark.slow
def test_boxes_at_weight_one_or_a_weight_without_boxes_train_exactly_as_before(
        runs: dict[str, Any], shared_model_cache: Path, tmp_path: Path) -> None:
    plain = runs["plain"]
    for job in (_boxed(tmp_path / "boxes", SHORT), _job(tmp_path / "weight", WEIGHTED)):
        same = _run(shared_model_cache, job)
        assert same["losses"] == plain["losses"]
        assert same["lora"].keys() == plain["lora"].keys()
        assert all(torch.equal(same["lora"][k], plain["lora"][k]) for k in plain["lora"])


@pytest.mark.slow
def test_a_face_weighted_run_resumes_from_its_checkpoint(
        runs: dict[str, Any], shared_model_cache: Path, tmp_path: Path) -> None:
    kept = KeptCheckpoints(tmp_path / "kept")
    trainer = _trainer(shared_model_cache)
    with pytest.raises(TrainingInterruptedError):
        trainer.train(replace(_boxed(tmp_path / "first", WEIGHTED), checkpoints=kept),
                      sink=FakeSink(interrupt_after=6))
    newest = kept.newest()
    assert step_of(newest) == 6  # handed back after step 6: checkpointed there
    sink = FakeSink()
    result = trainer.train(replace(_boxed(tmp_path / "second", WEIGHTED), resume_from=newest),
                           sink=sink)
    assert result.metrics["resumed_from_step"] == 6  # the checkpoint matched the run
    reference = runs["weighted"]["losses"]
    assert [loss for _, _, _, loss in sink.steps][1:] == pytest.approx(reference[7:], rel=1e-5)
    lora = load_file(str(result.weights_path))
    for key, value in runs["weighted"]["lora"].items():
        assert torch.allclose(lora[key], value, rtol=1e-5, atol=1e-7), key
