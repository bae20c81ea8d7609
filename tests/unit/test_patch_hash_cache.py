"""The near-duplicate check's cache of partial face-patch hashes (``duplicates._patch_hashes``)."""

from __future__ import annotations

import numpy as np
import pytest

from selfie_lora.dataset.checks import duplicates
from selfie_lora.dataset.checks.analysis import FacePatch

SIDE = FacePatch.SIDE
PART = (0, 0, SIDE // 2, SIDE)  # a part, not the whole inside: hashed through the cache


def _patch(seed: int) -> FacePatch:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
    return FacePatch(pixels=pixels.tobytes(), inside=(0, 0, SIDE, SIDE))


def test_two_patches_given_one_id_keep_their_own_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mirrored copy pair_duplicate makes for a pair is freed after it, and CPython gives
    a later object the freed one's id: keyed by id, a later pair's mirror was answered with an
    earlier one's hashes (another face). Every object is given one id here, as a reuse does."""
    first, second = _patch(1), _patch(2)
    expected = duplicates._patch_hashes(second, PART, {})
    assert expected != duplicates._patch_hashes(first, PART, {})
    monkeypatch.setattr(duplicates, "id", lambda _obj: 7, raising=False)
    cache: duplicates._PatchHashes = {}
    duplicates._patch_hashes(first, PART, cache)
    assert duplicates._patch_hashes(second, PART, cache) == expected


def test_a_mirror_made_again_hits_the_cache() -> None:
    """One photo's mirror, made again for each pair it is in, is hashed once."""
    patch = _patch(3)
    cache: duplicates._PatchHashes = {}
    first = duplicates._patch_hashes(duplicates._mirrored(patch), PART, cache)
    again = duplicates._patch_hashes(duplicates._mirrored(patch), PART, cache)
    assert first == again
    assert len(cache) == 1
