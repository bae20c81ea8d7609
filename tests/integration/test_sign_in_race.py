"""Wrong passwords sent at once are limited like ones sent in turn. The failure used to be stored
after the (slow) password check, so every attempt of a burst found the count under the limit and
had its password checked: 16 of 16 with a limit of 5 (found in review). The service now counts
the attempt before the check, in one transaction with the count, per name and per client
address. On SQLite and, when ``SELFIE_LORA_TEST_POSTGRES_URL`` is set, PostgreSQL."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.adapters.passwords.argon2 import Argon2Hasher
from selfie_lora.domain.accounts import SignInPolicy
from selfie_lora.errors import AuthError, RateLimitedError
from selfie_lora.services.users import UserService
from tests.support.clock import Clock

PASSWORD = "correct horse battery"
POLICY = SignInPolicy(max_failures=3, max_failures_per_client=5, max_failures_per_name=6,
                      window=timedelta(minutes=15), session_lifetime=timedelta(days=1))
BURST = 10
# How long each check takes on top of the hash: long enough that every attempt of the burst
# has started before the first one would have stored its failure.
SLOW_CHECK_SECONDS = 0.5


class CountingHasher:
    """A real hasher at a test cost whose checks are slow and counted."""

    def __init__(self) -> None:
        self._inner = Argon2Hasher(time_cost=1, memory_cost_kib=1024)
        self._lock = threading.Lock()
        self.verified = 0

    def hash(self, password: str) -> str:
        return self._inner.hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        with self._lock:
            self.verified += 1
        time.sleep(SLOW_CHECK_SECONDS)
        return self._inner.verify(password_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        return self._inner.needs_rehash(password_hash)


def burst(svc: UserService, attempts: list[tuple[str, str, str]]) -> list[str]:
    """Every ``(name, password, client)`` signed in at the same moment; each one's outcome."""
    start = threading.Barrier(len(attempts))

    def attempt(args: tuple[str, str, str]) -> str:
        name, password, client = args
        start.wait(10)
        try:
            svc.sign_in(name=name, password=password, client=client)
        except RateLimitedError:
            return "429"
        except AuthError:
            return "401"
        return "200"

    with ThreadPoolExecutor(len(attempts)) as pool:
        return list(pool.map(attempt, attempts))


def service(repo: SqlRepository) -> tuple[UserService, CountingHasher]:
    hasher = CountingHasher()
    svc = UserService(repo=repo, hasher=hasher, policy=POLICY,
                      clock=Clock(datetime(2026, 1, 1, tzinfo=UTC)))
    svc.create(name="ann", password=PASSWORD)
    return svc, hasher


# The name's ceiling holds back addresses that failed for it already: three, once each.
PRIMED = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


@pytest.mark.parametrize(("clients", "primed", "limit"), [
    ([PRIMED[i % 3] for i in range(BURST)], PRIMED,
     POLICY.max_failures_per_name - len(PRIMED)),  # the name's ceiling
    (["10.0.0.1"] * BURST, [], POLICY.max_failures),  # the name from one address
])
def test_a_burst_of_wrong_passwords_for_one_name_is_checked_at_most_the_limit(
        repo: SqlRepository, clients: list[str], primed: list[str], limit: int) -> None:
    svc, hasher = service(repo)
    for client in primed:
        with pytest.raises(AuthError):
            svc.sign_in(name="ann", password="wrong guess primed", client=client)
    hasher.verified = 0
    outcomes = burst(svc, [("ann", f"wrong guess {i:04d}", client)
                           for i, client in enumerate(clients)])
    assert hasher.verified == limit
    assert sorted(outcomes) == ["401"] * limit + ["429"] * (BURST - limit)
    with pytest.raises(RateLimitedError):
        svc.sign_in(name="ann", password=PASSWORD, client=clients[-1])


def test_a_burst_from_one_address_is_checked_at_most_its_limit(repo: SqlRepository) -> None:
    svc, hasher = service(repo)
    outcomes = burst(svc, [(f"user{i}", PASSWORD, "10.6.6.6") for i in range(BURST)])
    limit = POLICY.max_failures_per_client
    assert hasher.verified == limit
    assert sorted(outcomes) == ["401"] * limit + ["429"] * (BURST - limit)


def test_a_correct_password_signs_in_and_is_not_counted(repo: SqlRepository) -> None:
    svc, hasher = service(repo)
    since = datetime(2025, 1, 1, tzinfo=UTC)
    for i in range(POLICY.max_failures - 1):
        with pytest.raises(AuthError):
            svc.sign_in(name="ann", password=f"wrong guess {i}", client="10.0.0.1")
    for _ in range(POLICY.max_failures + 1):
        assert svc.sign_in(name="ann", password=PASSWORD, client="10.0.0.1").user.name == "ann"
    assert len(repo.sign_in_failures("name:ann", since=since)) == POLICY.max_failures - 1
    assert len(repo.sign_in_failures("client:10.0.0.1", since=since)) == POLICY.max_failures - 1
    # The last allowed failure still gets its check, the next attempt waits.
    with pytest.raises(AuthError):
        svc.sign_in(name="ann", password="one more wrong guess", client="10.0.0.1")
    with pytest.raises(RateLimitedError):
        svc.sign_in(name="ann", password=PASSWORD, client="10.0.0.1")
    assert hasher.verified == 2 * POLICY.max_failures + 1
