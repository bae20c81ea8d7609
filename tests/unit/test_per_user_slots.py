"""One per-user count of work under way, shared by a user's generations in flight and a user's
uploads being taken in (two copies of it differed already: ``.get`` and ``pop`` in one,
indexing and ``del`` in the other)."""

from __future__ import annotations

import pytest

from selfie_lora.errors import RateLimitedError
from selfie_lora.services.common import PerUserSlots


def _too_many(held: int) -> RateLimitedError:
    return RateLimitedError(f"{held} under way", retry_after=1)


def test_a_user_gets_the_limit_and_the_next_is_refused_with_the_count_held() -> None:
    slots = PerUserSlots(2, refused=_too_many)
    slots.take("ann")
    slots.take("ann")
    with pytest.raises(RateLimitedError, match="2 under way"):
        slots.take("ann")
    slots.take("bob")  # another user is not held back
    assert (slots.held("ann"), slots.held("bob")) == (2, 1)


def test_a_released_slot_is_taken_again_and_a_user_with_none_leaves_no_entry() -> None:
    slots = PerUserSlots(1, refused=_too_many)
    with slots.hold("ann"), pytest.raises(RateLimitedError):
        slots.take("ann")
    assert slots.held("ann") == 0
    assert slots._held == {}
    with pytest.raises(ValueError, match="failed"), slots.hold("ann"):  # released when the block raises too
        raise ValueError("the upload failed")
    assert slots._held == {}
    slots.release("ann")  # a release with none held leaves nothing behind either
    assert slots._held == {}
