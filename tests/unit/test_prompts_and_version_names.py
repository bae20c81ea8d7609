"""The trigger word in a generation's prompt, and naming a version: pure rules of the domain."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfie_lora.domain.entities import Version
from selfie_lora.domain.plan import ensure_trigger_word
from selfie_lora.domain.versions import find_version

TW = "zkr47v"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("on a beach", "a photo of zkr47v, on a beach"),
        ("", "a photo of zkr47v"),
        ("zkr47v on a beach", "zkr47v on a beach"),
        # A phone keyboard's capital is written back as trained: T5 keeps case.
        ("Zkr47v on a beach", "zkr47v on a beach"),
        ("ZKR47V, smiling", "zkr47v, smiling"),
        # Attached to other text, it is there all the same: not added a second time.
        ("zkr47v's portrait on a beach", "zkr47v's portrait on a beach"),
        ("(zkr47v:1.2) in the rain", "(zkr47v:1.2) in the rain"),
        ("a zkr47v-style painting", "a zkr47v-style painting"),
        # Inside a longer word it is not the trigger word.
        ("xzkr47v on a beach", "a photo of zkr47v, xzkr47v on a beach"),
        ("zkr47v9 on a beach", "a photo of zkr47v, zkr47v9 on a beach"),
        # In any alphabet: a letter beside it made it count (the boundary was ASCII's).
        ("\u00e9zkr47v at the beach", "a photo of zkr47v, \u00e9zkr47v at the beach"),
        ("zkr47v\u00e9 at the beach", "a photo of zkr47v, zkr47v\u00e9 at the beach"),
        ("zkr47v\u0301 at the beach", "a photo of zkr47v, zkr47v\u0301 at the beach"),
        ("\u0436zkr47v", "a photo of zkr47v, \u0436zkr47v"),
        ("zkr47v\u0663", "a photo of zkr47v, zkr47v\u0663"),
        # Punctuation of any kind still ends the word.
        ("zkr47v_style, zkr47v\u00bb", "zkr47v_style, zkr47v\u00bb"),
        ("\u00abZKR47V\u00bb", "\u00abzkr47v\u00bb"),
    ],
)
def test_the_trigger_word_is_in_every_prompt_once_as_trained(prompt: str, expected: str) -> None:
    assert ensure_trigger_word(prompt, TW) == expected


@given(st.text(alphabet=st.sampled_from("abzkrvZKRV4 7,.'()-:\n"), max_size=40))
def test_a_prompt_always_ends_up_with_the_exact_trigger_word(prompt: str) -> None:
    final = ensure_trigger_word(prompt, TW)
    exact = re.findall(r"(?<![a-z0-9])zkr47v(?![a-z0-9])", final)
    any_case = re.findall(r"(?<![a-z0-9])zkr47v(?![a-z0-9])", final, re.IGNORECASE)
    assert exact
    assert exact == any_case  # every occurrence written as trained
    assert ensure_trigger_word(final, TW) == final  # nothing added twice


def _version(number: int) -> Version:
    return Version(id=f"id-{number}", model_id="m", number=number, training_id=f"t{number}",
                   trainer_version="local-tiny-v1", weights_key="k", weights_sha256="s",
                   weights_method="output", remote_version=None, version_mismatch=False,
                   created_at=datetime(2026, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize("ref", ["²", "v²", "\u0663", "v\u0661", "1.5", "", "v"])  # ² and Arabic-Indic digits
def test_a_version_name_that_is_not_a_number_names_none(ref: str) -> None:
    versions = [_version(1), _version(2), _version(3)]
    assert find_version(versions, ref) is None


def test_a_version_is_named_by_id_or_number() -> None:
    versions = [_version(1), _version(2)]
    assert find_version(versions, "2") == versions[1]
    assert find_version(versions, "V2 ") == versions[1]
    assert find_version(versions, "id-1") == versions[0]


@given(st.integers(min_value=1, max_value=2**31 - 1), st.integers(min_value=0, max_value=3),
       st.sampled_from(["", "v", "V"]))
def test_a_version_number_written_any_way_names_that_version(number: int, zeros: int,
                                                            prefix: str) -> None:
    versions = [_version(number), _version(number + 1)]
    assert find_version(versions, f" {prefix}{'0' * zeros}{number} ") == versions[0]


@pytest.mark.parametrize("digits", [11, 4301, 10_000])
def test_a_number_longer_than_any_version_s_names_none(digits: int) -> None:
    # int() refuses a text of over 4300 digits: it was a ValueError, a 500 for the API's
    # activate and weights routes, a traceback for the CLI's activate and export.
    versions = [_version(1), _version(2)]
    assert find_version(versions, "1" * digits) is None
    assert find_version(versions, "v" + "1" * digits) is None
    # Zeros in front make no number longer.
    assert find_version(versions, "0" * 5000 + "2") == versions[1]
