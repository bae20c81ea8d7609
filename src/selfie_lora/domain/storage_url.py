"""``SELFIE_LORA_STORAGE_URL``: ``s3://bucket/prefix`` and nothing else, read once for the
settings check and the store alike.

``urlsplit`` alone let through what then failed late or leaked: ``s3://KEY:SECRET@bucket`` made
``KEY:SECRET@bucket`` the bucket, sent in every request path and printed in every error; a port
became part of the bucket; a query or fragment was dropped; a tab or newline was silently removed
(``pre<TAB>fix`` stored under ``prefix``); ``a//b``, ``a/./b`` passed and every command then died
naming obstore's path parser, not the setting.
"""

from __future__ import annotations

import re

# S3's bucket naming rules (the general-purpose buckets every S3-compatible store accepts):
# 3-63 lowercase letters, digits, dots and hyphens, a letter or digit at each end, no "..",
# not shaped like an IP address.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_SHAPED = re.compile(r"\d+\.\d+\.\d+\.\d+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

FORM = "s3://bucket/prefix"
KEYS_GO = ("keys go in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
           "SELFIE_LORA_STORAGE_ACCESS_KEY_ID and SELFIE_LORA_STORAGE_SECRET_ACCESS_KEY)")
ENDPOINT_GOES = "the endpoint goes in AWS_ENDPOINT_URL (or SELFIE_LORA_STORAGE_ENDPOINT)"


def parse_storage_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix`` (the prefix without its outer slashes,
    possibly empty). Raises ValueError with a one-line message that never repeats the URL, which
    may hold a key."""
    if _CONTROL.search(url):
        # Looked at before anything parses it: urlsplit drops tabs and newlines without a word.
        raise ValueError(f"holds a control character (a tab, a newline...): must be {FORM}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "s3":
        raise ValueError(f"must be unset (files under HOME) or {FORM}")
    if "?" in rest or "#" in rest:
        raise ValueError(f"has a query (?...) or a fragment (#...), which object storage would "
                         f"not see: must be {FORM}")
    bucket, _, path = rest.partition("/")
    if "@" in bucket:
        # Never echoed: what comes before the @ is usually an access key and its secret.
        raise ValueError(f"holds credentials before the bucket (...@bucket), which would be "
                         f"sent as part of the bucket's name: {KEYS_GO}")
    if ":" in bucket:
        raise ValueError(f"has a port after the bucket: {ENDPOINT_GOES}, the URL names the "
                         f"bucket only ({FORM})")
    if not bucket:
        raise ValueError(f"names no bucket: must be {FORM}")
    if (_BUCKET.fullmatch(bucket) is None or ".." in bucket
            or _IP_SHAPED.fullmatch(bucket) is not None):
        raise ValueError("names no valid bucket: S3 bucket names are 3-63 lowercase letters, "
                         "digits, '.' and '-', starting and ending with a letter or digit "
                         f"(must be {FORM})")
    prefix = path.strip("/")
    if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
        raise ValueError("has an empty, '.' or '..' part in its prefix (//, /./, /../), which "
                         f"object storage keys cannot hold: must be {FORM}")
    return bucket, prefix
