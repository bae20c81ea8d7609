"""Resumable checkpoints of the local training loop.

A checkpoint holds everything :func:`~selfie_lora.adapters.flux.train_loop.fit_lora` needs to go on
exactly as if it had never stopped: the trained LoRA parameters, AdamW's state, the step, the state
of the one generator that draws epoch orders, timesteps and noise, what is left of the current
epoch's order, and the first loss (a metric). A run resumed from step ``k`` therefore takes the same
steps ``k+1..N`` as the uninterrupted run, and ends with the same LoRA (to float tolerance; on a CPU
bit for bit).

Files are written next to their final name and renamed into place, so a process killed mid-write
leaves the previous checkpoint whole; only the last :data:`KEEP` are kept on disk. A checkpoint
records what it was made for (the recipe, seed, photo count, the LoRA's parameter shapes, and the
frozen base it trained on: the base model, its memory mode and the compute dtype): one that does
not fit the run is ignored and the run starts over (never a wrong resume).

Torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfie_lora.adapters.flux.tiny import TINY, TINY_CACHE_NAME
from selfie_lora.domain.entities import Recipe
from selfie_lora.services.private_files import private_folders, private_replacement

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT = 1
KEEP = 2  # the newest and the one before: the parent may still be copying the older one away
_NAME = re.compile(r"step-(\d{8})\.ckpt")


@dataclass(frozen=True)
class TrainState:
    """Where a run stands after ``step`` optimizer steps (what a checkpoint restores)."""

    step: int
    order: tuple[int, ...]
    first_loss: float
    last_loss: float


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def step_of(path: Path) -> int | None:
    """The step a checkpoint file was written at (from its name), None for another file."""
    match = _NAME.fullmatch(path.name)
    return int(match[1]) if match else None


@dataclass(frozen=True)
class BaseSetup:
    """The frozen base a run trains its LoRA on. Each shapes every step as much as the recipe
    does, yet none shows in the LoRA's shapes: ``auto`` may pick another memory mode on another
    attempt or machine, and a FLUX.1 folder may be replaced by another with the same layout."""

    model: str  # base_model_identity()
    memory_mode: str  # the mode actually used, never "auto"
    dtype: str  # the compute dtype, "torch.bfloat16"


# Blocks read from each weights file for its identity: far from its whole 10 GB, but two
# different trainings of one architecture differ in every block.
_SAMPLED_BLOCKS = 8
_BLOCK_BYTES = 64 * 1024


def base_model_identity(source: str) -> str:
    """What names the base model ``source`` (``tiny`` or a FLUX.1 diffusers folder) wherever it
    lies: the tiny model's versioned name; for a folder a hash of its transformer's config, its
    weights index(es), and each weights file's name, size and a few blocks of its bytes (cheap:
    read at every start; a copy of the folder on another machine has the same identity)."""
    if source == TINY:
        return TINY_CACHE_NAME
    folder = Path(source).expanduser()
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    digest = hashlib.sha256()
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and (
            p.name == "config.json" or p.name.endswith((".index.json", ".safetensors"))))
        for path in files:
            digest.update(path.name.encode() + b"\0")
            if path.name.endswith(".json"):
                digest.update(path.read_bytes())
                continue
            size = path.stat().st_size
            digest.update(str(size).encode() + b"\0")
            with path.open("rb") as fh:
                for block in range(_SAMPLED_BLOCKS):
                    fh.seek(size * block // _SAMPLED_BLOCKS)
                    digest.update(fh.read(_BLOCK_BYTES))
    except OSError as exc:
        # The pipeline loaded from it, so this is unlikely; the path still tells bases apart.
        logger.warning("base model %s cannot be read for its identity (%s): using its path",
                       source, exc)
        return f"path:{folder.resolve()}"
    return f"sha256:{digest.hexdigest()}"


def fingerprint(recipe: Recipe, *, seed: int, examples: int, params: Sequence[Any],
                base: BaseSetup | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: everything that shapes the run's steps."""
    settings = recipe.as_dict()
    settings.pop("checkpoint_every", None)  # how often to save changes nothing of the steps
    return {
        "recipe": settings,
        "seed": seed,
        "examples": examples,
        "shapes": [list(p.shape) for p in params],
        # A LoRA trained on one base, in one precision, goes on differently on another: resumed
        # there it would end as neither run's LoRA.
        "base_model": base.model if base is not None else None,
        "memory_mode": base.memory_mode if base is not None else None,
        "dtype": base.dtype if base is not None else None,
    }


