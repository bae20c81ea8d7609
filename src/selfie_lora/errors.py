"""The exception tree of selfie-lora.

Every error this package raises on purpose derives from :class:`SelfieLoraError`. Vendor errors
(SQLAlchemy, httpx, replicate, torch) are mapped to these at the adapter boundary, so services and
entry points never see them.

    SelfieLoraError
    ├── ConfigError                 settings that cannot work (missing token, bad URL)
    ├── NotFoundError               no such object for this user (HTTP 404)
    ├── AuthError                   no key or a wrong key (HTTP 401)
    ├── ConflictError               a training of this model is already queued or running (HTTP 409)
    ├── InvalidInputError           bad request data (HTTP 422)
    │   └── DatasetRejectedError    the photos cannot be trained on; carries the findings
    ├── PayloadTooLargeError        an upload over the configured limit (HTTP 413)
    ├── InvalidTransitionError      a training state change that would go backwards (a bug: HTTP 500)
    ├── StorageError                a blob is missing or cannot be written
    ├── GenerationError             the image generator failed
    ├── TrainingInterruptedError    a worker stops running a training it holds (shutting down:
    │   │                           it hands the training back to the queue)
    │   └── LeaseLostError          another worker took the training over: stop, write nothing
    └── TrainerError                the training backend failed; ``user_message`` says what to do
        ├── TrainerUnavailableError the backend cannot be reached or keeps answering 429/5xx
        ├── TrainingFailedError     the remote or local training ended in ``failed``
        ├── TrainingCanceledError   the training was canceled
        └── WeightsNotFoundError    the training succeeded but no LoRA file was found in its output
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class SelfieLoraError(Exception):
    """Root of every error selfie-lora raises on purpose."""

    code: str = "error"
    http_status: int = 500

    def __init__(
        self, message: str, *, details: Sequence[Any] = (), code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details)
        if code is not None:  # a more precise code than the class's, for the same status
            self.code = code


class ConfigError(SelfieLoraError):
    code = "config_error"
    http_status = 500


class NotFoundError(SelfieLoraError):
    code = "not_found"
    http_status = 404


class AuthError(SelfieLoraError):
    code = "unauthorized"
    http_status = 401


class ConflictError(SelfieLoraError):
    code = "training_in_progress"
    http_status = 409


class InvalidInputError(SelfieLoraError):
    code = "invalid_input"
    http_status = 422


class DatasetRejectedError(InvalidInputError):
    code = "dataset_rejected"


class PayloadTooLargeError(SelfieLoraError):
    code = "upload_too_large"
    http_status = 413


class InvalidTransitionError(SelfieLoraError):
    code = "invalid_transition"
    http_status = 500


class StorageError(SelfieLoraError):
    code = "storage_error"
    http_status = 500


class GenerationError(SelfieLoraError):
    code = "generation_failed"
    http_status = 502


class TrainingInterruptedError(SelfieLoraError):
    """Raised inside a worker to stop work on a training without ending it: the training is
    handed back (or was already taken over) and another attempt resumes it."""

    code = "training_interrupted"
    http_status = 503


class LeaseLostError(TrainingInterruptedError):
    code = "lease_lost"


class TrainerError(SelfieLoraError):
    """A training backend failed. ``user_message`` is a sentence a user can act on."""

    code = "trainer_error"
    http_status = 502

    def __init__(
        self, message: str, *, user_message: str | None = None, details: Sequence[Any] = ()
    ) -> None:
        super().__init__(message, details=details)
        self.user_message = user_message or message


class TrainerUnavailableError(TrainerError):
    code = "trainer_unavailable"
    http_status = 503


class TrainingFailedError(TrainerError):
    code = "training_failed"


class TrainingCanceledError(TrainerError):
    code = "training_canceled"


class WeightsNotFoundError(TrainerError):
    code = "weights_not_found"
