"""Passwords and browser sessions in the user service, on SQLite with real argon2 hashes (at a
test cost): one answer for an unknown name and a wrong password, the rate limit per name and per
client, session expiry, sign-out, a password change ending sessions, sign-up only when open and
limited per client (whatever the attempts' outcome), a taken name refused before hashing. And
API keys remembered for a second: a key revoked here stops at once, one revoked by another
process within ``API_KEY_CACHE_TTL``."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from selfie_lora.adapters.db.migrate import upgrade
from selfie_lora.adapters.db.repository import SqlRepository, make_engine
from selfie_lora.adapters.passwords.argon2 import Argon2Hasher
from selfie_lora.domain.accounts import WRONG_CREDENTIALS, ErasurePlan, SignInPolicy
from selfie_lora.domain.entities import User
from selfie_lora.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    ErrorCode,
    ForbiddenError,
    InvalidInputError,
    RateLimitedError,
)
from selfie_lora.services.users import API_KEY_CACHE_TTL, KEY_ROTATION_GRACE, UserService
from tests.support.clock import Clock
from tests.support.passwords import FAST_HASHER

PASSWORD = "correct horse battery"
POLICY = SignInPolicy(max_failures=3, max_failures_per_client=5, max_failures_per_name=8,
                      max_sign_ups_per_client=3, window=timedelta(minutes=15),
                      session_lifetime=timedelta(days=1))


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 1, 1, tzinfo=UTC))


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[SqlRepository]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    yield SqlRepository(engine)
    engine.dispose()


def users(repo: SqlRepository, clock: Clock, *, signup: bool = False) -> UserService:
    return UserService(repo=repo, hasher=FAST_HASHER,
                       policy=POLICY, signup_enabled=signup, clock=clock)


def test_sign_in_opens_a_session_that_finds_its_user(repo: SqlRepository, clock: Clock) -> None:
    svc = users(repo, clock)
    ann, _key = svc.create(name="ann", password=PASSWORD)
    signed = svc.sign_in(name="ann", password=PASSWORD, client="10.0.0.1")
    assert signed.user == ann
    user, session = svc.session(token=signed.token)
    assert user == ann
    assert session.csrf_token == signed.session.csrf_token
    assert session.expires_at == clock.now + POLICY.session_lifetime
    # Only the token's hash is stored.
    assert repo.get_session(signed.token) is None
    stored = repo.get_password_hash(ann.id)
    assert stored is not None
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


@pytest.mark.parametrize("name", ["alice\n", "alice\r\n", "alice ", "\nalice", ""])
def test_a_user_name_with_anything_around_it_is_refused(repo: SqlRepository, clock: Clock,
                                                        name: str) -> None:
    """'alice\n' was a second account beside 'alice' (a regex's "$" matches before a final
    newline): the whole name is checked."""
    svc = users(repo, clock)
    svc.create(name="alice")
    with pytest.raises(InvalidInputError) as refused:
        svc.create(name=name)
    assert refused.value.code is ErrorCode.INVALID_NAME
    assert repo.get_user_by_name(name) is None


def test_names_that_differ_only_in_case_are_one_account(repo: SqlRepository,
                                                       clock: Clock) -> None:
    """'Ann' and 'ANN' were accounts beside 'ann' (found in review), while the sign-in limit
    already counted them as one name. Now they are one: refused as new, and any case signs in."""
    svc = users(repo, clock)
    ann, _key = svc.create(name="ann", password=PASSWORD)
    for name in ("Ann", "ANN", "aNn"):
        with pytest.raises(ConflictError) as taken:
            svc.create(name=name, password=PASSWORD)
        assert taken.value.code is ErrorCode.USER_EXISTS
        assert "'ann' already exists" in taken.value.message
        assert svc.sign_in(name=name, password=PASSWORD, client="c").user == ann
        assert svc.get_by_name(name=name) == ann
    # The database holds to it too (two sign-ups at once both pass the service's check).
    with pytest.raises(ConflictError) as raced:
        repo.add_user(User(id="u-2", name="ANN", created_at=clock.now))
    assert raced.value.code is ErrorCode.USER_EXISTS


@pytest.mark.parametrize("name", ["ann.", "ann-", "ann_", "ann@", "a.", "ann..", "-ann"])
def test_a_new_name_starts_and_ends_with_a_letter_or_digit(repo: SqlRepository, clock: Clock,
                                                           name: str) -> None:
    """'ann.' and 'ann-' were accounts beside 'ann' that no reader tells apart from it."""
    svc = users(repo, clock)
    with pytest.raises(InvalidInputError) as refused:
        svc.create(name=name, password=PASSWORD)
    assert refused.value.code is ErrorCode.INVALID_NAME
    assert "ends with a letter or digit" in refused.value.message


@pytest.mark.parametrize("name", ["zoë", "jürgen", "ольга"])
def test_a_name_with_a_letter_outside_ascii_is_refused_saying_ascii(
        repo: SqlRepository, clock: Clock, name: str) -> None:
    """'zoë' was refused by a message saying a name is letters, which ë is."""
    svc = users(repo, clock)
    with pytest.raises(InvalidInputError) as refused:
        svc.create(name=name)
    assert refused.value.code is ErrorCode.INVALID_NAME
    assert "ASCII letters (a-z, A-Z)" in refused.value.message


def test_names_with_punctuation_inside_and_names_made_before_keep_working(
        repo: SqlRepository, clock: Clock) -> None:
    svc = users(repo, clock)
    for name in ("a", "a.b", "ann-lee", "ann@example.org", "x_1"):
        svc.create(name=name)
    # An account made before names had to end in a letter or digit signs in as it did.
    repo.add_user(User(id="u-old", name="Bob.", created_at=clock.now))
    old = svc.get_by_name(name="bob.")
    svc.set_password(user=old, password=PASSWORD)
    assert svc.sign_in(name="Bob.", password=PASSWORD, client="c").user == old
    assert svc.sign_in(name="BOB.", password=PASSWORD, client="c").user == old
    svc.create(name="bob")  # not the same name: it was never refused, and is not now


@pytest.mark.parametrize("name", ["laptop\n", "lap\ttop", "laptop\x7f", ""])
def test_a_key_name_with_a_control_character_is_refused(repo: SqlRepository, clock: Clock,
                                                        name: str) -> None:
    svc = users(repo, clock)
    ann, _key = svc.create(name="ann")
    with pytest.raises(InvalidInputError) as refused:
        svc.create_key(user=ann, name=name)
    assert refused.value.code is ErrorCode.INVALID_NAME
    assert [k.name for k in svc.keys(user=ann)] == ["default"]
    assert svc.create_key(user=ann, name="laptop (büro)")[0].name == "laptop (büro)"


def test_unknown_name_and_wrong_password_get_the_same_answer(
        repo: SqlRepository, clock: Clock) -> None:
    svc = users(repo, clock)
    svc.create(name="ann", password=PASSWORD)
    svc.create(name="keyonly")  # no password: API keys only
    answers = []
    for name, password in (("ann", "wrong password!"), ("nobody", PASSWORD),
                           ("keyonly", PASSWORD)):
        with pytest.raises(AuthError) as caught:
            svc.sign_in(name=name, password=password, client=f"c-{name}")
        answers.append((caught.value.code, caught.value.message, caught.value.details))
    assert answers == [(ErrorCode.WRONG_CREDENTIALS, WRONG_CREDENTIALS, [])] * 3


def test_too_many_failures_for_a_name_from_an_address_make_it_wait_even_with_the_right_password(
        repo: SqlRepository, clock: Clock) -> None:
    svc = users(repo, clock)
    svc.create(name="ann", password=PASSWORD)
    for i in range(POLICY.max_failures):
        clock.now += timedelta(minutes=1)
        with pytest.raises(AuthError):
            svc.sign_in(name="ann", password=f"guess number {i}", client="10.0.0.1")
    with pytest.raises(RateLimitedError) as caught:
        svc.sign_in(name="ANN", password=PASSWORD, client="10.0.0.1")  # names fold case
    # The first failure (2 minutes ago) leaves the 15-minute window in 13 minutes.
    assert caught.value.retry_after == 13 * 60
    assert "13 minutes" in caught.value.message
    clock.now += timedelta(minutes=13) - timedelta(seconds=1)
    with pytest.raises(RateLimitedError):
        svc.sign_in(name="ann", password=PASSWORD, client="10.0.0.1")
    clock.now += timedelta(seconds=1)
    assert svc.sign_in(name="ann", password=PASSWORD, client="10.0.0.1").user.name == "ann"


def test_a_stranger_s_failures_do_not_keep_the_owner_out(repo: SqlRepository,
                                                         clock: Clock) -> None:
    """Anyone who knew a name kept its owner signed out: 5 wrong passwords in 15 minutes from
    any address, and the right one got 429 (found in review)."""
    svc = users(repo, clock)
    svc.create(name="ann", password=PASSWORD)
    for i in range(POLICY.max_failures):
        with pytest.raises(AuthError):
            svc.sign_in(name="ann", password=f"guess number {i}", client="203.0.113.66")
    with pytest.raises(RateLimitedError):  # the stranger is held back
        svc.sign_in(name="ann", password="guess number 9", client="203.0.113.66")
    # The owner, from her own address, is not.
    assert svc.sign_in(name="ann", password=PASSWORD, client="198.51.100.7").user.name == "ann"


def test_failures_for_a_name_from_many_addresses_stop_at_its_ceiling(repo: SqlRepository,
                                                                     clock: Clock) -> None:
    svc = users(repo, clock)
    svc.create(name="ann", password=PASSWORD)
    for i in range(POLICY.max_failures_per_name):
        with pytest.raises(AuthError):  # each address below its own limits
            svc.sign_in(name="ann", password=f"guess number {i}", client=f"10.0.{i // 2}.1")
    # An address that failed for the name waits, even with the right password.
    with pytest.raises(RateLimitedError):
        svc.sign_in(name="ann", password=PASSWORD, client="10.0.0.1")
    # A new one gets one guess, then waits too.
    with pytest.raises(AuthError):
        svc.sign_in(name="ann", password="guess number 99", client="10.9.9.9")
    with pytest.raises(RateLimitedError):
        svc.sign_in(name="ann", password="guess number 100", client="10.9.9.9")
    clock.now += POLICY.window
    assert svc.sign_in(name="ann", password=PASSWORD, client="10.0.0.1").user.name == "ann"


def test_one_ipv6_allocation_past_the_name_s_ceiling_does_not_keep_the_owner_out(
        repo: SqlRepository, clock: Clock) -> None:
    """20 /64s of one home /56 x 5 wrong passwords reached the name's ceiling of 100 (default
    policy), and the owner's right password from her own IPv4 address got 429 for the whole
    window, again every 15 minutes (found in review)."""
    svc = UserService(repo=repo, hasher=FAST_HASHER,
                      policy=SignInPolicy(), clock=clock)
    svc.create(name="ann", password=PASSWORD)
    policy = SignInPolicy()
    refused = 0
    for net in range(policy.max_failures_per_name // policy.max_failures + 2):
        for i in range(policy.max_failures):  # 2001:db8:1:ab00::/56, one /64 after another
            try:
                svc.sign_in(name="ann", password=f"guess {net} {i}",
                            client=f"2001:db8:1:ab{net:02x}::{i + 1}")
            except AuthError:
                pass
            except RateLimitedError:
                refused += 1
    assert refused > 0  # the ceiling was reached: the allocation's own /64s wait
    # old code: RateLimitedError for the owner, from an address that never failed.
    assert svc.sign_in(name="ann", password=PASSWORD, client="198.51.100.7").user.name == "ann"


def _default_policy_users(repo: SqlRepository, clock: Clock) -> UserService:
    svc = UserService(repo=repo, hasher=FAST_HASHER,
                      policy=SignInPolicy(), clock=clock)
    svc.create(name="ann", password=PASSWORD)
    return svc


def test_past_the_name_s_ceiling_the_64s_of_one_48_get_no_guess_each(
        repo: SqlRepository, clock: Clock) -> None:
    """Past the ceiling every /64 that had not failed for the name got one password check, so
    one IPv6 /48 (65,536 /64s) got ~65,600 guesses a window against one account (review
    daydiff2: 600 /64s, 680 guesses). Now a network (/48, /24) that failed for the name waits
    with it: the ceiling's 100 guesses, and none for the /48's fresh /64s."""
    svc = _default_policy_users(repo, clock)
    checked = 0
    for net in range(60):  # 2001:db8:77::/48, one /64 after another
        for i in range(5):
            clock.now += timedelta(milliseconds=100)
            try:
                svc.sign_in(name="ann", password=f"guess {net} {i}",
                            client=f"2001:db8:77:{net:x}::{i + 1}")
            except AuthError:
                checked += 1
            except RateLimitedError:
                pass
        if net >= 20:  # past the ceiling: a fresh /64 of the /48 is refused at once
            with pytest.raises(RateLimitedError):
                svc.sign_in(name="ann", password=PASSWORD, client=f"2001:db8:77:{net + 1:x}::9")
    assert checked == SignInPolicy().max_failures_per_name  # old code: 140
    # Another network gets its one guess; the owner from her own address signs in.
    with pytest.raises(AuthError):
        svc.sign_in(name="ann", password="guess", client="2001:db8:78::1")
    assert svc.sign_in(name="ann", password=PASSWORD, client="198.51.100.7").user.name == "ann"


def test_the_owner_held_back_by_her_own_typo_is_told_when_it_leaves_the_window(
        repo: SqlRepository, clock: Clock) -> None:
    """One typo at 0:00 from her address, then a stranger keeps the name past its ceiling: her
    Retry-After is when her typo leaves the window (15:00), not the name's (review daydiff2: at
    14m30s she was told 420 s and signed in at 15m30s)."""
    svc = _default_policy_users(repo, clock)
    start, owner = clock.now, "198.51.100.7"
    with pytest.raises(AuthError):
        svc.sign_in(name="ann", password="typo", client=owner)
    net = 0
    for minute in range(15):
        clock.now = start + timedelta(minutes=minute, seconds=30)
        for _ in range(110 if minute == 0 else 12):  # past the ceiling, then more /64s
            net += 1
            with contextlib.suppress(AuthError, RateLimitedError):
                svc.sign_in(name="ann", password="x", client=f"2001:db8:{net:x}::1")
        with pytest.raises(RateLimitedError) as held:
            svc.sign_in(name="ann", password=PASSWORD, client=owner)
        assert held.value.retry_after == 15 * 60 - (minute * 60 + 30)  # old code: the name's wait
    clock.now = start + SignInPolicy().window
    assert svc.sign_in(name="ann", password=PASSWORD, client=owner).user.name == "ann"


def fail_until_the_client_limit(svc: UserService, *, clients: list[str], then: str) -> None:
    """A wrong name from each of ``clients`` in turn until the per-client limit, after which
    ann's right password from ``then`` is refused."""
    for i in range(POLICY.max_failures_per_client):
        with pytest.raises(AuthError):
            svc.sign_in(name=f"user{i}", password=PASSWORD, client=clients[i % len(clients)])
    with pytest.raises(RateLimitedError):
        svc.sign_in(name="ann", password=PASSWORD, client=then)


