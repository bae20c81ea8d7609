"""Train a FLUX.1 LoRA on a handful of captioned photos: a self-contained training loop.

The recipe follows what FLUX LoRA trainers do (diffusers' DreamBooth FLUX example, ai-toolkit):

* each photo is center-cropped and resized to the recipe's resolution (with ``aspect_buckets``:
  to the size of its nearest aspect-ratio bucket, ``domain.buckets``, cropping only the sliver
  the aspects differ by), encoded once by the VAE (FLUX's ``shift_factor``/``scaling_factor``
  applied) and packed into 2x2 patches; with buckets, a batch holds photos of one bucket only;
* each caption is encoded once by CLIP (pooled) and T5 (sequence), without gradients;
* rectified flow matching: ``t ~ sigmoid(N(0, 1))`` (logit-normal), with
  ``recipe.timestep_sampling == "flux_shift"`` then shifted towards noise by FLUX's
  resolution-dependent shift (:class:`TimestepShift`), ``x_t = (1 - t) x0 + t noise``, the
  transformer predicts the velocity ``noise - x0`` under an MSE loss, weighted toward the face
  when the recipe's ``face_loss_weight`` is above 1 and the intake found the photo's face
  (:func:`face_token_weights`: a masked loss);
* a LoRA (rank ``recipe.lora_rank``, alpha ``recipe.alpha``: the rank unless the recipe says) on
  the modules ``recipe.lora_targets`` names (:func:`lora_target_modules`) is the only thing trained
  (AdamW, fp32 LoRA parameters even when the base runs in bf16).

Everything random draws from generators seeded by ``recipe.seed``, so the same photos, captions,
base model and recipe give the same LoRA on the same device. The result is saved in diffusers'
layout, in bf16, with one ``<module>.alpha`` tensor per LoRA module (see :func:`save_lora`), and
loads back with ``load_lora_weights``.

Torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfie_lora.adapters.flux import checkpoints
from selfie_lora.adapters.flux.loader import (
    check_base_folder,
    default_dtype,
    refuse_untrainable_base,
    resolve_device,
    text_max_length,
    torch_threads,
)
from selfie_lora.adapters.flux.memory import (
    MemoryModeSetting,
    TrainingBase,
    load_training_base,
    out_of_memory_error,
)
from selfie_lora.adapters.flux.runtime import (
    FAILED_MESSAGE,
    loading_models,
    missing_module_error,
    require_torch,
)
from selfie_lora.adapters.flux.tiny import TINY
from selfie_lora.disk_space import is_full_error, is_quota_error, machine_disk_words
from selfie_lora.domain.buckets import FLUX_MULTIPLE, Bucket, bucket_sizes, nearest_bucket
from selfie_lora.domain.entities import FaceBox, Recipe
from selfie_lora.errors import (
    SelfieLoraError,
    StorageError,
    StorageFullError,
    TrainingCanceledError,
    TrainingFailedError,
    describe,
)
from selfie_lora.services.private_files import private_folders, private_replacement

if TYPE_CHECKING:
    import torch

    from selfie_lora.adapters.flux.samples import Sampler

logger = logging.getLogger(__name__)

# The attention projections of FLUX's double- and single-stream blocks (``to_out.0`` exists only in
# the double-stream ones). The usual person-LoRA target set: enough to learn a face, small to store.
LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
# Every linear layer of both streams inside the transformer blocks, as ai-toolkit (and so
# Replicate's trainer) and the diffusers FLUX example's widest set train: the image stream's
# attention and MLP, the text stream's (``add_*_proj``, ``to_add_out``, ``ff_context``) and the single
# blocks' fused ones (``proj_mlp``, ``proj_out``). A regular expression, so that the model-level
# ``proj_out`` (the final layer) is not matched. Left out, as kohya sd-scripts leaves them out by
# default: the modulation linears (``norm*.linear``), which are 6x wide and steer every token
# from the timestep alone, and the embedders.
LORA_ALL_LINEAR = (
    r".*(?:^|\.)(?:transformer_blocks|single_transformer_blocks)\.\d+\."
    r"(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2"
    r"|proj_mlp|proj_out)"
)
# FLUX.1-dev was guidance-distilled; LoRA trainers (ai-toolkit, Replicate's) train at guidance 1.
TRAIN_GUIDANCE = 1.0
METADATA_PREFIX = "selfie_lora."

# (step, total, loss) -> True to cancel. Step 0 (loss NaN) is reported once the model is loaded
# (on a resumed run: the checkpoint's step).
StepCallback = Callable[[int, int, float], bool]
# (checkpoint file, step): a checkpoint was written (the file stays until two newer ones exist).
CheckpointCallback = Callable[[Path, int], None]
# (JPEG file, step): a sample image was made with the LoRA after that step (the file stays).
SampleCallback = Callable[[Path, int], None]


@dataclass(frozen=True)
class TrainingExample:
    """One photo, ready for the transformer: packed clean latents and its caption's embeddings."""

    latents: torch.Tensor  # (1, image_tokens, 4 * latent_channels)
    image_ids: torch.Tensor  # (image_tokens, 3)
    prompt_embeds: torch.Tensor  # (1, text_tokens, joint_attention_dim)
    pooled_embeds: torch.Tensor  # (1, pooled_projection_dim)
    text_ids: torch.Tensor  # (text_tokens, 3)
    # Per-token loss weights, mean 1 over the photo: (1, image_tokens, 1); None: uniform.
    loss_weights: torch.Tensor | None = None


