"""Fitting a FLUX LoRA training into the GPU at hand: memory modes, staged loading, freeing.

A FLUX.1 transformer has ~11.9 B parameters: 22.2 GiB in bf16, before T5-XXL (8.9 GiB), CLIP and
the VAE. Three memory modes decide how the frozen base transformer is stored on the device:

* ``bf16``: unquantized (bf16 on a GPU, fp32 on a CPU); for 40 GB cards and up;
* ``int8``: int8 weight-only (per output channel), ~1 byte per weight; for 24 GB cards;
* ``nf4``: 4-bit NormalFloat (QLoRA's format, blocks of 64), ~0.56 byte per weight; for 16 GB cards.

``auto`` picks the largest that fits the free memory (:func:`choose_memory_mode`). In every mode the
LoRA itself stays fp32 and is the only thing trained; quantized weights are dequantized to the
compute dtype on the fly, so the saved LoRA loads on an unquantized base like any other.

Quantization is torchao's (the PyTorch team's library): its int8 weight-only tensors and its
NF4Tensor run on the CPU too (so the tests exercise the real code path on ``tiny``), peft wraps
torchao-quantized linears natively, and it needs no CUDA-only build. bitsandbytes, the other
candidate, refuses to quantize without a GPU through diffusers, and optimum-quanto is in
maintenance mode.

The text encoders and the VAE are only needed once: every caption and photo is encoded up front,
each encoder moved to the device just for that and back off it afterwards, and then dropped, so
the training steps only ever hold the transformer, the LoRA and the cached tensors.

Torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from selfie_lora.domain.entities import FaceBox
from selfie_lora.errors import TrainingFailedError

if TYPE_CHECKING:
    import torch

    from selfie_lora.adapters.flux.train_loop import TimestepShift, TrainingExample

logger = logging.getLogger(__name__)

MemoryMode = Literal["bf16", "int8", "nf4"]
MemoryModeSetting = Literal["auto", "bf16", "int8", "nf4"]
MEMORY_MODES: tuple[MemoryMode, ...] = get_args(MemoryMode)  # largest first

GIB = 1024**3
# Bytes per base-transformer weight on the device. nf4: 4 bits plus one scale per block of 64,
# itself stored in 8 bits (torchao's double quantization) -> ~0.52; int8: 1 plus a scale per output
# channel. Both rounded up for what stays unquantized (norms, biases, embeddings).
BYTES_PER_WEIGHT: dict[MemoryMode, float] = {"bf16": 2.0, "int8": 1.02, "nf4": 0.56}
# Everything else a training step holds at 1024 px with gradient checkpointing: the activations
# kept per block and one block's recomputation, the fp32 LoRA with its AdamW state, the cached
# latents and text embeddings, the CUDA context and allocator slack. An estimate: bench/gpu-check.sh
# measures the real peak of each mode.
STEP_HEADROOM_BYTES = 6 * GIB
NF4_BLOCK = 64


def memory_needed(mode: MemoryMode, parameter_count: int) -> int:
    """Estimated device bytes a training in ``mode`` needs for a transformer of this size."""
    return int(parameter_count * BYTES_PER_WEIGHT[mode]) + STEP_HEADROOM_BYTES


def choose_memory_mode(*, free_bytes: int | None, parameter_count: int) -> MemoryMode:
    """The least-quantized mode whose estimate fits ``free_bytes`` (None: a CPU, so ``bf16``).

    With nothing fitting, ``nf4``: the smallest chance, and an out-of-memory error that says so.
    """
    if free_bytes is None:
        return "bf16"
    for mode in MEMORY_MODES:
        if memory_needed(mode, parameter_count) <= free_bytes:
            return mode
    return "nf4"


def smaller_mode(mode: str) -> MemoryMode | None:
    """The next, smaller memory mode after ``mode`` (None after ``nf4``)."""
    if mode not in MEMORY_MODES:
        return None
    index = MEMORY_MODES.index(mode)
    return MEMORY_MODES[index + 1] if index + 1 < len(MEMORY_MODES) else None


def out_of_memory_error(exc: BaseException, *, mode: str) -> TrainingFailedError:
    """What to tell when a training in ``mode`` ran out of memory: the mode that may fit."""
    smaller = smaller_mode(mode)
    if smaller is not None:
        advice = (
            f"set SELFIE_LORA_LOCAL_MEMORY_MODE={smaller} (it stores the base model in "
            f"{BYTES_PER_WEIGHT[smaller]:g} bytes per weight instead of "
            f"{BYTES_PER_WEIGHT[mode]:g})"  # type: ignore[index]
        )
    else:
        advice = "use a GPU with more memory or the Replicate backend"
    return TrainingFailedError(
        f"local training ran out of memory in memory mode {mode}: {exc}; {advice}",
        user_message=f"Training ran out of memory on this server (memory mode {mode}); "
        f"the operator should {advice}.",
    )


# --------------------------------------------------------------------------- quantizing


def _linears(module: Any) -> Iterator[tuple[str, Any]]:
    import torch

    for name, child in module.named_modules():
        if type(child) is torch.nn.Linear:
            yield name, child


def _nf4_scaler_block(weight: torch.Tensor) -> int | None:
    """torchao's NF4 needs whole blocks of 64 and whole groups of scales; None: leave unquantized."""
    if weight.numel() % NF4_BLOCK:
        return None
    blocks = weight.numel() // NF4_BLOCK
    # 256 scales per group on real layers; the largest divisor on small (tiny) ones.
    group = math.gcd(256, blocks)
    return group if group >= 2 else None


