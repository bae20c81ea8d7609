"""What the local backend needs installed: torch, diffusers, peft and transformers."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from selfie_lora.errors import ConfigError, TrainerUnavailableError

# What a user reads when a local training failed for a reason of the server's (the same words
# inline and from a training child).
FAILED_MESSAGE = ("Training failed on this server; try again, and if it fails again, "
                  "contact the operator.")


# diffusers, transformers and accelerate load a model by patching torch for the whole process
# while they do: no_init_weights replaces the torch.nn.init functions with no-ops, and accelerate's
# init_empty_weights nn.Module.register_parameter (parameters on the meta device). A module built
# in another thread meanwhile (a generation's LoRA layers, a training's adapter, another load)
# gets uninitialised or meta parameters: an inline training ended with "Parameter.__new__() got an
# unexpected keyword argument '_is_hf_initialized'" or a loss of nan when a generation loaded its
# pipeline beside it. So every building or loading of torch modules in the process holds this one
# lock; the compute (training steps, denoising) does not, and runs beside a load as before.
# Reentrant: a load may call another (the generator's placement calls load_pipeline).
_MODEL_LOADING = threading.RLock()


@contextlib.contextmanager
def loading_models() -> Iterator[None]:
    """Hold the process's lock on building and loading torch modules (see ``_MODEL_LOADING``)."""
    with _MODEL_LOADING:
        yield


def missing_module_error(what: str) -> ConfigError:
    """A module diffusers, peft or torchao import on demand is missing or broken (``what``: the
    ImportError, as described): the install is the operator's to mend."""
    return ConfigError(f"the local backend cannot import what it needs: {what}")


def route_torch_logs() -> None:
    """Hand torch's loggers back to this process's handler. Importing torch gives its loggers a
    text handler of their own and stops them propagating, so their lines (a deprecation notice
    when torchao is imported, say) would bypass the JSON lines of SELFIE_LORA_LOG_FORMAT=json.
    Only the handlers torch made are removed (their formatter is torch's); levels stay."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not (name == "torch" or name.startswith("torch.")) or not isinstance(
                logger, logging.Logger):
            continue
        own = [h for h in logger.handlers
               if type(h.formatter).__name__ == "TorchLogsFormatter"]
        for handler in own:
            logger.removeHandler(handler)
        if own:
            logger.propagate = True


def require_torch() -> None:
    try:
        import torch  # noqa: F401

        # Before diffusers: importing it may import torchao, which logs through torch's loggers.
        route_torch_logs()
        import diffusers
        import peft  # noqa: F401
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
