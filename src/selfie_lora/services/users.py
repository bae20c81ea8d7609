"""Users and their API keys (stored hashed; shown once)."""

from __future__ import annotations

import hashlib
import re
import secrets

from selfie_lora.domain.entities import User
from selfie_lora.errors import AuthError, ConflictError, ErrorCode, InvalidInputError, NotFoundError
from selfie_lora.services.common import new_id, utcnow
from selfie_lora.services.ports import Repository

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")


def hash_api_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 is enough: there is nothing to
    # brute-force, and a constant-cost lookup by hash keeps authentication one indexed query.
    return hashlib.sha256(key.encode()).hexdigest()


class UserService:
    def __init__(self, *, repo: Repository) -> None:
        self._repo = repo

    def create(self, *, name: str) -> tuple[User, str]:
        """A new user and its API key, which is not stored and cannot be shown again."""
        if not _NAME.match(name):
            raise InvalidInputError(
                "a user name is 1-100 letters, digits, '_', '.', '@' or '-'", code=ErrorCode.INVALID_NAME
            )
        if self._repo.get_user_by_name(name) is not None:
            raise ConflictError(f"the user {name!r} already exists", code=ErrorCode.USER_EXISTS)
        key = "sl_" + secrets.token_urlsafe(32)
        user = User(id=new_id(), name=name, api_key_hash=hash_api_key(key), created_at=utcnow())
        self._repo.add_user(user)
        return user, key

    def authenticate(self, *, api_key: str | None) -> User:
        if not api_key:
            raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
        user = self._repo.get_user_by_key_hash(hash_api_key(api_key))
        if user is None:
            raise AuthError("the API key is not valid")
        return user

    def get_by_name(self, *, name: str) -> User:
        user = self._repo.get_user_by_name(name)
        if user is None:
            raise NotFoundError(f"no user named {name!r}; create one with 'selfie-lora users create'")
        return user
