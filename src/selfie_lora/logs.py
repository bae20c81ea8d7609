"""Logging for every process: plain text (default) or JSON lines (``SELFIE_LORA_LOG_FORMAT=json``),
with the id of the training a line is about.

The training id travels in a context variable that ``TrainingService.run`` sets for the thread
running a training (and the local trainer's child process for its own lines), so every line
logged while a training runs carries it, whichever module logs it (JSON: ``training_id``; text:
a ``[training <id8>]`` tag before the message); lines that name a training in their arguments
only are not parsed.
"""

from __future__ import annotations

import ast
import contextvars
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
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


# diffusers reports a prompt cut to its text encoder's window (CLIP's 77 tokens, T5's
# ``max_sequence_length``) by logging the cut-off text itself, at WARNING: a user's prompt in the
# operator's log, where this service logs only a generation's id, count, scale and seed.
_PROMPT_CUT = re.compile(
    r"^The following part of your input was truncated because (?P<why>.*?)\s*(?P<limit>\d+) "
    r"tokens: (?P<text>.*)$", re.DOTALL)


class PromptTextFilter(logging.Filter):
    """Rewrites diffusers' "The following part of your input was truncated because ... N
    tokens: [TEXT]" lines, whatever the pipeline, to say only that a prompt was cut, by which
    encoder's window, and how many characters went: never the text (with ``-v`` too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("diffusers"):
            return True
        try:
            found = _PROMPT_CUT.match(record.getMessage())
        except Exception:  # a record whose arguments do not fit: not this line
            return True
        if found is None:
            return True
        encoder = "CLIP" if "CLIP" in found["why"] else "max_sequence_length, T5's on FLUX.1"
        try:
            cut = ast.literal_eval(found["text"])
            size = (f"{sum(len(str(p)) for p in cut)} character(s) dropped"
                    if isinstance(cut, list) else "its end dropped")
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            size = "its end dropped"
        # In place: every handler after this one sees the rewritten line too.
        record.msg = "a prompt was cut to %s tokens (%s): %s; its text is not logged"
        record.args = (found["limit"], encoder, size)
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


# Extras that are no part of a line: uvicorn's ``color_message``, its message's template with
# terminal colour codes (ANSI escapes in a JSON log).
JSON_DROPPED_EXTRAS = ("color_message",)


def iso_time(created: float) -> str:
    """ISO 8601 local time with milliseconds and the offset (``2026-12-06T04:11:29.123+00:00``):
    a training's lines within one second, and several processes' lines, sort by it."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with ``[training <first 8 characters of its id>] `` before the message
    of a line logged while a training runs (``training_id`` set), unless the message names the
    id already: a training's lines (its losses, scores, the likeness gate's decision) are found
    by grepping its id in the default format too, as in JSON."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        training_id = getattr(record, "training_id", None)
        if not training_id or str(training_id) in record.message:
            return super().formatMessage(record)
        tagged = logging.makeLogRecord(record.__dict__)
        tagged.message = f"[training {str(training_id)[:8]}] {record.message}"
        return super().formatMessage(tagged)


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonFormatter

    class _Formatter(JsonFormatter):
        def formatTime(self, record: logging.LogRecord,  # noqa: N802 - logging's name
                       datefmt: str | None = None) -> str:
            del datefmt  # one format, whatever a caller asks
            return iso_time(record.created)

    return _Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(training_id)s %(process)d "
        "%(threadName)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger",
                       "threadName": "thread"},
        reserved_attrs=[*RESERVED_ATTRS, *JSON_DROPPED_EXTRAS],
    )


# What ``setup_logging`` was last asked for in this process (None: never): handed to the
# processes this one starts whose logging nothing else sets up (the photo-analysis workers).
_configured: tuple[LogFormat, bool, bool] | None = None


def logging_setup() -> tuple[LogFormat, bool, bool] | None:
    """The ``(log_format, verbose, quiet)`` this process's logging was set up with, if it was."""
    return _configured


def setup_logging(*, log_format: LogFormat = "text", verbose: bool = False,
                  quiet: bool = False) -> None:
    """One handler on the root logger, on standard error; replaces what was there. Lines from
    INFO up; from WARNING up when ``quiet`` (a one-shot command, which says what it did in its
    own words); from DEBUG up when ``verbose``, quiet or not."""
    global _configured
    _configured = (log_format, verbose, quiet)
    handler = logging.StreamHandler()
    handler.addFilter(TrainingIdFilter())
    if not verbose:
        handler.addFilter(MisleadingLinesFilter())
    # After the filter above, which drops the cut of nothing (``: ['']``) by its words.
    handler.addFilter(PromptTextFilter())
    handler.setFormatter(json_formatter() if log_format == "json"
                         else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in NOISY_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    # Warnings (a library's deprecation notice) become log lines too, not bare stderr text.
    logging.captureWarnings(True)
    # uvicorn's loggers may have handlers of their own (its default config: a format with no
    # time nor logger name): send their lines here instead, in this format (text or JSON).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
