"""The five retraining bugs of the app selfie-lora replaces, each as a regression test through
the HTTP API, on both backends: ``local`` (real diffusers + peft training of the tiny FLUX) and
``replicate`` (the official client talking HTTP to the loopback stand-in).

1. the trigger word was regenerated on retraining;
2. two routes used two different trainer versions (one hard-coded);
3. a route created a new timestamped destination model instead of a new version;
4. the user's custom LoRA scale was reset to 1.0;
5. the LoRA weights URL was pulled out of the output inconsistently, with no record of how.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load as load_safetensors

from selfie_lora.api.app import create_app
from selfie_lora.config import Settings
from selfie_lora.domain.recipes import (
    DEFAULT_REPLICATE_TRAINER_VERSION,
    default_local_trainer_version,
)
from selfie_lora.testing.replicate_standin import ReplicateStandIn
from selfie_lora.wiring import Services, build_services
from tests.conftest import auth, make_settings, one_person_analyzer, wait_terminal
from tests.support.photos import photo_zip

pytestmark = pytest.mark.slow
OWNER = "acme"


@dataclass(frozen=True)
class FirstTraining:
    """A HOME holding ann's first training, succeeded: her API key's headers and the
    training's end as the progress route answered it."""

    home: Path
    headers: dict[str, str]
    done: dict[str, Any]


