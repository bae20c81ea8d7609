"""Signed cookies: the session (its random token, signed so a forged cookie is refused before
any lookup) and the sign-in form's CSRF token (double submit: no session exists yet)."""

from __future__ import annotations

import secrets

from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_COOKIE = "sl_session"
FORM_COOKIE = "sl_form"


class CookieSigner:
    def __init__(self, secret: str, *, max_age_seconds: int) -> None:
        self._session = URLSafeTimedSerializer(secret, salt="selfie-lora/session")
        self._form = URLSafeTimedSerializer(secret, salt="selfie-lora/form")
        self.max_age_seconds = max_age_seconds

    def session_value(self, token: str) -> str:
        return self._session.dumps(token)

    def session_token(self, value: str | None) -> str | None:
        """The token in a session cookie, or None when it is missing, forged or too old (the
        session's own expiry, in the database, is the one that counts; this is a backstop)."""
        if not value:
            return None
        try:
            token = self._session.loads(value, max_age=self.max_age_seconds)
        except BadSignature:  # SignatureExpired is one too
            return None
        return token if isinstance(token, str) else None

    def new_form_token(self) -> tuple[str, str]:
        """A fresh (token, cookie value) pair for a form shown before signing in."""
        token = secrets.token_urlsafe(24)
        return token, self._form.dumps(token)

    def form_token(self, value: str | None) -> str | None:
        if not value:
            return None
        try:
            token = self._form.loads(value, max_age=3600)
        except BadSignature:
            return None
        return token if isinstance(token, str) else None
