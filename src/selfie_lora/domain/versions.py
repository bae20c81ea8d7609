"""Naming a version: one rule for every route and command that takes one; and the log's name
for a user's choice of the active version."""

from __future__ import annotations

from collections.abc import Sequence

from selfie_lora.domain.entities import Version
from selfie_lora.domain.text import escaped
from selfie_lora.errors import NotFoundError

# The event a user's activation (rollback or roll forward) writes; the likeness gate counts them
# to know whether the user chose a version while another was being scored.
VERSION_ACTIVATED = "version_activated"
# A version's number is an INTEGER column (at most 2**31 - 1, ten digits): a longer number names
# no version.
_NUMBER_DIGITS_MAX = len(str(2**31 - 1))
# How much of a reference that names no version its refusal repeats.
_REF_SHOWN = 64


def find_version(versions: Sequence[Version], ref: str) -> Version | None:
    """The version ``ref`` names among ``versions`` (one model's): its id, or its number as
    ``2`` or ``v2``."""
    wanted = ref.strip()
    number = wanted.lower().removeprefix("v")
    # ASCII digits only: str.isdigit() is true of "²", which int() refuses.
    numeric = number.isascii() and number.isdigit()
    # Read once, and only when it can be a version's number: int() refuses a text of over
    # 4300 digits (a ValueError: a 500 for "POST /api/model/versions/111...1/activate").
    # Zeros in front count towards that limit too, and make no number longer.
    significant = number.lstrip("0") or "0"
    as_number = (int(significant) if numeric and len(significant) <= _NUMBER_DIGITS_MAX
                 else None)
    for version in versions:
        if version.id == wanted or (as_number is not None and version.number == as_number):
            return version
    return None


def no_such_version(ref: str) -> NotFoundError:
    """The refusal of ``ref``, which names no version: its start said back, its control and
    other unprintable characters escaped (``\\x00``). Said raw, a NUL of an edited address
    (``/versions?a=%00``) went into the page's HTML, where a browser shows it as U+FFFD, and an
    ESC into a terminal through the CLI, which prints the API's message."""
    return NotFoundError(f"no such version: {escaped(ref[:_REF_SHOWN])}")


def holder_of_remote_version(versions: Sequence[Version], remote_version: str | None) -> Version | None:
    """The version among ``versions`` (one model's) already stored with ``remote_version`` (the
    hosted backend's version its generations run on); None when none is, or there is none.
    Two versions on one remote version would run the same weights whichever is chosen: a new
    training's must be its own."""
    if not remote_version:
        return None
    return next((v for v in versions if v.remote_version == remote_version), None)
