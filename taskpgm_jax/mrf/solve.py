"""`solve` and `solve_path`: the mixture minimising the MRF energy over the simplex.

    pot = potentials(S, beta=1.0, lam=50.0)
    sol = solve(pot)                          # exact: accelerated projected gradient
    sol.weights, sol.energy, sol.kkt_residual
    solve(pot, method="closed_form").clipped  # the paper's KKT solution, projected
    path = solve_path(pot, jnp.geomspace(1e-3, 1e-1, 16))   # sparsity against beta / lam
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, Sequence, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from taskpgm_jax.mrf import _solvers
from taskpgm_jax.mrf._projection import pad_matrix, pad_vector, padded_size
from taskpgm_jax.mrf._validate import (check_bounds, check_int, check_positive, check_vector,
                                       checked_potentials, is_traced, real_numpy,
                                       register_static_fields)
from taskpgm_jax.mrf.energy import Potentials

SolveMethod = Literal["exact", "closed_form", "softmax"]
METHODS: tuple[str, ...] = get_args(SolveMethod)
# exact: 10x below the 1e-6 relative energy accuracy promised, since the gap is measured
# against the current iterate's energy scale, not the optimum's.
DEFAULT_TOL = {"exact": 1e-7, "softmax": 1e-4}
DEFAULT_MAX_ITER = {"exact": 20_000, "softmax": 20_000}


class Solution(NamedTuple):
    """A mixture from `solve`.

    weights:      [T] float, on the simplex (and within floor / cap when given).
    energy:       [] float, E(weights).
    iterations:   [] int32, solver iterations (1 for closed_form).
    kkt_residual: [] float, the Frank-Wolfe gap max_s grad . (w - s) over feasible s: zero
                  exactly at a KKT point, and an upper bound on E(w) - min E (E is convex).
    converged:    [] bool, kkt_residual <= tol x (|unary term| + |pairwise term|); for
                  closed_form, the linear solve was finite.
    method:       "exact", "closed_form" or "softmax".
    clipped:      [] bool for closed_form: the projection changed the KKT solution, which is
                  then not the constrained minimiser; None for the other methods.
    """

    weights: jax.Array
    energy: jax.Array
    iterations: jax.Array
    kkt_residual: jax.Array
    converged: jax.Array
    method: str
    clipped: jax.Array | None = None


class SolutionPath(NamedTuple):
    """Solutions along a grid of beta / lam (leading axis R = number of ratios).

    ratios: [R]; weights: [R, T]; energy, kkt_residual: [R]; iterations: [R] int32;
    converged: [R] bool; support: [R] int32, tasks with weight > 1e-6; method: str;
    clipped: [R] bool for closed_form, else None.
    """

    ratios: jax.Array
    weights: jax.Array
    energy: jax.Array
    iterations: jax.Array
    kkt_residual: jax.Array
    converged: jax.Array
    support: jax.Array
    method: str
    clipped: jax.Array | None = None


# `method` is a string: as a pytree leaf it made a Solution impossible to return from the
# caller's jit or vmap ("not a valid JAX type").
register_static_fields(Solution, ("method",))
register_static_fields(SolutionPath, ("method",))


def _check_options(method, *, init=None, tol=None, max_iter=None, temperature=None,
                   optimizer=None):
    """Refuse options the chosen method would ignore: a caller passing temperature to the
    exact solver, or a tolerance to the closed form, expects an effect that never happens.
    Only what the caller passed is refused (the defaults are None)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}.")
    if method != "softmax":
        for name, value in (("temperature", temperature), ("optimizer", optimizer)):
            if value is not None:
                raise ValueError(f"{name}: only used with method='softmax' (method is "
                                 f"{method!r}); drop it.")
    if method == "closed_form":
        for name, value in (("init", init), ("tol", tol), ("max_iter", max_iter)):
            if value is not None:
                raise ValueError(f"{name}: closed_form is a single linear solve (no starting "
                                 "point, tolerance or iterations); drop it, or use "
                                 "method='exact'.")
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer: expected an optax.GradientTransformation, e.g. "
                         f"optax.adam(0.1), got {optimizer!r}.")


