"""What an operator watches: /healthz (alive), /readyz (database, queue and storage answer),
/metrics (Prometheus text), the worker's own /metrics, and JSON log lines. Why a check failed is
told only to a caller sending the metrics token."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from selfie_lora import wiring
from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.api.server import uvicorn_options
from selfie_lora.errors import GenerationError
from selfie_lora.logs import NOISY_IMPORT_LOGGERS, setup_logging, training_context
from selfie_lora.services.common import utcnow
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services
from selfie_lora.worker import serve_operator_endpoints
from tests.conftest import auth, make_settings, serving, wait_terminal
from tests.integration.test_api import upload
from tests.support.backends import DATABASES, database_url, migrated_engine
from tests.support.clock import sqlite_server_clock
from tests.support.s3 import S3Server

TOKEN = "t" * 32


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text answer: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_happened(client: TestClient, services: Services,
                                     fake_trainer: FakeTrainer) -> None:
    h = auth(services, "ann")
    done = wait_terminal(client, h, upload(client, h)["training"]["id"])
    assert done["training"]["status"] == "succeeded"
    fake_trainer.outcomes.append("failed")
    failed = client.post("/api/training/start", headers=h, json={})
    assert failed.status_code == 202, failed.text
    assert wait_terminal(client, h, failed.json()["training"]["id"])["training"]["status"] == \
        "failed"
    version = done["model"]["active_version"]
    assert client.get(f"/api/model/versions/{version['id']}/weights", headers=h).status_code == 200
    assert client.get("/api/model/versions/nope/weights", headers=h).status_code == 404
    assert client.get("/no/such/path").status_code == 404

    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    found = samples(answer.text)
    # Gauges of the whole service, read at the scrape.
    assert value(found, "selfie_lora_trainings", status="succeeded") == 1
    assert value(found, "selfie_lora_trainings", status="failed") == 1
    assert value(found, "selfie_lora_trainings", status="queued") == 0
    assert value(found, "selfie_lora_queue_depth") == 0
    # Histograms and counters of this process.
    assert value(found, "selfie_lora_training_duration_seconds_count",
                 backend="local", status="succeeded") == 1
    assert value(found, "selfie_lora_training_failures_total", code="training_failed") == 1
    assert value(found, "selfie_lora_trainings_ended_total", backend="local",
                 status="succeeded") == 1
    assert value(found, "selfie_lora_trainings_ended_total", backend="local",
                 status="failed") == 1
    assert value(found, "selfie_lora_scoring_duration_seconds_count", status="scored") + \
        value(found, "selfie_lora_scoring_duration_seconds_count", status="failed") >= 1
    assert value(found, "selfie_lora_intake_duration_seconds_count", trainable="true") == 1
    assert value(found, "selfie_lora_intake_photos_total") == 4
    # Latency by route template, never by raw path (one series per route, whatever the ids).
    weights_route = "/api/model/versions/{version_id}/weights"
    assert value(found, "selfie_lora_http_request_duration_seconds_count",
                 method="GET", route=weights_route, status="200") == 1
    assert value(found, "selfie_lora_http_request_duration_seconds_count",
                 method="GET", route=weights_route, status="404") == 1
    assert value(found, "selfie_lora_http_request_duration_seconds_count",
                 method="GET", route="(unmatched)", status="404") == 1
    assert not any(version["id"] in dict(labels).get("route", "") for _n, labels in found)
    # The API's error answers by code (a page's error is a page, not an API answer).
    assert value(found, "selfie_lora_api_errors_total", code="not_found") == 1


def test_the_guard_s_own_refusals_are_counted_by_code_and_route(client: TestClient,
                                                                services: Services) -> None:
    """The guard answers before the app's handlers and before routing: its 401s, 403s and 413s
    were missing from the error counter and filed under route "(unmatched)"."""
    for guess in ("sl_guess1", "sl_guess2"):
        assert client.get("/api/model", headers={"Authorization": f"Bearer {guess}"}
                          ).status_code == 401
    assert client.get("/api/keys").status_code == 401  # no key at all
    h = auth(services, "ann")
    services.users.disable(name="ann")
    assert client.get("/api/model", headers=h).status_code == 403
    services.users.enable(name="ann")
    big = client.post("/api/keys", headers={**h, "Content-Type": "application/json"},
                      content=b"{" + b" " * (services.settings.max_json_bytes + 10) + b"}")
    assert big.status_code == 413
    # A page's refusal (the web upload without a session) is a page's: not an API error.
    assert client.post("/photos/upload").status_code == 401

    found = samples(client.get("/metrics").text)
    assert value(found, "selfie_lora_api_errors_total", code="unauthorized") == 3
    assert value(found, "selfie_lora_api_errors_total", code="forbidden") == 1
    assert value(found, "selfie_lora_api_errors_total", code="body_too_large") == 1
    histogram = "selfie_lora_http_request_duration_seconds_count"
    assert value(found, histogram, method="GET", route="/api/model", status="401") == 2
    assert value(found, histogram, method="GET", route="/api/model", status="403") == 1
    assert value(found, histogram, method="GET", route="/api/keys", status="401") == 1
    assert value(found, histogram, method="POST", route="/api/keys", status="413") == 1
    assert value(found, histogram, method="POST", route="/photos/upload", status="401") == 1
    assert value(found, histogram, method="GET", route="(unmatched)", status="401") == 0


def test_a_body_cut_off_mid_stream_is_counted_once_by_its_code(client: TestClient,
                                                                services: Services) -> None:
    """A chunked body (no Content-Length) over the limit is refused by the guard while it
    streams; the app's body reading then fails with an answer that is never sent, and was
    counted as an ``http_error`` besides the guard's ``body_too_large``."""
    h = auth(services, "ann")
    size = services.settings.max_json_bytes + 10

    def chunks() -> Iterator[bytes]:
        yield b"{"
        for _ in range(size // 1000 + 1):
            yield b" " * 1000
        yield b"}"

    big = client.post("/api/keys", headers={**h, "Content-Type": "application/json"},
                      content=chunks())
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "body_too_large"
    found = samples(client.get("/metrics").text)
    errors = {labels: count for (name, labels), count in found.items()
              if name == "selfie_lora_api_errors_total" and count}
    assert errors == {(("code", "body_too_large"),): 1}


def test_a_made_up_method_is_counted_as_other(client: TestClient) -> None:
    """The method is the client's to choose: each made-up one would be a new series for ever."""
    for i in range(20):
        client.request(f"X{i:03d}", "/healthz")
    client.request("PATCH", "/healthz")
    found = samples(client.get("/metrics").text)
    methods = {dict(labels)["method"] for name, labels in found
               if name == "selfie_lora_http_request_duration_seconds_count"}
    assert methods == {"PATCH", "other"}  # GET /metrics is counted once it has answered
    assert value(found, "selfie_lora_http_request_duration_seconds_count",
                 method="other", route="/healthz", status="405") == 20


def test_static_files_and_the_schema_are_counted_under_their_route(client: TestClient) -> None:
    """A static file's 200 and the OpenAPI schema's were filed under "(unmatched)" with the
    real 404s (only FastAPI's own routes were looked up): each now has its route template,
    one series for every static file; a miss, under /static or not, stays "(unmatched)"."""
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/static/no-such.css").status_code == 404
    assert client.get("/favicon.ico").status_code == 404
    found = samples(client.get("/metrics").text)
    histogram = "selfie_lora_http_request_duration_seconds_count"
    assert value(found, histogram, method="GET", route="/static/{path}", status="200") == 2
    assert value(found, histogram, method="GET", route="/openapi.json", status="200") == 1
    assert value(found, histogram, method="GET", route="/docs", status="200") == 1
    assert value(found, histogram, method="GET", route="(unmatched)", status="200") == 0
    assert value(found, histogram, method="GET", route="(unmatched)", status="404") == 2
    assert not any("style.css" in dict(labels).get("route", "") for _n, labels in found)


def test_a_training_canceled_while_queued_is_counted_by_its_outcome(tmp_path: Path) -> None:
    """A training canceled before it started moved no series: the duration histogram (from
    the start) had its only per-outcome count. Every ending is counted by outcome; the
    histogram still times only trainings that started."""
    with serving(make_settings(tmp_path)) as (client, svc):  # no worker: it stays queued
        h = auth(svc, "ann")
        training_id = upload(client, h)["training"]["id"]
        canceled = client.post("/api/training/cancel", headers=h,
                               json={"training_id": training_id})
        assert canceled.status_code == 200, canceled.text
        assert canceled.json()["training"]["status"] == "canceled"
        found = samples(client.get("/metrics").text)
    assert value(found, "selfie_lora_trainings_ended_total",
                 backend="local", status="canceled") == 1
    assert value(found, "selfie_lora_training_duration_seconds_count",
                 backend="local", status="canceled") == 0


def test_generations_are_counted_and_timed_by_outcome(client: TestClient, services: Services,
                                                     fake_generator: FakeGenerator) -> None:
    """A generation moved only the HTTP histogram (whose buckets stopped at 30 s, below a
    FLUX.1 batch): now each is counted by backend and outcome, and timed unless refused.
    The likeness gate's probe pictures are not users' generations."""
    h = auth(services, "ann")
    assert client.post("/api/generate", headers=h, json={"prompt": "x"}).status_code == 404
    wait_terminal(client, h, upload(client, h)["training"]["id"])
    assert client.post("/api/generate", headers=h, json={"prompt": "on a beach"}
                       ).status_code == 200
    assert client.post("/api/generate", headers=h, json={"prompt": " "}).status_code == 422
    fake_generator.withhold = frozenset({1})
    assert client.post("/api/generate", headers=h,
                       json={"prompt": "on a beach", "num_outputs": 2}).status_code == 200
    fake_generator.withhold = frozenset()
    fake_generator.fail_with = GenerationError("the generator broke")
    assert client.post("/api/generate", headers=h, json={"prompt": "on a beach"}
                       ).status_code >= 500

    found = samples(client.get("/metrics").text)
    counted = {tuple(dict(labels)[k] for k in ("backend", "status")): n
               for (name, labels), n in found.items() if name == "selfie_lora_generations_total"}
    assert counted == {("local", "made"): 1, ("local", "withheld"): 1, ("local", "failed"): 1,
                       ("none", "refused"): 2}
    timed = "selfie_lora_generation_duration_seconds_count"
    assert value(found, timed, backend="local", status="made") == 1
    assert value(found, timed, backend="local", status="withheld") == 1
    assert value(found, timed, backend="local", status="failed") == 1
    assert value(found, timed, backend="none", status="refused") == 0
    assert value(found, "selfie_lora_generation_duration_seconds_bucket", backend="local",
                 status="made", le="300.0") == 1
    # Slow answers (a batch of FLUX.1 pictures, a big upload) land in a bucket, not +Inf.
    assert value(found, "selfie_lora_http_request_duration_seconds_bucket", method="POST",
                 route="/api/generate", status="200", le="300.0") == 2


def test_trainer_restarts_are_exported(client: TestClient, services: Services) -> None:
    services.telemetry.trainer_restarted(backend="local")
    found = samples(client.get("/metrics").text)
    assert value(found, "selfie_lora_trainer_restarts_total", backend="local") == 1


def test_a_metrics_token_keeps_the_figures_private(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, metrics_token="t" * 32)
    with serving(settings) as (client, _svc):
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {'t' * 32}"})
        assert ok.status_code == 200
        assert "selfie_lora_trainings" in ok.text


def test_ready_when_every_dependency_answers(client: TestClient) -> None:
    answer = client.get("/readyz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ready", "checks": {"database": "ok", "queue": "ok",
                                                           "storage": "ok"}}


@pytest.mark.parametrize("down", ["storage", "queue"])
def test_a_dependency_that_does_not_answer_is_not_ready_but_alive(
        down: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if down == "storage":
        s3_server: S3Server = request.getfixturevalue("s3_server")
        overrides = s3_server.settings("s3://no-such-bucket-here/x")
        why = "object storage has no bucket 'no-such-bucket-here'"
    else:
        # A Redis URL where nothing listens (port 9, as the database's below): the scale
        # path's queue down, so a training started here could not be queued.
        overrides = {"queue_url": "redis://127.0.0.1:9/0"}
        why = "127.0.0.1:9"
    settings = make_settings(tmp_path, metrics_token=TOKEN, **overrides)
    with serving(settings) as (client, _svc):
        answer = client.get("/readyz")
        assert answer.status_code == 503
        checks = {"database": "ok", "queue": "ok", "storage": "ok"} | {down: "unavailable"}
        assert answer.json() == {"status": "not ready", "checks": checks}
        operator = client.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
        assert operator.status_code == 503
        assert why in operator.json()["checks"][down]
        assert client.get("/healthz").status_code == 200  # alive: no restart would help


class OutageQueue:
    """The queue as readiness reads it, its server away while ``down``."""

    down = True

    def pending(self) -> int:
        if self.down:
            raise ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
        return 0


def test_readyz_asks_the_queue_at_every_probe_so_it_is_ready_again_once_the_queue_is_back(
        client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = OutageQueue()
    monkeypatch.setattr(services.operations, "_queue", queue)
    down = client.get("/readyz")
    assert down.status_code == 503
    assert down.json()["checks"]["queue"] == "unavailable"
    queue.down = False
    assert client.get("/readyz").status_code == 200  # no restart, no remembered failure


class StandbyRepository(SqlRepository):
    """The database as a PostgreSQL hot standby answers: its reads go through, and it says
    ``transaction_read_only`` while ``standby``."""

    standby = True

    def takes_writes(self) -> bool:
        return not self.standby


def test_readyz_is_not_ready_on_a_database_that_takes_no_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Review (read-report8 RISK 5): its check was a read alone, which a fail-over's read-only
    # standby or a replica's URL answers: "ready", and a load balancer kept sending writes that
    # were all refused (500).
    settings = make_settings(tmp_path, metrics_token=TOKEN)
    with serving(settings) as (client, svc):
        assert SqlRepository(svc.engine).takes_writes()  # SQLite: said by its first write
        standby = StandbyRepository(svc.engine)
        monkeypatch.setattr(svc.operations, "_repo", standby)
        down = client.get("/readyz")
        assert down.status_code == 503  # old code: 200 ready
        assert down.json()["checks"]["database"] == "unavailable"
        operator = client.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
        assert "takes no writes (read-only" in operator.json()["checks"]["database"]
        standby.standby = False
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("kind", DATABASES)
def test_readyz_asks_the_database_on_one_connection(tmp_path: Path, kind: str) -> None:
    # Review (read-report10 RISK 2): the database check read a table, then asked whether the
    # database takes writes, in two sessions: on PostgreSQL two pool checkouts a probe, each with
    # its ping, and a second wait on a pool the first left full.
    url = database_url(kind, tmp_path)
    migrated_engine(kind, tmp_path).dispose()
    settings = make_settings(tmp_path, database_url=url, max_clock_skew_seconds=0)
    with serving(settings) as (client, svc):
        taken: list[object] = []
        event.listen(svc.engine, "checkout", lambda *_args: taken.append(1))
        assert client.get("/readyz").status_code == 200
        assert len(taken) == 1  # old code: 2 on PostgreSQL


@pytest.mark.parametrize("kind", DATABASES)
def test_readyz_reads_the_database_s_clock_on_its_one_connection(
        tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Review (task db): with the clock check on (PostgreSQL's default), the probe read the
    # server's clock on a connection of its own after the database check: two pool checkouts a
    # probe. SQLite stands in for PostgreSQL here with a clock read the same way.
    if kind == "sqlite":
        monkeypatch.setattr(wiring, "server_clock", sqlite_server_clock)
    url = database_url(kind, tmp_path)
    migrated_engine(kind, tmp_path).dispose()
    ahead = [timedelta(0)]  # this machine's clock against the real time
    settings = make_settings(tmp_path, database_url=url)
    with serving(settings, clock=lambda: utcnow() + ahead[0]) as (client, svc):
        assert svc.clock.enabled
        taken: list[object] = []
        event.listen(svc.engine, "checkout", lambda *_args: taken.append(1))
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["clock"] == "ok"
        assert len(taken) == 1  # old code: 2
        # The clock read with the database check is the one compared: 5 minutes off is seen.
        ahead[0] = timedelta(minutes=5)
        skewed = client.get("/readyz")
        assert skewed.status_code == 503
        assert skewed.json()["checks"] == {"database": "ok", "queue": "ok", "storage": "ok",
                                           "clock": "skewed"}
        assert len(taken) == 2
        ahead[0] = timedelta(0)
        assert client.get("/readyz").status_code == 200
        assert len(taken) == 3


def test_readyz_tells_why_a_check_failed_only_to_the_operator(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """/readyz needs no sign-in, and answered the error's own words: the blob folder's absolute
    path, a database's host (found in review). Anyone gets each check's name and "ok" or
    "unavailable"; why is logged, and told to a caller sending the metrics token."""
    settings = make_settings(tmp_path, metrics_token=TOKEN)
    with serving(settings) as (client, svc):
        shutil.rmtree(settings.blob_dir)  # e.g. a volume that is not mounted
        public = {"status": "not ready", "checks": {"database": "ok", "queue": "ok",
                                                     "storage": "unavailable"}}
        worker = serve_operator_endpoints(svc.operations, host="127.0.0.1", port=0)
        try:
            worker_url = f"http://127.0.0.1:{worker.server_address[1]}/readyz"
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                for answer in (client.get("/readyz", headers=headers),
                               httpx.get(worker_url, headers=headers, timeout=10)):
                    assert answer.status_code == 503
                    assert answer.json() == public
                    assert str(tmp_path) not in answer.text
            for answer in (client.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"}),
                           httpx.get(worker_url, headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=10)):
                assert answer.status_code == 503
                storage = answer.json()["checks"]["storage"]
                assert str(settings.blob_dir.resolve()) in storage
                assert "not writable" in storage
        finally:
            worker.shutdown()
            worker.server_close()
    assert str(settings.blob_dir.resolve()) in caplog.text  # the log has it


def test_without_a_metrics_token_nobody_is_told_why(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with serving(settings) as (client, _svc):
        shutil.rmtree(settings.blob_dir)
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
            answer = client.get("/readyz", headers=headers)
            assert answer.status_code == 503
            assert answer.json()["checks"]["storage"] == "unavailable"


def test_a_worker_s_metrics_need_the_token_as_the_api_s_do(tmp_path: Path) -> None:
    # A worker's /metrics answered its figures to anyone, SELFIE_LORA_METRICS_TOKEN
    # notwithstanding, while the API servers' answered 401 without it.
    settings = make_settings(tmp_path, metrics_token=TOKEN)
    with serving(settings) as (client, svc):
        worker = serve_operator_endpoints(svc.operations, host="127.0.0.1", port=0)
        try:
            url = f"http://127.0.0.1:{worker.server_address[1]}/metrics"
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                api = client.get("/metrics", headers=headers)
                answer = httpx.get(url, headers=headers, timeout=10)
                assert answer.status_code == api.status_code == 401
                assert answer.json() == api.json()
                assert answer.headers["WWW-Authenticate"] == "Bearer"
                assert "selfie_lora_" not in answer.text
            ok = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            assert ok.status_code == 200
            assert "selfie_lora_queue_depth" in ok.text
            # /healthz and /readyz are as they were: no token needed.
            assert httpx.get(url.replace("/metrics", "/healthz"), timeout=10).status_code == 200
            assert httpx.get(url.replace("/metrics", "/readyz"), timeout=10).status_code == 200
        finally:
            worker.shutdown()
            worker.server_close()


def test_a_worker_s_probes_answer_head_as_get_without_a_body(tmp_path: Path) -> None:
    """Load balancers probe with HEAD: the worker's /healthz and /readyz answered 501 (the API
    servers' 405, test_api.py)."""
    with serving(make_settings(tmp_path)) as (_client, svc):
        worker = serve_operator_endpoints(svc.operations, host="127.0.0.1", port=0)
        try:
            base = f"http://127.0.0.1:{worker.server_address[1]}"
            for path in ("/healthz", "/readyz"):
                got = httpx.get(base + path, timeout=10)
                head = httpx.head(base + path, timeout=10)
                assert head.status_code == got.status_code == 200, path
                assert head.content == b""
                assert head.headers["content-length"] == got.headers["content-length"]
        finally:
            worker.shutdown()
            worker.server_close()


def test_a_worker_s_port_answers_other_methods_405_as_the_api_s_do(tmp_path: Path) -> None:
    """POST (and PUT, DELETE, any method but GET and HEAD) to a worker's /metrics, /healthz or
    /readyz answered http.server's 501 "Unsupported method" HTML, where the API servers answer
    405 with Allow (found in review). Now the API's 405, JSON and Allow: GET, HEAD; a path the
    port does not serve stays 404."""
    with serving(make_settings(tmp_path)) as (client, svc):
        worker = serve_operator_endpoints(svc.operations, host="127.0.0.1", port=0)
        try:
            base = f"http://127.0.0.1:{worker.server_address[1]}"
            for path in ("/metrics", "/healthz", "/readyz?x=1"):
                for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"):
                    api = client.request(method, path)
                    answer = httpx.request(method, base + path, content=b"{}", timeout=10)
                    assert answer.status_code == api.status_code == 405, (method, path)
                    assert answer.headers["allow"] == api.headers["allow"] == "GET, HEAD"
                    assert answer.json() == api.json()  # old code: 501, an HTML page
            assert httpx.post(base + "/other", timeout=10).status_code == 404
            assert httpx.get(base + "/healthz", timeout=10).status_code == 200
        finally:
            worker.shutdown()
            worker.server_close()


def test_a_worker_s_metrics_answer_head_as_the_api_s_do(tmp_path: Path) -> None:
    """HEAD /metrics on a worker's operator port answered 501, while the API servers answer it
    as GET (api.head.HeadAsGet; found in review). Now the same: the token guards it, GET's
    status and headers, no body; a path the port does not serve is 404, as its GET."""
    settings = make_settings(tmp_path, metrics_token=TOKEN)
    with serving(settings) as (client, svc):
        worker = serve_operator_endpoints(svc.operations, host="127.0.0.1", port=0)
        try:
            base = f"http://127.0.0.1:{worker.server_address[1]}"
            good = {"Authorization": f"Bearer {TOKEN}"}
            for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                    (good, 200)):
                api = client.head("/metrics", headers=headers)
                head = httpx.head(base + "/metrics", headers=headers, timeout=10)
                assert head.status_code == api.status_code == status, headers
                assert head.content == b""
                assert head.headers["content-type"] == api.headers["content-type"]
                if status == 401:
                    assert head.headers["www-authenticate"] == "Bearer"
                    got = httpx.get(base + "/metrics", headers=headers, timeout=10)
                    assert head.headers["content-length"] == got.headers["content-length"]
                else:
                    assert int(head.headers["content-length"]) > 0
            assert httpx.head(base + "/other", timeout=10).status_code == 404
        finally:
            worker.shutdown()
            worker.server_close()


def test_a_database_that_does_not_answer_is_not_ready(tmp_path: Path) -> None:
    # A PostgreSQL URL where nothing listens (port 9 is "discard"; nothing runs there).
    settings = make_settings(
        tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=2")
    with serving(settings, migrate=False) as (client, _svc):
        answer = client.get("/readyz")
        assert answer.status_code == 503
        checks = answer.json()["checks"]
        assert checks["database"] != "ok"
        assert checks["storage"] == "ok"
        assert client.get("/healthz").status_code == 200


def test_a_worker_serves_its_own_figures(services: Services) -> None:
    server = serve_operator_endpoints(services.operations, host="127.0.0.1", port=0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        metrics = httpx.get(f"{base}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert "selfie_lora_queue_depth" in metrics.text
        assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        assert httpx.get(f"{base}/other", timeout=10).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_a_worker_s_port_answers_an_unknown_path_as_the_api_does(tmp_path: Path) -> None:
    """A path the worker's port does not serve was answered {"error": "not found"}, a shape
    of its own beside the contract's {"error": {"code", "message", "details"}} that the
    API's 404 (and this port's own 401 and 405) carry. Now the API's JSON 404, to any method."""
    with serving(make_settings(tmp_path)) as (client, svc):
        server = serve_operator_endpoints(svc.operations, host="127.0.0.1", port=0)
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}"
            api = client.get("/api/other", headers=auth(svc, "ann"))
            assert api.status_code == 404
            for method in ("GET", "POST", "DELETE"):
                answer = httpx.request(method, f"{base}/other", timeout=10)
                assert answer.status_code == 404, method
                assert answer.headers["content-type"] == "application/json"
                assert answer.json() == api.json(), method  # old code: {"error": "not found"}
        finally:
            server.shutdown()
            server.server_close()
        server.server_close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_logs_carry_the_training_id_on_every_line_about_it(
        restore_logging: None, capsys: pytest.CaptureFixture[str], services: Services) -> None:
    del restore_logging
    setup_logging(log_format="json")
    log = logging.getLogger("selfie_lora.somewhere")
    log.info("outside any training")
    with training_context("t-123"):
        log.warning("inside: %s", "a detail")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("it failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line["message"] for line in lines] == ["outside any training", "inside: a detail",
                                                   "it failed"]
    assert [line["training_id"] for line in lines] == [None, "t-123", "t-123"]
    assert lines[1]["level"] == "WARNING"
    assert lines[1]["logger"] == "selfie_lora.somewhere"
    assert "RuntimeError: boom" in lines[2]["exc_info"]
    assert {"time", "process", "thread"} <= set(lines[0])
    del services


def test_json_log_times_have_milliseconds_and_uvicorn_s_colour_template_is_dropped(
        restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    del restore_logging
    setup_logging(log_format="json")
    # As uvicorn logs its start line: the coloured template as an extra.
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]", 42,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"})
    [line] = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line["message"] == "Started server process [42]"
    assert "color_message" not in line
    # ISO 8601 with milliseconds and the offset: 2026-12-06T04:11:29.123+00:00
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", line["time"]), \
        line["time"]


def test_text_logs_stay_text(restore_logging: None) -> None:
    del restore_logging
    setup_logging(log_format="text")
    stream = io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    logging.getLogger("selfie_lora.x").info("plain")
    assert stream.getvalue().rstrip().endswith("INFO selfie_lora.x: plain")


def test_text_logs_name_the_training_a_line_was_logged_in(restore_logging: None) -> None:
    del restore_logging
    setup_logging(log_format="text")
    stream = io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    log = logging.getLogger("selfie_lora.x")
    training_id = "c4002ea1-0000-4000-8000-000000000000"
    log.info("outside any training")
    with training_context(training_id):
        log.info("trained a LoRA on %d photos", 3)
        log.warning("training %s failed: %s", training_id, "why")  # names it already
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "outside any training",
        "[training c4002ea1] trained a LoRA on 3 photos",
        f"training {training_id} failed: why"]
    assert all("c4002ea1" in line for line in lines[1:])


def test_uvicorn_s_lines_have_the_text_format_too(restore_logging: None, tmp_path: Path) -> None:
    del restore_logging
    uvicorn_loggers = [logging.getLogger(name)
                       for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(lg, list(lg.handlers), lg.propagate, lg.level) for lg in uvicorn_loggers]
    try:
        setup_logging(log_format="text")
        stream = io.StringIO()
        logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
        # As a serving process does: its logging set up, then uvicorn's config made.
        uvicorn.Config(lambda *_: None, **uvicorn_options(make_settings(tmp_path)))
        logging.getLogger("uvicorn.error").info("Application startup complete.")
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1",
                                                 "GET", "/metrics", "1.1", 401)
        lines = [line for line in stream.getvalue().splitlines() if " uvicorn" in line]
        assert len(lines) == 2, stream.getvalue()
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
        assert re.fullmatch(stamp + r" INFO uvicorn\.error: Application startup complete\.",
                            lines[0]), lines
        assert re.fullmatch(stamp + r' INFO uvicorn\.access: 127\.0\.0\.1:1 - "GET /metrics '
                            r'HTTP/1\.1" 401', lines[1]), lines
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)


def test_the_ml_libraries_import_warnings_show_only_with_verbose(restore_logging: None) -> None:
    # torchao warned of CUDA kernels and triton it could not load on a CPU machine, transformers
    # of torchvision, torch of an enum registration: eight lines atop every local training.
    del restore_logging
    try:
        setup_logging(log_format="text")
        stream = io.StringIO()
        logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
        logging.getLogger("torchao.kernel.intmm").warning("Detected no triton")
        logging.getLogger("torchao").error("a real failure")
        assert "Failed to load" not in stream.getvalue()
        assert "no triton" not in stream.getvalue()
        assert "a real failure" in stream.getvalue()
        setup_logging(log_format="text", verbose=True)
        stream = io.StringIO()
        logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("transformers.utils.import_utils").warning("requires torchvision")
        assert "requires torchvision" in stream.getvalue()
    finally:
        for name in NOISY_IMPORT_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_a_prompt_cut_to_the_text_encoders_window_is_logged_without_its_text(
        restore_logging: None) -> None:
    # A prompt past CLIP's 77 tokens (or T5's max_sequence_length) made diffusers log the part
    # it cut off at WARNING: the user's prompt text ("... my diagnosis is LEAKPLANT") in the
    # server's log, -v or not. Now a line says the cut and its size, never the text.
    del restore_logging
    cuts = [
        ("diffusers.pipelines.flux.pipeline_flux",
         "The following part of your input was truncated because CLIP can only handle "
         "sequences up to 77 tokens: ['coat , smiling widely , my diagnosis is leakplant']",
         "a prompt was cut to 77 tokens (CLIP): 49 character(s) dropped; its text is not "
         "logged"),
        ("diffusers.pipelines.flux.pipeline_flux",
         "The following part of your input was truncated because `max_sequence_length` is set "
         "to  32 tokens: ['aring a blue coat, my diagnosis is LEAKPLANT']",
         "a prompt was cut to 32 tokens (max_sequence_length, T5's on FLUX.1): 44 "
         "character(s) dropped; its text is not logged"),
        ("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
         "The following part of your input was truncated because CLIP can only handle "
         "sequences up to 77 tokens: ['LEAKPLANT', 'and another LEAKPLANT']",
         "a prompt was cut to 77 tokens (CLIP): 30 character(s) dropped"),
    ]
    for verbose in (False, True):
        setup_logging(log_format="text", verbose=verbose)
        stream = io.StringIO()
        logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
        for name, message, _said in cuts:
            logging.getLogger(name).warning(message)
        shown = stream.getvalue()
        assert "LEAKPLANT" not in shown.upper(), (verbose, shown)
        assert "diagnosis" not in shown, (verbose, shown)
        for _name, _message, said in cuts:
            assert said in shown, (verbose, shown)


def test_library_lines_that_read_as_failures_show_only_with_verbose(
        restore_logging: None) -> None:
    # 'selfie-lora train' printed, while a version was scored, that a prompt "will result in
    # indexing errors" and four cuts of nothing (['']); the demo's first run a font cache line
    # between its tables. Nothing had failed.
    del restore_logging
    misleading = [
        ("transformers.tokenization_utils_base", logging.WARNING,
         "Token indices sequence length is longer than the specified maximum sequence length "
         "for this model (54 > 32). Running this sequence through the model will result in "
         "indexing errors"),
        ("diffusers.pipelines.flux.pipeline_flux", logging.WARNING,
         "The following part of your input was truncated because `max_sequence_length` is set "
         "to  32 tokens: ['']"),
        ("matplotlib.font_manager", logging.INFO, "generated new fontManager"),
    ]
    # As -v shows them: a prompt's cut in words of its own, without the text (the next test).
    as_shown = {misleading[1][2]: "a prompt was cut to 32 tokens (max_sequence_length, T5's "
                                  "on FLUX.1): 0 character(s) dropped"}
    kept = [  # the same loggers' other lines (a real cut: see the test below)
        ("diffusers.pipelines.flux.pipeline_flux", logging.WARNING, "another diffusers line"),
        ("transformers.tokenization_utils_base", logging.WARNING, "another warning"),
        ("matplotlib.font_manager", logging.WARNING, "findfont: Font family not found"),
    ]
    for verbose in (False, True):
        setup_logging(log_format="text", verbose=verbose)
        stream = io.StringIO()
        logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
        for name, level, message in misleading + kept:
            logging.getLogger(name).log(level, message)
        shown = stream.getvalue()
        for _name, _level, message in kept:
            assert message in shown
        for _name, _level, message in misleading:
            assert (as_shown.get(message, message) in shown) is verbose, (verbose, message)



def test_a_failed_training_is_logged_once_at_warning(
        client: TestClient, services: Services, fake_trainer: FakeTrainer,
        caplog: pytest.LogCaptureFixture) -> None:
    h = auth(services, "ann")
    fake_trainer.outcomes.append("failed")
    with caplog.at_level(logging.INFO, logger="selfie_lora"):
        training_id = upload(client, h)["training"]["id"]
        assert wait_terminal(client, h, training_id)["training"]["status"] == "failed"

        def failed_lines() -> list[logging.LogRecord]:
            return [r for r in caplog.records
                    if r.getMessage().startswith(f"training {training_id} failed")]

        # The worker logs after the failure is stored, which the client may see first.
        deadline = time.monotonic() + 10
        while not failed_lines() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # and any second line
    failed = failed_lines()
    assert [r.levelname for r in failed] == ["WARNING"], [r.getMessage() for r in failed]


def test_readyz_says_each_check_s_outage_once_and_its_end_once(
        client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Every failed probe logged a WARNING: a load balancer probing every few seconds made each
    outage a stream of them per process (found in review: 21 lines in a 45 s PostgreSQL outage
    at a 2 s probe). Now one WARNING per check when it fails, one INFO when it is ok again."""
    queue = OutageQueue()
    monkeypatch.setattr(services.operations, "_queue", queue)
    with caplog.at_level(logging.DEBUG, logger="selfie_lora.services.operations"):
        for _probe in range(3):
            assert client.get("/readyz").status_code == 503
        queue.down = False
        for _probe in range(2):
            assert client.get("/readyz").status_code == 200
        queue.down = True  # another outage: said again
        assert client.get("/readyz").status_code == 503
    lines = [(r.levelno, r.getMessage()) for r in caplog.records
             if r.name == "selfie_lora.services.operations" and r.levelno >= logging.INFO]
    assert [(level, text.split(" (")[0]) for level, text in lines] == [
        (logging.WARNING, "not ready: queue: ConnectionError: Error 111 connecting to "
                          "redis:6379. Connection refused."),
        (logging.INFO, "ready again: queue ok"),
        (logging.WARNING, "not ready: queue: ConnectionError: Error 111 connecting to "
                          "redis:6379. Connection refused."),
    ]