@dataclass
class Backend:
    name: str
    client: TestClient
    services: Services
    settings: Settings
    standin: ReplicateStandIn | None
    # The local backend's first training, run once for the module (its HOME copied into this
    # one): the bug tests each start from one, and the real tiny FLUX trains for seconds.
    first: FirstTraining | None = None

    def first_training(self) -> tuple[dict[str, str], dict[str, Any]]:
        """ann's headers and her first training (uploaded, trained and succeeded)."""
        if self.first is not None:
            # A copy: the module's other tests read the same one.
            return dict(self.first.headers), copy.deepcopy(self.first.done)
        h = auth(self.services, "ann")
        return h, self.finish(h, self.upload(h))

    def upload(self, headers: dict[str, str], *, offset: int = 0) -> dict[str, Any]:
        r = self.client.post(
            "/api/training/upload-zip", headers=headers,
            # Replicate trains at 1024 px: the photos must hold a face big enough for that.
            files={"file": ("p.zip", photo_zip(3, offset=offset,
                                              size=1100 if self.name == "replicate" else 128),
                            "application/zip")},
        )
        assert r.status_code == 202, r.text
        return r.json()  # type: ignore[no-any-return]

    def start(self, headers: dict[str, str]) -> dict[str, Any]:
        r = self.client.post("/api/training/start", headers=headers, json={"dataset_id": None})
        assert r.status_code == 202, r.text
        return r.json()  # type: ignore[no-any-return]

    def finish(self, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        done = wait_terminal(self.client, headers, body["training"]["id"], timeout=180)
        assert done["training"]["status"] == "succeeded", done["training"]
        return done


@contextmanager
def replicate_backend(tmp_path: Path, cache: Path, **standin_knobs: Any) -> Iterator[Backend]:
    """The app on the Replicate backend, talking HTTP to a fresh stand-in."""
    with ReplicateStandIn() as standin:
        for knob, value in standin_knobs.items():
            setattr(standin, knob, value)
        settings = make_settings(
            tmp_path, trainer="replicate", replicate_api_token=standin.token,
            replicate_base_url=standin.base_url, replicate_owner=OWNER,
            replicate_poll_interval=0.01, cache_dir=cache,
        )
        services = build_services(settings, face_analyzer=one_person_analyzer())
        try:
            app = create_app(settings, services=services, run_worker=True)
            with TestClient(app, raise_server_exceptions=False) as client:
                yield Backend("replicate", client, services, settings, standin)
        finally:
            services.close()


@contextmanager
def local_backend(tmp_path: Path, cache: Path, *,
                  first: FirstTraining | None = None) -> Iterator[Backend]:
    """The app on the local backend (the real tiny FLUX); with ``first``, on a copy of its HOME.
    One likeness probe a version, not four: each is a generation with the new LoRA loaded (half
    a second on the tiny model), and none of these tests is about likeness (the gate is tested
    in test_likeness_gate, on the tiny model in tests/e2e/test_likeness_tiny)."""
    settings = make_settings(tmp_path, cache_dir=cache, probe_count=1)
    if first is not None:
        shutil.copytree(first.home, settings.home, dirs_exist_ok=True)
    services = build_services(settings, face_analyzer=one_person_analyzer())
    try:
        app = create_app(settings, services=services, run_worker=True)
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Backend("local", client, services, settings, None, first)
    finally:
        services.close()


@pytest.fixture(scope="module")
def local_first_training(tmp_path_factory: pytest.TempPathFactory,
                         shared_model_cache: Path) -> FirstTraining:
    """ann's first training on the local backend, through the upload route, once for the module;
    closed before its HOME is copied, so every copy starts from the same stored state."""
    with local_backend(tmp_path_factory.mktemp("first-local"), shared_model_cache) as b:
        h = auth(b.services, "ann")
        done = b.finish(h, b.upload(h))
    return FirstTraining(home=b.settings.home, headers=h, done=done)


@pytest.fixture(params=["local", "replicate"])
def backend(request: pytest.FixtureRequest, tmp_path: Path,
            shared_model_cache: Path) -> Iterator[Backend]:
    if request.param == "replicate":
        with replicate_backend(tmp_path, shared_model_cache) as b:
            yield b
        return
    first: FirstTraining = request.getfixturevalue("local_first_training")
    with local_backend(tmp_path, shared_model_cache, first=first) as b:
        yield b


def safetensors_metadata(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return dict(header.get("__metadata__", {}))


def trained_captions(b: Backend, training: dict[str, Any]) -> list[str]:
    """What the trainer was told to associate with the person, per photo."""
    if b.standin is not None:
        remote = b.standin.trainings[training["remote_id"]]
        return list(remote.captions.values())
    version = b.services.repo.get_version(training["version_id"])
    assert version is not None
    meta = safetensors_metadata(b.services.blobs.get(version.weights_key))
    return [meta["selfie_lora.trigger_word"]]


def test_bug1_trigger_word_is_generated_once_and_never_changes(backend: Backend) -> None:
    h, first = backend.first_training()
    trigger = first["model"]["trigger_word"]
    assert trigger.isalnum()
    assert trigger == trigger.lower()
    assert first["training"]["is_retraining"] is False
    via_start = backend.finish(h, backend.start(h))
    via_upload = backend.finish(h, backend.upload(h, offset=20))
    for done in (first, via_start, via_upload):
        assert done["training"]["trigger_word"] == trigger
        assert done["model"]["trigger_word"] == trigger
        captions = trained_captions(backend, done["training"])
        assert captions
        assert all(trigger in c for c in captions), captions
    assert via_start["training"]["is_retraining"] is True
    assert via_upload["training"]["is_retraining"] is True


def test_bug2_every_route_uses_the_pinned_trainer_version(backend: Backend) -> None:
    h, first = backend.first_training()
    pinned = first["model"]["trainer_version"]
    expected = (DEFAULT_REPLICATE_TRAINER_VERSION if backend.name == "replicate"
                else default_local_trainer_version("tiny"))
    assert pinned == expected
    # The configured default moves on; the model's pin must win on every route.
    backend.settings.trainer_version = (
        "ostris/flux-dev-lora-trainer:" + "0" * 64 if backend.name == "replicate"
        else "local-flux-v1"
    )
    via_start = backend.finish(h, backend.start(h))
    via_upload = backend.finish(h, backend.upload(h, offset=30))
    for done in (via_start, via_upload):
        assert done["training"]["trainer_version"] == pinned
        assert done["model"]["trainer_version"] == pinned
    versions = backend.client.get("/api/model/versions", headers=h).json()["versions"]
    assert {v["trainer_version"] for v in versions} == {pinned}
    if backend.standin is not None:
        used = {f"{t.trainer_model}:{t.trainer_version}" for t in backend.standin.trainings.values()}
        assert used == {pinned}
    else:
        for v in versions:
            meta = safetensors_metadata(backend.client.get(v["weights_url"], headers=h).content)
            assert meta["selfie_lora.trainer_version"] == pinned
    log = backend.client.get("/api/model/log", headers=h).json()["events"]
    ignored = [e for e in log if e["kind"] == "training_queued"
               and "configured_default_ignored" in e["data"]["preserved"]]
    assert len(ignored) == 2


def test_bug3_one_destination_gets_a_new_version_per_training(backend: Backend) -> None:
    h, first = backend.first_training()
    destination = first["model"]["destination"]
    assert destination.startswith(f"{OWNER}/" if backend.name == "replicate" else "local/")
    for _ in range(2):
        done = backend.finish(h, backend.start(h))
        assert done["training"]["destination"] == destination
        assert done["model"]["destination"] == destination
    versions = backend.client.get("/api/model/versions", headers=h).json()["versions"]
    assert [v["number"] for v in versions] == [3, 2, 1]
    if backend.standin is not None:
        assert len(backend.standin.model_creations) == 1
        assert backend.standin.model_creations[0]["name"] == destination.split("/")[1]
        assert len(backend.standin.trainings) == 3
        assert {t.destination for t in backend.standin.trainings.values()} == {destination}
        triggers = {c for t in backend.standin.trainings.values() for c in t.captions.values()}
        assert triggers == {f"a photo of {first['model']['trigger_word']}"}
        remote_versions = [v["remote_version"] for v in versions]
        assert all(rv.startswith(destination + ":") for rv in remote_versions)
        assert len(set(remote_versions)) == 3


def test_bug4_custom_lora_scale_survives_retraining_and_completion(backend: Backend) -> None:
    h, first = backend.first_training()
    assert first["model"]["lora_scale"] == 1.0
    assert first["model"]["lora_scale_is_custom"] is False
    r = backend.client.patch("/api/model", headers=h, json={"lora_scale": 0.7})
    assert r.status_code == 200
    started = backend.start(h)
    assert started["model"]["lora_scale"] == 0.7
    done = backend.finish(h, started)
    assert done["model"]["lora_scale"] == 0.7
    assert done["model"]["lora_scale_is_custom"] is True
    assert done["training"]["preserved"]["lora_scale"] == 0.7
    gen = backend.client.post("/api/generate", headers=h,
                              json={"prompt": "portrait", "seed": 5}).json()["generation"]
    assert gen["lora_scale"] == 0.7
    assert gen["version_id"] == done["model"]["active_version"]["id"]
    if backend.standin is not None:
        prediction = list(backend.standin.predictions.values())[-1]
        assert prediction.input["lora_scale"] == 0.7
    else:
        # The picture really is made at 0.7: the same seed at 0.7 matches, at 1.0 differs.
        def image(scale: float) -> bytes:
            g = backend.client.post("/api/generate", headers=h, json={
                "prompt": "portrait", "seed": 5, "lora_scale": scale}).json()["generation"]
            return backend.client.get(g["images"][0], headers=h).content

        def pixels(png: bytes) -> bytes:
            return Image.open(io.BytesIO(png)).convert("RGB").tobytes()

        default = pixels(backend.client.get(gen["images"][0], headers=h).content)
        assert pixels(image(0.7)) == default
        assert pixels(image(1.0)) != default


@pytest.mark.parametrize("shape", ["dict", "url", "list", "safetensors", "tar_in_list",
                                   "null_version", "bare_version"])
def test_bug5_weights_found_in_every_output_shape_and_method_logged(
    tmp_path: Path, shared_model_cache: Path, shape: str
) -> None:
    with replicate_backend(tmp_path, shared_model_cache, output_shape=shape) as b:
        h = auth(b.services, "ann")
        done = b.finish(h, b.upload(h))
        training = done["training"]
        version = done["model"]["active_version"]
        assert b.standin is not None
        remote = b.standin.trainings[training["remote_id"]]
        served = b.client.get(version["weights_url"], headers=h).content
        # The trainer's LoRA in the stored layout: its tensors in bf16, an alpha per module
        # (the rank: the trainer wrote none), its metadata kept; hashed as stored.
        assert remote.weights is not None
        theirs, stored = load_safetensors(remote.weights), load_safetensors(served)
        modules = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
        assert set(stored) == set(theirs) | {f"{m}.alpha" for m in modules}
        assert all(stored[f"{m}.alpha"] == theirs[f"{m}.lora_A.weight"].shape[0] for m in modules)
        assert all(torch.equal(stored[k], v.to(torch.bfloat16)) for k, v in theirs.items())
        assert safetensors_metadata(served) == safetensors_metadata(remote.weights)
        assert hashlib.sha256(served).hexdigest() == version["weights_sha256"]
        assert training["weights_method"]
        assert version["weights_method"] == training["weights_method"]
        log = b.client.get("/api/model/log", headers=h).json()["events"]
        succeeded = [e for e in log if e["kind"] == "training_succeeded"]
        assert succeeded[0]["data"]["weights_method"] == training["weights_method"]


def test_bug5_local_weights_are_stored_hashed_and_reload(backend: Backend) -> None:
    h, done = backend.first_training()
    version = done["model"]["active_version"]
    served = backend.client.get(version["weights_url"], headers=h)
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == version["weights_sha256"]
    assert served.headers["x-weights-sha256"] == version["weights_sha256"]
    if backend.name == "local":
        assert version["weights_method"] == "local:file"
        keys = safetensors_metadata(served.content)
        assert keys["selfie_lora.trigger_word"] == done["model"]["trigger_word"]


def test_replicate_version_of_another_model_is_flagged(
    tmp_path: Path, shared_model_cache: Path
) -> None:
    with replicate_backend(tmp_path, shared_model_cache, output_shape="wrong_version") as b:
        h = auth(b.services, "ann")
        done = b.finish(h, b.upload(h))
        assert done["model"]["active_version"]["version_mismatch"] is True
        log = b.client.get("/api/model/log", headers=h).json()["events"]
        assert [e["data"]["version_mismatch"] for e in log
                if e["kind"] == "training_succeeded"] == [True]


def test_replicate_running_another_trainer_version_is_recorded_on_the_version(
    tmp_path: Path, shared_model_cache: Path
) -> None:
    # replicate-python #419: Replicate ran its newest trainer instead of the pinned one. The
    # version must say which trainer made its LoRA, not claim the pin.
    ran = "ostris/flux-dev-lora-trainer:" + "c" * 64
    with replicate_backend(tmp_path, shared_model_cache, trainer_version_ran="c" * 64) as b:
        h = auth(b.services, "ann")
        done = b.finish(h, b.upload(h))
        pinned = done["model"]["trainer_version"]
        assert pinned == DEFAULT_REPLICATE_TRAINER_VERSION != ran
        assert done["training"]["trainer_version"] == pinned  # what was asked for
        assert done["model"]["active_version"]["trainer_version"] == ran  # what ran
        log = b.client.get("/api/model/log", headers=h).json()["events"]
        assert [e["data"]["metrics"]["trainer_version_ran"] for e in log
                if e["kind"] == "training_succeeded"] == [ran]


def test_replicate_failure_keeps_active_version_with_actionable_error(
    tmp_path: Path, shared_model_cache: Path
) -> None:
    with replicate_backend(tmp_path, shared_model_cache) as b:
        assert b.standin is not None
        h = auth(b.services, "ann")
        v1 = b.finish(h, b.upload(h))["model"]["active_version"]
        for outcome in ("failed", "canceled"):
            b.standin.training_outcome = outcome
            body = b.start(h)
            done = wait_terminal(b.client, h, body["training"]["id"])
            assert done["training"]["status"] == outcome
            assert done["training"]["error"]
            assert done["model"]["active_version"]["id"] == v1["id"]


def test_input_zip_has_one_caption_per_photo(tmp_path: Path, shared_model_cache: Path) -> None:
    with replicate_backend(tmp_path, shared_model_cache) as b:
        assert b.standin is not None
        h = auth(b.services, "ann")
        done = b.finish(h, b.upload(h))
        remote = b.standin.trainings[done["training"]["remote_id"]]
        assert remote.input_files is not None
        images = sorted(n for n in remote.input_files if n.endswith(".jpg"))
        texts = sorted(n for n in remote.input_files if n.endswith(".txt"))
        assert len(images) == 3
        assert [n.removesuffix(".jpg") for n in images] == [
            n.removesuffix(".txt") for n in texts]
        assert remote.input.get("autocaption") in (False, "false", None)
        assert remote.input["trigger_word"] == done["model"]["trigger_word"]
        assert int(remote.input["steps"]) == done["training"]["recipe"]["steps"]
        assert int(remote.input["lora_rank"]) == done["training"]["recipe"]["lora_rank"]
