"""Rules for text a user types that the service shows again (a key's name, a prompt): which
characters reorder the text around them, and how a refused character is named. Pure."""

from __future__ import annotations

import unicodedata

# The bidi embeddings and overrides (U+202A-202E) and isolates (U+2066-2069). Each reorders the
# text after it until its end or the end of the paragraph: shown raw in a page, a table or an
# aria-label, "\u202egpj.exe" reads "exe.jpg", and a date shown after it reads backwards. Unlike
# the left-to-right and right-to-left marks (U+200E, U+200F), which pasted Hebrew or Arabic
# carries, no typed text needs them.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

# How a character without a Unicode name is told (controls, surrogates, unassigned).
_UNNAMED = {"Cc": "a control character", "Cs": "a surrogate", "Cn": "unassigned",
            "Co": "private use"}


def bidi_control_in(text: str) -> str | None:
    """The first bidi embedding, override or isolate in ``text``, or None."""
    return next((ch for ch in text if ch in BIDI_CONTROLS), None)


def character_name(ch: str) -> str:
    """A character as a message names it: "U+202E (RIGHT-TO-LEFT OVERRIDE)". A refused
    character is invisible, or looks printable, in the text the user typed: its code point
    and name say which to take out."""
    fallback = _UNNAMED.get(unicodedata.category(ch), "no name")
    return f"U+{ord(ch):04X} ({unicodedata.name(ch, fallback)})"


def escaped(text: str) -> str:
    """``text`` with its control and other unprintable characters escaped (``\\x00``, ``\\x1b``)
    as Python writes them: said back in a log line, a page or a terminal, a typed NUL, line
    break or escape sequence cannot forge a line or drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
