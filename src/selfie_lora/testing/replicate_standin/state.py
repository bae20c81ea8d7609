"""What the Replicate stand-in holds, saw and is steered by, and how its trainings and
predictions advance; nothing here speaks HTTP (see ``routes`` and ``server``)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import secrets
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, Literal

import numpy as np

OutputShape = Literal["dict", "url", "list", "safetensors", "tar_in_list", "wrong_version", "nested", "zip",
                      "null_version", "bare_version"]
# "aborted": Replicate ends a run whose deadline passed before it started with this status.
Outcome = Literal["succeeded", "failed", "canceled", "aborted"]
OUTPUT_SHAPES: tuple[OutputShape, ...] = (
    "dict",
    "url",
    "list",
    "safetensors",
    "tar_in_list",
    "wrong_version",
    "nested",
    "zip",
    # Shapes the official client's trainings.get cannot parse (seen on the account's list).
    "null_version",
    "bare_version",
)
# The shapes whose output names no (readable) version.
_VERSIONLESS = frozenset({"url", "list", "null_version"})
_TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")
_LORA_MODULES = (
    "transformer.single_transformer_blocks.0.attn.to_q",
    "transformer.single_transformer_blocks.0.attn.to_k",
    "transformer.transformer_blocks.0.attn.to_v",
)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _new_id() -> str:
    # Replicate ids are 26 lowercase base32 characters
    return base64.b32encode(secrets.token_bytes(16)).decode().lower().rstrip("=")


def sign_webhook(
    *, secret: str, body: bytes, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, as Replicate sends them (for tests)."""
    from standardwebhooks.webhooks import Webhook

    msg_id = msg_id or f"msg_{_new_id()}"
    stamp = int(time.time()) if timestamp is None else timestamp
    signature = Webhook(secret).sign(
        msg_id=msg_id, timestamp=datetime.fromtimestamp(stamp, tz=UTC), data=body.decode()
    )
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature,
    }


# --------------------------------------------------------------------------- records


@dataclass
class _Rule:
    method: str
    pattern: str
    times: int
    status: int = 500
    retry_after: str | None = None
    delay: float = 0.0
    # Applies only while this answers True (``fail_while``); always when None.
    active: Callable[[], bool] | None = None

    def matches(self, method: str, path: str) -> bool:
        if method.upper() != self.method.upper():
            return False
        if any(ch in self.pattern for ch in "*?["):
            return fnmatchcase(path, self.pattern)
        return path.startswith(self.pattern)


@dataclass
class StandInFile:
    id: str
    name: str
    content_type: str
    data: bytes
    metadata: dict[str, Any]
    created_at: str


@dataclass
class StandInTraining:
    """One training as the stand-in saw and runs it."""

    id: str
    body: dict[str, Any]  # the create request body, as sent
    trainer_model: str  # "owner/name" from the URL
    trainer_version: str  # the version id from the URL
    ran_version: str | None  # the version id it says it ran (None: ``trainer_version``)
    destination: str
    input: dict[str, Any]
    webhook: str | None
    webhook_events_filter: list[str] | None
    input_files: list[str] | None  # member names of the decoded input zip (None: undecodable)
    captions: dict[str, str]  # caption .txt member -> text
    input_error: str | None
    outcome: Outcome
    output_shape: OutputShape
    error_text: str
    starting_polls: int
    processing_polls: int
    created_at: str
    status: str = "starting"
    polls: int = 0
    logs: str = ""
    output: Any = None
    error: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    weights: bytes | None = None  # the lora.safetensors put in the output
    result_version: str | None = None  # "owner/name:<hex>" of the output
    cancel_requests: int = 0

    @property
    def steps(self) -> int:
        try:
            return max(1, int(self.input.get("steps", 1000)))
        except (TypeError, ValueError):
            return 1000

    @property
    def trigger_word(self) -> str | None:
        value = self.input.get("trigger_word")
        return value if isinstance(value, str) else None