def test_one_client_trying_many_names_is_limited_too(repo: SqlRepository, clock: Clock) -> None:
    svc = users(repo, clock)
    svc.create(name="ann", password=PASSWORD)
    fail_until_the_client_limit(svc, clients=["10.6.6.6"], then="10.6.6.6")
    # Another client is not held back by it.
    assert svc.sign_in(name="ann", password=PASSWORD, client="10.0.0.1").user.name == "ann"


def test_an_ipv6_client_is_counted_by_its_64_and_a_mapped_ipv4_one_as_ipv4(
        repo: SqlRepository, clock: Clock) -> None:
    """One IPv6 client owns a /64: a new address for every attempt was never limited."""
    svc = users(repo, clock, signup=True)
    svc.create(name="ann", password=PASSWORD)
    fail_until_the_client_limit(
        svc, clients=[f"2001:db8:1:3::{i + 1:x}" for i in range(POLICY.max_failures_per_client)],
        then="2001:db8:1:3:ffff:aaaa:bbbb:cccc")
    # The next /64 is another client.
    assert svc.sign_in(name="ann", password=PASSWORD, client="2001:db8:1:4::1").user.name == "ann"
    fail_until_the_client_limit(svc, clients=["192.0.2.7"], then="::ffff:192.0.2.7")
    assert svc.sign_in(name="ann", password=PASSWORD, client="192.0.2.8").user.name == "ann"
    # Sign-up counts the same way.
    for i in range(POLICY.max_sign_ups_per_client):
        svc.sign_up(name=f"new{i}", password=PASSWORD, client=f"2001:db8:9:9::{i + 1:x}")
    with pytest.raises(RateLimitedError):
        svc.sign_up(name="late", password=PASSWORD, client="2001:db8:9:9:1::1")


