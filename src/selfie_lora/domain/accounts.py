"""Rules for signing in with a password: what a password must be, how long a session lasts,
and when too many failed attempts make the next one wait. Pure: the service brings the clock,
the stored attempts and the hashing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from selfie_lora.errors import ConflictError, ForbiddenError

MIN_PASSWORD_LENGTH = 10
# Argon2 hashes whatever it is given, but a megabyte "password" is a way to make the server
# spend memory and time: refuse it before hashing.
MAX_PASSWORD_LENGTH = 256

# One answer for every failed sign-in, so that it never tells whether the name exists.
WRONG_CREDENTIALS = "wrong name or password"
# What the account of a deletion under way is told: a retried ``DELETE /api/me`` or sign-in of
# the account, and an upload of it still running when the deletion began, whose photos would
# outlive it (``AccountErasingError``).
ERASURE_PENDING = ("this account is being deleted: the deletion finishes on its own, nothing "
                   "more to do")


class AccountErasingError(ForbiddenError):
    """A row for a user whose deletion was asked for (or who is gone): refused where it is
    written, the user's row share-locked (a photo set, an upload's claim, a model). Stored
    after the deletion took the user's rows, it outlived the deletion and made the removal of
    the user's row fail on its foreign key."""

    def __init__(self) -> None:
        super().__init__(ERASURE_PENDING)


class HoldingsChangedError(ConflictError):
    """``delete_user_data`` would have deleted a row the plan was not made from (a generation
    or a photo set saved since the holdings were read): it deleted nothing, and the plan is
    made again from the rows as they are now."""


@dataclass(frozen=True)
class SignInPolicy:
    """``max_failures`` failed attempts per ``window`` for one name from one client address,
    ``max_failures_per_client`` from one client address whatever the names, and
    ``max_failures_per_name`` for one name from all addresses together, after which sign-in
    waits until the oldest failure leaves the window (the name's ceiling only for an address
    with a failure of its own for that name). ``max_sign_ups_per_client`` sign-up
    attempts (whatever their outcome) from one client address per ``window``, after which sign-up
    waits the same way. A session lasts ``session_lifetime`` from sign-in.

    Why a name's small limit is per address: counted from every address, anyone who knew a name
    kept its owner signed out with 5 wrong passwords every 15 minutes (the right password got
    429 too). The ceiling across addresses is there against guessing spread over many addresses:
    past it, each address that failed for the name waits, and a new one gets a single guess. It
    never holds back an address with a clean record for the name, since one IPv6 /56 holds
    enough /64s to reach it."""

    max_failures: int = 5
    max_failures_per_client: int = 20
    max_failures_per_name: int = 100
    max_sign_ups_per_client: int = 5
    window: timedelta = timedelta(minutes=15)
    session_lifetime: timedelta = timedelta(days=14)

    def __post_init__(self) -> None:
        if min(self.max_failures, self.max_failures_per_client, self.max_failures_per_name,
               self.max_sign_ups_per_client) < 1:
            raise ValueError("at least one attempt must be allowed")
        if self.window <= timedelta(0) or self.session_lifetime <= timedelta(0):
            raise ValueError("the window and the session lifetime must be positive")


def fold_name(name: str) -> str:
    """The form of a user name that is unique: names that differ only in case are one name."""
    return name.casefold()


def password_problem(password: str, *, name: str) -> str | None:
    """Why ``password`` cannot be used by user ``name``, or None when it can."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"a password needs at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"a password has at most {MAX_PASSWORD_LENGTH} characters"
    if password.strip() == "":
        return "a password cannot be only spaces"
    if password.casefold() == name.casefold():
        return "a password cannot be the user name"
    return None


def wait_before_next_attempt(failures: Sequence[datetime], *, limit: int, window: timedelta,
                             now: datetime) -> timedelta | None:
    """How long the next attempt must wait, given the times of earlier failures (any order), or
    None when it may go ahead: with ``limit`` failures inside the window it waits until the
    oldest of the newest ``limit`` leaves the window."""
    recent = sorted(t for t in failures if now - t < window)
    if len(recent) < limit:
        return None
    oldest_counted = recent[-limit]
    return max(oldest_counted + window - now, timedelta(seconds=1))


def session_expired(expires_at: datetime, *, now: datetime) -> bool:
    return now >= expires_at


@dataclass(frozen=True)
class UserHoldings:
    """What rows a user owns, as ``users delete`` needs them: the ids their blobs are keyed by
    (``services.layout``) and the content-addressed blobs they name."""

    model_id: str | None = None
    dataset_ids: tuple[str, ...] = ()
    photo_hashes: tuple[str, ...] = ()
    training_ids: tuple[str, ...] = ()
    active_training_ids: tuple[str, ...] = ()  # queued, starting or processing
    version_ids: tuple[str, ...] = ()
    weights_keys: tuple[str, ...] = ()
    generation_ids: tuple[str, ...] = ()
    image_keys: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.model_id or self.dataset_ids or self.training_ids
                    or self.generation_ids)

    def covers(self, other: UserHoldings) -> bool:
        """Whether every row ``other`` names, and every blob key it names, is one of these:
        a plan made from these holdings deletes every blob of ``other``'s rows."""
        return ((other.model_id is None or other.model_id == self.model_id)
                and all(set(getattr(other, name)) <= set(getattr(self, name))
                        for name in ("dataset_ids", "photo_hashes", "training_ids",
                                     "version_ids", "weights_keys", "generation_ids",
                                     "image_keys")))


@dataclass(frozen=True)
class ErasurePlan:
    """What ``users delete`` deletes in storage for a user whose rows it deletes: blob keys,
    prefixes (every blob under each) and training work folders. Stored with the deletion of the
    rows, which are what it was computed from: a run killed after that finds it again."""

    keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    work_folders: tuple[str, ...] = ()

    def as_json(self) -> dict[str, list[str]]:
        """The plan as stored (``users.erasure_plan``): a list per field, named as the field."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, stored: Mapping[str, Sequence[str]]) -> ErasurePlan:
        """The plan ``as_json`` stored; a field missing from it is empty."""
        return cls(**{f.name: tuple(stored.get(f.name, ())) for f in fields(cls)})

    def merged(self, other: ErasurePlan | None) -> ErasurePlan:
        """Both plans' keys, prefixes and folders, each once, sorted."""
        if other is None:
            return self
        return ErasurePlan(keys=tuple(sorted({*self.keys, *other.keys})),
                           prefixes=tuple(sorted({*self.prefixes, *other.prefixes})),
                           work_folders=tuple(sorted({*self.work_folders,
                                                      *other.work_folders})))
