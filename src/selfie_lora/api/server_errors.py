"""What a client is told of an error on the server's side (a 5xx): a fixed sentence for its code
and a reference, never the error's own words, unless a ``GenerationError`` carries a
``user_message`` (a sentence written for the user: Replicate's output off its file hosts or over
the size cap, the model's own reason for failing), which is answered instead.

Those words are written for the operator: a storage error names the server's paths, the S3
endpoint and the request URL, a local generation error torch's text. The API and the pages answer
the sentence (with the code, and the reference in ``details`` or on the page); the log has the
words and the error's details at error level under the same reference, so an operator finds the
line a user quotes. The CLI and the worker's logs keep the words: they are the operator's.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from selfie_lora.errors import ErrorCode, GenerationError, SelfieLoraError, StorageFullError

logger = logging.getLogger(__name__)

SERVER_ERROR_MESSAGE = "something went wrong on our side; please retry"
# A sentence a user can act on for the 5xx codes they meet; others answer SERVER_ERROR_MESSAGE.
_SENTENCES: dict[str, str] = {
    ErrorCode.STORAGE_ERROR: "the files or records could not be read or written just now; "
                             "please retry in a moment",
    ErrorCode.STORAGE_UNAVAILABLE: "the files or records cannot be reached just now; nothing "
                                   "is wrong with your request: please retry after the "
                                   "Retry-After header's seconds",
    ErrorCode.DELETION_PENDING: "your account is disabled and its deletion was cut short by a "
                                "storage error; it finishes on its own within minutes: nothing "
                                "more to do",
    ErrorCode.STORAGE_FULL: "the server's disk is full, so this could not be saved; nothing is "
                            "wrong with your request: please tell the operator, and try again "
                            "once they have freed space",
    ErrorCode.GENERATION_FAILED: "the pictures could not be made; please retry, or change the "
                                 "prompt",
    ErrorCode.TRAINER_UNAVAILABLE: "the training service cannot be reached just now; please "
                                   "retry in a few minutes",
    ErrorCode.SERVER_SHORT_OF_MEMORY: "the server was short of memory reading the upload; "
                                      "nothing is wrong with it: upload it again in a few "
                                      "minutes",
    ErrorCode.CONFIG_ERROR: "this service is not set up for that yet; please tell the operator",
    ErrorCode.DEPLOYMENT_MISMATCH: "this service's storage is not set up right just now, so "
                                   "nothing was changed; please tell the operator, and try "
                                   "again once it is fixed",
}
# The ``storage_full`` sentence of a quota used up (EDQUOT, ``StorageFullError.quota``): the disk
# may have room, so "full" and "freed space" sent the operator the user tells to ``df``, which
# does not see a quota.
STORAGE_QUOTA_MESSAGE = ("a disk quota of the server is used up, so this could not be saved; "
                         "nothing is wrong with your request: please tell the operator, and try "
                         "again once they have raised the quota or deleted files it counts")


@dataclass(frozen=True)
class ServerError:
    """The answer to a 5xx: its sentence, and the reference the log line carries."""

    message: str
    reference: str

    @property
    def details(self) -> list[dict[str, str]]:
        return [{"reference": self.reference}]


def retry_after_header(exc: SelfieLoraError) -> dict[str, str]:
    """The ``Retry-After`` of an error's answer, the API's and a page's alike: the seconds the
    error says (``SelfieLoraError.retry_after``: a storage outage's ``STORAGE_RETRY_AFTER``, a
    rate limit's wait), or none. One place, so a page's 503 cannot say another wait than the
    API's (it said none)."""
    return {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}


def server_error_sentence(code: str, *, quota: bool = False) -> str:
    """The sentence of a 5xx ``code``; ``quota``: a ``storage_full`` that is a quota used up."""
    if quota and code == ErrorCode.STORAGE_FULL:
        return STORAGE_QUOTA_MESSAGE
    return _SENTENCES.get(code, SERVER_ERROR_MESSAGE)


def report_server_error(exc: BaseException, *, method: str, path: str) -> ServerError:
    """Log ``exc`` for the operator (its words, details and, for an unexpected one, the traceback)
    with a new reference; what the client is told instead. ``path`` is the request's path, never
    its query (it may carry a token)."""
    reference = secrets.token_hex(6)
    extra = {"error_reference": reference}
    if isinstance(exc, SelfieLoraError):
        logger.error("%s %s: %s (reference %s): %s%s", method, path, exc.code, reference,
                     exc.message, f" {exc.details}" if exc.details else "", extra=extra)
        sentence = server_error_sentence(
            exc.code, quota=isinstance(exc, StorageFullError) and exc.quota)
        if isinstance(exc, GenerationError) and exc.user_message:
            sentence = exc.user_message  # written for the user (the error's docstring)
    else:
        logger.error("%s %s: unexpected error (reference %s)", method, path, reference,
                     exc_info=exc, extra=extra)
        sentence = SERVER_ERROR_MESSAGE
    return ServerError(message=sentence, reference=reference)
