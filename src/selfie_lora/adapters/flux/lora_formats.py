"""A FLUX LoRA in kohya sd-scripts' layout, converted from the diffusers layout we store.

kohya's layout (``networks/lora_flux.py``; read by sd-scripts, ComfyUI, Forge) names the modules of
Black Forest Labs' FLUX code, where some projections that diffusers keeps apart are one linear:

* a double block's ``img_attn_qkv`` is diffusers' ``attn.to_q``, ``to_k``, ``to_v`` (``txt_attn_qkv``
  the ``add_*_proj`` ones);
* a single block's ``linear1`` is ``attn.to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` (4x wide), and
  ``linear2`` is ``proj_out``.

A fused module gets the parts' ``lora_down`` stacked (rank = the sum of the parts' ranks) and a
block-diagonal ``lora_up``, so it computes exactly what the separate LoRAs computed; a part that
was not trained (we never train ``proj_mlp``) is a block of zeros. kohya's alpha is per module and
its scale is ``alpha / rank`` of the fused rank, so a fused module's alpha is the parts' common
scale times the fused rank (a part whose scale differs has it folded into its ``lora_up``). This is
what diffusers' kohya reader (``_convert_kohya_flux_lora_to_diffusers``) splits back, and what kohya's
own ``convert_flux_lora.py`` builds from ai-toolkit files, where every alpha equals the rank.

The conversion works on the safetensors bytes with numpy (the values are copied bit for bit; only
a folded scale or a dtype change does arithmetic), so an API server without torch can export.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from selfie_lora.domain.weights import WeightsFormat
from selfie_lora.errors import ErrorCode, InvalidInputError

logger = logging.getLogger(__name__)

# The raw bits of each float dtype a LoRA file may hold, as unsigned integers of the same width.
_BITS: dict[str, np.dtype[Any]] = {"F32": np.dtype("<u4"), "F16": np.dtype("<u2"), "BF16": np.dtype("<u2")}
DEFAULT_EXPORT_DTYPE = "BF16"

_PREFIX = "transformer."
_DOUBLE = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_SINGLE = re.compile(r"single_transformer_blocks\.(\d+)\.(.+)")

# diffusers module in a block -> kohya module, one to one.
_DOUBLE_PLAIN = {
    "attn.to_out.0": "img_attn_proj",
    "ff.net.0.proj": "img_mlp_0",
    "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin",
    "attn.to_add_out": "txt_attn_proj",
    "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2",
    "norm1_context.linear": "txt_mod_lin",
}
_SINGLE_PLAIN = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
# kohya module -> its parts in order, each with its output width in units of the model's width
# (FLUX's MLP is 4x wide: diffusers' reader splits linear1 as 3072, 3072, 3072, 12288).
_DOUBLE_FUSED = {
    "img_attn_qkv": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)),
    "txt_attn_qkv": (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1)),
}
_SINGLE_FUSED = {
    "linear1": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1), ("proj_mlp", 4)),
}


def _unsupported(message: str) -> InvalidInputError:
    return InvalidInputError(message, code=ErrorCode.UNSUPPORTED_WEIGHTS)


# --------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class RawTensor:
    """A tensor of a safetensors file: its dtype's name and its values' raw bits (shaped)."""

    dtype: str
    bits: np.ndarray[Any, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.bits.shape)

    def to_float32(self) -> np.ndarray[Any, Any]:
        if self.dtype == "F32":
            return self.bits.view(np.float32)
        if self.dtype == "F16":
            return self.bits.view(np.float16).astype(np.float32)
        return (self.bits.astype(np.uint32) << 16).view(np.float32)

    @classmethod
    def from_float32(cls, values: np.ndarray[Any, Any], dtype: str) -> RawTensor:
        values = np.ascontiguousarray(values, dtype=np.float32)
        if dtype == "F32":
            return cls("F32", values.view(np.uint32))
        if dtype == "F16":
            return cls("F16", values.astype(np.float16).view(np.uint16))
        # bf16: the top half of the float32, rounded to nearest even (as torch rounds).
        wide = values.view(np.uint32).astype(np.uint64)
        rounded = (wide + 0x7FFF + ((wide >> 16) & 1)) >> 16
        return cls("BF16", rounded.astype(np.uint16))

    def cast(self, dtype: str) -> RawTensor:
        return self if dtype == self.dtype else RawTensor.from_float32(self.to_float32(), dtype)

    def scalar(self) -> float:
        return float(self.to_float32().reshape(-1)[0])


def read_safetensors(data: bytes) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file (float tensors only: LoRA files hold no other).

    Anything else, a damaged file included (cut short, a header entry without offsets or with a
    shape its bytes do not fill), is refused with ``unsupported_weights``: the export of a damaged
    version must say so, not fail with a 500."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise _unsupported(f"the weights are not a safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise _unsupported("the weights are not a safetensors file")
    raw_metadata = header.pop("__metadata__", None) or {}
    if not isinstance(raw_metadata, dict):
        raise _unsupported("the weights' safetensors metadata is not a table of strings")
    metadata = {str(k): str(v) for k, v in raw_metadata.items()}
    base = 8 + size
    tensors: dict[str, RawTensor] = {}
    for key, entry in header.items():
        tensors[key] = _tensor(data, base, key, entry)
    return tensors, metadata


def _tensor(data: bytes, base: int, key: str, entry: Any) -> RawTensor:
    """One header entry's tensor, every field checked: a damaged file gets here with anything in
    them, and numpy would raise ValueError (or read past the tensor) on what does not fit."""
    if not isinstance(entry, dict):
        raise _unsupported(f"tensor {key} has no dtype, shape and offsets in the safetensors header")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in _BITS:
        raise _unsupported(f"tensor {key} is {dtype}; a LoRA file holds F32, F16 or BF16 tensors")
    offsets, shape = entry.get("data_offsets"), entry.get("shape")
    if not (_int_list(offsets) and len(offsets) == 2 and _int_list(shape)
            and all(n >= 0 for n in shape)):
        raise _unsupported(f"tensor {key} has a damaged shape or offsets in the safetensors header")
    start, end = offsets
    itemsize = _BITS[dtype].itemsize
    # An empty shape is a scalar: its product is 1.
    if not 0 <= start <= end <= len(data) - base or math.prod(shape) * itemsize != end - start:
        raise _unsupported(
            f"tensor {key} ({dtype}, shape {shape}) does not fit its bytes {start}..{end} of "
            f"{max(len(data) - base, 0)}: the weights file is damaged or cut short")
    bits = np.frombuffer(data, dtype=_BITS[dtype], count=(end - start) // itemsize,
                         offset=base + start)
    return RawTensor(dtype, bits.reshape(tuple(shape)))


def _int_list(value: object) -> TypeGuard[list[int]]:
    # bool is an int to Python, but JSON's true is no size.
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) for n in value)


def write_safetensors(tensors: Mapping[str, RawTensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file: the header (8-byte aligned, as safetensors writes it), then the data."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks: list[bytes] = []
    offset = 0
    for key in sorted(tensors):
        tensor = tensors[key]
        raw = np.ascontiguousarray(tensor.bits).astype(_BITS[tensor.dtype], copy=False).tobytes()
        header[key] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks)


# --------------------------------------------------------------------------- reading our layout


@dataclass(frozen=True)
class LoraModule:
    down: RawTensor  # (rank, in_features): diffusers' lora_A
    up: RawTensor  # (out_features, rank): diffusers' lora_B
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _metadata_alphas(metadata: Mapping[str, str]) -> tuple[float | None, dict[str, float]]:
    """The alpha and alpha pattern of diffusers' ``lora_adapter_metadata`` (our files before the
    ``.alpha`` tensors): ``transformer.lora_alpha`` and ``transformer.alpha_pattern``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        config = json.loads(raw)
    except ValueError:
        return None, {}
    if not isinstance(config, dict):
        config = {}
    alpha = config.get(_PREFIX + "lora_alpha")
    pattern = config.get(_PREFIX + "alpha_pattern") or {}
    if not (alpha is None or _is_number(alpha)) or not (
            isinstance(pattern, dict) and all(_is_number(v) for v in pattern.values())):
        raise _unsupported("the LoRA's adapter metadata holds an alpha that is not a number")
    return (None if alpha is None else float(alpha)), {str(k): float(v) for k, v in pattern.items()}


