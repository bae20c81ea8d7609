"""Standard Webhooks verification and reading Replicate training webhooks."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from selfie_lora.adapters.replicate.webhooks import (
    ReplicateWebhooks,
    log_bars,
    parse_log_progress,
    parse_training_webhook,
    verify_webhook,
)
from selfie_lora.config import Settings, settings_errors
from selfie_lora.errors import AuthError, ConfigError, InvalidInputError
from selfie_lora.services.ports import ProgressBar, training_progress
from selfie_lora.testing.replicate_standin import sign_webhook

SECRET = "whsec_" + base64.b64encode(b"a-secret-of-32-bytes-for-tests!!").decode()
OTHER = "whsec_" + base64.b64encode(b"another-secret-of-32-bytes-here!").decode()
BODY = json.dumps({"id": "abc", "status": "succeeded"}).encode()


@pytest.mark.parametrize(("secret", "why"), [
    # standardwebhooks drops what is not base64 and takes the rest as another key: these were
    # accepted at start-up, and every delivery then failed its signature.
    ("my-secret-string", "it does not start with whsec_"),
    ("abc", "it does not start with whsec_"),
    (base64.b64encode(b"a-secret-of-32-bytes-for-tests!!").decode(),
     "it does not start with whsec_"),
    ("whsec_a b c", "what follows whsec_ is not base64"),
    ("whsec_!!!!", "what follows whsec_ is not base64"),
    ("whsec_my-secret_string", "what follows whsec_ is not base64"),
    ("whsec_abcde", "what follows whsec_ is not base64"),
    ("whsec_", "what follows whsec_ is not base64"),
    ("whsec_" + base64.b64encode(b"sixteen bytes!!!").decode(), "it holds 16 bytes, fewer than 24"),
])
def test_a_malformed_webhook_secret_stops_the_settings_in_one_line(secret: str, why: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(webhook_secret=secret)
    assert settings_errors(caught.value) == [
        f"SELFIE_LORA_WEBHOOK_SECRET: is not a webhook signing secret ({why}): Replicate's is "
        "whsec_ followed by base64 (GET /v1/webhooks/default/secret)"]
    with pytest.raises(ConfigError, match=r"SELFIE_LORA_WEBHOOK_SECRET is not a webhook"):
        ReplicateWebhooks(secret=secret)  # a library user's, built without the settings


@pytest.mark.parametrize("secret", [
    SECRET, OTHER, SECRET.rstrip("="),  # padded or not, as the package takes it
    "whsec_" + base64.b64encode(bytes(range(24))).decode(),
    "whsec_" + base64.b64encode(bytes(range(64))).decode(),
])
def test_a_signing_secret_is_taken(secret: str) -> None:
    assert Settings(webhook_secret=secret).webhook_secret is not None
    verifier = ReplicateWebhooks(secret=secret)
    event = verifier.verify(headers=sign_webhook(secret=secret, body=BODY), body=BODY)
    assert event.remote_id == "abc"


def test_a_good_signature_passes() -> None:
    verify_webhook(secret=SECRET, headers=sign_webhook(secret=SECRET, body=BODY), body=BODY)


def test_header_names_are_case_insensitive() -> None:
    headers = {k.upper(): v for k, v in sign_webhook(secret=SECRET, body=BODY).items()}
    verify_webhook(secret=SECRET, headers=headers, body=BODY)


def test_a_rotated_key_header_with_two_v1_entries_passes() -> None:
    old = sign_webhook(secret=OTHER, body=BODY, msg_id="msg_1", timestamp=int(time.time()))
    new = sign_webhook(secret=SECRET, body=BODY, msg_id="msg_1", timestamp=int(old["webhook-timestamp"]))
    headers = {**new, "webhook-signature": f"{old['webhook-signature']} {new['webhook-signature']}"}
    verify_webhook(secret=SECRET, headers=headers, body=BODY)
    verify_webhook(secret=OTHER, headers=headers, body=BODY)


def test_now_is_honoured() -> None:
    stamp = 1_700_000_000
    headers = sign_webhook(secret=SECRET, body=BODY, timestamp=stamp)
    verify_webhook(secret=SECRET, headers=headers, body=BODY, now=stamp + 299)
    with pytest.raises(AuthError):
        verify_webhook(secret=SECRET, headers=headers, body=BODY, now=stamp + 301)


def _bad_cases() -> dict[str, tuple[str, dict[str, str], bytes]]:
    good = sign_webhook(secret=SECRET, body=BODY)
    old = sign_webhook(secret=SECRET, body=BODY, timestamp=int(time.time()) - 600)
    future = sign_webhook(secret=SECRET, body=BODY, timestamp=int(time.time()) + 600)
    return {
        "wrong secret": (OTHER, good, BODY),
        "tampered body": (SECRET, good, BODY.replace(b"succeeded", b"failed")),
        "old timestamp": (SECRET, old, BODY),
        "future timestamp": (SECRET, future, BODY),
        "no headers": (SECRET, {}, BODY),
        "missing signature": (SECRET, {k: v for k, v in good.items() if k != "webhook-signature"}, BODY),
        "garbage signature": (SECRET, {**good, "webhook-signature": "v1,!!!not base64"}, BODY),
        "no comma": (SECRET, {**good, "webhook-signature": "garbage"}, BODY),
        "other version": (
            SECRET,
            {**good, "webhook-signature": good["webhook-signature"].replace("v1,", "v2,")},
            BODY,
        ),
        "garbage timestamp": (SECRET, {**good, "webhook-timestamp": "yesterday"}, BODY),
        "changed id": (SECRET, {**good, "webhook-id": "msg_other"}, BODY),
        "binary body": (SECRET, good, b"\xff\xfe\x00"),
        "garbage secret": ("whsec_%%%", good, BODY),
        "empty secret": ("", good, BODY),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_webhooks_raise_auth_error(case: str) -> None:
    secret, headers, body = _bad_cases()[case]
    with pytest.raises(AuthError):
        verify_webhook(secret=secret, headers=headers, body=body)


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _refusals(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "selfie_lora.adapters.replicate.webhooks"]


def test_a_wrong_secret_or_a_clock_off_is_said_once_every_ten_minutes_each(
        caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: a wrong (well-formed) secret, or this server's clock more than 5
    minutes off, answered every delivery 401 with no line in the log. Each is said at WARNING,
    which it is (the clock's with its skew), once every 10 minutes for each; the rest at DEBUG;
    never the secret or the signature."""
    caplog.set_level("DEBUG", logger="selfie_lora.adapters.replicate.webhooks")
    ticks = Ticks()
    verifier = ReplicateWebhooks(secret=SECRET, monotonic=ticks)
    wrong = sign_webhook(secret=OTHER, body=BODY)
    for _ in range(3):
        with pytest.raises(AuthError):
            verifier.verify(headers=wrong, body=BODY)
    said = _refusals(caplog)
    assert [level for level, _ in said] == ["WARNING", "DEBUG", "DEBUG"]
    assert said[0][1].startswith("Replicate webhook refused (401): signature mismatch, no "
                                 "signature matches SELFIE_LORA_WEBHOOK_SECRET")
    # The clock's refusal is its own kind: said at once, though the mismatch was just said.
    caplog.clear()
    old = sign_webhook(secret=SECRET, body=BODY, timestamp=int(time.time()) - 3600)
    ahead = sign_webhook(secret=SECRET, body=BODY, timestamp=int(time.time()) + 900)
    for headers in (old, ahead):
        with pytest.raises(AuthError):
            verifier.verify(headers=headers, body=BODY)
    said = _refusals(caplog)
    assert [level for level, _ in said] == ["WARNING", "DEBUG"]
    assert re.search(r"its signed timestamp is outside the 300 s window, this server's clock "
                     r"360[01] s ahead of it \(check this machine's clock\)", said[0][1]), said
    assert re.search(r"clock (899|900) s behind it", said[1][1]), said
    # Ten minutes on, each is said again.
    caplog.clear()
    ticks.now += 600
    for headers in (wrong, old):
        with pytest.raises(AuthError):
            verifier.verify(headers=headers, body=BODY)
    said = _refusals(caplog)
    assert [level for level, _ in said] == ["WARNING", "WARNING"]
    assert "signature mismatch" in said[0][1]
    assert "outside the 300 s window" in said[1][1]
    # Anybody's POST with an old timestamp is a mismatch, not this clock being off; headers
    # missing or garbled are not said at all.
    caplog.clear()
    forged = sign_webhook(secret=OTHER, body=BODY, timestamp=int(time.time()) - 3600)
    for headers in (forged, {}, {**wrong, "webhook-timestamp": "yesterday"}):
        with pytest.raises(AuthError):
            verifier.verify(headers=headers, body=BODY)
    said = _refusals(caplog)
    assert [(level, "signature mismatch" in text) for level, text in said] == [("DEBUG", True)]
    logged = " ".join(r.getMessage() for r in caplog.records)
    for secret_or_signature in (SECRET, OTHER, SECRET.removeprefix("whsec_"),
                                OTHER.removeprefix("whsec_"), wrong["webhook-signature"],
                                old["webhook-signature"].partition(",")[2]):
        assert secret_or_signature not in logged


