"""Choosing the local trainer's memory mode: a pure function of free memory and model size."""

from __future__ import annotations

import pytest

from selfie_lora.adapters.flux.memory import (
    GIB,
    MEMORY_MODES,
    choose_memory_mode,
    memory_needed,
    parameters_shown,
    smaller_mode,
)
from selfie_lora.config import Settings

FLUX_DEV = 11_901_408_320  # FLUX.1-dev's transformer parameters
TINY = 150_000


@pytest.mark.parametrize(
    ("free_gib", "expected"),
    [
        (79.0, "bf16"),  # H100 80 GB
        (39.0, "bf16"),  # A100 40 GB
        (23.3, "int8"),  # RTX 3090/4090 24 GB, what CUDA reports free
        (19.5, "int8"),  # 24 GB with a desktop on it
        (15.3, "nf4"),  # RTX 4080 / 4060 Ti 16 GB
        (12.5, "nf4"),
        (8.0, "nf4"),  # nothing fits: the smallest chance, and a clear error if it fails
    ],
)
def test_auto_picks_the_least_quantized_mode_that_fits(free_gib: float, expected: str) -> None:
    assert choose_memory_mode(free_bytes=int(free_gib * GIB), parameter_count=FLUX_DEV) == expected


def test_the_estimates_shrink_with_each_mode_and_no_gpu_means_bf16() -> None:
    needs = [memory_needed(mode, FLUX_DEV) for mode in MEMORY_MODES]
    assert needs == sorted(needs, reverse=True)
    # bf16 FLUX.1 weights alone are 22.2 GiB: the estimate is above them, below a 32 GB card.
    assert 22.2 * GIB < needs[0] < 31 * GIB
    assert needs[1] < 23 * GIB < needs[0]  # int8 fits a 24 GB card, bf16 does not
    assert needs[2] < 15 * GIB < needs[1]  # nf4 fits a 16 GB card, int8 does not
    assert choose_memory_mode(free_bytes=None, parameter_count=FLUX_DEV) == "bf16"
    assert choose_memory_mode(free_bytes=7 * GIB, parameter_count=TINY) == "bf16"


def test_smaller_mode_steps_down_and_ends() -> None:
    assert [smaller_mode(mode) for mode in MEMORY_MODES] == ["int8", "nf4", None]
    assert smaller_mode("auto") is None


def test_the_setting_takes_the_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().local_memory_mode == "auto"
    monkeypatch.setenv("SELFIE_LORA_LOCAL_MEMORY_MODE", "nf4")
    assert Settings().local_memory_mode == "nf4"
    monkeypatch.setenv("SELFIE_LORA_LOCAL_MEMORY_MODE", "fp4")
    with pytest.raises(ValueError, match="local_memory_mode"):
        Settings()


@pytest.mark.parametrize(("count", "shown"), [
    (FLUX_DEV, "11.9 B"), (2_512_384, "2.5 M"), (980, "980"), (0, "0")])
def test_the_log_line_says_a_small_model_s_parameters_in_millions(count: int,
                                                                  shown: str) -> None:
    # The tiny model's line said '0.0 B parameters'.
    assert parameters_shown(count) == shown
