"""Saved LoRA files and their kohya export, loaded for real by diffusers (CPU, torch).

* Our file (bf16, ``.alpha`` tensors) of a recipe with alpha != rank loads in
  ``FluxPipeline.load_lora_weights`` with the trained adapter's effect.
* Its kohya export loads through diffusers' kohya reader with outputs identical to our file's. That
  reader hard-codes FLUX.1's width (3072; ``linear1`` split as 3072, 3072, 3072, 12288), so this
  test builds a FLUX transformer of that width with one double and one single block (random
  weights: only the mapping is under test).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.domain.recipes import get_recipe
from selfie_lora.domain.weights import WeightsFormat

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402

from selfie_lora.adapters.flux import loader as flux_loader  # noqa: E402
from selfie_lora.adapters.flux import lora_formats, train_loop  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

RANK, ALPHA = 4, 8  # alpha/rank = 2, a power of two: diffusers' kohya reader scales exactly


def _inputs(config: Any, *, seed: int = 5) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.6]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([1.0]) if config.guidance_embeds else None,
        "return_dict": False,
    }


def _output(transformer: Any) -> Any:
    with torch.no_grad():
        return transformer(**_inputs(transformer.config))[0]


def _perturb(transformer: Any, *, seed: int) -> None:
    """Gaussian-init LoRAs start with B = 0: give every B values, so each module acts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _round_lora_to_bf16(transformer: Any) -> None:
    """The in-memory adapter as the file stores it: its LoRA weights rounded to bf16."""
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(parameter.to(torch.bfloat16).float())


def _pipeline_of(transformer: Any) -> Any:
    """A FluxPipeline holding only ``transformer``: ``load_lora_weights`` needs a pipeline."""
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118


# --------------------------------------------------------------------------- our file


def test_saved_file_is_bf16_with_alpha_tensors_and_loads_with_the_trained_effect(
    shared_model_cache: Path, tmp_path: Path
) -> None:
    recipe = replace(get_recipe("local-tiny-v1"), lora_rank=RANK, lora_alpha=ALPHA, steps=3)
    pipe = flux_loader.load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
    transformer = pipe.transformer
    base = _output(transformer)
    config, _metrics = train_loop.fit_lora(
        transformer, _examples(pipe), recipe=recipe, seed=recipe.seed)
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    _perturb(transformer, seed=1)  # 3 steps move B little: make the adapter's effect large
    trained = _output(transformer)
    path = tmp_path / "lora.safetensors"
    train_loop.save_lora(transformer, config=config, out_path=path,
                         extra_metadata={"trigger_word": "TOK"})

    tensors, metadata = _tensors(path)
    weights = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert weights
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    modules = {k.removesuffix(".lora_A.weight") for k in weights if k.endswith(".lora_A.weight")}
    assert set(alphas) == {f"{m}.alpha" for m in modules}  # one per module, next to lora_A/B
    assert all(v.dtype == torch.float32 and v.ndim == 0 and float(v) == ALPHA for v in alphas.values())
    # diffusers refuses its adapter config next to alpha tensors: the file has only ours.
    assert "lora_adapter_metadata" not in metadata
    assert train_loop.read_lora_metadata(path) == {"trigger_word": "TOK"}

    _round_lora_to_bf16(transformer)
    as_stored = _output(transformer)
    fresh = flux_loader.load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
    fresh.load_lora_weights(str(path), adapter_name="reloaded")
    assert fresh.transformer.peft_config["reloaded"].r == RANK
    reloaded = _output(fresh.transformer)
    assert torch.allclose(reloaded, as_stored, rtol=0, atol=1e-6)
    # bf16 storage costs little against what the adapter does.
    effect = (trained - base).abs().max()
    assert (reloaded - trained).abs().max() < 0.01 * effect
    # The alpha is applied: a reader that took alpha = rank would be off by the whole adapter.
    fresh.set_adapters(["reloaded"], adapter_weights=[RANK / ALPHA])
    assert (_output(fresh.transformer) - as_stored).abs().max() > 0.3 * effect


def _examples(pipe: Any) -> list[Any]:
    import io

    from PIL import Image

    photos = []
    for shade in (60, 120):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (shade, 90, 200 - shade)).save(buffer, format="PNG")
        photos.append((buffer.getvalue(), "a photo of TOK person"))
    return train_loop.prepare_examples(pipe, photos, resolution=64)


# --------------------------------------------------------------------------- kohya


