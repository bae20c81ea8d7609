"""Benchmark of the local FLUX LoRA trainer: our loop in each memory mode against a plain loop.

In one run, on the same model, photos, batch, resolution, LoRA rank and target modules:

  (a) ours: the base placed in a memory mode (``flux.memory.quantize_transformer``), photos and
      captions encoded once (``prepare_examples``), then ``train_loop.fit_lora``;
  (b) the plain loop, written the way diffusers' DreamBooth FLUX LoRA example trains (read, not
      copied): the whole pipeline in bf16 on the device, the captions encoded once and the text
      encoders dropped, but the VAE kept on the device and run on every step (``latent_dist.sample``),
      timesteps drawn as scheduler indices from a logit-normal density, the noisy latents packed
      and the prediction unpacked every step, a per-sample mean of the (unit-)weighted MSE.

For each it prints seconds per optimizer step (median after ``--warmup`` steps), the device's peak
memory (on a CPU: the process's peak RSS, for plumbing only), and model FLOPs utilisation: model
FLOPs per step = 6 x N x tokens x batch, N the weights each token passes through (FLUX.1-dev:
6.45e9; image tokens (res/16)^2, plus the T5 tokens: 1,536 at 512 px, 4,608 at 1024), over the
device's dense bf16 peak (``--peak-tflops`` or a table of known GPUs). 6N is the usual convention
(forward 2N, backward 4N); our frozen base skips weight gradients and checkpointing recomputes
the forward, both left out by that convention. Then the ratio ours/plain in bf16.

On a CPU it runs ``tiny`` in seconds (correctness and plumbing, not speed); on a GPU give a FLUX.1
diffusers folder. A benchmark, not a test: it exits 0 unless it could not run.

    .venv/bin/python bench/train_flux.py [--model tiny|PATH] [--steps 8] [--resolution 512 1024:bf16]
        [--modes bf16,int8,nf4] [--no-plain] [--rank 16] [--batch 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "A10G": 70e12,
    "L4": 121e12,
}
PROMPT = "a photo of TOK person"


@dataclass
class Result:
    loop: str
    mode: str
    resolution: int
    steps: int
    seconds_per_step: float
    peak_gib: float | None
    peak_kind: str
    tokens: int
    model_tflops_per_step: float
    mfu: float | None
    first_loss: float
    last_loss: float


# --------------------------------------------------------------------------- measuring


def _photos(count: int, size: int) -> list[tuple[bytes, str]]:
    """Smooth random colour fields with noise: photo-like enough for the VAE, no files needed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = []
    for _ in range(count):
        base = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (size, size, 3)), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buffer, format="JPEG", quality=92)
        photos.append((buffer.getvalue(), PROMPT))
    return photos


