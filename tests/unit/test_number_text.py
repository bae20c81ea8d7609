"""The seed and the number of pictures as the text fronts (the Generate form, the CLI) read them:
one parser, the API's rules; the LoRA scale too."""

from __future__ import annotations

import pytest

from selfie_lora.domain.plan import lora_scale_from_text
from selfie_lora.errors import ErrorCode, InvalidInputError
from selfie_lora.services.generation import num_outputs_from_text, seed_from_text


@pytest.mark.parametrize(("text", "seed"), [
    (None, None), ("", None), ("  ", None), ("0", 0), (" 7 ", 7), ("007", 7),
    ("4294967295", 4294967295), ("4294967296", 4294967296),
    ("0" * 5000 + "7", 7), ("0" * 5000, 0)])  # the range is generate's
def test_a_seed_is_ascii_digits(text: str | None, seed: int | None) -> None:
    assert seed_from_text(text) == seed


@pytest.mark.parametrize("text", ["1.0", "1_0", "\u0663", "+5", "-1", "1e2", "x", "0x10"])
def test_anything_else_is_refused_as_the_api_refuses_it(text: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        seed_from_text(text)
    assert refused.value.code == ErrorCode.INVALID_SEED
    assert refused.value.message.startswith("the seed must be a whole number 0 to 4294967295")
    with pytest.raises(InvalidInputError) as refused:
        num_outputs_from_text(text)
    assert refused.value.code == ErrorCode.INVALID_NUM_OUTPUTS


def test_a_seed_of_5000_digits_is_said_to_be_too_large_not_no_number() -> None:
    # int() refuses more than 4300 digits: the form said "the seed is a whole number".
    with pytest.raises(InvalidInputError) as refused:
        seed_from_text("9" * 5000)
    assert refused.value.message == "the seed must be 0 to 4294967295"


@pytest.mark.parametrize(("text", "count"), [(None, 1), ("", 1), ("  ", 1), (" 3 ", 3)])
def test_a_picture_count_left_empty_is_one_as_the_api_s_default(text: str | None,
                                                                 count: int) -> None:
    assert num_outputs_from_text(text) == count


@pytest.mark.parametrize(("text", "scale"), [
    (None, None), ("", None), ("  ", None), ("0.5", 0.5), (" 1.5 ", 1.5), ("+1", 1.0),
    ("-1", -1.0), (".5", 0.5), ("2.", 2.0), ("1e0", 1.0), ("1e-07", 1e-07), ("3", 3.0)])
def test_a_scale_is_a_decimal_number_in_ascii_digits(text: str | None,
                                                      scale: float | None) -> None:
    # 1e-07: lora_scale_text writes a tiny scale so, and the Generate page's address reads it.
    assert lora_scale_from_text(text) == scale


@pytest.mark.parametrize("text", [
    "0.2_5", "1_0", "\u0660.\u0665", "\uff11.\uff15", "\u0661", "1,5", "0x1", "nan", "NaN", "inf",
    "-infinity", "1e999", "5", "-1.5", "x", "1.5.0", "--1"])
def test_any_other_scale_is_refused_with_the_range_by_every_text_front(text: str) -> None:
    # float() took "0.2_5" (0.25), other scripts' digits ("٣") and "inf"; the web's Generate form
    # (pydantic) "0.2_5" and "infinity"; the CLI's option parser all of them.
    with pytest.raises(InvalidInputError) as refused:
        lora_scale_from_text(text)
    assert refused.value.code == ErrorCode.INVALID_LORA_SCALE
    assert refused.value.message == ("the LoRA scale must be a number from -1.0 to 3.0 (not "
                                     f"{text!r})")
