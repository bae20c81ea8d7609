"""Argon2 at a test's cost: the default cost (RFC 9106's profile, ~0.5 s a hash on a loaded CI
core) is what production pays; a test of what happens to accounts, not of the hash's strength,
pays it at every ``set_password``, sign-in and ``users password`` it makes."""

from __future__ import annotations

import pytest

from selfie_lora import wiring
from selfie_lora.adapters.passwords.argon2 import Argon2Hasher

FAST_HASHER = Argon2Hasher(time_cost=1, memory_cost_kib=1024)


def fast_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``build_services`` given no hasher from now on (the ``services`` fixture's, the CLI
    commands' run in this process) hashes with ``FAST_HASHER``: Argon2id still, so hashes,
    verifies and refusals are the real ones, at the lowest cost."""
    monkeypatch.setattr(wiring, "default_password_hasher", lambda: FAST_HASHER)
