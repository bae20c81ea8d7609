"""The HTTP clients' TLS settings, made once a thread."""

from __future__ import annotations

import ssl
import threading

import httpx

_made = threading.local()


def tls_context() -> ssl.SSLContext:
    """httpx's default TLS settings (certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR, read when
    the thread's first context is made: a changed CA bundle is read at the next restart), made
    once a thread: httpx builds them for every transport it makes, ~30 ms of CPU each (reading
    and parsing the CA bundle), and a Replicate session made two for each unit of work, an
    alert sender one for each alert. Not one for the whole process: httpcore sets a context's
    ALPN protocols at each new connection, and CPython runs OpenSSL's set-up without the GIL,
    so two threads' connections must not share one."""
    context: ssl.SSLContext | None = getattr(_made, "context", None)
    if context is None:
        context = _made.context = httpx.create_ssl_context()
    return context
