"""The local backend for real: the offline tiny FLUX, LoRA training, saving, reloading, generating.

Everything runs on the CPU with one torch thread (with two threads and other load on the machine,
steps were 60-100x slower). The tiny model is built once per session into a temporary cache.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from selfie_lora.domain.entities import Recipe, TrainingStatus
from selfie_lora.domain.recipes import get_recipe
from selfie_lora.errors import (
    InvalidInputError,
    TrainingCanceledError,
    TrainingFailedError,
    TrainingInterruptedError,
)
from selfie_lora.services.ports import (
    MAX_SEED,
    GenerationJob,
    LoraHold,
    TrainingJob,
    TrainingPhoto,
)

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

# Imported after the skips: these modules import torch lazily, but their functions need it.
from selfie_lora.adapters.flux import loader as flux_loader  # noqa: E402
from selfie_lora.adapters.flux import tiny as tiny_flux  # noqa: E402
from selfie_lora.adapters.flux import train_loop as flux_lora_train  # noqa: E402
from selfie_lora.adapters.flux.generator import LocalGenerator, clear_pipeline_cache  # noqa: E402
from selfie_lora.adapters.flux.trainer import LocalTrainer  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "a photo of TOK person"
RECIPE = get_recipe("local-tiny-v1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> Iterator[None]:
    yield
    clear_pipeline_cache()


@pytest.fixture(scope="module")
def cache_dir(shared_model_cache: Path) -> Path:
    return shared_model_cache


def _face(index: int) -> bytes:
    """A drawn 'selfie': the same face on different backgrounds, 96x80 so cropping is exercised."""
    image = Image.new("RGB", (96, 80), (40 + 25 * index, 90 + 10 * index, 170 - 15 * index))
    draw = ImageDraw.Draw(image)
    draw.ellipse((26, 6, 70, 74), fill=(232, 188, 160))
    draw.ellipse((36, 28, 44, 36), fill=(30, 30, 30))
    draw.ellipse((52, 28, 60, 36), fill=(30, 30, 30))
    draw.arc((38, 44, 58, 60), 0, 180, fill=(150, 40, 40), width=3)
    draw.rectangle((26, 2, 70, 14), fill=(60, 35, 20))  # hair
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


PHOTOS = [(_face(i), PROMPT) for i in range(4)]


def _generate(pipe: Any, *, seed: int = 7) -> Any:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompt=PROMPT,
        height=64,
        width=64,
        num_inference_steps=4,
        generator=generator,
        max_sequence_length=flux_loader.text_max_length(pipe),
        output_type="np",
    ).images


def _pixels(png: bytes) -> Any:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


# --------------------------------------------------------------------------- the tiny model


def test_tiny_pipeline_is_deterministic_and_cached(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"  # empty: this test builds it
    # Different global RNG states before each build: only the builder's own seeding can make
    # them equal (as it must, for builds in different processes to match).
    torch.manual_seed(1)
    first = tiny_flux.build_tiny_pipeline()
    torch.manual_seed(2)
    second = tiny_flux.build_tiny_pipeline()
    first.set_progress_bar_config(disable=True)
    second.set_progress_bar_config(disable=True)
    assert np.array_equal(_generate(first), _generate(second))
    # Another seed gives another image: the model is not degenerate.
    assert not np.allclose(_generate(first), _generate(first, seed=8))

    loaded = flux_loader.load_pipeline("tiny", cache_dir=cache_dir, device="cpu")
    target = cache_dir / tiny_flux.TINY_CACHE_NAME
    stamp = (target / "model_index.json").stat().st_mtime_ns
    # The same weights, bit for bit; the images agree to float32 rounding (a pipeline loaded from
    # disk may take another kernel path than one built in memory: 2e-6 with transformers 5.25).
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        built, read = getattr(first, name).state_dict(), getattr(loaded, name).state_dict()
        assert built.keys() == read.keys()
        assert all(torch.equal(built[k], read[k]) for k in built), name
    assert np.allclose(_generate(loaded), _generate(first), atol=1e-5)

    again = flux_loader.load_pipeline("tiny", cache_dir=cache_dir, device="cpu")
    assert (target / "model_index.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert np.array_equal(_generate(again), _generate(loaded))
    assert [p.name for p in cache_dir.iterdir()] == [tiny_flux.TINY_CACHE_NAME]  # no temp leftovers


class _RacedBuild:
    """A build that another process (or another cache user) finishes first: while this one saves
    its copy to its temporary folder, the other's complete copy is renamed into place."""

    def __init__(self, built: Path, target: Path) -> None:
        self.built, self.target = built, target

    def save_pretrained(self, path: str) -> None:
        shutil.copytree(self.built, path, dirs_exist_ok=True)  # as save_pretrained: exist_ok
        winner = self.target.with_name(".winner")
        shutil.copytree(self.built, winner)
        (winner / "winner.marker").write_text("the first copy in place")
        os.rename(winner, self.target)


