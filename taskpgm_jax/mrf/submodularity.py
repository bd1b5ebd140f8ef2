"""The submodularity ratio of the selection objective F and the guarantee it implies.

Das and Kempe (2011): gamma = min over disjoint L, S (|L|, |S| <= k, F(S | L) > 0) of
sum_{x in S} F(x | L) / F(S | L). gamma = 1 for a submodular F (a singleton S already gives 1),
and for a monotone F greedy under a cardinality constraint k reaches (1 - e^-gamma) x OPT
(their Theorem 3.2; its proof uses monotonicity only as F(OPT) <= F(OPT + greedy's first i < k
tasks), so F(A + B) >= F(A) for disjoint |A| <= k, |B| <= k - 1 is what is checked for it).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from jax.typing import ArrayLike

from taskpgm_jax.mrf._validate import check_int, checked_potentials, require_concrete_potentials
from taskpgm_jax.mrf.energy import Potentials
from taskpgm_jax.mrf.select import Selection, check_cost_vector, check_indices

EXACT_MAX_TASKS = 12


class RatioReport(NamedTuple):
    """gamma: the ratio (exact, or the minimum over samples: then an upper estimate).
    exact: enumeration over every pair of sets; samples: pairs drawn otherwise (None if exact).
    monotone: no negative marginal gain was found (over all sets when exact or when F is
    submodular, else on the greedy chain and the samples). bound: the fraction of OPT (the
    best set within the same budget) that greedy is guaranteed (0.0 when none applies).
    theorem: which result gives it, or why none does.
    """

    gamma: float
    exact: bool
    samples: int | None
    monotone: bool
    bound: float
    theorem: str


def _subset_values(S, u, beta, lam, masks):
    """F for every row of a [N, T] 0/1 matrix of subsets."""
    off = S - np.diag(np.diag(S))
    return beta * masks @ u - 0.5 * lam * np.einsum("ni,ij,nj->n", masks, off, masks)


def _exact_ratio(S, u, beta, lam, k):
    """gamma over |L|, |S| <= k; whether F is monotone (over all sets); and whether
    F(A + B) >= F(A) for every disjoint A, B with |A| <= k, |B| <= k - 1: the only monotonicity
    the proof of Das and Kempe's Theorem 3.2 uses (F(OPT) <= F(OPT + greedy's first i < k)).
    """
    T = len(u)
    ids = np.arange(1 << T)
    masks = ((ids[:, None] >> np.arange(T)) & 1).astype(np.float64)
    sizes = masks.sum(1)
    F = _subset_values(S, u, beta, lam, masks)
    off = S - np.diag(np.diag(S))
    G = beta * u - lam * masks @ off                      # F(x | L) for every L and x
    monotone = not np.any((G < -1e-12 * (np.abs(G).max() + 1e-300)) & (masks == 0))
    ftol = 1e-12 * (np.abs(F).max() + 1e-300)
    gamma, unions_ok = np.inf, True
    for L in ids[sizes <= k]:
        cand = ids[((ids & L) == 0) & (sizes <= k) & (ids > 0)]
        joint = F[cand | L] - F[L]
        if np.any(joint[sizes[cand] <= k - 1] < -ftol):
            unions_ok = False
        singles = masks[cand] @ G[L]
        pos = joint > ftol
        if np.any(pos):
            gamma = min(gamma, float(np.min(singles[pos] / joint[pos])))
    return gamma, monotone, unions_ok


def _sampled_ratio(S, u, beta, lam, k, num_samples, seed, chain):
    rng = np.random.default_rng(seed)
    T = len(u)
    off = S - np.diag(np.diag(S))
    gamma, monotone, unions_ok = np.inf, True, True
    if chain is not None and len(chain):
        chosen = np.zeros(T)
        for i in chain:   # marginal gains along the greedy chain
            if beta * u[i] - lam * off[i] @ chosen < 0:
                monotone = unions_ok = False
            chosen[i] = 1
    for _ in range(num_samples):
        a, b = rng.integers(0, k + 1), rng.integers(1, k + 1)
        perm = rng.permutation(T)
        L, Sx = perm[:a], perm[a:a + b]
        if Sx.size == 0:
            continue
        mL = np.zeros(T)
        mL[L] = 1
        g = beta * u - lam * off @ mL
        if np.any(g[Sx] < 0):
            monotone = False
        B = Sx[:k - 1]    # F(B | L) >= 0 for |B| <= k - 1: what Das and Kempe's proof uses
        if B.size and g[B].sum() - 0.5 * lam * off[np.ix_(B, B)].sum() < 0:
            unions_ok = False
        sub = off[np.ix_(Sx, Sx)]
        joint = g[Sx].sum() - 0.5 * lam * sub.sum()
        if joint > 0:
            gamma = min(gamma, float(g[Sx].sum() / joint))
    return gamma, monotone, unions_ok


def _check_chain_budget(S, u, beta, lam, chain, k, eps):
    """A greedy chain shorter than k that still had a positive gain stopped at its budget, not
    at F's top: the bound for k would compare it with the best k tasks, which it never had."""
    m, T = len(chain), len(u)
    if m >= k or m == T:
        return
    off = S - np.diag(np.diag(S))
    chosen = np.zeros(T)
    chosen[chain] = 1
    gains = beta * u - lam * off @ chosen
    # What the greedy's own arithmetic (M's dtype, m + 1 terms) may have rounded to <= 0.
    slack = 4 * eps * (m + 2) * (np.abs(beta * u) + lam * np.abs(off) @ chosen)
    left = np.flatnonzero((chosen == 0) & (gains > slack))
    if left.size:
        raise ValueError(
            f"k: the selection holds {m} tasks and stopped at its budget (task {left[0]} still "
            f"gains {gains[left[0]]:.3g}), so the guarantee for k = {k} (against the best {k} "
            f"tasks) is not its own; pass k={m}, the budget it was selected under.")


