"""A stand-in for Replicate's HTTP API, served on 127.0.0.1 from a background thread.

It speaks the routes and JSON shapes of https://replicate.com/docs/reference/http that selfie-lora
uses (models, versions, trainings, predictions, file uploads) closely enough for the official
``replicate`` client, records what it was sent, and can be made to misbehave: fail the next
matching requests with 429/5xx, answer slowly *after* doing the work (so a client times out on a
create that did happen), end trainings as failed or canceled, and answer with every output shape
trainers have been seen to use.

    with ReplicateStandIn() as standin:
        client = replicate.Client(api_token=standin.token, base_url=standin.base_url)
        ...
        assert len(standin.trainings) == 1

Trainings advance as they are polled (``GET /v1/trainings/{id}``): ``starting_polls`` answers of
``starting``, then ``processing_polls`` answers of ``processing`` with growing ai-toolkit logs,
then the outcome. Output files are served without auth under ``/files/`` (like
``replicate.delivery``).

The package holds, by concern:

- ``state``: the records (``StandInFile``, ``StandInTraining``, ``StandInPrediction``), output
  shapes and outcomes, ``sign_webhook``, and ``StandInState``: what the stand-in holds and saw,
  its steering knobs and inspection helpers, and how trainings and predictions advance and what
  they output;
- ``routes``: ``StandInRoutes``, the HTTP side over that state: auth, injected failures and
  delays, the ``/v1`` routes and their JSON, ``/files`` blobs, and webhook delivery;
- ``server``: the loopback ``ThreadingHTTPServer`` and ``ReplicateStandIn``, which runs the routes
  on it (``start``/``stop``, a context manager).
"""

from selfie_lora.testing.replicate_standin.server import ReplicateStandIn
from selfie_lora.testing.replicate_standin.state import (
    OUTPUT_SHAPES,
    Outcome,
    OutputShape,
    StandInFile,
    StandInPrediction,
    StandInTraining,
    sign_webhook,
)

__all__ = [
    "OUTPUT_SHAPES",
    "Outcome",
    "OutputShape",
    "ReplicateStandIn",
    "StandInFile",
    "StandInPrediction",
    "StandInTraining",
    "sign_webhook",
]
