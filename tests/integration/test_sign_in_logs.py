"""Failed sign-ins and the rate limit's refusals are in the application log (they used to be
only uvicorn's access lines, which name no account): the account as typed (only a hash of a
name that is no account's, often a password typed in the wrong field), the client address,
never the password; the first refusal of a name from an address in a window at WARNING."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta

import pytest

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.domain.accounts import SignInPolicy, fold_name
from selfie_lora.errors import AuthError, RateLimitedError
from selfie_lora.services.users import UserService
from tests.support.clock import Clock
from tests.support.passwords import FAST_HASHER

PASSWORD = "correct horse battery"
POLICY = SignInPolicy(max_failures=3, max_failures_per_client=50, max_failures_per_name=50,
                      window=timedelta(minutes=15), session_lifetime=timedelta(days=1))


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "selfie_lora.services.users" and "sign-in" in r.getMessage()]


def test_failed_sign_ins_and_refusals_are_logged_with_the_name_and_address(
        repo: SqlRepository, caplog: pytest.LogCaptureFixture) -> None:
    svc = UserService(repo=repo, hasher=FAST_HASHER,
                      policy=POLICY, clock=Clock(datetime(2026, 1, 1, tzinfo=UTC)))
    svc.create(name="ann", password=PASSWORD)
    caplog.set_level(logging.INFO, logger="selfie_lora")
    for i in range(POLICY.max_failures):
        with pytest.raises(AuthError):
            svc.sign_in(name="Ann", password=f"wrong guess {i}", client="10.0.0.7")
    for _ in range(2):
        with pytest.raises(RateLimitedError):
            svc.sign_in(name="ann", password="wrong guess 9", client="10.0.0.7")
    with pytest.raises(AuthError):
        svc.sign_in(name="my secret pw\n2026-01-01 INFO forged", password="x" * 12,
                    client="10.0.0.8")
    found = lines(caplog)
    assert found[:3] == [("INFO", "sign-in failed for user 'Ann' from 10.0.0.7: wrong password")] * 3
    assert [level for level, _ in found[3:5]] == ["WARNING", "INFO"]
    assert found[3][1].startswith("sign-in refused for user 'ann' from 10.0.0.7 by the rate "
                                  "limit: too many failed sign-ins: try again in ")
    assert found[5][0] == "INFO"
    assert found[5][1].startswith("sign-in failed for an unknown name (tag ")
    # Keyed: not a plain sha256 of the name, which a table of hashed passwords would undo.
    typed = "my secret pw\n2026-01-01 INFO forged"
    for plain in (typed, fold_name(typed)):
        assert hashlib.sha256(plain.encode()).hexdigest()[:12] not in found[5][1]

    assert found[5][1].endswith(" from 10.0.0.8: no such user")
    text = "\n".join(message for _, message in found)
    for secret in ("wrong guess", "secret", "forged"):  # no password, no unknown name
        assert secret not in text
    assert len(found) == 6


def test_a_typed_name_is_escaped_and_cut_in_the_log() -> None:
    from selfie_lora.services.users import _printable

    assert _printable("ann\n\x1b[31mroot") == "ann\\n\\x1b[31mroot"
    assert _printable("a" * 100) == "a" * 64 + "..."
