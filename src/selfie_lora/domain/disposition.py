"""The Content-Disposition a download is saved by (RFC 6266), said alike by the API's answer
and by the object storage's presigned URL (``response-content-disposition``). Pure."""

from __future__ import annotations

import re
from urllib.parse import quote

# RFC 8187's attr-char besides letters and digits: what filename* leaves unencoded.
_ATTR_CHARS = "!#$&+-.^_`|~"
# Said as '_' in the quoted fallback: a quote or a backslash (escaping is read by some browsers
# and not others) and a '%' (which some decode), RFC 6266 appendix D.
_UNQUOTABLE = frozenset('"\\%')
# Code points UTF-8 cannot encode; a Python string holds them alone (a surrogate pair of UTF-16
# is decoded to one character, so two here are two lone ones).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def content_disposition(filename: str) -> str:
    """``attachment; filename="..."``, and where the name is not plain printable ASCII without
    ``"``, ``\\`` or ``%``, an ASCII fallback there (each other character a '_') and the exact
    name in ``filename*=UTF-8''...`` (RFC 8187), which browsers prefer. A lone surrogate (a
    name decoded with surrogateescape, or a JSON ``"\\ud800"``) has no UTF-8: it is said there
    as U+FFFD, the replacement character, rather than raising UnicodeEncodeError."""
    fallback = "".join(
        ch if " " <= ch <= "~" and ch not in _UNQUOTABLE else "_" for ch in filename)
    if fallback == filename:
        return f'attachment; filename="{filename}"'
    exact = quote(_LONE_SURROGATE.sub("\ufffd", filename), safe=_ATTR_CHARS, encoding="utf-8")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}"
