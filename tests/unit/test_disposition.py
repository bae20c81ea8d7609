"""The Content-Disposition a download is saved by (domain.disposition): a header for any name."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from selfie_lora.domain.disposition import content_disposition

_HEADER = re.compile(r'attachment; filename="([ -~]*)"(?:; filename\*=UTF-8\'\'([!-~]*))?')


def _saved_as(header: str) -> tuple[str, str | None]:
    """The fallback name and the exact one (None: the fallback is exact) a header gives."""
    parsed = _HEADER.fullmatch(header)
    assert parsed, header
    exact = parsed.group(2)
    return parsed.group(1), None if exact is None else unquote(exact, errors="strict")


@given(st.text())
@example("model\ud800.safetensors")  # a lone surrogate: UnicodeEncodeError in the old code
@example("\udfff")
@example('a"b\\c%d\r\n.safetensors')
def test_any_name_makes_a_well_formed_ascii_header(filename: str) -> None:
    """A name with a lone surrogate (decoded with surrogateescape, or a JSON "\\ud800") raised
    UnicodeEncodeError: the function and the storage port that calls it take any str, though
    today's names (lora-vN.safetensors) hold no user text. Every name makes a header of
    printable ASCII: the exact name where it has no lone surrogate, each such one said as
    U+FFFD (there is no UTF-8 for it), and '_' in the fallback."""
    header = content_disposition(filename)
    assert header.isascii(), header
    assert header.isprintable(), header
    fallback, exact = _saved_as(header)
    assert len(fallback) == len(filename)
    readable = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in filename)
    assert (exact if exact is not None else fallback) == readable


@pytest.mark.parametrize(("filename", "header"), [
    ("lora-v2.safetensors", 'attachment; filename="lora-v2.safetensors"'),
    ("x\ud800y.safetensors",
     "attachment; filename=\"x_y.safetensors\"; filename*=UTF-8''x%EF%BF%BDy.safetensors"),
])
def test_a_lone_surrogate_is_said_as_the_replacement_character(filename: str,
                                                               header: str) -> None:
    assert content_disposition(filename) == header