def quantize_transformer(transformer: Any, *, mode: MemoryMode, device: str) -> int:
    """Move ``transformer`` to ``device``, its linear weights quantized for ``mode``; frozen.

    Layer by layer: each linear goes to the device and is quantized there, so the device never
    holds the unquantized model. Returns the number of linears quantized.
    """
    from selfie_lora.adapters.flux.runtime import loading_models

    # Replaces the linears' weights (and torchao builds tensor subclasses): not while another
    # thread loads a model with torch patched (runtime).
    with loading_models():
        return _quantize_transformer(transformer, mode=mode, device=device)


def _quantize_transformer(transformer: Any, *, mode: MemoryMode, device: str) -> int:
    import torch

    transformer.requires_grad_(False)
    if mode == "bf16":
        transformer.to(device)
        return 0
    count = 0
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        def is_linear(module: Any, _name: str) -> bool:
            return type(module) is torch.nn.Linear

        count = sum(1 for _ in _linears(transformer))
        quantize_(transformer, Int8WeightOnlyConfig(), filter_fn=is_linear, device=device)
        # peft warns that merging a LoRA into these layers needs the quantization config (to
        # re-quantize the sum); we never merge: the LoRA is trained and saved on its own.
        warnings.filterwarnings(
            "ignore", message="TorchaoLoraLinear was instantiated without", category=UserWarning
        )
    elif mode == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        for _name, linear in _linears(transformer):
            weight = linear.weight.detach().to(device)
            group = _nf4_scaler_block(weight)
            if group is None:
                linear.to(device)
                continue
            linear.weight = torch.nn.Parameter(
                to_nf4(weight, block_size=NF4_BLOCK, scaler_block_size=group), requires_grad=False
            )
            count += 1
    else:
        raise ValueError(f"unknown memory mode {mode!r}")
    transformer.to(device)  # the rest: norms, embeddings, biases
    transformer.requires_grad_(False)
    logger.info("base transformer on %s in %s: %d linear layers quantized", device, mode, count)
    return count


def is_quantized(weight: Any) -> bool:
    """Whether a weight is one of torchao's quantized tensors (int8 or nf4)."""
    from torchao.utils import TorchAOBaseTensor

    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor
    except ImportError:  # pragma: no cover - older torchao
        return isinstance(weight, TorchAOBaseTensor)
    return isinstance(weight, (TorchAOBaseTensor, NF4Tensor))


# --------------------------------------------------------------------------- staged loading


