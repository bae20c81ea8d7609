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
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import logging
import re
import secrets
import socket
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_SHAPES",
    "ReplicateStandIn",
    "StandInFile",
    "StandInPrediction",
    "StandInTraining",
    "sign_webhook",
]

OutputShape = Literal["dict", "url", "list", "safetensors", "tar_in_list", "wrong_version", "nested", "zip"]
Outcome = Literal["succeeded", "failed", "canceled"]
OUTPUT_SHAPES: tuple[OutputShape, ...] = (
    "dict",
    "url",
    "list",
    "safetensors",
    "tar_in_list",
    "wrong_version",
    "nested",
    "zip",
)
_TERMINAL = frozenset({"succeeded", "failed", "canceled"})
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


# --------------------------------------------------------------------------- the server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, standin: ReplicateStandIn, host: str) -> None:
        self.standin = standin
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((host, 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:  # noqa: ARG002
        # Clients that time out hang up mid-answer: expected here, not worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError | OSError):
            return
        logger.exception("stand-in handler failed for %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30  # an idle keep-alive connection does not pin a thread for ever

    def setup(self) -> None:
        # Headers and body go out in two writes; without NODELAY, Nagle plus delayed ACKs cost
        # ~40 ms a request on loopback.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("stand-in: " + format, *args)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            reply = self.server.standin._dispatch(method, self.path, headers, body)
        except Exception as exc:  # a bug in the stand-in must show as a 500, not a hang
            logger.exception("stand-in crashed on %s %s", method, self.path)
            reply = _problem(500, f"stand-in error: {exc}")
        if reply.delay > 0:
            # the work is done; only the answer is late (a client may give up meanwhile)
            self.server.standin._stopping.wait(reply.delay)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(reply.body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True


class ReplicateStandIn:
    """A local, inspectable, steerable Replicate. See the module docstring."""

    def __init__(
        self,
        *,
        token: str = "r8_standin_test_token",
        host: str = "127.0.0.1",
        webhook_secret: str | None = None,
        account: str = "selfie-lora",
    ) -> None:
        self.token = token
        self.host = host
        self.account = account
        self.webhook_secret = webhook_secret
        self.lock = threading.RLock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._webhook_threads: list[threading.Thread] = []
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
        self.page_size = 100
        self._failures: list[_Rule] = []
        self._delays: list[_Rule] = []

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> str:
        """Start serving on a free port; return the base URL (``http://127.0.0.1:PORT``)."""
        if self._server is not None:
            return self.base_url
        self._stopping.clear()
        self._server = _Server(self, self.host)
        port = self._server.server_address[1]
        self.base_url = f"http://{self.host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="replicate-standin",
            daemon=True,
        )
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with server.connections_lock:
            open_connections = list(server.connections)
        for conn in open_connections:
            # wake handler threads blocked on keep-alive reads so they exit now
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for thread in self._webhook_threads:
            thread.join(timeout=5)

    def __enter__(self) -> ReplicateStandIn:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

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

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> _Reply:
        split = urlsplit(raw_path)
        path = split.path
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        with self.lock:
            self.requests.append((method, path))
            for rule in self._failures:
                if rule.times > 0 and rule.matches(method, path):
                    rule.times -= 1
                    detail = (
                        "Request was throttled. Expected available in 1 second."
                        if rule.status == 429
                        else f"stand-in injected {rule.status}"
                    )
                    reply = _problem(rule.status, detail)
                    if rule.retry_after is not None:
                        reply.headers["Retry-After"] = rule.retry_after
                    return reply
            delay = 0.0
            for rule in self._delays:
                if rule.times > 0 and rule.matches(method, path):
                    rule.times -= 1
                    delay = rule.delay
                    break

        if path.startswith("/files/"):
            reply = self._serve_blob(path)
        elif not self._authorized(headers.get("authorization", "")):
            reply = _problem(401, "You did not pass a valid authentication token")
        else:
            reply = self._route(method, path, query, headers, body)
        reply.delay = delay
        return reply

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() in {"bearer", "token"} and secrets.compare_digest(token.strip(), self.token)

    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> _Reply:
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] != "v1":
            return _problem(404, "Not found")
        route = parts[1:]
        data: Any = None
        if body and not headers.get("content-type", "").startswith("multipart/"):
            try:
                data = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError):
                return _problem(400, "Request body is not valid JSON")
        with self.lock:
            match (method, route):
                case ("GET", ["account"]):
                    return _json(200, {"type": "user", "username": self.account, "name": ""})
                case ("POST", ["files"]):
                    return self._upload(headers.get("content-type", ""), body)
                case ("GET", ["files", file_id]):
                    found = self.files.get(file_id)
                    return _json(200, self._file_json(found)) if found else _problem(404, "Not found")
                case ("DELETE", ["files", file_id]):
                    self.files.pop(file_id, None)
                    return _Reply(204)
                case ("POST", ["models"]):
                    return self._post_model(data)
                case ("GET", ["models", owner, name]):
                    model = self.models.get(f"{owner}/{name}")
                    return _json(200, self._model_json(model)) if model else _problem(404, "Not found")
                case ("GET", ["models", owner, name, "versions"]):
                    if f"{owner}/{name}" not in self.models:
                        return _problem(404, "Not found")
                    versions = self.versions.get(f"{owner}/{name}", [])
                    return _json(200, {"next": None, "previous": None, "results": versions})
                case ("GET", ["models", owner, name, "versions", version_id]):
                    for version in self.versions.get(f"{owner}/{name}", []):
                        if version["id"] == version_id:
                            return _json(200, version)
                    return _problem(404, "Not found")
                case ("POST", ["models", owner, name, "versions", version_id, "trainings"]):
                    return self._post_training(f"{owner}/{name}", version_id, data)
                case ("POST", ["models", owner, name, "predictions"]):
                    if not isinstance(data, dict):
                        return _problem(422, "Request body must be a JSON object")
                    return self._post_prediction({**data, "version": f"{owner}/{name}"})
                case ("GET", ["trainings"]):
                    return self._list_trainings(query)
                case ("GET", ["trainings", training_id]):
                    rec = self.trainings.get(training_id)
                    if rec is None:
                        return _problem(404, "Not found")
                    if rec.status not in _TERMINAL:
                        rec.polls += 1
                        self._advance(rec)
                    return _json(200, self._training_json(rec))
                case ("POST", ["trainings", training_id, "cancel"]):
                    rec = self.trainings.get(training_id)
                    if rec is None:
                        return _problem(404, "Not found")
                    rec.cancel_requests += 1
                    if rec.status not in _TERMINAL:
                        rec.status = "canceled"
                        rec.completed_at = _now()
                        rec.logs += "\nCanceled by request.\n"
                        self._notify(rec, "completed")
                    return _json(200, self._training_json(rec))
                case ("POST", ["predictions"]):
                    return self._post_prediction(data)
                case ("GET", ["predictions"]):
                    results = [self._prediction_json(p) for p in reversed(self.predictions.values())]
                    return _json(200, {"next": None, "previous": None, "results": results})
                case ("GET", ["predictions", prediction_id]):
                    pred = self.predictions.get(prediction_id)
                    if pred is None:
                        return _problem(404, "Not found")
                    if pred.status not in _TERMINAL:
                        pred.polls += 1
                        self._advance_prediction(pred)
                    return _json(200, self._prediction_json(pred))
                case ("POST", ["predictions", prediction_id, "cancel"]):
                    pred = self.predictions.get(prediction_id)
                    if pred is None:
                        return _problem(404, "Not found")
                    if pred.status not in _TERMINAL:
                        pred.status, pred.completed_at = "canceled", _now()
                    return _json(200, self._prediction_json(pred))
        return _problem(404, f"No route for {method} {path}")

    # ----------------------------------------------------------------- files

    def _upload(self, content_type: str, body: bytes) -> _Reply:
        match = re.search(r'boundary="?([^";]+)"?', content_type)
        if not content_type.startswith("multipart/form-data") or match is None:
            return _problem(400, "Expected multipart/form-data")
        fields = _parse_multipart(body, match.group(1).encode())
        if "content" not in fields:
            return _problem(422, "Missing 'content' field")
        filename, part_type, data = fields["content"]
        metadata: dict[str, Any] = {}
        if "metadata" in fields:
            try:
                loaded = json.loads(fields["metadata"][2])
            except (UnicodeDecodeError, json.JSONDecodeError):
                return _problem(422, "metadata must be JSON")
            metadata = loaded if isinstance(loaded, dict) else {}
        record = StandInFile(
            id=_new_id(),
            name=filename or "file",
            content_type=part_type or "application/octet-stream",
            data=data,
            metadata=metadata,
            created_at=_now(),
        )
        self.files[record.id] = record
        return _json(201, self._file_json(record))

    def _file_json(self, record: StandInFile) -> dict[str, Any]:
        return {
            "id": record.id,
            "name": record.name,
            "content_type": record.content_type,
            "size": len(record.data),
            "etag": hashlib.md5(record.data, usedforsecurity=False).hexdigest(),
            "checksums": {
                "sha256": hashlib.sha256(record.data).hexdigest(),
                "md5": hashlib.md5(record.data, usedforsecurity=False).hexdigest(),
            },
            "metadata": record.metadata,
            "created_at": record.created_at,
            "expires_at": None,
            "urls": {"get": f"{self.base_url}/v1/files/{record.id}"},
        }

    def _serve_blob(self, path: str) -> _Reply:
        with self.lock:
            blob = self.blobs.get(path)
        if blob is None:
            return _problem(404, "Not found")
        return _Reply(200, blob[0], content_type=blob[1])

    def _fetch_input(self, url: object) -> bytes | None:
        """The bytes behind an input URL the stand-in can resolve (its files, blobs, data URIs)."""
        if not isinstance(url, str):
            return None
        if url.startswith("data:"):
            _, _, payload = url.partition(",")
            try:
                return base64.b64decode(payload, validate=False)
            except (binascii.Error, ValueError):
                return None
        path = urlsplit(url).path
        file_match = re.fullmatch(r"/v1/files/([^/]+)(?:/download)?", path)
        if file_match and file_match.group(1) in self.files:
            return self.files[file_match.group(1)].data
        blob = self.blobs.get(path)
        return blob[0] if blob else None

    # ----------------------------------------------------------------- models

    def _post_model(self, data: Any) -> _Reply:
        if not isinstance(data, dict):
            return _problem(422, "Request body must be a JSON object")
        self.model_creations.append(dict(data))
        owner, name = data.get("owner"), data.get("name")
        if not isinstance(owner, str) or not isinstance(name, str) or not _MODEL_NAME.match(name):
            return _problem(422, "owner and a valid name are required")
        if data.get("visibility") not in {"public", "private"}:
            return _problem(422, "visibility must be 'public' or 'private'")
        if not data.get("hardware"):
            return _problem(422, "hardware is required")
        if f"{owner}/{name}" in self.models:
            return _problem(409, f"A model with the name {owner}/{name} already exists")
        model = self._create_model(
            owner, name, visibility=str(data["visibility"]), hardware=str(data["hardware"])
        )
        return _json(201, self._model_json(model))

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

    def _model_json(self, model: dict[str, Any]) -> dict[str, Any]:
        versions = self.versions.get(f"{model['owner']}/{model['name']}", [])
        return {**model, "latest_version": versions[0] if versions else None}

    def _add_version(self, destination: str) -> str:
        version = {
            "id": secrets.token_hex(32),
            "created_at": _now(),
            "cog_version": "0.9.4",
            "openapi_schema": {},
        }
        self.versions.setdefault(destination, []).insert(0, version)
        return f"{destination}:{version['id']}"

    def _find_version(self, ref: str) -> tuple[str, str] | None:
        """Resolve ``owner/name:id``, ``owner/name`` (latest) or a bare id to (model, id)."""
        if ":" in ref:
            model, version_id = ref.split(":", 1)
            known = any(v["id"] == version_id for v in self.versions.get(model, []))
            return (model, version_id) if known else None
        if "/" in ref:
            versions = self.versions.get(ref, [])
            return (ref, versions[0]["id"]) if versions else None
        for model, versions in self.versions.items():
            if any(v["id"] == ref for v in versions):
                return model, ref
        return None

    # ----------------------------------------------------------------- trainings

    def _post_training(self, trainer_model: str, version_id: str, data: Any) -> _Reply:
        if not _VERSION_ID.match(version_id):
            return _problem(404, f"Version {version_id} of {trainer_model} not found")
        if not isinstance(data, dict):
            return _problem(422, "Request body must be a JSON object")
        destination = data.get("destination")
        if not isinstance(destination, str) or destination.count("/") != 1:
            return _problem(422, "destination must be 'owner/name'")
        if destination not in self.models:
            return _problem(404, "The specified training destination does not exist")
        inputs = data.get("input")
        if not isinstance(inputs, dict) or "input_images" not in inputs:
            return _problem(422, "input.input_images is required")
        names: list[str] | None = None
        captions: dict[str, str] = {}
        input_error: str | None = None
        archive = self._fetch_input(inputs["input_images"])
        if archive is None:
            input_error = "Could not download input_images"
        else:
            try:
                with zipfile.ZipFile(io.BytesIO(archive)) as zf:
                    names = [i.filename for i in zf.infolist() if not i.is_dir()]
                    for member in names:
                        if member.lower().endswith(".txt"):
                            captions[member] = zf.read(member).decode("utf-8", errors="replace")
            except zipfile.BadZipFile:
                input_error = "input_images is not a zip file"
        webhook = data.get("webhook")
        events = data.get("webhook_events_filter")
        rec = StandInTraining(
            id=_new_id(),
            body=data,
            trainer_model=trainer_model,
            trainer_version=version_id,
            destination=destination,
            input=inputs,
            webhook=webhook if isinstance(webhook, str) else None,
            webhook_events_filter=list(events) if isinstance(events, list) else None,
            input_files=names,
            captions=captions,
            input_error=input_error,
            outcome=self.training_outcome,
            output_shape=self.output_shape,
            error_text=self.training_error,
            starting_polls=max(0, self.starting_polls),
            processing_polls=max(0, self.processing_polls),
            created_at=_now(),
        )
        self.trainings[rec.id] = rec
        return _json(201, self._training_json(rec))

    def _list_trainings(self, query: dict[str, str]) -> _Reply:
        ordered = list(reversed(self.trainings.values()))  # newest first, like Replicate
        try:
            offset = max(0, int(query.get("cursor", "0")))
        except ValueError:
            return _problem(400, "Bad cursor")
        page = ordered[offset : offset + self.page_size]
        more = offset + self.page_size < len(ordered)
        previous = max(0, offset - self.page_size)
        return _json(
            200,
            {
                "next": f"{self.base_url}/v1/trainings?cursor={offset + self.page_size}" if more else None,
                "previous": f"{self.base_url}/v1/trainings?cursor={previous}" if offset else None,
                "results": [self._training_json(t) for t in page],
            },
        )

    def _training_json(self, rec: StandInTraining) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if rec.status in _TERMINAL and rec.started_at:
            metrics["predict_time"] = round(rec.steps * 0.5, 3)
        return {
            "id": rec.id,
            "model": rec.trainer_model,
            "version": rec.trainer_version,
            "input": rec.input,
            "logs": rec.logs,
            "output": rec.output,
            "error": rec.error,
            "status": rec.status,
            "source": "api",
            "created_at": rec.created_at,
            "started_at": rec.started_at,
            "completed_at": rec.completed_at,
            "urls": {
                "get": f"{self.base_url}/v1/trainings/{rec.id}",
                "cancel": f"{self.base_url}/v1/trainings/{rec.id}/cancel",
            },
            "metrics": metrics,
        }

    def _advance(self, rec: StandInTraining) -> None:
        """Set ``rec``'s state from its poll count."""
        if rec.input_error is not None and rec.polls > rec.starting_polls:
            self._finish(rec, "failed", error=rec.input_error)
            return
        if rec.polls <= rec.starting_polls:
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
        url = self.base_url
        if rec.output_shape == "wrong_version":
            other = "someone-else/other-model"
            if other not in self.models:
                self._create_model("someone-else", "other-model", visibility="public", hardware="cpu")
            rec.result_version = self._add_version(other)
        else:
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

    def _post_prediction(self, data: Any) -> _Reply:
        if not isinstance(data, dict):
            return _problem(422, "Request body must be a JSON object")
        ref = data.get("version")
        resolved = self._find_version(ref) if isinstance(ref, str) else None
        if resolved is None:
            return _problem(422, "Invalid version or not permitted")
        inputs = data.get("input")
        if not isinstance(inputs, dict) or not isinstance(inputs.get("prompt"), str):
            return _problem(422, "input.prompt is required")
        pred = StandInPrediction(
            id=_new_id(),
            body=data,
            model=resolved[0],
            version_id=resolved[1],
            input=inputs,
            created_at=_now(),
            outcome=self.prediction_outcome,
        )
        self.predictions[pred.id] = pred
        return _json(201, self._prediction_json(pred))

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
            digest = hashlib.sha256(f"{seed}:{i}:{pred.input.get('prompt')}".encode()).digest()
            image = _png((digest[0], digest[1], digest[2]), width, height)
            pred.images.append(image)
            path = f"/files/predictions/{pred.id}/out-{i}.png"
            self.blobs[path] = (image, "image/png")
            urls.append(self.base_url + path)
        pred.output, pred.status, pred.completed_at = urls, "succeeded", _now()

    def _prediction_json(self, pred: StandInPrediction) -> dict[str, Any]:
        return {
            "id": pred.id,
            "model": pred.model,
            "version": pred.version_id,
            "input": pred.input,
            "logs": "",
            "output": pred.output,
            "error": pred.error,
            "status": pred.status,
            "source": "api",
            "data_removed": False,
            "created_at": pred.created_at,
            "started_at": pred.started_at,
            "completed_at": pred.completed_at,
            "urls": {
                "get": f"{self.base_url}/v1/predictions/{pred.id}",
                "cancel": f"{self.base_url}/v1/predictions/{pred.id}/cancel",
            },
            "metrics": {"predict_time": 1.25} if pred.status == "succeeded" else {},
        }

    # ----------------------------------------------------------------- webhooks

    def _notify(self, rec: StandInTraining, event: str) -> None:
        """Send a signed webhook for ``event`` when the training asked for one and a secret is
        configured; delivered from a thread, once (Replicate retries only the final event)."""
        if rec.webhook is None or self.webhook_secret is None:
            return
        if rec.webhook_events_filter is not None and event not in rec.webhook_events_filter:
            return
        body = json.dumps(self._training_json(rec)).encode()
        headers = sign_webhook(secret=self.webhook_secret, body=body)
        headers["content-type"] = "application/json"
        url = rec.webhook

        def deliver() -> None:
            import httpx

            outcome: dict[str, Any] = {"url": url, "event": event, "training_id": rec.id}
            try:
                response = httpx.post(url, content=body, headers=headers, timeout=10)
                outcome["status"] = response.status_code
            except httpx.HTTPError as exc:
                outcome["error"] = repr(exc)
            with self.lock:
                self.webhook_deliveries.append(outcome)

        thread = threading.Thread(target=deliver, name="standin-webhook", daemon=True)
        self._webhook_threads.append(thread)
        thread.start()


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