class SlowHasher:
    """A fake hasher whose checks take a while, recording how many ran at once."""

    def __init__(self, *, seconds: float = 0.1) -> None:
        self.seconds = seconds
        self.running = 0
        self.most = 0
        self.checked = 0
        self._lock = threading.Lock()

    def hash(self, password: str) -> str:
        return "fake$" + password

    def verify(self, password_hash: str, password: str) -> bool:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
            self.checked += 1
        return password_hash == "fake$" + password

    def needs_rehash(self, password_hash: str) -> bool:
        return False


def test_password_checks_run_at_most_the_slots_at_once(repo: SqlRepository,
                                                         clock: Clock) -> None:
    """40 sign-ins at once ran 40 Argon2 hashes (64 MiB each) side by side: 0.77 -> 2.92 GB."""
    hasher = SlowHasher()
    svc = UserService(repo=repo, hasher=hasher, policy=POLICY, clock=clock,
                      hash_slots=threading.BoundedSemaphore(2), hash_wait=timedelta(seconds=30))
    for i in range(6):
        svc.create(name=f"user{i}", password=PASSWORD)

    def attempt(i: int) -> str:
        try:
            return svc.sign_in(name=f"user{i}", password=PASSWORD, client=f"10.0.1.{i}").user.name
        except AuthError as exc:
            return exc.code.value

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(attempt, range(6)))
    assert answers == [f"user{i}" for i in range(6)]  # every caller waited its turn
    assert hasher.checked == 6
    assert hasher.most == 2


