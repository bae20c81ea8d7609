"""A LoRA scale as the fronts show it and a PNG stores it: the float exactly, read back."""

from __future__ import annotations

import io

import pytest

from selfie_lora.domain.plan import lora_scale_from_text, lora_scale_text, validate_lora_scale


@pytest.mark.parametrize(("scale", "shown"), [
    (1.0, "1"), (0.5, "0.5"), (0.123456789, "0.123456789"), (-1.0, "-1"), (2.5, "2.5"),
    (1 / 3, "0.3333333333333333"), (1e-07, "1e-07")])
def test_a_scale_is_shown_by_the_shortest_text_that_reads_back_as_it(scale: float,
                                                                      shown: str) -> None:
    # ':g' said 0.123456789 as 0.123457, a scale that makes another picture.
    assert lora_scale_text(scale) == shown
    assert float(shown) == scale


def test_a_generated_png_stores_its_scale_exactly() -> None:
    pytest.importorskip("PIL")
    from PIL import Image

    from selfie_lora.adapters.flux.generator import _png

    png = _png(Image.new("RGB", (4, 4)), seed=7, lora_scale=0.123456789)
    with Image.open(io.BytesIO(png)) as image:
        assert image.text == {"seed": "7", "lora_scale": "0.123456789"}  # type: ignore[attr-defined]


def test_a_scale_of_minus_zero_is_zero_at_every_entry_point() -> None:
    # -0.0 passed the range and was stored and shown as "-0.0" (the CLI's and the notices' "-0").
    for scale in (validate_lora_scale(-0.0), lora_scale_from_text("-0"),
                  lora_scale_from_text("-0.0e5")):
        assert scale is not None
        assert repr(scale) == "0.0"
        assert lora_scale_text(scale) == "0"