@pytest.fixture(scope="module")
def wide_transformer() -> Any:
    """FLUX.1's width (24 heads x 128) with one double and one single block, random weights."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=16,
            pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def _assert_both_load_alike(transformer: Any, *, ours: Path, kohya: Path, in_memory: Any) -> None:
    """Our file loads with the in-memory adapter's outputs, and its kohya export (through
    diffusers' kohya reader) with exactly our file's."""
    outputs = {}
    for name, path in (("ours", ours), ("kohya", kohya)):
        pipe = _pipeline_of(transformer)
        pipe.load_lora_weights(str(path), adapter_name=name)
        outputs[name] = _output(transformer)
        pipe.delete_adapters(name)
    assert torch.allclose(outputs["ours"], in_memory, rtol=0, atol=1e-6)
    assert torch.equal(outputs["kohya"], outputs["ours"])
    assert (outputs["ours"] - _output(transformer)).abs().max() > 1e-3  # the adapter acts


def test_kohya_export_loads_in_diffusers_with_identical_outputs(
    wide_transformer: Any, tmp_path: Path
) -> None:
    transformer = wide_transformer
    base = _output(transformer)
    config = train_loop.add_lora(transformer, rank=RANK, alpha=ALPHA, seed=3)
    _perturb(transformer, seed=4)
    ours = tmp_path / "ours.safetensors"
    train_loop.save_lora(transformer, config=config, out_path=ours)
    _round_lora_to_bf16(transformer)
    in_memory = _output(transformer)
    transformer.delete_adapters("default")
    assert torch.equal(_output(transformer), base)

    kohya = tmp_path / "kohya.safetensors"
    kohya.write_bytes(lora_formats.convert_lora(ours.read_bytes(), to=WeightsFormat.KOHYA))
    tensors, metadata = _tensors(kohya)
    double, single = "lora_unet_double_blocks_0", "lora_unet_single_blocks_0"
    assert sorted({k.split(".")[0] for k in tensors}) == [
        f"{double}_img_attn_proj", f"{double}_img_attn_qkv", f"{single}_linear1"]
    assert all(v.dtype == torch.bfloat16 for k, v in tensors.items() if not k.endswith(".alpha"))
    # Fused: rank x parts, alpha x parts (the same alpha / rank as each part).
    assert tensors[f"{double}_img_attn_qkv.lora_down.weight"].shape == (3 * RANK, 3072)
    assert tensors[f"{double}_img_attn_qkv.lora_up.weight"].shape == (3 * 3072, 3 * RANK)
    assert float(tensors[f"{double}_img_attn_qkv.alpha"]) == 3 * ALPHA
    assert tensors[f"{single}_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 4 * RANK)
    assert float(tensors[f"{single}_linear1.alpha"]) == 4 * ALPHA
    assert float(tensors[f"{double}_img_attn_proj.alpha"]) == ALPHA
    # proj_mlp was not trained: its part is zero.
    assert not tensors[f"{single}_linear1.lora_up.weight"][3 * 3072 :].any()
    assert "lora_adapter_metadata" not in metadata

    _assert_both_load_alike(transformer, ours=ours, kohya=kohya, in_memory=in_memory)


def test_a_tiny_models_kohya_export_shows_the_layout_but_diffusers_cannot_load_it(
    shared_model_cache: Path, tmp_path: Path
) -> None:
    """diffusers' kohya reader splits ``linear1`` at FLUX.1's width, so a ``tiny`` LoRA's kohya
    file fails there (an AssertionError in diffusers) although the conversion is exact: the README
    said only that the kohya file loads in diffusers, and a user trying it on the demo model got
    that error (found in review). This pins diffusers' limit the README now states."""
    pipe = flux_loader.load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
    config = train_loop.add_lora(pipe.transformer, rank=RANK, alpha=ALPHA, seed=3)
    ours = tmp_path / "ours.safetensors"
    train_loop.save_lora(pipe.transformer, config=config, out_path=ours)
    kohya = tmp_path / "kohya.safetensors"
    kohya.write_bytes(lora_formats.convert_lora(ours.read_bytes(), to=WeightsFormat.KOHYA))
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in _tensors(kohya)[0])
    fresh = flux_loader.load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
    with pytest.raises(AssertionError):
        fresh.load_lora_weights(str(kohya), adapter_name="kohya")

    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    assert ("diffusers reads a kohya file only at FLUX.1's width: a `tiny` model's kohya export "
            "is for checking its layout, not for loading") in readme


