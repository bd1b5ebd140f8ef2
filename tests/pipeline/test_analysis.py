"""Analysis helpers against independent references: pair counting, scipy.stats, float64 formulas."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from taskpgm_jax.pipeline.analysis import (
    adjusted_rand_index,
    affinity_distance,
    affinity_order,
    budget_per_cluster,
    cluster_tasks,
    paired_difference,
    seed_summary,
)


def _ari_pair_counting(a, b) -> float:
    """ARI from the 2x2 pair-confusion counts, by looping over every pair of items."""
    n11 = n10 = n01 = n00 = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        same_a, same_b = a[i] == a[j], b[i] == b[j]
        n11 += same_a and same_b
        n10 += same_a and not same_b
        n01 += same_b and not same_a
        n00 += not same_a and not same_b
    denom = (n00 + n01) * (n01 + n11) + (n00 + n10) * (n10 + n11)
    if denom == 0:
        return 1.0
    return 2.0 * (n00 * n11 - n01 * n10) / denom


@pytest.mark.parametrize("n", [2, 3, 7, 20, 60])
def test_ari_matches_pair_counting(rng, n):
    for _ in range(5):
        a = rng.integers(0, rng.integers(1, n + 1), size=n)
        b = rng.integers(0, rng.integers(1, n + 1), size=n)
        assert adjusted_rand_index(a, b) == pytest.approx(_ari_pair_counting(a, b), abs=1e-12)


def test_ari_known_cases(rng):
    a = rng.integers(0, 4, size=40)
    assert adjusted_rand_index(a, a) == 1.0
    # Renaming the labels (a permutation, even to strings) leaves the partition unchanged.
    names = np.array(["w", "x", "y", "z"])[rng.permutation(4)]
    assert adjusted_rand_index(a, names[a]) == pytest.approx(1.0)
    # Trivial partitions: identical -> 1; one cluster against all singletons -> 0.
    assert adjusted_rand_index(np.zeros(5), np.zeros(5)) == 1.0
    assert adjusted_rand_index(np.arange(5), np.arange(5)) == 1.0
    assert adjusted_rand_index(np.zeros(5), np.arange(5)) == 0.0
    assert adjusted_rand_index([3], [7]) == 1.0
    # Independent partitions of many items: ARI concentrates around 0.
    big = [adjusted_rand_index(rng.integers(0, 5, 2000), rng.integers(0, 5, 2000))
           for _ in range(5)]
    assert abs(np.mean(big)) < 0.005 and max(abs(x) for x in big) < 0.01


def _planted(rng, kind: str):
    """A noisy block affinity with 2-4 planted clusters of random sizes, tasks shuffled."""
    k = int(rng.integers(2, 5))
    sizes = rng.integers(2, 6, size=k)
    labels = rng.permutation(np.repeat(np.arange(k), sizes))
    same = labels[:, None] == labels[None, :]
    T = labels.size
    noise = rng.standard_normal((T, T))
    noise = (noise + noise.T) / 2
    if kind == "jsd":  # in [0, 1], diagonal 1
        S = np.clip(np.where(same, 0.8, 0.4) + 0.04 * noise, 0.0, 1.0)
        np.fill_diagonal(S, 1.0)
    else:  # PMI-like: large scale, signed, zero diagonal, indefinite
        S = np.where(same, 150.0, -400.0) + 40.0 * noise
        np.fill_diagonal(S, 0.0)
        eig = np.linalg.eigvalsh(S)
        assert eig[0] < 0 < eig[-1]
    return S, labels, k


@pytest.mark.parametrize("kind", ["jsd", "pmi"])
def test_cluster_tasks_recovers_planted_blocks(rng, kind):
    for _ in range(5):
        S, labels, k = _planted(rng, kind)
        found = cluster_tasks(S, k)
        assert adjusted_rand_index(found, labels) == 1.0
        assert _ari_pair_counting(found, labels) == 1.0
        assert sorted(set(found.tolist())) == list(range(k))
        # Labels are numbered in order of first appearance.
        firsts = [int(np.argmax(found == c)) for c in range(k)]
        assert firsts == sorted(firsts)
        # The heatmap order is a permutation with every planted cluster contiguous.
        order = affinity_order(S)
        assert sorted(order.tolist()) == list(range(S.shape[0]))
        runs = [c for c, _ in itertools.groupby(labels[order])]
        assert len(runs) == k


def test_cluster_tasks_exact_count_and_scale_invariance(rng):
    T = 9
    S = rng.standard_normal((T, T))
    for k in range(1, T + 1):
        labels = cluster_tasks(S, k)
        assert len(set(labels.tolist())) == k
        # Positive affine maps of S leave the distance, hence the tree, unchanged.
        scaled = cluster_tasks(37.0 * S - 5.0, k)
        assert adjusted_rand_index(labels, scaled) == 1.0
    assert cluster_tasks(S, 1).tolist() == [0] * T
    assert cluster_tasks(S, T).tolist() == list(range(T))


def test_affinity_distance_is_minmax_of_sym(rng):
    T = 5
    S = rng.uniform(-3, 3, size=(T, T))
    D = affinity_distance(S)
    sym = (S + S.T) / 2
    off = [(i, j) for i in range(T) for j in range(T) if i != j]
    vals = [sym[i, j] for i, j in off]
    for i, j in off:
        assert D[i, j] == pytest.approx((max(vals) - sym[i, j]) / (max(vals) - min(vals)))
    assert np.all(np.diag(D) == 0)
    assert np.all(affinity_distance(np.ones((3, 3))) == 0)


def test_seed_summary_matches_numpy(rng):
    v = rng.normal(0.6, 0.05, size=int(rng.integers(2, 8)))
    out = seed_summary(v.tolist())
    assert out["n"] == v.size
    assert out["mean"] == pytest.approx(float(np.mean(v)), rel=1e-12)
    assert out["std"] == pytest.approx(float(np.std(v, ddof=1)), rel=1e-12)
    assert seed_summary([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_paired_difference_matches_ttest_rel(rng, confidence):
    n = int(rng.integers(2, 10))
    base = rng.normal(0.6, 0.05, size=n)
    method = base + rng.normal(0.02, 0.03, size=n)
    out = paired_difference(method, base, confidence=confidence)
    ref = stats.ttest_rel(method, base).confidence_interval(confidence)
    assert out["n"] == n
    assert out["mean"] == pytest.approx(float(np.mean(method - base)), rel=1e-12)
    assert out["ci95"] == pytest.approx([ref.low, ref.high], rel=1e-10)


def test_paired_difference_float64_formula():
    # d = [0.1, 0.3, 0.2]: mean 0.2, sd 0.1. With 2 degrees of freedom the t quantile has the
    # closed form t_p = (2p - 1) / sqrt(2 p (1 - p)).
    out = paired_difference([1.1, 2.3, 3.2], [1.0, 2.0, 3.0])
    p = 0.975
    half = (2 * p - 1) / math.sqrt(2 * p * (1 - p)) * 0.1 / math.sqrt(3)
    assert out["mean"] == pytest.approx(0.2, rel=1e-12)
    assert out["ci95"] == pytest.approx([0.2 - half, 0.2 + half], rel=1e-12)
    assert paired_difference([0.7], [0.6]) == {"mean": pytest.approx(0.1), "ci95": [None, None],
                                               "n": 1}


def test_num_clusters_must_be_an_integer():
    with pytest.raises(TypeError, match="num_clusters: expected an integer"):
        cluster_tasks(np.eye(3), 2.0)


def test_budget_per_cluster():
    w = {"a": 0.5, "b": 0.25, "c": 0.25}
    out = budget_per_cluster(w, {"a": "x", "b": "y", "c": "x", "d": "z"})
    assert out == {"x": pytest.approx(0.75), "y": pytest.approx(0.25), "z": 0.0}
    counts = budget_per_cluster({"a": 300, "b": 100}, {"a": "x", "b": "y"})
    assert counts == {"x": pytest.approx(0.75), "y": pytest.approx(0.25)}
    assert sum(counts.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("call, match", [
    (lambda: cluster_tasks(np.ones((3, 4)), 2), "affinity: expected a square"),
    (lambda: cluster_tasks(np.full((3, 3), np.nan), 2), "affinity: contains NaN"),
    (lambda: cluster_tasks(np.eye(3), 0), r"num_clusters: must lie in \[1, T = 3\]"),
    (lambda: cluster_tasks(np.eye(3), 4), "num_clusters"),
    (lambda: affinity_order(np.zeros((0, 0))), "affinity: the matrix is empty"),
    (lambda: adjusted_rand_index([0, 1], [0, 1, 1]), "labels_a and labels_b: length mismatch"),
    (lambda: adjusted_rand_index([], []), "labels_a: is empty"),
    (lambda: adjusted_rand_index([0.0, np.nan], [0, 1]), "labels_a: contains NaN"),
    (lambda: seed_summary([0.1, np.nan]), "values: contains NaN"),
    (lambda: seed_summary([]), "values: is empty"),
    (lambda: paired_difference([0.1, 0.2], [0.1]), "length mismatch"),
    (lambda: paired_difference([0.1, np.nan], [0.1, 0.2]), "method_values: contains NaN"),
    (lambda: paired_difference([0.1, 0.2], [0.1, 0.2], confidence=1.0), "confidence"),
    (lambda: budget_per_cluster({"a": 1.0}, {"b": "x"}), "clusters: no cluster for task"),
    (lambda: budget_per_cluster({"a": -1.0}, {"a": "x"}), "weights: must be finite"),
    (lambda: budget_per_cluster({"a": 0.0}, {"a": "x"}), "weights: the total weight is 0"),
])
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
