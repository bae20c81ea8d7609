"""Sample images during a local training: one picture with the LoRA trained so far, every
``recipe.sample_every`` steps, so a person can watch the likeness appear (and stop a run that
goes wrong) before the finished version is scored.

Each sample is made the same way, so two samples differ only by what training changed:

* the prompt is the first training caption (it holds the trigger word), already encoded for
  training;
* the starting noise is drawn once, before the first step, from a generator of its own seeded by
  the recipe's seed: sampling never draws from the training's generator, so a run with samples
  trains exactly the LoRA a run without them does;
* FLUX's Euler flow-matching sampler, written out on the transformer: sigmas from 1 to 0 with the
  resolution-dependent shift ``FluxPipeline`` applies (``calculate_shift`` on the image's token
  count, then the scheduler's exponential time shift), ``x += (sigma_next - sigma) * v``;
* guidance as the pipeline uses it for the model: FLUX.1-dev (and ``tiny``, built like it) embed
  a guidance of 3.5, a model without the embedding gets none;
* the VAE (kept on the CPU and visiting the device only to decode, as the encoders do) undoes
  FLUX's ``shift_factor``/``scaling_factor`` and decodes at the training resolution to a JPEG.

Torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfie_lora.services.private_files import private_folders, private_replacement

if TYPE_CHECKING:
    import torch

    from selfie_lora.adapters.flux.train_loop import TimestepShift, TrainingExample

# Euler steps per sample: FluxPipeline's quality needs ~20-28 on a FLUX.1; tiny's random weights
# show nothing more with more steps, and the generator renders tiny with 4 as well.
SAMPLE_STEPS = 20
TINY_SAMPLE_STEPS = 4
# FluxPipeline's default guidance_scale, what FLUX.1-dev is sampled with.
SAMPLE_GUIDANCE = 3.5
JPEG_QUALITY = 90


def sample_file(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.jpg"


def flux_sigmas(steps: int, *, image_tokens: int, shift: TimestepShift) -> list[float]:
    """The sigmas ``FluxPipeline`` samples ``steps`` steps with, then 0: ``linspace(1, 1/steps)``
    moved by the base model's timestep shift for ``image_tokens`` tokens (the shift a
    ``flux_shift`` recipe trains with)."""
    import torch

    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return [*shift.apply(base, image_tokens=image_tokens).tolist(), 0.0]


@dataclass
class Sampler:
    """Makes the sample images of one run: a fixed prompt, fixed noise, a fixed schedule."""

    vae: Any  # kept on the CPU between samples
    example: TrainingExample  # the first photo's caption embeddings (and device, dtype)
    noise: torch.Tensor  # packed, (1, image_tokens, 4 * latent_channels), on the CPU
    image_ids: torch.Tensor
    sigmas: list[float]
    resolution: int
    vae_scale_factor: int
    folder: Path

    @classmethod
    def create(cls, *, vae: Any, example: TrainingExample, transformer: Any,
               shift: TimestepShift, resolution: int, seed: int, steps: int,
               folder: Path) -> Sampler:
        """Draw the noise (from ``seed``, a generator of its own) and the schedule, for square
        pictures at ``resolution`` (the training resolution, already a multiple of 16)."""
        import torch
        from diffusers import FluxPipeline

        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        side = resolution // scale  # latent pixels, even: FLUX packs 2x2 patches
        tokens = (side // 2) ** 2
        channels = int(transformer.config.in_channels)  # already 4 x the VAE's channels
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, tokens, channels), generator=generator)
        device, dtype = example.latents.device, example.latents.dtype
        image_ids = FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, device, dtype)
        return cls(vae=vae, example=example, noise=noise, image_ids=image_ids,
                   sigmas=flux_sigmas(steps, image_tokens=tokens, shift=shift),
                   resolution=resolution, vae_scale_factor=scale, folder=folder)

    def latents(self, transformer: Any) -> torch.Tensor:
        """Denoise the fixed noise with ``transformer`` as it is now (packed latents)."""
        import torch

        e = self.example
        x = self.noise.to(device=e.latents.device, dtype=e.latents.dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((1,), SAMPLE_GUIDANCE, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            for sigma, next_sigma in zip(self.sigmas, self.sigmas[1:], strict=False):
                velocity = transformer(
                    hidden_states=x,
                    encoder_hidden_states=e.prompt_embeds[:1],
                    pooled_projections=e.pooled_embeds[:1],
                    timestep=torch.full((1,), sigma, device=x.device, dtype=x.dtype),
                    img_ids=self.image_ids,
                    txt_ids=e.text_ids,
                    guidance=guidance,
                    return_dict=False,
                )[0]
                # Euler in float32: the update is small next to x in bf16.
                x = (x.float() + (next_sigma - sigma) * velocity.float()).to(x.dtype)
        return x

    def decode(self, latents: torch.Tensor) -> Any:
        """Packed latents -> an RGB PIL image at the training resolution."""
        import numpy as np
        import torch
        from diffusers import FluxPipeline
        from PIL import Image

        from selfie_lora.adapters.flux.memory import on_device

        device = str(latents.device)
        vae = self.vae
        shift = float(vae.config.shift_factor or 0.0)
        scale = float(vae.config.scaling_factor)
        unpacked = FluxPipeline._unpack_latents(latents, self.resolution, self.resolution,
                                                self.vae_scale_factor)
        with torch.no_grad(), on_device(vae, device):
            pixels = vae.decode((unpacked / scale + shift).to(vae.dtype), return_dict=False)[0]
        array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy()))

    def write(self, transformer: Any, step: int) -> Path:
        """The sample after ``step`` steps, as a JPEG in the run's folder (written whole, then
        renamed into place: the parent may read it as soon as it hears of it)."""
        image = self.decode(self.latents(transformer))
        private_folders(self.folder)
        path = sample_file(self.folder, step)
        # A picture of the person's face: 0600, whatever the umask and HOME's mode. A full disk
        # leaves no half file taking room.
        with private_replacement(path) as fh:
            image.save(fh, format="JPEG", quality=JPEG_QUALITY)
        return path
