"""Which S3 failures are an outage (waited out, 503 with Retry-After) and which are settings to
fix (``config_error``): every obstore ``GenericError`` with no status, and every 5xx, was an
outage, so a host typo, https against http, a wrong region, a store that answers 501 to the
conditional PUT or an endpoint that is not S3 kept a training waiting for ever."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from selfie_lora.adapters.storage.s3 import S3BlobStore
from selfie_lora.errors import BlobStoreUnreachableError, StorageError, StorageSettingsError
from tests.integration.test_storage_timeouts import hung_endpoint  # noqa: F401 - a fixture

_XML = "<?xml version='1.0'?>\n<Error><Code>{code}</Code><Message>said</Message></Error>"
_ANSWERS = {
    "501": (501, _XML.format(code="NotImplemented")),
    "429": (429, _XML.format(code="SlowDown")),
    "500": (500, _XML.format(code="InternalError")),
    "502": (502, "<html>Bad gateway</html>"),
    "503": (503, _XML.format(code="SlowDown")),
    "504": (504, "<html>Gateway timeout</html>"),
    "301": (301, _XML.format(code="PermanentRedirect")),
    "403": (403, _XML.format(code="AccessDenied")),
    "html": (200, "<html>hello</html>"),
}


class _Stub(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        status, body = _ANSWERS[self.server.mode]  # type: ignore[attr-defined]
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_HEAD = do_GET  # noqa: N815 - http.server names it

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()


@pytest.fixture(scope="module")
def stub() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _store(tmp_path: Path, endpoint: str) -> S3BlobStore:
    return S3BlobStore(url="s3://bucket", cache_dir=tmp_path, endpoint=endpoint,
                       region="us-east-1", access_key_id="k", secret_access_key="s",
                       connect_timeout=1, timeout=1, retry_timeout=0, max_retries=0)


def _raised(call: Callable[[], object]) -> StorageError:
    with pytest.raises(StorageError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(("mode", "call", "expected"), [
    ("501", "put", StorageSettingsError),  # old code: BlobStoreUnreachableError
    ("301", "get", StorageSettingsError),  # the wrong region; old code: an outage
    ("html", "put", StorageSettingsError),  # not S3; old code: an outage
    ("403", "get", StorageError),
    ("429", "get", BlobStoreUnreachableError),  # throttled; old code: a plain StorageError
    ("500", "get", BlobStoreUnreachableError),
    ("502", "put", BlobStoreUnreachableError),
    ("503", "get", BlobStoreUnreachableError),
    ("504", "get", BlobStoreUnreachableError),
])
def test_an_answer_is_an_outage_only_when_it_passes(
        tmp_path: Path, stub: http.server.ThreadingHTTPServer, mode: str, call: str,
        expected: type[StorageError]) -> None:
    stub.mode = mode  # type: ignore[attr-defined]
    store = _store(tmp_path, f"http://127.0.0.1:{stub.server_address[1]}")
    error = _raised(lambda: store.put("photos/x", b"x") if call == "put" else store.get("photos/x"))
    assert type(error) is expected, error


def test_a_host_that_does_not_resolve_and_https_against_http_are_settings(
        tmp_path: Path, stub: http.server.ThreadingHTTPServer) -> None:
    # Old code: both BlobStoreUnreachableError, a training waiting for ever.
    error = _raised(lambda: _store(tmp_path, "http://no-such-host.invalid:9000").get("photos/x"))
    assert type(error) is StorageSettingsError, error
    stub.mode = "403"  # type: ignore[attr-defined]
    error = _raised(lambda: _store(
        tmp_path, f"https://127.0.0.1:{stub.server_address[1]}").get("photos/x"))
    assert type(error) is StorageSettingsError, error


def test_a_refused_or_silent_endpoint_is_an_outage(
        tmp_path: Path, hung_endpoint: str) -> None:  # noqa: F811
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed = sock.getsockname()[1]
    sock.close()
    error = _raised(lambda: _store(tmp_path, f"http://127.0.0.1:{closed}").get("photos/x"))
    assert type(error) is BlobStoreUnreachableError, error
    error = _raised(lambda: _store(tmp_path, hung_endpoint).get("photos/x"))
    assert type(error) is BlobStoreUnreachableError, error


def _generic(source: str) -> Exception:
    """An obstore ``GenericError`` with no status, its source as reqwest words it (the text of
    a host that does not resolve here, with ``source`` for libc's words)."""
    from obstore.exceptions import GenericError

    return GenericError(
        "Generic S3 error: Error performing GET http://s3.internal:9000/bucket/photos/x in "
        "4.6ms - HTTP error: error sending request\n\nDebug source:\nGeneric { source: "
        "reqwest::Error { kind: Request, source: hyper_util::client::legacy::Error(Connect, "
        f'ConnectError("dns error", Custom {{ kind: Uncategorized, error: "{source}" }})) }} }}')


def test_a_resolver_that_fails_for_now_is_an_outage_and_a_name_it_does_not_know_is_settings(
        tmp_path: Path) -> None:
    # Old code: "Temporary failure in name resolution" (EAI_AGAIN: the resolver away for a
    # moment) was a plain StorageError, a training's attempt spent on a blip: the "dns error"
    # beside it made it settings and passing at once, so neither.
    store = _store(tmp_path, "http://127.0.0.1:9")
    again = store._error("read", "photos/x", _generic(
        "failed to lookup address information: Temporary failure in name resolution"))
    assert type(again) is BlobStoreUnreachableError, again
    unknown = store._error("read", "photos/x", _generic(
        "failed to lookup address information: Name or service not known"))
    assert type(unknown) is StorageSettingsError, unknown
