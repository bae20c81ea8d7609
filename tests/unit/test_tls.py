"""The HTTP clients' TLS context (adapters/tls.py): made once a thread, verifying."""

from __future__ import annotations

import ssl
import threading

from selfie_lora.adapters.tls import tls_context


def test_a_thread_reuses_its_context_and_another_thread_gets_its_own() -> None:
    first = tls_context()
    assert tls_context() is first
    other: list[ssl.SSLContext] = []
    thread = threading.Thread(target=lambda: other.append(tls_context()))
    thread.start()
    thread.join()
    assert len(other) == 1
    assert other[0] is not first


def test_the_context_verifies_certificates_and_host_names() -> None:
    context = tls_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
