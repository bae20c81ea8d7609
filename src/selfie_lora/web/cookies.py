"""Signed cookies: the session (its random token, signed so a forged cookie is refused before
any lookup) and the sign-in form's CSRF token (double submit: no session exists yet)."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_COOKIE = "sl_session"
FORM_COOKIE = "sl_form"
# How long a sign-in or sign-up form may stay open and still be sent.
FORM_MAX_AGE_SECONDS = 24 * 3600
# A notice for the next page this browser opens (the sign-in page's "your account was
# deleted"), shown once: a query string (/signin?deleted=1) said so to anyone sent the link.
NOTICE_COOKIE = "sl_notice"
NOTICE_MAX_AGE_SECONDS = 60
# What was typed in the Generate form when "Save the scale" was pressed (the prompt, seed and
# picture count), for the page it leads to, once, as a notice: in the address (?prompt=) it
# went into the access log and the browser's history.
TYPED_COOKIE = "sl_typed"
# Its signed value at most: a browser keeps a cookie of up to 4096 bytes, name and value
# together (RFC 6265), and drops a bigger one whole.
TYPED_MAX_CHARS = 3800

class CookieSigner:
    def __init__(self, secret: str, *, max_age_seconds: int) -> None:
        self._session = URLSafeTimedSerializer(secret, salt="selfie-lora/session")
        # The form cookie holds the browser's form nonce; each form shown holds its own signed,
        # dated copy (another salt: neither can stand for the other).
        self._form = URLSafeTimedSerializer(secret, salt="selfie-lora/form")
        self._form_page = URLSafeTimedSerializer(secret, salt="selfie-lora/form-page")
        self._notice = URLSafeTimedSerializer(secret, salt="selfie-lora/notice")
        self._typed = URLSafeTimedSerializer(secret, salt="selfie-lora/typed")
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

    def notice_value(self, notice: str) -> str:
        return self._notice.dumps(notice)

    def notice(self, value: str | None) -> str | None:
        """The notice in a notice cookie, or None when it is missing, forged or older than
        NOTICE_MAX_AGE_SECONDS (a redirect's next page comes at once)."""
        return _loads(self._notice, value, max_age=NOTICE_MAX_AGE_SECONDS)

    def typed_value(self, user_id: str, fields: Mapping[str, str]) -> str | None:
        """A typed cookie's value: ``fields`` for ``user_id`` alone; None when it is longer
        than TYPED_MAX_CHARS (a long prompt of non-Latin letters: about 1,300 of them)."""
        value = self._typed.dumps({"user": user_id, "fields": dict(fields)})
        return value if len(value) <= TYPED_MAX_CHARS else None

    def typed(self, value: str | None, *, user_id: str) -> dict[str, str] | None:
        """The fields of a typed cookie, or None when it is missing, forged, another user's
        (a sign-out and in at once) or older than NOTICE_MAX_AGE_SECONDS."""
        loaded = _loaded(self._typed, value, max_age=NOTICE_MAX_AGE_SECONDS)
        if not isinstance(loaded, dict) or loaded.get("user") != user_id:
            return None
        fields = loaded.get("fields")
        if not isinstance(fields, dict):
            return None
        return {str(k): v for k, v in fields.items() if isinstance(v, str)}

    def form_tokens(self, cookie_value: str | None) -> tuple[str, str]:
        """For a form shown before signing in: (its token, the form cookie's new value). The
        browser keeps its nonce while its cookie is valid, so every form shown to it within
        FORM_MAX_AGE_SECONDS can be sent, whichever was shown last: a new nonce per page made
        the sign-in of a second tab, or of a page left by Back, a 403."""
        nonce = _loads(self._form, cookie_value) or secrets.token_urlsafe(24)
        # Signed anew: the cookie lives a full window after the newest form.
        return self._form_page.dumps(nonce), self._form.dumps(nonce)

    def form_token_valid(self, cookie_value: str | None, token: str | None) -> bool:
        """A form's token is of this browser's nonce, and the form was shown within the
        window."""
        nonce = _loads(self._form, cookie_value)
        sent = _loads(self._form_page, token)
        return (nonce is not None and sent is not None
                and hmac.compare_digest(nonce.encode(), sent.encode()))


def _loads(serializer: URLSafeTimedSerializer, value: str | None, *,
           max_age: int = FORM_MAX_AGE_SECONDS) -> str | None:
    loaded = _loaded(serializer, value, max_age=max_age)
    return loaded if isinstance(loaded, str) else None


def _loaded(serializer: URLSafeTimedSerializer, value: str | None, *, max_age: int) -> Any:
    """What a cookie's ``value`` holds, or None: missing, forged, older than ``max_age``."""
    if not value:
        return None
    try:
        return serializer.loads(value, max_age=max_age)
    except BadSignature:  # SignatureExpired is one too
        return None
