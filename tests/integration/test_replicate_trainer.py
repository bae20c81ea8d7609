"""ReplicateTrainer and ReplicateGenerator against the stand-in, over real HTTP."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image
from replicate.client import Client
from replicate.training import Training

from selfie_lora.adapters.replicate.generator import ReplicateGenerator
from selfie_lora.adapters.replicate.outputs import is_safetensors
from selfie_lora.adapters.replicate.session import TRAINER_FAILURES, ReplicateConnection
from selfie_lora.adapters.replicate.trainer import (
    MARKER_METADATA_KEY,
    ReplicateTrainer,
    build_training_zip,
)
from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.errors import (
    ClientGoneError,
    GenerationError,
    InvalidInputError,
    TrainerUnavailableError,
    TrainingCanceledError,
    TrainingFailedError,
    TrainingInterruptedError,
    WeightsNotFoundError,
)
from selfie_lora.services.ports import GenerationJob, TrainingJob
from selfie_lora.testing.replicate_standin import OUTPUT_SHAPES, ReplicateStandIn
from tests.conftest_replicate import REPLICATE_TRIGGER, RecordingSink

README = Path(__file__).resolve().parents[2] / "README.md"

TRAININGS_POST = "/v1/models/*/trainings"
JobFactory = Callable[..., TrainingJob]
TrainerFactory = Callable[..., ReplicateTrainer]


def _only_training(standin: ReplicateStandIn) -> str:
    assert len(standin.trainings) == 1, list(standin.trainings)
    return next(iter(standin.trainings))


# --------------------------------------------------------------------------- the happy path


def test_first_training_creates_the_model_once_and_the_training(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    job = replicate_job_factory()
    result = replicate_trainer.train(job, sink=replicate_sink)

    assert [c["name"] for c in replicate_standin.model_creations] == ["lora-u1"]
    creation = replicate_standin.model_creations[0]
    assert creation["owner"] == "selfie-lora"
    assert creation["visibility"] == "private"
    remote_id = _only_training(replicate_standin)
    record = replicate_standin.trainings[remote_id]
    assert record.destination == job.destination
    assert record.trainer_model == "ostris/flux-dev-lora-trainer"
    assert record.trainer_version == job.trainer_version.split(":")[1]
    assert record.input["trigger_word"] == REPLICATE_TRIGGER
    assert record.input["autocaption"] is False
    assert record.input["steps"] == job.recipe.steps
    assert record.input["lora_rank"] == job.recipe.lora_rank
    assert record.input["learning_rate"] == job.recipe.learning_rate
    assert record.input["resolution"] == str(job.recipe.resolution)
    assert replicate_sink.started_ids == [remote_id]

    assert result.weights_path == job.work_dir / "lora.safetensors"
    assert result.weights_path.read_bytes() == replicate_standin.weights_for(remote_id)
    assert result.remote_version == record.result_version
    assert result.remote_version is not None
    assert result.remote_version.startswith(f"{job.destination}:")
    assert result.version_mismatch is False
    assert result.trainer_version_ran is None
    assert result.metrics["remote_id"] == remote_id
    assert result.metrics["predict_time"] == pytest.approx(500.0)
    assert "trainer_version_ran" not in result.metrics


def test_three_trainings_share_one_model_destination_version_and_trigger_word(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_trainer_factory: TrainerFactory,
    replicate_job_factory: JobFactory,
) -> None:
    results = [replicate_trainer.train(replicate_job_factory(), sink=RecordingSink()) for _ in range(2)]
    # a fresh trainer (another worker process) must find the model, not create it again
    results.append(replicate_trainer_factory().train(replicate_job_factory(), sink=RecordingSink()))

    assert len(replicate_standin.model_creations) == 1
    records = list(replicate_standin.trainings.values())
    assert len(records) == 3
    assert {r.destination for r in records} == {"selfie-lora/lora-u1"}
    assert len({r.trainer_version for r in records}) == 1
    assert {r.input["trigger_word"] for r in records} == {REPLICATE_TRIGGER}
    for record in records:
        assert record.captions
        assert all(REPLICATE_TRIGGER in text for text in record.captions.values())
    # every training added a version to the one destination
    assert len(replicate_standin.versions["selfie-lora/lora-u1"]) == 3
    assert len({r.remote_version for r in results}) == 3


def test_a_destination_deleted_on_replicate_is_made_again_by_the_next_training(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review repro: once checked, the destination was cached for the process's life; deleted
    on Replicate, every retrain failed "The specified training destination does not exist"
    until a restart."""
    replicate_trainer.train(replicate_job_factory(), sink=RecordingSink())
    with replicate_standin.lock:  # an operator deletes the model on replicate.com
        del replicate_standin.models["selfie-lora/lora-u1"]
        del replicate_standin.versions["selfie-lora/lora-u1"]

    result = replicate_trainer.train(replicate_job_factory(), sink=RecordingSink())

    assert result.remote_version is not None
    assert result.remote_version.startswith("selfie-lora/lora-u1:")
    assert len(replicate_standin.model_creations) == 2
    assert replicate_standin.count("POST", TRAININGS_POST) == 3  # the refused one, then one more
    assert len(replicate_standin.trainings) == 2
    assert "creating it again" in caplog.text


def test_a_destination_that_cannot_be_made_again_fails_saying_what_to_do(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
) -> None:
    replicate_trainer.train(replicate_job_factory(), sink=RecordingSink())
    with replicate_standin.lock:
        del replicate_standin.models["selfie-lora/lora-u1"]
    # its create answered "already exists", yet it still does not
    replicate_standin.fail_next("POST", "/v1/model[s]", status=409)

    with pytest.raises(TrainingFailedError) as caught:
        replicate_trainer.train(replicate_job_factory(), sink=RecordingSink())

    message = caught.value.user_message
    assert "selfie-lora/lora-u1 does not exist" in message
    assert "Tell the operator" in message
    assert "SELFIE_LORA_REPLICATE_OWNER" in message
    assert replicate_standin.count("POST", TRAININGS_POST) == 3  # once more, not for ever
    assert len(replicate_standin.trainings) == 1


