"""What the local backend needs installed: torch, diffusers, peft and transformers."""

from __future__ import annotations

from typing import Any

from selfie_lora.errors import TrainerUnavailableError


def require_torch() -> None:
    try:
        import diffusers
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TrainerUnavailableError(
            f"the local backend needs torch, diffusers, peft and transformers: {exc}",
            user_message="Local training is not installed on this server "
            "(install selfie-lora[local]) or use the Replicate backend.",
        ) from exc
    # Their tqdm bars ("Loading pipeline components", "Writing model shards") would fill the
    # worker's stderr on every load; progress is reported through the training row instead.
    libraries: tuple[Any, ...] = (diffusers, transformers)
    for library in libraries:
        library.utils.logging.disable_progress_bar()
        # Their lines go through this process's handler (JSON lines when so set), not the
        # handler each library installs on its own logger.
        library.utils.logging.disable_default_handler()
        library.utils.logging.enable_propagation()
