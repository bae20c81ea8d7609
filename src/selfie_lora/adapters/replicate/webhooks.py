"""Replicate webhooks: Standard Webhooks signature checks and reading a training webhook body.

Also home of the log parser shared by the poller and the webhook route (ai-toolkit's tqdm lines
carry ``step/total``). This module needs only ``standardwebhooks``, not the ``replicate`` client,
so the API process can verify webhooks without the optional dependency.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

from selfie_lora.adapters.replicate.statuses import STATUSES
from selfie_lora.domain.webhook_secrets import webhook_secret_problem
from selfie_lora.errors import AuthError, ConfigError, ErrorCode, InvalidInputError
from selfie_lora.services.ports import ProgressBar, RemoteTrainingEvent

logger = logging.getLogger(__name__)

__all__ = [
    "REFUSALS_SAID_EVERY_SECONDS",
    "TOLERANCE_SECONDS",
    "LogProgress",
    "ReplicateWebhooks",
    "WebhookSignatureMismatchError",
    "WebhookTimestampError",
    "log_bars",
    "parse_log_progress",
    "parse_training_webhook",
    "verify_webhook",
]

TOLERANCE_SECONDS = 5 * 60
# How often a refusal of one kind (no signature matches, the timestamp off) may be logged: a
# wrong secret or a clock that is off refuses every delivery, and Replicate retries each.
REFUSALS_SAID_EVERY_SECONDS = 10 * 60

# A tqdm bar: "label:  40%|████      | 400/1000 [00:10<00:15, 39.5it/s, lr: 4e-04 loss: 0.32]".
# The label keeps the spaces before the percentage: a ``\s*`` between them could match the same
# spaces as the label, and a long run of them with no bar after (a padded line of the logs,
# which the webhook body and the poller both read) took the search quadratic time: a line of
# 20,000 spaces held a thread for seconds, one a signed 2 MiB body may carry for hours.
_BAR = re.compile(r"^(?P<label>[^|\r\n]*?)\d{1,3}%\|[^|\r\n]*\|\s*(?P<step>\d+)/(?P<total>\d+)")
# The same numbers without the bar, as some ai-toolkit versions print them.
_BARE = re.compile(r"(?:^|\s)(?P<step>\d+)/(?P<total>\d+)\s*\[")
_LOSS = re.compile(r"loss[:=]\s*(?P<loss>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


# --------------------------------------------------------------------------- signatures


class WebhookSignatureMismatchError(AuthError):
    """Well-formed signature headers, but no ``v1`` signature matches the secret."""


class WebhookTimestampError(AuthError):
    """The signed timestamp is more than ``TOLERANCE_SECONDS`` away from this server's clock;
    ``skew``: this clock minus the timestamp, in seconds (positive: the webhook looks old)."""

    def __init__(self, message: str, *, skew: int) -> None:
        super().__init__(message)
        self.skew = skew


def verify_webhook(*, secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
    """Check a Standard Webhooks signature; raise :class:`AuthError` on any problem.

    The signature is computed with the package's ``Webhook.sign`` and compared in constant time
    against every ``v1`` entry (key rotation sends several): none matching raises
    :class:`WebhookSignatureMismatchError`. The timestamp is checked after it, against ``now``
    (default: the wall clock; ``Webhook.verify`` reads the clock itself):
    :class:`WebhookTimestampError` when more than 5 minutes off. Every exception, including the
    ``ValueError``/``UnicodeDecodeError`` the package raises on garbage, becomes a 401.
    """
    try:
        lowered = {str(k).lower(): str(v) for k, v in headers.items()}
        msg_id = lowered.get("webhook-id", "")
        stamp = lowered.get("webhook-timestamp", "")
        signatures = lowered.get("webhook-signature", "")
        if not (msg_id and stamp and signatures):
            raise AuthError("webhook signature headers are missing")
        if not stamp.isdigit():
            raise AuthError("webhook timestamp is not a number")
        sent_at = int(stamp)
        expected = Webhook(secret).sign(
            msg_id=msg_id,
            timestamp=datetime.fromtimestamp(sent_at, tz=UTC),
            data=body.decode("utf-8"),
        )
        expected_sig = base64.b64decode(expected.split(",", 1)[1])
        for entry in signatures.split():
            version, _, sig = entry.partition(",")
            if version != "v1":
                continue
            try:
                given = base64.b64decode(sig, validate=True)
            except ValueError:
                continue  # one garbled entry must not hide a good one after it
            if hmac.compare_digest(given, expected_sig):
                break
        else:
            raise WebhookSignatureMismatchError("no webhook signature matches")
        # The time after the signature: a refusal for the time (logged as this clock being
        # off) is then one of a delivery really signed with the secret, not anybody's POST.
        clock = time.time() if now is None else now
        if abs(clock - sent_at) > TOLERANCE_SECONDS:
            raise WebhookTimestampError("webhook timestamp is more than 5 minutes off",
                                        skew=round(clock - sent_at))
    except AuthError:
        raise
    except Exception as exc:  # the package raises several types on malformed input
        raise AuthError(f"webhook verification failed: {type(exc).__name__}") from exc


# --------------------------------------------------------------------------- logs


@dataclass(frozen=True)
class LogProgress:
    step: int
    total: int
    loss: float | None = None


def _labelled_bars(logs: str) -> list[tuple[str, int, int]]:
    """``(label, step, total)`` of every bar in ``logs``, in order."""
    found: list[tuple[str, int, int]] = []
    for line in re.split(r"[\r\n]+", logs):
        m = _BAR.search(line)
        if m is not None:
            label = m.group("label")
        else:
            m = _BARE.search(line)
            if m is None:
                continue
            label = line[: m.start()]
        step, total = int(m.group("step")), int(m.group("total"))
        if total > 0 and step <= total:
            found.append((label.lower(), step, total))
    return found


def log_bars(logs: str | None) -> list[ProgressBar]:
    """Every ``step/total`` bar of ``logs``, in order, each marked when its label says train."""
    return [ProgressBar(step=step, total=total, train="train" in label)
            for label, step, total in _labelled_bars(logs or "")]


def parse_log_progress(
    logs: str | None, *, expected_total: int | None = None, label: str | None = None
) -> LogProgress | None:
    """The last ``step/total`` of the training bar in ``logs``, with the last loss seen.

    Logs also hold other bars (``Caching latents: 12/12``). With ``expected_total`` (the recipe's
    steps) only bars over that total count; with ``label`` only bars whose label contains it;
    otherwise bars whose label mentions ``train`` win over others.
    """
    if not logs:
        return None
    matches = [
        ("train" in found_label, step, total)
        for found_label, step, total in _labelled_bars(logs)
        if (expected_total is None or total == expected_total)
        and (label is None or label.lower() in found_label)
    ]
    if not matches:
        return None
    preferred = [m for m in matches if m[0]] or matches
    _, step, total = preferred[-1]
    losses = _LOSS.findall(logs)
    loss = float(losses[-1]) if losses else None
    return LogProgress(step=step, total=total, loss=loss)


# --------------------------------------------------------------------------- bodies


def parse_training_webhook(body: bytes) -> dict[str, Any]:
    """Read a Replicate training webhook body (the training object).

    Returns ``{"id", "status", "step", "total", "loss", "bars", "output", "error", "logs"}``;
    ``step``, ``total`` and ``loss`` are the logs' likeliest training bar without knowing the
    training's step count (None without a bar): for display only. Progress is applied from
    ``bars`` (``log_bars``), once the training and so its total are known.
    Raises :class:`InvalidInputError` when the body is not a training object.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError("webhook body is not JSON", code=ErrorCode.BAD_WEBHOOK) from exc
    except RecursionError:
        # Arrays or objects nested past Python's recursion limit ('[' * 100000, signed): the
        # parser's RecursionError was answered 500 with a traceback, and Replicate retried it.
        # Unreadable like any other body that is not a training object. ``from None``: the
        # chain of thousands of frames says nothing more.
        raise InvalidInputError("webhook body is nested too deeply to read",
                                code=ErrorCode.BAD_WEBHOOK) from None
    if not isinstance(data, dict):
        raise InvalidInputError("webhook body is not a JSON object", code=ErrorCode.BAD_WEBHOOK)
    remote_id, status = data.get("id"), data.get("status")
    if not isinstance(remote_id, str) or not remote_id or not isinstance(status, str):
        raise InvalidInputError("webhook body lacks id or status", code=ErrorCode.BAD_WEBHOOK)
    # "aborted": Replicate's run whose deadline passed before it started. Accepted (a 4xx is
    # retried by Replicate for nothing); the worker's poll ends the training.
    if status not in STATUSES:
        raise InvalidInputError(f"unknown training status {status!r}", code=ErrorCode.BAD_WEBHOOK)
    logs = data.get("logs") if isinstance(data.get("logs"), str) else None
    progress = parse_log_progress(logs)
    error = data.get("error")
    return {
        "id": remote_id,
        "status": status,
        "step": progress.step if progress else None,
        "total": progress.total if progress else None,
        "loss": progress.loss if progress else None,
        "bars": log_bars(logs),
        "output": data.get("output"),
        "error": str(error) if error else None,
        "logs": logs,
    }