@dataclass
class StandInPrediction:
    id: str
    body: dict[str, Any]
    model: str
    version_id: str
    input: dict[str, Any]
    created_at: str
    outcome: Outcome = "succeeded"
    status: str = "starting"
    polls: int = 0
    output: Any = None
    error: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    images: list[bytes] = field(default_factory=list)


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def _json(status: int, data: Any, headers: Mapping[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps(data).encode(), headers=dict(headers or {}))


def _problem(status: int, detail: str, title: str | None = None) -> _Reply:
    titles = {
        400: "Bad request",
        401: "Unauthenticated",
        404: "Not found",
        409: "Conflict",
        422: "Input validation failed",
        429: "Request was throttled",
        500: "Internal server error",
        503: "Service unavailable",
    }
    return _Reply(
        status,
        json.dumps(
            {"title": title or titles.get(status, "Error"), "detail": detail, "status": status}
        ).encode(),
        content_type="application/problem+json",
    )


# --------------------------------------------------------------------------- the state


class StandInState:
    """Everything the stand-in holds and saw, its steering knobs, and how a training or a
    prediction advances. ``StandInRoutes`` serves it over HTTP; ``ReplicateStandIn`` runs that."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # set by the server once it listens: output and ``urls`` links are built on it
        self.base_url = ""

        # what it holds and saw
        self.models: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}  # "owner/name" -> newest first
        self.model_creations: list[dict[str, Any]] = []
        self.files: dict[str, StandInFile] = {}
        self.trainings: dict[str, StandInTraining] = {}
        self.predictions: dict[str, StandInPrediction] = {}
        self.requests: list[tuple[str, str]] = []
        self.blobs: dict[str, tuple[bytes, str]] = {}  # "/files/..." -> (bytes, content type)
        self.webhook_deliveries: list[dict[str, Any]] = []

        # steering knobs (read when a training or prediction is created)
        self.output_shape: OutputShape = "dict"
        self.training_outcome: Outcome = "succeeded"
        self.training_error = "CUDA out of memory. Tried to allocate 2.00 GiB"
        self.starting_polls = 1
        self.processing_polls = 2
        self.prediction_polls = 1
        self.prediction_outcome: Outcome = "succeeded"
        self.prediction_error = "NSFW content detected. Try running it again, or try a different prompt."
        # Seeds whose images the safety checker flags: the trained version's predictor drops a
        # flagged image and still succeeds (replicate/flux-fine-tuner predict.py).
        self.withheld_seeds: set[int] = set()
        self.page_size = 100
        # The trainer version id a new training says it ran, whatever version its create named
        # (replicate-python #419: Replicate once ran the newest trainer); None: the one named.
        self.trainer_version_ran: str | None = None
        # The origin output URLs name (None: the stand-in's own): a trainer whose output points
        # elsewhere, such as http://localhost:PORT, the stand-in under a name that is not the
        # configured API's.
        self.output_base_url: str | None = None
        # False: a training whose output names no version ("url", "list", "null_version")
        # publishes none on its destination (read when it succeeds), as when Replicate adds it
        # late, or the output is another tool's; a test adds it with ``create_model_version``.
        self.publish_versions = True
        self._failures: list[_Rule] = []
        self._delays: list[_Rule] = []

    # ----------------------------------------------------------------- steering

    def fail_next(
        self,
        method: str,
        path_prefix: str,
        *,
        status: int = 500,
        times: int = 1,
        retry_after: float | str | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` and do nothing else.

        ``path_prefix`` is a path prefix, or an fnmatch pattern when it holds ``*?[``
        (e.g. ``"/v1/models/*/trainings"``). ``retry_after`` sets a ``Retry-After`` header.
        """
        retry = None if retry_after is None else str(retry_after)
        with self.lock:
            self._failures.append(_Rule(method, path_prefix, times, status, retry))

    def fail_while(self, method: str, path_prefix: str, active: Callable[[], bool], *,
                   status: int = 503) -> None:
        """Answer every matching request with ``status`` while ``active()`` is true (an outage
        that ends at a time of the test's clock), as ``fail_next`` does."""
        with self.lock:
            self._failures.append(_Rule(method, path_prefix, 2**62, status, active=active))

    def slow_next(self, method: str, path_prefix: str, *, delay: float, times: int = 1) -> None:
        """Do the work of the next ``times`` matching requests, then wait ``delay`` seconds
        before answering (a client with a shorter timeout gives up after the server acted)."""
        with self.lock:
            self._delays.append(_Rule(method, path_prefix, times, delay=delay))

    def add_model(self, destination: str, *, visibility: str = "private") -> dict[str, Any]:
        """Create a model directly (as if made on the web)."""
        owner, name = destination.split("/", 1)
        with self.lock:
            return self._create_model(owner, name, visibility=visibility, hardware="cpu")

    def create_model_version(self, destination: str) -> str:
        """Add a version to a model (creating it if needed); return ``owner/name:<id>``."""
        with self.lock:
            if destination not in self.models:
                self.add_model(destination)
            return self._add_version(destination)

    def finish(self, training_id: str) -> StandInTraining:
        """Move a training straight to its outcome, without polls."""
        with self.lock:
            rec = self.trainings[training_id]
            if rec.status not in _TERMINAL:
                rec.polls = rec.starting_polls + rec.processing_polls + 1
                self._advance(rec)
            return rec

    # ----------------------------------------------------------------- inspection

    def trainings_for(self, destination: str) -> list[StandInTraining]:
        with self.lock:
            return [t for t in self.trainings.values() if t.destination == destination]

    def count(self, method: str, path_prefix: str) -> int:
        rule = _Rule(method, path_prefix, 0)
        with self.lock:
            return sum(1 for m, p in self.requests if rule.matches(m, p))

    def weights_for(self, training_id: str) -> bytes:
        with self.lock:
            weights = self.trainings[training_id].weights
        if weights is None:
            raise KeyError(f"training {training_id} has no weights (yet)")
        return weights

    # ----------------------------------------------------------------- models

    def _create_model(self, owner: str, name: str, *, visibility: str, hardware: str) -> dict[str, Any]:
        model = {
            "url": f"https://replicate.com/{owner}/{name}",
            "owner": owner,
            "name": name,
            "description": None,
            "visibility": visibility,
            "hardware": hardware,
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "run_count": 0,
            "cover_image_url": None,
            "default_example": None,
            "created_at": _now(),
        }
        self.models[f"{owner}/{name}"] = model
        self.versions.setdefault(f"{owner}/{name}", [])
        return model

    def _add_version(self, destination: str) -> str:
        version = {
            "id": secrets.token_hex(32),
            "created_at": _now(),
            "cog_version": "0.9.4",
            "openapi_schema": {},
        }
        self.versions.setdefault(destination, []).insert(0, version)
        return f"{destination}:{version['id']}"

    # ----------------------------------------------------------------- trainings

    def _advance(self, rec: StandInTraining) -> None:
        """Set ``rec``'s state from its poll count."""
        if rec.input_error is not None and rec.polls > rec.starting_polls:
            self._finish(rec, "failed", error=rec.input_error)
            return
        if rec.polls <= rec.starting_polls:
            return
        if rec.outcome == "aborted":  # never started: no logs, no started_at
            self._finish(rec, "aborted")
            return
        processing_poll = rec.polls - rec.starting_polls
        if processing_poll <= rec.processing_polls:
            if rec.status == "starting":
                rec.status, rec.started_at = "processing", _now()
                self._notify(rec, "start")
            fraction = processing_poll / (rec.processing_polls + 1)
            rec.logs = self._logs(rec, fraction)
            return
        if rec.started_at is None:
            rec.started_at = _now()
        if rec.outcome == "succeeded":
            self._succeed(rec)
        elif rec.outcome == "failed":
            rec.logs = self._logs(rec, 0.5) + f"\nTraceback (most recent call last):\n{rec.error_text}\n"
            self._finish(rec, "failed", error=rec.error_text)
        else:
            rec.logs = self._logs(rec, 0.5) + "\nTraining canceled.\n"
            self._finish(rec, "canceled")

    def _finish(self, rec: StandInTraining, status: str, *, error: str | None = None) -> None:
        rec.status, rec.error, rec.completed_at = status, error, _now()
        self._notify(rec, "completed")

    def _logs(self, rec: StandInTraining, fraction: float) -> str:
        images = [n for n in rec.input_files or [] if not n.lower().endswith(".txt")]
        n = len(images)
        steps = rec.steps
        lines = [
            f"Extracting {n} images from input_images",
            f"Caching latents to disk: 100%|██████████| {n}/{n} [00:01<00:00,  9.50it/s]",
            f"flux_train_replicate:   0%|          | 0/{steps} [00:00<?, ?it/s]",
        ]
        marks = sorted({max(1, int(steps * k / 4)) for k in range(1, 5) if k / 4 <= fraction})
        marks.append(int(steps * fraction))
        for step in sorted(set(marks)):
            if step <= 0:
                continue
            pct = int(100 * step / steps)
            bar = ("█" * (pct // 10)).ljust(10)
            loss = 0.45 - 0.2 * step / steps
            lines.append(
                f"flux_train_replicate: {pct:3d}%|{bar}| {step}/{steps} "
                f"[00:{step % 60:02d}<00:10,  2.10it/s, lr: 4.0e-04 loss: {loss:.3e}]"
            )
        return "\n".join(lines) + "\n"

    def _succeed(self, rec: StandInTraining) -> None:
        rank = rec.input.get("lora_rank", 16)
        rec.weights = _lora_bytes(
            rec.id, rank=int(rank) if isinstance(rank, int) else 16, trigger=rec.trigger_word
        )
        prefix = f"/files/trainings/{rec.id}"
        tar_path, st_path = f"{prefix}/trained_model.tar", f"{prefix}/lora.safetensors"
        zip_path, log_path = f"{prefix}/trained_model.zip", f"{prefix}/training_log.txt"
        self.blobs[tar_path] = (self._output_tar(rec), "application/x-tar")
        self.blobs[st_path] = (rec.weights, "application/octet-stream")
        self.blobs[zip_path] = (self._output_zip(rec), "application/zip")
        self.blobs[log_path] = (rec.logs.encode(), "text/plain")
        self.blobs[f"{prefix}/sample.png"] = (_png((40, 90, 160), 32, 32), "image/png")
        url = self.output_base_url or self.base_url
        if rec.output_shape == "wrong_version":
            other = "someone-else/other-model"
            if other not in self.models:
                self._create_model("someone-else", "other-model", visibility="public", hardware="cpu")
            rec.result_version = self._add_version(other)
        elif self.publish_versions or rec.output_shape not in _VERSIONLESS:
            rec.result_version = self._add_version(rec.destination)
        outputs: dict[str, Any] = {
            "dict": {"version": rec.result_version, "weights": url + tar_path},
            "wrong_version": {"version": rec.result_version, "weights": url + tar_path},
            "url": url + tar_path,
            "list": [url + log_path, url + tar_path, f"{url}{prefix}/sample.png"],
            "safetensors": {"version": rec.result_version, "weights": url + st_path},
            "tar_in_list": {"version": rec.result_version, "weights": [url + tar_path]},
            "nested": {
                "version": rec.result_version,
                "artifacts": {
                    "files": [{"name": "log", "url": url + log_path}, {"name": "lora", "url": url + st_path}]
                },
            },
            "zip": {"version": rec.result_version, "weights": url + zip_path},
            "null_version": {"version": None, "weights": url + tar_path},
            "bare_version": {"version": (rec.result_version or ":").split(":", 1)[1],
                             "weights": url + tar_path},
        }
        rec.output = outputs[rec.output_shape]
        rec.logs = self._logs(rec, 1.0) + "Saved to output/flux_train_replicate/lora.safetensors\n"
        self._finish(rec, "succeeded")

    def _output_tar(self, rec: StandInTraining) -> bytes:
        assert rec.weights is not None
        members: dict[str, bytes] = {
            "output/flux_train_replicate/lora.safetensors": rec.weights,
            "output/flux_train_replicate/config.yaml": (
                f"job: extension\nconfig:\n  name: flux_train_replicate\n"
                f"  trigger_word: {rec.trigger_word}\n  steps: {rec.steps}\n"
            ).encode(),
        }
        for name, text in rec.captions.items():
            members[f"output/flux_train_replicate/captions/{name.rsplit('/', 1)[-1]}"] = text.encode()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
                archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    def _output_zip(self, rec: StandInTraining) -> bytes:
        assert rec.weights is not None
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("output/flux_train_replicate/lora.safetensors", rec.weights)
            archive.writestr("output/flux_train_replicate/config.yaml", "job: extension\n")
        return buffer.getvalue()

    # ----------------------------------------------------------------- predictions

    def _advance_prediction(self, pred: StandInPrediction) -> None:
        if pred.polls <= self.prediction_polls:
            if pred.status == "starting":
                pred.status, pred.started_at = "processing", _now()
            return
        if pred.outcome != "succeeded":
            pred.status, pred.completed_at = pred.outcome, _now()
            pred.error = self.prediction_error if pred.outcome == "failed" else None
            return
        count = pred.input.get("num_outputs", 1)
        count = min(4, max(1, count if isinstance(count, int) else 1))
        seed = pred.input.get("seed")
        width = _dimension(pred.input.get("width"))
        height = _dimension(pred.input.get("height"))
        urls = []
        for i in range(count):
            if seed in self.withheld_seeds:
                continue
            digest = hashlib.sha256(f"{seed}:{i}:{pred.input.get('prompt')}".encode()).digest()
            image = _png((digest[0], digest[1], digest[2]), width, height)
            pred.images.append(image)
            path = f"/files/predictions/{pred.id}/out-{i}.png"
            self.blobs[path] = (image, "image/png")
            urls.append((self.output_base_url or self.base_url) + path)
        pred.output, pred.status, pred.completed_at = urls, "succeeded", _now()

    # ----------------------------------------------------------------- webhooks

    def _notify(self, rec: StandInTraining, event: str) -> None:
        """Send ``rec``'s webhook for ``event``. The payload is the API's training JSON, so
        ``StandInRoutes`` implements this."""
        raise NotImplementedError


# --------------------------------------------------------------------------- helpers


def _parse_multipart(body: bytes, boundary: bytes) -> dict[str, tuple[str | None, str | None, bytes]]:
    """``{field: (filename, content_type, bytes)}`` of a multipart/form-data body."""
    fields: dict[str, tuple[str | None, str | None, bytes]] = {}
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        part = part.removeprefix(b"\r\n")
        head, _, content = part.partition(b"\r\n\r\n")
        content = content.removesuffix(b"\r\n")
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", errors="replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (
                filename.group(1) if filename else None,
                headers.get("content-type"),
                content,
            )
    return fields


def _lora_bytes(seed_text: str, *, rank: int, trigger: str | None) -> bytes:
    """A small but real safetensors LoRA (deterministic per training)."""
    from safetensors.numpy import save

    rank = max(1, min(rank, 8))
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little"))
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for module in _LORA_MODULES:
        tensors[f"{module}.lora_A.weight"] = rng.standard_normal((rank, 32), dtype=np.float32)
        tensors[f"{module}.lora_B.weight"] = rng.standard_normal((32, rank), dtype=np.float32) * 0.01
    metadata = {"format": "pt", "source": "replicate-standin", "trigger_word": trigger or ""}
    return save(tensors, metadata=metadata)


def _png(color: tuple[int, int, int], width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _dimension(value: object) -> int:
    if isinstance(value, int) and 16 <= value <= 512:
        return value
    return 64