def _is_number(value: Any) -> bool:
    # JSON's true is no alpha, and an int past a float's range raises where it is converted.
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _pattern_alpha(module: str, pattern: Mapping[str, float]) -> float | None:
    # peft's rule: a pattern names a module by its whole name or a dotted suffix of it.
    for key, value in pattern.items():
        try:
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        except re.error:
            raise _unsupported(f"the LoRA's alpha pattern {key!r} is not a pattern") from None
    return None


def read_diffusers_lora(data: bytes) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """The LoRA modules (transformer module name -> module) of a diffusers-layout file.

    Each module's alpha is its ``.alpha`` tensor; without one, the alpha in diffusers' adapter
    metadata; without that, the rank (diffusers' and ai-toolkit's convention).
    """
    tensors, metadata = read_safetensors(data)
    default_alpha, pattern = _metadata_alphas(metadata)
    downs: dict[str, RawTensor] = {}
    ups: dict[str, RawTensor] = {}
    alphas: dict[str, float] = {}
    strange: list[str] = []
    for key, tensor in tensors.items():
        name = key.removeprefix(_PREFIX)
        if not key.startswith(_PREFIX):
            strange.append(key)
        elif name.endswith(".lora_A.weight"):
            downs[name.removesuffix(".lora_A.weight")] = tensor
        elif name.endswith(".lora_B.weight"):
            ups[name.removesuffix(".lora_B.weight")] = tensor
        elif name.endswith(".alpha") and tensor.bits.size == 1:
            alphas[name.removesuffix(".alpha")] = tensor.scalar()
        else:
            strange.append(key)
    if strange or not downs or downs.keys() != ups.keys():
        unpaired = sorted(downs.keys() ^ ups.keys())
        shown = ", ".join((strange + unpaired)[:3]) or "no LoRA tensors"
        raise _unsupported(
            "these weights are not a FLUX transformer LoRA in diffusers' layout "
            f"(transformer.<module>.lora_A/lora_B.weight): {shown}")
    modules: dict[str, LoraModule] = {}
    for name, down in downs.items():
        up = ups[name]
        if (len(down.shape) != 2 or len(up.shape) != 2 or up.shape[1] != down.shape[0]
                or down.shape[0] == 0):
            raise _unsupported(f"the LoRA of {name} has shapes {down.shape} and {up.shape}")
        alpha = alphas.get(name)
        if alpha is None:
            alpha = _pattern_alpha(name, pattern) or default_alpha or float(down.shape[0])
        # A fused module's parts are scaled by their scales' ratio: a zero or endless one
        # has none.
        if not math.isfinite(alpha) or alpha == 0:
            raise _unsupported(f"the LoRA of {name} has alpha {alpha}")
        modules[name] = LoraModule(down=down, up=up, alpha=alpha)
    return modules, metadata


