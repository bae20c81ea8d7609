"""Training in aspect-ratio buckets on the tiny FLUX: photos of two shapes train at their buckets'
sizes, a batch holds one bucket only, every photo once an epoch, and a run stopped and resumed
from its checkpoint ends with the LoRA of a run never stopped."""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from selfie_lora.services.ports import TrainingJob, TrainingPhoto
from tests.integration.test_checkpoints import (
    SEED,
    KeptCheckpoints,
    _close,
    _trainer,
    stopped_and_resumed,
)
from tests.integration.test_local_backend import RECIPE, FakeSink

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from selfie_lora.adapters.flux import train_loop  # noqa: E402

# Three checkpoints a run, each in the middle of an epoch (4 batches of 6 photos in 2 buckets).
BUCKETED = replace(RECIPE, aspect_buckets=True, batch_size=2, steps=12, checkpoint_every=3)


def _face(index: int, size: tuple[int, int]) -> bytes:
    """A drawn 'selfie' of ``size``: the same face on different backgrounds."""
    width, height = size
    image = Image.new("RGB", size, (40 + 25 * index, 90 + 10 * index, 170 - 15 * index))
    draw = ImageDraw.Draw(image)
    cx, cy = width // 2, height // 2
    draw.ellipse((cx - 22, cy - 34, cx + 22, cy + 34), fill=(232, 188, 160))
    draw.ellipse((cx - 12, cy - 12, cx - 4, cy - 4), fill=(30, 30, 30))
    draw.ellipse((cx + 4, cy - 12, cx + 12, cy - 4), fill=(30, 30, 30))
    draw.arc((cx - 10, cy + 4, cx + 10, cy + 20), 0, 180, fill=(150, 40, 40), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# Portraits (2:3 -> the 48x80 bucket at 64 px) and landscapes (3:2 -> 80x48), interleaved.
SIZES = [(64, 96), (96, 64)] * 3
PHOTOS = tuple(TrainingPhoto(name=f"p{i}.jpg", data=_face(i, size), caption="a photo of TOK person")
               for i, size in enumerate(SIZES))
KEYS = {(64, 96): (5, 3), (96, 64): (3, 5)}  # the latent grid (rows, columns) of each bucket


def _job(tmp_path: Path, recipe: Any = BUCKETED) -> TrainingJob:
    return TrainingJob(training_id="tr_b", trigger_word="TOK", destination="local/tok",
                       trainer_version=recipe.name, recipe=recipe, photos=PHOTOS,
                       work_dir=tmp_path / "work")


# --------------------------------------------------------------------------- drawing batches


def _draws(order: list[int], keys: list[int], batch_size: int, generator: Any,
           count: int) -> list[list[int]]:
    return [train_loop.draw_batch(order, keys=keys, batch_size=batch_size, generator=generator)
            for _ in range(count)]


@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=12),
       batch_size=st.integers(min_value=1, max_value=4), seed=st.integers(0, 2**31),
       stop=st.integers(min_value=0, max_value=20))
