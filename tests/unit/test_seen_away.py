"""``_SeenAway``: the spans in which this process saw the database away, which decide whether a
take-over of a lease that ran out counts an attempt (``lost_to_database_outage``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from selfie_lora.services.training import _SeenAway

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_success_that_began_before_the_outage_was_seen_does_not_end_it() -> None:
    """A heartbeat read its time, then renewed the lease slowly; meanwhile another thread saw the
    database away. The old code closed that outage with the beat's start time: a span that ended
    before it began, and the outage, still going, no longer covered the holder's expiry."""
    seen = _SeenAway()
    seen.away(_at(10))
    seen.back(_at(5))  # old code: the span became (10 s, 5 s)
    assert seen.spans(_at(60)) == [(_at(10), _at(60))]
    # Done after the failure was seen, but begun before it: says nothing of the outage's end.
    seen.back(_at(12), began=_at(5))
    assert seen.spans(_at(60)) == [(_at(10), _at(60))]
    # A success begun once the outage was seen ends it, when it completed.
    seen.back(_at(20), began=_at(15))
    assert seen.spans(_at(60)) == [(_at(10), _at(20))]
    # Once closed, a late success changes nothing; the next failure opens a new span.
    seen.back(_at(30))
    seen.away(_at(40))
    assert seen.spans(_at(60)) == [(_at(10), _at(20)), (_at(40), _at(60))]
