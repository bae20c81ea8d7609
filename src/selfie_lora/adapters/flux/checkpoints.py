"""Resumable checkpoints of the local training loop.

A checkpoint holds everything :func:`~selfie_lora.adapters.flux.train_loop.fit_lora` needs to go on
exactly as if it had never stopped: the trained LoRA parameters, AdamW's state, the step, the state
of the one generator that draws epoch orders, timesteps and noise, what is left of the current
epoch's order, and the first loss (a metric). A run resumed from step ``k`` therefore takes the same
steps ``k+1..N`` as the uninterrupted run, and ends with the same LoRA (to float tolerance; on a CPU
bit for bit).

Files are written next to their final name and renamed into place, so a process killed mid-write
leaves the previous checkpoint whole; only the last :data:`KEEP` are kept on disk. A checkpoint
records what it was made for (the recipe, seed, photo count and the LoRA's parameter shapes):
one that does not fit the run is ignored and the run starts over (never a wrong resume).

Torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfie_lora.domain.entities import Recipe

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


def fingerprint(recipe: Recipe, *, seed: int, examples: int, params: Sequence[Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: everything that shapes the run's steps."""
    settings = recipe.as_dict()
    settings.pop("checkpoint_every", None)  # how often to save changes nothing of the steps
    return {
        "recipe": settings,
        "seed": seed,
        "examples": examples,
        "shapes": [list(p.shape) for p in params],
    }


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
    import torch

    directory.mkdir(parents=True, exist_ok=True)
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
    handle, staged = tempfile.mkstemp(dir=directory, prefix=".ckpt-")
    try:
        with os.fdopen(handle, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(staged, final)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
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
        logger.warning("checkpoint %s was made for another run (%s, not %s): starting over",
                       path, payload.get("made_for"), made_for)
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
