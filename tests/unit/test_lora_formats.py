"""The kohya converter on numpy alone: the safetensors bytes, bf16 rounding, what a fused module
computes, and the files it refuses. (Loading in diffusers: tests/integration/test_lora_exports.)"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfie_lora.adapters.flux.lora_formats import (
    RawTensor,
    convert_lora,
    normalize_lora,
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


# --------------------------------------------------------------------------- damaged files

# A damaged stored version must be refused as unsupported_weights (a 422 that says so), never
# answered with a 500: whatever the damage, convert_lora converts or raises InvalidInputError.
FUZZ = settings(max_examples=400, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.just(10**400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


def _fuzzed_lora() -> bytes:
    """A file that takes every path of the conversion: a fused qkv, a plain module, alphas from
    tensors and from diffusers' adapter metadata (its alpha pattern too)."""
    data, _ = lora_file({"transformer_blocks.0.attn.to_q": (WIDTH, WIDTH, 2.0),
                         "transformer_blocks.0.attn.to_k": (WIDTH, WIDTH, 2.0),
                         "single_transformer_blocks.1.proj_out": (WIDTH, WIDTH, 3.0)})
    tensors, _ = read_safetensors(data)
    kept = {k: t for k, t in tensors.items() if k != "transformer.transformer_blocks.0.attn.to_k.alpha"}
    adapter = json.dumps({"transformer.lora_alpha": 2, "transformer.alpha_pattern": {"to_k": 4}})
    return write_safetensors(kept, {"format": "pt", "lora_adapter_metadata": adapter})


VALID = _fuzzed_lora()
HEADER_END = 8 + int.from_bytes(VALID[:8], "little")


def _converts_or_is_refused(data: bytes) -> None:
    code = ErrorCode.UNSUPPORTED_WEIGHTS  # converted
    try:
        convert_lora(data, to=WeightsFormat.KOHYA)
    except InvalidInputError as exc:
        code = exc.code
    assert code == ErrorCode.UNSUPPORTED_WEIGHTS


def test_the_fuzzed_file_converts_as_it_is() -> None:
    assert read_safetensors(convert_lora(VALID, to=WeightsFormat.KOHYA))[0]


@FUZZ
@given(cut=st.integers(0, len(VALID)),
       flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       in_header=st.booleans())
def test_a_damaged_file_converts_or_is_refused_as_unsupported(
        cut: int, flips: list[tuple[int, int]], in_header: bool) -> None:
    """Bytes changed (most of them in the header, where the damage is interesting) and the file
    cut anywhere."""
    data = bytearray(VALID)
    for at, value in flips:
        data[at % HEADER_END if in_header else at] = value
    _converts_or_is_refused(bytes(data[:cut]) if cut else bytes(data))


@FUZZ
@given(entry=st.integers(0, 100), field=st.sampled_from(["dtype", "shape", "data_offsets", None]),
       value=_JSON, tail=st.integers(0, 64))
def test_a_damaged_header_entry_converts_or_is_refused_as_unsupported(
        entry: int, field: str | None, value: Any, tail: int) -> None:
    """A header that is valid JSON, one of its entries (or the metadata, or one of diffusers'
    adapter metadata values) anything at all; the data cut by up to ``tail`` bytes."""
    header = json.loads(VALID[8:HEADER_END])
    keys = sorted(header)
    key = keys[entry % len(keys)]
    if key == "__metadata__":
        adapter = json.loads(header[key]["lora_adapter_metadata"])
        adapter[sorted(adapter)[entry % 2]] = value
        if field is None:
            header[key] = value
        else:
            header[key]["lora_adapter_metadata"] = json.dumps(adapter)
    elif field is None:
        header[key] = value
    else:
        header[key][field] = value
    encoded = json.dumps(header).encode()
    data = len(encoded).to_bytes(8, "little") + encoded + VALID[HEADER_END:]
    _converts_or_is_refused(data[: len(data) - tail])


def _header(header: Any) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded


A = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"


@pytest.mark.parametrize(("data", "says"), [
    (VALID[:-100], "cut short"),
    (_header({A: {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}) + bytes(8), "cut short"),
    (_header({A: {"dtype": "F32", "shape": [1]}}), "damaged shape or offsets"),
    (_header({A: "F32"}), "no dtype, shape and offsets"),
    (_header({"__metadata__": ["format"]}), "metadata"),
], ids=["cut", "shape-disagrees-with-offsets", "no-offsets", "entry-not-a-table", "metadata-a-list"])
def test_a_damaged_file_is_refused_as_unsupported(data: bytes, says: str) -> None:
    with pytest.raises(InvalidInputError, match=says) as raised:
        convert_lora(data, to=WeightsFormat.KOHYA)
    assert raised.value.code == ErrorCode.UNSUPPORTED_WEIGHTS


# --------------------------------------------------------------------------- normalising


def _standin_lora(*, metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, Any]]:
    """A file shaped as the Replicate stand-in's (and ai-toolkit's): fp32, no alphas."""
    from safetensors.numpy import save

    rng = np.random.default_rng(3)
    tensors = {}
    for module in ("single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"):
        tensors[f"transformer.{module}.lora_A.weight"] = rng.standard_normal((RANK, 32), dtype=np.float32)
        tensors[f"transformer.{module}.lora_B.weight"] = rng.standard_normal((32, RANK), dtype=np.float32)
    data = save(tensors, metadata=metadata or {"format": "pt", "source": "replicate-standin",
                                              "trigger_word": "TOK"})
    return data, tensors


def test_a_file_without_alphas_is_normalised_to_bf16_with_alpha_equal_to_rank() -> None:
    data, original = _standin_lora()

    tensors, metadata = read_safetensors(normalize_lora(data))

    modules = {k.removesuffix(".lora_A.weight") for k in original if k.endswith(".lora_A.weight")}
    assert set(tensors) == set(original) | {f"{m}.alpha" for m in modules}
    assert {tensors[f"{m}.alpha"].dtype for m in modules} == {"F32"}
    assert [tensors[f"{m}.alpha"].scalar() for m in modules] == [float(RANK)] * len(modules)
    for key, values in original.items():
        assert tensors[key].dtype == "BF16"
        assert np.array_equal(tensors[key].bits, RawTensor.from_float32(values, "BF16").bits)
    assert metadata == {"format": "pt", "source": "replicate-standin", "trigger_word": "TOK"}


def test_normalising_keeps_an_alpha_the_adapter_metadata_gave_and_drops_that_metadata() -> None:
    config = {"transformer.r": RANK, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {}}
    data, _ = _standin_lora(metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})

    tensors, metadata = read_safetensors(normalize_lora(data))

    assert {t.scalar() for k, t in tensors.items() if k.endswith(".alpha")} == {8.0}
    assert metadata == {"format": "pt"}  # diffusers refuses its config next to alpha tensors


def test_a_file_already_normalised_is_returned_as_it_is() -> None:
    data, _ = _standin_lora()
    normalised = normalize_lora(data)
    assert normalize_lora(normalised) is normalised
    # Our trainer's files (bf16, alphas) keep their bytes, and so their hash.
    ours, _ = lora_file({"transformer_blocks.0.attn.to_q": (WIDTH, WIDTH, 2.0)})
    ours = convert_lora(ours, to=WeightsFormat.DIFFUSERS)
    assert normalize_lora(normalize_lora(ours)) == normalize_lora(ours)