# --------------------------------------------------------------------------- data


def load_photo(data: bytes, *, resolution: int, name: str = "photo",
               buckets: Sequence[Bucket] = ()) -> Any:
    """Decode a photo, center-crop it to a square and resize it to ``resolution`` (RGB PIL image);
    with ``buckets``, to the size of the bucket nearest its aspect instead (the intake stores
    photos at their bucket's size already: then nothing is cropped or resized)."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "WEBP"])
            image.load()
    except Exception as exc:
        raise TrainingFailedError(
            f"cannot decode training photo {name}: {exc}",
            user_message=f"The photo {name} could not be read; upload it again as a JPEG or PNG.",
        ) from exc
    rgb = ImageOps.exif_transpose(image).convert("RGB")
    if buckets:
        bucket = nearest_bucket(rgb.width, rgb.height, tuple(buckets))
        return ImageOps.fit(rgb, (bucket.width, bucket.height), method=Image.Resampling.LANCZOS)
    return ImageOps.fit(rgb, (resolution, resolution), method=Image.Resampling.LANCZOS)


def photo_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the photo :func:`load_photo` decodes (EXIF orientation applied), read
    from its header only."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        # Orientations 5 to 8 turn the photo a quarter: exif_transpose swaps its sides.
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def training_face_box(box: FaceBox, *, photo_size: tuple[int, int],
                      target_size: tuple[int, int] | None = None) -> FaceBox | None:
    """Where ``box`` (fractions of a photo of ``photo_size``) lies in the image
    :func:`load_photo` makes of it at ``target_size`` (width, height; default a square): the
    centred crop of that aspect cut from it (``ImageOps.fit``'s crop), resized. A photo the intake
    stored at its bucket's size has the target's aspect already: its box is unchanged. None when
    the face is wholly outside the crop."""
    width, height = photo_size
    target_w, target_h = target_size or (1, 1)
    aspect = target_w / target_h
    crop_w, crop_h = (height * aspect, height) if width / height > aspect else (width, width / aspect)
    left, top = (width - crop_w) / 2, (height - crop_h) / 2

    def clip(v: float) -> float:
        return min(1.0, max(0.0, v))

    x0, x1 = (clip((v * width - left) / crop_w) for v in (box[0], box[2]))
    y0, y1 = (clip((v * height - top) / crop_h) for v in (box[1], box[3]))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def face_token_weights(box: FaceBox, *, rows: int, cols: int, weight: float) -> torch.Tensor:
    """Loss weights of a photo's packed latent tokens (``rows`` x ``cols``, row-major like
    ``_pack_latents``), float32, shape (rows * cols,): ``weight`` inside ``box`` (fractions of
    the image), 1 outside, and for a token on the box's edge in proportion to the share of its
    area the box covers, so a small face still counts for what it is; then scaled to mean 1, so
    the learning rate means what it meant for the unweighted loss."""
    import torch

    def covered(low: float, high: float, count: int) -> torch.Tensor:
        # The share of each token's span [i, i + 1) that [low, high) covers, in token units.
        start = torch.arange(count, dtype=torch.float64)
        overlap = torch.minimum(start + 1, torch.tensor(high * count, dtype=torch.float64)) - \
            torch.maximum(start, torch.tensor(low * count, dtype=torch.float64))
        return overlap.clamp(min=0.0, max=1.0)

    coverage = torch.outer(covered(box[1], box[3], rows), covered(box[0], box[2], cols))
    weights = 1.0 + (weight - 1.0) * coverage
    return (weights / weights.mean()).flatten().to(torch.float32)


def _image_tensor(image: Any) -> torch.Tensor:
    """PIL RGB -> float tensor (1, 3, H, W) in [-1, 1], the range the VAE expects."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def effective_resolution(pipe: Any, resolution: int) -> int:
    """Round down to what FLUX can pack: a multiple of the VAE factor times the 2x2 patch."""
    multiple = int(pipe.vae_scale_factor) * 2
    rounded = max(multiple, resolution // multiple * multiple)
    if rounded != resolution:
        logger.info("resolution %d rounded down to %d (a multiple of %d)", resolution, rounded, multiple)
    return rounded


def prepare_examples(
    pipe: Any,
    photos: Sequence[tuple[bytes, str]],
    *,
    resolution: int,
    names: Sequence[str] | None = None,
    device: Any = None,
    dtype: torch.dtype | None = None,
    aspect_buckets: bool = False,
    face_boxes: Sequence[FaceBox | None] | None = None,
    face_loss_weight: float = 1.0,
) -> list[TrainingExample]:
    """Encode every caption (CLIP + T5) and photo (VAE) once, without gradients.

    With ``aspect_buckets`` each photo is encoded at its nearest bucket's size (at about
    ``resolution**2`` pixels, sides a multiple of what the pipeline packs), so examples differ in
    their token count and ``image_ids``; else every photo is a ``resolution`` square.

    With ``face_loss_weight`` above 1, a photo whose ``face_boxes`` entry (fractions of the photo,
    aligned with ``photos``) is not None gets :func:`face_token_weights`; the others, and every
    photo at weight 1, get none (the unweighted loss, unchanged).

    The tensors are made for a transformer on ``device`` in ``dtype`` (default: where and what
    ``pipe.transformer`` is). Encoders held elsewhere (the CPU, when the pipeline was loaded there
    to save device memory) visit ``device`` one at a time, only while they encode: the text
    encoders first, then the VAE. Uses the VAE's mean (not a sample), so the latents are
    deterministic.
    """
    import torch
    from diffusers import FluxPipeline

    from selfie_lora.adapters.flux.memory import on_device

    if face_boxes is not None and len(face_boxes) != len(photos):
        raise ValueError(f"{len(face_boxes)} face boxes for {len(photos)} photos")
    device = torch.device(device) if device is not None else pipe.transformer.device
    dtype = dtype if dtype is not None else pipe.transformer.dtype
    resolution = effective_resolution(pipe, resolution)
    buckets = (bucket_sizes(resolution, multiple=int(pipe.vae_scale_factor) * 2)
               if aspect_buckets else ())
    max_len = text_max_length(pipe)
    prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad(), on_device(pipe.text_encoder, device), on_device(pipe.text_encoder_2, device):
        for _data, caption in photos:
            if caption not in prompt_cache:
                prompt_embeds, pooled, text_ids = pipe.encode_prompt(
                    prompt=caption, prompt_2=None, device=device, max_sequence_length=max_len
                )
                prompt_cache[caption] = (prompt_embeds.to(dtype), pooled.to(dtype), text_ids.to(dtype))
    vae = pipe.vae
    shift = float(vae.config.shift_factor or 0.0)
    scale = float(vae.config.scaling_factor)
    examples: list[TrainingExample] = []
    with torch.no_grad(), on_device(vae, device):
        for index, (data, caption) in enumerate(photos):
            name = names[index] if names is not None else f"#{index + 1}"
            pixels = _image_tensor(
                load_photo(data, resolution=resolution, name=name, buckets=buckets))
            pixels = pixels.to(device=device, dtype=vae.dtype)
            latents = vae.encode(pixels).latent_dist.mode()
            latents = ((latents - shift) * scale).to(dtype)
            batch, channels, height, width = latents.shape
            packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
            image_ids = FluxPipeline._prepare_latent_image_ids(
                batch, height // 2, width // 2, device, dtype
            )
            prompt_embeds, pooled, text_ids = prompt_cache[caption]
            box = face_boxes[index] if face_boxes is not None and face_loss_weight != 1.0 else None
            if box is not None:
                box = training_face_box(box, photo_size=photo_size(data),
                                        target_size=(pixels.shape[-1], pixels.shape[-2]))
            weights = None
            if box is not None:
                weights = face_token_weights(box, rows=height // 2, cols=width // 2,
                                             weight=face_loss_weight).to(device).view(1, -1, 1)
            examples.append(
                TrainingExample(
                    latents=packed,
                    image_ids=image_ids,
                    prompt_embeds=prompt_embeds,
                    pooled_embeds=pooled,
                    text_ids=text_ids,
                    loss_weights=weights,
                )
            )
    return examples


# --------------------------------------------------------------------------- objective


def _batch(examples: Sequence[TrainingExample]) -> TrainingExample:
    import torch

    first = examples[0]
    if len(examples) == 1:
        return first
    if any(not torch.equal(e.image_ids, first.image_ids) for e in examples[1:]):
        # Two buckets can have as many tokens (48x80 and 80x48): the positions tell them apart.
        raise ValueError("a batch mixes image sizes; batches are drawn from one bucket")
    weights = None
    if any(e.loss_weights is not None for e in examples):
        # A photo without a face box weighs each token alike (ones: its mean is 1 too).
        weights = torch.cat([
            e.loss_weights if e.loss_weights is not None
            else torch.ones((1, e.latents.shape[1], 1), device=e.latents.device)
            for e in examples
        ])
    return TrainingExample(
        latents=torch.cat([e.latents for e in examples]),
        image_ids=first.image_ids,  # same size, so the same positions
        prompt_embeds=torch.cat([e.prompt_embeds for e in examples]),
        pooled_embeds=torch.cat([e.pooled_embeds for e in examples]),
        text_ids=first.text_ids,  # T5 is padded to a fixed length; FLUX's text ids are zeros
        loss_weights=weights,
    )


def flow_matching_loss(
    transformer: Any,
    batch: TrainingExample,
    *,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity ``noise - x0`` at ``sigmas``;
    with ``weights`` (per token: (batch, image_tokens, 1)), its weighted mean over tokens and
    channels. Without them, exactly the plain mean."""
    import torch

    x0 = batch.latents
    size = x0.shape[0]
    t = sigmas.to(device=x0.device, dtype=x0.dtype).view(size, 1, 1)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    noisy = (1.0 - t) * x0 + t * noise
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((size,), TRAIN_GUIDANCE, device=x0.device, dtype=x0.dtype)
    prediction = transformer(
        hidden_states=noisy,
        encoder_hidden_states=batch.prompt_embeds,
        pooled_projections=batch.pooled_embeds,
        # The transformer scales by 1000 itself; the pipeline passes sigmas in [0, 1] too.
        timestep=t.view(size),
        img_ids=batch.image_ids,
        txt_ids=batch.text_ids,
        guidance=guidance,
        return_dict=False,
    )[0]
    target = noise - x0
    if weights is None:
        return torch.nn.functional.mse_loss(prediction.float(), target.float())
    squared: torch.Tensor = (prediction.float() - target.float()) ** 2
    weights = weights.to(device=squared.device, dtype=squared.dtype)
    return (squared * weights).sum() / (weights.sum() * squared.shape[-1])


def bucket_key(example: TrainingExample) -> tuple[int, int]:
    """The latent grid (rows, columns of 2x2 patches) of an example: equal for examples of one
    bucket, different for different buckets (even of the same token count)."""
    ids = example.image_ids
    return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1


def bucket_label(key: tuple[int, int]) -> str:
    """A bucket key as the pixel size it was encoded at (FLUX packs 16 pixels a patch)."""
    return f"{key[1] * FLUX_MULTIPLE}x{key[0] * FLUX_MULTIPLE}"


def bucket_epoch(keys: Sequence[Hashable], *, batch_size: int,
                 generator: torch.Generator) -> list[int]:
    """One epoch's order for bucketed batches, to be drawn from its end by :func:`draw_batch`:
    every example once, in seeded order, grouped into runs of up to ``batch_size`` examples of
    one bucket (``keys[i]`` is example i's bucket), the runs in seeded order too."""
    import torch

    groups: dict[Hashable, list[int]] = {}
    for index in torch.randperm(len(keys), generator=generator).tolist():
        groups.setdefault(keys[index], []).append(index)
    runs = [group[at:at + batch_size] for group in groups.values()
            for at in range(0, len(group), batch_size)]
    flat = [index for run in torch.randperm(len(runs), generator=generator).tolist()
            for index in runs[run]]
    return flat[::-1]


def draw_batch(order: list[int], *, keys: Sequence[Hashable], batch_size: int,
               generator: torch.Generator) -> list[int]:
    """The next batch of bucketed training: up to ``batch_size`` indices of one bucket, taken
    from the end of ``order`` (a new :func:`bucket_epoch` when it is empty). A batch never
    crosses an epoch, so every photo is seen once per epoch. ``order`` is what a checkpoint
    saves: the same ``order`` and generator state draw the same batches."""
    if not order:
        order.extend(bucket_epoch(keys, batch_size=batch_size, generator=generator))
    indices = [order.pop()]
    while order and len(indices) < batch_size and keys[order[-1]] == keys[indices[0]]:
        indices.append(order.pop())
    return indices


@dataclass(frozen=True)
class TimestepShift:
    """FLUX's timestep shift: ``t' = e^mu / (e^mu + 1/t - 1)`` moves timesteps towards noise, by
    more the more image tokens there are (``mu`` grows linearly from ``base_shift`` at
    ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len``), because a larger image keeps more
    of its structure at the same noise level. FLUX's sampler shifts so; a trainer that does not
    trains mostly at timesteps the sampler spends little time in (SimpleTuner's
    ``flux_schedule_auto_shift``). A scheduler without dynamic shifting (FLUX.1-schnell's) shifts
    by its fixed ``shift`` at every size: ``mu = ln(shift)``.

    The defaults are FLUX.1-dev's scheduler settings.
    """

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    dynamic: bool = True
    shift: float = 3.0  # FLUX.1-dev's config names it; with dynamic shifting it is not used

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> TimestepShift:
        """The shift a pipeline's ``FlowMatchEulerDiscreteScheduler`` samples with."""
        default = cls()
        return cls(
            base_seq_len=int(config.get("base_image_seq_len") or default.base_seq_len),
            max_seq_len=int(config.get("max_image_seq_len") or default.max_seq_len),
            base_shift=float(config.get("base_shift") or default.base_shift),
            max_shift=float(config.get("max_shift") or default.max_shift),
            dynamic=bool(config.get("use_dynamic_shifting", default.dynamic)),
            shift=float(config.get("shift") or default.shift),
        )

    def mu(self, image_tokens: int) -> float:
        if not self.dynamic:
            return math.log(self.shift)
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (image_tokens - self.base_seq_len)

    def apply(self, sigmas: torch.Tensor, *, image_tokens: int) -> torch.Tensor:
        """``sigmas`` (in (0, 1)) shifted for an image of ``image_tokens`` packed tokens."""
        factor = math.exp(self.mu(image_tokens))
        return factor * sigmas / (1.0 + (factor - 1.0) * sigmas)


def sample_sigmas(
    size: int,
    *,
    generator: torch.Generator,
    shift: TimestepShift | None = None,
    image_tokens: int = 0,
) -> torch.Tensor:
    """Logit-normal timesteps (SD3/FLUX trainers): most weight on the middle of the path; with
    ``shift``, moved as FLUX's sampler moves them for an image of ``image_tokens`` tokens. The
    shift draws nothing, so a run's random stream is the same with it and without it."""
    import torch

    sigmas = torch.sigmoid(torch.randn(size, generator=generator))
    return sigmas if shift is None else shift.apply(sigmas, image_tokens=image_tokens)


def evaluate_loss(
    transformer: Any,
    examples: Sequence[TrainingExample],
    *,
    seed: int = 1234,
    samples_per_example: int = 4,
) -> float:
    """The mean flow-matching loss over fixed timesteps and noise (drawn from ``seed``).

    Unlike the per-step training losses, two calls with the same seed see the same ``t`` and noise,
    so comparing before and after training measures what training changed.

    Unweighted even when the examples carry face weights: the figure is kept with the version and
    compared across trainings, whose recipes may weight the face differently or not at all, so
    it must measure every photo's pixels the same way.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    # Evenly spread timesteps (midpoints), the same for every example, then per-sample noise.
    sigmas = (torch.arange(samples_per_example, dtype=torch.float32) + 0.5) / samples_per_example
    total = 0.0
    count = 0
    with torch.no_grad():
        for example in examples:
            for sigma in sigmas:
                noise = torch.randn(example.latents.shape, generator=generator)
                loss = flow_matching_loss(
                    transformer, example, sigmas=sigma.view(1), noise=noise
                )
                total += float(loss)
                count += 1
    return total / max(count, 1)


# --------------------------------------------------------------------------- LoRA


def lora_target_modules(targets: str = "attention") -> list[str] | str:
    """peft's ``target_modules`` for a recipe's ``lora_targets``: a list of module-name suffixes,
    or a regular expression that must match a module's whole name."""
    if targets == "attention":
        return list(LORA_TARGET_MODULES)
    if targets == "all_linear":
        return LORA_ALL_LINEAR
    raise ValueError(f"unknown LoRA target set {targets!r}")


def lora_config(rank: int, alpha: int | None = None, *, targets: str = "attention") -> Any:
    from peft import LoraConfig

    # alpha = rank by default: a scale of 1 at generation time means "the LoRA as trained".
    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=lora_target_modules(targets),
        init_lora_weights="gaussian",
    )


def add_lora(
    transformer: Any, *, rank: int, seed: int, alpha: int | None = None, targets: str = "attention"
) -> Any:
    """Freeze the transformer and add a trainable LoRA on ``targets`` (a recipe's
    ``lora_targets``; seeded init, fp32 parameters)."""
    import torch

    transformer.requires_grad_(False)
    config = lora_config(rank, alpha, targets=targets)
    device = transformer.device
    # On a GPU the LoRA matrices are initialised with the CUDA generator: fork and seed it too.
    devices = [device.index or 0] if device.type == "cuda" else []
    # peft builds the LoRA layers and initialises them through torch.nn.init: not while another
    # thread loads a model with those patched (runtime).
    with loading_models(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    for parameter in transformer.parameters():
        if parameter.requires_grad:
            # AdamW on bf16 parameters loses small updates; keep the trained ones in fp32.
            parameter.data = parameter.data.float()
    return config


def lora_alphas(transformer: Any, *, adapter: str = "default") -> dict[str, float]:
    """Each LoRA module's alpha (module name -> alpha), as peft applies it: ``alpha_pattern``
    resolved, so the file says what the trained model did."""
    alphas: dict[str, float] = {}
    for name, module in transformer.named_modules():
        module_alpha = getattr(module, "lora_alpha", None)
        if isinstance(module_alpha, dict) and adapter in module_alpha:
            alphas[name] = float(module_alpha[adapter])
    return alphas


def save_lora(
    transformer: Any,
    *,
    config: Any,
    out_path: Path,
    extra_metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write the LoRA in diffusers' layout (``transformer.<module>.lora_A/lora_B.weight``), in bf16
    unless ``dtype`` says otherwise, with a ``transformer.<module>.alpha`` tensor for each module,
    plus our metadata keys.

    The alpha tensors are what ComfyUI and kohya readers apply (``alpha / rank``); they ignore
    metadata, so an alpha that differs from the rank would otherwise be applied at the wrong
    strength. diffusers reads them as network alphas, and refuses a file that has both them and
    its ``lora_adapter_metadata`` ("Both `network_alphas` and `metadata` cannot be specified"),
    so that metadata is not written: diffusers then takes each module's rank from the shapes and
    its alpha from the tensors. The alphas are fp32 scalars: peft divides the tensor by the rank
    as it is, and a bf16 alpha (8 / 3 computed in bf16) would change the LoRA's strength.

    ``config`` (the trained LoraConfig) names the adapter; the alphas come from the layers. The file
    appears atomically: it is written next to ``out_path`` and renamed into place.
    """
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    adapter = "default"
    state_dict = get_peft_model_state_dict(transformer, adapter_name=adapter)
    save_dtype = torch.bfloat16 if dtype is None else dtype
    tensors = {
        f"transformer.{key}": value.detach().to(device="cpu", dtype=save_dtype).contiguous()
        for key, value in state_dict.items()
    }
    alphas = lora_alphas(transformer, adapter=adapter)
    for key in state_dict:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            alpha = alphas.get(module, float(config.lora_alpha))
            tensors[f"transformer.{module}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    metadata = {"format": "pt"}
    for key, value in (extra_metadata or {}).items():
        metadata[METADATA_PREFIX + key] = str(value)
    private_folders(out_path.parent)
    # Serialized in memory (a LoRA is megabytes) and written by Python: a full disk is then
    # an OSError, where safetensors' own file writer raises its SafetensorError.
    data = save(tensors, metadata=metadata)
    # 0600 (the user's likeness), whatever the umask and HOME's mode.
    with private_replacement(out_path) as fh:
        fh.write(data)


def read_lora_metadata(path: Path) -> dict[str, str]:
    """Our metadata keys of a saved LoRA (without the prefix)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return {
        key.removeprefix(METADATA_PREFIX): value
        for key, value in metadata.items()
        if key.startswith(METADATA_PREFIX)
    }


# --------------------------------------------------------------------------- the loop


def _map_runtime_error(exc: BaseException, *, memory_mode: str) -> TrainingFailedError:
    text = str(exc)
    if "out of memory" in text.lower():
        return out_of_memory_error(exc, mode=memory_mode)
    return TrainingFailedError(
        f"local training failed: {type(exc).__name__}: {text}",
        user_message=FAILED_MESSAGE,
    )


def _canceled(step: int, total: int) -> TrainingCanceledError:
    return TrainingCanceledError(
        f"training canceled at step {step}/{total}", user_message="The training was canceled."
    )


def fit_lora(
    transformer: Any,
    examples: Sequence[TrainingExample],
    *,
    recipe: Recipe,
    seed: int,
    on_step: StepCallback | None = None,
    gradient_checkpointing: bool = False,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    timestep_shift: TimestepShift | None = None,
    sampler: Sampler | None = None,
    on_sample: SampleCallback | None = None,
    base: checkpoints.BaseSetup | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Add a LoRA to ``transformer`` and train it in place on ``examples`` for ``recipe.steps``.

    Returns the LoRA config (for :func:`save_lora`) and the training metrics. The trained adapter
    stays active on ``transformer`` (adapter name "default"), so it can be used right away.

    With ``checkpoint_dir`` and ``recipe.checkpoint_every``, a checkpoint (``checkpoints``) is
    written there every that many steps and passed to ``on_checkpoint``. With ``resume_from``
    the run continues from that checkpoint (when it fits this run): the first ``on_step`` report
    is its step, not 0, and the steps that follow are the ones the uninterrupted run takes.

    ``base`` (the base model, its memory mode and dtype) is recorded in each checkpoint, and one
    made on another base is not resumed.

    ``timestep_shift`` is the base model's (:meth:`TimestepShift.from_scheduler_config`); a recipe
    with ``timestep_sampling == "flux_shift"`` uses it, FLUX.1-dev's when None.

    With a ``sampler`` and ``recipe.sample_every``, a sample image is made every that many steps
    and passed to ``on_sample``; it draws nothing from the training's generator.
    """
    import torch

    config = add_lora(transformer, rank=recipe.lora_rank, alpha=recipe.lora_alpha, seed=seed,
                      targets=recipe.lora_targets)
    shift = None
    if recipe.timestep_sampling == "flux_shift":
        shift = timestep_shift if timestep_shift is not None else TimestepShift()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=recipe.learning_rate, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8
    )
    total = recipe.steps
    generator = torch.Generator().manual_seed(seed)
    made_for = checkpoints.fingerprint(recipe, seed=seed, examples=len(examples), params=params,
                                       base=base)
    resumed = None
    if resume_from is not None:
        resumed = checkpoints.load_checkpoint(
            resume_from, params=params, optimizer=optimizer, generator=generator,
            made_for=made_for,
        )
    start = resumed.step if resumed is not None else 0
    order: list[int] = list(resumed.order) if resumed is not None else []
    first_loss = resumed.first_loss if resumed is not None else math.nan
    last_loss = resumed.last_loss if resumed is not None else math.nan
    if on_step is not None and on_step(start, total, math.nan):
        raise _canceled(start, total)
    every = recipe.checkpoint_every if checkpoint_dir is not None else 0

    def checkpoint(state: checkpoints.TrainState) -> None:
        assert checkpoint_dir is not None
        try:
            path = checkpoints.save_checkpoint(
                checkpoint_dir, state=state, params=params, optimizer=optimizer,
                generator=generator, made_for=made_for)
        except OSError as exc:
            # This machine's disk (full, read-only): a checkpoint missed costs only the steps
            # since the one before after a crash, where failing the training threw away every
            # step and every checkpoint stored. The next one is tried as usual.
            logger.warning("checkpoint at step %d could not be written to %s (%s): skipped, "
                           "the training goes on", state.step, checkpoint_dir,
                           exc.strerror or exc)
            return
        if on_checkpoint is not None:
            on_checkpoint(path, state.step)

    keys = [bucket_key(e) for e in examples] if recipe.aspect_buckets else []
    sample_every = recipe.sample_every if sampler is not None else 0
    started = time.perf_counter()
    for step in range(start + 1, total + 1):
        indices: list[int] = []
        if recipe.aspect_buckets:
            # Photos of one bucket a batch (their shapes must match).
            indices = draw_batch(order, keys=keys, batch_size=recipe.batch_size,
                                 generator=generator)
        else:
            while len(indices) < recipe.batch_size:
                if not order:
                    # Every photo once per epoch, in a seeded order.
                    order = torch.randperm(len(examples), generator=generator).tolist()
                indices.append(order.pop())
        batch = _batch([examples[i] for i in indices])
        sigmas = sample_sigmas(len(indices), generator=generator, shift=shift,
                               image_tokens=batch.latents.shape[1])
        noise = torch.randn(batch.latents.shape, generator=generator)
        loss = flow_matching_loss(transformer, batch, sigmas=sigmas, noise=noise,
                                  weights=batch.loss_weights)
        if not torch.isfinite(loss):
            raise TrainingFailedError(
                f"loss became {float(loss)} at step {step}",
                user_message="Training diverged; retry with a lower learning rate.",
            )
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        last_loss = float(loss.detach())
        if step == 1:
            first_loss = last_loss
        # Not at the last step: the finished version is scored on its probes and shown anyway.
        # Before the checkpoint of the same step: a run killed between the two resumes from the
        # one before and makes this sample again, never skips it.
        if sample_every > 0 and step % sample_every == 0 and step < total:
            assert sampler is not None
            try:
                sample = sampler.write(transformer, step)
            except OSError as exc:
                # As a checkpoint: a sample is something to look at, not worth the training.
                logger.warning("sample at step %d could not be written (%s): skipped, the "
                               "training goes on", step, exc.strerror or exc)
            else:
                if on_sample is not None:
                    on_sample(sample, step)
        state = checkpoints.TrainState(step=step, order=tuple(order), first_loss=first_loss,
                                       last_loss=last_loss)
        # Not at the last step: the saved LoRA follows at once, and is what a finished run keeps.
        periodic = every > 0 and step % every == 0 and step < total
        if periodic:
            checkpoint(state)
        if on_step is not None and on_step(step, total, last_loss) and step < total:
            # Stopped (canceled, or the worker stops): the steps since the last checkpoint are
            # kept too, so a resume or the next attempt loses none of them. A stop at the last
            # step is not one: the run is done, and finishing it (its evaluation and the saved
            # LoRA) is what keeps its steps, where no checkpoint is written.
            if every > 0 and not periodic:
                checkpoint(state)
            raise _canceled(step, total)
    seconds = time.perf_counter() - started
    transformer.requires_grad_(False)
    metrics = {
        "first_loss": first_loss,
        "final_loss": last_loss,
        "steps": total,
        # The steps this run made (from its checkpoint on): what its seconds timed, where
        # "steps" is the whole training's, earlier attempts' and a canceled one's included.
        "steps_run": total - start,
        "step_seconds": seconds / max(total - start, 1),
        "resumed_from_step": start,
    }
    return config, metrics


def _sampler(base: TrainingBase, *, sample_dir: Path | None, seed: int,
             tiny: bool) -> Sampler | None:
    """The run's sampler when its base kept the VAE (the recipe samples and there is a folder)."""
    if sample_dir is None or base.vae is None:
        return None
    from selfie_lora.adapters.flux.samples import SAMPLE_STEPS, TINY_SAMPLE_STEPS, Sampler

    return Sampler.create(
        vae=base.vae, example=base.examples[0], transformer=base.transformer,
        shift=base.timestep_shift or TimestepShift(), resolution=base.resolution, seed=seed,
        steps=TINY_SAMPLE_STEPS if tiny else SAMPLE_STEPS, folder=sample_dir)


def train_flux_lora(
    *,
    pipeline_source: str,
    cache_dir: Path,
    photos: Sequence[tuple[bytes, str]],
    recipe: Recipe,
    out_path: Path,
    face_boxes: Sequence[FaceBox | None] | None = None,
    on_step: StepCallback | None = None,
    device: str = "auto",
    num_threads: int | None = None,
    seed: int | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    evaluate: bool = True,
    gradient_checkpointing: bool | None = None,
    photo_names: Sequence[str] | None = None,
    memory_mode: MemoryModeSetting = "auto",
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    sample_dir: Path | None = None,
    on_sample: SampleCallback | None = None,
) -> dict[str, Any]:
    """Train a LoRA on ``photos`` ((image bytes, caption) pairs) and save it to ``out_path``.

    ``seed`` defaults to ``recipe.seed``. ``on_step`` is called with step 0 once the model is
    loaded and after every optimizer step; returning True stops training with
    ``TrainingCanceledError`` (nothing is written then), except after the last step: that run is
    finished and saved. ``gradient_checkpointing`` defaults to on
    for a real model on a GPU. ``photo_names`` only name photos in error messages.
    ``memory_mode`` stores the frozen base unquantized (``bf16``), ``int8`` or ``nf4``; ``auto``
    picks from the free device memory (see ``flux.memory``).
    ``checkpoint_dir``, ``resume_from`` and ``on_checkpoint``: see :func:`fit_lora`.
    With ``sample_dir`` and ``recipe.sample_every``, sample images (``flux.samples``) are written
    there and passed to ``on_sample``.
    ``face_boxes`` (aligned with ``photos``; None for a photo without a face) weight the face in
    the loss by ``recipe.face_loss_weight`` (see :func:`prepare_examples`).

    Returns metrics: first/final training loss, steps (the recipe's), steps_run (those this run
    made: fewer when it resumed from a checkpoint), seconds (this whole run, the model's load
    included), step_seconds (mean optimizer step), device, resolution, seed and, with
    ``evaluate``, eval_loss_before and eval_loss_after (:func:`evaluate_loss` on the training
    photos with fixed noise).
    """
    if not photos:
        raise TrainingFailedError(
            "no photos to train on", user_message="There are no photos to train on; upload some."
        )
    if recipe.steps < 1 or recipe.lora_rank < 1 or recipe.batch_size < 1:
        raise TrainingFailedError(
            f"invalid recipe {recipe.name}: {recipe.as_dict()}",
            user_message="The training settings are invalid; contact the operator.",
        )
    refuse_untrainable_base(pipeline_source)
    # A misconfigured base folder is told before torch and diffusers are imported (seconds).
    check_base_folder(pipeline_source)
    # Before default_dtype, which imports torch: a server without it is told what to install.
    require_torch()
    started = time.perf_counter()

    run_seed = recipe.seed if seed is None else seed
    resolved = resolve_device(device)
    dtype = default_dtype(resolved)
    if gradient_checkpointing is None:
        gradient_checkpointing = resolved.startswith("cuda") and pipeline_source != TINY
    chosen_mode: str = memory_mode  # the mode actually used, once chosen
    with torch_threads(num_threads if resolved == "cpu" else None):
        try:
            # Memory modes (flux.memory): encoders visit the device once, then are dropped; the
            # base transformer is placed unquantized, int8 or nf4.
            base = load_training_base(
                pipeline_source,
                cache_dir=cache_dir,
                photos=photos,
                resolution=recipe.resolution,
                device=resolved,
                dtype=dtype,
                mode=memory_mode,
                photo_names=photo_names,
                aspect_buckets=recipe.aspect_buckets,
                keep_vae=sample_dir is not None and recipe.sample_every > 0,
                face_boxes=face_boxes,
                face_loss_weight=recipe.face_loss_weight,
            )
            transformer, examples, resolution = base.transformer, base.examples, base.resolution
            chosen_mode = base.mode
            sampler = _sampler(base, sample_dir=sample_dir, seed=run_seed,
                               tiny=pipeline_source == TINY)
            eval_before = evaluate_loss(transformer, examples, seed=run_seed) if evaluate else None
            config, fit_metrics = fit_lora(
                transformer,
                examples,
                recipe=recipe,
                seed=run_seed,
                on_step=on_step,
                gradient_checkpointing=gradient_checkpointing,
                checkpoint_dir=checkpoint_dir,
                resume_from=resume_from,
                on_checkpoint=on_checkpoint,
                timestep_shift=base.timestep_shift,
                sampler=sampler,
                on_sample=on_sample,
                base=checkpoints.BaseSetup(model=checkpoints.base_model_identity(pipeline_source),
                                           memory_mode=base.mode, dtype=str(dtype)),
            )
            eval_after = evaluate_loss(transformer, examples, seed=run_seed) if evaluate else None
            metadata = {
                "base_model": pipeline_source if pipeline_source == TINY else Path(pipeline_source).name,
                "recipe": recipe.name,
                "steps": str(recipe.steps),
                "seed": str(run_seed),
                "resolution": str(resolution),
                # Every value the recipe trained with, knobs at their defaults included: what
                # "the same trainer" means travels with the file.
                "recipe_values": json.dumps(recipe.values(), sort_keys=True),
                **(extra_metadata or {}),
            }
            try:
                save_lora(transformer, config=config, out_path=out_path,
                          extra_metadata=metadata)
            except OSError as exc:
                # This machine's disk (full, read-only), not the training: a StorageError, so
                # the worker steps away with the stored checkpoints kept (as for a full disk
                # while fetching one), and the next attempt resumes from the newest.
                said = f"the trained LoRA cannot be written to {out_path}: {exc.strerror or exc}"
                if is_full_error(exc):
                    # A quota (EDQUOT) said as one: the worker's advice is not "free space".
                    raise StorageFullError(said, quota=is_quota_error(exc)) from exc
                raise StorageError(said) from exc
        except SelfieLoraError:
            raise
        except OSError as exc:
            if is_full_error(exc):
                # A scratch file of this machine's (the photos' cache, say) on a full disk: an
                # outage the worker waits out, not a fault of the training. A quota is said as
                # one, on the disk of the file named (else the work folder's).
                raise StorageFullError(f"{machine_disk_words(exc, out_path.parent)}: "
                                       f"{describe(exc)}", quota=is_quota_error(exc)) from exc
            # Reading the base model or the photos' cache, say: named as what it is.
            raise TrainingFailedError(
                f"local training failed: {describe(exc)}", user_message=FAILED_MESSAGE,
            ) from exc
        except ImportError as exc:
            # A module diffusers, peft or torchao import on demand (a quantization backend, a
            # model class) is missing or broken: the install is the operator's to mend.
            raise missing_module_error(describe(exc)) from exc
        except Exception as exc:
            # torch, diffusers and peft raise whatever comes (RuntimeError for a CUDA fault,
            # IndexError for a tokenizer that does not fit its encoder, KeyError for a config
            # without a key): each is a failed training, in the worker thread as in the child.
            raise _map_runtime_error(exc, memory_mode=chosen_mode) from exc
    metrics: dict[str, Any] = {
        **fit_metrics,
        "seconds": round(time.perf_counter() - started, 3),
        "device": resolved,
        "resolution": resolution,
        "seed": run_seed,
        "memory_mode": chosen_mode,
    }
    if recipe.aspect_buckets:
        # How many photos trained at each size, "48x80: 3, 80x48: 3" (a string: a training's
        # metrics are stored as plain values).
        sizes = [bucket_label(bucket_key(e)) for e in examples]
        metrics["buckets"] = ", ".join(f"{size}: {sizes.count(size)}" for size in sorted(set(sizes)))
    if eval_before is not None and eval_after is not None:
        metrics["eval_loss_before"] = eval_before
        metrics["eval_loss_after"] = eval_after
    logger.info("trained a LoRA on %d photos: %s", len(photos), metrics)
    return metrics
