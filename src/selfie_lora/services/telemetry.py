"""Telemetry that records nothing: the default of the services (tests, one-off commands)."""

from __future__ import annotations


class NullTelemetry:
    def training_ended(self, *, backend: str, status: str, seconds: float | None,
                       error_code: str | None = None) -> None:
        pass

    def scoring_done(self, *, seconds: float, status: str) -> None:
        pass

    def lease_recovered(self, *, phase: str) -> None:
        pass

    def generation_ended(self, *, backend: str, status: str, seconds: float | None) -> None:
        pass

    def trainer_restarted(self, *, backend: str) -> None:
        pass

    def intake_done(self, *, seconds: float, photos: int, trainable: bool) -> None:
        pass

    def http_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        pass

    def api_error(self, *, code: str) -> None:
        pass

    def set_service_gauges(self, *, trainings: dict[str, int], queue_depth: int,
                           waiting: dict[str, int], workers: dict[str, int]) -> None:
        pass

    def exposition(self) -> tuple[bytes, str]:
        return b"", "text/plain; version=0.0.4; charset=utf-8"
