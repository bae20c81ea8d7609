"""The Redis database numbers the test run's parallel workers flush never meet."""

from __future__ import annotations

import pytest

from tests.support.backends import MAX_REDIS_WORKERS, redis_database


def test_each_worker_s_redis_databases_are_its_own() -> None:
    """The contract tests took 2 + worker and the end-to-end ones 13 - worker: from -n 7 two
    workers flushed one database (gw5's contract 7 was gw6's end-to-end 7), and past gw13 the
    number went negative."""
    taken = [redis_database(user, worker)
             for worker in range(MAX_REDIS_WORKERS) for user in ("contract", "e2e")]
    assert len(set(taken)) == len(taken)
    assert all(0 <= number <= 15 for number in taken)
    # What two workers (make test-fast) always had.
    assert [redis_database("contract", w) for w in (0, 1)] == [2, 3]
    assert [redis_database("e2e", w) for w in (0, 1)] == [13, 12]


@pytest.mark.parametrize("worker", [MAX_REDIS_WORKERS, 13, 20])
def test_a_worker_past_the_bound_fails_rather_than_share_a_database(worker: int) -> None:
    with pytest.raises(pytest.fail.Exception, match=f"at most {MAX_REDIS_WORKERS} workers"):
        redis_database("e2e", worker)
