"""The Replicate session over ``httpx.MockTransport``: retries, Retry-After, error mapping for the
trainer and the generator, and the token kept to the API's origin."""

from __future__ import annotations

import base64

import httpx
import pytest

from selfie_lora.adapters.replicate.session import (
    GENERATOR_FAILURES,
    TRAINER_FAILURES,
    ReplicateConnection,
    shorten,
    shown_url,
)
from selfie_lora.errors import (
    ConfigError,
    GenerationError,
    SelfieLoraError,
    TrainerUnavailableError,
    TrainingFailedError,
    WeightsNotFoundError,
)

API = "https://api.test"
TRAINING = {"id": "t1", "status": "processing", "model": "o/m", "version": "v", "input": {},
            "logs": "", "urls": {"get": f"{API}/v1/trainings/t1",
                                 "cancel": f"{API}/v1/trainings/t1/cancel"}}


def connection(handler: object, sleeps: list[float], **extra: object) -> ReplicateConnection:
    return ReplicateConnection(api_token="r8_test", base_url=API, max_retries=2,
                               sleep=sleeps.append,
                               transport=httpx.MockTransport(handler),  # type: ignore[arg-type]
                               **extra)  # type: ignore[arg-type]


def test_a_429_is_retried_after_the_delay_the_server_asks_for() -> None:
    answers = [httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": "slow down"}),
               httpx.Response(200, json=TRAINING)]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    sleeps: list[float] = []
    with connection(handler, sleeps).session(TRAINER_FAILURES) as session:
        training = session.call("read the training",
                                lambda: session.client.trainings.get("t1"))
    assert training.id == "t1"
    assert sleeps == [7.0]
    assert [r.url.path for r in seen] == ["/v1/trainings/t1"] * 2
    assert all(r.headers["authorization"] == "Bearer r8_test" for r in seen)


def test_errors_are_the_trainers_or_the_generators() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": "input_images is required"})

    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "busy"})

    sleeps: list[float] = []
    for failures, refused, unavailable in ((TRAINER_FAILURES, TrainingFailedError,
                                            TrainerUnavailableError),
                                           (GENERATOR_FAILURES, GenerationError,
                                            GenerationError)):
        with connection(refuse, sleeps).session(failures) as session, \
                pytest.raises(refused) as caught:
            session.call("start", lambda s=session: s.client.trainings.get("t1"))
        assert "input_images is required" in caught.value.message
        with connection(down, sleeps).session(failures) as session, \
                pytest.raises(unavailable) as gone:
            session.call("start", lambda s=session: s.client.trainings.get("t1"))
        assert "cannot be reached" in (getattr(gone.value, "user_message", None) or gone.value.message)


def test_downloads_from_other_hosts_never_carry_the_token() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"lora bytes")

    with connection(handler, []).session(TRAINER_FAILURES) as session:
        data = session.download("https://replicate.delivery/out/lora.safetensors",
                                max_bytes=100, what="download the weights")
    assert data == b"lora bytes"
    assert "authorization" not in seen[0].headers


@pytest.mark.parametrize("url", [
    "https://replicate.delivery/pbxt/x/trained_model.tar",
    "https://pbxt.replicate.delivery/x/trained_model.tar",
    "https://REPLICATE.delivery/x/trained_model.tar",
    f"{API}/v1/files/f1/download",  # the configured API's own origin
])
def test_a_download_from_replicate_s_hosts_is_fetched(url: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"lora bytes")

    with connection(handler, []).session(TRAINER_FAILURES) as session:
        assert session.download(url, max_bytes=100, what="download the weights") == b"lora bytes"
    assert len(seen) == 1


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://127.0.0.1:6379/",
    "https://example.com/lora.safetensors",
    "http://replicate.delivery/x.tar",  # not https
    "https://replicate.delivery.example.com/x.tar",
    "https://evilreplicate.delivery/x.tar",
    "https://replicate.delivery@example.com/x.tar",
    "https://user:secret@example.com/x.tar",
    "http://api.test/v1/files/f1",  # the API's host, another scheme
    "https://api.test:8443/v1/files/f1",  # the API's host, another port
    "file:///etc/passwd",
])
def test_a_download_anywhere_else_is_refused_before_any_request(url: str) -> None:
    # The worker fetched whatever URL a training's output named: a trainer's output could make
    # it read an internal address (a cloud metadata service, a database) from inside.
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"secrets")

    sleeps: list[float] = []
    for failures, error in ((TRAINER_FAILURES, WeightsNotFoundError),
                            (GENERATOR_FAILURES, GenerationError)):
        with connection(handler, sleeps).session(failures) as session, \
                pytest.raises(error) as caught:
            session.download(url, max_bytes=100, what="download the weights")
        told = (getattr(caught.value, "user_message", None) or caught.value.message)
        assert "outside Replicate's file hosts" in told
        why = caught.value.message if error is WeightsNotFoundError else caught.value.details[0]
        assert "is not https://replicate.delivery" in why
        assert "secret" not in why  # a URL's user and password are never repeated
    assert seen == []
    assert sleeps == []  # not retried: the same output names the same place


