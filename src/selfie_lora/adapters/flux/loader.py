"""Loading a base FLUX pipeline for the local backend: the offline ``tiny`` one (``flux.tiny``,
built and cached on first use) or a FLUX.1 diffusers folder; devices, dtypes, CPU threads.

Torch and diffusers are imported inside the functions: importing them costs seconds, and the API
and CLI import this package without needing them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfie_lora.adapters.flux.runtime import loading_models, require_torch
from selfie_lora.adapters.flux.tiny import TINY, TINY_RESOLUTION, tiny_pipeline_dir
from selfie_lora.errors import ConfigError, TrainingFailedError, describe

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when there is one, else the CPU. ``ConfigError`` for a named
    accelerator torch does not see (``cuda:7`` on a machine with one GPU, ``cuda`` on a torch
    built without CUDA): torch's own error there was an AssertionError or a RuntimeError, which
    failed the user's training as if it were theirs and answered a generation with a 500. The
    operator's setting is at fault, so it is the misconfiguration error the trainer and the
    generator already map for a base model folder that cannot load (``contact the operator``).
    Asked here, where torch is imported anyway, and not when a command starts: ``serve`` and the
    worker do not import torch until something is trained or generated."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index or 0) >= count:
            seen = ("no CUDA device" if count == 0 else "1 CUDA device (cuda:0)" if count == 1
                    else f"{count} CUDA devices (cuda:0 to cuda:{count - 1})")
            raise ConfigError(f"SELFIE_LORA_DEVICE is {device}, but torch sees {seen}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"SELFIE_LORA_DEVICE is {device}, but torch sees no MPS device")
    return device


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs (how FLUX is trained and run), fp32 on the CPU (bf16 matmuls are slow there)."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_pipeline(
    source: str, *, cache_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None
) -> Any:
    """Load a FluxPipeline: ``"tiny"`` (built and cached on first use) or a FLUX.1 diffusers folder.

    Only local files are read, never the hub. ``device`` must already be resolved (not ``auto``).
    """
    require_torch()
    import diffusers

    with loading_models():  # diffusers patches torch process-wide while it loads (runtime)
        return _load_pipeline(diffusers.FluxPipeline, source, cache_dir=cache_dir, device=device,
                              dtype=dtype)


def base_model_problem(source: str) -> str | None:
    """Why ``source`` (SELFIE_LORA_BASE_MODEL) cannot be loaded, without loading it (a file
    check: no torch), or None."""
    if source == TINY:
        return None
    try:
        if (Path(source).expanduser() / "model_index.json").is_file():
            return None
    except OSError as exc:
        # Python 3.11's is_file() raises for a folder this user may not read (or a name too
        # long): a problem to say, not a traceback that stopped every command.
        return f"base model {source!r} cannot be read ({exc.strerror or exc})"
    return (f"base model {source!r} is neither 'tiny' nor a diffusers FLUX.1 folder "
            "(no model_index.json there)")


def _load_pipeline(pipeline_class: Any, source: str, *, cache_dir: Path, device: str,
                   dtype: torch.dtype | None) -> Any:
    if source == TINY:
        path = tiny_pipeline_dir(cache_dir)
    else:
        path = Path(source).expanduser()
        check_base_folder(source)
    torch_dtype = dtype if dtype is not None else default_dtype(device)
    try:
        with warnings.catch_warnings():
            # Loading a saved pipeline warns about things irrelevant here (e.g. the absent optional
            # image encoder); real problems raise.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            pipe = pipeline_class.from_pretrained(
                str(path), local_files_only=True, torch_dtype=torch_dtype
            )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # diffusers reads model_index.json and each component's config without checking their
        # shapes: a component declared as null, or a config that is not what it expects, fails
        # with a TypeError or AttributeError deep inside. Whatever fails here is the folder the
        # operator configured, never the training's photos: the misconfiguration error, not a
        # failure the user is told to retry.
        raise ConfigError(f"cannot load the FLUX pipeline from {path}: {describe(exc)}") from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_base_folder(source: str) -> None:
    """Raise ``ConfigError`` when ``source`` is not "tiny" and its folder cannot be a diffusers
    FLUX.1 pipeline (no model_index.json, or one that is not a JSON object). Files only, no
    torch: a training checks this first, where a training child spent its first ~10 s of CPU
    importing torch and diffusers only to fail on it."""
    if source == TINY:
        return
    problem = base_model_problem(source)
    if problem is not None:
        raise ConfigError(problem)
    _check_model_index(Path(source).expanduser() / "model_index.json")


def _check_model_index(path: Path) -> None:
    """Refuse a model_index.json that is not a JSON object, with a message that says so (diffusers
    fails on one with "pop expected at most 1 argument")."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {describe(exc)}") from exc
    if not isinstance(index, dict):
        raise ConfigError(f"{path} is not a diffusers model index (a JSON object)")


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Use ``num_threads`` CPU threads inside the block (None: leave torch's setting alone).

    With 2 cores and any other load, torch's default thread count made tiny steps 60-100x slower.
    """
    import torch

    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# FLUX.1-schnell's T5 sequence length: what diffusers' docs and kohya sd-scripts use for it (dev
# and the other guidance-distilled models take 512).
SCHNELL_TEXT_LENGTH = 256


def text_max_length(pipe: Any) -> int:
    """The T5 sequence length to encode prompts with: the tokenizer's own limit, at most 512, and
    256 for a model without guidance embeddings (FLUX.1-schnell).

    Training and generation must agree on it, so both ask here.
    """
    limit = int(min(512, getattr(pipe.tokenizer_2, "model_max_length", 512)))
    if not guidance_distilled(pipe.transformer.config):
        return min(SCHNELL_TEXT_LENGTH, limit)
    return limit


def guidance_distilled(transformer_config: Any) -> bool:
    """Whether a FLUX transformer takes a guidance embedding (FLUX.1-dev and ``tiny``: yes;
    FLUX.1-schnell, step-distilled instead: no)."""
    if isinstance(transformer_config, dict):
        return bool(transformer_config.get("guidance_embeds", True))
    return bool(getattr(transformer_config, "guidance_embeds", True))


def refuse_untrainable_base(source: str) -> None:
    """Raise ``TrainingFailedError`` before anything is loaded when ``source`` is a FLUX.1 folder
    whose transformer is step-distilled (FLUX.1-schnell): a LoRA trained on it directly undoes
    the distillation, which is why ai-toolkit trains schnell only through an assistant adapter
    and others refuse it. A LoRA trained on FLUX.1-dev loads on schnell."""
    if source == TINY:
        return
    config_path = Path(source).expanduser() / "transformer" / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not readable here: loading the pipeline says what is wrong
    if not guidance_distilled(config):
        raise TrainingFailedError(
            f"base model {source} has no guidance embedding (FLUX.1-schnell): training a LoRA on "
            "a step-distilled model breaks its distillation",
            user_message="This server's base model (FLUX.1-schnell) cannot be trained on; the "
            "operator must point SELFIE_LORA_BASE_MODEL at FLUX.1-dev (its LoRAs also work on "
            "schnell).")


def default_resolution(source: str) -> int:
    return TINY_RESOLUTION if source == TINY else 1024
