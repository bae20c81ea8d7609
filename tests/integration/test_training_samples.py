"""Sample images every ``recipe.sample_every`` steps, for real on the tiny FLUX: made at exactly the
steps k*N before the last, each a JPEG of the training resolution; the same seed draws the same
pixels; a run with samples trains exactly the LoRA a run without them does; they cross from the
training child to the parent; through the service and the API they are the training's, served
to its owner only; a training killed and taken over, or canceled and resumed, ends with one
sample per step.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from selfie_lora.api.app import create_app
from selfie_lora.domain.entities import Recipe, Training, TrainingStatus, User
from selfie_lora.domain.recipes import RECIPES
from selfie_lora.services.layout import sample_key, sample_prefix
from selfie_lora.services.ports import TrainingJob
from selfie_lora.testing.fakes import FakeGenerator, SimulatedCrash
from selfie_lora.wiring import Services, build_services
from tests.conftest import make_settings, one_person_analyzer
from tests.integration.test_local_backend import RECIPE, FakeSink, _job
from tests.integration.test_resume import Stopping, _photos
from tests.support.owners import own_model

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from selfie_lora.adapters.flux.samples import flux_sigmas  # noqa: E402
from selfie_lora.adapters.flux.train_loop import TimestepShift  # noqa: E402
from selfie_lora.adapters.flux.trainer import LocalTrainer  # noqa: E402

pytestmark = pytest.mark.slow

# Short: 12 steps, a sample every 4 (so at 4 and 8: none at the last step), no checkpoints.
SAMPLING = replace(RECIPE, steps=12, sample_every=4, checkpoint_every=0)
# Through the service: a sample every 5 steps and a checkpoint every 10, so a run stopped
# between two checkpoints makes some samples again when it resumes.
SERVICE_RECIPE = replace(RECIPE, name="local-tiny-samples", steps=30, sample_every=5,
                         checkpoint_every=10)


@dataclass
class KeptSamples:
    """A ``SampleStore`` that keeps each sample's bytes by step (the blob store's part)."""

    saved: list[tuple[int, bytes]] = field(default_factory=list)

    def save(self, path: Path, *, step: int) -> None:
        self.saved.append((step, path.read_bytes()))


def _trainer(cache_dir: Path, isolation: str = "inline") -> LocalTrainer:
    return LocalTrainer(base_model="tiny", cache_dir=cache_dir, isolation=isolation,  # type: ignore[arg-type]
                        device="cpu", num_threads=1, progress_interval_s=0.0)


def _pixels(data: bytes) -> np.ndarray[Any, Any]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def runs(shared_model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SAMPLING trained three times: inline with samples, in a child process with samples, and
    inline without them."""
    out: dict[str, Any] = {}
    for name, isolation, keep in (("inline", "inline", True), ("child", "process", True),
                                  ("off", "inline", False)):
        tmp = tmp_path_factory.mktemp(name)
        kept = KeptSamples()
        sink = FakeSink()
        job = replace(_job(tmp, SAMPLING), samples=kept if keep else None)
        result = _trainer(shared_model_cache, isolation).train(job, sink=sink)
        out[name] = {"result": result, "kept": kept, "sink": sink}
    return out


def test_samples_are_made_every_n_steps_but_the_last_at_the_training_resolution(
        runs: dict[str, Any]) -> None:
    saved = runs["inline"]["kept"].saved
    assert [step for step, _ in saved] == [4, 8]
    for _step, data in saved:
        pixels = _pixels(data)
        assert pixels.shape == (SAMPLING.resolution, SAMPLING.resolution, 3)
        assert pixels.std() > 0  # a picture, not a blank
    # The LoRA changed between the two: so did the picture.
    assert not np.array_equal(_pixels(saved[0][1]), _pixels(saved[1][1]))


def test_the_same_seed_gives_the_same_sample_pixels_in_a_child_process_too(
        runs: dict[str, Any]) -> None:
    inline, child = runs["inline"]["kept"].saved, runs["child"]["kept"].saved
    assert [step for step, _ in child] == [4, 8]
    for (_, a), (_, b) in zip(inline, child, strict=True):
        assert np.array_equal(_pixels(a), _pixels(b))