def submodularity_ratio(pot: Potentials, k: int | None = None, *,
                        costs: ArrayLike | Sequence[float] | None = None,
                        selection: Selection | None = None, num_samples: int = 4096,
                        seed: int = 0) -> RatioReport:
    """The submodularity ratio of F on this instance and the greedy guarantee it implies.

    Args:
      pot: from `potentials(...)`.
      k: largest set size considered (the cardinality budget); default T. With unit costs
        and a `selection`, k must be the budget the selection was made under: a shorter chain
        that stopped with a positive gain left is refused.
      costs: the task costs used for selection; non-uniform costs (a knapsack) change which
        theorem applies: (1 - 1/e) / 2 when F is monotone and submodular (S~ >= 0 off the
        diagonal, decided from S~ itself, whatever k), none otherwise.
      selection: a `select_tasks` result whose chain is also checked for monotonicity.
      num_samples: pairs (L, S) drawn when T > 12.
      seed: of the sampling.

    Returns:
      RatioReport (gamma, exact, samples, monotone, bound, theorem).

    Example:
      >>> rep = submodularity_ratio(pot, k=5)
      >>> rep.gamma, rep.bound, rep.theorem
    """
    pot = checked_potentials(pot)
    require_concrete_potentials(pot, "submodularity_ratio")
    T = pot.num_tasks
    k = T if k is None else check_int(k, "k", minimum=1, what="a positive set size")
    k = min(k, T)
    if costs is not None:
        costs = check_cost_vector(costs, T)
    if selection is not None:
        if not isinstance(selection, Selection):
            raise ValueError(f"selection: expected the Selection from select_tasks(pot, ...), "
                             f"got {type(selection).__name__}.")
        check_indices(selection.indices, T, "selection")
        # Summed in the order chosen, as select_tasks does: the same float64 total when the
        # costs are the selection's own. A knapsack selection checked under unit costs would
        # get the cardinality bound, which its greedy never had.
        spent = 0.0
        for i in np.asarray(selection.indices):
            spent += 1.0 if costs is None else float(costs[i])
        if not np.isclose(spent, float(selection.cost), rtol=1e-9, atol=0.0):
            given = "unit costs (costs=None)" if costs is None else "the costs given"
            raise ValueError(f"costs: the selection's {len(selection.indices)} tasks cost "
                             f"{float(selection.cost):g}, but {spent:g} under {given}; pass "
                             "the costs the selection was made with (select_tasks(pot, budget, "
                             "costs)): they decide which bound applies.")
    num_samples = check_int(num_samples, "num_samples", minimum=1, what="a positive integer")
    seed = check_int(seed, "seed", minimum=0, what="a non-negative integer")
    S = np.asarray(pot.matrix, np.float64)
    u = np.asarray(pot.unary, np.float64)
    # Relative only: allclose's absolute 1e-8 would call any costs below 1e-8 (shares of a
    # budget, say) uniform and claim the cardinality bound for a knapsack.
    uniform = costs is None or np.allclose(costs, costs[0], rtol=1e-9, atol=0.0)
    if uniform and selection is not None and not selection.used_single:
        _check_chain_budget(S, u, pot.beta, pot.lam, np.asarray(selection.indices), k,
                            np.finfo(np.asarray(pot.matrix).dtype).eps)
    if T <= EXACT_MAX_TASKS:
        gamma, monotone, unions_ok = _exact_ratio(S, u, pot.beta, pot.lam, k)
        exact, samples = True, None
    else:
        chain = None if selection is None else selection.indices
        gamma, monotone, unions_ok = _sampled_ratio(S, u, pot.beta, pot.lam, k, num_samples,
                                                    seed, chain)
        exact, samples = False, int(num_samples)
    gamma = 1.0 if not np.isfinite(gamma) else min(gamma, 1.0)
    # lam > 0: F is submodular exactly when no off-diagonal affinity is negative (-lam S~_ij is
    # the second difference of F in tasks i, j), whatever k; and then a task's smallest gain is
    # the one given all the other tasks, so monotonicity is decided exactly at any T as well.
    off = S - np.diag(np.diag(S))
    submodular = not np.any(off < 0)
    if submodular and not exact:
        last = pot.beta * u - pot.lam * off.sum(1)
        monotone = bool(np.all(last >= -1e-12 * (np.abs(last).max() + 1e-300)))
    if uniform:
        if not unions_ok:
            bound, theorem = 0.0, (
                f"none: adding at most k - 1 = {k - 1} tasks to a set of at most k = {k} can "
                "lower F (F is not monotone where the proof of Das and Kempe's Theorem 3.2 "
                "needs F(OPT) <= F(OPT + greedy's first tasks)), and the weak-submodularity "
                "bounds assume monotone F")
        elif gamma <= 0:
            bound, theorem = 0.0, "none: gamma <= 0"
        else:
            bound = float(1.0 - np.exp(-gamma))
            theorem = (f"1 - exp(-gamma): Das and Kempe (2011, Theorem 3.2), greedy under a "
                       f"cardinality constraint k = {k} for monotone F with submodularity ratio "
                       "gamma")
            if not monotone:
                theorem += ("; F is not monotone, but adding at most k - 1 tasks to a set of at "
                            "most k never lowers it, which is all the proof uses of monotonicity")
            if not exact:
                theorem += (" (gamma estimated from samples: an upper estimate, not a "
                            "certificate; monotonicity only checked on the samples)")
    elif not submodular:
        bound, theorem = 0.0, ("none stated: knapsack costs and F is not submodular (an "
                               "off-diagonal affinity S~_ij < 0), and the cited budgeted bounds "
                               "assume a submodular F")
    elif not monotone:
        bound, theorem = 0.0, ("none: F is not monotone (a marginal gain is negative), and the "
                               "knapsack bounds assume monotone F")
    else:
        bound = float(0.5 * (1.0 - np.exp(-1.0)))
        theorem = ("(1 - 1/e) / 2: Khuller, Moss and Naor (1999), cost-benefit greedy plus the "
                   "best single element for a monotone submodular F under a knapsack budget")
    return RatioReport(float(gamma), exact, samples, bool(monotone), bound, theorem)
