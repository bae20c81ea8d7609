"""One Replicate client session and one retry policy, shared by the trainer and the generator.

``ReplicateConnection`` holds how to reach Replicate (token, base URL, timeout, retries, and for
tests an ``httpx`` transport such as ``httpx.MockTransport``); the wiring builds one from the
settings and hands it to both. ``ReplicateSession`` is one ``replicate.Client`` for one unit of
work: 429, 5xx, timeouts and connection errors are retried with exponential backoff that honours
``Retry-After`` up to the backoff cap (60 s), POSTs included (the official client retries only
idempotent methods, and sleeps on its own clock; its retry layer is bypassed so there is one
policy, with an injected ``sleep``); vendor errors become this package's errors with a sentence a
user can act on, the trainer's or the generator's (``Failures``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import httpx
from replicate.client import Client
from replicate.exceptions import ReplicateError, ReplicateException

from selfie_lora.adapters.tls import tls_context
from selfie_lora.errors import (
    ConfigError,
    GenerationError,
    SelfieLoraError,
    TrainerUnavailableError,
    TrainingFailedError,
    WeightsNotFoundError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATOR_FAILURES",
    "TRAINER_FAILURES",
    "CallStoppedError",
    "Failures",
    "ReplicateConnection",
    "ReplicateSession",
    "may_download",
    "parse_version_ref",
]

T = TypeVar("T")

_VERSION_REF = re.compile(r"^(?P<model>[^/\s:]+/[^/\s:]+):(?P<id>[0-9A-Za-z]+)$")
_THROTTLE_HINT = re.compile(r"available in (\d+(?:\.\d+)?) second", re.IGNORECASE)

_UNAVAILABLE = (
    "Replicate cannot be reached right now (or keeps answering that it is busy). "
    "Nothing was lost: try again in a few minutes."
)
_BAD_TOKEN = (
    "The training service is not allowed to use Replicate (the API token was rejected). "
    "Ask the operator to check REPLICATE_API_TOKEN."
)


# How often a backoff asks its ``stop`` whether to give up (a user's cancel, a stopping worker).
STOP_CHECK_SECONDS = 1.0


class CallStoppedError(SelfieLoraError):
    """A call given up during its backoff because its ``stop`` said so: the caller was asked to
    stop (a cancel, a worker stopping), not an outage, and nothing is mapped."""


# An error of ours from (what happened, for the log; what to tell the user).
ErrorFactory = Callable[[str, str], SelfieLoraError]


@dataclass(frozen=True)
class Failures:
    """Which of our errors a session raises: Replicate refused (a 4xx), cannot be reached (or
    keeps answering 429/5xx), sent a file over the cap, or named an output somewhere this
    service does not download from (``ReplicateSession.download``)."""

    refused: ErrorFactory
    unavailable: ErrorFactory
    too_large: ErrorFactory
    off_host: ErrorFactory


TRAINER_FAILURES = Failures(
    refused=lambda what, user: TrainingFailedError(what, user_message=user),
    unavailable=lambda what, user: TrainerUnavailableError(what, user_message=user),
    too_large=lambda what, user: WeightsNotFoundError(what, user_message=user),
    off_host=lambda what, user: WeightsNotFoundError(what, user_message=user),
)
# Unavailable: the fixed sentence ("please retry") is the user's; the others are sentences
# written here that a retry does not mend, shown to the user as they are.
GENERATOR_FAILURES = Failures(
    refused=lambda what, user: GenerationError(user, user_message=user, details=[what]),
    unavailable=lambda what, user: GenerationError(user, details=[what]),
    too_large=lambda what, user: GenerationError(user, user_message=user, details=[what]),
    off_host=lambda what, user: GenerationError(user, user_message=user, details=[what]),
)

# Where Replicate serves outputs: https://replicate.delivery and its subdomains
# (pbxt.replicate.delivery, ...). With the API's own origin, the only places a download goes.
DELIVERY_DOMAIN = "replicate.delivery"


@dataclass(frozen=True)
class ReplicateConnection:
    """How to reach Replicate; one for the whole process (the trainer and the generator)."""

    # Out of the repr: a connection lands in logs and tracebacks (the wiring's, a test's).
    api_token: str = field(repr=False)
    base_url: str = "https://api.replicate.com"
    timeout: float = 30.0
    max_retries: int = 5
    sleep: Callable[[float], None] = time.sleep
    # Every request goes through it when set (tests: ``httpx.MockTransport``).
    transport: httpx.BaseTransport | None = None

    def __post_init__(self) -> None:
        if not self.api_token:
            raise ConfigError("the Replicate backend needs REPLICATE_API_TOKEN")

    def session(self, failures: Failures) -> ReplicateSession:
        return ReplicateSession(
            api_token=self.api_token, base_url=self.base_url, timeout=self.timeout,
            max_retries=self.max_retries, sleep=self.sleep, failures=failures,
            transport=self.transport,
        )


def parse_version_ref(ref: str) -> tuple[str, str]:
    """Split ``owner/name:version`` into ``("owner/name", "version")``; ValueError otherwise."""
    match = _VERSION_REF.match(ref.strip())
    if match is None:
        raise ValueError(f"{ref!r} is not a Replicate version reference (owner/name:version)")
    return match.group("model"), match.group("id")


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def parse_time(value: object) -> datetime | None:
    """A time Replicate sends (ISO 8601, maybe with a "Z"), as an aware datetime; None when it
    is missing or not a time (a naive one is taken as UTC)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def same_origin(a: str, b: str) -> bool:
    x, y = urlsplit(a), urlsplit(b)
    return (x.scheme, x.hostname, x.port) == (y.scheme, y.hostname, y.port)


