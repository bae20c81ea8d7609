"""Loading a base FLUX pipeline for the local backend: the offline ``tiny`` one (``flux.tiny``,
built and cached on first use) or a FLUX.1 diffusers folder; devices, dtypes, CPU threads.

Torch and diffusers are imported inside the functions: importing them costs seconds, and the API
and CLI import this package without needing them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfie_lora.adapters.flux.runtime import require_torch
from selfie_lora.adapters.flux.tiny import TINY, TINY_RESOLUTION, tiny_pipeline_dir
from selfie_lora.errors import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when there is one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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

    pipeline_class: Any = diffusers.FluxPipeline
    if source == TINY:
        path = tiny_pipeline_dir(cache_dir)
    else:
        path = Path(source).expanduser()
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"base model {source!r} is neither 'tiny' nor a diffusers FLUX.1 folder "
                "(no model_index.json there)"
            )
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
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load the FLUX pipeline from {path}: {exc}") from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def text_max_length(pipe: Any) -> int:
    """The T5 sequence length to encode prompts with: the tokenizer's own limit, at most 512.

    Training and generation must agree on it, so both ask here.
    """
    limit = getattr(pipe.tokenizer_2, "model_max_length", 512)
    return int(min(512, limit))


def default_resolution(source: str) -> int:
    return TINY_RESOLUTION if source == TINY else 1024
