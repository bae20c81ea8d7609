"""Users and their API keys: several per user, stored hashed, shown once, listed, revoked and
rotated."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Sequence

from selfie_lora.domain.entities import ApiKey, User
from selfie_lora.errors import AuthError, ConflictError, ErrorCode, InvalidInputError, NotFoundError
from selfie_lora.services.common import new_id, utcnow
from selfie_lora.services.ports import Repository

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
_KEY_NAME = re.compile(r"^[^\x00-\x1f]{1,100}$")
PREFIX_LENGTH = 10  # "sl_" and 7 characters: enough to tell a user's keys apart


def hash_api_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 is enough: there is nothing to
    # brute-force, and a constant-cost lookup by hash keeps authentication one indexed query.
    return hashlib.sha256(key.encode()).hexdigest()


class UserService:
    def __init__(self, *, repo: Repository) -> None:
        self._repo = repo

    def create(self, *, name: str) -> tuple[User, str]:
        """A new user and its first API key, which is not stored and cannot be shown again."""
        if not _NAME.match(name):
            raise InvalidInputError(
                "a user name is 1-100 letters, digits, '_', '.', '@' or '-'",
                code=ErrorCode.INVALID_NAME)
        if self._repo.get_user_by_name(name) is not None:
            raise ConflictError(f"the user {name!r} already exists", code=ErrorCode.USER_EXISTS)
        user = User(id=new_id(), name=name, created_at=utcnow())
        key, secret = self._new_key(user, "default")
        with self._repo.atomic() as tx:
            tx.add_user(user)
            tx.add_api_key(key)
        return user, secret

    def authenticate(self, *, api_key: str | None) -> User:
        if not api_key:
            raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
        user = self._repo.get_user_by_key_hash(hash_api_key(api_key))
        if user is None:
            raise AuthError("the API key is not valid (or was revoked)")
        return user

    def get_by_name(self, *, name: str) -> User:
        user = self._repo.get_user_by_name(name)
        if user is None:
            raise NotFoundError(f"no user named {name!r}; create one with 'selfie-lora users create'")
        return user

    # ------------------------------------------------------------------ keys
    def keys(self, *, user: User) -> Sequence[ApiKey]:
        """Every key of the user, oldest first, revoked ones included."""
        return self._repo.list_api_keys(user.id)

    def create_key(self, *, user: User, name: str = "api") -> tuple[ApiKey, str]:
        """A new key (its secret is shown this once)."""
        key, secret = self._new_key(user, name)
        self._repo.add_api_key(key)
        logger.info("user %s: API key %s (%s) created", user.name, key.id, key.prefix)
        return key, secret

    def revoke_key(self, *, user: User, key_id: str) -> ApiKey:
        """Revoke one of the user's keys: it stops working at once. Revoking a revoked key
        changes nothing."""
        key = self._own_key(user, key_id)
        self._repo.revoke_api_key(key.id, at=utcnow())
        logger.info("user %s: API key %s (%s) revoked", user.name, key.id, key.prefix)
        return self._own_key(user, key_id)

    def rotate_key(self, *, user: User, key_id: str) -> tuple[ApiKey, str]:
        """A new key with the same name, and the old one revoked, in one transaction."""
        old = self._own_key(user, key_id)
        if not old.active:
            raise InvalidInputError("that key is revoked: create a new one instead",
                                    code=ErrorCode.INVALID_INPUT)
        key, secret = self._new_key(user, old.name)
        with self._repo.atomic() as tx:
            tx.add_api_key(key)
            tx.revoke_api_key(old.id, at=key.created_at)
        logger.info("user %s: API key %s rotated to %s", user.name, old.id, key.id)
        return key, secret

    def _own_key(self, user: User, key_id: str) -> ApiKey:
        for key in self._repo.list_api_keys(user.id):
            if key.id == key_id:
                return key
        raise NotFoundError("no such API key")

    @staticmethod
    def _new_key(user: User, name: str) -> tuple[ApiKey, str]:
        if not _KEY_NAME.match(name):
            raise InvalidInputError("a key name is 1-100 printable characters",
                                    code=ErrorCode.INVALID_NAME)
        secret = "sl_" + secrets.token_urlsafe(32)
        return ApiKey(id=new_id(), user_id=user.id, name=name, key_hash=hash_api_key(secret),
                      prefix=secret[:PREFIX_LENGTH], created_at=utcnow()), secret