def free_device_bytes(device: str) -> int | None:
    """Free memory on a CUDA device, None on a CPU (which has no mode to choose)."""
    if not device.startswith("cuda"):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def release_device_memory(device: str) -> None:
    """Return freed tensors' memory to the device (the caching allocator keeps it otherwise).

    Only a CUDA device has a caching allocator to empty. On the CPU a tensor's memory goes back
    when its last reference does (the pipeline's encoders and VAE are freed by ``del pipe``
    itself: test_memory_modes), and a full collection found nothing to free there but took
    about a second walking every object of a process with torch and diffusers imported, twice
    per training: a third of a tiny model's whole training."""
    if device.startswith("cuda"):
        import torch

        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def on_device(module: Any, device: str) -> Iterator[Any]:
    """Run ``module`` on ``device`` inside the block, then move it back where it was (freeing the
    device memory it took)."""
    home = next(module.parameters()).device
    moved = str(home) != str(device)
    if moved:
        module.to(device)
    try:
        yield module
    finally:
        if moved:
            module.to(home)
            release_device_memory(str(device))


@dataclass
class TrainingBase:
    """The base transformer on its device, in its memory mode, and the photos' cached tensors."""

    transformer: Any
    examples: list[TrainingExample]
    resolution: int
    mode: MemoryMode
    # How the base model's sampler shifts timesteps (a "flux_shift" recipe trains with it).
    timestep_shift: TimestepShift | None = None
    # Kept (on the CPU) only for a run that makes sample images: the VAE decodes them.
    vae: Any = None


def parameters_shown(count: int) -> str:
    """A parameter count as a log line says it: '11.9 B', '2.5 M', '980' (a tiny model's was
    '0.0 B parameters')."""
    if count >= 1e9:
        return f"{count / 1e9:.1f} B"
    if count >= 1e6:
        return f"{count / 1e6:.1f} M"
    return f"{count:,}"


def parameter_count(module: Any) -> int:
    return sum(int(parameter.numel()) for parameter in module.parameters())


def load_training_base(
    pipeline_source: str,
    *,
    cache_dir: Path,
    photos: Sequence[tuple[bytes, str]],
    resolution: int,
    device: str,
    dtype: torch.dtype,
    mode: MemoryModeSetting = "auto",
    photo_names: Sequence[str] | None = None,
    aspect_buckets: bool = False,
    keep_vae: bool = False,
    face_boxes: Sequence[FaceBox | None] | None = None,
    face_loss_weight: float = 1.0,
) -> TrainingBase:
    """Load the pipeline on the CPU, encode photos and captions once (each encoder visiting the
    device only for that), drop the encoders and the VAE, and place the transformer in ``mode``.

    The device's peak is the larger of the text encoders alone and the (quantized) transformer,
    never their sum. With ``keep_vae`` the VAE stays, on the CPU (a FLUX.1 VAE is 0.16 GiB in
    bf16), for the sample images; it visits the device only to decode one.
    """
    from selfie_lora.adapters.flux.loader import load_pipeline
    from selfie_lora.adapters.flux.train_loop import (
        TimestepShift,
        effective_resolution,
        prepare_examples,
    )

    pipe = load_pipeline(pipeline_source, cache_dir=cache_dir, device="cpu", dtype=dtype)
    resolution = effective_resolution(pipe, resolution)
    examples = prepare_examples(
        pipe, photos, resolution=resolution, names=photo_names, device=device, dtype=dtype,
        aspect_buckets=aspect_buckets,
        face_boxes=face_boxes, face_loss_weight=face_loss_weight,
    )
    transformer = pipe.transformer
    timestep_shift = TimestepShift.from_scheduler_config(pipe.scheduler.config)
    vae = pipe.vae if keep_vae else None
    # Only the transformer is needed from here on (on a real FLUX.1, T5-XXL alone is ~9 GiB).
    del pipe
    release_device_memory(device)
    chosen: MemoryMode
    if mode == "auto":
        count = parameter_count(transformer)
        free = free_device_bytes(device)
        chosen = choose_memory_mode(free_bytes=free, parameter_count=count)
        logger.info("memory mode %s chosen: %s parameters, %s", chosen, parameters_shown(count),
                    f"no GPU memory to measure on {device}" if free is None
                    else f"{free / GIB:.1f} GiB free on {device}")
    else:
        chosen = mode
    quantize_transformer(transformer, mode=chosen, device=device)
    release_device_memory(device)
    return TrainingBase(transformer=transformer, examples=examples, resolution=resolution,
                        mode=chosen, timestep_shift=timestep_shift, vae=vae)