def test_batches_hold_one_bucket_and_every_photo_once_an_epoch(
        keys: list[int], batch_size: int, seed: int, stop: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    epochs: list[list[int]] = [[]]
    for _ in range(3 * len(keys)):
        if not order and epochs[-1]:
            epochs.append([])
        batch = train_loop.draw_batch(order, keys=keys, batch_size=batch_size,
                                      generator=generator)
        assert 1 <= len(batch) <= batch_size
        assert len({keys[i] for i in batch}) == 1  # one bucket
        epochs[-1].extend(batch)
    for epoch in epochs[:-1]:  # the last may be unfinished
        assert sorted(epoch) == list(range(len(keys)))
    # The state (order and generator) decides the rest: a copy draws the same batches, which
    # is what a checkpoint restores.
    generator = torch.Generator().manual_seed(seed)
    order = []
    _draws(order, keys, batch_size, generator, stop)
    saved_order, saved_state = list(order), generator.get_state()
    ahead = _draws(order, keys, batch_size, generator, 10)
    resumed = torch.Generator()
    resumed.set_state(saved_state)
    assert _draws(saved_order, keys, batch_size, resumed, 10) == ahead


def test_a_batch_of_two_buckets_is_refused_even_with_as_many_tokens() -> None:
    def example(rows: int, cols: int) -> train_loop.TrainingExample:
        from diffusers import FluxPipeline

        ids = FluxPipeline._prepare_latent_image_ids(1, rows, cols, "cpu", torch.float32)
        return train_loop.TrainingExample(
            latents=torch.zeros(1, rows * cols, 64), image_ids=ids,
            prompt_embeds=torch.zeros(1, 8, 32), pooled_embeds=torch.zeros(1, 32),
            text_ids=torch.zeros(8, 3))

    portrait, landscape = example(5, 3), example(3, 5)
    assert train_loop.bucket_key(portrait) == (5, 3)
    assert train_loop.bucket_label((5, 3)) == "48x80"
    assert train_loop._batch([portrait, example(5, 3)]).latents.shape[0] == 2
    with pytest.raises(ValueError, match="mixes image sizes"):
        train_loop._batch([portrait, landscape])


def test_a_photo_is_fitted_to_its_bucket_cropping_only_the_sliver() -> None:
    buckets = train_loop.bucket_sizes(64)
    portrait = train_loop.load_photo(_face(0, (60, 96)), resolution=64, buckets=buckets)
    assert portrait.size == (48, 80)
    assert train_loop.load_photo(_face(0, (96, 60)), resolution=64, buckets=buckets).size == (80, 48)
    # Without buckets: the square of before.
    assert train_loop.load_photo(_face(0, (60, 96)), resolution=64).size == (64, 64)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def uninterrupted(shared_model_cache: Path, one_torch_thread: None,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One inline bucketed run, never stopped; every batch it trains on is recorded."""
    tmp = tmp_path_factory.mktemp("bucketed")
    batches: list[list[tuple[int, int]]] = []
    real_batch = train_loop._batch

    def recording(examples: Any) -> Any:
        batches.append([train_loop.bucket_key(e) for e in examples])
        return real_batch(examples)

    kept = KeptCheckpoints(tmp / "kept")
    sink = FakeSink()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_loop, "_batch", recording)
        result = _trainer(shared_model_cache, "inline").train(
            replace(_job(tmp), checkpoints=kept), sink=sink)
    return {"result": result, "sink": sink, "kept": kept, "batches": batches}


def test_photos_of_two_shapes_train_in_their_buckets(uninterrupted: dict[str, Any]) -> None:
    metrics = uninterrupted["result"].metrics
    assert metrics["buckets"] == "48x80: 3, 80x48: 3"
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    batches = uninterrupted["batches"]
    assert len(batches) == BUCKETED.steps
    assert all(len(set(batch)) == 1 for batch in batches)  # never two buckets in a batch
    assert {batch[0] for batch in batches} == set(KEYS.values())
    # Every photo once an epoch (a batch never crosses one): 3 photos of each bucket an epoch.
    epoch: Counter[tuple[int, int]] = Counter()
    epochs = 0
    for batch in batches:
        epoch.update(batch)
        assert sum(epoch.values()) <= len(PHOTOS)
        if sum(epoch.values()) == len(PHOTOS):
            assert epoch == {(5, 3): 3, (3, 5): 3}
            epoch, epochs = Counter(), epochs + 1
    assert epochs >= 2


def test_a_bucketed_run_resumed_from_its_checkpoint_ends_as_if_never_stopped(
        shared_model_cache: Path, tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    result, sink, at = stopped_and_resumed(_trainer(shared_model_cache, "inline"), _job,
                                           recipe=BUCKETED, tmp_path=tmp_path)
    assert [step for _, step, _, _ in sink.steps] == list(range(at, BUCKETED.steps + 1))
    reference = {step: loss for _, step, _, loss in uninterrupted["sink"].steps}
    for _, step, _, loss in sink.steps[1:]:
        assert math.isclose(loss, reference[step], rel_tol=1e-5), (step, f"seed {SEED}")
    _close(result.weights_path, uninterrupted["result"].weights_path)