def test_a_check_that_finds_no_slot_in_time_is_rate_limited_and_not_counted(
        repo: SqlRepository, clock: Clock) -> None:
    slots = threading.BoundedSemaphore(1)
    hasher = SlowHasher(seconds=0)
    svc = UserService(repo=repo, hasher=hasher, policy=POLICY, clock=clock, hash_slots=slots,
                      hash_wait=timedelta(seconds=0.05))
    svc.create(name="ann", password=PASSWORD)
    assert slots.acquire(timeout=1)  # another check holds the only slot
    for _ in range(POLICY.max_failures + 1):
        with pytest.raises(RateLimitedError) as caught:
            svc.sign_in(name="ann", password="a wrong guess", client="10.0.0.1")
        assert caught.value.retry_after >= 1
        assert "busy" in caught.value.message
    assert hasher.checked == 0
    slots.release()
    # None of them was a failure: the name is not held back.
    assert svc.sign_in(name="ann", password=PASSWORD, client="10.0.0.1").user.name == "ann"


def test_a_session_expires_and_is_forgotten(repo: SqlRepository, clock: Clock) -> None:
    svc = users(repo, clock)
    svc.create(name="ann", password=PASSWORD)
    signed = svc.sign_in(name="ann", password=PASSWORD, client="c")
    clock.now += POLICY.session_lifetime - timedelta(seconds=1)
    svc.session(token=signed.token)
    clock.now += timedelta(seconds=1)
    with pytest.raises(AuthError) as caught:
        svc.session(token=signed.token)
    assert caught.value.code is ErrorCode.SESSION_EXPIRED
    assert repo.get_session(signed.session.id) is None
    with pytest.raises(AuthError) as again:
        svc.session(token=signed.token)
    assert again.value.code is ErrorCode.UNAUTHORIZED


