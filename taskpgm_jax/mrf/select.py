"""Budgeted discrete task selection (DESIGN.md 4):

    F(A) = beta * sum_{i in A} u_i - (lam / 2) * sum_{i != j in A} S~_ij,   cost(A) <= budget.

Greedy by marginal gain per cost, plus the best single task, stopped when no positive gain fits.
The marginal gain of task e is beta u_e - lam sum_{j in A} S~_ej: adding a task subtracts one row
of S~ from every gain, O(T) per step instead of re-evaluating F. The guarantee lives in
`submodularity.py`.
"""

from __future__ import annotations

import heapq
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from taskpgm_jax.mrf._projection import pad_matrix, pad_vector, padded_size
from taskpgm_jax.mrf._validate import (check_positive, checked_potentials, eager_when_concrete,
                                       host_array, real_numpy, require_concrete_potentials)
from taskpgm_jax.mrf.energy import Potentials


class Selection(NamedTuple):
    """Result of `select_tasks`.

    indices: [k] int, chosen tasks in the order chosen (one task if the best single won).
    gains:   [k] float, the marginal gain of each step (for plotting the greedy curve).
    value:   F(indices).
    cost:    total cost of the chosen tasks (<= budget).
    greedy_value: F of the greedy chain; best_single: the best affordable single task and
    used_single: whether it beat the chain. lazy: which variant ran; evaluations: marginal gains
    computed (T per step for the plain variant).
    """

    indices: np.ndarray
    gains: np.ndarray
    value: float
    cost: float
    greedy_value: float
    best_single: int
    used_single: bool
    lazy: bool
    evaluations: int


def set_value(pot: Potentials, subset: ArrayLike | Iterable[int]) -> float:
    """F(A) for a list of task indices (float64 on the host).

    Example:
      >>> set_value(pot, [0, 3, 5])
    """
    pot = checked_potentials(pot)
    require_concrete_potentials(pot, "set_value")
    A = check_indices(subset, pot.num_tasks, "subset")
    if A.size == 0:
        return 0.0
    S = np.asarray(pot.matrix, np.float64)[np.ix_(A, A)]
    u = np.asarray(pot.unary, np.float64)[A]
    return float(pot.beta * u.sum() - 0.5 * pot.lam * (S.sum() - np.trace(S)))


@jax.jit
def _greedy_core(M, u, beta, lam, costs, costs64, mask, budget64):
    """Plain greedy on padded inputs; every step is a masked argmax and one row update.

    costs64 / budget64 are float64 (the caller runs this under `jax.enable_x64`): the budget
    test spent + cost <= budget is then the same float64 arithmetic as the lazy variant's, so
    both pick the same tasks and the reported cost never exceeds the budget (costs in tokens
    pass 2^24, where float32 stops counting). Gains and scores stay in M's dtype.
    """
    P = M.shape[0]

    def cond(state):
        _, _, _, _, _, k, done = state
        return (~done) & (k < P)

    def body(state):
        gains, chosen, order, step_gains, spent, k, _ = state
        feasible = mask & ~chosen & (spent + costs64 <= budget64) & (gains > 0)
        score = jnp.where(feasible, gains / costs, -jnp.inf)
        e = jnp.argmax(score).astype(jnp.int32)
        ok = feasible[e]
        gain_e = gains[e]
        row = jax.lax.dynamic_index_in_dim(M, e, keepdims=False)
        gains = jnp.where(ok, gains - lam * row, gains)
        return (gains, chosen.at[e].set(chosen[e] | ok), order.at[k].set(jnp.where(ok, e, -1)),
                step_gains.at[k].set(jnp.where(ok, gain_e, 0.0)),
                jnp.where(ok, spent + costs64[e], spent), k + ok.astype(jnp.int32), ~ok)

    state = (beta * u, jnp.zeros((P,), bool), jnp.full((P,), -1, jnp.int32),
             jnp.zeros((P,), M.dtype), jnp.zeros((), budget64.dtype), jnp.int32(0),
             jnp.bool_(False))
    _, _, order, step_gains, _, k, _ = jax.lax.while_loop(cond, body, state)
    return order, step_gains, k


def _lazy_greedy(pot: Potentials, costs: np.ndarray, budget: float):
    """Minoux's lazy greedy: stale gains are upper bounds when gains only shrink (S~ >= 0 off
    the diagonal), so most candidates are never re-evaluated. Host-side heap; a re-evaluation
    adds only the rows of the tasks chosen since that candidate was last seen (float64 sums of
    the stored entries: S~ is never copied, which at T = 10^4 would cost more than the search).
    """
    S = np.asarray(pot.matrix)
    u = np.asarray(pot.unary, np.float64)
    T = len(u)
    penalty = np.zeros(T)               # sum of S~[i, j] over the chosen j seen so far
    seen = np.zeros(T, np.int64)        # how many chosen tasks penalty[i] covers
    heap = [(-(pot.beta * u[i]) / costs[i], i) for i in range(T)]
    heapq.heapify(heap)
    chosen: list[int] = []
    gains: list[float] = []
    spent, evals = 0.0, T
    while heap:
        bound, i = heapq.heappop(heap)
        if -bound <= 0:
            break
        if not spent + costs[i] <= budget:
            continue  # the spending only grows: it never fits again
        if seen[i] < len(chosen):
            penalty[i] += S[i, chosen[seen[i]:]].sum(dtype=np.float64)
            seen[i] = len(chosen)
        gain = pot.beta * u[i] - pot.lam * penalty[i]
        evals += 1
        # Ties go to the lower index, as in the plain greedy's argmax: compare (ratio, index).
        if not heap or (-gain / costs[i], i) <= heap[0]:
            if gain <= 0:
                break
            chosen.append(i)
            gains.append(gain)
            spent += costs[i]
        else:
            heapq.heappush(heap, (-gain / costs[i], i))
    return np.asarray(chosen, np.int64), np.asarray(gains), evals


