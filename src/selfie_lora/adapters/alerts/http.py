"""The ``Alerter`` port over HTTP: the alert is POSTed as JSON to ``SELFIE_LORA_ALERT_URL``
(a chat webhook relay, an incident tool, a script of the operator's).

The URL is a secret: a Slack or Discord hook's path is its credential. It is only ever POSTed
to; what this adapter says about the endpoint (its logs, its errors, which the service stores on
the version and serves to its owner) names the host at most. httpx's own errors quote the whole
URL, so none of them leaves here.

With a signing secret (``SELFIE_LORA_ALERT_SECRET``) each POST is signed as Standard Webhooks
sign theirs: ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers, which a
receiver checks with the same secret (``standardwebhooks.Webhook(secret).verify(body,
headers)``) to tell a real alert from a forged one, and by whose id it drops a repeat."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from selfie_lora.adapters.tls import tls_context
from selfie_lora.domain.webhook_secrets import ALERT_SECRET_SOURCE, webhook_secret_problem
from selfie_lora.errors import AlertDeliveryError, ConfigError

logger = logging.getLogger(__name__)


class HttpAlerter:
    """``secret``: a Standard Webhooks signing secret (``whsec_...``, checked by the settings),
    or None to send unsigned, as a Slack or Discord hook takes them."""

    def __init__(self, url: str, *, timeout: float = 5.0, secret: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._url = url
        self._host = _host_of(url)
        self._timeout = timeout
        self._transport = transport
        # Checked here too, for a library user who builds this without the settings.
        problem = (webhook_secret_problem(secret, source=ALERT_SECRET_SOURCE)
                   if secret is not None else None)
        if problem is not None:
            raise ConfigError(f"SELFIE_LORA_ALERT_SECRET {problem}")
        # Only the key is kept (the package's object holds the decoded bytes): nothing here
        # says the secret, as nothing says the URL.
        self._signer = Webhook(secret) if secret is not None else None

    def send(self, alert: dict[str, Any]) -> None:
        """POST ``alert`` as JSON, all of it (connecting, sending, the answer) within ``timeout``
        seconds. Raises ``AlertDeliveryError`` on a network error, a timeout or a non-2xx answer
        (its message: the kind of failure, the host, the HTTP status); the caller records the
        failure and carries on."""
        # httpx's timeouts are per phase: a receiver that trickles a byte now and then keeps a
        # read alive forever, and the send past the alert's claim (domain.alerts). httpx has no
        # overall timeout; its async client is cancelled cleanly at any await, so the POST runs
        # under asyncio's, on a loop of its own (see ``_run``).
        # ``from None``: the httpx error, chained, would carry the URL into any traceback logged.
        try:
            self._run(alert)
        except TimeoutError:
            raise AlertDeliveryError(
                f"the alert to {self._host} took more than {self._timeout} s") from None
        except httpx.HTTPStatusError as exc:
            raise AlertDeliveryError(
                f"{self._host} answered the alert with HTTP {exc.response.status_code}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise AlertDeliveryError(
                f"the alert could not be sent to {self._host} ({type(exc).__name__})") from None
        logger.info("likeness alert for version %s delivered to %s", alert.get("version_id"),
                    self._host)

    def _run(self, alert: dict[str, Any]) -> None:
        """``_post`` to its end on a new event loop, whatever the calling thread runs."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            _run_on_own_loop(self._post(alert))  # a worker thread: no loop runs in it
            return
        # A loop runs in this thread (a reconcile called from async code, as a server's start
        # was): ``asyncio.run`` would raise there without sending, and the attempt would be
        # spent. The POST gets a thread of its own; the caller expects to block until it ends,
        # which ``timeout`` bounds.
        failure: list[BaseException] = []

        def post() -> None:
            try:
                _run_on_own_loop(self._post(alert))
            except BaseException as exc:  # re-raised in the caller's thread, as asyncio.run's
                failure.append(exc)

        thread = threading.Thread(target=post, name="alert-send", daemon=True)
        thread.start()
        thread.join()
        if failure:
            raise failure[0]

    async def _post(self, alert: dict[str, Any]) -> None:
        async with asyncio.timeout(self._timeout):
            async with httpx.AsyncClient(timeout=self._timeout, verify=tls_context(),
                                         transport=self._transport) as client:
                headers = {"user-agent": "selfie-lora-alerts/1"}
                if alert.get("alert_id"):
                    # Delivery is at least once: a receiver can drop a repeat by this key.
                    headers["idempotency-key"] = str(alert["alert_id"])
                # Built first, so that what is signed is the body as httpx encodes and sends it.
                request = client.build_request("POST", self._url, json=alert, headers=headers)
                if self._signer is not None:
                    request.headers.update(_signed(self._signer, webhook_id(alert),
                                                   datetime.now(UTC), request.content))
                response = await client.send(request)
                response.raise_for_status()


def _signed(signer: Webhook, msg_id: str, at: datetime, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt to send ``body``, signed ``at`` (the time of
    this attempt, not the alert's: a receiver refuses a timestamp more than 5 minutes off)."""
    # Signed as text, as the Replicate webhooks are: standardwebhooks 1.0 (which pyproject
    # allows) formats ``data`` into an f-string, so bytes were signed as the text "b'{...}'", a
    # signature no receiver matches. httpx's JSON body is UTF-8, so the text encodes back to
    # the very bytes sent.
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signer.sign(msg_id=msg_id, timestamp=at,
                                             data=body.decode("utf-8"))}


def webhook_id(alert: dict[str, Any]) -> str:
    """The ``webhook-id`` of ``alert``: the same on every delivery of it (a retry, a repeat
    after a sender died), another for another alert, so a receiver drops what it has seen. A
    random id per attempt would defeat that. It is the alert's ``alert_id`` (``KIND:VERSION_ID``,
    also the ``idempotency-key``); an alert without one (none the service makes) is named by a
    digest of its content, which its repeats share."""
    if alert.get("alert_id"):
        return str(alert["alert_id"])
    content = json.dumps(alert, sort_keys=True, separators=(",", ":"), default=str)
    return "alert_" + hashlib.sha256(content.encode()).hexdigest()[:32]


def _run_on_own_loop(coro: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(coro)``, but without waiting for the loop's executor at the end.
    ``asyncio.run`` waits there without a bound (Python 3.11) for the resolver thread of a name
    lookup that the deadline cut: a resolver that does not answer held the send for its own
    timeout (5 s x attempts x nameservers) past SELFIE_LORA_ALERT_TIMEOUT. ``loop.close()``
    shuts the executor down without waiting: the lookup ends on its own, its answer unread."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        try:
            # What asyncio.run does before closing, the executor's wait left out.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def _host_of(url: str) -> str:
    """The endpoint's host, the only part of the URL said anywhere (a URL httpx cannot read is
    not quoted either: it may still hold the credential)."""
    try:
        host = httpx.URL(url).host
    except (httpx.InvalidURL, TypeError, ValueError):
        host = ""
    return host or "the alert endpoint"
