"""The Content-Disposition a download is saved by (domain.disposition): a header for any name."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import example, find, given
from hypothesis import strategies as st

from selfie_lora.domain.disposition import content_disposition

# Names of any characters, lone surrogates among them. st.text() leaves surrogates out (its
# alphabet is characters(codec="utf-8")), and st.text(alphabet) merges the alphabet's
# characters into one range, where 2,048 surrogates are drawn about once in 1,000 names: a list
# of characters, each a surrogate about half the time, draws them in most names, several in many.
_ANY_NAME = st.text() | st.lists(
    st.characters() | st.characters(categories=["Cs"])).map("".join)
_SURROGATE = re.compile("[\ud800-\udfff]")
_HEADER = re.compile(r'attachment; filename="([ -~]*)"(?:; filename\*=UTF-8\'\'([!-~]*))?')


def _saved_as(header: str) -> tuple[str, str | None]:
    """The fallback name and the exact one (None: the fallback is exact) a header gives."""
    parsed = _HEADER.fullmatch(header)
    assert parsed, header
    exact = parsed.group(2)
    return parsed.group(1), None if exact is None else unquote(exact, errors="strict")


def test_the_names_drawn_hold_lone_surrogates() -> None:
    """The property below means nothing for surrogates if its names never hold them (as with
    st.text(): 0 in 5,000): two, next to what the header escapes, are found in a few draws."""
    found = find(_ANY_NAME, lambda name: len(_SURROGATE.findall(name)) >= 2
                 and any(not ch.isascii() or not ch.isprintable() or ch in '"%\\' for ch in
                         _SURROGATE.sub("", name)))
    assert len(_SURROGATE.findall(found)) >= 2


@given(_ANY_NAME)
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
    readable = _SURROGATE.sub("\ufffd", filename)
    assert (exact if exact is not None else fallback) == readable


@pytest.mark.parametrize(("filename", "header"), [
    ("lora-v2.safetensors", 'attachment; filename="lora-v2.safetensors"'),
    ("x\ud800y.safetensors",
     "attachment; filename=\"x_y.safetensors\"; filename*=UTF-8''x%EF%BF%BDy.safetensors"),
])
def test_a_lone_surrogate_is_said_as_the_replacement_character(filename: str,
                                                               header: str) -> None:
    assert content_disposition(filename) == header