def test_sign_out_and_a_password_change_end_sessions(repo: SqlRepository, clock: Clock) -> None:
    svc = users(repo, clock)
    ann, _key = svc.create(name="ann", password=PASSWORD)
    first = svc.sign_in(name="ann", password=PASSWORD, client="c")
    second = svc.sign_in(name="ann", password=PASSWORD, client="c")
    svc.sign_out(token=first.token)
    with pytest.raises(AuthError):
        svc.session(token=first.token)
    svc.session(token=second.token)
    svc.set_password(user=ann, password="another good password")
    with pytest.raises(AuthError):
        svc.session(token=second.token)
    with pytest.raises(AuthError):
        svc.sign_in(name="ann", password=PASSWORD, client="c")
    assert svc.sign_in(name="ann", password="another good password", client="c")


@pytest.mark.parametrize(("password", "why"), [
    ("short", "at least 10"), ("x" * 257, "at most 256"), (" " * 12, "only spaces"),
    ("AnnAnnAnnAnn", "user name"),
])
def test_weak_passwords_are_refused_and_nothing_is_stored(
        repo: SqlRepository, clock: Clock, password: str, why: str) -> None:
    svc = users(repo, clock)
    with pytest.raises(InvalidInputError, match=why):
        svc.create(name="annannannann", password=password)
    assert repo.get_user_by_name("annannannann") is None


