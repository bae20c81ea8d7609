"""Two of the recipe's quality knobs on the tiny FLUX (CPU): FLUX's resolution-dependent timestep
shift (``timestep_sampling="flux_shift"``) and the trained module set (``lora_targets``)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfie_lora.domain.recipes import get_recipe
from tests.support.hostile import jpeg

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from selfie_lora.adapters.flux import loader as flux_loader  # noqa: E402
from selfie_lora.adapters.flux import train_loop  # noqa: E402
from selfie_lora.adapters.flux.train_loop import TimestepShift  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PROMPT = "a photo of TOK person"
PHOTOS = [(jpeg(seed=index), PROMPT) for index in range(3)]


# --------------------------------------------------------------------------- the shift


@settings(deadline=None)  # the first example imports diffusers' scheduler
@given(tokens=st.integers(16, 16384), t=st.floats(0.001, 0.999))
def test_the_shift_is_what_diffusers_flux_sampler_uses(tokens: int, t: float) -> None:
    """Against diffusers' own ``calculate_shift`` and ``FlowMatchEulerDiscreteScheduler``'s shift
    (FLUX.1-dev's settings): our code was written from the formula, not from theirs."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    shift = TimestepShift.from_scheduler_config(scheduler.config)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert shift.mu(tokens) == pytest.approx(mu, rel=1e-9, abs=1e-12)
    theirs = scheduler.time_shift(mu, 1.0, torch.tensor([t], dtype=torch.float64))
    ours = shift.apply(torch.tensor([t], dtype=torch.float64), image_tokens=tokens)
    assert float(ours[0]) == pytest.approx(float(theirs[0]), rel=1e-9)
    # More tokens, more shift towards noise (1); the order of timesteps is kept.
    assert 0.0 < float(ours[0]) < 1.0
    bigger = shift.apply(torch.tensor([t], dtype=torch.float64), image_tokens=tokens + 512)
    assert float(bigger[0]) > float(ours[0])


def test_a_scheduler_without_dynamic_shifting_shifts_by_its_fixed_shift() -> None:
    # FLUX.1-schnell's scheduler: no dynamic shifting, shift 1.0, so no shift at all.
    schnell = TimestepShift.from_scheduler_config({"use_dynamic_shifting": False, "shift": 1.0})
    sigmas = torch.linspace(0.05, 0.95, 7)
    assert torch.allclose(schnell.apply(sigmas, image_tokens=4096), sigmas)
    fixed = TimestepShift.from_scheduler_config({"use_dynamic_shifting": False, "shift": 3.0})
    assert fixed.mu(64) == fixed.mu(4096) == pytest.approx(math.log(3.0))


def test_the_tiny_model_samples_with_flux1_devs_shift(shared_model_cache: Path) -> None:
    pipe = flux_loader.load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
    assert TimestepShift.from_scheduler_config(pipe.scheduler.config) == TimestepShift()


def test_shifted_sampling_draws_the_same_random_stream() -> None:
    plain, shifted = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = train_loop.sample_sigmas(64, generator=plain)
    b = train_loop.sample_sigmas(64, generator=shifted, shift=TimestepShift(), image_tokens=4096)
    assert torch.equal(plain.get_state(), shifted.get_state())
    # At 4096 tokens (1024 px) mu = 1.15: every timestep moves towards noise.
    assert bool((b > a).all())
    assert float(b.mean()) > float(a.mean()) + 0.1


# --------------------------------------------------------------------------- the targets


def _lora_modules(transformer: Any) -> set[str]:
    return {name for name, module in transformer.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def test_all_linear_covers_both_streams_and_nothing_outside_the_blocks(
    shared_model_cache: Path,
) -> None:
    pipe = flux_loader.load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
    attention = _lora_modules(_with_lora(pipe.transformer, "attention"))
    fresh = flux_loader.load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
    every = _lora_modules(_with_lora(fresh.transformer, "all_linear"))

    assert attention < every
    assert {m.split(".", 2)[2] for m in attention} == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"}
    suffixes = {m.split(".", 2)[2] for m in every}
    assert suffixes == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
        "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
        "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"}
    # Every block has its LoRAs; the model-level layers (the final proj_out, the embedders) and
    # the modulation linears have none.
    blocks = {".".join(m.split(".")[:2]) for m in every}
    config = fresh.transformer.config
    assert len(blocks) == config.num_layers + config.num_single_layers
    assert all(m.startswith(("transformer_blocks.", "single_transformer_blocks.")) for m in every)
    assert not any(".norm" in m for m in every)


def _with_lora(transformer: Any, targets: str) -> Any:
    train_loop.add_lora(transformer, rank=4, seed=0, targets=targets)
    return transformer


def test_a_v2_recipe_trains_with_the_shift_on_every_linear_layer(
    shared_model_cache: Path, tmp_path: Path
) -> None:
    v2 = get_recipe("local-tiny-v2")
    # The two knobs of this file only: the other three are tested where they are built.
    recipe = replace(get_recipe("local-tiny-v1"), name="knobs", steps=24,
                     timestep_sampling=v2.timestep_sampling, lora_targets=v2.lora_targets)
    out = tmp_path / "lora.safetensors"
    metrics = train_loop.train_flux_lora(
        pipeline_source="tiny", cache_dir=shared_model_cache, photos=PHOTOS, recipe=recipe,
        out_path=out, device="cpu", num_threads=1)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    recorded = train_loop.read_lora_metadata(out)
    assert recorded["recipe"] == "knobs"
    import json

    values = json.loads(recorded["recipe_values"])
    assert values["timestep_sampling"] == "flux_shift"
    assert values["lora_targets"] == "all_linear"
    assert values["face_loss_weight"] == 1.0  # every value, defaults included

    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        keys = set(handle.keys())
    assert any(".ff_context.net.2.lora_A." in k for k in keys)
    assert any(".proj_mlp.lora_B." in k for k in keys)