def _prepare(pot: Potentials, method: str, floor, cap, init, tol, max_iter, temperature):
    T = pot.num_tasks
    dtype = pot.matrix.dtype
    lower, upper, bounded = check_bounds(floor, cap, T, dtype)
    if init is not None:
        init = check_vector(init, "init", T, dtype=dtype)
        if not is_traced(init):
            if method == "softmax" and bool(jnp.any(init <= 0)):
                raise ValueError("init: softmax starts from log(init), so every weight must be "
                                 "> 0; mix in a little uniform mass.")
            if bool(jnp.any(init < 0)) or abs(float(jnp.sum(init)) - 1.0) > 1e-4:
                raise ValueError("init: expected a mixture (non-negative, summing to 1).")
    if method == "softmax" and bounded:
        raise ValueError("floor: softmax cannot impose floors or caps; use method='exact'.")
    if tol is not None:
        tol = check_positive(tol, "tol")
    if max_iter is not None:  # a Python int: a static jit argument and a cache key
        max_iter = check_int(max_iter, "max_iter", minimum=1, what="a positive integer")
    temperature = 1.0 if temperature is None else check_positive(temperature, "temperature")
    P = padded_size(T)
    mask = jnp.arange(P) < T
    if init is None and method != "exact":
        init = jnp.full((T,), 1.0 / T, dtype)
    padded = dict(M=pad_matrix(pot.matrix, P), u=pad_vector(pot.unary, P), mask=mask,
                  lower=pad_vector(lower, P), upper=pad_vector(upper, P),
                  init=None if init is None else pad_vector(init, P))
    opts = dict(bounded=bounded, tol=tol if tol is not None else DEFAULT_TOL.get(method, 0.0),
                max_iter=max_iter if max_iter is not None else DEFAULT_MAX_ITER.get(method, 1),
                temperature=temperature)
    return padded, opts


def _run(pad, opts, method, beta, lam, lipschitz, optimizer):
    """Call one core on padded inputs; beta, lam (and lipschitz) may carry a vmapped axis."""
    dtype = pad["M"].dtype
    if method == "exact":
        init = pad["init"]
        if init is None:
            init = _best_vertex(pad["M"], pad["u"], beta, lam, pad["mask"])
        return _solvers.exact_core(pad["M"], pad["u"], beta, lam, lipschitz, pad["mask"],
                                   pad["lower"], pad["upper"], init,
                                   jnp.asarray(opts["tol"], dtype), bounded=opts["bounded"],
                                   max_iter=opts["max_iter"])
    if method == "closed_form":
        return _solvers.closed_form_core(pad["M"], pad["u"], beta, lam, pad["mask"],
                                         pad["lower"], pad["upper"], bounded=opts["bounded"])
    temp = jnp.asarray(opts["temperature"], dtype)
    theta0 = temp * jnp.log(jnp.where(pad["mask"], pad["init"], 1.0))
    return _solvers.softmax_core(pad["M"], pad["u"], beta, lam, pad["mask"], theta0, temp,
                                 jnp.asarray(opts["tol"], dtype), optimizer=optimizer,
                                 max_iter=opts["max_iter"])


def _best_vertex(M, u, beta, lam, mask):
    """The simplex vertex of lowest energy, E(e_i) = lam / 2 M_ii - beta u_i: the exact
    solver's default start. Mixtures are usually sparse, and from a sparse start every
    matrix-vector product and face solve works on a few rows instead of all T (from the
    uniform mixture, T = 5000 costs seconds before the support shrinks)."""
    vertex_energy = jnp.where(mask, 0.5 * lam * jnp.diagonal(M) - beta * u, jnp.inf)
    return jax.nn.one_hot(jnp.argmin(vertex_energy), M.shape[0], dtype=M.dtype)


def _check_finite_result(weights, method: str):
    if not is_traced(weights) and not bool(jnp.all(jnp.isfinite(weights))):
        raise ValueError(f"pot: the {method} solve produced NaN: S~ is numerically singular in "
                         f"{weights.dtype}. Build the potentials with a larger ridge, or use "
                         "method='exact'.")


def solve(pot: Potentials, method: SolveMethod = "exact", *,
          floor: ArrayLike | Sequence[float] | None = None,
          cap: ArrayLike | Sequence[float] | None = None,
          init: ArrayLike | Sequence[float] | None = None, tol: float | None = None,
          max_iter: int | None = None,
          temperature: float | None = None,
          optimizer: optax.GradientTransformation | None = None) -> Solution:
    """The mixture minimising E(w) = -beta u^T w + (lam / 2) w^T S~ w over the simplex.

    Args:
      pot: from `potentials(...)`; its dtype (float32, or float64 under `jax.enable_x64(True)`)
        is the solver's. Float64 potentials used outside x64 are solved in float32.
      method: "exact" (accelerated projected gradient with restart, the global minimiser),
        "closed_form" (the paper's KKT solution with only sum(w) = 1, then projected; exact
        only when `.clipped` is False) or "softmax" (w = softmax(theta / temperature), theta
        optimised with Optax; never exactly sparse).
      floor, cap: per-task bounds (scalars or [T]) for exact / closed_form; infeasible bounds
        (sum of floors > 1, sum of caps < 1) raise.
      init: starting mixture for exact / softmax (softmax needs all weights > 0). By default
        exact starts at the simplex vertex of lowest energy, softmax at the uniform mixture.
      tol: relative KKT tolerance (exact 1e-7, softmax 1e-4); not for closed_form.
      max_iter: iteration cap (20000); `.converged` says whether tol was met; not for
        closed_form.
      temperature: softmax temperature (default 1.0); softmax only.
      optimizer: Optax optimiser for softmax (default adam(0.1) with a cosine decay); softmax
        only. Options a method does not use raise instead of being ignored.

    Returns:
      Solution (weights, energy, iterations, kkt_residual, converged, method, clipped).

    Example:
      >>> pot = potentials(S, beta=1.0, lam=10.0)
      >>> sol = solve(pot, floor=0.01, cap=0.2)
      >>> float(sol.weights.sum()), bool(sol.converged)     # (1.0, True)
    """
    pot = checked_potentials(pot)
    _check_options(method, init=init, tol=tol, max_iter=max_iter, temperature=temperature,
                   optimizer=optimizer)
    pad, opts = _prepare(pot, method, floor, cap, init, tol, max_iter, temperature)
    dtype = pad["M"].dtype
    optimizer = optimizer or default_softmax_optimizer(opts["max_iter"])
    w, e, it, gap, ok, clipped = _run(pad, opts, method, jnp.asarray(pot.beta, dtype),
                                      jnp.asarray(pot.lam, dtype), _lipschitz(pot), optimizer)
    w = w[:pot.num_tasks]
    _check_finite_result(w, method)
    return Solution(w, e, it, gap, ok, method, clipped if method == "closed_form" else None)