def test_sign_up_only_when_the_setting_opens_it(repo: SqlRepository, clock: Clock) -> None:
    with pytest.raises(ForbiddenError) as caught:
        users(repo, clock).sign_up(name="ann", password=PASSWORD, client="c")
    assert caught.value.code is ErrorCode.SIGNUP_CLOSED
    assert repo.get_user_by_name("ann") is None
    signed = users(repo, clock, signup=True).sign_up(name="ann", password=PASSWORD, client="c")
    assert users(repo, clock).session(token=signed.token)[0].name == "ann"


def test_sign_up_attempts_from_one_client_are_limited_whatever_they_end_in(
        repo: SqlRepository, clock: Clock) -> None:
    """One client made any number of accounts, and tried taken names any number of times (each
    answer said whether the name was taken): every attempt counts, made or refused."""
    svc = users(repo, clock, signup=True)
    svc.create(name="ann", password=PASSWORD)
    svc.sign_up(name="cat", password=PASSWORD, client="10.0.0.1")  # made
    clock.now += timedelta(minutes=1)
    with pytest.raises(ConflictError):
        svc.sign_up(name="ann", password=PASSWORD, client="10.0.0.1")  # a taken name
    clock.now += timedelta(minutes=1)
    with pytest.raises(InvalidInputError):
        svc.sign_up(name="dog", password="short", client="10.0.0.1")  # a weak password
    clock.now += timedelta(minutes=1)
    with pytest.raises(RateLimitedError) as caught:
        svc.sign_up(name="emu", password=PASSWORD, client="10.0.0.1")
    assert "too many sign-ups" in caught.value.message
    assert caught.value.retry_after == 12 * 60  # the first attempt leaves the window then
    assert repo.get_user_by_name("emu") is None
    with pytest.raises(RateLimitedError):  # nor does a taken name get its answer now
        svc.sign_up(name="ann", password=PASSWORD, client="10.0.0.1")
    # Another address is counted apart, and the first one may again once the window passed.
    svc.sign_up(name="fox", password=PASSWORD, client="10.0.0.2")
    clock.now += timedelta(minutes=12)
    svc.sign_up(name="emu", password=PASSWORD, client="10.0.0.1")
    # Sign-in's limits are its own: the sign-ups left nothing for them to count.
    svc.sign_in(name="ann", password=PASSWORD, client="10.0.0.1")


