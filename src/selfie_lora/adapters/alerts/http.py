"""The ``Alerter`` port over HTTP: the alert is POSTed as JSON to ``SELFIE_LORA_ALERT_URL``
(a chat webhook relay, an incident tool, a script of the operator's)."""

from __future__ import annotations

import logging
from typing import Any

import httpx

logger = logging.getLogger(__name__)


class HttpAlerter:
    def __init__(self, url: str, *, timeout: float = 5.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url
        self._timeout = timeout
        self._transport = transport

    def send(self, alert: dict[str, Any]) -> None:
        """POST ``alert`` as JSON. Raises ``httpx.HTTPError`` on a network error, a timeout or a
        non-2xx answer; the caller records the failure and carries on."""
        with httpx.Client(timeout=self._timeout, transport=self._transport) as client:
            headers = {"user-agent": "selfie-lora-alerts/1"}
            if alert.get("alert_id"):
                # Delivery is at least once: a receiver can drop a repeat by this key.
                headers["idempotency-key"] = str(alert["alert_id"])
            response = client.post(self.url, json=alert, headers=headers)
            response.raise_for_status()
        logger.info("likeness alert for version %s delivered to %s", alert.get("version_id"),
                    self.url)
