"""Telemetry adapters (Prometheus)."""