def test_input_zip_has_one_caption_per_photo_with_the_trigger_word(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    job = replicate_job_factory(photos=4)
    replicate_trainer.train(job, sink=replicate_sink)

    record = replicate_standin.trainings[_only_training(replicate_standin)]
    assert record.input_files == [
        "000.jpg",
        "000.txt",
        "001.jpg",
        "001.txt",
        "002.jpg",
        "002.txt",
        "003.jpg",
        "003.txt",
    ]
    assert record.captions == {f"{i:03d}.txt": job.photos[i].caption for i in range(4)}
    assert all(REPLICATE_TRIGGER in caption for caption in record.captions.values())


def test_build_training_zip_stores_photos_under_generated_names(
    replicate_job_factory: JobFactory,
) -> None:
    job = replicate_job_factory(photos=2)
    with zipfile.ZipFile(io.BytesIO(build_training_zip(job.photos))) as archive:
        assert archive.namelist() == ["000.jpg", "000.txt", "001.jpg", "001.txt"]
        assert archive.read("001.jpg") == job.photos[1].data
    with pytest.raises(TrainingFailedError):
        build_training_zip(())


@pytest.mark.parametrize("shape", [s for s in OUTPUT_SHAPES if s != "wrong_version"])
def test_every_output_shape_yields_the_same_weights(
    shape: str,
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    replicate_standin.output_shape = shape  # type: ignore[assignment]
    caplog.set_level("INFO", logger="selfie_lora.adapters.replicate.trainer")

    result = replicate_trainer.train(replicate_job_factory(), sink=replicate_sink)

    remote_id = _only_training(replicate_standin)
    weights = result.weights_path.read_bytes()
    assert weights == replicate_standin.weights_for(remote_id)
    assert is_safetensors(weights)
    assert result.weights_method.startswith("replicate output")
    assert result.weights_method in caplog.text
    # shapes without a version fall back to the destination's newest version
    assert result.remote_version == replicate_standin.trainings[remote_id].result_version
    assert result.version_mismatch is False


def test_output_methods_name_where_the_weights_were(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
) -> None:
    methods = {}
    for shape in ("dict", "safetensors", "tar_in_list", "list"):
        replicate_standin.output_shape = shape
        methods[shape] = replicate_trainer.train(replicate_job_factory(), sink=RecordingSink()).weights_method
    assert "output.weights (tar)" in methods["dict"]
    assert "lora.safetensors" in methods["dict"]
    assert "direct safetensors" in methods["safetensors"]
    assert "output.weights[0] (tar)" in methods["tar_in_list"]
    assert "output[1] (tar)" in methods["list"]


@pytest.mark.parametrize("shape", ["url", "null_version"])
def test_a_retrain_whose_output_names_no_version_never_takes_the_previous_one(
    shape: str,
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sleeps: list[float],
) -> None:
    """Review repro: a retrain's output named no version and Replicate had added none yet; it
    was stored with the destination's latest, the first training's, so its scoring and every
    generation ran the old weights."""
    first = replicate_trainer.train(replicate_job_factory(), sink=RecordingSink())
    assert first.remote_version is not None
    replicate_standin.output_shape = shape
    replicate_standin.publish_versions = False
    replicate_sleeps.clear()

    with pytest.raises(TrainingFailedError) as caught:
        replicate_trainer.train(replicate_job_factory(), sink=RecordingSink())

    message = caught.value.user_message
    assert "did not say which version" in message
    assert "Start the training again" in message
    # looked again, a bounded number of times, poll_interval apart
    assert replicate_sleeps.count(2.0) >= 2
    assert len(replicate_standin.versions["selfie-lora/lora-u1"]) == 1


def test_a_version_replicate_adds_a_moment_after_the_run_ended_is_taken(
    replicate_standin: ReplicateStandIn,
    replicate_trainer_factory: TrainerFactory,
    replicate_job_factory: JobFactory,
) -> None:
    added: list[str] = []

    def sleep(seconds: float) -> None:
        # the first look found only the earlier training's version; Replicate adds this one's now
        if not replicate_standin.publish_versions and not added and any(
                t.status == "succeeded" for t in replicate_standin.trainings.values()
                if t.output_shape == "url"):
            added.append(replicate_standin.create_model_version("selfie-lora/lora-u1"))

    trainer = replicate_trainer_factory(sleep=sleep)
    first = trainer.train(replicate_job_factory(), sink=RecordingSink())
    replicate_standin.output_shape = "url"
    replicate_standin.publish_versions = False

    result = trainer.train(replicate_job_factory(), sink=RecordingSink())

    assert added
    assert result.remote_version == added[0] != first.remote_version


def test_a_version_of_another_model_is_flagged(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    replicate_standin.output_shape = "wrong_version"

    result = replicate_trainer.train(replicate_job_factory(), sink=replicate_sink)

    assert result.version_mismatch is True
    assert result.remote_version is not None
    assert result.remote_version.startswith("someone-else/other-model:")
    assert any(
        r.levelname == "WARNING" and "does not belong to destination" in r.getMessage()
        for r in caplog.records
    )


def test_a_trainer_version_replicate_ran_instead_of_the_pin_is_reported(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # replicate-python #419: Replicate ran (and reports) its newest trainer, not the pinned one.
    replicate_standin.trainer_version_ran = "c" * 64
    job = replicate_job_factory()

    result = replicate_trainer.train(job, sink=replicate_sink)

    ran = "ostris/flux-dev-lora-trainer:" + "c" * 64
    assert ran != job.trainer_version
    assert result.trainer_version_ran == ran
    assert result.metrics["trainer_version_ran"] == ran
    assert result.weights_path.is_file()  # the LoRA is kept: it is the user's, and paid for
    assert any(
        r.levelname == "WARNING" and "not the pinned" in r.getMessage() and ran in r.getMessage()
        for r in caplog.records
    )


def test_a_lost_create_is_adopted_when_replicate_ran_another_trainer_version(
    replicate_standin: ReplicateStandIn,
    replicate_trainer_factory: TrainerFactory,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    # The training's version is not the pinned one, so it is found by its upload alone: a
    # search by the pin missed it and the retry created (and Replicate billed) a second one.
    replicate_standin.trainer_version_ran = "c" * 64
    replicate_standin.slow_next("POST", TRAININGS_POST, delay=1.5)
    trainer = replicate_trainer_factory(timeout=0.4)

    result = trainer.train(replicate_job_factory(), sink=replicate_sink)

    remote_id = _only_training(replicate_standin)
    assert replicate_standin.count("POST", TRAININGS_POST) == 1
    assert replicate_sink.started_ids == [remote_id]
    assert result.trainer_version_ran == "ostris/flux-dev-lora-trainer:" + "c" * 64


def test_progress_rises_to_the_total(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
    replicate_sleeps: list[float],
) -> None:
    replicate_standin.processing_polls = 4
    job = replicate_job_factory()

    replicate_trainer.train(job, sink=replicate_sink)

    steps = [step for _, step, _, _ in replicate_sink.updates]
    totals = {total for _, _, total, _ in replicate_sink.updates}
    statuses = [status for status, _, _, _ in replicate_sink.updates]
    assert totals == {job.recipe.steps}
    assert steps == sorted(steps)
    assert len(set(steps)) >= 4
    assert steps[-1] == job.recipe.steps
    assert statuses[0] is TrainingStatus.STARTING
    assert TrainingStatus.PROCESSING in statuses
    assert TrainingStatus.SUCCEEDED not in statuses  # the caller decides success
    assert any(loss is not None for _, _, _, loss in replicate_sink.updates)
    assert replicate_sleeps
    assert set(replicate_sleeps) == {2.0}  # the poll interval


def test_the_webhook_url_is_sent_as_configured_and_names_no_training(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    # The webhook finds its training by the remote id in its signed body; nothing in the URL
    # (which nobody signs) may say which training it is about.
    job = replicate_job_factory(webhook_url="https://app.example/api/webhooks/replicate?x=1")
    replicate_trainer.train(job, sink=replicate_sink)

    record = replicate_standin.trainings[_only_training(replicate_standin)]
    assert record.webhook is not None
    query = parse_qs(urlsplit(record.webhook).query)
    assert query == {"x": ["1"]}
    assert record.webhook_events_filter == ["start", "completed"]


# --------------------------------------------------------------------------- retries


def test_429_then_success_honours_retry_after(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
    replicate_sleeps: list[float],
) -> None:
    replicate_standin.fail_next("POST", TRAININGS_POST, status=429, retry_after=7)
    replicate_standin.fail_next("GET", "/v1/trainings/", status=429, retry_after=3)

    result = replicate_trainer.train(replicate_job_factory(), sink=replicate_sink)

    assert result.weights_path.exists()
    assert len(replicate_standin.trainings) == 1
    assert replicate_standin.count("POST", TRAININGS_POST) == 2
    # The create's 7 s, the poll interval, then the poll's 3 s, the backoffs in 1 s slices
    # (each one asks whether the training was canceled meanwhile).
    assert replicate_sleeps[:11] == [1.0] * 7 + [2.0, 1.0, 1.0, 1.0]


def test_500_on_create_is_retried_into_exactly_one_training(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
    replicate_sleeps: list[float],
) -> None:
    replicate_standin.fail_next("POST", TRAININGS_POST, status=500, times=2)

    replicate_trainer.train(replicate_job_factory(), sink=replicate_sink)

    assert len(replicate_standin.trainings) == 1
    assert replicate_standin.count("POST", TRAININGS_POST) == 3
    # exponential backoff: 1 s, then 2 s (in 1 s slices; before the polls' 2 s interval)
    assert replicate_sleeps[:4] == [1.0, 1.0, 1.0, 2.0]
    assert len(replicate_sink.started_ids) == 1


def test_a_create_whose_answer_was_lost_is_adopted_not_repeated(
    replicate_standin: ReplicateStandIn,
    replicate_trainer_factory: TrainerFactory,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    # The server creates the training, then answers after the client gave up.
    replicate_standin.slow_next("POST", TRAININGS_POST, delay=1.5)
    trainer = replicate_trainer_factory(timeout=0.4)

    result = trainer.train(replicate_job_factory(), sink=replicate_sink)

    remote_id = _only_training(replicate_standin)
    assert replicate_standin.count("POST", TRAININGS_POST) == 1
    assert replicate_sink.started_ids == [remote_id]
    assert result.weights_path.read_bytes() == replicate_standin.weights_for(remote_id)


def test_a_last_create_attempt_whose_answer_was_lost_is_adopted(
    replicate_standin: ReplicateStandIn,
    replicate_trainer_factory: TrainerFactory,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    # Three creates refused (nothing made), then the last allowed one made the training and its
    # answer was lost: the user was told "Nothing was lost: try again" while it ran, billed.
    replicate_standin.fail_next("POST", TRAININGS_POST, status=503, times=3)
    replicate_standin.slow_next("POST", TRAININGS_POST, delay=1.5)
    trainer = replicate_trainer_factory(timeout=0.4, max_retries=3)

    result = trainer.train(replicate_job_factory(), sink=replicate_sink)

    remote_id = _only_training(replicate_standin)
    assert replicate_standin.count("POST", TRAININGS_POST) == 4
    assert replicate_sink.started_ids == [remote_id]
    assert result.weights_path.read_bytes() == replicate_standin.weights_for(remote_id)


def test_a_training_created_by_a_crashed_worker_is_adopted(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    job = replicate_job_factory()
    replicate_standin.add_model(job.destination)
    # What a worker did before dying without recording the remote id:
    client = Client(api_token=replicate_standin.token, base_url=replicate_standin.base_url)
    uploaded = client.files.create(
        io.BytesIO(build_training_zip(job.photos)),
        filename="photos.zip",
        metadata={MARKER_METADATA_KEY: job.training_id},
    )
    other = client.files.create(io.BytesIO(build_training_zip(job.photos)), filename="other.zip")
    # Ours first, so that with one training a page it is found on the list's second page.
    replicate_standin.page_size = 1
    for url in (uploaded.urls["get"], other.urls["get"]):
        client.trainings.create(
            version=job.trainer_version,
            input={"input_images": url, "trigger_word": job.trigger_word},
            destination=job.destination,
        )
    client._client.close()  # the client keeps a pool; close it to free its sockets
    ours = [
        t.id for t in replicate_standin.trainings.values() if t.input["input_images"] == uploaded.urls["get"]
    ]

    replicate_trainer.train(job, sink=replicate_sink)

    assert len(replicate_standin.trainings) == 2
    assert replicate_sink.started_ids == ours


@pytest.mark.parametrize("odd_version", [None, "a" * 64], ids=["null", "bare-id"])
def test_an_odd_training_on_the_account_does_not_block_new_ones(
    odd_version: str | None,
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    # Another tool's training on the same account, whose output.version the official client
    # cannot parse: listing trainings through it failed (a TypeError, or "try again" for ever)
    # before every create, so nobody could train.
    replicate_trainer.train(replicate_job_factory(destination="selfie-lora/other"),
                            sink=RecordingSink())
    foreign = replicate_standin.trainings[_only_training(replicate_standin)]
    foreign.output = {"version": odd_version, "weights": f"{replicate_standin.base_url}/files/x.tar"}

    result = replicate_trainer.train(replicate_job_factory(), sink=replicate_sink)

    assert len(replicate_standin.trainings) == 2
    ours = next(t for t in replicate_standin.trainings.values() if t.id != foreign.id)
    assert replicate_sink.started_ids == [ours.id]
    assert result.weights_path.read_bytes() == replicate_standin.weights_for(ours.id)


def test_resuming_by_remote_id_creates_nothing(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
) -> None:
    first = replicate_trainer.train(replicate_job_factory(), sink=RecordingSink())
    remote_id = _only_training(replicate_standin)

    sink = RecordingSink()
    again = replicate_trainer.train(replicate_job_factory(remote_id=remote_id), sink=sink)

    assert len(replicate_standin.trainings) == 1
    assert sink.started_ids == []
    assert again.weights_path.read_bytes() == first.weights_path.read_bytes()


def test_exhausted_retries_raise_unavailable_without_a_training(
    replicate_standin: ReplicateStandIn,
    replicate_trainer_factory: TrainerFactory,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
    replicate_sleeps: list[float],
) -> None:
    replicate_standin.fail_next("POST", TRAININGS_POST, status=503, times=10)
    trainer = replicate_trainer_factory(max_retries=2)

    with pytest.raises(TrainerUnavailableError) as caught:
        trainer.train(replicate_job_factory(), sink=replicate_sink)

    assert "try again in a few minutes" in caught.value.user_message
    assert replicate_standin.trainings == {}
    assert replicate_standin.count("POST", TRAININGS_POST) == 3
    assert replicate_sink.started_ids == []


def test_an_unreachable_server_raises_unavailable(
    replicate_trainer_factory: TrainerFactory,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    trainer = replicate_trainer_factory(base_url="http://127.0.0.1:9", max_retries=1)
    with pytest.raises(TrainerUnavailableError):
        trainer.train(replicate_job_factory(), sink=replicate_sink)


def test_a_rejected_token_says_what_to_fix(
    replicate_trainer_factory: TrainerFactory,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    trainer = replicate_trainer_factory(api_token="r8_wrong")
    with pytest.raises(TrainerUnavailableError) as caught:
        trainer.train(replicate_job_factory(), sink=replicate_sink)
    assert "REPLICATE_API_TOKEN" in caught.value.user_message


def test_a_malformed_trainer_version_fails_before_any_call(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    with pytest.raises(TrainingFailedError) as caught:
        replicate_trainer.train(
            replicate_job_factory(trainer_version="ostris/flux-dev-lora-trainer"), sink=replicate_sink
        )
    assert "SELFIE_LORA_TRAINER_VERSION" in caught.value.user_message
    assert replicate_standin.requests == []


# --------------------------------------------------------------------------- endings


@pytest.mark.parametrize(("error", "advice"), [
    # The stand-in's default error: Replicate's GPU ran out of memory, not the photos' fault.
    (None, "This was a problem on Replicate's side, not your photos: start the training again "
           "later; if it keeps happening, tell the operator."),
    ("torch.OutOfMemoryError: OOM when allocating tensor", "on Replicate's side, not your photos"),
    ("CUDA error: an illegal memory access was encountered", "on Replicate's side, not your photos"),
    ("Training timed out after 7200 seconds", "on Replicate's side, not your photos"),
    ("Prediction interrupted; please retry (code: PA)", "on Replicate's side, not your photos"),
    ("An internal error occurred", "on Replicate's side, not your photos"),
    ("input_images is not a zip file", "Check your photos and try again."),
    ("Could not download input_images", "Check your photos and try again."),
    ("cannot identify image file 'data/003.jpg'", "Check your photos and try again."),
    ("ValueError: steps must be positive", "if it fails the same way, tell the operator this error"),
])
def test_a_failed_training_says_what_the_user_can_do_about_its_error(
    error: str | None,
    advice: str,
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    replicate_standin.training_outcome = "failed"
    if error is None:
        error = replicate_standin.training_error
    replicate_standin.training_error = error

    with pytest.raises(TrainingFailedError) as caught:
        replicate_trainer.train(replicate_job_factory(), sink=replicate_sink)

    message = caught.value.user_message
    assert message.startswith(f"The training failed on Replicate: {error.rstrip('.')}. ")
    assert "Traceback" not in message  # the stand-in's logs hold one: not for users
    assert advice in message
    assert message.count("photos") == (1 if "photos" in advice else 0)


def test_a_training_canceled_on_replicate_raises_canceled(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    replicate_standin.training_outcome = "canceled"

    with pytest.raises(TrainingCanceledError) as caught:
        replicate_trainer.train(replicate_job_factory(), sink=replicate_sink)

    assert "canceled on Replicate" in caught.value.user_message


def test_a_training_replicate_aborted_fails_saying_so_not_as_an_outage(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
    replicate_sleeps: list[float],
) -> None:
    """Replicate's documented "aborted" status (the run's deadline passed before it started),
    which the official client refuses to parse, read as "Replicate cannot be reached" for every
    attempt. It ends the training as failed, saying what happened, with no retries and no
    cancel sent (the run has ended)."""
    replicate_standin.training_outcome = "aborted"

    with pytest.raises(TrainingFailedError) as caught:
        replicate_trainer.train(replicate_job_factory(), sink=replicate_sink)

    assert "aborted the training before it started" in caught.value.user_message
    assert "cannot be reached" not in caught.value.user_message
    assert set(replicate_sleeps) == {2.0}  # the poll interval only, no backoff
    remote_id = _only_training(replicate_standin)
    replicate_trainer.cancel_remote(remote_id)  # it has ended: nothing to cancel
    assert replicate_standin.count("POST", "/v1/trainings/*/cancel") == 0


def test_a_generation_replicate_aborted_says_so_not_as_an_outage(
    replicate_standin: ReplicateStandIn, replicate_generator: ReplicateGenerator,
) -> None:
    """An "aborted" prediction read as "Replicate cannot be reached right now"."""
    version = replicate_standin.create_model_version("selfie-lora/lora-g")
    replicate_standin.prediction_outcome = "aborted"
    job = GenerationJob(prompt=f"a portrait of {REPLICATE_TRIGGER}", num_outputs=1, seed=1,
                        lora_scale=1.0, trainer_version="ostris/flux-dev-lora-trainer:x",
                        remote_version=version)

    with pytest.raises(GenerationError) as caught:
        replicate_generator.generate(job)

    assert "aborted the generation before it started" in caught.value.user_message
    assert "cannot be reached" not in str(caught.value)


def test_a_cancel_requested_through_the_sink_cancels_remotely(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
) -> None:
    sink = RecordingSink(cancel_after=2)

    with pytest.raises(TrainingCanceledError) as caught:
        replicate_trainer.train(replicate_job_factory(), sink=sink)

    record = replicate_standin.trainings[_only_training(replicate_standin)]
    assert record.cancel_requests == 1
    assert record.status == "canceled"
    assert caught.value.user_message == "The training was canceled."
    assert record.weights is None


def test_a_worker_that_stops_leaves_the_remote_training_running_for_the_next_attempt(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
) -> None:
    sink = RecordingSink(interrupt_after=2)
    job = replicate_job_factory()
    with pytest.raises(TrainingInterruptedError):
        replicate_trainer.train(job, sink=sink)
    remote_id = _only_training(replicate_standin)
    record = replicate_standin.trainings[remote_id]
    assert record.cancel_requests == 0  # handed back, not canceled
    assert sink.started_ids == [remote_id]

    # The next attempt adopts it by its id and finishes it; nothing new is created.
    resumed = replicate_trainer.train(dataclasses.replace(job, remote_id=remote_id),
                                      sink=RecordingSink())
    assert resumed.weights_path.is_file()
    assert list(replicate_standin.trainings) == [remote_id]


def test_a_cancel_asked_before_the_create_creates_no_run(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
) -> None:
    """The cancel is read once right before the run is made: a run created (and billed) after
    the user asked to cancel, to be canceled at its first poll, was the old way."""
    sink = RecordingSink(cancel_after=1)

    with pytest.raises(TrainingCanceledError) as caught:
        replicate_trainer.train(replicate_job_factory(), sink=sink)

    assert replicate_standin.trainings == {}  # old code: one run, created then canceled
    assert replicate_standin.count("POST", TRAININGS_POST) == 0
    # No run id: the service looks for a run whose create's answer was lost, if one began.
    assert caught.value.remote_ended is False


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/files"),  # the photos' upload
    ("POST", TRAININGS_POST),  # the create
    ("GET", "/files/trainings/"),  # the weights' download
], ids=["upload", "create", "download"])
@pytest.mark.parametrize("asked", ["cancel", "stop"])
def test_a_cancel_or_a_stop_during_any_call_s_backoff_is_seen_within_a_second(
    replicate_standin: ReplicateStandIn,
    replicate_trainer_factory: TrainerFactory,
    replicate_job_factory: JobFactory,
    method: str,
    path: str,
    asked: str,
) -> None:
    """Replicate answers 503 with Retry-After: 60 as the user cancels (or the worker stops):
    every call's backoff asks every second, not only the polls' (old code: the upload's, the
    create's and the download's waited out 5 x 60 s, and the create made a run all the same)."""
    sink = RecordingSink()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if seconds > 0:  # a backoff (the polls' interval is 0 here): asked during it
            if asked == "cancel":
                sink.cancel_after = sink.cancel_checks + 1
            else:
                sink.interrupt_after = sink.interrupt_checks + 1

    trainer = replicate_trainer_factory(sleep=sleep, max_retries=5, poll_interval=0.0)
    replicate_standin.fail_next(method, path, status=503, times=5, retry_after=60)

    expected = TrainingCanceledError if asked == "cancel" else TrainingInterruptedError
    with pytest.raises(expected):
        trainer.train(replicate_job_factory(), sink=sink)

    assert sum(slept) <= 1.0, slept  # old code: 300 s (and no error: the call got through)
    if path != "/files/trainings/":
        assert replicate_standin.trainings == {}  # nothing created after the ask
    else:
        record = replicate_standin.trainings[_only_training(replicate_standin)]
        assert record.status == "succeeded"  # a stop leaves it for the next attempt


def test_cancel_remote_cancels_a_training_nobody_polls(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
) -> None:
    # Asked once before the create (nothing to stop then), then at the first poll.
    with pytest.raises(TrainingInterruptedError):
        replicate_trainer.train(replicate_job_factory(), sink=RecordingSink(interrupt_after=2))
    remote_id = _only_training(replicate_standin)
    replicate_trainer.cancel_remote(remote_id)
    assert replicate_standin.trainings[remote_id].cancel_requests == 1


def test_a_cancel_replicate_does_not_take_is_said(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
) -> None:
    """Whoever ends the training must know that the remote run goes on, to ask again."""
    replicate_standin.fail_next("POST", "/v1/trainings/*/cancel", status=503, times=100)
    with pytest.raises(TrainingCanceledError) as caught:
        replicate_trainer.train(replicate_job_factory(), sink=RecordingSink(cancel_after=2))
    assert caught.value.remote_ended is False
    remote_id = _only_training(replicate_standin)
    with pytest.raises(TrainerUnavailableError):
        replicate_trainer.cancel_remote(remote_id)
    assert replicate_standin.trainings[remote_id].status != "canceled"


# --------------------------------------------------------------------------- generator


def test_generator_returns_pngs_and_sends_the_lora_scale(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_generator: ReplicateGenerator,
    replicate_job_factory: JobFactory,
) -> None:
    trained = replicate_trainer.train(replicate_job_factory(), sink=RecordingSink())
    job = GenerationJob(
        prompt=f"a portrait of {REPLICATE_TRIGGER} on a beach",
        num_outputs=2,
        seed=42,
        lora_scale=0.7,
        trainer_version="ostris/flux-dev-lora-trainer:x",
        remote_version=trained.remote_version,
    )

    images = replicate_generator.generate(job)

    assert len(images) == 2
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            image.load()
    assert images[0] != images[1]
    # One single-image prediction per picture, picture i with seed + i.
    predictions = sorted(replicate_standin.predictions.values(), key=lambda p: p.input["seed"])
    assert [p.input["seed"] for p in predictions] == [42, 43]
    for prediction in predictions:
        assert prediction.input["lora_scale"] == 0.7
        assert prediction.input["num_outputs"] == 1
        assert prediction.input["output_format"] == "png"
        assert prediction.input["prompt"] == job.prompt
        assert trained.remote_version == f"{prediction.model}:{prediction.version_id}"


def test_picture_i_of_a_batch_is_the_picture_its_seed_makes_alone(
    replicate_standin: ReplicateStandIn, replicate_generator: ReplicateGenerator,
) -> None:
    """The contract (ports.image_seed): picture i of a batch made with a seed is made with
    seed + i, so it can be made again alone. The trained version's predictor seeds a batch once,
    so a batch sent as one prediction broke it."""
    version = replicate_standin.create_model_version("selfie-lora/lora-g")

    def make(seed: int, count: int) -> list[bytes]:
        return replicate_generator.generate(GenerationJob(
            prompt="at the beach", num_outputs=count, seed=seed, lora_scale=1.0,
            trainer_version="t", remote_version=version))

    batch = make(5, 3)
    assert batch[1] == make(6, 1)[0]
    assert batch[2] == make(7, 1)[0]


def test_a_picture_withheld_by_the_safety_checker_is_none_at_its_place(
    replicate_standin: ReplicateStandIn, replicate_generator: ReplicateGenerator,
) -> None:
    """The predictor drops a flagged image and succeeds: a batch that came back short would
    shift every later picture's seed, unsaid, and failing the batch lost the pictures that came
    (paid for). The withheld picture is None at its place, the others are kept with their seeds;
    only a batch withheld whole fails, naming the pictures and their seeds."""
    version = replicate_standin.create_model_version("selfie-lora/lora-g")

    def make(seed: int, count: int) -> Sequence[bytes | None]:
        return replicate_generator.generate(GenerationJob(
            prompt="at the beach", num_outputs=count, seed=seed, lora_scale=1.0,
            trainer_version="t", remote_version=version))

    replicate_standin.withheld_seeds = {8}
    batch = make(7, 3)
    assert batch[1] is None
    assert batch[0] == make(7, 1)[0]
    assert batch[2] == make(9, 1)[0]
    replicate_standin.withheld_seeds = {7, 8}
    with pytest.raises(GenerationError) as caught:
        make(7, 2)
    assert caught.value.user_message is not None
    assert "every picture (1 (seed 7), 2 (seed 8))" in caught.value.user_message
    assert "safety checker" in caught.value.user_message
    with pytest.raises(GenerationError) as caught:
        make(8, 1)
    assert "withheld the picture (seed 8)" in str(caught.value.user_message)


def test_generator_retries_and_maps_a_failed_prediction(
    replicate_standin: ReplicateStandIn,
    replicate_generator: ReplicateGenerator,
    replicate_sleeps: list[float],
) -> None:
    version = replicate_standin.create_model_version("selfie-lora/lora-g")
    job = GenerationJob(
        prompt="x", num_outputs=1, seed=None, lora_scale=1.0, trainer_version="t", remote_version=version
    )
    replicate_standin.fail_next("POST", "/v1/predictions", status=503, retry_after=4)
    assert len(replicate_generator.generate(job)) == 1
    assert 4.0 in replicate_sleeps
    # None given: one is drawn, so each picture of a batch has a seed of its own.
    assert isinstance(next(iter(replicate_standin.predictions.values())).input["seed"], int)

    replicate_standin.prediction_outcome = "failed"
    with pytest.raises(GenerationError) as caught:  # a generation's error, not a trainer's
        replicate_generator.generate(job)
    assert "NSFW" in caught.value.message
    assert ".." not in caught.value.message
    # The model's reason is the user's to know: the API answers it, not "please retry".
    assert caught.value.user_message == caught.value.message


def _generator_on(standin: ReplicateStandIn, sleeps: list[float], *, timeout: float,
                  transport: httpx.BaseTransport | None = None) -> ReplicateGenerator:
    return ReplicateGenerator(
        connection=ReplicateConnection(api_token=standin.token, base_url=standin.base_url,
                                       max_retries=3, sleep=sleeps.append, timeout=timeout,
                                       transport=transport),
        poll_interval=0.0)


def test_generator_bounds_the_create_by_the_timeout_and_adopts_what_it_made(
    replicate_standin: ReplicateStandIn, replicate_sleeps: list[float]
) -> None:
    # The official client sends POST /v1/predictions with no timeout: a Replicate that took
    # the request and never answered held the API thread for ever.
    version = replicate_standin.create_model_version("selfie-lora/lora-g")
    generator = _generator_on(replicate_standin, replicate_sleeps, timeout=1.0)
    replicate_standin.slow_next("POST", "/v1/predictions", delay=4.0)
    job = GenerationJob(prompt="x", num_outputs=1, seed=7, lora_scale=1.0, trainer_version="t",
                        remote_version=version)
    started = time.monotonic()
    assert len(generator.generate(job)) == 1
    assert time.monotonic() - started < 3.5
    assert len(replicate_standin.predictions) == 1  # the timed-out create's, adopted


def test_generator_cancels_a_prediction_it_gives_up_on(
    replicate_standin: ReplicateStandIn, replicate_sleeps: list[float]
) -> None:
    # "Generating took too long" left the prediction running on Replicate, billed, for images
    # nobody would collect.
    version = replicate_standin.create_model_version("selfie-lora/lora-g")
    replicate_standin.prediction_polls = 50
    generator = ReplicateGenerator(
        connection=ReplicateConnection(api_token=replicate_standin.token,
                                       base_url=replicate_standin.base_url, max_retries=1,
                                       sleep=replicate_sleeps.append, timeout=5.0),
        poll_interval=0.0, max_polls=3)
    job = GenerationJob(prompt="x", num_outputs=1, seed=7, lora_scale=1.0, trainer_version="t",
                        remote_version=version)
    with pytest.raises(GenerationError, match="took too long"):
        generator.generate(job)
    (prediction,) = replicate_standin.predictions.values()
    assert prediction.status == "canceled"


def test_generator_adopts_the_prediction_its_last_create_attempt_made(
    replicate_standin: ReplicateStandIn, replicate_sleeps: list[float]
) -> None:
    version = replicate_standin.create_model_version("selfie-lora/lora-g")
    generator = _generator_on(replicate_standin, replicate_sleeps, timeout=1.0)
    replicate_standin.fail_next("POST", "/v1/predictions", status=503, times=3)
    replicate_standin.slow_next("POST", "/v1/predictions", delay=4.0)  # made, answer lost
    job = GenerationJob(prompt="x", num_outputs=1, seed=7, lora_scale=1.0, trainer_version="t",
                        remote_version=version)
    assert len(generator.generate(job)) == 1
    assert replicate_standin.count("POST", "/v1/predictions") == 4
    assert len(replicate_standin.predictions) == 1


def test_generator_makes_one_prediction_when_the_create_answer_is_lost_to_a_5xx(
    replicate_standin: ReplicateStandIn, replicate_sleeps: list[float]
) -> None:
    version = replicate_standin.create_model_version("selfie-lora/lora-g")
    real = httpx.HTTPTransport()
    lost: list[str] = []

    class LossyGateway(httpx.BaseTransport):
        """A gateway that answers 502 to the first create after Replicate made it."""

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = real.handle_request(request)
            if (request.method, request.url.path) == ("POST", "/v1/predictions") and not lost:
                response.read()
                response.close()
                lost.append(request.url.path)
                return httpx.Response(502, json={"detail": "bad gateway"}, request=request)
            return response

    try:
        generator = _generator_on(replicate_standin, replicate_sleeps, timeout=5.0,
                                  transport=LossyGateway())
        job = GenerationJob(prompt="x", num_outputs=2, seed=None, lora_scale=1.0,
                            trainer_version="t", remote_version=version)
        images = generator.generate(job)
        assert lost
        assert len(images) == 2
        assert len(replicate_standin.predictions) == 2  # one per picture, the lost one adopted
        # The same job again, its create refused with a 5xx that made nothing: retried into a
        # prediction of its own, not the identical one just handed out.
        replicate_standin.fail_next("POST", "/v1/predictions", status=502)
        assert len(generator.generate(job)) == 2
    finally:
        real.close()
    assert len(replicate_standin.predictions) == 4


def test_generator_maps_an_unreachable_replicate_to_a_generation_error(
    replicate_standin: ReplicateStandIn, replicate_sleeps: list[float]) -> None:
    generator = ReplicateGenerator(connection=ReplicateConnection(
        api_token=replicate_standin.token, base_url="http://127.0.0.1:9", max_retries=1,
        sleep=replicate_sleeps.append, timeout=2.0))
    job = GenerationJob(prompt="x", num_outputs=1, seed=None, lora_scale=1.0, trainer_version="t",
                        remote_version="o/m:" + "a" * 64)
    with pytest.raises(GenerationError) as caught:
        generator.generate(job)
    assert "cannot be reached" in caught.value.message


def test_generator_needs_a_remote_version(replicate_generator: ReplicateGenerator) -> None:
    job = GenerationJob(prompt="x", num_outputs=1, seed=None, lora_scale=1.0, trainer_version="t")
    with pytest.raises(InvalidInputError):
        replicate_generator.generate(job)


def test_weights_downloads_are_retried_and_an_expired_output_is_reported(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
) -> None:
    replicate_standin.fail_next("GET", "/files/trainings/", status=503)
    assert replicate_trainer.train(replicate_job_factory(), sink=RecordingSink()).weights_path.exists()

    # 401/403 too: a signed output URL on the API's own origin (the files API's download,
    # with an expiry) that has expired, not our token (old code: "unavailable", retried 3 times)
    for status in (404, 403, 401):
        replicate_standin.fail_next("GET", "/files/trainings/", status=status)
        with pytest.raises(WeightsNotFoundError) as caught:
            replicate_trainer.train(replicate_job_factory(), sink=RecordingSink())
        assert "could no longer be downloaded" in caught.value.user_message


def test_outputs_named_off_replicate_s_hosts_are_never_fetched(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_generator: ReplicateGenerator,
    replicate_job_factory: JobFactory,
) -> None:
    # The worker downloaded whatever URL a training's output named, from inside the operator's
    # network. Here the output names the stand-in under another name than the configured API's.
    replicate_standin.output_base_url = replicate_standin.base_url.replace("127.0.0.1",
                                                                           "localhost")
    with pytest.raises(WeightsNotFoundError) as caught:
        replicate_trainer.train(replicate_job_factory(), sink=RecordingSink())
    assert "outside Replicate's file hosts" in caught.value.user_message
    assert "http://localhost:" in caught.value.message
    with pytest.raises(GenerationError) as refused:
        replicate_generator.generate(GenerationJob(
            prompt="x", num_outputs=1, seed=None, lora_scale=1.0, trainer_version="t",
            remote_version=replicate_standin.create_model_version("selfie-lora/lora-g")))
    assert "outside Replicate's file hosts" in refused.value.message
    assert refused.value.user_message == refused.value.message  # answered as it is (a 502)
    assert not [path for _method, path in replicate_standin.requests
                if path.startswith("/files/")]


def test_the_readme_says_what_the_replicate_recipe_sends(
    replicate_standin: ReplicateStandIn,
    replicate_trainer: ReplicateTrainer,
    replicate_job_factory: JobFactory,
    replicate_sink: RecordingSink,
) -> None:
    """What a training of ``replicate-person-v1`` sends the trainer is said in the README's
    recipes section, as it is sent (its resolution is not the trainer's default)."""
    job = replicate_job_factory()
    assert job.recipe.name == "replicate-person-v1"
    replicate_trainer.train(job, sink=replicate_sink)

    sent = replicate_standin.trainings[_only_training(replicate_standin)].input
    said = ", ".join(f"{key}: {json.dumps(sent[key])}"
                     for key in ("steps", "lora_rank", "learning_rate", "resolution", "batch_size"))
    assert sent["resolution"] == "1024"
    readme = re.sub(r"\s*\n\s*", " ", README.read_text())
    assert f"`replicate-person-v1`**, the Replicate backend's recipe, sends the trainer `{said}`" in (
        readme), said


def test_the_weights_are_stored_normalised_or_as_written_when_unreadable(
    replicate_standin: ReplicateStandIn,
    replicate_trainer_factory: TrainerFactory,
    replicate_job_factory: JobFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def normalise(data: bytes) -> bytes:
        return b"normalised:" + data[:8]

    def refuse(data: bytes) -> bytes:
        raise InvalidInputError("not a FLUX LoRA in diffusers' layout")

    result = replicate_trainer_factory(normalize_weights=normalise).train(
        replicate_job_factory(), sink=RecordingSink())
    written = replicate_standin.weights_for(list(replicate_standin.trainings)[-1])
    assert result.weights_path.read_bytes() == b"normalised:" + written[:8]

    result = replicate_trainer_factory(normalize_weights=refuse).train(
        replicate_job_factory(), sink=RecordingSink())
    assert result.weights_path.read_bytes() == replicate_standin.weights_for(
        list(replicate_standin.trainings)[-1])
    assert "stored as the trainer wrote it: not a FLUX LoRA" in caplog.text


def test_generator_creates_no_prediction_once_the_client_has_gone(
    replicate_standin: ReplicateStandIn, replicate_generator: ReplicateGenerator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The port's contract (``GenerationJob.client_gone``): a job nobody waits for any more is
    dropped before it starts and between pictures, ``ClientGoneError`` and nothing returned."""
    version = replicate_standin.create_model_version("selfie-lora/lora-g")
    gone = threading.Event()

    def job(count: int) -> GenerationJob:
        return GenerationJob(prompt="at the beach", num_outputs=count, seed=3, lora_scale=1.0,
                             trainer_version="t", remote_version=version, client_gone=gone)

    gone.set()
    with pytest.raises(ClientGoneError):
        replicate_generator.generate(job(2))
    assert not replicate_standin.predictions
    # Six pictures, four at a time: the client goes as the first of them is made, so the last
    # two, waiting their turn, are never created.
    gone.clear()
    picture = replicate_generator._picture

    def made_then_gone(*args: Any, **kwargs: Any) -> bytes:
        png = picture(*args, **kwargs)
        gone.set()
        return png

    monkeypatch.setattr(replicate_generator, "_picture", made_then_gone)
    with pytest.raises(ClientGoneError):
        replicate_generator.generate(job(6))
    assert len(replicate_standin.predictions) == 4


def test_weights_that_cannot_be_read_are_reported_without_the_url_s_signature(
    replicate_trainer: ReplicateTrainer, replicate_job_factory: JobFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Output that was no LoRA put its whole URL, signed query included, in the
    WeightsNotFoundError's message (logged, stored as the training's error): its host and path
    say which file; the signature said nothing more and granted the download to any reader."""
    signed = ("https://replicate.delivery/pbxt/x/trained_model.tar"
              "?X-Amz-Expires=3600&X-Amz-Signature=5ec7e7deadbeef")
    training = Training(id="t1", model="o/m", version="v", status="succeeded", input={},
                        logs="", output={"version": None, "weights": signed}, urls={})

    def not_a_lora(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not a tar, a zip nor safetensors")

    connection = ReplicateConnection(api_token="r8_test", base_url="https://api.test",
                                     max_retries=0, sleep=lambda s: None,
                                     transport=httpx.MockTransport(not_a_lora))
    with connection.session(TRAINER_FAILURES) as session, \
            pytest.raises(WeightsNotFoundError) as caught:
        replicate_trainer._collect(session, replicate_job_factory(), training, "o/m",
                                   stop=lambda: False)
    assert "https://replicate.delivery/pbxt/x/trained_model.tar" in caught.value.message
    assert "5ec7e7" not in caught.value.message
    assert "5ec7e7" not in caplog.text