def test_the_loser_of_a_build_race_drops_its_copy_and_loads_the_winners(
        tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes building the tiny model into one cache folder at once (two trainings of a
    run on its shared cache): each writes its own temporary folder and renames it into place, so
    no reader sees a half-written model; the second rename fails, and that is fine."""
    built = tiny_flux.tiny_pipeline_dir(cache_dir)
    cold = tmp_path / "cache"
    target = cold / tiny_flux.TINY_CACHE_NAME
    monkeypatch.setattr(tiny_flux, "build_tiny_pipeline", lambda: _RacedBuild(built, target))

    assert tiny_flux.tiny_pipeline_dir(cold) == target
    assert [p.name for p in cold.iterdir()] == [tiny_flux.TINY_CACHE_NAME]  # no temp leftovers
    # The winner's copy is kept, not replaced by the loser's (a reader may have it open).
    assert (target / "winner.marker").is_file()
    loaded = flux_loader.load_pipeline("tiny", cache_dir=cold, device="cpu")
    assert loaded.transformer is not None


def test_load_pipeline_rejects_a_folder_without_a_model(tmp_path: Path) -> None:
    from selfie_lora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model_index\.json"):
        flux_loader.load_pipeline(str(tmp_path), cache_dir=tmp_path, device="cpu")


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One training in memory: the pipeline keeps its LoRA, the file is saved next to it."""
    pipe = flux_loader.load_pipeline("tiny", cache_dir=cache_dir, device="cpu")
    base_image = _generate(pipe)
    examples = flux_lora_train.prepare_examples(pipe, PHOTOS, resolution=RECIPE.resolution)
    before = flux_lora_train.evaluate_loss(pipe.transformer, examples, seed=99)
    config, metrics = flux_lora_train.fit_lora(
        pipe.transformer, examples, recipe=RECIPE, seed=RECIPE.seed
    )
    after = flux_lora_train.evaluate_loss(pipe.transformer, examples, seed=99)
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    flux_lora_train.save_lora(
        pipe.transformer, config=config, out_path=path, extra_metadata={"trigger_word": "TOK"}
    )
    return {
        "pipe": pipe,
        "examples": examples,
        "base_image": base_image,
        "lora_image": _generate(pipe),
        "before": before,
        "after": after,
        "metrics": metrics,
        "path": path,
    }


def test_training_lowers_the_flow_matching_loss(trained: dict[str, Any]) -> None:
    before, after = trained["before"], trained["after"]
    # Same t and noise before and after: a real drop, not per-step noise (measured ~20 %).
    assert after < before * 0.92, (before, after)
    metrics = trained["metrics"]
    assert metrics["steps"] == RECIPE.steps
    assert math.isfinite(metrics["first_loss"])
    assert math.isfinite(metrics["final_loss"])
    assert metrics["step_seconds"] < 0.5  # generous; ~12 ms on an idle core


def test_only_lora_parameters_were_trained(cache_dir: Path, trained: dict[str, Any]) -> None:
    fresh = flux_loader.load_pipeline("tiny", cache_dir=cache_dir, device="cpu")
    base_state = fresh.transformer.state_dict()
    trained_state = trained["pipe"].transformer.state_dict()
    lora_keys = [k for k in trained_state if "lora_" in k]
    assert lora_keys
    assert all(
        any(f".{target}." in k for target in ("to_q", "to_k", "to_v", "to_out.0")) for k in lora_keys
    )
    for key, value in trained_state.items():
        if "lora_" in key:
            continue
        base_key = key.replace(".base_layer", "")
        assert torch.equal(value, base_state[base_key]), key


def test_saved_lora_reloads_with_the_same_effect(cache_dir: Path, trained: dict[str, Any]) -> None:
    path: Path = trained["path"]
    metadata = flux_lora_train.read_lora_metadata(path)
    assert metadata == {"trigger_word": "TOK"}

    fresh = flux_loader.load_pipeline("tiny", cache_dir=cache_dir, device="cpu")
    fresh.load_lora_weights(str(path), adapter_name="reloaded")
    fresh.set_adapters(["reloaded"], adapter_weights=[1.0])
    reloaded_image = _generate(fresh)
    # The file is bf16: ~4e-4 measured, a tenth of an 8-bit level (test_lora_exports checks the
    # file against the adapter rounded as stored, to 1e-6).
    assert np.abs(reloaded_image - trained["lora_image"]).max() < 1.5e-3
    # The loss measured on the reloaded model is the trained one, not the base one.
    reloaded_loss = flux_lora_train.evaluate_loss(fresh.transformer, trained["examples"], seed=99)
    assert reloaded_loss == pytest.approx(trained["after"], rel=1e-4)

    fresh.set_adapters(["reloaded"], adapter_weights=[0.0])
    assert np.allclose(_generate(fresh), trained["base_image"], atol=1e-6)


def test_training_is_seeded(cache_dir: Path, tmp_path: Path) -> None:
    short = replace(RECIPE, steps=5)
    out = [tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"]
    for index, (path, seed) in enumerate(zip(out, (3, 3, 4), strict=True)):
        torch.manual_seed(index)  # the global RNG must not matter, only the seed
        flux_lora_train.train_flux_lora(
            pipeline_source="tiny",
            cache_dir=cache_dir,
            photos=PHOTOS,
            recipe=short,
            out_path=path,
            device="cpu",
            num_threads=1,
            seed=seed,
            evaluate=False,
        )
    from safetensors.torch import load_file

    a, b, c = (load_file(str(p)) for p in out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_a_pipeline_loaded_beside_an_inline_training_never_breaks_it(
        cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers loads a model with torch patched for the whole process (torch.nn.init's
    functions made no-ops, accelerate's register_parameter putting parameters on the meta
    device): an inline training that built its adapter while a generation loaded its pipeline
    failed 4 runs of 5 ("Parameter.__new__() got an unexpected keyword argument
    '_is_hf_initialized'", or a loss of nan; found in review). The race is made certain here:
    the training builds its adapter once the generator's load is inside that patch, which is
    held open 0.5 s. The training's LoRA is the one it makes alone, bit for bit, and the
    generation's picture too."""
    import contextlib
    import threading
    import time

    from diffusers.models import modeling_utils
    from safetensors.torch import load_file

    short = replace(RECIPE, steps=5)

    def train(path: Path) -> None:
        flux_lora_train.train_flux_lora(
            pipeline_source="tiny", cache_dir=cache_dir, photos=PHOTOS, recipe=short,
            out_path=path, device="cpu", num_threads=1, seed=3, evaluate=False)

    alone = tmp_path / "alone.safetensors"
    train(alone)
    generator = LocalGenerator(base_model="tiny", cache_dir=cache_dir, device="cpu", num_threads=1)
    job = GenerationJob(prompt=PROMPT, num_outputs=1, seed=7, lora_scale=1.0,
                        trainer_version="local-tiny-v1", weights_path=alone)
    expected = generator.generate(job)

    at_adapter, patched = threading.Event(), threading.Event()
    unpatched_load = modeling_utils.no_init_weights

    @contextlib.contextmanager
    def load_held_open() -> Iterator[None]:
        with unpatched_load():
            if threading.current_thread().name == "generation":
                patched.set()
                time.sleep(0.5)
            yield

    build_adapter = flux_lora_train.add_lora

    def build_adapter_during_a_load(*args: Any, **kwargs: Any) -> Any:
        at_adapter.set()
        assert patched.wait(timeout=120), "the generator never loaded"
        return build_adapter(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "no_init_weights", load_held_open)
    monkeypatch.setattr(flux_lora_train, "add_lora", build_adapter_during_a_load)
    clear_pipeline_cache()  # the generation loads its pipeline again
    images: list[bytes] = []

    def generate() -> None:
        assert at_adapter.wait(timeout=120)
        images.extend(generator.generate(job))

    beside = threading.Thread(target=generate, name="generation")
    beside.start()
    raced = tmp_path / "raced.safetensors"
    try:
        train(raced)
    finally:
        at_adapter.set()
        beside.join(timeout=120)
    assert images == expected
    made_alone, made_beside = load_file(str(alone)), load_file(str(raced))
    assert made_alone.keys() == made_beside.keys()
    assert all(torch.equal(made_alone[k], made_beside[k]) for k in made_alone)


# --------------------------------------------------------------------------- LocalGenerator


def test_generator_applies_the_lora_scale(cache_dir: Path, trained: dict[str, Any]) -> None:
    generator = LocalGenerator(base_model="tiny", cache_dir=cache_dir, device="cpu", num_threads=1)

    def job(scale: float, weights: Path | None) -> GenerationJob:
        return GenerationJob(
            prompt=PROMPT,
            num_outputs=1,
            seed=11,
            lora_scale=scale,
            trainer_version="local-tiny-v1",
            weights_path=weights,
        )

    base = _pixels(generator.generate(job(1.0, None))[0])
    at_zero = _pixels(generator.generate(job(0.0, trained["path"]))[0])
    at_one = _pixels(generator.generate(job(1.0, trained["path"]))[0])
    assert np.abs(at_zero - base).max() <= 1  # PNG rounding at most
    assert np.abs(at_one - base).mean() > 5  # measured ~20 of 255
    # The shared pipeline is clean again: no LoRA left behind.
    assert np.array_equal(_pixels(generator.generate(job(1.0, None))[0]), base)


def test_generator_outputs_pngs_and_is_seeded(cache_dir: Path, trained: dict[str, Any]) -> None:
    generator = LocalGenerator(base_model="tiny", cache_dir=cache_dir, device="cpu", num_threads=1)
    job = GenerationJob(
        prompt=PROMPT,
        num_outputs=3,
        seed=5,
        lora_scale=0.8,
        trainer_version="local-tiny-v1",
        weights_path=trained["path"],
        width=80,  # rounded down to a multiple of 16
        height=48,
    )
    images = generator.generate(job)
    assert len(images) == 3
    for png in images:
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(png)).size == (80, 48)
    assert images == generator.generate(job)
    assert images[0] != images[1]
    # Image i uses seed + i, so the second image can be reproduced on its own.
    assert generator.generate(replace(job, num_outputs=1, seed=6)) == [images[1]]
    unseeded = replace(job, num_outputs=1, seed=None, width=None, height=None)
    assert Image.open(io.BytesIO(generator.generate(unseeded)[0])).size == (64, 64)
    with pytest.raises(InvalidInputError):
        generator.generate(replace(job, num_outputs=0))


def test_probes_of_one_hold_are_the_pictures_made_one_load_each(
        cache_dir: Path, trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A likeness scoring loads its LoRA once for all its probes (``LoraHold``): the same
    pictures, byte for byte, as when each probe loaded it again (and as after a user's picture
    without it between two probes); the pipeline clean after."""
    generator = LocalGenerator(base_model="tiny", cache_dir=cache_dir, device="cpu", num_threads=1)
    pipe = generator._pipeline("cpu").pipe
    loads: list[str] = []
    load_lora_weights = pipe.load_lora_weights

    def counted(path: str, **kwargs: Any) -> None:
        loads.append(path)
        load_lora_weights(path, **kwargs)

    monkeypatch.setattr(pipe, "load_lora_weights", counted)

    def probe(index: int, hold: LoraHold | None) -> GenerationJob:
        return GenerationJob(prompt=f"{PROMPT}, probe {index}", num_outputs=1, seed=40 + index,
                             lora_scale=1.0, trainer_version="local-tiny-v1",
                             weights_path=trained["path"], weights_id="trained-v1",
                             lora_hold=hold)

    base = generator.generate(replace(probe(0, None), weights_path=None))
    one_by_one = [generator.generate(probe(index, None))[0] for index in range(3)]
    assert len(loads) == 3
    hold = LoraHold()
    try:
        held = [generator.generate(probe(index, hold))[0] for index in range(3)]
        assert len(loads) == 4  # one for the hold's three probes (without it: 6)
        # A user's picture without the LoRA between two probes: made as on a clean pipeline,
        # and the next probe, its LoRA loaded again, the same picture as before.
        between = generator.generate(replace(probe(0, None), weights_path=None))
        again = generator.generate(probe(1, hold))[0]
    finally:
        hold.close()
    assert held == one_by_one
    assert between == base
    assert again == one_by_one[1]
    assert len(loads) == 5
    assert one_by_one[0] != base[0]  # the LoRA was applied
    assert generator.generate(replace(probe(0, None), weights_path=None)) == base


def test_a_batch_at_the_largest_seed_wraps_to_seeds_the_api_accepts(cache_dir: Path) -> None:
    """Image i of a batch is made with seed + i; at the largest seed (2**32 - 1) the next image's
    seed was 2**32, which no request may name, so that image could not be made again alone. The
    seeds wrap at 2**32: the second image is seed 0's picture, and says so."""
    generator = LocalGenerator(base_model="tiny", cache_dir=cache_dir, device="cpu", num_threads=1)
    job = GenerationJob(prompt=PROMPT, num_outputs=2, seed=MAX_SEED, lora_scale=1.0,
                        trainer_version="local-tiny-v2")
    images = generator.generate(job)
    seeds = [Image.open(io.BytesIO(png)).text["seed"] for png in images]
    assert seeds == [str(MAX_SEED), "0"]
    assert generator.generate(replace(job, num_outputs=1, seed=MAX_SEED)) == [images[0]]
    assert generator.generate(replace(job, num_outputs=1, seed=0)) == [images[1]]


def test_a_lora_wider_than_the_base_model_is_refused_and_leaves_the_pipeline_as_it_was(
        cache_dir: Path, tmp_path: Path) -> None:
    """A version trained on a wider base model: diffusers widened the shared pipeline's layer in
    place to load it, the generation failed, and so did every later one in the process (no LoRA
    at all included: mat1 and mat2 shapes cannot be multiplied). A LoRA whose layers do not fit
    is now refused before it loads (422 ``unsupported_weights``), and one naming a layer the
    base model lacks too."""
    from safetensors.torch import save_file

    generator = LocalGenerator(base_model="tiny", cache_dir=cache_dir, device="cpu", num_threads=1)
    job = GenerationJob(prompt=PROMPT, num_outputs=1, seed=1, lora_scale=1.0,
                        trainer_version="local-tiny-v2")
    base = generator.generate(job)
    pipe = flux_loader.load_pipeline("tiny", cache_dir=cache_dir, device="cpu")
    name = "transformer_blocks.0.ff_context.net.2"
    layer = pipe.transformer.get_submodule(name)
    for wrong, key in ((f"transformer.{name}", "wider"), ("transformer.no_such.layer", "absent")):
        weights = tmp_path / f"{key}.safetensors"
        save_file({f"{wrong}.lora_A.weight": torch.zeros(4, layer.in_features + 1),
                   f"{wrong}.lora_B.weight": torch.zeros(layer.out_features, 4)}, str(weights))
        with pytest.raises(InvalidInputError) as refused:
            generator.generate(replace(job, weights_path=weights))
        assert refused.value.code == "unsupported_weights"
        assert "do not fit this server's base model" in refused.value.message
        assert generator.generate(job) == base  # the shared pipeline is as it was


def test_the_generator_encodes_prompts_as_the_pipeline_does(cache_dir: Path) -> None:
    """The generator encodes the prompt itself (its text encoders may be on the CPU while the
    transformer is on a GPU) and hands the pipeline the embeddings: the same picture as the
    pipeline's own encoding, bit for bit."""
    generator = LocalGenerator(base_model="tiny", cache_dir=cache_dir, device="cpu", num_threads=1)
    png = generator.generate(GenerationJob(prompt=PROMPT, num_outputs=1, seed=7, lora_scale=1.0,
                                           trainer_version="local-tiny-v2"))[0]
    pipe = flux_loader.load_pipeline("tiny", cache_dir=cache_dir, device="cpu")
    direct = Image.fromarray((_generate(pipe)[0] * 255).round().astype("uint8"))
    assert np.abs(_pixels(png) - np.asarray(direct, dtype=np.float64)).max() <= 1


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_quantized_generator_applies_the_lora_as_the_full_one_does(
    cache_dir: Path, trained: dict[str, Any], mode: str
) -> None:
    """A 24 or 16 GB card generates with the transformer in the trainer's memory modes; on the
    CPU the same code runs on tiny. The LoRA loads on the quantized layers and acts as it does on
    the full model, and is unloaded afterwards."""
    from selfie_lora.adapters.flux import generator as flux_generator
    from selfie_lora.adapters.flux import memory

    def images(memory_mode: str) -> tuple[Any, Any]:
        generator = LocalGenerator(base_model="tiny", cache_dir=cache_dir, device="cpu",
                                   num_threads=1, memory_mode=memory_mode)  # type: ignore[arg-type]
        job = GenerationJob(prompt=PROMPT, num_outputs=1, seed=11, lora_scale=1.0,
                            trainer_version="local-tiny-v1", weights_path=trained["path"])
        with_lora = _pixels(generator.generate(job)[0])
        base = _pixels(generator.generate(replace(job, weights_path=None))[0])
        return base, with_lora

    full_base, full_lora = images("bf16")
    base, with_lora = images(mode)
    shared = [s for key, s in flux_generator._pipelines.items() if key[3] == mode]
    assert shared
    assert all(memory.is_quantized(module.weight)
               for name, module in shared[0].pipe.transformer.named_modules()
               if name.endswith("attn.to_q"))
    effect = np.abs(full_lora - full_base).mean()
    assert effect > 5
    assert np.abs(with_lora - base).mean() > 0.5 * effect  # the LoRA acts on quantized layers
    # Quantization error is small against what the LoRA does (measured: int8 ~0.1, nf4 ~2.4 of 255).
    assert np.abs(with_lora - full_lora).mean() < 0.5 * effect
    assert np.abs(base - full_base).mean() < 0.5 * effect


# --------------------------------------------------------------------------- LocalTrainer


class FakeSink:
    def __init__(self, *, cancel_after: int | None = None,
                 interrupt_after: int | None = None) -> None:
        self.cancel_after = cancel_after
        self.interrupt_after = interrupt_after
        self.started_with: list[str | None] = []
        self.steps: list[tuple[TrainingStatus, int, int, float | None]] = []

    def started(self, *, remote_id: str | None) -> None:
        self.started_with.append(remote_id)

    def progress(
        self, *, status: TrainingStatus, step: int, total: int, loss: float | None = None
    ) -> None:
        assert self.started_with, "progress before started"
        self.steps.append((status, step, total, loss))

    def cancel_requested(self) -> bool:
        last = self.steps[-1][1] if self.steps else 0
        return self.cancel_after is not None and last >= self.cancel_after

    def interrupted(self) -> bool:
        last = self.steps[-1][1] if self.steps else 0
        return self.interrupt_after is not None and last >= self.interrupt_after


def _job(tmp_path: Path, recipe: Recipe = RECIPE) -> TrainingJob:
    return TrainingJob(
        training_id="tr_1",
        trigger_word="TOK",
        destination="local/tok",
        trainer_version=recipe.name,
        recipe=recipe,
        photos=tuple(
            TrainingPhoto(name=f"p{i}.jpg", data=data, caption=caption)
            for i, (data, caption) in enumerate(PHOTOS)
        ),
        work_dir=tmp_path / "work",
    )


def _inline(cache_dir: Path) -> LocalTrainer:
    return LocalTrainer(
        base_model="tiny",
        cache_dir=cache_dir,
        isolation="inline",
        device="cpu",
        num_threads=1,
        progress_interval_s=0.0,
    )


def test_local_trainer_inline_reports_progress(cache_dir: Path, tmp_path: Path) -> None:
    sink = FakeSink()
    result = _inline(cache_dir).train(_job(tmp_path), sink=sink)

    assert sink.started_with == [None]
    steps = [step for _, step, _, _ in sink.steps]
    assert steps == list(range(RECIPE.steps + 1))  # every step at interval 0, in order
    assert {status for status, *_ in sink.steps} == {TrainingStatus.PROCESSING}
    assert {total for _, _, total, _ in sink.steps} == {RECIPE.steps}
    assert sink.steps[0][3] is None
    assert all(loss is not None for *_, loss in sink.steps[1:])

    assert result.weights_path == tmp_path / "work" / "lora.safetensors"
    assert result.weights_path.is_file()
    assert result.weights_method == "local:file"
    assert result.metrics["steps"] == RECIPE.steps
    assert result.metrics["device"] == "cpu"
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]
    assert {"first_loss", "final_loss", "seconds"} <= result.metrics.keys()
    metadata = flux_lora_train.read_lora_metadata(result.weights_path)
    assert metadata["trainer_version"] == "local-tiny-v1"
    assert metadata["trigger_word"] == "TOK"


def test_local_trainer_inline_cancel(cache_dir: Path, tmp_path: Path) -> None:
    sink = FakeSink(cancel_after=5)
    with pytest.raises(TrainingCanceledError) as caught:
        _inline(cache_dir).train(_job(tmp_path), sink=sink)
    assert caught.value.user_message
    assert max(step for _, step, _, _ in sink.steps) == 5
    assert not (tmp_path / "work" / "lora.safetensors").exists()


def test_local_trainer_inline_hands_back_when_the_worker_stops(cache_dir: Path,
                                                              tmp_path: Path) -> None:
    sink = FakeSink(interrupt_after=3)
    with pytest.raises(TrainingInterruptedError):
        _inline(cache_dir).train(_job(tmp_path), sink=sink)
    assert max(step for _, step, _, _ in sink.steps) == 3
    assert not (tmp_path / "work" / "lora.safetensors").exists()


def test_local_trainer_child_process(cache_dir: Path, tmp_path: Path) -> None:
    """One real run in a spawned child (it imports torch itself: ~10 s)."""
    recipe = replace(RECIPE, steps=10)
    trainer = LocalTrainer(
        base_model="tiny",
        cache_dir=cache_dir,
        isolation="process",
        device="cpu",
        num_threads=1,
        progress_interval_s=0.0,
    )
    sink = FakeSink()
    result = trainer.train(_job(tmp_path / "child", recipe), sink=sink)
    assert result.weights_path.is_file()
    steps = [step for _, step, _, _ in sink.steps]
    assert steps == list(range(recipe.steps + 1))

    # The child's LoRA is exactly the one an inline run of the same job makes.
    inline = _inline(cache_dir).train(_job(tmp_path / "inline", recipe), sink=FakeSink())
    from safetensors.torch import load_file

    a, b = load_file(str(result.weights_path)), load_file(str(inline.weights_path))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stopping_worker_ends_its_training_child(cache_dir: Path, tmp_path: Path) -> None:
    trainer = LocalTrainer(base_model="tiny", cache_dir=cache_dir, isolation="process",
                           device="cpu", num_threads=1, progress_interval_s=0.0)
    children_before = set(multiprocessing.active_children())
    with pytest.raises(TrainingInterruptedError):
        trainer.train(_job(tmp_path, replace(RECIPE, steps=400)),
                      sink=FakeSink(interrupt_after=1))
    assert set(multiprocessing.active_children()) <= children_before  # the child is gone


def test_local_trainer_child_error_becomes_training_failed(cache_dir: Path, tmp_path: Path) -> None:
    # A recipe the loop refuses before importing torch: the child fails fast and says why.
    trainer = LocalTrainer(base_model="tiny", cache_dir=cache_dir, isolation="process", device="cpu")
    sink = FakeSink()
    with pytest.raises(TrainingFailedError) as caught:
        trainer.train(_job(tmp_path, replace(RECIPE, steps=0)), sink=sink)
    assert "settings are invalid" in caught.value.user_message
    assert sink.started_with == [None]