def test_a_redirect_off_replicate_s_hosts_is_refused_before_it_is_followed() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host == "replicate.delivery":
            return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/"})
        return httpx.Response(200, content=b"secrets")

    with connection(handler, []).session(TRAINER_FAILURES) as session, \
            pytest.raises(WeightsNotFoundError) as caught:
        session.download("https://replicate.delivery/x.tar", max_bytes=100,
                         what="download the weights")
    assert "http://169.254.169.254 is not" in caught.value.message
    assert seen == ["https://replicate.delivery/x.tar"]


def test_a_connection_needs_a_token() -> None:
    with pytest.raises(ConfigError):
        ReplicateConnection(api_token="")


@pytest.mark.parametrize(("remote", "shown"), [
    ("Traceback (most recent call last):\n  File \"x.py\"\nValueError: no faces.", "ValueError: no faces"),
    ("CUDA out of memory\x00\x1b[31m.", "CUDA out of memory  [31m"),
    ("", "unknown error"),
])
def test_a_remote_error_is_shown_as_one_printable_line(remote: str, shown: str) -> None:
    # Stored as the training's error: a NUL is a text PostgreSQL refuses to store.
    assert shorten(remote) == shown
    assert shorten("x" * 500).endswith("…")
    assert len(shorten("x" * 500)) == 240



@pytest.mark.parametrize("body", [b"null", b"[]", b'"bad gateway"', b"42"])
def test_an_error_whose_body_is_not_an_object_is_retried_then_mapped(body: bytes) -> None:
    # A proxy's error body: the official client's ReplicateError.from_response called .get on
    # it, an AttributeError that escaped unmapped and, mid-poll, failed a healthy training.
    def odd(status: int) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    answers = [odd(502), odd(503), httpx.Response(200, json=TRAINING)]
    sleeps: list[float] = []
    with connection(lambda request: answers.pop(0), sleeps).session(TRAINER_FAILURES) as session:
        training = session.call("check on the training",
                                lambda: session.client.trainings.get("t1"))
    assert training.id == "t1"
    assert sleeps == [1.0, 2.0]

    for read, failures, error in (
        (lambda s: s.call("check", lambda: s.client.trainings.get("t1")), TRAINER_FAILURES,
         TrainerUnavailableError),
        (lambda s: s.get_json("/v1/trainings/t1", what="check"), TRAINER_FAILURES,
         TrainerUnavailableError),
        (lambda s: s.post_json("/v1/predictions", {}, what="start"), GENERATOR_FAILURES,
         GenerationError),
    ):
        with connection(lambda request: odd(502), []).session(failures) as session, \
                pytest.raises(error) as gone:
            read(session)
        assert "cannot be reached" in (getattr(gone.value, "user_message", None) or gone.value.message)
        with connection(lambda request: odd(422), []).session(failures) as session, \
                pytest.raises(SelfieLoraError) as refused:
            read(session)
        assert "(HTTP 422)" in (getattr(refused.value, "user_message", None) or refused.value.message)
    with connection(lambda request: odd(401), []).session(TRAINER_FAILURES) as session, \
            pytest.raises(TrainerUnavailableError) as rejected:
        session.get_json("/v1/trainings/t1", what="check")
    assert "REPLICATE_API_TOKEN" in rejected.value.user_message


@pytest.mark.parametrize("detail", [{"reason": "busy"}, 7, ["x"]])
def test_an_error_detail_that_is_not_text_is_mapped(detail: object) -> None:
    answers = [httpx.Response(429, json={"detail": detail}),
               httpx.Response(422, json={"detail": detail, "title": ["odd"]})]
    sleeps: list[float] = []
    with connection(lambda request: answers.pop(0), sleeps).session(TRAINER_FAILURES) as session, \
            pytest.raises(TrainingFailedError) as caught:
        session.call("start", lambda: session.client.trainings.get("t1"))
    assert sleeps == [1.0]
    assert "Replicate refused to start" in caught.value.user_message


