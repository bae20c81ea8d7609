"""The Replicate stand-in speaks enough of Replicate's API for the official client, and its
misbehaviour knobs do what they say."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image
from replicate.client import Client
from replicate.exceptions import ReplicateError
from replicate.pagination import paginate
from safetensors.numpy import load as load_safetensors

from selfie_lora.adapters.replicate.webhooks import parse_training_webhook, verify_webhook
from selfie_lora.testing.replicate_standin import ReplicateStandIn

VERSION = "ostris/flux-dev-lora-trainer:" + "f" * 64


@pytest.fixture
def client(replicate_standin: ReplicateStandIn) -> Iterator[Client]:
    transport = httpx.HTTPTransport()
    yield Client(
        api_token=replicate_standin.token,
        base_url=replicate_standin.base_url,
        mounts={"all://": transport},
    )
    transport.close()


@pytest.fixture
def raw(replicate_standin: ReplicateStandIn) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=replicate_standin.base_url,
        headers={"Authorization": f"Bearer {replicate_standin.token}"},
    ) as http:
        yield http


def _zip(captions: dict[str, str]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for stem, caption in captions.items():
            archive.writestr(f"{stem}.jpg", b"\xff\xd8 not really a jpeg")
            archive.writestr(f"{stem}.txt", caption)
    buffer.seek(0)
    return buffer


def _train(client: Client, destination: str = "me/lora", **inputs: Any) -> str:
    training = client.trainings.create(
        version=VERSION,
        input={"input_images": _zip({"000": "a photo of TOK"}), "trigger_word": "TOK", **inputs},
        destination=destination,
    )
    return training.id


def test_starts_serves_and_stops() -> None:
    standin = ReplicateStandIn()
    url = standin.start()
    assert url.startswith("http://127.0.0.1:")
    with httpx.Client() as http:
        assert http.get(f"{url}/v1/account").status_code == 401
    standin.stop()
    with pytest.raises(httpx.ConnectError), httpx.Client() as http:
        http.get(f"{url}/v1/account")


def test_auth_accepts_bearer_and_token_only_with_the_right_token(
    replicate_standin: ReplicateStandIn,
) -> None:
    url = f"{replicate_standin.base_url}/v1/account"
    token = replicate_standin.token
    with httpx.Client() as http:
        assert http.get(url).status_code == 401
        assert http.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.get(url, headers={"Authorization": f"Basic {token}"}).status_code == 401
        assert http.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert http.get(url, headers={"Authorization": f"Token {token}"}).status_code == 200
        problem = http.get(url).json()
    assert problem["status"] == 401
    assert problem["detail"]


def test_models_are_created_once_and_found(client: Client, replicate_standin: ReplicateStandIn) -> None:
    with pytest.raises(ReplicateError) as missing:
        client.models.get("me/lora")
    assert missing.value.status == 404

    model = client.models.create(owner="me", name="lora", visibility="private", hardware="cpu")
    assert (model.owner, model.name, model.visibility) == ("me", "lora", "private")
    with pytest.raises(ReplicateError) as again:
        client.models.create(owner="me", name="lora", visibility="private", hardware="cpu")
    assert again.value.status == 409
    assert client.models.get("me/lora").latest_version is None
    assert len(replicate_standin.model_creations) == 2
    assert replicate_standin.model_creations[0] == {
        "owner": "me",
        "name": "lora",
        "visibility": "private",
        "hardware": "cpu",
    }


def test_a_training_needs_an_existing_destination(client: Client) -> None:
    with pytest.raises(ReplicateError) as caught:
        _train(client, destination="me/nowhere")
    assert caught.value.status == 404
    assert "destination" in (caught.value.detail or "")


def test_a_training_moves_through_its_states_and_outputs_a_real_lora(
    client: Client, replicate_standin: ReplicateStandIn, raw: httpx.Client
) -> None:
    replicate_standin.add_model("me/lora")
    replicate_standin.processing_polls = 3
    training_id = _train(client, steps=200, lora_rank=4)

    record = replicate_standin.trainings[training_id]
    assert record.input_files == ["000.jpg", "000.txt"]
    assert record.captions == {"000.txt": "a photo of TOK"}
    assert record.trainer_version == "f" * 64
    assert record.body["destination"] == "me/lora"

    seen = []
    while True:
        training = client.trainings.get(training_id)
        seen.append((training.status, training.logs or ""))
        if training.status == "succeeded":
            break
    assert [s for s, _ in seen] == ["starting", "processing", "processing", "processing", "succeeded"]
    assert "50/200" in seen[2][1]
    assert "200/200" in seen[-1][1]

    output = training.output
    assert isinstance(output, dict)
    assert output["version"].startswith("me/lora:")
    latest = client.models.get("me/lora").latest_version
    assert latest is not None
    assert latest.id == output["version"].split(":")[1]
    tar_bytes = httpx.get(output["weights"]).content  # served without auth, like replicate.delivery
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        names = archive.getnames()
        lora = archive.extractfile("output/flux_train_replicate/lora.safetensors")
        assert lora is not None
        tensors = load_safetensors(lora.read())
    assert "output/flux_train_replicate/config.yaml" in names
    assert "output/flux_train_replicate/captions/000.txt" in names
    assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    assert tensors["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 32)

    body = raw.get(f"/v1/trainings/{training_id}").json()
    assert body["metrics"]["predict_time"] == 100.0
    assert body["urls"]["cancel"].endswith(f"/v1/trainings/{training_id}/cancel")
    assert body["completed_at"]
    assert body["started_at"]
    assert body["created_at"]


def test_base64_inputs_are_decoded_too(client: Client, replicate_standin: ReplicateStandIn) -> None:
    replicate_standin.add_model("me/lora")
    training = client.trainings.create(
        version=VERSION,
        input={"input_images": _zip({"007": "TOK smiling"})},
        destination="me/lora",
        file_encoding_strategy="base64",
    )
    record = replicate_standin.trainings[training.id]
    assert record.input["input_images"].startswith("data:")
    assert record.captions == {"007.txt": "TOK smiling"}


def test_an_input_that_is_not_a_zip_fails_the_training(
    client: Client, replicate_standin: ReplicateStandIn
) -> None:
    replicate_standin.add_model("me/lora")
    training = client.trainings.create(
        version=VERSION, input={"input_images": io.BytesIO(b"not a zip")}, destination="me/lora"
    )
    replicate_standin.finish(training.id)
    assert client.trainings.get(training.id).error == "input_images is not a zip file"


def test_trainings_are_listed_newest_first_across_pages(
    client: Client, replicate_standin: ReplicateStandIn
) -> None:
    replicate_standin.add_model("me/lora")
    replicate_standin.page_size = 2
    ids = [_train(client) for _ in range(3)]

    pages = list(paginate(client.trainings.list))

    assert [len(p.results) for p in pages] == [2, 1]
    assert [t.id for p in pages for t in p.results] == ids[::-1]


def test_cancel_and_outcomes(client: Client, replicate_standin: ReplicateStandIn) -> None:
    replicate_standin.add_model("me/lora")
    canceled = client.trainings.cancel(_train(client))
    assert canceled.status == "canceled"

    replicate_standin.training_outcome = "failed"
    failed = replicate_standin.finish(_train(client))
    assert (failed.status, failed.error) == ("failed", replicate_standin.training_error)
    assert failed.output is None

    replicate_standin.training_outcome = "canceled"
    assert replicate_standin.finish(_train(client)).status == "canceled"


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("url", str),
        ("list", list),
        ("dict", dict),
        ("wrong_version", dict),
    ],
)
def test_output_shapes(
    shape: str, expected: type, client: Client, replicate_standin: ReplicateStandIn
) -> None:
    replicate_standin.add_model("me/lora")
    replicate_standin.output_shape = shape  # type: ignore[assignment]
    output: Any = replicate_standin.finish(_train(client)).output
    assert isinstance(output, expected)
    if shape == "wrong_version":
        assert isinstance(output, dict)
        assert output["version"].split(":")[0] != "me/lora"
        assert replicate_standin.versions["me/lora"] == []


def test_fail_next_answers_errors_then_recovers(
    raw: httpx.Client, replicate_standin: ReplicateStandIn
) -> None:
    replicate_standin.fail_next("GET", "/v1/acc", status=429, times=2, retry_after=5)
    replicate_standin.fail_next("POST", "/v1/models/*/trainings", status=503)
    first = raw.get("/v1/account")
    assert first.status_code == 429
    assert first.headers["Retry-After"] == "5"
    assert raw.get("/v1/account").status_code == 429
    assert raw.get("/v1/account").status_code == 200
    replicate_standin.add_model("me/lora")
    answer = raw.post(
        f"/v1/models/a/b/versions/{'f' * 64}/trainings",
        json={"destination": "me/lora", "input": {"input_images": "data:application/zip;base64,"}},
    )
    assert answer.status_code == 503
    assert replicate_standin.trainings == {}
    assert replicate_standin.count("GET", "/v1/account") == 3


def test_slow_next_acts_before_answering_late(
    replicate_standin: ReplicateStandIn,
) -> None:
    replicate_standin.slow_next("POST", "/v1/models", delay=1.0)
    with (
        httpx.Client(
            base_url=replicate_standin.base_url,
            headers={"Authorization": f"Bearer {replicate_standin.token}"},
            timeout=0.2,
        ) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/models", json={"owner": "me", "name": "m", "visibility": "private", "hardware": "cpu"})
    assert "me/m" in replicate_standin.models


def test_predictions_accept_every_version_form_and_return_pngs(
    client: Client, replicate_standin: ReplicateStandIn
) -> None:
    ref = replicate_standin.create_model_version("me/lora")
    model, version_id = ref.split(":")
    for version in (ref, version_id, model):
        prediction = client.predictions.create(
            version=version, input={"prompt": "TOK", "num_outputs": 2, "seed": 3}
        )
        while prediction.status not in {"succeeded", "failed"}:
            prediction = client.predictions.get(prediction.id)
        assert prediction.status == "succeeded"
        assert prediction.version == version_id
        for url in prediction.output or []:
            with Image.open(io.BytesIO(httpx.get(url).content)) as image:
                assert image.format == "PNG"
    assert [p.input["seed"] for p in replicate_standin.predictions.values()] == [3, 3, 3]
    with pytest.raises(ReplicateError) as caught:
        client.predictions.create(version="me/other:" + "0" * 64, input={"prompt": "x"})
    assert caught.value.status == 422


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_signed_webhooks_are_delivered_on_completion() -> None:
    secret = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHM="
    _Receiver.received = []
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        with ReplicateStandIn(webhook_secret=secret) as standin:
            standin.add_model("me/lora")
            hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook?training_id=t1"
            transport = httpx.HTTPTransport()
            local = Client(api_token=standin.token, base_url=standin.base_url, mounts={"all://": transport})
            training = local.trainings.create(
                version=VERSION,
                input={"input_images": _zip({"000": "TOK"})},
                destination="me/lora",
                webhook=hook,
                webhook_events_filter=["completed"],
            )
            transport.close()
            standin.finish(training.id)
            for _ in range(100):
                if standin.webhook_deliveries:
                    break
                time.sleep(0.02)
            assert standin.webhook_deliveries[0]["status"] == 204
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join()
    ((headers, body),) = _Receiver.received
    verify_webhook(secret=secret, headers=headers, body=body)
    parsed = parse_training_webhook(body)
    assert parsed["id"] == training.id
    assert parsed["status"] == "succeeded"
    assert parsed["step"] == parsed["total"] == 1000
    assert json.loads(body)["output"]["weights"].endswith("trained_model.tar")
