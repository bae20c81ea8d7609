"""End to end: the real ``selfie-lora serve`` in a subprocess, driven over HTTP, and the CLI.

The local test trains the offline tiny FLUX twice in a spawned child process (the default
isolation); the Replicate test points the server at the Replicate stand-in, which sends signed
Standard Webhooks back to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from selfie_lora.testing.replicate_standin import ReplicateStandIn, sign_webhook
from tests.e2e.conftest import (
    ServeProcess,
    clean_env,
    create_user,
    free_port,
    make_users,
    run_cli,
    wait_training,
)
from tests.support.photos import copy_person_photos, real_photo_zip, synthetic_photo

TRIGGER = re.compile(r"^[a-z0-9]+$")
LOCAL_TRAINING_DEADLINE_S = 240.0
REPLICATE_TRAINING_DEADLINE_S = 60.0


def upload(client: httpx.Client, headers: dict[str, str], data: bytes,
           server: ServeProcess) -> dict[str, Any]:
    r = client.post("/api/training/upload-zip", headers=headers,
                    files={"file": ("photos.zip", data, "application/zip")})
    assert r.status_code == 202, server.why(f"upload-zip: {r.status_code} {r.text}")
    body: dict[str, Any] = r.json()
    return body


def check_progress_sequence(first: dict[str, Any], seen: list[dict[str, Any]],
                            server: ServeProcess) -> None:
    """Progress starts at 0, never goes back, ends at 1 with step == total_steps."""
    assert first["progress"] == 0, server.why(f"a new training has progress 0: {first}")
    assert first["step"] == 0
    last_progress, last_step = 0.0, 0
    for t in seen:
        assert 0.0 <= t["progress"] <= 1.0, t
        assert t["progress"] >= last_progress, server.why(f"progress went back: {seen}")
        assert t["step"] >= last_step, server.why(f"step went back: {seen}")
        assert 0 <= t["step"] <= t["total_steps"], t
        last_progress, last_step = t["progress"], t["step"]
    final = seen[-1]
    assert final["status"] == "succeeded", server.why(f"training did not succeed: {final}")
    assert final["progress"] == 1.0, final
    assert final["total_steps"] > 0, final
    assert final["step"] == final["total_steps"], final
    assert final["version_id"], final
    assert final["error"] is None, final
    assert final["completed_at"], final


def check_safetensors(data: bytes) -> dict[str, Any]:
    """The safetensors header of ``data`` (8-byte little-endian length, then JSON)."""
    assert len(data) > 8, f"{len(data)} bytes is no safetensors file"
    (header_len,) = struct.unpack("<Q", data[:8])
    assert 2 <= header_len <= len(data) - 8, f"header length {header_len} of {len(data)} bytes"
    raw = data[8 : 8 + header_len]
    assert raw.lstrip().startswith(b"{"), raw[:40]
    header: dict[str, Any] = json.loads(raw)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert tensors, "the LoRA has no tensors"
    for name, info in tensors.items():
        assert {"dtype", "shape", "data_offsets"} <= set(info), (name, info)
    assert any("lora" in name.lower() for name in tensors), sorted(tensors)[:5]
    return header


def stop_server(server: ServeProcess) -> None:
    """Ctrl-C stops the server cleanly, and the whole run logged no stack trace."""
    code = server.stop()
    assert code is not None, server.why("the server did not stop within 30s of SIGINT")
    assert code in (0, 130, -2), server.why(f"the server exited with {code} on SIGINT")
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, server.why("the server logged a stack trace")


# --------------------------------------------------------------------------- local backend


@pytest.mark.slow
def test_serve_local_backend_whole_cycle(
    tmp_path: Path, serve: Callable[..., ServeProcess]
) -> None:
    env = clean_env(tmp_path / "home", SELFIE_LORA_TRAINER="local",
                    SELFIE_LORA_BASE_MODEL="tiny", SELFIE_LORA_LOCAL_ISOLATION="process")
    ann = create_user(env, "ann")
    server = serve(env)
    bob = create_user(env, "bob")  # created while the server runs: same database

    with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
        r = client.get("/api/model", headers=ann)
        assert r.status_code == 404, server.why(f"no model before the first upload: {r.text}")

        # ---- first training
        body = upload(client, ann, real_photo_zip(), server)
        assert body["dataset"]["images_total"] == 3
        assert body["dataset"]["images_accepted"] == 3
        first = body["training"]
        assert first["is_retraining"] is False
        assert first["status"] in ("queued", "starting", "processing"), first
        _done, seen = wait_training(client, ann, first["id"], server,
                                   deadline_s=LOCAL_TRAINING_DEADLINE_S)
        check_progress_sequence(first, seen, server)

        r = client.get("/api/model", headers=ann)
        assert r.status_code == 200, server.why(r.text)
        model = r.json()
        assert TRIGGER.match(model["trigger_word"]), model["trigger_word"]
        assert model["trigger_word"] == first["trigger_word"]
        assert model["lora_scale"] == 1.0
        assert model["lora_scale_is_custom"] is False
        assert model["active_version"]["number"] == 1
        v1 = model["active_version"]
        assert v1["training_id"] == first["id"]
        assert v1["trainer_version"] == model["trainer_version"]

        # ---- the user's scale, then a retraining
        r = client.patch("/api/model", headers=ann, json={"lora_scale": 0.6})
        assert r.status_code == 200, server.why(r.text)
        assert r.json()["lora_scale"] == 0.6
        assert r.json()["lora_scale_is_custom"] is True

        r = client.post("/api/training/start", headers=ann, json={})
        assert r.status_code == 202, server.why(f"start: {r.status_code} {r.text}")
        second = r.json()["training"]
        assert second["is_retraining"] is True
        for key in ("trigger_word", "destination", "trainer_version"):
            assert second[key] == model[key], (key, second[key], model[key])
        _done, seen = wait_training(client, ann, second["id"], server,
                                   deadline_s=LOCAL_TRAINING_DEADLINE_S)
        check_progress_sequence(second, seen, server)

        model = client.get("/api/model", headers=ann).json()
        assert model["lora_scale"] == 0.6, server.why(f"the user's scale was lost: {model}")
        assert model["lora_scale_is_custom"] is True
        assert model["trigger_word"] == first["trigger_word"]
        v2 = model["active_version"]
        assert v2["number"] == 2
        assert v2["training_id"] == second["id"]
        r = client.get("/api/model/versions", headers=ann)
        assert r.status_code == 200, server.why(r.text)
        versions = r.json()["versions"]
        assert [v["number"] for v in versions] == [2, 1]
        assert [v["id"] for v in versions] == [v2["id"], v1["id"]]

        # ---- the weights, to the owner only
        for version in versions:
            r = client.get(version["weights_url"], headers=ann)
            assert r.status_code == 200, server.why(f"weights: {r.status_code} {r.text[:300]}")
            assert hashlib.sha256(r.content).hexdigest() == version["weights_sha256"]
            check_safetensors(r.content)
        assert versions[0]["weights_sha256"] != versions[1]["weights_sha256"]
        assert client.get(v2["weights_url"], headers=bob).status_code == 404
        assert client.get(v2["weights_url"]).status_code == 401

        # ---- generation, images to the owner only
        r = client.post("/api/generate", headers=ann,
                        json={"prompt": "portrait in a garden", "seed": 7})
        assert r.status_code == 200, server.why(f"generate: {r.status_code} {r.text}")
        generation = r.json()["generation"]
        assert generation["lora_scale"] == 0.6
        assert generation["version_id"] == v2["id"]
        assert len(generation["images"]) == 1
        image_url = generation["images"][0]
        r = client.get(image_url, headers=ann)
        assert r.status_code == 200, server.why(f"image: {r.status_code} {r.text[:300]}")
        assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert r.headers["content-type"].startswith("image/png")
        r = client.get(image_url, headers=bob)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
        assert client.get(image_url).status_code == 401
        assert client.get(image_url, headers={"Authorization": "Bearer nope"}).status_code == 401

        # ---- rollback to v1 (someone else cannot)
        r = client.post(f"/api/model/versions/{v1['id']}/activate", headers=bob)
        assert r.status_code == 404, r.text
        r = client.post(f"/api/model/versions/{v1['id']}/activate", headers=ann)
        assert r.status_code == 200, server.why(f"activate: {r.status_code} {r.text}")
        assert r.json()["active_version"]["id"] == v1["id"]
        assert r.json()["active_version"]["number"] == 1
        assert r.json()["lora_scale"] == 0.6
        assert client.get("/api/model", headers=ann).json()["active_version"]["number"] == 1

    stop_server(server)


# --------------------------------------------------------------------------- Replicate backend


def _webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def wait_deliveries(standin: ReplicateStandIn, count: int, deadline_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + deadline_s
    while True:
        with standin.lock:
            deliveries = list(standin.webhook_deliveries)
        if len(deliveries) >= count or time.monotonic() > deadline:
            return deliveries
        time.sleep(0.05)


@pytest.mark.slow
def test_serve_replicate_backend_with_webhooks(
    tmp_path: Path, serve: Callable[..., ServeProcess]
) -> None:
    secret = _webhook_secret()
    owner = "e2e-owner"
    with ReplicateStandIn(webhook_secret=secret, account=owner) as standin:
        port = free_port()
        public_url = f"http://127.0.0.1:{port}"
        env = clean_env(
            tmp_path / "home",
            SELFIE_LORA_TRAINER="replicate",
            REPLICATE_API_TOKEN=standin.token,
            SELFIE_LORA_REPLICATE_BASE_URL=standin.base_url,
            SELFIE_LORA_REPLICATE_OWNER=owner,
            SELFIE_LORA_REPLICATE_POLL_INTERVAL="0.2",
            SELFIE_LORA_PUBLIC_URL=public_url,
            SELFIE_LORA_WEBHOOK_SECRET=secret,
        )
        # Set-up here, by the service that ``users create`` calls, in this process (a command
        # process took ~1.3 s of CPU, its imports mostly): the command is run by the tests above
        # and below.
        ann = make_users(env, "ann")["ann"]
        server = serve(env, port=port)

        with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
            # ---- first training, then the user's scale, then a retraining
            body = upload(client, ann, real_photo_zip(), server)
            first = body["training"]
            assert first["is_retraining"] is False
            done, seen = wait_training(client, ann, first["id"], server,
                                       deadline_s=REPLICATE_TRAINING_DEADLINE_S)
            check_progress_sequence(first, seen, server)
            first_remote_id = done["training"]["remote_id"]
            assert first_remote_id in standin.trainings, done["training"]

            r = client.patch("/api/model", headers=ann, json={"lora_scale": 0.7})
            assert r.status_code == 200, server.why(r.text)
            r = client.post("/api/training/start", headers=ann, json={})
            assert r.status_code == 202, server.why(f"start: {r.status_code} {r.text}")
            second = r.json()["training"]
            assert second["is_retraining"] is True
            done, seen = wait_training(client, ann, second["id"], server,
                                       deadline_s=REPLICATE_TRAINING_DEADLINE_S)
            check_progress_sequence(second, seen, server)

            model = client.get("/api/model", headers=ann).json()
            assert TRIGGER.match(model["trigger_word"]), model["trigger_word"]
            assert model["destination"].startswith(f"{owner}/"), model["destination"]
            assert model["lora_scale"] == 0.7
            assert model["lora_scale_is_custom"] is True
            assert model["active_version"]["number"] == 2
            versions = client.get("/api/model/versions", headers=ann).json()["versions"]
            assert [v["number"] for v in versions] == [2, 1]
            for version in versions:
                r = client.get(version["weights_url"], headers=ann)
                assert r.status_code == 200, server.why(r.text[:300])
                assert hashlib.sha256(r.content).hexdigest() == version["weights_sha256"]
                check_safetensors(r.content)

            # ---- what Replicate saw: one model, two trainings on it, captions with the trigger
            with standin.lock:
                creations = list(standin.model_creations)
                trainings = list(standin.trainings.values())
            assert len(creations) == 1, creations
            assert f"{creations[0]['owner']}/{creations[0]['name']}" == model["destination"]
            assert len(trainings) == 2, [t.id for t in trainings]
            assert [t.id for t in trainings] == [first_remote_id, done["training"]["remote_id"]]
            trainer_model, _, trainer_version_id = model["trainer_version"].partition(":")
            for t in trainings:
                assert t.destination == model["destination"], t.destination
                assert t.trainer_model == trainer_model
                assert t.trainer_version == trainer_version_id
                assert t.trigger_word == model["trigger_word"]
                assert t.input_error is None, t.input_error
                images = [n for n in t.input_files or [] if not n.lower().endswith(".txt")]
                assert len(images) == 3, t.input_files
                assert len(t.captions) == 3, t.captions
                for name, text in t.captions.items():
                    assert model["trigger_word"] in text, (name, text)

            # ---- webhooks: signed deliveries reached us and were accepted
            webhook_url = f"{public_url}/api/webhooks/replicate"
            for t in trainings:
                assert t.webhook is not None, "trainings must be created with a webhook"
                assert t.webhook.startswith(webhook_url), t.webhook
            deliveries = wait_deliveries(standin, 4, deadline_s=15.0)  # start + completed, x2
            assert deliveries, "the stand-in sent no webhook"
            assert len(deliveries) == 4, deliveries
            assert all(200 <= d.get("status", 0) < 300 for d in deliveries), server.why(
                f"webhook deliveries: {deliveries}")
            assert {d["training_id"] for d in deliveries} == {t.id for t in trainings}

            # ---- a forged webhook is refused
            forged = json.dumps({"id": trainings[0].id, "status": "failed", "logs": ""}).encode()
            for headers in (
                sign_webhook(secret=_webhook_secret(), body=forged),  # another secret
                {},  # no signature
            ):
                r = client.post("/api/webhooks/replicate", content=forged,
                                headers={**headers, "content-type": "application/json"})
                assert r.status_code == 401, server.why(f"forged webhook: {r.status_code} {r.text}")
                assert r.json()["error"]["code"] == "unauthorized"
            # a correctly signed one is accepted (and cannot end a training)
            good = sign_webhook(secret=secret, body=forged)
            r = client.post("/api/webhooks/replicate", content=forged,
                            headers={**good, "content-type": "application/json"})
            assert 200 <= r.status_code < 300, server.why(f"signed webhook: {r.status_code} {r.text}")
            r = client.get("/api/training/progress", headers=ann,
                           params={"training_id": first["id"]})
            assert r.json()["training"]["status"] == "succeeded", r.json()["training"]

            # ---- generation on the active version with the user's scale (other predictions,
            # e.g. likeness scoring of new versions, may have run before: look at the new one)
            with standin.lock:
                before = set(standin.predictions)
            r = client.post("/api/generate", headers=ann, json={"prompt": "at the beach", "seed": 1})
            assert r.status_code == 200, server.why(f"generate: {r.status_code} {r.text}")
            generation = r.json()["generation"]
            assert generation["lora_scale"] == 0.7
            with standin.lock:
                predictions = [p for k, p in standin.predictions.items() if k not in before]
            assert len(predictions) == 1, [p.input for p in predictions]
            assert predictions[0].input["lora_scale"] == model["lora_scale"]
            assert model["trigger_word"] in predictions[0].input["prompt"]
            assert predictions[0].model == model["destination"]
            assert f"{predictions[0].model}:{predictions[0].version_id}" == trainings[1].result_version
            r = client.get(generation["images"][0], headers=ann)
            assert r.status_code == 200, server.why(r.text[:300])
            assert r.content.startswith(b"\x89PNG\r\n\x1a\n")

        stop_server(server)


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow  # a process of its own
def test_users_create_twice_fails_with_a_clear_message(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    create_user(env, "ann")
    again = run_cli(["users", "create", "ann", "--json"], env)
    assert again.returncode != 0, again.stdout
    assert again.stdout.strip() == "", f"no key may be printed: {again.stdout!r}"
    assert "already exists" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr, (
        f"a duplicate user must be a one-line error, not a stack trace:\n{again.stderr[-1500:]}")


@pytest.mark.slow  # a process of its own, with dlib and the analysis pool
def test_check_exits_0_on_usable_photos_and_1_on_an_empty_folder(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    photos = copy_person_photos(tmp_path / "photos", extra=("biden.jpg",))
    ok = run_cli(["check", str(photos)], env)
    assert ok.returncode == 0, f"{ok.stdout}\n{ok.stderr}"
    assert "3 of 4" in ok.stdout, ok.stdout
    assert "different_person" in ok.stdout, ok.stdout
    assert "trainable" in ok.stdout

    drawings = tmp_path / "drawings"
    drawings.mkdir()
    for i in range(3):
        (drawings / f"selfie{i}.jpg").write_bytes(synthetic_photo(i, size=256))
    faceless = run_cli(["check", str(drawings)], env)
    assert faceless.returncode == 1, f"{faceless.stdout}\n{faceless.stderr}"
    assert "no_face" in faceless.stdout, faceless.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_cli(["check", str(empty)], env)
    assert bad.returncode == 1, f"{bad.stdout}\n{bad.stderr}"
    assert "not trainable" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr
