"""Logging for every process: plain text (default) or JSON lines (``SELFIE_LORA_LOG_FORMAT=json``),
with the id of the training a line is about.

The training id travels in a context variable that ``TrainingService.run`` sets for the thread
running a training (and the local trainer's child process for its own lines), so every line
logged while a training runs carries it, whichever module logs it; lines that name a training in
their arguments only are not parsed.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

LogFormat = Literal["text", "json"]

_training_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "selfie_lora_training_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# huey logs every poll and alembic every migration step at INFO; keep the output readable.
QUIET_LOGGERS = ("huey", "alembic", "httpx")
# What the ML libraries warn about on import, about parts this never uses (torchao's CUDA
# kernels and triton on a CPU machine, torchvision, torchao-serialized checkpoints, an enum
# registration torch deprecates): eight lines at the top of every local training that a user
# can do nothing about. Their errors still show, and everything with -v.
NOISY_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree", "transformers.utils.import_utils",
                        "diffusers.quantizers.torchao.torchao_quantizer")

# Lines from libraries that read as failures where nothing failed, by logger and the start of
# the message (and, for the second, its end): transformers warns that a prompt longer than the
# tokenizer's window "will result in indexing errors" when diffusers tokenizes it untruncated
# only to report what its truncated encoding left out; diffusers then reports a cut of nothing
# (['']) when what went past the window were special tokens; matplotlib says it built its font
# cache (the demo's first run, between its tables). Shown with -v.
MISLEADING_LINES: tuple[tuple[str, str, str], ...] = (
    ("transformers.tokenization_utils_base",
     "Token indices sequence length is longer than the specified maximum sequence length", ""),
    ("diffusers.pipelines.flux.pipeline_flux",
     "The following part of your input was truncated because", ": ['']"),
    ("matplotlib.font_manager", "generated new fontManager", ""),
)


class MisleadingLinesFilter(logging.Filter):
    """Drops ``MISLEADING_LINES``, and nothing else of those loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, start, end in MISLEADING_LINES:
            if record.name == name:
                message = record.getMessage()
                if message.startswith(start) and message.endswith(end):
                    return False
        return True


@contextmanager
def training_context(training_id: str | None) -> Iterator[None]:
    """Lines logged inside carry ``training_id`` (this thread, and what it calls)."""
    token = _training_id.set(training_id)
    try:
        yield
    finally:
        _training_id.reset(token)


def current_training_id() -> str | None:
    return _training_id.get()


class TrainingIdFilter(logging.Filter):
    """Sets ``record.training_id`` (None outside a training) for the formatters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "training_id"):
            record.training_id = _training_id.get()
        return True


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(training_id)s %(process)d "
        "%(threadName)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger",
                       "threadName": "thread"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def setup_logging(*, log_format: LogFormat = "text", verbose: bool = False) -> None:
    """One handler on the root logger, on standard error; replaces what was there."""
    handler = logging.StreamHandler()
    handler.addFilter(TrainingIdFilter())
    if not verbose:
        handler.addFilter(MisleadingLinesFilter())
    handler.setFormatter(json_formatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in NOISY_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    # Warnings (a library's deprecation notice) become log lines too, not bare stderr text.
    logging.captureWarnings(True)
    if log_format == "json":
        # uvicorn's loggers have handlers of their own (text): send their lines here instead.
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
