"""The ``Alerter`` port over HTTP: the alert is POSTed as JSON to ``SELFIE_LORA_ALERT_URL``
(a chat webhook relay, an incident tool, a script of the operator's)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

logger = logging.getLogger(__name__)


class HttpAlerter:
    def __init__(self, url: str, *, timeout: float = 5.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url
        self._timeout = timeout
        self._transport = transport

    def send(self, alert: dict[str, Any]) -> None:
        """POST ``alert`` as JSON, all of it (connecting, sending, the answer) within ``timeout``
        seconds. Raises ``httpx.HTTPError`` on a network error, a timeout or a non-2xx answer;
        the caller records the failure and carries on."""
        # httpx's timeouts are per phase: a receiver that trickles a byte now and then keeps a
        # read alive forever, and the send past the alert's claim (domain.alerts). httpx has no
        # overall timeout; its async client is cancelled cleanly at any await, so the POST runs
        # under asyncio's. Senders are worker threads, with no event loop of their own running.
        try:
            asyncio.run(self._post(alert))
        except TimeoutError as exc:
            raise httpx.TimeoutException(
                f"the alert to {self.url} took more than {self._timeout} s") from exc
        logger.info("likeness alert for version %s delivered to %s", alert.get("version_id"),
                    self.url)

    async def _post(self, alert: dict[str, Any]) -> None:
        async with asyncio.timeout(self._timeout):
            async with httpx.AsyncClient(timeout=self._timeout,
                                         transport=self._transport) as client:
                headers = {"user-agent": "selfie-lora-alerts/1"}
                if alert.get("alert_id"):
                    # Delivery is at least once: a receiver can drop a repeat by this key.
                    headers["idempotency-key"] = str(alert["alert_id"])
                response = await client.post(self.url, json=alert, headers=headers)
                response.raise_for_status()