def check_indices(subset, num_tasks: int, name: str) -> np.ndarray:
    """Distinct task indices in [0, T) as int64; a boolean mask, floats, negative (wrapping) or
    repeated indices are refused."""
    if not hasattr(subset, "shape"):
        try:
            subset = list(subset)
        except TypeError:
            raise ValueError(f"{name}: expected a list of task indices, got {subset!r}.") from None
    A = host_array(subset, name)
    if A.size == 0:
        return np.zeros((0,), np.int64)
    if A.dtype == bool:
        raise ValueError(f"{name}: expected task indices, got a boolean mask; pass "
                         "np.flatnonzero(mask).")
    if A.ndim != 1 or not np.issubdtype(A.dtype, np.integer):
        raise ValueError(f"{name}: expected a 1-D list of integer task indices, got shape "
                         f"{A.shape} dtype {A.dtype}.")
    if A.min() < 0 or A.max() >= num_tasks:
        raise ValueError(f"{name}: indices must lie in [0, {num_tasks}), got range "
                         f"[{A.min()}, {A.max()}].")
    if np.unique(A).size != A.size:
        raise ValueError(f"{name}: repeated task indices; each task counts once.")
    return A.astype(np.int64)


def check_cost_vector(costs, num_tasks: int) -> np.ndarray:
    """[T] positive finite float64 costs (all 1 when None)."""
    if costs is None:
        return np.ones(num_tasks)
    costs = real_numpy(costs, "costs")
    if costs.shape != (num_tasks,):
        raise ValueError(f"costs: expected {num_tasks} entries (one per task), got shape "
                         f"{costs.shape}.")
    if not np.all(np.isfinite(costs)):
        raise ValueError("costs: contains NaN or inf.")
    if np.any(costs <= 0):
        raise ValueError(f"costs: every task must cost > 0 (examples or tokens), got min "
                         f"{costs.min():.3g}.")
    return costs


def check_costs(costs, num_tasks: int, budget) -> tuple[np.ndarray, float]:
    """Validated [T] float64 costs (all 1 when None) and budget; raises on bad input."""
    budget = check_positive(budget, "budget")
    costs = check_cost_vector(costs, num_tasks)
    if budget < costs.min():
        raise ValueError(f"budget: {budget:g} is below the cheapest task ({costs.min():g}); no "
                         "task fits. Raise the budget.")
    return costs, budget


@eager_when_concrete
def select_tasks(pot: Potentials, budget: float,
                 costs: ArrayLike | Sequence[float] | None = None, *,
                 lazy: bool = False) -> Selection:
    """Greedy budgeted selection of tasks maximising F (DESIGN.md 4).

    Args:
      pot: from `potentials(...)`.
      budget: total cost allowed; with `costs=None` every task costs 1, so this is the
        number of tasks (a cardinality constraint).
      costs: [T] positive costs (examples or tokens per task).
      lazy: Minoux's lazy greedy on the host, exact when F is submodular (off-diagonal
        affinities >= 0); raises otherwise, since stale gains are then not upper bounds.

    Returns:
      Selection with the chosen indices in order and the gain of every step.

    Example:
      >>> sel = select_tasks(pot, budget=10)           # at most 10 tasks
      >>> sel.indices, sel.value, sel.gains
    """
    pot = checked_potentials(pot)
    require_concrete_potentials(pot, "select_tasks")
    T = pot.num_tasks
    costs, budget = check_costs(costs, T, budget)
    if lazy:
        negative = np.asarray(pot.matrix) < 0
        np.fill_diagonal(negative, False)
        if negative.any():
            raise ValueError("lazy: lazy greedy needs a submodular F (all off-diagonal "
                             "affinities >= 0); this affinity has negative entries. Use "
                             "lazy=False.")
        order, gains, evals = _lazy_greedy(pot, costs, budget)
    else:
        P = padded_size(T)
        dtype = pot.matrix.dtype
        padded_costs = np.concatenate([costs, np.ones(P - T)])
        # float64 budget bookkeeping, as in the lazy variant (see _greedy_core).
        with jax.enable_x64(True):
            order, gains, k = _greedy_core(
                pad_matrix(pot.matrix, P), pad_vector(pot.unary, P),
                jnp.asarray(pot.beta, dtype), jnp.asarray(pot.lam, dtype),
                jnp.asarray(padded_costs, dtype), jnp.asarray(padded_costs, jnp.float64),
                jnp.arange(P, dtype=jnp.int32) < T, jnp.asarray(budget, jnp.float64))
            k = int(k)
        order, gains = np.asarray(order[:k], np.int64), np.asarray(gains[:k], np.float64)
        evals = T * max(k, 1)
    greedy_value = set_value(pot, order)
    u = np.asarray(pot.unary, np.float64)
    single_values = np.where(costs <= budget, pot.beta * u, -np.inf)
    best_single = int(np.argmax(single_values))
    used_single = bool(single_values[best_single] > greedy_value)
    if used_single:
        indices, step_gains = np.array([best_single]), np.array([single_values[best_single]])
    else:
        indices, step_gains = order, gains
    spent = 0.0
    for i in indices:  # summed in the order chosen, as the budget test did: cost <= budget
        spent += float(costs[i])
    return Selection(indices, step_gains, set_value(pot, indices), spent,
                     greedy_value, best_single, used_single, bool(lazy), int(evals))