def test_sampling_does_not_change_what_is_trained(runs: dict[str, Any]) -> None:
    on, off = runs["inline"], runs["off"]
    assert off["kept"].saved == []
    assert ([s[3] for s in on["sink"].steps] == [s[3] for s in off["sink"].steps])
    a = load_file(str(on["result"].weights_path))
    b = load_file(str(off["result"].weights_path))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_another_seed_gives_another_sample(shared_model_cache: Path, tmp_path: Path,
                                           runs: dict[str, Any]) -> None:
    kept = KeptSamples()
    other = replace(SAMPLING, steps=5, seed=SAMPLING.seed + 1)
    _trainer(shared_model_cache).train(replace(_job(tmp_path, other), samples=kept),
                                       sink=FakeSink())
    assert [step for step, _ in kept.saved] == [4]
    assert not np.array_equal(_pixels(kept.saved[0][1]),
                              _pixels(runs["inline"]["kept"].saved[0][1]))


@pytest.mark.parametrize("tokens", [16, 1024, 4096])
def test_the_sampler_schedule_is_flux_pipelines(tokens: int) -> None:
    """The sigmas are what FluxPipeline gets from FLUX.1's scheduler for that many image tokens
    (``calculate_shift``, then the scheduler's shift), then 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from selfie_lora.adapters.flux.tiny import build_tiny_pipeline

    scheduler = build_tiny_pipeline().scheduler
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    config = scheduler.config
    steps = 20
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 1 / steps, steps)), mu=mu)
    ours = flux_sigmas(steps, image_tokens=tokens, shift=TimestepShift.from_scheduler_config(config))
    assert np.allclose(ours, scheduler.sigmas.numpy(), atol=1e-6)
    assert ours[-1] == 0.0
    assert ours[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------- service and API


@pytest.fixture
def sampling_recipe(monkeypatch: pytest.MonkeyPatch) -> Recipe:
    monkeypatch.setitem(RECIPES, SERVICE_RECIPE.name, SERVICE_RECIPE)
    return SERVICE_RECIPE


def _services(tmp_path: Path, trainer: Any) -> Services:
    return build_services(make_settings(tmp_path, trainer_version=SERVICE_RECIPE.name),
                          trainers={"local": trainer}, face_analyzer=one_person_analyzer(),
                          generators={"local": FakeGenerator()})


def _stored(services: Services, training_id: str) -> dict[str, bytes]:
    return {info.key: services.blobs.get(info.key)
            for info in services.blobs.list(sample_prefix(training_id))}


def _expected(recipe: Recipe) -> list[int]:
    return list(range(recipe.sample_every, recipe.steps, recipe.sample_every))


@pytest.fixture
def stopping(shared_model_cache: Path) -> Callable[[Callable[[TrainingJob, int], None]],
                                                   Stopping]:
    def make(hook: Callable[[TrainingJob, int], None]) -> Stopping:
        return Stopping(inner=_trainer(shared_model_cache), hook=hook)
    return make


def test_the_api_serves_a_trainings_samples_to_its_owner_only(
        tmp_path: Path, shared_model_cache: Path, sampling_recipe: Recipe) -> None:
    services = _services(tmp_path, _trainer(shared_model_cache))
    try:
        app = create_app(services.settings, services=services, run_worker=False)
        with TestClient(app, raise_server_exceptions=False) as client:
            _ann, ann_key = services.users.create(name="ann")
            ann = {"Authorization": f"Bearer {ann_key}"}
            # Bob has a model of his own: past "you have no model yet", only a training
            # lookup scoped to his model refuses Ann's.
            bob = own_model(client, services, "bob", versions=0).headers
            files = [("files", (name, data, "image/jpeg")) for name, data in _photos()]
            started = client.post("/api/training/upload", files=files, headers=ann)
            assert started.status_code == 202, started.text
            training_id = started.json()["training"]["id"]
            assert started.json()["training"]["samples"] == []
            services.training.run(training_id)

            body = client.get("/api/training/progress", headers=ann,
                              params={"training_id": training_id}).json()["training"]
            assert body["status"] == "succeeded", body["error"]
            assert body["recipe"]["sample_every"] == sampling_recipe.sample_every
            steps = [s["step"] for s in body["samples"]]
            assert steps == _expected(sampling_recipe)
            for sample in body["samples"]:
                assert sample["url"] == f"/api/training/{training_id}/samples/{sample['step']}"
                answer = client.get(sample["url"], headers=ann)
                assert answer.status_code == 200
                assert answer.headers["content-type"] == "image/jpeg"
                assert _pixels(answer.content).shape == (64, 64, 3)
                refused = client.get(sample["url"], headers=bob)
                assert refused.status_code == 404
                assert refused.json()["error"]["message"] == "no such training"
            assert client.get(f"/api/training/{training_id}/samples/3",
                              headers=ann).status_code == 404  # no sample at that step
            assert client.get("/api/training/progress", headers=bob,
                              params={"training_id": training_id}).status_code == 404
    finally:
        services.close()


def test_a_training_taken_over_after_its_worker_died_has_one_sample_per_step(
        tmp_path: Path, sampling_recipe: Recipe,
        stopping: Callable[[Callable[[TrainingJob, int], None]], Stopping]) -> None:
    recipe = sampling_recipe
    # Past a checkpoint and a sample after it: the resumed run makes that sample again.
    crash_at = random.Random(20261204).choice([16, 17, 18, 19])
    seen: dict[str, bytes] = {}

    def die(job: TrainingJob, step: int) -> None:
        if step >= crash_at:
            seen.update(_stored(services, job.training_id))
            raise SimulatedCrash(f"the worker died at step {step}")

    services = _services(tmp_path, stopping(die))
    try:
        _user, queued = _first_training(services)
        with pytest.raises(SimulatedCrash):
            services.training.run(queued.id, owner="worker-a")
        assert sorted(seen) == [sample_key(queued.id, s) for s in (5, 10, 15)]
        services.training.reconcile(dead_owners=("worker-a",))
        services.training.run(queued.id, owner="worker-b")
        done = _ended(services, queued.id)
        assert done.metrics["resumed_from_step"] == 10
        after = _stored(services, queued.id)
        assert sorted(after) == [sample_key(queued.id, s) for s in _expected(recipe)]
        # Step 15 was made twice, from the same LoRA: the second replaced the first, the same.
        key = sample_key(queued.id, 15)
        assert np.array_equal(_pixels(after[key]), _pixels(seen[key]))
        assert services.training.view(done).samples == tuple(_expected(recipe))
    finally:
        services.close()


def test_a_canceled_training_resumed_shows_one_sample_per_step(
        tmp_path: Path, sampling_recipe: Recipe,
        stopping: Callable[[Callable[[TrainingJob, int], None]], Stopping]) -> None:
    recipe = sampling_recipe

    def cancel(job: TrainingJob, step: int) -> None:
        if step == 17:
            services.training.cancel(user=user, training_id=job.training_id)

    services = _services(tmp_path, stopping(cancel))
    try:
        user, first = _first_training(services)
        services.training.run(first.id)
        assert _ended(services, first.id, TrainingStatus.CANCELED)
        assert services.training.view(_ended(services, first.id,
                                             TrainingStatus.CANCELED)).samples == (5, 10, 15)
        resumed = services.training.resume(user=user, training_id=first.id).training
        # Canceled at step 17, checkpointed there: the samples up to it come along, and the new
        # training makes the rest.
        assert resumed.step == 17
        assert services.training.view(resumed).samples == (5, 10, 15)
        services.training.run(resumed.id)
        done = _ended(services, resumed.id)
        assert services.training.view(done).samples == tuple(_expected(recipe))
        assert len(_stored(services, resumed.id)) == len(_expected(recipe))
        # The canceled training keeps its own, as it was.
        assert services.training.view(_ended(services, first.id,
                                             TrainingStatus.CANCELED)).samples == (5, 10, 15)
    finally:
        services.close()


def _first_training(services: Services) -> tuple[User, Training]:
    user, _ = services.users.create(name="ann")
    queued = services.training.upload_files(user=user, files=_photos()).training
    assert queued is not None
    return user, queued


def _ended(services: Services, training_id: str,
           status: TrainingStatus = TrainingStatus.SUCCEEDED) -> Training:
    training = services.repo.get_training(training_id)
    assert training is not None
    assert training.status is status, training.error
    return training

