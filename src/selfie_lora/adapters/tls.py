"""The HTTP clients' TLS settings, made once a process."""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default TLS settings (certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR), made once:
    httpx builds them for every transport it makes, ~30 ms of CPU each (reading and parsing the
    CA bundle), and a Replicate session made two for each unit of work, an alert sender one for
    each alert. One SSLContext serves any number of connections, in any thread."""
    return httpx.create_ssl_context()