LOGS = (
    "Extracting 12 images\n"
    "Caching latents to disk: 100%|██████████| 12/12 [00:01<00:00,  9.50it/s]\n"
    "flux_train_replicate:   0%|          | 0/1000 [00:00<?, ?it/s]\r"
    "flux_train_replicate:  40%|████      | 400/1000 [02:10<03:15,  3.1it/s, lr: 4.0e-04 loss: 3.2e-01]\n"
)


def test_progress_comes_from_the_training_bar() -> None:
    progress = parse_log_progress(LOGS)
    assert progress is not None
    assert (progress.step, progress.total) == (400, 1000)
    assert progress.loss == pytest.approx(0.32)
    assert parse_log_progress(LOGS, expected_total=1000) == progress
    assert parse_log_progress(LOGS, expected_total=500) is None
    assert parse_log_progress("Caching latents: 100%|██| 12/12 [00:01<00:00]", label="train") is None
    assert parse_log_progress("") is None
    assert parse_log_progress(None) is None
    assert parse_log_progress("copied 3/4 files") is None


def test_the_trainings_bar_is_chosen_by_its_total() -> None:
    bars = log_bars(LOGS + "Loading checkpoint shards:  67%|######6   | 2/3 [00:05<00:02]\n")
    assert [(b.step, b.total, b.train) for b in bars] == [
        (12, 12, False), (0, 1000, True), (400, 1000, True), (2, 3, False)]
    assert training_progress(bars, expected_total=1000) == ProgressBar(400, 1000, True)
    # Another total, but labelled as the training's: read as the poller reads it.
    assert training_progress(bars, expected_total=40) == ProgressBar(400, 1000, True)
    shards = log_bars("Loading checkpoint shards:  67%|######6   | 2/3 [00:05<00:02]")
    assert training_progress(shards, expected_total=40) is None