class ReplicateWebhooks:
    """The ``WebhookVerifier`` port for Replicate: Standard Webhooks signatures with ``secret``,
    then the training object in the body (the signed body alone says which training it is)."""

    def __init__(self, *, secret: str, monotonic: Callable[[], float] = time.monotonic) -> None:
        # Checked once, here (the settings check it too, for the command line): a secret that
        # is not one answered every delivery 401 ("webhook verification failed"), which only
        # the logs of Replicate's retries showed. The package decodes leniently, dropping what
        # is not base64, so its own check let 'my-secret-string' through.
        problem = webhook_secret_problem(secret)
        if problem is not None:
            raise ConfigError(f"SELFIE_LORA_WEBHOOK_SECRET {problem}")
        self._secret = secret
        # When each kind of refusal was last logged (``_refused``).
        self._monotonic = monotonic
        self._said: dict[type[AuthError], float] = {}
        self._said_lock = threading.Lock()

    def verify(self, *, headers: dict[str, str], body: bytes) -> RemoteTrainingEvent:
        try:
            verify_webhook(secret=self._secret, headers=headers, body=body)
        except (WebhookSignatureMismatchError, WebhookTimestampError) as exc:
            self._refused(exc)
            raise
        event = parse_training_webhook(body)
        webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        return RemoteTrainingEvent(webhook_id=webhook_id, remote_id=str(event["id"]),
                                   status=str(event["status"]), bars=tuple(event["bars"]))

    def _refused(self, exc: WebhookSignatureMismatchError | WebhookTimestampError) -> None:
        """Say why a well-formed delivery was refused, once every ``REFUSALS_SAID_EVERY_SECONDS``
        for each kind (the rest at DEBUG). A wrong secret or a clock more than 5 minutes off
        answers every delivery 401, and only the error counter showed it. Neither the secret
        nor the signature is ever in the line."""
        now = self._monotonic()
        with self._said_lock:
            last = self._said.get(type(exc))
            loud = last is None or now - last >= REFUSALS_SAID_EVERY_SECONDS
            if loud:
                self._said[type(exc)] = now
        every = f"said at most once every {REFUSALS_SAID_EVERY_SECONDS // 60} minutes"
        if isinstance(exc, WebhookTimestampError):
            ahead = "ahead of" if exc.skew > 0 else "behind"
            logger.log(logging.WARNING if loud else logging.DEBUG,
                       "Replicate webhook refused (401): its signed timestamp is outside the "
                       "%d s window, this server's clock %d s %s it (check this machine's "
                       "clock); every delivery so far off is refused (%s)",
                       TOLERANCE_SECONDS, abs(exc.skew), ahead, every)
        else:
            logger.log(logging.WARNING if loud else logging.DEBUG,
                       "Replicate webhook refused (401): signature mismatch, no signature "
                       "matches SELFIE_LORA_WEBHOOK_SECRET (a wrong secret, a body changed on "
                       "the way, or not sent by Replicate; Replicate's secret is GET "
                       "/v1/webhooks/default/secret); every "
                       "delivery so signed is refused (%s)", every)
