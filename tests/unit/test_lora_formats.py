"""The kohya converter on numpy alone: the safetensors bytes, bf16 rounding, what a fused module
computes, and the files it refuses. (Loading in diffusers: tests/integration/test_lora_exports.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from selfie_lora.adapters.flux.lora_formats import (
    RawTensor,
    convert_lora,
    read_safetensors,
    write_safetensors,
)
from selfie_lora.domain.weights import WeightsFormat
from selfie_lora.errors import ErrorCode, InvalidInputError
from selfie_lora.testing.fakes import fake_safetensors

WIDTH, RANK = 8, 2


def f32(values: Any) -> RawTensor:
    return RawTensor.from_float32(np.asarray(values, dtype=np.float32), "F32")


def lora_file(modules: dict[str, tuple[int, int, float]], *, seed: int = 0) -> tuple[bytes, dict[str, Any]]:
    """A diffusers-layout file (fp32) of ``modules`` (name -> in, out, alpha) and its matrices."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, RawTensor] = {}
    matrices: dict[str, Any] = {}
    for name, (fan_in, fan_out, alpha) in modules.items():
        down = rng.standard_normal((RANK, fan_in)).astype(np.float32)
        up = rng.standard_normal((fan_out, RANK)).astype(np.float32)
        tensors[f"transformer.{name}.lora_A.weight"] = f32(down)
        tensors[f"transformer.{name}.lora_B.weight"] = f32(up)
        tensors[f"transformer.{name}.alpha"] = f32(np.array(alpha))
        matrices[name] = alpha / RANK * (up @ down)  # what the module adds to the weight
    return write_safetensors(tensors, {"format": "pt", "selfie_lora.trigger_word": "TOK"}), matrices


def kohya_delta(tensors: dict[str, RawTensor], name: str) -> Any:
    down = tensors[f"{name}.lora_down.weight"].to_float32()
    up = tensors[f"{name}.lora_up.weight"].to_float32()
    return tensors[f"{name}.alpha"].scalar() / down.shape[0] * (up @ down)


def test_safetensors_round_trip_is_aligned_and_bit_exact() -> None:
    tensors = {"b": RawTensor.from_float32(np.linspace(-2, 2, 6).reshape(2, 3), "BF16"),
               "a": f32(np.arange(4.0)), "s": f32(np.array(3.5))}
    data = write_safetensors(tensors, {"k": "v"})
    assert int.from_bytes(data[:8], "little") % 8 == 0
    read, metadata = read_safetensors(data)
    assert metadata == {"k": "v"}
    assert read.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert read[key].dtype == tensor.dtype
        assert read[key].shape == tensor.shape
        assert np.array_equal(read[key].bits, tensor.bits)
    assert read["s"].scalar() == 3.5


def test_bf16_rounds_to_nearest_even() -> None:
    # 1 + 2^-8 lies halfway between bf16's 1 and 1 + 2^-7: even wins (1); 1 + 3 * 2^-8 lies
    # halfway between 1 + 2^-7 and 1 + 2^-6: even wins (1 + 2^-6); others go to the nearest.
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-12, -2.0], dtype=np.float32)
    rounded = RawTensor.from_float32(values, "BF16").to_float32()
    assert rounded.tolist() == [1.0, 1 + 2**-6, 1 + 2**-7, -2.0]


