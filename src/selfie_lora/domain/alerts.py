"""When a likeness alert is sent (again): the pure part of its delivery.

An alert is written with the gate's decision, in the same transaction, as due (the version's
``alert_due_at``); whoever sends it first pushes that time ``CLAIM`` ahead, so no other process
sends it meanwhile, and a sender that dies leaves it due again once the claim runs out. A failed
delivery is tried again after ``retry_after``: 1, 2, 4 ... minutes, at most an hour apart, until
``MAX_ATTEMPTS`` (about four hours of an endpoint that is down); then it is given up, and the
alert stays recorded on the version. Delivery is at least once: a sender that dies after the
receiver took the alert but before it recorded so sends it again, with the same ``alert_id``.

A claim is kept two ways. A send lasts at most ``MAX_SEND_SECONDS`` in all (the alerter's overall
deadline, and the bound on its setting), well within ``CLAIM``, so a live sender is done before
anyone else may take the alert. And a sender records how its send went only while the alert's due
time is still the one its claim wrote (a compare-and-set): a sender that outlived its claim anyway
(a stalled process, a paused VM) drops its late result rather than overwrite a newer one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

CLAIM = timedelta(minutes=5)
# A fifth of CLAIM: room for the database writes around a send, and for a slow process.
MAX_SEND_SECONDS = 60.0
MAX_ATTEMPTS = 10
_FIRST_RETRY = timedelta(minutes=1)
_LONGEST_WAIT = timedelta(hours=1)


def retry_after(attempts: int) -> timedelta | None:
    """How long after the failed attempt number ``attempts`` (1 for the first) the next one is
    due; None when that was the last."""
    if attempts >= MAX_ATTEMPTS:
        return None
    return min(_FIRST_RETRY * (1 << max(0, attempts - 1)), _LONGEST_WAIT)


@dataclass(frozen=True)
class ClaimedAlert:
    """An alert this process holds the claim on: ``claim`` is the due time its claim wrote (the
    gate's transaction, or ``claim_alert``), which the outcome's write must still find."""

    version_id: str
    alert: dict[str, Any]
    claim: datetime


__all__ = ["CLAIM", "MAX_ATTEMPTS", "MAX_SEND_SECONDS", "ClaimedAlert", "retry_after"]
