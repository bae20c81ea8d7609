"""Passwords hashed with Argon2id (argon2-cffi, RFC 9106's recommended second profile by
default): memory-hard, salted, and the hash carries its own parameters, so a later change of cost
still verifies old hashes and ``needs_rehash`` says when to upgrade them."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


class Argon2Hasher:
    def __init__(self, *, time_cost: int | None = None, memory_cost_kib: int | None = None) -> None:
        # Tests pass a low cost; the defaults are argon2-cffi's (RFC 9106 low-memory profile).
        default = PasswordHasher()
        self._hasher = PasswordHasher(
            time_cost=time_cost if time_cost is not None else default.time_cost,
            memory_cost=memory_cost_kib if memory_cost_kib is not None else default.memory_cost,
        )

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True
