"""``Telemetry`` in the Prometheus text format, with prometheus-client.

Each instance has a registry of its own (several apps in one test process must not clash). The
histogram buckets are chosen for what they measure: HTTP answers in milliseconds to minutes (a
generation of several FLUX.1 pictures, a 200 MB upload), intakes in seconds, generations from a
second (the tiny model) to minutes, trainings from seconds (the tiny model) to hours (FLUX.1 on
a GPU).
"""

from __future__ import annotations

import os
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.domain.lease import OUTAGE_WAITS, WORKER_STATES

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0)
GENERATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
INTAKE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TRAINING_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
SCORING_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class PrometheusTelemetry:
    def __init__(self) -> None:
        # Several API processes on one port (serve --processes N): each writes its figures to
        # PROMETHEUS_MULTIPROC_DIR, and every scrape, whichever process answers it, reads all.
        self._multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.registry = CollectorRegistry()
        r = self.registry
        self._lock = threading.Lock()
        # Read from the database at each scrape: the newest value is the right one.
        self._trainings = Gauge("selfie_lora_trainings", "Trainings by status (whole service).",
                                ["status"], registry=r, multiprocess_mode="mostrecent")
        self._waiting = Gauge(
            "selfie_lora_trainings_waiting",
            "Unfinished trainings waiting out an outage, by reason (whole service).",
            ["reason"], registry=r, multiprocess_mode="mostrecent")
        self._workers = Gauge(
            "selfie_lora_workers",
            "Workers consuming the queue, by state: live (renewing their row) or stale (it "
            "expired: died without stopping) (whole service).",
            ["state"], registry=r, multiprocess_mode="mostrecent")
        self._queue_depth = Gauge("selfie_lora_queue_depth",
                                  "Messages waiting in the work queue (whole service).",
                                  registry=r, multiprocess_mode="mostrecent")
        self._training_seconds = Histogram(
            "selfie_lora_training_duration_seconds",
            "From a training's start to its end, by backend and outcome (this process).",
            ["backend", "status"], buckets=TRAINING_BUCKETS, registry=r)
        # Every ending, started or not: the histogram above times only trainings that started,
        # so a training canceled (or failed) while queued was in no per-outcome series.
        self._trainings_ended = Counter(
            "selfie_lora_trainings_ended",
            "Trainings that ended, by backend and outcome, whether they started or not "
            "(this process).", ["backend", "status"], registry=r)
        self._training_failures = Counter(
            "selfie_lora_training_failures", "Trainings that failed, by error code.",
            ["code"], registry=r)
        self._scoring_seconds = Histogram(
            "selfie_lora_scoring_duration_seconds", "Scoring a version's likeness, by outcome.",
            ["status"], buckets=SCORING_BUCKETS, registry=r)
        self._generations = Counter(
            "selfie_lora_generations", "Users' generations that ended, by backend and outcome.",
            ["backend", "status"], registry=r)
        self._generation_seconds = Histogram(
            "selfie_lora_generation_duration_seconds",
            "From a generation's start to its end, refusals left out, by backend and outcome.",
            ["backend", "status"], buckets=GENERATION_BUCKETS, registry=r)
        self._trainer_restarts = Counter(
            "selfie_lora_trainer_restarts",
            "Training processes started again after they died, by backend.",
            ["backend"], registry=r)
        self._recoveries = Counter(
            "selfie_lora_lease_recoveries", "Trainings taken over after their worker stopped.",
            ["phase"], registry=r)
        self._intake_seconds = Histogram(
            "selfie_lora_intake_duration_seconds", "Checking and preparing an upload's photos.",
            ["trainable"], buckets=INTAKE_BUCKETS, registry=r)
        self._intake_photos = Counter("selfie_lora_intake_photos", "Photos checked.",
                                      registry=r)
        self._http_seconds = Histogram(
            "selfie_lora_http_request_duration_seconds", "HTTP answers by route.",
            ["method", "route", "status"], buckets=HTTP_BUCKETS, registry=r)
        self._api_errors = Counter("selfie_lora_api_errors", "Error answers by error code.",
                                   ["code"], registry=r)
        # Every status from the start, so a dashboard sees zeros rather than missing series.
        for status in TrainingStatus:
            self._trainings.labels(status=str(status)).set(0)
        for reason in OUTAGE_WAITS:
            self._waiting.labels(reason=reason).set(0)
        for state in WORKER_STATES:
            self._workers.labels(state=state).set(0)

    def training_ended(self, *, backend: str, status: str, seconds: float | None,
                       error_code: str | None = None) -> None:
        self._trainings_ended.labels(backend=backend, status=status).inc()
        if seconds is not None:
            self._training_seconds.labels(backend=backend, status=status).observe(seconds)
        if error_code is not None:
            self._training_failures.labels(code=error_code).inc()

    def scoring_done(self, *, seconds: float, status: str) -> None:
        self._scoring_seconds.labels(status=status).observe(seconds)

    def generation_ended(self, *, backend: str, status: str, seconds: float | None) -> None:
        self._generations.labels(backend=backend, status=status).inc()
        if seconds is not None:
            self._generation_seconds.labels(backend=backend, status=status).observe(seconds)

    def trainer_restarted(self, *, backend: str) -> None:
        self._trainer_restarts.labels(backend=backend).inc()

    def lease_recovered(self, *, phase: str) -> None:
        self._recoveries.labels(phase=phase).inc()

    def intake_done(self, *, seconds: float, photos: int, trainable: bool) -> None:
        self._intake_seconds.labels(trainable=str(trainable).lower()).observe(seconds)
        self._intake_photos.inc(photos)

    def http_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        self._http_seconds.labels(method=method, route=route, status=str(status)).observe(seconds)

    def api_error(self, *, code: str) -> None:
        self._api_errors.labels(code=code).inc()

    def set_service_gauges(self, *, trainings: dict[str, int], queue_depth: int,
                           waiting: dict[str, int], workers: dict[str, int]) -> None:
        with self._lock:  # two scrapes at once must not interleave their statuses
            for status in TrainingStatus:
                self._trainings.labels(status=str(status)).set(trainings.get(str(status), 0))
            for reason in OUTAGE_WAITS:
                self._waiting.labels(reason=reason).set(waiting.get(reason, 0))
            for state in WORKER_STATES:
                self._workers.labels(state=state).set(workers.get(state, 0))
            self._queue_depth.set(queue_depth)

    def exposition(self) -> tuple[bytes, str]:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        every_process = CollectorRegistry()
        MultiProcessCollector(every_process, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(every_process), CONTENT_TYPE_LATEST
