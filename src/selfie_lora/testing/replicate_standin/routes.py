"""The HTTP routes of the Replicate stand-in (``/v1/...`` and ``/files/...``): auth, injected
failures and delays, request parsing and the JSON shapes of Replicate's API, over ``StandInState``."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import secrets
import threading
import zipfile
from typing import Any
from urllib.parse import parse_qs, urlsplit

from selfie_lora.testing.replicate_standin.state import (
    _MODEL_NAME,
    _TERMINAL,
    _VERSION_ID,
    StandInFile,
    StandInPrediction,
    StandInState,
    StandInTraining,
    _json,
    _new_id,
    _now,
    _parse_multipart,
    _problem,
    _Reply,
    sign_webhook,
)


class StandInRoutes(StandInState):
    """Answers one HTTP request (``_dispatch``) from and onto the state it extends."""

    def __init__(self, *, token: str, account: str, webhook_secret: str | None) -> None:
        super().__init__()
        self.token = token
        self.account = account
        self.webhook_secret = webhook_secret
        self._webhook_threads: list[threading.Thread] = []

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> _Reply:
        split = urlsplit(raw_path)
        path = split.path
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        with self.lock:
            self.requests.append((method, path))
            for rule in self._failures:
                if (rule.times > 0 and rule.matches(method, path)
                        and (rule.active is None or rule.active())):
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

    def _model_json(self, model: dict[str, Any]) -> dict[str, Any]:
        versions = self.versions.get(f"{model['owner']}/{model['name']}", [])
        return {**model, "latest_version": versions[0] if versions else None}

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
            ran_version=self.trainer_version_ran,
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
            "version": rec.ran_version or rec.trainer_version,
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