def shown_url(url: str) -> str:
    """``url`` as messages and logs may show it: scheme, host, port and path. An output URL is
    signed (the files API's, the delivery hosts' X-Amz-Signature and expiry in its query), and a
    message reaches the log, the training's stored error and its answers: the query is masked,
    the fragment and any user:password dropped. A ``data:`` URL (the client's form of a small
    output) is its media type and length, not its whole payload."""
    if url.startswith("data:"):
        media = url[5:].split(",", 1)[0].split(";", 1)[0] or "text/plain"
        return f"a data: URL ({media}, {len(url)} characters)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # "https://[::1/x" and its kin: no part of it can be told apart
        return "an unreadable URL"
    origin = (f"{parts.scheme}://{parts.hostname or ''}{'' if port is None else f':{port}'}"
              if parts.netloc else f"{parts.scheme}:" if parts.scheme else "")
    return f"{origin}{parts.path}{'?(query hidden)' if parts.query else ''}"


def may_download(url: str, *, base_url: str) -> bool:
    """Whether an output URL is one this service fetches: https on Replicate's delivery hosts,
    or the configured API's own origin, scheme and port included (the files API; and in tests
    the stand-in on http://127.0.0.1, which serves outputs there). A training's output is
    whatever its trainer wrote, so anything else, an internal address above all, is refused
    before any request is made."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and (host == DELIVERY_DOMAIN
                                    or host.endswith(f".{DELIVERY_DOMAIN}")):
        return True
    return same_origin(url, base_url)


class ReplicateSession:
    """One ``replicate.Client`` and one retry policy, for one unit of work; close it after.

    The session owns the HTTP transports (mounted over the client's own retrying transport), so
    closing it closes every socket it opened.
    """

    def __init__(
        self,
        *,
        api_token: str,
        base_url: str,
        timeout: float,
        max_retries: int,
        sleep: Callable[[float], None],
        failures: Failures = TRAINER_FAILURES,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self._api_token = api_token
        self._sleep = sleep
        self._failures = failures
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._retry_after: float | None = None
        self._timeout = httpx.Timeout(timeout)
        # Ours, closed with the session; or the caller's (tests), which it does not close.
        self._owned = transport is None
        self._api_transport = transport or httpx.HTTPTransport(verify=tls_context())
        self._download_transport = transport or httpx.HTTPTransport(verify=tls_context())
        hooks: dict[str, list[Callable[[httpx.Response], None]]] = {
            "response": [self._remember_retry_after, self._refuse_an_error_that_is_not_an_object],
        }
        self.client = Client(
            api_token=api_token,
            base_url=self.base_url,
            timeout=self._timeout,
            # Our transport for every URL: the client's own retry layer would sleep on the real
            # clock and skip POSTs; one policy (ours) is easier to reason about and to test.
            mounts={"all://": self._api_transport},
            event_hooks=hooks,
        )
        self._http = httpx.Client(
            timeout=self._timeout,
            follow_redirects=True,
            transport=self._download_transport,
            event_hooks=hooks,
        )
        # Outputs only: its request hook checks every hop, so a redirect cannot lead a download
        # off Replicate's hosts either.
        self._outputs = httpx.Client(
            timeout=self._timeout,
            follow_redirects=True,
            transport=self._download_transport,
            event_hooks={"request": [self._refuse_an_off_host_download], **hooks},
        )

    def close(self) -> None:
        self._outputs.close()
        self._http.close()
        if self._owned:
            self._api_transport.close()
            self._download_transport.close()

    def __enter__(self) -> ReplicateSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _remember_retry_after(self, response: httpx.Response) -> None:
        if response.status_code == 429 or response.status_code >= 500:
            self._retry_after = _parse_retry_after(response.headers.get("Retry-After"))

    def _refuse_an_error_that_is_not_an_object(self, response: httpx.Response) -> None:
        """An API error whose JSON body is not an object (``null``, ``[]``, a string: a proxy's
        answer) raises ``HTTPStatusError`` here, which ``call`` retries or maps by its status.

        The official client (and our raw requests) build ``ReplicateError.from_response``,
        which calls ``.get`` on the body: an AttributeError nobody maps, which in the middle of
        a poll failed a healthy, paid training and canceled it.
        """
        if response.status_code < 400 or not same_origin(str(response.request.url), self.base_url):
            return
        response.read()  # an API error's body is small; the hook runs before anyone reads it
        try:
            body = response.json()
        except ValueError:
            return  # not JSON at all: from_response reads that as an empty object
        if not isinstance(body, dict):
            raise httpx.HTTPStatusError(
                f"HTTP {response.status_code} with a {type(body).__name__} for its error body",
                request=response.request,
                response=response,
            )

    def _refuse_an_off_host_download(self, request: httpx.Request) -> None:
        if not may_download(str(request.url), base_url=self.base_url):
            raise _OffHostError(request.url)

    # ----------------------------------------------------------------- retries

    def call(
        self,
        what: str,
        fn: Callable[[], T],
        *,
        reconcile: Callable[[], T | None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> T:
        """Run ``fn`` with retries. ``what`` completes "could not ..." in messages.

        ``stop`` is asked about every ``STOP_CHECK_SECONDS`` of a backoff; when it answers True
        the call raises ``CallStoppedError`` instead of waiting on (a poll's backoff, stretched
        by ``Retry-After``, held a user's cancel for 31 s to 5 minutes).

        ``reconcile`` runs before every *re*-try and may return a result to use instead of
        calling ``fn`` again (a create that did happen although its answer was lost); and once
        more after the last attempt, before "nothing was lost" is said: that attempt too may
        have made what it asked for (a training or a prediction, running and billed).
        """
        attempt = 0
        while True:
            if attempt > 0 and reconcile is not None:
                adopted = reconcile()
                if adopted is not None:
                    return adopted
            self._retry_after = None
            try:
                return fn()
            except (ReplicateException, httpx.HTTPError, ValueError) as exc:
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    raise self._map(exc, what) from exc
                if attempt >= self.max_retries:
                    if reconcile is not None:
                        # After the backoff, as before a retry: the lost create has had the
                        # time to show in the list.
                        self._sleep(delay)
                        adopted = reconcile()
                        if adopted is not None:
                            return adopted
                    raise self._failures.unavailable(
                        f"could not {what} after {attempt + 1} attempts: {_describe(exc)}",
                        _UNAVAILABLE,
                    ) from exc
                attempt += 1
                logger.warning(
                    "could not %s (%s); retry %d of %d in %.1f s",
                    what,
                    _describe(exc),
                    attempt,
                    self.max_retries,
                    delay,
                )
                self._back_off(delay, what=what, stop=stop)

    def _back_off(self, delay: float, *, what: str, stop: Callable[[], bool] | None) -> None:
        if stop is None:
            self._sleep(delay)
            return
        left = delay
        while True:
            if stop():
                raise CallStoppedError(f"stopped while waiting to {what} again")
            if left <= 0:
                return
            step = min(STOP_CHECK_SECONDS, left)
            self._sleep(step)
            left -= step

    def _retry_delay(self, exc: Exception, attempt: int) -> float | None:
        """Seconds to wait before retrying ``exc``, or None when it must not be retried."""
        status: int | None = None
        hint: float | None = None
        if isinstance(exc, ReplicateError):
            status = exc.status
            if status == 429 and isinstance(exc.detail, str):
                found = _THROTTLE_HINT.search(exc.detail)
                hint = float(found.group(1)) if found else None
        elif isinstance(exc, httpx.HTTPStatusError):
            status = exc.response.status_code
        elif isinstance(exc, httpx.TransportError):
            status = None  # timeouts, refused or reset connections: always worth a retry
        else:
            return None
        if status is not None and status != 429 and status < 500:
            return None
        backoff = min(self._backoff_max, self._backoff_base * 2.0**attempt)
        server_hint = self._retry_after if self._retry_after is not None else hint
        if server_hint is None:
            return backoff
        # Honoured up to the backoff cap: a Retry-After of a day (seen) held the worker, or the
        # user's generate request, for that long; past the cap a still-busy Replicate ends in
        # "unavailable, try again", which a user can act on.
        return max(backoff, min(server_hint, self._backoff_max))

    def _map(self, exc: Exception, what: str) -> SelfieLoraError:
        if isinstance(exc, ReplicateError):
            detail = _text(exc.detail) or _text(exc.title) or "no detail"
            if exc.status in {401, 403}:
                return self._failures.unavailable(
                    f"Replicate refused our credentials when trying to {what}: {detail}",
                    _BAD_TOKEN,
                )
            return self._failures.refused(
                f"Replicate answered {exc.status} when trying to {what}: {detail}",
                f"Replicate refused to {what}: {shorten(detail)}.",
            )
        if isinstance(exc, httpx.HTTPStatusError):
            code = exc.response.status_code
            if code in {401, 403} and same_origin(str(exc.request.url), self.base_url):
                return self._failures.unavailable(
                    f"Replicate refused our credentials when trying to {what}: HTTP {code}",
                    _BAD_TOKEN,
                )
            return self._failures.refused(
                f"HTTP {code} when trying to {what}", f"Could not {what} (HTTP {code}).")
        return self._failures.unavailable(
            f"unexpected answer from Replicate when trying to {what}: {_describe(exc)}",
            _UNAVAILABLE,
        )

    # ----------------------------------------------------------------- raw requests

    def _auth_for(self, url: str) -> dict[str, str]:
        # The token goes to the API only, never to the hosts that serve outputs.
        if same_origin(url, self.base_url):
            return {"Authorization": f"Bearer {self._api_token}"}
        return {}

    def upload(
        self, data: bytes, *, filename: str, content_type: str, metadata: dict[str, Any],
        stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/files`` as the official client does it, but with a timeout (the client
        uploads with none, which can hang a worker for ever). Returns the file object."""
        url = f"{self.base_url}/v1/files"

        def send() -> dict[str, Any]:
            response = self._http.post(
                url,
                headers=self._auth_for(url),
                files={"content": (filename, data, content_type)},
                data={"metadata": json.dumps(metadata)},
            )
            if response.status_code >= 400:
                raise ReplicateError.from_response(response)
            body = response.json()
            if not isinstance(body, dict) or not isinstance(body.get("urls"), dict):
                raise ValueError("file upload answer has no urls")
            return body

        return self.call("upload the photos", send, stop=stop)

    def get_json(self, path: str, *, what: str, parse: Callable[[Any], T] | None = None,
                 stop: Callable[[], bool] | None = None) -> Any:
        """``GET`` an API path and return its JSON as is (the client's models drop fields it
        does not declare, such as a training's ``metrics``), or what ``parse`` makes of it
        (inside the retries: a ValueError from it is mapped as the request's own)."""
        url = f"{self.base_url}{path}"

        def fetch() -> Any:
            response = self._http.get(url, headers=self._auth_for(url))
            if response.status_code >= 400:
                raise ReplicateError.from_response(response)
            body = response.json()
            return body if parse is None else parse(body)

        return self.call(what, fetch, stop=stop)

    def post_json(
        self,
        path: str,
        payload: dict[str, Any],
        *,
        what: str,
        reconcile: Callable[[], dict[str, Any] | None] | None = None,
    ) -> dict[str, Any]:
        """``POST`` JSON to an API path, with the session's timeout, and return the JSON object.

        For creates: the official client sends ``POST /v1/predictions`` with no timeout at all
        (``timeout=None`` unless ``wait`` is given), so a Replicate that never answers would hang
        the caller for ever. A create is not idempotent, so give ``reconcile`` (see ``call``):
        it runs before every retry and returns what the lost attempt made, if it made anything.
        """
        url = f"{self.base_url}{path}"

        def send() -> dict[str, Any]:
            response = self._http.post(url, headers=self._auth_for(url), json=payload)
            if response.status_code >= 400:
                raise ReplicateError.from_response(response)
            body = response.json()
            if not isinstance(body, dict):
                raise ValueError(f"POST {path} answered something that is not an object")
            return body

        return self.call(what, send, reconcile=reconcile)

    def download(self, url: str, *, max_bytes: int, what: str,
                 stop: Callable[[], bool] | None = None) -> bytes:
        """GET ``url`` (retrying), refusing more than ``max_bytes``; a ``data:`` URL (the client's
        form of a small output) is decoded, under the same cap. A URL that cannot be read is
        refused (Replicate's answer is at fault; trying again fetches the same), and so is one,
        or a redirect, to anywhere but Replicate's delivery hosts and the API's origin
        (``may_download``): the worker would fetch whatever a trainer's output names."""
        try:
            if url.startswith("data:"):
                return _data_url_bytes(url, max_bytes=max_bytes)
            httpx.URL(url)  # before any request: httpx.InvalidURL is no HTTPError
        except (ValueError, httpx.InvalidURL) as exc:
            raise self._failures.refused(
                f"could not {what}: {shown_url(url)[:80]!r} is not a valid URL: {exc}",
                f"Could not {what}: Replicate's output names no valid URL.",
            ) from exc
        except _TooLargeError as exc:
            raise self._failures.too_large(
                str(exc), "Replicate's output is larger than this service accepts.") from exc

        def fetch() -> bytes:
            with self._outputs.stream("GET", url, headers=self._auth_for(url)) as response:
                if response.status_code in {401, 403}:
                    # A signed output URL (the files API's /download has an expiry) refused:
                    # the output is gone, whatever the host. Our token is not at fault (the
                    # API answered the poll that named it), and retrying fetches the same.
                    raise _OutputRefusedError(response.status_code)
                response.raise_for_status()
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise _TooLargeError(shown_url(url), max_bytes)
                chunks: list[bytes] = []
                total = 0
                for chunk in response.iter_bytes():
                    total += len(chunk)
                    if total > max_bytes:
                        raise _TooLargeError(shown_url(url), max_bytes)
                    chunks.append(chunk)
                return b"".join(chunks)

        try:
            return self.call(what, fetch, stop=stop)
        except _OutputRefusedError as exc:
            raise self._failures.refused(
                f"HTTP {exc.status} when trying to {what} (an expired or withdrawn output)",
                f"Could not {what} (HTTP {exc.status}).") from exc
        except _TooLargeError as exc:
            raise self._failures.too_large(
                str(exc), "Replicate's output is larger than this service accepts.") from exc
        except _OffHostError as exc:
            raise self._failures.off_host(
                f"could not {what}: {exc}",
                f"Could not {what}: Replicate's output points outside Replicate's file hosts, "
                "and this service downloads from nowhere else.") from exc


class _TooLargeError(Exception):
    """``url`` as shown (``shown_url``): its message is logged and stored."""

    def __init__(self, url: str, limit: int) -> None:
        super().__init__(f"{url} is larger than the {limit} byte cap")


class _OutputRefusedError(Exception):
    """An output download answered 401 or 403. Not an httpx error: ``call`` neither retries it
    nor reads it as a rejected token."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class _OffHostError(Exception):
    """A download (or a redirect of one) to a URL ``may_download`` refuses. Not an httpx error:
    ``call`` does not retry it (the same output names the same place)."""

    def __init__(self, url: httpx.URL) -> None:
        # The origin only, without a user or password: the rest of a URL may carry secrets.
        port = f":{url.port}" if url.port is not None else ""
        super().__init__(f"{url.scheme}://{url.host}{port} is not "
                         f"https://{DELIVERY_DOMAIN} (or a subdomain) nor the Replicate API's "
                         "origin; refused before any request")


def _data_url_bytes(url: str, *, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URL (RFC 2397): ValueError when it is malformed (no comma,
    invalid base64: never silently empty), ``_TooLargeError`` over ``max_bytes``."""
    header, comma, payload = url.removeprefix("data:").partition(",")
    if not comma:
        raise ValueError("a data: URL without the comma before its data")
    if header.lower().endswith(";base64"):
        text = unquote(payload)
        # 4 characters hold 3 bytes: refuse before decoding what would be over the cap.
        if len(text) // 4 * 3 > max_bytes + 2:
            raise _TooLargeError("the data: URL", max_bytes)
        try:
            data = base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"a data: URL whose base64 is invalid ({exc})") from None
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _TooLargeError("the data: URL", max_bytes)
    return data


def _text(value: object) -> str | None:
    """A field of an error body as text: a proxy's ``detail`` can be an object or a number."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ReplicateError):
        return f"HTTP {exc.status}: {_text(exc.detail) or _text(exc.title)}"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def shorten(text: str, limit: int = 240) -> str:
    """First meaningful line of a remote error, bounded (tracebacks are not for users), with
    no control character: it is stored as the training's error, and a NUL from a remote log
    is a text PostgreSQL refuses to store."""
    text = "".join(c if c.isprintable() or c == "\n" else " " for c in text)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    meaningful = [line for line in lines if not line.startswith(("Traceback", "File "))]
    line = (meaningful or lines or ["unknown error"])[-1 if meaningful else 0]
    line = line.rstrip(".")
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"
