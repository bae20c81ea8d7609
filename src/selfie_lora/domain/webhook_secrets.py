"""What a webhook signing secret looks like (Standard Webhooks, as Replicate gives it).

``standardwebhooks`` strips an optional ``whsec_`` and decodes the rest as base64 leniently:
characters outside the alphabet are dropped, so ``my-secret-string`` or a secret pasted with a
space in it were taken, as another key, and every delivery then failed its signature (a 401
only Replicate's retry log showed). The rule here is the format itself, checked when the settings
are read, so such a value stops the process instead. The same rule holds for the secret alerts
are signed with (``SELFIE_LORA_ALERT_SECRET``): a receiver's package decodes it as leniently.
"""

from __future__ import annotations

import base64
import binascii
import re

WEBHOOK_SECRET_PREFIX = "whsec_"
# The Standard Webhooks specification asks for 24 to 64 random bytes; Replicate's hold 32.
MIN_WEBHOOK_SECRET_BYTES = 24
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# Where a valid one comes from, said after what is wrong: Replicate's for its webhooks, one the
# operator makes for the alerts (and gives their receiver).
REPLICATE_SECRET_SOURCE = (f"Replicate's is {WEBHOOK_SECRET_PREFIX} followed by base64 "
                           "(GET /v1/webhooks/default/secret)")
MAKE_SIGNING_SECRET = ("python -c 'import base64, secrets; print(\"whsec_\" + "
                       "base64.b64encode(secrets.token_bytes(32)).decode())'")
ALERT_SECRET_SOURCE = (f"make one with {MAKE_SIGNING_SECRET} and give the alert receiver "
                       "the same")


def webhook_secret_problem(secret: str, *, source: str = REPLICATE_SECRET_SOURCE) -> str | None:
    """Why ``secret`` is not a webhook signing secret (``whsec_`` and the base64 of at least
    ``MIN_WEBHOOK_SECRET_BYTES`` bytes, padded or not), as a sentence to follow the variable's
    name and end with ``source`` (where a good one comes from), or None when it is one. The
    answer never repeats the secret."""
    why = _why_not(secret)
    if why is None:
        return None
    return f"is not a webhook signing secret ({why}): {source}"


def _why_not(secret: str) -> str | None:
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        return f"it does not start with {WEBHOOK_SECRET_PREFIX}"
    encoded = secret.removeprefix(WEBHOOK_SECRET_PREFIX)
    unpadded = encoded.rstrip("=")
    # A lone character in the last group of four encodes no whole byte: not base64.
    if not _BASE64.fullmatch(encoded) or len(unpadded) % 4 == 1:
        return f"what follows {WEBHOOK_SECRET_PREFIX} is not base64"
    try:
        key = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except binascii.Error:
        return f"what follows {WEBHOOK_SECRET_PREFIX} is not base64"
    if len(key) < MIN_WEBHOOK_SECRET_BYTES:
        return f"it holds {len(key)} bytes, fewer than {MIN_WEBHOOK_SECRET_BYTES}"
    return None
