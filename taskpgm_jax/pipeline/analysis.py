"""Statistics for the pipeline and the report: task clustering, ARI, seed summaries, paired CIs.

Pure NumPy/SciPy on host arrays (no JAX): these run once per report on [T, T] matrices and a few
seeds, where a compile would cost more than the work.

Clustering works on an affinity S (larger = more similar), which may be a JSD affinity in [0, 1]
or an indefinite PMI affinity in nats of any scale (DESIGN.md 4). It is turned into a distance by
min-max normalising the off-diagonal of sym(S) = (S + S^T) / 2:

    d_ij = (s_max - s_ij) / (s_max - s_min)   for i != j,   d_ii = 0,

with s_min, s_max the extreme off-diagonal entries (all d_ij = 0 when they are equal). The map is
affine with a positive slope, so average linkage builds the same tree for S and for a * S + b
(a > 0): the clusters do not depend on the units or the offset of the affinity, and the merge
heights are comparable across affinities (they lie in [0, 1]). The diagonal is ignored (S^JSD_ii
= 1 and S^PMI_ii = 0 carry no information about other tasks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform
from scipy.stats import t as student_t


def _affinity_matrix(affinity, name: str = "affinity") -> np.ndarray:
    """`affinity` as a finite, square float64 [T, T] array with T >= 1."""
    try:
        S = np.asarray(affinity, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a numeric [T, T] matrix.") from None
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"{name}: expected a square [T, T] matrix, got shape {S.shape}.")
    if S.shape[0] == 0:
        raise ValueError(f"{name}: the matrix is empty (T = 0); at least one task is needed.")
    if not np.all(np.isfinite(S)):
        raise ValueError(f"{name}: contains NaN or inf; every entry must be finite.")
    return S


def affinity_distance(affinity) -> np.ndarray:
    """The [T, T] distance used for clustering: min-max normalised off-diagonal of sym(S).

    Args:
      affinity: [T, T] affinity S, larger = more similar; any scale, possibly indefinite.

    Returns:
      [T, T] float64 distance in [0, 1], symmetric, zero diagonal (see the module docstring).

    Example:
      >>> affinity_distance([[1.0, 0.8], [0.8, 1.0]])   # one off-diagonal value: all zero
    """
    S = _affinity_matrix(affinity)
    S = 0.5 * (S + S.T)
    T = S.shape[0]
    off = ~np.eye(T, dtype=bool)
    if T == 1:
        return np.zeros((1, 1))
    s_min, s_max = S[off].min(), S[off].max()
    span = s_max - s_min
    D = (s_max - S) / span if span > 0 else np.zeros_like(S)
    D[~off] = 0.0
    return D


def _linkage(affinity) -> np.ndarray:
    """Average-linkage tree ([T - 1, 4] SciPy linkage) of the tasks; T >= 2."""
    D = affinity_distance(affinity)
    # checks=False: D is symmetric with a zero diagonal by construction.
    return hierarchy.linkage(squareform(D, checks=False), method="average")


def cluster_tasks(affinity, num_clusters: int) -> np.ndarray:
    """Average-linkage hierarchical clustering of tasks from an affinity matrix.

    The tree is cut after its first T - k merges, which always gives exactly k clusters (SciPy's
    `fcluster(..., "maxclust")` can return fewer when merge heights tie).

    Args:
      affinity: [T, T] affinity S, larger = more similar (JSD affinity, PMI, ...); symmetrised.
      num_clusters: k, an integer with 1 <= k <= T (ValueError outside, TypeError for a
        non-integer).

    Returns:
      [T] int array of cluster labels 0..k-1, numbered in order of first appearance.

    Example:
      >>> cluster_tasks(S_pmi, 3)   # e.g. array([0, 0, 1, 2, 1, 2])
    """
    S = _affinity_matrix(affinity)
    T = S.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)):
        raise TypeError(f"num_clusters: expected an integer, got {num_clusters!r}.")
    if not 1 <= num_clusters <= T:
        raise ValueError(f"num_clusters: must lie in [1, T = {T}], got {num_clusters}.")
    if T == 1:
        return np.zeros(1, dtype=np.int64)
    Z = _linkage(S)
    # Union-find over the first T - k merges; linkage ids >= T name the cluster formed at row id-T.
    parent = list(range(2 * T - 1))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for row in range(T - num_clusters):
        a, b = int(Z[row, 0]), int(Z[row, 1])
        parent[root(a)] = T + row
        parent[root(b)] = T + row
    roots = [root(i) for i in range(T)]
    first_seen: dict[int, int] = {}
    labels = np.array([first_seen.setdefault(r, len(first_seen)) for r in roots], dtype=np.int64)
    return labels


def affinity_order(affinity) -> np.ndarray:
    """A leaf order of the average-linkage tree of `cluster_tasks` (for heatmaps).

    Uses SciPy's optimal leaf ordering, so neighbouring rows of a heatmap are as similar as the
    tree allows; tasks of one cluster are contiguous.

    Args:
      affinity: [T, T] affinity S, larger = more similar.

    Returns:
      [T] int permutation of 0..T-1.

    Example:
      >>> order = affinity_order(S); S[np.ix_(order, order)]   # block-diagonal looking
    """
    S = _affinity_matrix(affinity)
    if S.shape[0] == 1:
        return np.zeros(1, dtype=np.int64)
    D = affinity_distance(S)
    Z = hierarchy.optimal_leaf_ordering(_linkage(S), squareform(D, checks=False))
    return hierarchy.leaves_list(Z).astype(np.int64)


def _labels(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of labels, got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name}: is empty; at least one item is needed.")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or inf; labels must be finite.")
    return arr


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Hubert-Arabie adjusted Rand index of two partitions of the same items.

    ARI = (sum_ij C(n_ij, 2) - E) / ((sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2 - E), with n_ij the
    contingency table, a_i / b_j its row / column sums and E = sum_i C(a_i, 2) sum_j C(b_j, 2) /
    C(n, 2). The denominator vanishes only when both partitions are all singletons or both a
    single cluster (identical partitions): the result is then 1.0.

    Args:
      labels_a: [n] labels (ints or strings) of the first partition.
      labels_b: [n] labels of the second partition; the label values need not match labels_a's.

    Returns:
      The ARI as a float: 1 for identical partitions (up to renaming), ~0 for independent ones.

    Example:
      >>> adjusted_rand_index([0, 0, 1, 1], ["x", "x", "y", "y"])   # 1.0
    """
    a = _labels(labels_a, "labels_a")
    b = _labels(labels_b, "labels_b")
    if a.shape != b.shape:
        raise ValueError(f"labels_a and labels_b: length mismatch ({a.size} vs {b.size}).")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)

    def pairs(counts: np.ndarray) -> int:
        # Exact integer pair counts: no rounding before the final division.
        return int((counts * (counts - 1) // 2).sum())

    index = pairs(table)
    sum_a, sum_b = pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    total = a.size * (a.size - 1) // 2
    expected = sum_a * sum_b / total if total else 0.0
    maximum = 0.5 * (sum_a + sum_b)
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def _values(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a sequence of numbers.") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence (one value per seed), got {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name}: is empty; at least one seed's value is needed.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or inf; every seed's value must be finite.")
    return arr


def seed_summary(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation of a metric over seeds.

    Args:
      values: [n] metric values, one per seed, n >= 1.

    Returns:
      {"mean": float, "std": float (ddof=1; 0.0 when n = 1), "n": int}.

    Example:
      >>> seed_summary([0.61, 0.64, 0.63])   # {"mean": 0.6267, "std": 0.0153, "n": 3}
    """
    v = _values(values, "values")
    std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(np.mean(v)), "std": std, "n": int(v.size)}


def paired_difference(method_values: Sequence[float], baseline_values: Sequence[float],
                      confidence: float = 0.95) -> dict:
    """Mean difference method - baseline, paired by seed, with a Student-t confidence interval.

    d_s = method_s - baseline_s; the interval is mean(d) +- t_{(1+c)/2, n-1} * std(d, ddof=1) /
    sqrt(n). With fewer than two seeds there is no spread to estimate: the bounds are None.

    Args:
      method_values: [n] metric of the method, one per seed.
      baseline_values: [n] metric of the baseline on the same seeds, in the same order.
      confidence: the interval's coverage c in (0, 1). The key is "ci95" whatever c is (it is
        the field name in results.json); pass the default to make it a 95% interval.

    Returns:
      {"mean": float, "ci95": [lo, hi] (both None when n < 2), "n": int}.

    Example:
      >>> paired_difference([0.70, 0.72, 0.69], [0.65, 0.66, 0.66])["ci95"]   # [lo, hi]
    """
    m = _values(method_values, "method_values")
    b = _values(baseline_values, "baseline_values")
    if m.size != b.size:
        raise ValueError(f"method_values and baseline_values: length mismatch ({m.size} vs "
                         f"{b.size}); pass one value per seed for the same seeds.")
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence: must lie in (0, 1), got {confidence!r}.")
    d = m - b
    mean = float(np.mean(d))
    n = int(d.size)
    if n < 2:
        return {"mean": mean, "ci95": [None, None], "n": n}
    half = float(student_t.ppf(0.5 * (1.0 + c), n - 1)) * float(np.std(d, ddof=1)) / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def budget_per_cluster(weights: Mapping[str, float], clusters: Mapping[str, str]) -> dict:
    """Share of the mixture that each (planted) cluster of tasks receives.

    Args:
      weights: {task: weight >= 0}; any positive total (simplex weights or example counts).
      clusters: {task: cluster label} for every task in `weights` (tasks listed here but absent
        from `weights` count as weight 0, so every cluster appears in the result).

    Returns:
      {cluster: share}, shares summing to 1, clusters sorted by their label.

    Example:
      >>> budget_per_cluster({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": "x", "b": "x", "c": "y"})
      {'x': 0.8, 'y': 0.2}
    """
    missing = [task for task in weights if task not in clusters]
    if missing:
        raise ValueError(f"clusters: no cluster for task(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; every weighted task needs one.")
    values = {task: float(w) for task, w in weights.items()}
    bad = [task for task, w in values.items() if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"weights: must be finite and >= 0; bad for {bad[:5]}.")
    total = sum(values.values())
    if total <= 0:
        raise ValueError("weights: the total weight is 0; nothing to split between clusters.")
    shares = {label: 0.0 for label in sorted(set(clusters.values()), key=str)}
    for task, w in values.items():
        shares[clusters[task]] += w / total
    return shares
