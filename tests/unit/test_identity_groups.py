"""The identity check's grouping of photos by person (complete linkage): the matrix form in
``photo_set._groups`` gives exactly the groups of the plain definition, merge by merge."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from selfie_lora.dataset.checks import CheckPolicy
from selfie_lora.dataset.checks.photo_set import _groups

POLICY = CheckPolicy()


def reference_groups(pair: np.ndarray, *, threshold: float) -> list[list[int]]:
    """Complete linkage as defined: each step merges the two groups whose farthest two photos
    are closest (within ``threshold``), the first such pair in (group, later group) order."""
    groups = [[i] for i in range(len(pair))]
    while len(groups) > 1:
        best: tuple[float, int, int] | None = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                far = float(pair[np.ix_(groups[a], groups[b])].max())
                if far <= threshold and (best is None or far < best[0]):
                    best = (far, a, b)
        if best is None:
            break
        _, a, b = best
        groups[a] = sorted(groups[a] + groups.pop(b))
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def _symmetric(values: list[float], n: int) -> np.ndarray:
    pair = np.zeros((n, n))
    pair[np.triu_indices(n, k=1)] = values
    return pair + pair.T


@st.composite
def distance_matrices(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(min_value=0, max_value=14))
    # Few distinct values: ties between candidate merges are common, and the order they are
    # broken in decides the groups.
    levels = st.sampled_from([0.1, 0.3, 0.45, 0.55, POLICY.identity_pair_distance, 0.7, 1.2])
    values = draw(st.lists(levels | st.floats(0.0, 1.5), min_size=n * (n - 1) // 2,
                           max_size=n * (n - 1) // 2))
    return _symmetric(values, n)


@settings(max_examples=300, deadline=None)
@given(distance_matrices())
def test_groups_are_those_of_complete_linkage_tie_for_tie(pair: np.ndarray) -> None:
    assert _groups(pair, policy=POLICY) == reference_groups(
        pair, threshold=POLICY.identity_pair_distance)


def test_groups_of_embeddings_match_the_definition() -> None:
    # Real-looking sets: one person's photos around a centre, a few strangers, one look-alike.
    rng = np.random.default_rng(7)
    for n in (3, 12, 40):
        person = rng.normal(0.0, 1.0, 128)
        vectors = person + rng.normal(0.0, 0.025, (n, 128))
        vectors[:3] = rng.normal(0.0, 0.05, (3, 128))  # strangers
        pair = np.sqrt(((vectors[:, None] - vectors[None]) ** 2).sum(axis=-1))
        assert _groups(pair, policy=POLICY) == reference_groups(
            pair, threshold=POLICY.identity_pair_distance)


def test_a_distance_that_is_not_a_number_never_merges() -> None:
    pair = _symmetric([0.2, float("nan"), 0.3], 3)
    assert _groups(pair, policy=POLICY) == reference_groups(
        pair, threshold=POLICY.identity_pair_distance) == [[0, 1], [2]]