class CountingHasher(Argon2Hasher):
    """Argon2 at a test cost, counting the hashes it makes."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost_kib=1024)
        self.hashed = 0

    def hash(self, password: str) -> str:
        self.hashed += 1
        return super().hash(password)


def test_a_taken_name_is_refused_before_any_password_is_hashed(
        repo: SqlRepository, clock: Clock) -> None:
    """The hash (~0.2 s and 64 MiB at the default cost) ran before the name was looked up."""
    hasher = CountingHasher()
    svc = UserService(repo=repo, hasher=hasher, policy=POLICY, signup_enabled=True, clock=clock)
    svc.create(name="ann", password=PASSWORD)
    assert hasher.hashed == 1
    with pytest.raises(ConflictError) as caught:
        svc.sign_up(name="ann", password="another password", client="10.0.0.1")
    assert caught.value.code is ErrorCode.USER_EXISTS
    assert hasher.hashed == 1


def test_without_a_hasher_passwords_are_a_setup_error(repo: SqlRepository, clock: Clock) -> None:
    svc = UserService(repo=repo, clock=clock)
    svc.create(name="ann")  # API keys still work
    with pytest.raises(ConfigError, match="argon2"):
        svc.create(name="bob", password=PASSWORD)


def test_expired_sessions_and_old_failures_are_forgotten(repo: SqlRepository,
                                                         clock: Clock) -> None:
    svc = users(repo, clock)
    svc.create(name="ann", password=PASSWORD)
    svc.sign_in(name="ann", password=PASSWORD, client="c")
    with pytest.raises(AuthError):
        svc.sign_in(name="ann", password="not the password", client="c")
    assert svc.forget_expired() == 0
    clock.now += POLICY.session_lifetime
    # The session, the failure under the name from the client, the client, the name and the
    # name from the client's network.
    assert svc.forget_expired() == 5


def refuses(svc: UserService, key: str) -> bool:
    """``svc`` neither remembers ``key`` nor accepts it."""
    if svc.remembered(api_key=key) is not None:
        return False
    try:
        svc.authenticate(api_key=key)
    except AuthError:
        return True
    return False


def test_a_key_revoked_by_another_process_stops_working_within_the_cache_bound(
        repo: SqlRepository, clock: Clock) -> None:
    api = users(repo, clock)  # an API server
    cli = users(repo, clock)  # another process on the same database: the CLI, another server
    ann, key = api.create(name="ann")
    assert api.remembered(api_key=key) is None  # nothing remembered before a lookup
    assert api.authenticate(api_key=key) == ann
    assert api.remembered(api_key=key) == ann
    cli.revoke_key(user=ann, key_id=cli.keys(user=ann)[0].id)
    assert refuses(cli, key)  # the process that revoked it: at once
    clock.now += API_KEY_CACHE_TTL - timedelta(milliseconds=1)
    assert api.authenticate(api_key=key) == ann  # the other one: until its memory runs out
    clock.now += timedelta(milliseconds=1)
    assert refuses(api, key)


def test_a_key_revoked_here_stops_working_at_once_and_a_rotated_one_at_its_grace_s_end(
        repo: SqlRepository, clock: Clock) -> None:
    svc = users(repo, clock)
    ann, first = svc.create(name="ann")
    second_key, second = svc.create_key(user=ann, name="ci")
    assert svc.authenticate(api_key=first) == ann
    assert svc.authenticate(api_key=second) == ann
    svc.revoke_key(user=ann, key_id=svc.keys(user=ann)[0].id)
    assert refuses(svc, first)
    _rotated, third = svc.rotate_key(user=ann, key_id=second_key.id)
    assert svc.authenticate(api_key=second) == ann  # in the rotation's grace
    assert svc.authenticate(api_key=third) == ann
    clock.now += KEY_ROTATION_GRACE
    assert refuses(svc, second)
    assert svc.authenticate(api_key=third) == ann


def test_without_a_grace_a_rotated_key_stops_at_once(repo: SqlRepository, clock: Clock) -> None:
    svc = UserService(repo=repo, clock=clock, rotation_grace=timedelta(0))
    ann, first = svc.create(name="ann")
    assert svc.authenticate(api_key=first) == ann
    _new, second = svc.rotate_key(user=ann, key_id=svc.keys(user=ann)[0].id)
    assert refuses(svc, first)
    assert svc.authenticate(api_key=second) == ann


# Old code: the rotation revoked the old key in the transaction that made the new one, whose
# secret only the answer carried; a client that lost the answer (the server killed after the
# commit) held a revoked key: its retry, and every other call, answered 401.
def test_a_rotation_whose_answer_was_lost_is_asked_again_with_the_key_the_client_holds(
        repo: SqlRepository, clock: Clock) -> None:
    server = users(repo, clock)
    ann, held = server.create(name="ann")  # an API-only user: this key is all they have
    key_id = server.keys(user=ann)[0].id
    assert server.authenticate(api_key=held) == ann
    lost, _never_received = server.rotate_key(user=ann, key_id=key_id)  # committed, answer lost

    restarted = users(repo, clock)  # the server again, or another one
    clock.now += timedelta(minutes=5)
    assert restarted.authenticate(api_key=held) == ann  # the client's retry gets in
    new, secret = restarted.rotate_key(user=ann, key_id=key_id, api_key=held)
    assert restarted.authenticate(api_key=secret) == ann
    assert restarted.authenticate(api_key=held) == ann  # until the grace ends
    # The key the lost answer carried stops at once: one successor works, never two.
    keys = {k.id: k for k in restarted.keys(user=ann)}
    assert keys[lost.id].revoked_at == clock.now
    assert keys[key_id].replaced_by == new.id
    # Asking again did not lengthen the grace: it ends when the first rotation's did.
    assert keys[key_id].revoked_at == lost.created_at + KEY_ROTATION_GRACE
    clock.now = lost.created_at + KEY_ROTATION_GRACE
    assert refuses(restarted, held)
    assert restarted.authenticate(api_key=secret) == ann
    with pytest.raises(InvalidInputError, match="revoked"):
        restarted.rotate_key(user=ann, key_id=key_id)


def test_a_rotated_key_in_its_grace_is_revoked_at_once_and_its_successor_s_rotation_ends_retries(
        repo: SqlRepository, clock: Clock) -> None:
    svc = users(repo, clock)
    ann, first = svc.create(name="ann")
    first_id = svc.keys(user=ann)[0].id
    second_key, second = svc.rotate_key(user=ann, key_id=first_id)
    # The successor was received and rotated in turn: asking again for the first is no retry.
    svc.rotate_key(user=ann, key_id=second_key.id)
    with pytest.raises(InvalidInputError, match="rotated already"):
        svc.rotate_key(user=ann, key_id=first_id)
    assert svc.authenticate(api_key=first) == ann
    revoked = svc.revoke_key(user=ann, key_id=first_id)  # a leaked key: revoked, not rotated
    assert revoked.revoked_at == clock.now
    assert refuses(svc, first)
    assert svc.authenticate(api_key=second) == ann  # still in its own grace
    with pytest.raises(InvalidInputError, match="revoked"):
        svc.rotate_key(user=ann, key_id=first_id)


def test_a_revocation_during_a_lookup_is_not_remembered_as_valid(repo: SqlRepository,
                                                                 clock: Clock) -> None:
    svc = users(repo, clock)
    ann, key = svc.create(name="ann")
    key_id = svc.keys(user=ann)[0].id

    class RevokedMeanwhile:
        """The repository, where the key is revoked (through the same service) just after the
        lookup read it as valid."""

        def __getattr__(self, name: str) -> object:
            return getattr(repo, name)

        def get_user_by_key_hash(self, key_hash: str, *, at: datetime) -> object:
            found = repo.get_user_by_key_hash(key_hash, at=at)
            svc._repo = repo  # one revocation only
            svc.revoke_key(user=ann, key_id=key_id)
            return found

    svc._repo = RevokedMeanwhile()  # type: ignore[assignment]
    assert svc.authenticate(api_key=key) == ann  # read before the revocation committed
    assert refuses(svc, key)


def test_a_clock_that_goes_back_forgets_what_it_remembered(repo: SqlRepository,
                                                           clock: Clock) -> None:
    svc = users(repo, clock)
    ann, key = svc.create(name="ann")
    assert svc.authenticate(api_key=key) == ann
    clock.now -= timedelta(hours=1)
    assert svc.remembered(api_key=key) is None



class HookedHasher(Argon2Hasher):
    """Argon2 at a test cost that runs ``during_verify`` while a password is being checked:
    what another process does in the ~0.25 s of a real check, made deterministic."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost_kib=1024)
        self.during_verify: Callable[[], None] = lambda: None

    def verify(self, password_hash: str, password: str) -> bool:
        ok = super().verify(password_hash, password)
        self.during_verify()
        return ok