def test_a_long_run_of_spaces_in_the_logs_is_read_in_linear_time() -> None:
    """The bar's pattern let its label and the spaces before the percentage take the same
    spaces: a line of 30,000 spaces and no bar took tens of seconds to search (old code; 2 MiB, the
    webhook's cap, hours of a server thread). It is read at once, and bars still are."""
    padded = "training " + " " * 30_000 + "\n" + LOGS
    body = json.dumps({"id": "r8id", "status": "processing", "logs": padded}).encode()
    started = time.monotonic()
    parsed = parse_training_webhook(body)
    assert time.monotonic() - started < 1.0
    assert (parsed["step"], parsed["total"]) == (400, 1000)
    bar = log_bars("flux_train_replicate:  40%|####      | 400/1000 [02:10<03:15]")
    assert [(b.step, b.total, b.train) for b in bar] == [(400, 1000, True)]


def test_parse_training_webhook() -> None:
    body = json.dumps(
        {"id": "r8id", "status": "processing", "logs": LOGS, "output": None, "error": None}
    ).encode()
    parsed = parse_training_webhook(body)
    assert parsed["id"] == "r8id"
    assert parsed["status"] == "processing"
    assert (parsed["step"], parsed["total"]) == (400, 1000)
    assert parsed["output"] is None
    done = parse_training_webhook(
        json.dumps({"id": "r8id", "status": "succeeded", "output": {"weights": "u"}}).encode()
    )
    assert done["output"] == {"weights": "u"}
    assert done["step"] is None


def test_an_aborted_training_webhook_is_accepted() -> None:
    """Replicate's documented "aborted" (the run's deadline passed before it started) was
    answered 422, which Replicate retries for nothing: it is read like any other status (the
    worker's poll ends the training)."""
    parsed = parse_training_webhook(json.dumps({"id": "r8id", "status": "aborted"}).encode())
    assert (parsed["id"], parsed["status"]) == ("r8id", "aborted")


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b"{}", b'{"id": "x"}', b'{"id": "x", "status": "exploded"}', b"\xff",
     b"[" * 100_000, b'{"a": ' * 50_000],  # nested past the recursion limit: RecursionError
)
def test_bad_webhook_bodies_are_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInputError):
        parse_training_webhook(body)


def test_a_webhook_secret_without_a_public_url_is_said_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: the secret without the URL (no training is sent a webhook, so it
    verifies nothing) said nothing, while the URL without the secret warned."""
    import threading

    from selfie_lora import wiring

    monkeypatch.setattr(wiring, "_unsigned_webhooks_said", threading.Event())
    caplog.set_level("WARNING", logger="selfie_lora.wiring")
    settings = Settings(home=tmp_path, trainer="replicate", replicate_owner="acme",
                        webhook_secret=SECRET, public_url=None)
    for _ in range(2):
        assert wiring.default_webhook_url(settings, replicate_trainer=True) is None
    said = [r.getMessage() for r in caplog.records if "SELFIE_LORA_PUBLIC_URL is not" in
            r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("SELFIE_LORA_WEBHOOK_SECRET is set but SELFIE_LORA_PUBLIC_URL is "
                              "not: trainings are created without a webhook")
    caplog.clear()
    local = Settings(home=tmp_path, trainer="local", webhook_secret=SECRET)
    monkeypatch.setattr(wiring, "_unsigned_webhooks_said", threading.Event())
    assert wiring.default_webhook_url(local, replicate_trainer=False) is None
    assert not caplog.records