def test_an_all_linear_lora_exports_to_kohya_with_identical_outputs(
    wide_transformer: Any, tmp_path: Path
) -> None:
    """``lora_targets="all_linear"`` (the v2 recipes) trains both streams' attention and MLPs and
    the single blocks' ``proj_mlp``: every kohya module gets all of its parts, none zero."""
    transformer = wide_transformer
    config = train_loop.add_lora(transformer, rank=RANK, alpha=ALPHA, seed=3, targets="all_linear")
    _perturb(transformer, seed=4)
    ours = tmp_path / "ours.safetensors"
    train_loop.save_lora(transformer, config=config, out_path=ours)
    _round_lora_to_bf16(transformer)
    in_memory = _output(transformer)
    transformer.delete_adapters("default")

    kohya = tmp_path / "kohya.safetensors"
    kohya.write_bytes(lora_formats.convert_lora(ours.read_bytes(), to=WeightsFormat.KOHYA))
    tensors, _ = _tensors(kohya)
    double, single = "lora_unet_double_blocks_0", "lora_unet_single_blocks_0"
    assert sorted({k.split(".")[0] for k in tensors}) == sorted(
        [f"{double}_{m}" for m in ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
                                   "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2")]
        + [f"{single}_linear1", f"{single}_linear2"])
    # proj_mlp was trained this time: its part of linear1 holds values.
    assert tensors[f"{single}_linear1.lora_up.weight"][3 * 3072 :].any()

    _assert_both_load_alike(transformer, ours=ours, kohya=kohya, in_memory=in_memory)


def test_an_old_fp32_file_with_alpha_in_metadata_exports_with_its_alpha(tmp_path: Path) -> None:
    """Versions saved before the ``.alpha`` tensors carry alpha only in diffusers' metadata."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(2)
    prefix = "transformer.transformer_blocks.0.attn.to_out.0"
    save_file({f"{prefix}.lora_A.weight": torch.randn(RANK, 32, generator=generator),
               f"{prefix}.lora_B.weight": torch.randn(32, RANK, generator=generator)},
              str(tmp_path / "old.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(
                  {"transformer.r": RANK, "transformer.lora_alpha": ALPHA,
                   "transformer.alpha_pattern": {}})})
    data = lora_formats.convert_lora((tmp_path / "old.safetensors").read_bytes(), to=WeightsFormat.KOHYA)
    (tmp_path / "kohya.safetensors").write_bytes(data)
    tensors, _ = _tensors(tmp_path / "kohya.safetensors")
    name = "lora_unet_double_blocks_0_img_attn_proj"
    assert float(tensors[f"{name}.alpha"]) == ALPHA
    assert tensors[f"{name}.lora_down.weight"].dtype == torch.bfloat16
    # bf16 as torch rounds it (nearest even), bit for bit.
    original, _ = _tensors(tmp_path / "old.safetensors")
    assert torch.equal(tensors[f"{name}.lora_down.weight"],
                       original[f"{prefix}.lora_A.weight"].to(torch.bfloat16))


def test_a_replicate_file_normalised_loads_with_its_effect_and_exports_to_kohya(
    shared_model_cache: Path, tmp_path: Path
) -> None:
    """A Replicate trainer's file (the stand-in's shapes: fp32, no alphas) as it is stored:
    bf16 with ``.alpha`` = rank loads in the generator's pipeline with the effect the original
    had (diffusers takes alpha = rank for a file without alphas), and exports to kohya."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7)
    modules = ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
               "transformer_blocks.0.attn.to_v")  # the stand-in's
    original = tmp_path / "replicate.safetensors"
    save_file({f"transformer.{m}.lora_{ab}.weight": torch.randn(shape, generator=generator) * scale
               for m in modules
               for ab, shape, scale in (("A", (RANK, 32), 1.0), ("B", (32, RANK), 0.3))},
              str(original), metadata={"format": "pt", "trigger_word": "TOK"})
    stored = tmp_path / "stored.safetensors"
    stored.write_bytes(lora_formats.normalize_lora(original.read_bytes()))
    rounded = tmp_path / "rounded.safetensors"
    tensors, _ = _tensors(original)
    save_file({k: v.to(torch.bfloat16).float() for k, v in tensors.items()}, str(rounded))

    outputs = {}
    for name, path in (("base", None), ("stored", stored), ("rounded", rounded)):
        pipe = flux_loader.load_pipeline("tiny", cache_dir=shared_model_cache, device="cpu")
        if path is not None:
            pipe.load_lora_weights(str(path), adapter_name=name)
        outputs[name] = _output(pipe.transformer)
    assert torch.allclose(outputs["stored"], outputs["rounded"], rtol=0, atol=1e-6)
    assert (outputs["stored"] - outputs["base"]).abs().max() > 1e-3  # the adapter acts

    kohya, _ = _tensors_of(lora_formats.convert_lora(stored.read_bytes(), to=WeightsFormat.KOHYA),
                           tmp_path / "kohya.safetensors")
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * RANK
    assert float(kohya["lora_unet_single_blocks_0_linear1.alpha"]) == 4 * RANK


def _tensors_of(data: bytes, path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    path.write_bytes(data)
    return _tensors(path)
