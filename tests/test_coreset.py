import numpy as np
import pytest

from patchline.export.coreset import covering_radius, greedy_coreset


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    # Clustered data: a good coreset must visit every cluster.
    centres = rng.standard_normal((20, 64)).astype(np.float32) * 10
    return (centres[rng.integers(20, size=4000)] + rng.standard_normal((4000, 64)).astype(np.float32)).astype(np.float32)


def test_same_seed_same_coreset_other_seed_differs(rows):
    a = greedy_coreset(rows, 0.05, projection_dim=16, seed=3)
    b = greedy_coreset(rows, 0.05, projection_dim=16, seed=3)
    c = greedy_coreset(rows, 0.05, projection_dim=16, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_size_and_uniqueness(rows):
    selected = greedy_coreset(rows, 0.1, projection_dim=0)
    assert len(selected) == 400
    assert len(np.unique(selected)) == 400


def test_covering_radius_beats_random_and_shrinks_with_ratio(rows):
    rng = np.random.default_rng(1)
    greedy_small = covering_radius(rows, greedy_coreset(rows, 0.01, projection_dim=0))
    greedy_large = covering_radius(rows, greedy_coreset(rows, 0.05, projection_dim=0))
    random_small = covering_radius(rows, rng.choice(len(rows), 40, replace=False))
    assert greedy_small < random_small
    assert greedy_large < greedy_small
    # 20 clusters ~110 apart with ~13 spread, 40 centres: a cluster left uncovered would
    # put the radius near 100, so below 30 means every cluster got a centre.
    assert greedy_small < 30.0


def test_greedy_is_a_2_approximation_on_its_own_prefix(rows):
    """k-center greedy: radius(k) ≤ 2 · (distance between any two of the first k+1 centres)."""
    pts = rows
    selected = greedy_coreset(pts, 0.01, projection_dim=0)
    k = len(selected) - 1
    radius = covering_radius(pts, selected[:k])
    first = pts[selected[: k + 1]]
    pairwise = np.sqrt(((first[:, None] - first[None]) ** 2).sum(-1))
    np.fill_diagonal(pairwise, np.inf)
    assert radius <= pairwise.min() + 1e-3


def test_ratio_one_keeps_everything(rows):
    np.testing.assert_array_equal(greedy_coreset(rows[:50], 1.0), np.arange(50))