def solve_path(pot: Potentials, ratios: ArrayLike | Sequence[float],
               method: SolveMethod = "exact", *,
               floor: ArrayLike | Sequence[float] | None = None,
               cap: ArrayLike | Sequence[float] | None = None, tol: float | None = None,
               max_iter: int | None = None,
               temperature: float | None = None,
               optimizer: optax.GradientTransformation | None = None) -> SolutionPath:
    """Solve for every beta / lam in `ratios` at once (vmapped), to see how the mixture's
    sparsity changes with the ratio.

    Args:
      pot: from `potentials(...)`; its lam is kept and beta = ratio * lam.
      ratios: [R] positive ratios beta / lam.
      method, floor, cap, tol, max_iter, temperature, optimizer: as in `solve`.

    Returns:
      SolutionPath with a leading axis of size R, including the support size of each solution.

    Example:
      >>> path = solve_path(pot, jnp.geomspace(0.1 / T, 10 / T, 12))
      >>> path.support                          # tasks kept, per ratio
    """
    # pot first: swapped arguments (solve_path(ratios, pot)) are then named as such.
    pot = checked_potentials(pot)
    if is_traced(ratios):
        raise ValueError("ratios: needs concrete values (the grid is vmapped here); call "
                         "solve_path outside jit.")
    ratios_np = real_numpy(ratios, "ratios")
    if ratios_np.ndim > 1:
        raise ValueError(f"ratios: expected a 1-D array of beta / lam, got shape "
                         f"{ratios_np.shape}.")
    ratios_np = ratios_np.reshape(-1)
    if ratios_np.size == 0 or not np.all(np.isfinite(ratios_np)) or np.any(ratios_np <= 0):
        raise ValueError("ratios: expected a non-empty 1-D array of positive, finite beta / lam.")
    _check_options(method, tol=tol, max_iter=max_iter, temperature=temperature,
                   optimizer=optimizer)
    pad, opts = _prepare(pot, method, floor, cap, None, tol, max_iter, temperature)
    dtype = pad["M"].dtype
    optimizer = optimizer or default_softmax_optimizer(opts["max_iter"])
    lam = jnp.asarray(pot.lam, dtype)
    betas = jnp.asarray(ratios_np, dtype) * lam

    def one(beta):
        return _run(pad, opts, method, beta, lam, _lipschitz(pot), optimizer)

    w, e, it, gap, ok, clipped = jax.vmap(one)(betas)
    w = w[:, :pot.num_tasks]
    _check_finite_result(w, method)
    support = jnp.sum(w > 1e-6, axis=1).astype(jnp.int32)
    return SolutionPath(jnp.asarray(ratios_np, dtype), w, e, it, gap, ok, support, method,
                        clipped if method == "closed_form" else None)


def _lipschitz(pot: Potentials):
    # 1% above the estimate: a Lanczos estimate of eig_max is never above the true value, and a
    # step a little short of 1 / L costs only a little speed.
    margin = 1.01 if pot.spectrum == "lanczos" else 1.0 + 1e-6
    return jnp.asarray(pot.lipschitz * margin, pot.matrix.dtype)


@functools.lru_cache(maxsize=8)
def default_softmax_optimizer(max_iter: int) -> optax.GradientTransformation:
    """The softmax solver's optimiser for a run of `max_iter` steps: Adam with a cosine-decayed
    step (0.1 to 1e-4), which lets it settle instead of hovering around the optimum. Its
    schedule depends on `max_iter`: to replay the first k steps of a run, pass this run's
    optimiser (`optimizer=default_softmax_optimizer(n)`) with `max_iter=k`."""
    # Cached: the optimiser is a static jit argument, and a new object would recompile.
    schedule = optax.cosine_decay_schedule(0.1, decay_steps=max_iter, alpha=1e-3)
    return optax.adam(schedule)