def test_fused_modules_compute_what_the_parts_computed() -> None:
    double = "transformer_blocks.3"
    single = "single_transformer_blocks.5"
    data, deltas = lora_file({
        f"{double}.attn.to_q": (WIDTH, WIDTH, 4.0),
        f"{double}.attn.to_k": (WIDTH, WIDTH, 4.0),
        f"{double}.attn.to_v": (WIDTH, WIDTH, 1.0),  # another scale: folded into its up block
        f"{double}.attn.to_out.0": (WIDTH, WIDTH, 4.0),
        f"{single}.attn.to_q": (WIDTH, WIDTH, 4.0),
        f"{single}.attn.to_k": (WIDTH, WIDTH, 4.0),
        f"{single}.attn.to_v": (WIDTH, WIDTH, 4.0),
        f"{single}.proj_out": (5 * WIDTH, WIDTH, 3.0),
    })
    tensors, metadata = read_safetensors(convert_lora(data, to=WeightsFormat.KOHYA))
    assert metadata == {"format": "pt", "selfie_lora.trigger_word": "TOK"}
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {"BF16"}

    def close(a: Any, b: Any) -> bool:  # bf16 keeps 8 bits of mantissa
        return bool(np.allclose(a, b, rtol=0, atol=0.02 * float(np.abs(b).max())))

    qkv = kohya_delta(tensors, "lora_unet_double_blocks_3_img_attn_qkv")
    assert close(qkv, np.concatenate([deltas[f"{double}.attn.{p}"] for p in ("to_q", "to_k", "to_v")]))
    assert tensors["lora_unet_double_blocks_3_img_attn_qkv.alpha"].scalar() == 3 * 4.0
    assert close(kohya_delta(tensors, "lora_unet_double_blocks_3_img_attn_proj"),
                 deltas[f"{double}.attn.to_out.0"])
    linear1 = kohya_delta(tensors, "lora_unet_single_blocks_5_linear1")
    assert linear1.shape == (3 * WIDTH + 4 * WIDTH, WIDTH)  # q, k, v, and FLUX's 4x wide MLP
    assert close(linear1[: 3 * WIDTH],
                 np.concatenate([deltas[f"{single}.attn.{p}"] for p in ("to_q", "to_k", "to_v")]))
    assert not linear1[3 * WIDTH :].any()  # proj_mlp: untrained, zero
    assert tensors["lora_unet_single_blocks_5_linear1.lora_down.weight"].shape == (4 * RANK, WIDTH)
    assert tensors["lora_unet_single_blocks_5_linear1.alpha"].scalar() == 4 * 4.0
    assert close(kohya_delta(tensors, "lora_unet_single_blocks_5_linear2"), deltas[f"{single}.proj_out"])
    assert tensors["lora_unet_single_blocks_5_linear2.alpha"].scalar() == 3.0


def test_the_diffusers_layout_is_returned_as_stored() -> None:
    data, _ = lora_file({"transformer_blocks.0.attn.to_q": (WIDTH, WIDTH, 2.0)})
    assert convert_lora(data, to=WeightsFormat.DIFFUSERS) is data


@pytest.mark.parametrize(("data", "says"), [
    (lora_file({"x_embedder": (WIDTH, WIDTH, 2.0)})[0], "x_embedder has no place"),
    (lora_file({"transformer_blocks.0.attn.norm_q": (WIDTH, WIDTH, 2.0)})[0], "norm_q"),
    (write_safetensors({"text_encoder.layers.0.q.lora_A.weight": f32(np.ones((RANK, WIDTH)))}, {}),
     "text_encoder"),
    (write_safetensors({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight":
                        f32(np.ones((RANK, WIDTH)))}, {}), "lora_unet_double_blocks_0"),
    (fake_safetensors({"trigger_word": "TOK"}), "no LoRA tensors"),
    (b"not a safetensors file", "not a safetensors file"),
])
def test_files_it_cannot_convert_are_refused(data: bytes, says: str) -> None:
    with pytest.raises(InvalidInputError, match=says) as raised:
        convert_lora(data, to=WeightsFormat.KOHYA)
    assert raised.value.code == ErrorCode.UNSUPPORTED_WEIGHTS


def test_an_ai_toolkit_file_without_alphas_converts_with_alpha_equal_to_rank() -> None:
    """Replicate's trainer (ai-toolkit) trains proj_mlp and more, and writes no alphas."""
    single = "single_transformer_blocks.0"
    data, deltas = lora_file({
        f"{single}.attn.to_q": (WIDTH, WIDTH, RANK), f"{single}.attn.to_k": (WIDTH, WIDTH, RANK),
        f"{single}.attn.to_v": (WIDTH, WIDTH, RANK), f"{single}.proj_mlp": (WIDTH, 4 * WIDTH, RANK),
        f"{single}.norm.linear": (WIDTH, 3 * WIDTH, RANK),
        "transformer_blocks.0.ff_context.net.2": (4 * WIDTH, WIDTH, RANK),
    })
    tensors, _ = read_safetensors(data)
    no_alphas = write_safetensors({k: t for k, t in tensors.items() if not k.endswith(".alpha")}, {})
    kohya, _ = read_safetensors(convert_lora(no_alphas, to=WeightsFormat.KOHYA))
    linear1 = kohya_delta(kohya, "lora_unet_single_blocks_0_linear1")
    expected = np.concatenate([deltas[f"{single}.{p}"]
                               for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    assert np.allclose(linear1, expected, rtol=0, atol=0.02 * float(np.abs(expected).max()))
    assert kohya["lora_unet_single_blocks_0_linear1.alpha"].scalar() == 4 * RANK
    assert kohya["lora_unet_single_blocks_0_modulation_lin.alpha"].scalar() == RANK
    assert "lora_unet_double_blocks_0_txt_mlp_2.lora_up.weight" in kohya