# --------------------------------------------------------------------------- kohya


def _kohya_name(block: str, index: str, name: str) -> str:
    return f"lora_unet_{block}_{index}_{name}"


def _put(out: dict[str, RawTensor], name: str, module: LoraModule, dtype: str) -> None:
    out[f"{name}.lora_down.weight"] = module.down.cast(dtype)
    out[f"{name}.lora_up.weight"] = module.up.cast(dtype)
    # fp32, as our files hold it: a reader that divides the tensor by the rank in its own dtype
    # (diffusers does) would round a bf16 alpha.
    out[f"{name}.alpha"] = RawTensor.from_float32(np.array(module.alpha, dtype=np.float32), "F32")


def _fuse(parts: list[tuple[LoraModule | None, int]], where: str) -> LoraModule:
    """One LoRA computing what ``parts`` (module or None for an untrained part, width multiple)
    computed side by side: stacked downs, block-diagonal up, one alpha."""
    present = [(m, mult) for m, mult in parts if m is not None]
    first, first_mult = present[0]
    in_features = first.down.shape[1]
    width, remainder = divmod(first.up.shape[0], first_mult)
    if remainder or any(m.down.shape[1] != in_features for m, _ in present):
        raise _unsupported(f"the LoRAs fused into {where} do not fit together")
    dtype = first.down.dtype if all(m.down.dtype == first.down.dtype and m.up.dtype == first.down.dtype
                                    for m, _ in present) else "F32"
    bits = _BITS[dtype]
    downs: list[np.ndarray[Any, Any]] = []
    ups: list[np.ndarray[Any, Any]] = []
    for module, mult in parts:
        if module is None:
            # An untrained part: a zero LoRA of the first part's rank, so that every part has the
            # same rank (diffusers' reader then splits the fused module back exactly).
            downs.append(np.zeros((first.rank, in_features), dtype=bits))
            ups.append(np.zeros((width * mult, first.rank), dtype=bits))
            continue
        if module.up.shape[0] != width * mult:
            raise _unsupported(f"the LoRAs fused into {where} do not fit together")
        up = module.up.cast(dtype)
        if module.scale != first.scale:
            up = RawTensor.from_float32(up.to_float32() * (module.scale / first.scale), dtype)
        downs.append(module.down.cast(dtype).bits)
        ups.append(up.bits)
    rank = sum(d.shape[0] for d in downs)
    fused_up = np.zeros((sum(u.shape[0] for u in ups), rank), dtype=bits)
    row = col = 0
    for block in ups:
        fused_up[row : row + block.shape[0], col : col + block.shape[1]] = block
        row += block.shape[0]
        col += block.shape[1]
    return LoraModule(down=RawTensor(dtype, np.concatenate(downs)), up=RawTensor(dtype, fused_up),
                      alpha=first.scale * rank)