@pytest.mark.parametrize("retry_after", ["86400", "Wed, 01 Jan 2200 00:00:00 GMT"])
def test_a_retry_after_beyond_the_backoff_cap_is_capped(retry_after: str) -> None:
    # A day's Retry-After held the worker (or a user's generate request) for a day.
    answers = [httpx.Response(429, headers={"Retry-After": retry_after}, json={"detail": "slow"}),
               httpx.Response(503, headers={"Retry-After": retry_after}, json={"detail": "busy"}),
               httpx.Response(200, json=TRAINING)]
    sleeps: list[float] = []
    with connection(lambda request: answers.pop(0), sleeps).session(TRAINER_FAILURES) as session:
        assert session.get_json("/v1/trainings/t1", what="read the training")["id"] == "t1"
    assert sleeps == [60.0, 60.0]


def test_a_data_url_is_decoded_under_the_cap() -> None:
    lora = base64.b64encode(b"lora bytes").decode()
    with connection(lambda request: httpx.Response(500), []).session(TRAINER_FAILURES) as session:
        assert session.download(f"data:application/octet-stream;base64,{lora}", max_bytes=10,
                                what="download the weights") == b"lora bytes"
        assert session.download("data:,lora%20bytes", max_bytes=10,
                                what="download the weights") == b"lora bytes"


@pytest.mark.parametrize("url", [
    "data:application/x-tar;base64",  # no comma: an IndexError escaped unmapped
    "data:application/x-tar;base64,@@@",  # invalid base64: decoded silently to b""
    "data:application/x-tar;base64,bG9y YQ==",
    "https://[::1/x.tar",  # httpx.InvalidURL is no HTTPError
])
def test_a_url_that_cannot_be_read_is_refused(url: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"x")

    for failures, refused in ((TRAINER_FAILURES, TrainingFailedError),
                              (GENERATOR_FAILURES, GenerationError)):
        with connection(handler, []).session(failures) as session, \
                pytest.raises(refused) as caught:
            session.download(url, max_bytes=100, what="download the weights")
        assert "no valid URL" in (getattr(caught.value, "user_message", None) or caught.value.message)
    assert seen == []


@pytest.mark.parametrize("url", [
    "data:application/octet-stream;base64," + base64.b64encode(b"x" * 11).decode(),
    "data:application/octet-stream;base64," + base64.b64encode(b"x" * 4000).decode(),
    "data:," + "x" * 11,
])
def test_a_data_url_over_the_cap_is_refused_as_too_large(url: str) -> None:
    # max_bytes was ignored for data: URLs.
    with connection(lambda request: httpx.Response(500), []).session(TRAINER_FAILURES) as session, \
            pytest.raises(WeightsNotFoundError) as caught:
        session.download(url, max_bytes=10, what="download the weights")
    assert "larger than this service accepts" in caught.value.user_message


def test_a_connection_does_not_show_its_token() -> None:
    shown = repr(ReplicateConnection(api_token="r8_secret_token", base_url=API))
    assert "r8_secret_token" not in shown
    assert API in shown


SIGNED = ("https://replicate.delivery/pbxt/x/trained_model.tar"
          "?X-Amz-Expires=3600&X-Amz-Signature=5ec7e7deadbeef")


@pytest.mark.parametrize(("url", "shown"), [
    (SIGNED, "https://replicate.delivery/pbxt/x/trained_model.tar?(query hidden)"),
    ("https://user:pw@replicate.delivery:8443/x.tar#frag",
     "https://replicate.delivery:8443/x.tar"),
    ("https://replicate.delivery/x.tar", "https://replicate.delivery/x.tar"),
    ("data:application/x-tar;base64,bG9yYQ==", "a data: URL (application/x-tar, 38 characters)"),
    ("https://[::1/x.tar?sig=5ec7e7", "an unreadable URL"),
])
def test_a_url_is_shown_without_its_query_or_credentials(url: str, shown: str) -> None:
    assert shown_url(url) == shown


def test_a_signed_output_url_s_signature_is_in_no_message() -> None:
    """A download's messages (logged, and stored as the training's error) held the whole output
    URL, its signed query included: they hold its host and path, the query masked."""
    def too_large(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 200)

    with connection(too_large, []).session(TRAINER_FAILURES) as session, \
            pytest.raises(WeightsNotFoundError) as caught:
        session.download(SIGNED, max_bytes=100, what="download the weights")
    assert "replicate.delivery/pbxt/x/trained_model.tar" in caught.value.message
    assert "5ec7e7" not in caught.value.message
    bad = "https://[::1/x.tar?X-Amz-Signature=5ec7e7"
    with connection(too_large, []).session(TRAINER_FAILURES) as session, \
            pytest.raises(TrainingFailedError) as refused:
        session.download(bad, max_bytes=100, what="download the weights")
    assert "5ec7e7" not in refused.value.message
