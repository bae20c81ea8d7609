"""Users and their credentials: API keys (several per user, stored hashed, shown once, listed,
revoked and rotated), a password for the browser, and the browser's sessions.

Signing in answers the same for an unknown name and a wrong password (and spends the same
time: an unknown name is checked against a dummy hash). Failed attempts are stored, per name and
client address, per client address and per name, so every API server counts the same ones; too
many in the window make the next attempt wait (``domain.accounts``). Sign-up attempts are
stored the same way, every one of them, per client address. An IPv6 client is counted by its
/64 (``client_key``). Password hashes run at most ``HASH_SLOTS`` at once in a process
(``_Hashing``)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import threading
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from selfie_lora.domain.accounts import (
    # What the account of a deletion under way is told: a retried ``DELETE /api/me`` or sign-in
    # of one whose process died must not send its owner to the operator; the collection
    # finishes it.
    ERASURE_PENDING,
    WRONG_CREDENTIALS,
    SignInPolicy,
    fold_name,
    password_problem,
    session_expired,
    wait_before_next_attempt,
)
from selfie_lora.domain.entities import ApiKey, User, UserSummary, WebSession
from selfie_lora.domain.text import character_name, escaped
from selfie_lora.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    ErrorCode,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    RateLimitedError,
)
from selfie_lora.services.common import new_id, utcnow
from selfie_lora.services.ports import PasswordHasher, Repository

logger = logging.getLogger(__name__)

# Matched whole (fullmatch): "$" also matches before a final newline, which let "alice\n" be a
# second account beside "alice", and a key name end in a control character. A new name ends in a
# letter or digit, as it starts: "ann." and "ann-" were accounts beside "ann" that a reader
# could not tell from it (names made before keep working). Case is folded when names are
# compared (domain.accounts.fold_name): "Ann" is "ann".
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.@-]{0,98}[A-Za-z0-9])?")
_KEY_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,100}")
_KEY_NAME_RULE = "a key name is 1-100 printable characters, not only spaces"
# A key name is refused with any of these: controls (C0 and C1), surrogates, line and paragraph
# separators, and format characters (the bidi embeddings, overrides and isolates, which reorder
# the text after them: domain.text.BIDI_CONTROLS, refused in prompts too; zero-width spaces, the
# BOM), but for those scripts and emoji need: the
# zero-width joiner and non-joiner, and the left-to-right, right-to-left and Arabic letter marks,
# which pasted Hebrew or Arabic carries (a mark sets the direction of the characters beside it;
# unlike an override it reorders nothing after it).
_KEY_NAME_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_KEY_NAME_FORMAT_TAKEN = frozenset({"\u200c", "\u200d", "\u200e", "\u200f", "\u061c"})
# An emoji tag sequence (UTS #51 ED-14a, as the RGI flags of England, Scotland and Wales): the
# black flag, tag characters (format characters, so refused alone) and the cancel tag. Phones'
# emoji keyboards offer these flags.
_EMOJI_TAG_SEQUENCE = re.compile("\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f")
# Characters that draw nothing though Unicode calls them letters or symbols: with only these
# (and spaces, joiners, marks) a name looks empty. Those of them that Unicode lists as
# Default_Ignorable_Code_Point (DerivedCoreProperties.txt: the Hangul fillers) and others that
# fonts draw blank (the braille blank, the musical null notehead U+1D159); unicodedata has no
# property for either.
_BLANK_LOOKING = frozenset({"\u2800", "\u3164", "\u115f", "\u1160", "\uffa0", "\U0001d159"})
KEY_ALREADY_MADE = ("this key was already made; its secret was shown once — revoke it and make "
                    "another if you lost it")
PREFIX_LENGTH = 10  # "sl_" and 7 characters: enough to tell a user's keys apart
# How long this process trusts an API key it found valid without asking the database again.
# Why: that query, in its own trip through the thread pool, was a third of a cheap read's cost
# under load (bench/api_load.py). The price: a key revoked by another process (the CLI, another
# API server) keeps working here for at most this long; one revoked through this process stops
# at once.
API_KEY_CACHE_TTL = timedelta(seconds=1)
# What a disabled user's key, session or sign-in is told (a 403: who they are is known).
DISABLED = "this account is disabled: ask the service's operator"
# Enough for every client of a busy server; past it the cache starts over rather than grow.
API_KEY_CACHE_SIZE = 10_000
# How long a rotated key keeps working (SELFIE_LORA_KEY_ROTATION_GRACE_MINUTES). Why at all: the
# new secret exists only in the rotation's answer, so a client that lost it (a server killed
# after the commit, a proxy's or its own timeout) held only a revoked key and was locked out;
# within the grace it asks again with the key it holds. Why short: a rotated key that leaked
# keeps its powers until then (revoking is what stops a key at once).
KEY_ROTATION_GRACE = timedelta(minutes=10)
# How many password hashes (Argon2id: 64 MiB and a CPU's worth of work each) run at once in this
# process, and how long one waits for its turn before the attempt is refused as rate-limited.
# Why: without a bound, 40 sign-ins sent at once ran 40 hashes side by side (the server went from
# 0.77 to 2.92 GB, /readyz took 4 s); more at once than there are CPUs is no faster anyway.
HASH_SLOTS = max(1, os.cpu_count() or 1)
HASH_WAIT = timedelta(seconds=5)
# The prefix of a sign-in attempt's rows while its password is checked (``_reserve_attempt``);
# how long a check may take (the hashing wait, then Argon2) before its rows count as failures
# (its process died); and what an attempt refused only by attempts still being checked is told.
PENDING = "pending:"
PENDING_LEASE = timedelta(seconds=60)
PENDING_RETRY_AFTER_S = 5
_PROCESS_HASH_SLOTS = threading.BoundedSemaphore(HASH_SLOTS)


def hash_api_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 is enough: there is nothing to
    # brute-force, and a constant-cost lookup by hash keeps authentication one indexed query.
    return hashlib.sha256(key.encode()).hexdigest()


def _rate_limited(what: str, wait: timedelta) -> RateLimitedError:
    seconds = int(wait.total_seconds() + 0.999)
    minutes = max(1, (seconds + 59) // 60)
    return RateLimitedError(f"{what}: try again in {minutes} minute{'s' if minutes > 1 else ''}",
                            retry_after=seconds)


def client_key(client: str) -> str:
    """The form of a client address that the rate limits count: an IPv6 address by its /64 (one
    client owns at least that much, and a new address per attempt made the per-address limit
    never fire), an IPv4-mapped IPv6 address as its IPv4 address; anything else as it is."""
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])  # no zone (fe80::1%eth0)
    except ValueError:
        return client[:150]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


def wide_key(client: str) -> str:
    """The network around a client address that a stranger past a name's ceiling is counted by:
    an IPv6 /48 (a small customer's allocation: 65,536 /64s), an IPv4 /24; anything else as
    ``client_key`` has it."""
    address = client_key(client)
    try:
        network = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return address
    prefix = 48 if network.version == 6 else 24
    return str(network.supernet(new_prefix=prefix)) if network.prefixlen > prefix else str(network)


# How many (name, address) pairs the rate limit's WARNING is remembered for (per process).
_MAX_REFUSALS_REMEMBERED = 1000
# The most characters of a typed name or an address a log line shows.
_LOGGED_TEXT_MAX = 64


def _printable(text: str) -> str:
    """``text`` as a log line may show it: control and other unprintable characters escaped
    (a typed name cannot forge a line break nor a terminal escape), at most
    ``_LOGGED_TEXT_MAX`` characters (and ``...``)."""
    return escaped(text[:_LOGGED_TEXT_MAX]) + ("..." if len(text) > _LOGGED_TEXT_MAX else "")


# The key of the tags that stand for unknown sign-in names in this process's log: random and
# kept in memory only, so a tag cannot be looked up in a table of hashed passwords (a plain
# sha256 of "hunter2" is the same on every install), while the same name still gets the same
# tag within the process (a burst of attempts reads as one).
_NAME_TAG_KEY = secrets.token_bytes(32)


def _logged_name(name: str, user: User | None) -> str:
    """A typed sign-in name for the log: as typed when it is an account's (escaped, cut),
    otherwise only a keyed tag of it (``_NAME_TAG_KEY``), which repeats for the same name in
    this process: what is typed into the name field of a sign-in that names no account is
    often a password."""
    if user is not None:
        return f"user '{_printable(name)}'"
    tag = hmac.new(_NAME_TAG_KEY, fold_name(name).encode(), hashlib.sha256).hexdigest()[:12]
    return f"an unknown name (tag {tag})"


def hash_session_token(token: str) -> str:
    # Like API keys: a 256-bit random token needs no slow hash.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SignedIn:
    """A new browser session: ``token`` goes into the cookie (and is not stored)."""

    user: User
    session: WebSession
    token: str


class UserService:
    def __init__(
        self, *, repo: Repository, hasher: PasswordHasher | None = None,
        policy: SignInPolicy | None = None, signup_enabled: bool = False,
        clock: Callable[[], datetime] = utcnow,
        rotation_grace: timedelta = KEY_ROTATION_GRACE,
        hash_slots: threading.Semaphore | None = None, hash_wait: timedelta = HASH_WAIT,
    ) -> None:
        self._repo = repo
        self._rotation_grace = rotation_grace
        self._hasher = (_Hashing(hasher, slots=hash_slots or _PROCESS_HASH_SLOTS, wait=hash_wait)
                        if hasher is not None else None)
        self._policy = policy or SignInPolicy()
        self.signup_enabled = signup_enabled
        self._clock = clock
        self._dummy_hash: str | None = None
        self._keys = _KeyCache(clock=clock)
        # When a WARNING last said that a name from an address was refused by the rate limit:
        # once per window, not once per refused attempt (a brute force sends thousands).
        self._refusals_warned: dict[tuple[str, str], datetime] = {}
        self._refusals_lock = threading.Lock()

    def create(self, *, name: str, password: str | None = None) -> tuple[User, str]:
        """A new user and its first API key, which is not stored and cannot be shown again;
        with ``password``, the user can also sign in from a browser."""
        user, password_hash = self._new_user(name=name, password=password)
        key, secret = self._new_key(user, "default")
        self._store_user(user, password_hash=password_hash, key=key)
        return user, secret

    def _new_user(self, *, name: str, password: str | None) -> tuple[User, str | None]:
        """A user named ``name`` (not stored yet) and the hash of ``password``, once both are
        found acceptable."""
        if not _NAME.fullmatch(name):
            raise InvalidInputError(
                # "ASCII": 'zoë' was refused by a message that said letters were allowed.
                "a user name is 1-100 ASCII letters (a-z, A-Z), digits, '_', '.', '@' or '-', "
                "and starts and ends with a letter or digit", code=ErrorCode.INVALID_NAME)
        # The name before the password: a taken name is one cheap query, and hashing first cost
        # every such attempt a full Argon2 hash (its time and memory) for nothing.
        existing = self._repo.get_user_by_name(name)  # whatever its case
        if existing is not None:
            raise ConflictError(f"the user {existing.name!r} already exists"
                                + (" (names are the same whatever their case)"
                                   if existing.name != name else ""),
                                code=ErrorCode.USER_EXISTS)
        password_hash = self._password_hash(password, name=name) if password is not None else None
        return User(id=new_id(), name=name, created_at=self._clock()), password_hash

    def _store_user(self, user: User, *, password_hash: str | None, key: ApiKey | None) -> None:
        with self._repo.atomic() as tx:
            tx.add_user(user)
            if key is not None:
                tx.add_api_key(key)
            if password_hash is not None:
                tx.set_user_password(user.id, password_hash)

    # ------------------------------------------------------------------ passwords, sessions
    def set_password(self, *, user: User, password: str) -> None:
        """Set or change the user's password; every browser session of the user ends."""
        self.check_password_settable(user=user)
        password_hash = self._password_hash(password, name=user.name)
        with self._repo.atomic() as tx:
            tx.set_user_password(user.id, password_hash)
            tx.delete_sessions(user_id=user.id)
        logger.info("user %s: password set; sessions ended", user.name)

    def check_password_settable(self, *, user: User) -> None:
        """ConflictError when ``set_password`` would refuse the user (asked before a password is
        typed twice): one whose deletion is under way, whose every sign-in is refused (403
        'being deleted'), would get it for nothing."""
        _refuse_erasing(user, "its password cannot be set")

    def sign_up(self, *, name: str, password: str, client: str) -> SignedIn:
        """A new account from the sign-up page (when the setting allows it), signed in, with no
        API key (made on the Settings page)."""
        if not self.signup_enabled:
            raise ForbiddenError("sign-up is closed on this service: ask its operator for an "
                                 "account", code=ErrorCode.SIGNUP_CLOSED)
        self._reserve_sign_up(client=client)
        # No API key: ``create``'s first key has its secret in the answer only, and the sign-up
        # page shows none, so it was a working key nobody held, listed in Settings as one the
        # user never made. The user makes keys on the Settings page.
        user, password_hash = self._new_user(name=name, password=password)
        self._store_user(user, password_hash=password_hash, key=None)
        return self._open_session(user)

    def sign_in(self, *, name: str, password: str, client: str) -> SignedIn:
        """A session for ``name`` if ``password`` is its password. ``client`` is the address
        the attempt came from (counted for the rate limit, never stored with a success)."""
        hasher = self._require_hasher()
        try:
            reserved = self._reserve_attempt(name=name, client=client)
        except RateLimitedError as exc:
            self._log_refused(name=name, client=client, why=exc.message)
            raise
        user = self._repo.get_user_by_name(name) if len(name) <= 100 else None
        stored = self._repo.get_password_hash(user.id) if user is not None else None
        try:
            if stored is None or len(password) > 1024:
                # The same work as a real check, so the answer's timing tells nothing either.
                hasher.verify(self._dummy(), password[:1024])
                ok = False
            else:
                ok = hasher.verify(stored, password)
        except _HashingBusyError:
            # No password was checked: the attempt is not a failure (nor a guess).
            self._repo.delete_sign_in_failures(reserved.ids)
            raise
        if not ok or user is None:
            self._record_failure(reserved)
            logger.info("sign-in failed for %s from %s: %s", _logged_name(name, user),
                        _printable(client), "wrong password" if user else "no such user")
            raise AuthError(WRONG_CREDENTIALS, code=ErrorCode.WRONG_CREDENTIALS)
        self._repo.delete_sign_in_failures(reserved.ids)
        _refuse_disabled(user)  # after the password: the refusal tells no guesser the name
        if stored is not None and hasher.needs_rehash(stored):
            # When no hash slot is free, the old hash still works: upgraded at a later sign-in.
            with suppress(_HashingBusyError):
                self._repo.set_user_password(user.id, hasher.hash(password))
        logger.info("user %s signed in", user.name)
        return self._open_session(user)

    def session(self, *, token: str | None) -> tuple[User, WebSession]:
        """The user and session of a browser's token; ``AuthError`` when there is none or it
        has expired (an expired one is deleted)."""
        if not token:
            raise AuthError("sign in first")
        found = self._repo.get_session(hash_session_token(token))
        if found is None:
            raise AuthError("sign in first")
        if session_expired(found.expires_at, now=self._clock()):
            self._repo.delete_session(found.id)
            raise AuthError("your session has expired: sign in again",
                            code=ErrorCode.SESSION_EXPIRED)
        user = self._repo.get_user(found.user_id)
        if user is None:  # pragma: no cover - users are never deleted
            raise AuthError("sign in first")
        _refuse_disabled(user)
        return user, found

    def sign_out(self, *, token: str | None) -> None:
        """End the browser's session (nothing happens for an unknown token)."""
        if token:
            self._repo.delete_session(hash_session_token(token))

    def forget_expired(self) -> int:
        """Delete expired sessions, and failed sign-ins, sign-up attempts and pending rows older
        than the rate limit's window: exactly the rows no limit counts any more (the counts read
        rows newer than ``now - window``). Run by every garbage collection (wiring): without it
        they, client addresses and whatever was typed as a name, were kept forever."""
        now = self._clock()
        removed = self._repo.delete_sessions(expired_before=now)
        return removed + self._repo.prune_sign_in_failures(before=now - self._policy.window)

    def _open_session(self, user: User) -> SignedIn:
        """A session for ``user``, stored only if the user, read again and locked in the same
        transaction, still exists and is not disabled. Why: ``user`` was read before the
        password check (~0.25 s of Argon2); a ``users disable`` that committed meanwhile ended
        the sessions there were and then this one was stored: a live session of a disabled
        account, which came back with ``users enable``. Locked, the disable waits for this
        transaction (and ends the session stored) or this one sees it disabled."""
        token = secrets.token_urlsafe(32)
        with self._repo.atomic() as tx:
            current = tx.get_user(user.id, for_update=True)
            if current is None:  # deleted meanwhile (``users delete``): no such name now
                raise AuthError(WRONG_CREDENTIALS, code=ErrorCode.WRONG_CREDENTIALS)
            _refuse_disabled(current)
            now = self._clock()
            session = WebSession(id=hash_session_token(token), user_id=current.id,
                                 csrf_token=secrets.token_urlsafe(32), created_at=now,
                                 expires_at=now + self._policy.session_lifetime)
            tx.add_session(session)
        return SignedIn(user=current, session=session, token=token)

    def _reserve_attempt(self, *, name: str, client: str) -> _Reservation:
        """Count this attempt as a failure before its password is checked, in one transaction
        with the count that lets it go ahead (or ``RateLimitedError``): rows under its keys
        marked pending (``PENDING``), which a correct password (or a busy hasher) deletes and a
        wrong one turns into failures (``_record_failure``).

        Why before: the check is slow (Argon2), so when the failure was recorded after it, any
        number of attempts sent at once all found the count under the limit and were all checked.
        Why locked: two attempts must not both count the same rows and both add theirs (the
        keys' locks on PostgreSQL, the write transaction on SQLite). Why pending: an attempt
        refused only because others are still being checked is told to retry in a few seconds,
        not to wait out the window (two correct passwords sent at once, a double click, got
        "try again in 15 minutes" for the second). Anything that ends the attempt other than a
        correct password leaves it counted: pending, then a failure after ``PENDING_LEASE``."""
        keys = self._throttle_keys(name, client)
        with self._repo.atomic() as tx:
            tx.lock_sign_in_keys(keys)
            now = self._clock()
            self._throttle(tx, name=name, client=client, now=now)
            ids = tx.add_sign_in_failure([PENDING + key for key in keys], at=now)
            return _Reservation(keys=keys, ids=tuple(ids), at=now)

    def _log_refused(self, *, name: str, client: str, why: str) -> None:
        """The log line of an attempt the rate limit refused: WARNING for the first refusal of
        a name from an address in a window (a brute force or a lockout, for the operator to
        see), INFO for the others."""
        user = self._repo.get_user_by_name(name) if len(name) <= 100 else None
        key, now = (fold_name(name)[:150], client_key(client)), self._clock()
        with self._refusals_lock:
            last = self._refusals_warned.get(key)
            first = last is None or now - last >= self._policy.window
            if first:
                if len(self._refusals_warned) >= _MAX_REFUSALS_REMEMBERED:
                    # Bounded: forget the oldest (a new one warns again, which is harmless).
                    del self._refusals_warned[min(self._refusals_warned,
                                                  key=self._refusals_warned.__getitem__)]
                self._refusals_warned[key] = now
        logger.log(logging.WARNING if first else logging.INFO,
                   "sign-in refused for %s from %s by the rate limit: %s",
                   _logged_name(name, user), _printable(client), why)

    def _record_failure(self, reserved: _Reservation) -> None:
        """A wrong password: the attempt's pending rows become failures (at the attempt's time),
        under the keys' locks, so that a count never sees the attempt in neither or both."""
        with self._repo.atomic() as tx:
            tx.lock_sign_in_keys(reserved.keys)
            tx.delete_sign_in_failures(reserved.ids)
            tx.add_sign_in_failure(reserved.keys, at=reserved.at)

    def _reserve_sign_up(self, *, client: str) -> None:
        """Count this sign-up attempt under the client's address, in one transaction with the
        count that lets it go ahead (or ``RateLimitedError``), as ``_reserve_attempt`` does.

        Every attempt stays counted, an account made as much as a name taken or a password
        refused: each made account is a new one for the same client, and each refused one
        tells it whether a name is taken (the unlimited form was a way to list the users)."""
        key = f"signup:{client_key(client)}"
        with self._repo.atomic() as tx:
            tx.lock_sign_in_keys([key])
            now = self._clock()
            wait = wait_before_next_attempt(
                tx.sign_in_failures(key, since=now - self._policy.window),
                limit=self._policy.max_sign_ups_per_client, window=self._policy.window, now=now)
            if wait is not None:
                raise _rate_limited("too many sign-ups from your address", wait)
            tx.add_sign_in_failure([key], at=now)

    def _throttle(self, repo: Repository, *, name: str, client: str,
                  now: datetime | None = None) -> None:
        """``RateLimitedError`` when the attempt may not go ahead: until the window frees one
        when the failures reach a limit, a few seconds when it is reached only with attempts
        still being checked (which end as failures or not at all)."""
        now = now or self._clock()
        since = now - self._policy.window
        keys = self._throttle_keys(name, client)
        failed: dict[str, list[datetime]] = {}
        counted: dict[str, list[datetime]] = {}
        for key in keys:
            done = list(repo.sign_in_failures(key, since=since))
            checking = repo.sign_in_failures(PENDING + key, since=since)
            # A check longer than the lease ended with its process: a failure, as it was counted.
            failed[key] = done + [t for t in checking if now - t >= PENDING_LEASE]
            counted[key] = [*done, *checking]
        longest = self._longest_wait(failed, keys, now=now)
        if longest is not None:
            raise _rate_limited("too many failed sign-ins", longest)
        if self._longest_wait(counted, keys, now=now) is not None:
            raise RateLimitedError(
                "other sign-in attempts with this name or from your address are still being "
                f"checked: try again in {PENDING_RETRY_AFTER_S} seconds",
                retry_after=PENDING_RETRY_AFTER_S)

    def _longest_wait(self, failures: Mapping[str, Sequence[datetime]],
                      keys: tuple[str, str, str, str], *, now: datetime) -> timedelta | None:
        """How long an attempt counted under ``keys`` waits given ``failures`` (by key)."""
        pair_key, address_key, name_key, net_key = keys
        pair_failures = failures[pair_key]
        limits = [(pair_failures, self._policy.max_failures),
                  (failures[address_key], self._policy.max_failures_per_client)]
        waits = [wait_before_next_attempt(failures, limit=limit, window=self._policy.window,
                                          now=now)
                 for failures, limit in limits]
        # The name's ceiling holds back only addresses whose network (/48, /24) failed for it
        # already: counted for every address, anyone with one IPv6 /56 (20 /64s x 5 guesses)
        # kept the owner out from her own address; exempting every address that had not failed
        # itself gave a /48 65,536 guesses a window. A stranger past it gets one guess per new
        # network.
        net_failures = [*failures[net_key], *pair_failures]
        if net_failures:
            name_wait = wait_before_next_attempt(
                failures[name_key],
                limit=self._policy.max_failures_per_name, window=self._policy.window, now=now)
            if name_wait is not None:
                # Free once the name's failures thin out, or once this network's own newest
                # failure (her one typo) leaves the window, whichever comes first.
                own = max(net_failures) + self._policy.window - now
                waits.append(min(name_wait, max(own, timedelta(seconds=1))))
        return max((w for w in waits if w is not None), default=None)

    @staticmethod
    def _throttle_keys(name: str, client: str) -> tuple[str, str, str, str]:
        """The keys an attempt is counted under: the name from this client (hashed, so that a
        long name and address fit the key's 200 characters whole), the client, the name, the
        name from the client's network (``wide_key``)."""
        folded, address = fold_name(name)[:150], client_key(client)
        pair = hashlib.sha256(f"{folded}\x00{address}".encode()).hexdigest()
        net = hashlib.sha256(f"{folded}\x00{wide_key(client)}".encode()).hexdigest()
        return f"name-client:{pair}", f"client:{address}", f"name:{folded}", f"name-net:{net}"

    def _password_hash(self, password: str, *, name: str) -> str:
        problem = password_problem(password, name=name)
        if problem is not None:
            raise InvalidInputError(problem, code=ErrorCode.INVALID_PASSWORD)
        return self._require_hasher().hash(password)

    def _require_hasher(self) -> _Hashing:
        if self._hasher is None:
            raise ConfigError("passwords are not set up: install argon2-cffi "
                              "(pip install 'selfie-lora[all]')")
        return self._hasher

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._require_hasher().hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    def authenticate(self, *, api_key: str | None) -> User:
        """The user of ``api_key``; ``AuthError`` when it is missing, unknown or revoked. A key
        found valid is remembered for ``API_KEY_CACHE_TTL``."""
        if not api_key:
            raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
        key_hash = hash_api_key(api_key)
        remembered = self._keys.get(key_hash)
        if remembered is not None:
            return remembered
        epoch = self._keys.epoch
        user = self._repo.get_user_by_key_hash(key_hash, at=self._clock())
        if user is None:
            raise AuthError("the API key is not valid (or was revoked)")
        _refuse_disabled(user)
        self._keys.put(key_hash, user, epoch=epoch)
        return user

    def remembered(self, *, api_key: str | None) -> User | None:
        """The user of ``api_key`` if this process found it valid within ``API_KEY_CACHE_TTL``,
        else None. Never touches the database, so the API's door calls it on the event loop and
        goes to the thread pool (``authenticate``) only when it answers None."""
        return self._keys.get(hash_api_key(api_key)) if api_key else None

    def get_by_name(self, *, name: str) -> User:
        user = self._repo.get_user_by_name(name)
        if user is None:
            raise NotFoundError(f"no user named {name!r}; create one with 'selfie-lora users create'")
        return user

    def list_users(self) -> Sequence[UserSummary]:
        """Every user, oldest first, with how many of their keys work and whether they have a
        web password (``selfie-lora users list``)."""
        return self._repo.list_users(at=self._clock())

    def get(self, *, user_id: str) -> User:
        """The user whose id is ``user_id`` (a signed-in caller's own account: by its id, as
        two users an older release made can share a name in another case, ``get_by_name``)."""
        user = self._repo.get_user(user_id)
        if user is None:
            raise NotFoundError("no such user")
        return user

    def disable(self, *, name: str, for_erasure: bool = False) -> User:
        """The user can no longer sign in: their keys and browser sessions are refused (403)
        at once in this process and within ``API_KEY_CACHE_TTL`` in the others; their sessions
        end; their data, keys and password are kept for ``enable``. ``for_erasure`` (the
        deletion's step 2): also records, in the same transaction, that its deletion was asked
        for now, so that one whose process dies is finished by a later collection."""
        return self.disable_by_id(user_id=self.get_by_name(name=name).id,
                                  for_erasure=for_erasure)

    def disable_by_id(self, *, user_id: str, for_erasure: bool = False) -> User:
        """``disable`` of the user whose id is ``user_id``."""
        user = self.get(user_id=user_id)
        if not for_erasure:
            # Disabled already, and its data going, not kept: an operator hoping to stop the
            # deletion this way must not be told it worked.
            _refuse_erasing(user, "it is disabled already, and its data is not kept")
        now = self._clock()
        with self._repo.atomic() as tx:
            tx.set_user_disabled(user.id, at=user.disabled_at or now)
            if for_erasure:
                tx.request_erasure(user.id, at=now)
            tx.delete_sessions(user_id=user.id)
        self._keys.forget_all()
        logger.info("user %s disabled; sessions ended", user.name)
        return self.get(user_id=user.id)

    def enable(self, *, name: str) -> User:
        """A disabled user's keys and password work again (sessions ended by ``disable`` stay
        ended)."""
        user = self.get_by_name(name=name)
        # Its rows may be gone already, and the collection would delete it all the same.
        _refuse_erasing(user, "it cannot be enabled")
        self._repo.set_user_disabled(user.id, at=None)
        logger.info("user %s enabled", user.name)
        return self.get_by_name(name=name)

    # ------------------------------------------------------------------ keys
    def keys(self, *, user: User) -> Sequence[ApiKey]:
        """Every key of the user, oldest first, revoked ones included (``GET /api/keys``, ``users
        keys list``: a stable order for scripts, each key saying whether it works)."""
        return self._repo.list_api_keys(user.id)

    def keys_by_state(self, *, user: User, now: datetime
                      ) -> tuple[list[ApiKey], list[ApiKey]]:
        """The Settings page's: the keys working at ``now``, newest first, and the others, the
        most recently stopped first. Oldest first, a user who rotates keys found the key just
        made below every revoked one ever made."""
        keys = sorted(self._repo.list_api_keys(user.id), key=lambda k: (k.created_at, k.id),
                      reverse=True)
        stopped = sorted((k for k in keys if not k.works_at(now)),
                         key=lambda k: (k.revoked_at or k.created_at, k.id), reverse=True)
        return [k for k in keys if k.works_at(now)], stopped

    def create_key(self, *, user: User, name: str = "api",
                   form_nonce: str | None = None) -> tuple[ApiKey, str]:
        """A new key (its secret is shown this once).

        ``form_nonce``: the one-time nonce of the form that asked (the settings page), stored
        as its SHA-256 with the key. The same form sent again (a reload or Back of the page that
        showed the secret) makes no other key: ConflictError ``key_already_made``."""
        # Not blank, and nothing that hides or reorders text (checked here, not in _new_key: a
        # rotation keeps an older key's name, whatever it is): such a key showed a blank name,
        # and "Revoke the key    ?", or an RLO reversed the rest of that sentence.
        refused = _key_name_refusal(name)
        if refused is not None:
            raise InvalidInputError(refused, code=ErrorCode.INVALID_NAME)
        _refuse_erasing(user, _NO_KEY)
        key, secret = self._new_key(user, name)
        if form_nonce is not None:
            key = replace(key, form_nonce_hash=hashlib.sha256(form_nonce.encode()).hexdigest())
        try:
            self._repo.add_api_key(key)
        except ConflictError:
            # The form sent again, later or at once: the nonce's unique index let one key in.
            if key.form_nonce_hash is not None and self._made_by_form(user, key.form_nonce_hash):
                raise ConflictError(KEY_ALREADY_MADE, code=ErrorCode.KEY_ALREADY_MADE) from None
            raise
        logger.info("user %s: API key %s (%s) created", user.name, key.id, key.prefix)
        return key, secret

    def revoke_key(self, *, user: User, key_id: str) -> ApiKey:
        """Revoke one of the user's keys: it stops working at once in this process, and within
        ``API_KEY_CACHE_TTL`` in the others (API servers that used it a moment ago); a rotated
        key still in its grace too. Revoking a revoked key changes nothing."""
        key = self._own_key(user, key_id)
        self._repo.revoke_api_key(key.id, at=self._clock())
        self._keys.forget(key.key_hash)
        logger.info("user %s: API key %s (%s) revoked", user.name, key.id, key.prefix)
        return self._own_key(user, key_id)

    def rotate_key(self, *, user: User, key_id: str,
                   api_key: str | None = None) -> tuple[ApiKey, str]:
        """A new key with the same name; the old one keeps working for the rotation's grace
        (``rotation_grace``, then it stops; none: at once), so that a client that lost this
        answer can ask again with the key it holds.

        Asked again within the grace with that key itself (``api_key``: the key the request
        was authenticated with; None: none, the CLI), it answers another new key and revokes at
        once the one the first answer carried (its secret was lost with the answer, or the
        caller would not ask): one working successor, never more, and the grace ends when the
        first rotation's did (asking again never lengthens it). Asked by anyone else (another
        key of the user, the operator), it is refused: that caller did not lose the answer, and
        the successor may be in use."""
        _refuse_erasing(user, _NO_KEY)
        now = self._clock()
        lost: ApiKey | None = None
        with self._repo.atomic() as tx:
            # Locked: two rotations of one key must not both find it unrotated.
            old = tx.get_api_key(key_id, for_update=True)
            if old is None or old.user_id != user.id:
                raise NotFoundError("no such API key")
            if old.revoked_at is None:
                stops_at = now + self._rotation_grace
            elif (old.replaced_by is not None and old.revoked_at is not None
                  and old.revoked_at > now):  # in its grace: this is asked again
                lost = tx.get_api_key(old.replaced_by, for_update=True)
                if lost is None or lost.revoked_at is not None:
                    # That key was delivered: it was rotated or revoked since, with itself.
                    raise InvalidInputError(
                        "that key was rotated already, and the key that replaced it has been "
                        "rotated or revoked since: create a new key instead",
                        code=ErrorCode.INVALID_INPUT)
                if api_key is None or hash_api_key(api_key) != old.key_hash:
                    # Not the client that lost the answer: the successor may be in use.
                    until = old.revoked_at.astimezone(UTC)
                    raise InvalidInputError(
                        f"that key was rotated already, to key {lost.id}, and works until "
                        f"{until:%Y-%m-%d %H:%M} UTC: rotate or revoke that key instead (only a "
                        "request made with the rotated key itself asks for it again, for a "
                        "client that lost the rotation's answer)",
                        details=[{"replaced_by": lost.id,
                                  "works_until": old.revoked_at.isoformat()}],
                        code=ErrorCode.INVALID_INPUT)
                stops_at = old.revoked_at
            else:
                raise InvalidInputError("that key is revoked: create a new one instead",
                                        code=ErrorCode.INVALID_INPUT)
            key, secret = self._new_key(user, old.name)
            tx.add_api_key(key)
            if lost is not None:
                tx.revoke_api_key(lost.id, at=now)
            tx.replace_api_key(old.id, by=key.id, stops_at=stops_at)
        if lost is not None:
            self._keys.forget(lost.key_hash)
            logger.info("user %s: API key %s rotated again (the key %s it was rotated to "
                        "revoked); %s works until %s", user.name, old.id, lost.id, key.id,
                        stops_at.isoformat())
        else:
            logger.info("user %s: API key %s rotated to %s; it works until %s", user.name,
                        old.id, key.id, stops_at.isoformat())
        if stops_at <= now:
            self._keys.forget(old.key_hash)
        return key, secret

    def _own_key(self, user: User, key_id: str) -> ApiKey:
        for key in self._repo.list_api_keys(user.id):
            if key.id == key_id:
                return key
        raise NotFoundError("no such API key")

    def _made_by_form(self, user: User, nonce_hash: str) -> bool:
        return any(key.form_nonce_hash == nonce_hash
                   for key in self._repo.list_api_keys(user.id))

    def _new_key(self, user: User, name: str) -> tuple[ApiKey, str]:
        if not _KEY_NAME.fullmatch(name):
            raise InvalidInputError(_KEY_NAME_RULE, code=ErrorCode.INVALID_NAME)
        secret = "sl_" + secrets.token_urlsafe(32)
        return ApiKey(id=new_id(), user_id=user.id, name=name, key_hash=hash_api_key(secret),
                      prefix=secret[:PREFIX_LENGTH], created_at=self._clock()), secret


@dataclass(frozen=True)
class _Reservation:
    """A sign-in attempt counted before its check: its keys, its pending rows, its time."""

    keys: tuple[str, str, str, str]
    ids: tuple[int, ...]
    at: datetime


class _HashingBusyError(RateLimitedError):
    pass


class _Hashing:
    """The password hasher, run at most as many at once as ``slots`` allows (the process's
    semaphore: every service of the process shares it). A call that finds no slot within
    ``wait`` is refused as rate-limited (a 429 with Retry-After), its password unchecked."""

    def __init__(self, hasher: PasswordHasher, *, slots: threading.Semaphore,
                 wait: timedelta) -> None:
        self._hasher = hasher
        self._slots = slots
        self._wait = wait

    def hash(self, password: str) -> str:
        with self._slot():
            return self._hasher.hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        with self._slot():
            return self._hasher.verify(password_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        return self._hasher.needs_rehash(password_hash)  # reads the hash's parameters: cheap

    @contextmanager
    def _slot(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self._wait.total_seconds()):
            seconds = max(1, int(self._wait.total_seconds()))
            raise _HashingBusyError(
                f"the server is busy checking other passwords: try again in {seconds} seconds",
                retry_after=seconds)
        try:
            yield
        finally:
            self._slots.release()


# A key every request refuses (403 'being deleted'), shown once as if it worked.
_NO_KEY = "no API key can be made for it"


def _refuse_erasing(user: User, refusal: str) -> None:
    """ConflictError when the user's deletion is under way (``erasure_requested_at``): what
    an operator or the user asks for now would be undone by it, or never work."""
    if user.erasure_requested_at is not None:
        raise ConflictError(f"{user.name} is being deleted: {refusal} (the deletion finishes "
                            f"on its own, or with 'selfie-lora users delete {user.name}')")


def _refuse_disabled(user: User) -> None:
    if user.erasure_requested_at is not None:
        raise ForbiddenError(ERASURE_PENDING)
    if user.disabled_at is not None:
        raise ForbiddenError(DISABLED)


class _KeyCache:
    """API keys found valid (by hash) and when they were found, for ``API_KEY_CACHE_TTL``.

    A revocation through this process forgets the key and moves ``epoch`` on, so that a lookup
    that began before it (and may have read the key as still valid) cannot put it back."""

    def __init__(self, *, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._found: dict[str, tuple[User, datetime]] = {}
        self.epoch = 0

    def get(self, key_hash: str) -> User | None:
        entry = self._found.get(key_hash)
        if entry is None:
            return None
        user, found_at = entry
        # A clock that went back makes the entry as stale as one that ran out.
        if not found_at <= self._clock() < found_at + API_KEY_CACHE_TTL:
            return None
        return user

    def put(self, key_hash: str, user: User, *, epoch: int) -> None:
        with self._lock:
            if epoch != self.epoch:
                return
            if len(self._found) >= API_KEY_CACHE_SIZE:
                self._found.clear()
            self._found[key_hash] = (user, self._clock())

    def forget(self, key_hash: str) -> None:
        with self._lock:
            self.epoch += 1
            self._found.pop(key_hash, None)

    def forget_all(self) -> None:
        with self._lock:
            self.epoch += 1
            self._found.clear()


def _key_name_refusal(name: str) -> str | None:
    """Why a new key's name is refused (None: taken): it must show at least one visible
    character and nothing that hides or reorders text. The refusal names the character at
    fault: it is invisible, or looks printable, in the name the user typed."""
    for ch in _EMOJI_TAG_SEQUENCE.sub("\U0001f3f4", name):
        category = unicodedata.category(ch)
        if category in _KEY_NAME_REFUSED_CATEGORIES or (
                category == "Cf" and ch not in _KEY_NAME_FORMAT_TAKEN):
            return f"{_KEY_NAME_RULE}: {character_name(ch)} is not taken"
    if not any(unicodedata.category(ch)[0] not in "ZCM" and ch not in _BLANK_LOOKING
               for ch in name):
        return _KEY_NAME_RULE
    return None