def to_kohya(modules: Mapping[str, LoraModule], *, dtype: str = DEFAULT_EXPORT_DTYPE
             ) -> dict[str, RawTensor]:
    """kohya's ``lora_unet_*`` tensors for diffusers-layout ``modules`` (names without the
    ``transformer.`` prefix). A module outside the transformer blocks is refused."""
    out: dict[str, RawTensor] = {}
    blocks: dict[tuple[str, str], dict[str, LoraModule]] = {}
    for name, module in modules.items():
        for block, pattern, plain in (("single_blocks", _SINGLE, _SINGLE_PLAIN),
                                      ("double_blocks", _DOUBLE, _DOUBLE_PLAIN)):
            match = pattern.fullmatch(name)
            if match is None:
                continue
            index, inner = match.groups()
            if inner in plain:
                _put(out, _kohya_name(block, index, plain[inner]), module, dtype)
            else:
                blocks.setdefault((block, index), {})[inner] = module
            break
        else:
            raise _unsupported(f"{name} has no place in kohya's FLUX layout")
    for (block, index), inners in blocks.items():
        fused = _SINGLE_FUSED if block == "single_blocks" else _DOUBLE_FUSED
        for kohya, parts in fused.items():
            chosen = [(inners.pop(inner, None), mult) for inner, mult in parts]
            if any(m is not None for m, _ in chosen):
                name = _kohya_name(block, index, kohya)
                _put(out, name, _fuse(chosen, name), dtype)
        if inners:
            prefix = "single_transformer_blocks" if block == "single_blocks" else "transformer_blocks"
            raise _unsupported(f"{prefix}.{index}.{sorted(inners)[0]} has no place in kohya's FLUX layout")
    return out


def convert_lora(data: bytes, *, to: WeightsFormat, dtype: str = DEFAULT_EXPORT_DTYPE) -> bytes:
    """A diffusers-layout FLUX LoRA file in the layout ``to``; the diffusers layout is returned as
    it is. Our metadata keys (and everything else but diffusers' adapter config) travel along."""
    if to is WeightsFormat.DIFFUSERS:
        return data
    modules, metadata = read_diffusers_lora(data)
    tensors = to_kohya(modules, dtype=dtype)
    kept = {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}
    logger.info("converted a LoRA of %d modules to %s (%d tensors)", len(modules), to, len(tensors))
    return write_safetensors(tensors, kept)


def normalize_lora(data: bytes, *, dtype: str = DEFAULT_EXPORT_DTYPE) -> bytes:
    """A diffusers-layout FLUX LoRA file in the layout we store and document: ``lora_A``/``lora_B``
    in ``dtype`` (bf16) and one fp32 ``.alpha`` tensor per module. ``data`` is returned as it is
    when it already is so (our own trainer's files: their hash stays theirs).

    Each alpha is the one the file applied (:func:`read_diffusers_lora`: its tensor, else diffusers'
    adapter metadata, else the rank, which is what diffusers and peft take for a file without
    alphas and what ai-toolkit means by one), so the LoRA acts as it did. Metadata travels along
    but diffusers' adapter config, whose alphas are now the tensors (diffusers refuses a file
    with both)."""
    tensors, _ = read_safetensors(data)
    modules, metadata = read_diffusers_lora(data)
    if (all(f"{_PREFIX}{name}.alpha" in tensors for name in modules)
            and all(t.dtype == dtype for k, t in tensors.items() if not k.endswith(".alpha"))):
        return data
    out: dict[str, RawTensor] = {}
    for name, module in modules.items():
        out[f"{_PREFIX}{name}.lora_A.weight"] = module.down.cast(dtype)
        out[f"{_PREFIX}{name}.lora_B.weight"] = module.up.cast(dtype)
        # fp32, as our trainer writes it (see ``_put``).
        out[f"{_PREFIX}{name}.alpha"] = RawTensor.from_float32(
            np.array(module.alpha, dtype=np.float32), "F32")
    kept = {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}
    logger.info("normalised a LoRA of %d modules to %s with .alpha tensors", len(modules), dtype)
    return write_safetensors(out, kept)


class FluxLoraConverter:
    """The ``WeightsConverter`` port: FLUX LoRA files from the diffusers layout to another."""

    def convert(self, data: bytes, *, to: WeightsFormat) -> bytes:
        return convert_lora(data, to=to)
