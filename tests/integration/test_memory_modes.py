"""Memory modes on the tiny FLUX, on the CPU: the same code paths a 24 or 16 GB card takes.

Each mode trains (the loss goes down), keeps the base frozen (quantized in int8/nf4) and the LoRA in
fp32, and writes a file that reloads with the same effect. Encoding photos and captions once gives
the same loss as encoding them every step.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.domain.recipes import get_recipe
from selfie_lora.errors import TrainingFailedError
from tests.support.hostile import jpeg

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("torchao")

from selfie_lora.adapters.flux import generator as flux_generator  # noqa: E402
from selfie_lora.adapters.flux import memory, train_loop  # noqa: E402
from selfie_lora.adapters.flux.loader import load_pipeline, text_max_length, torch_threads  # noqa: E402

PROMPT = "a photo of TOK person"
PHOTOS = [(jpeg(seed=index), PROMPT) for index in range(3)]
RECIPE = replace(get_recipe("local-tiny-v1"), steps=12)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):  # steps were 60-100x slower with 2 threads on a busy machine
        yield


def _base(cache_dir: Path, mode: memory.MemoryModeSetting) -> memory.TrainingBase:
    return memory.load_training_base(
        "tiny",
        cache_dir=cache_dir,
        photos=PHOTOS,
        resolution=RECIPE.resolution,
        device="cpu",
        dtype=torch.float32,
        mode=mode,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", memory.MEMORY_MODES)
def test_each_mode_trains_and_its_file_reloads_with_the_same_effect(
    mode: memory.MemoryMode, shared_model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora.safetensors"
    on_cpu = {"device": "cpu", "num_threads": 1}
    metrics = train_loop.train_flux_lora(
        pipeline_source="tiny", cache_dir=shared_model_cache, photos=PHOTOS, recipe=RECIPE,
        out_path=out, memory_mode=mode, **on_cpu,
    )
    assert metrics["memory_mode"] == mode
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] * 0.97, metrics

    # The file on the same base, in the same mode: the loss the training ended with.
    base = _base(shared_model_cache, mode)
    reloaded = load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
    reloaded.transformer = base.transformer
    reloaded.load_lora_weights(str(out), adapter_name="reloaded")
    again = train_loop.evaluate_loss(base.transformer, base.examples, seed=RECIPE.seed)
    # The file is bf16: the LoRA rounded, the loss the same to ~1e-5.
    assert again == pytest.approx(metrics["eval_loss_after"], rel=1e-4)

    # On the unquantized base (what the generator uses) it has nearly the same effect.
    plain = load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
    plain.load_lora_weights(str(out), adapter_name="reloaded")
    on_plain = train_loop.evaluate_loss(plain.transformer, base.examples, seed=RECIPE.seed)
    assert on_plain == pytest.approx(metrics["eval_loss_after"], rel=0.03)
    assert on_plain < metrics["eval_loss_before"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_modes_freeze_a_quantized_base_and_train_an_fp32_lora(
    mode: memory.MemoryMode, shared_model_cache: Path
) -> None:
    base = _base(shared_model_cache, mode)
    transformer = base.transformer
    linears = [m for _, m in transformer.named_modules() if type(m) is torch.nn.Linear]
    quantized = [m for m in linears if memory.is_quantized(m.weight)]
    # Every attention projection is quantized (the layers the LoRA wraps), and most others.
    assert len(quantized) >= 0.9 * len(linears), (len(quantized), len(linears))
    for name, module in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v")):
            assert memory.is_quantized(module.weight), name

    train_loop.add_lora(transformer, rank=RECIPE.lora_rank, seed=RECIPE.seed)
    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert not any(memory.is_quantized(p) for p in trainable.values())
    # The wrapped base layers stay quantized and frozen.
    for name, module in transformer.named_modules():
        if name.endswith("attn.to_q.base_layer"):
            assert memory.is_quantized(module.weight)
            assert not module.weight.requires_grad

    # Gradients reach every LoRA matrix, through the quantized layers of the later blocks.
    batch = train_loop._batch(base.examples)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch.latents.shape, generator=generator)
    sigmas = train_loop.sample_sigmas(batch.latents.shape[0], generator=generator)
    loss = train_loop.flow_matching_loss(transformer, batch, sigmas=sigmas, noise=noise)
    torch.autograd.backward(loss)
    missing = [n for n, p in trainable.items() if "lora_B" in n and (p.grad is None or not p.grad.any())]
    assert not missing


def _encoded_each_step(pipe: Any, data: bytes, caption: str) -> train_loop.TrainingExample:
    """What a loop without caches would do every step: run the VAE and both text encoders."""
    from diffusers import FluxPipeline

    with torch.no_grad():
        image = train_loop.load_photo(data, resolution=RECIPE.resolution)
        pixels = train_loop._image_tensor(image)
        latents = pipe.vae.encode(pixels).latent_dist.mode()
        config = pipe.vae.config
        latents = (latents - float(config.shift_factor or 0.0)) * float(config.scaling_factor)
        b, c, h, w = latents.shape
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=caption, prompt_2=None, device="cpu", max_sequence_length=text_max_length(pipe)
        )
    return train_loop.TrainingExample(
        latents=FluxPipeline._pack_latents(latents, b, c, h, w),
        image_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
        prompt_embeds=prompt_embeds,
        pooled_embeds=pooled,
        text_ids=text_ids,
    )


def test_cached_latents_and_embeddings_give_the_loss_of_encoding_every_step(
    shared_model_cache: Path,
) -> None:
    pipe = load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
    cached = train_loop.prepare_examples(pipe, PHOTOS, resolution=RECIPE.resolution)
    generator = torch.Generator().manual_seed(5)
    for (data, caption), example in zip(PHOTOS, cached, strict=True):
        fresh = _encoded_each_step(pipe, data, caption)
        sigmas = train_loop.sample_sigmas(1, generator=generator)
        noise = torch.randn(example.latents.shape, generator=generator)
        with torch.no_grad():
            from_cache = train_loop.flow_matching_loss(
                pipe.transformer, example, sigmas=sigmas, noise=noise
            )
            each_step = train_loop.flow_matching_loss(
                pipe.transformer, fresh, sigmas=sigmas, noise=noise
            )
        assert float(from_cache) == pytest.approx(float(each_step), rel=1e-6)


def test_encoders_and_vae_are_freed_once_the_base_is_placed(
    shared_model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selfie_lora.adapters.flux import loader

    components: list[weakref.ref[Any]] = []
    real_load = loader.load_pipeline

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        pipe = real_load(*args, **kwargs)
        names = ("text_encoder", "text_encoder_2", "vae", "transformer")
        components.extend(weakref.ref(getattr(pipe, name)) for name in names)
        return pipe

    monkeypatch.setattr(loader, "load_pipeline", recording_load)
    # Freed by their references going, with no collection: on the CPU release_device_memory
    # runs none (it took a second a call), so a cycle holding them would keep them.
    gc.disable()
    try:
        base = _base(shared_model_cache, "bf16")
        text_encoder, text_encoder_2, vae, transformer = (ref() for ref in components)
    finally:
        gc.enable()
    assert text_encoder is None
    assert text_encoder_2 is None
    assert vae is None
    assert transformer is base.transformer  # only the transformer lives on


def test_out_of_memory_names_the_mode_to_use() -> None:
    for mode, advice in (("bf16", "int8"), ("int8", "nf4")):
        error = train_loop._map_runtime_error(
            RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), memory_mode=mode
        )
        assert isinstance(error, TrainingFailedError)
        assert f"SELFIE_LORA_LOCAL_MEMORY_MODE={advice}" in error.message
        assert f"memory mode {mode}" in error.user_message
        assert "resolution" not in error.user_message
    last = train_loop._map_runtime_error(RuntimeError("out of memory"), memory_mode="nf4")
    assert "SELFIE_LORA_LOCAL_MEMORY_MODE" not in last.message
    assert "Replicate" in last.message


class _FakePipe:
    """Stands for a loaded pipeline: only identity matters to the release."""


def test_generator_releases_gpu_pipelines_and_keeps_cpu_ones(tmp_path: Path) -> None:
    on_gpu = flux_generator._SharedPipeline(pipe=_FakePipe(), lock=threading.Lock())
    on_cpu = flux_generator._SharedPipeline(pipe=_FakePipe(), lock=threading.Lock())
    gpu_key, cpu_key = ("flux", "", "cuda:0"), ("tiny", str(tmp_path), "cpu")
    flux_generator._pipelines[gpu_key] = on_gpu
    flux_generator._pipelines[cpu_key] = on_cpu
    try:
        assert flux_generator.release_device_pipelines() == 1
        assert gpu_key not in flux_generator._pipelines
        assert on_gpu.pipe is None
        assert flux_generator._pipelines[cpu_key] is on_cpu
        assert on_cpu.pipe is not None
        assert flux_generator.release_device_pipelines() == 0
    finally:
        flux_generator._pipelines.pop(cpu_key, None)


class _QuietSink:
    """Takes progress, never cancels."""

    def __init__(self) -> None:
        self.last_step = -1

    def started(self, *, remote_id: str | None) -> None:
        del remote_id

    def progress(self, *, status: Any, step: int, total: int, loss: float | None = None) -> None:
        del status, total, loss
        self.last_step = step

    def cancel_requested(self) -> bool:
        return False

    def interrupted(self) -> bool:
        return False


@pytest.mark.slow
def test_local_trainer_frees_the_generators_gpu_pipeline_and_trains_in_its_mode(
    shared_model_cache: Path, tmp_path: Path
) -> None:
    from selfie_lora.adapters.flux.trainer import LocalTrainer
    from selfie_lora.services.ports import TrainingJob, TrainingPhoto

    held = flux_generator._SharedPipeline(pipe=_FakePipe(), lock=threading.Lock())
    flux_generator._pipelines[("flux", "", "cuda")] = held
    trainer = LocalTrainer(base_model="tiny", cache_dir=shared_model_cache, isolation="inline",
                           device="cpu", num_threads=1, memory_mode="nf4")
    job = TrainingJob(
        training_id="tr_mem", trigger_word="TOK", destination="local/tok",
        trainer_version=RECIPE.name, recipe=replace(RECIPE, steps=3), work_dir=tmp_path,
        photos=tuple(TrainingPhoto(name=f"{i}.jpg", data=d, caption=c) for i, (d, c) in enumerate(PHOTOS)),
    )
    sink = _QuietSink()
    result = trainer.train(job, sink=sink)
    assert held.pipe is None
    assert ("flux", "", "cuda") not in flux_generator._pipelines
    assert result.metrics["memory_mode"] == "nf4"
    assert sink.last_step == 3