def _differences(saved: Any, wanted: dict[str, Any]) -> str:
    """The fingerprint's parts that differ, as "part: saved, not wanted" (what the log says)."""
    if not isinstance(saved, dict):
        return f"{saved!r}, not {wanted!r}"
    return "; ".join(f"{key}: {saved.get(key)!r}, not {wanted.get(key)!r}"
                     for key in sorted(set(saved) | set(wanted))
                     if saved.get(key) != wanted.get(key))


# What torch's zip writer says when the file object under it refused a write: it swallows the
# OSError of a write cut short (a disk filling mid-record) and checks the position it expected.
_WRITE_FAILED = ("unexpected pos", "No space", "os error 28")
# ... and a quota used up (EDQUOT) in a library's words (strerror's, Rust's io::Error's): said as
# a quota, not a full disk (``disk_space.is_quota_error``), whose advice "free space" need not
# help, and not left a RuntimeError, which went past the training loop's handler that skips a
# checkpoint the disk refused.
_QUOTA_EXCEEDED = ("Disk quota exceeded", "os error 122")


def write_payload(payload: dict[str, Any], fh: Any) -> None:
    """``torch.save`` ``payload`` into ``fh``; a write the disk refused (full, say) is an
    OSError, whichever way torch reports it, so a caller can tell it from a fault of the run."""
    import torch

    try:
        torch.save(payload, fh)
    except RuntimeError as exc:
        text = str(exc)
        if any(mark in text for mark in _QUOTA_EXCEEDED):
            code = errno.EDQUOT
        elif any(mark in text for mark in _WRITE_FAILED):
            code = errno.EIO if "unexpected pos" in text else errno.ENOSPC
        else:
            raise
        raise OSError(code, f"the write failed ({text})") from exc


def save_checkpoint(
    directory: Path,
    *,
    state: TrainState,
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    made_for: dict[str, Any],
) -> Path:
    """Write a checkpoint of ``state`` into ``directory`` atomically; older ones beyond
    :data:`KEEP` are removed. Returns the file written."""
    private_folders(directory)
    payload = {
        "format": FORMAT,
        "made_for": made_for,
        "step": state.step,
        "order": list(state.order),
        "first_loss": state.first_loss,
        "last_loss": state.last_loss,
        "params": [p.detach().cpu() for p in params],
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
    }
    final = directory / checkpoint_name(state.step)
    with private_replacement(final) as fh:  # 0600, renamed into place whole
        write_payload(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    for old in sorted((p for p in directory.iterdir() if step_of(p) is not None),
                      key=lambda p: step_of(p) or 0)[:-KEEP]:
        old.unlink(missing_ok=True)
    # Routine (every checkpoint_every steps): not a line per checkpoint in the worker's log.
    logger.debug("checkpoint at step %d written to %s", state.step, final)
    return final


def load_checkpoint(
    path: Path,
    *,
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    made_for: dict[str, Any],
) -> TrainState | None:
    """Restore the LoRA parameters, the optimizer and the generator from ``path``; None (and
    nothing changed) when the file is unreadable or was made for another run."""
    import torch

    try:
        # weights_only: a checkpoint is data, never code (it may come from shared storage).
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        logger.warning("checkpoint %s cannot be read (%s): starting over", path, exc)
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        logger.warning("checkpoint %s has an unknown format: starting over", path)
        return None
    if payload.get("made_for") != made_for:
        logger.warning("checkpoint %s was made for another run (%s): starting over",
                       path, _differences(payload.get("made_for"), made_for))
        return None
    with torch.no_grad():
        for param, saved in zip(params, payload["params"], strict=True):
            param.copy_(saved.to(device=param.device, dtype=param.dtype))
    optimizer.load_state_dict(payload["optimizer"])
    generator.set_state(payload["generator"])
    state = TrainState(
        step=int(payload["step"]),
        order=tuple(int(i) for i in payload["order"]),
        first_loss=float(payload["first_loss"]),
        last_loss=float(payload["last_loss"]),
    )
    logger.info("resuming from the checkpoint at step %d (%s)", state.step, path)
    return state


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint file in ``directory``, if any."""
    if not directory.is_dir():
        return None
    found = [p for p in directory.iterdir() if step_of(p) is not None]
    return max(found, key=lambda p: step_of(p) or 0) if found else None