class _Meter:
    """Step timestamps and the device's peak memory over one loop."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = device
        self.stamps: list[float] = []
        self.losses: list[float] = []
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def step(self, loss: float) -> None:
        # The loss was read back with float(): the device has finished the step.
        self.stamps.append(time.perf_counter())
        self.losses.append(loss)

    def seconds_per_step(self, warmup: int) -> float:
        times = [self.start, *self.stamps]
        intervals = [b - a for a, b in itertools.pairwise(times)]
        kept = intervals[warmup:] or intervals
        return statistics.median(kept)

    def peak(self) -> tuple[float | None, str]:
        import torch

        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() / 2**30, "device"
        # ru_maxrss is in KiB on Linux: the whole process's peak, not this loop's.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"


def weight_macs_per_token(transformer: Any) -> int:
    """Multiply-accumulates per token per forward: the linear weights one token passes through.

    In a double-stream block a token takes one stream (image-stream weights; the text stream's are
    the same size); in a single-stream block all of them. Modulation linears act once per sample.
    """
    import torch

    total = 0
    for blocks, skip in (
        (transformer.transformer_blocks, ("norm1", "norm1_context", "add_", "to_add_out", "ff_context")),
        (transformer.single_transformer_blocks, ("norm.",)),
    ):
        for block in blocks:
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear) and not any(part in name for part in skip):
                    total += module.in_features * module.out_features
    return total


def _result(
    meter: _Meter, *, loop: str, mode: str, resolution: int, tokens: int, batch: int,
    macs: int, warmup: int, peak_flops: float | None,
) -> Result:
    seconds = meter.seconds_per_step(warmup)
    flops = 6.0 * macs * tokens * batch
    peak, kind = meter.peak()
    return Result(
        loop=loop, mode=mode, resolution=resolution, steps=len(meter.stamps),
        seconds_per_step=seconds, peak_gib=peak, peak_kind=kind, tokens=tokens,
        model_tflops_per_step=flops / 1e12,
        mfu=None if peak_flops is None else flops / seconds / peak_flops,
        first_loss=meter.losses[0], last_loss=meter.losses[-1],
    )


# --------------------------------------------------------------------------- the two loops


def run_ours(
    pipe: Any, examples: Sequence[Any], *, mode: str, recipe: Any, device: str,
    checkpointing: bool,
) -> _Meter:
    from selfie_lora.adapters.flux import memory, train_loop

    transformer = copy.deepcopy(pipe.transformer)  # quantizing is in place: a fresh copy each
    meter = _Meter(device)
    memory.quantize_transformer(transformer, mode=mode, device=device)  # type: ignore[arg-type]

    def on_step(step: int, _total: int, loss: float) -> bool:
        if step > 0:
            meter.step(loss)
        elif step == 0:
            meter.start = time.perf_counter()
        return False

    train_loop.fit_lora(
        transformer, examples, recipe=recipe, seed=recipe.seed, on_step=on_step,
        gradient_checkpointing=checkpointing,
    )
    del transformer
    memory.release_device_memory(device)
    return meter


def run_plain(
    pipe: Any, photos: Sequence[tuple[bytes, str]], examples: Sequence[Any], *, recipe: Any,
    device: str, dtype: Any, resolution: int, checkpointing: bool,
) -> _Meter:
    """diffusers' example's shape of a step; the text embeddings are ours (it too encodes once)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig

    from selfie_lora.adapters.flux import memory, train_loop

    torch.manual_seed(recipe.seed)
    meter = _Meter(device)
    # The pipeline was loaded in the training dtype (bf16 on a GPU), as the example loads it.
    transformer = copy.deepcopy(pipe.transformer).to(device)
    vae = copy.deepcopy(pipe.vae).to(device)
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_rank, init_lora_weights="gaussian",
                   target_modules=train_loop.lora_target_modules(recipe.lora_targets))
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # as the example's cast_training_params under mixed precision
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=1e-4)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pixels = [
        train_loop._image_tensor(train_loop.load_photo(data, resolution=resolution)).to(device, dtype)
        for data, _ in photos
    ]
    shift = float(vae.config.shift_factor or 0.0)
    scale = float(vae.config.scaling_factor)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    meter.start = time.perf_counter()
    for step in range(recipe.steps):
        chosen = [(step * recipe.batch_size + i) % len(pixels) for i in range(recipe.batch_size)]
        batch = torch.cat([pixels[i] for i in chosen])
        prompt = torch.cat([examples[i].prompt_embeds for i in chosen])
        pooled = torch.cat([examples[i].pooled_embeds for i in chosen])
        text_ids = examples[0].text_ids
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample()
        latents = ((latents - shift) * scale).to(dtype)
        b, c, h, w = latents.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(
            weighting_scheme="logit_normal", batch_size=b, logit_mean=0.0, logit_std=1.0
        )
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices].to(device)
        sigmas = scheduler.sigmas.to(device=device, dtype=dtype)[indices].view(b, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        guidance = (
            torch.full((b,), train_loop.TRAIN_GUIDANCE, device=device)
            if transformer.config.guidance_embeds else None
        )
        prediction = transformer(
            hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=prompt, txt_ids=text_ids,
            img_ids=image_ids, return_dict=False,
        )[0]
        prediction = FluxPipeline._unpack_latents(
            prediction, height=h * vae_factor, width=w * vae_factor, vae_scale_factor=vae_factor
        )
        target = noise - latents
        loss = ((prediction.float() - target.float()) ** 2).reshape(b, -1).mean(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        meter.step(loss.detach().item())
    del transformer, vae, optimizer
    memory.release_device_memory(device)
    return meter


# --------------------------------------------------------------------------- main


def _peak_flops(device: str, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> list[Result]:
    import torch

    from selfie_lora.adapters.flux import train_loop
    from selfie_lora.adapters.flux.loader import (
        default_dtype,
        load_pipeline,
        resolve_device,
        text_max_length,
        torch_threads,
    )
    from selfie_lora.adapters.flux.tiny import TINY
    from selfie_lora.domain.recipes import default_local_trainer_version, get_recipe

    device = resolve_device(args.device)
    dtype = default_dtype(device)
    tiny = args.model == TINY
    cache_dir = Path(args.cache_dir)
    # The recipe a new model trains with (its timestep shift and module set), at this run's size.
    recipe = get_recipe(default_local_trainer_version(args.model))
    recipe = replace(recipe, steps=args.steps, lora_rank=args.rank, batch_size=args.batch,
                     lora_targets=args.targets or recipe.lora_targets)
    checkpointing = device.startswith("cuda") and not tiny
    peak_flops = _peak_flops(device, args.peak_tflops)
    results: list[Result] = []
    with torch_threads(args.threads if device == "cpu" else None):
        loaded = time.perf_counter()
        pipe = load_pipeline(args.model, cache_dir=cache_dir, device="cpu", dtype=dtype)
        out(f"recipe {recipe.name}: rank {recipe.lora_rank}, {recipe.lora_targets}, "
            f"timesteps {recipe.timestep_sampling}, batch {recipe.batch_size}")
        out(f"model {args.model} loaded on the CPU in {time.perf_counter() - loaded:.1f} s; "
            f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device != "cpu" else ""))
        macs = weight_macs_per_token(pipe.transformer)
        for spec in args.resolution:
            # "512" runs every mode of --modes; "1024:bf16" only those named.
            size, _, only = spec.partition(":")
            modes = [m for m in (only or args.modes).split(",") if m]
            resolution = train_loop.effective_resolution(pipe, int(size))
            photos = _photos(args.photos, resolution)
            examples = train_loop.prepare_examples(
                pipe, photos, resolution=resolution, device=device, dtype=dtype
            )
            tokens = (resolution // (pipe.vae_scale_factor * 2)) ** 2 + text_max_length(pipe)
            common = {"resolution": resolution, "tokens": tokens, "batch": args.batch,
                      "macs": macs, "warmup": args.warmup, "peak_flops": peak_flops}
            for mode in modes:
                meter = run_ours(pipe, examples, mode=mode, recipe=recipe, device=device,
                                 checkpointing=checkpointing)
                results.append(_result(meter, loop="ours", mode=mode, **common))
                out(_line(results[-1]))
            if args.plain:
                meter = run_plain(pipe, photos, examples, recipe=recipe, device=device,
                                  dtype=dtype, resolution=resolution, checkpointing=checkpointing)
                results.append(_result(meter, loop="plain", mode="bf16", **common))
                out(_line(results[-1]))
            del examples
    for ratio in ratios(results):
        out(ratio)
    return results


def ratios(results: Sequence[Result]) -> list[str]:
    lines = []
    for plain in (r for r in results if r.loop == "plain"):
        ours = next((r for r in results if r.loop == "ours" and r.mode == "bf16"
                     and r.resolution == plain.resolution), None)
        if ours is not None:
            lines.append(f"ratio ours/plain at {plain.resolution} px (bf16): "
                         f"{ours.seconds_per_step / plain.seconds_per_step:.2f}x s/step")
    return lines


def _line(r: Result) -> str:
    peak = "-" if r.peak_gib is None else f"{r.peak_gib:.2f} GiB {r.peak_kind}"
    mfu = "-" if r.mfu is None or not math.isfinite(r.mfu) else f"{100 * r.mfu:.3g}%"
    return (f"{r.loop:5s} {r.mode:4s} {r.resolution:5d} px  {r.seconds_per_step:.4f} s/step  "
            f"peak {peak}  MFU {mfu}  ({r.model_tflops_per_step:.3g} TFLOP/step, {r.tokens} tokens, "
            f"{r.steps} steps, loss {r.first_loss:.4f} -> {r.last_loss:.4f})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or a FLUX.1 diffusers folder")
    parser.add_argument("--cache-dir", default=str(ROOT / ".selfie-lora" / "cache"),
                        help="where the tiny model is built")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of s/step")
    parser.add_argument("--resolution", nargs="+", default=None,
                        help="one or more, each optionally with its own modes: 512 1024:bf16 "
                        "(default: 64 for tiny, 512 otherwise)")
    parser.add_argument("--modes", default="bf16,int8,nf4")
    parser.add_argument("--no-plain", dest="plain", action="store_false",
                        help="skip the plain diffusers-example loop")
    parser.add_argument("--targets", choices=("attention", "all_linear"), default=None,
                        help="the LoRA's modules (a recipe's lora_targets), in both loops; "
                        "default: the recipe a new model trains with (v2: all_linear)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU (default: known GPUs)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = ["64" if args.model == "tiny" else "512"]
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
