"""Replicate's statuses of a training or a prediction, and reading one that the official client
cannot: ``aborted`` (a run whose deadline passed before it started) is missing from the client's
status ``Literal``, so validating such a body as a ``Training`` or ``Prediction`` fails. One
place for the set and the workaround, which the trainer and the generator each spelled out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # the caller passes the class: the webhooks' check needs no client
    from replicate.prediction import Prediction
    from replicate.training import Training

# Replicate's documented status of a run whose deadline passed before it could start. The
# official client (1.0.7) knows only the other five and refuses to parse it, which read as an
# outage ("Replicate could not be reached") for every attempt.
ABORTED = "aborted"
# The statuses after which a run changes no more (a training in one has nothing to cancel).
ENDED = frozenset({"succeeded", "failed", "canceled", ABORTED})
# Every status Replicate sends (a webhook with another is refused).
STATUSES = frozenset({"starting", "processing"}) | ENDED

_Run = TypeVar("_Run", "Training", "Prediction")


def validated(model: type[_Run], data: Mapping[str, Any]) -> _Run:
    """``model`` (the client's ``Training`` or ``Prediction``) from the API's JSON object, an
    ``aborted`` status included: validated as "failed" (an ended status the client knows, so
    the rest of the body is read as for any run), then given its own status back."""
    aborted = data.get("status") == ABORTED
    run = model(**({**data, "status": "failed"} if aborted else data))
    if aborted:
        run.status = ABORTED  # type: ignore[assignment]  # the client's Literal lacks it
    return run