def test_a_sign_in_whose_check_a_disable_overtakes_leaves_no_session(
        repo: SqlRepository, clock: Clock) -> None:
    """The disabled check read the user from before the password check, and the session was
    stored after it whatever had happened meanwhile: a session of a disabled account (every
    page a 500), alive again after ``enable``."""
    hasher = HookedHasher()
    svc = UserService(repo=repo, hasher=hasher, policy=POLICY, clock=clock)
    ann, _key = svc.create(name="ann", password=PASSWORD)

    def disable() -> None:
        svc.disable(name="ann")  # the operator's `users disable`, committed mid-check

    hasher.during_verify = disable
    with pytest.raises(ForbiddenError, match="this account is disabled"):
        svc.sign_in(name="ann", password=PASSWORD, client="c")
    hasher.during_verify = lambda: None
    svc.enable(name="ann")
    # No session of hers was stored: nothing for a browser to come back with after enable.
    assert svc.forget_expired() == 0
    clock.now += POLICY.session_lifetime
    assert svc.forget_expired() == 0
    assert svc.sign_in(name="ann", password=PASSWORD, client="c").user.id == ann.id


def test_a_sign_in_whose_user_is_deleted_during_the_check_is_refused(
        repo: SqlRepository, clock: Clock) -> None:
    hasher = HookedHasher()
    svc = UserService(repo=repo, hasher=hasher, policy=POLICY, clock=clock)
    ann, _key = svc.create(name="ann", password=PASSWORD)

    def delete() -> None:  # the rows, then the user: what `users delete` does last
        repo.delete_user_data(ann.id, plan=ErasurePlan(), held=repo.user_holdings(ann.id))
        repo.delete_user(ann.id)

    hasher.during_verify = delete
    with pytest.raises(AuthError) as caught:
        svc.sign_in(name="ann", password=PASSWORD, client="c")
    assert str(caught.value) == WRONG_CREDENTIALS
