"""Projections onto the (capped) simplex, the Frank-Wolfe gap, and shape padding.

All functions work on padded vectors: `mask` marks the real tasks, padded entries stay exactly 0.
Solvers pad T up to a few bucket sizes so that a test suite or a sweep over many T compiles a
handful of programs instead of one per T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def padded_size(num_tasks: int) -> int:
    """Bucketed T: next power of two from 32 up to 256, then the next multiple of 128 (so that
    T = 1000 costs 1024 and T = 5000 costs 5120: at most 2.5% extra work above 256)."""
    if num_tasks <= 256:
        return max(32, 1 << (num_tasks - 1).bit_length())
    return -(-num_tasks // 128) * 128


def pad_vector(x, size: int, value=0.0):
    return jnp.pad(x, (0, size - x.shape[0]), constant_values=value)


def pad_matrix(m, size: int):
    extra = size - m.shape[0]
    return jnp.pad(m, ((0, extra), (0, extra)))


def project_simplex(x, mask):
    """Euclidean projection of the masked entries of x onto the unit simplex (optax's sort-based
    projection); padded entries are 0.

    Padded entries are set to max(x) - 2 before projecting: the threshold of the projection is
    at least max(x) - 1 (the largest entry gets at most mass 1), so they land exactly on 0.
    """
    top = jnp.max(jnp.where(mask, x, -jnp.inf))
    x = jnp.where(mask, x, top - 2.0)
    return jnp.where(mask, optax.projections.projection_simplex(x), 0.0)


def project_capped_simplex(x, mask, lower, upper):
    """Euclidean projection onto {lower <= w <= upper, sum(w) = 1} over the masked entries.

    The projection is clip(x - tau, lower, upper) with tau the root of the decreasing function
    phi(tau) = sum clip(x - tau, lower, upper) - 1. Bisection brackets tau; a final exact step
    solves phi = 0 on the entries strictly between their bounds, so the sum is 1 to rounding.
    Requires sum(lower) <= 1 <= sum(upper) (checked at the API boundary); padded entries must
    have lower = upper = 0.
    """
    lower = jnp.where(mask, lower, 0.0)
    upper = jnp.where(mask, upper, 0.0)
    xm = jnp.where(mask, x, 0.0)
    lo = jnp.min(jnp.where(mask, x - upper, jnp.inf)) - 1.0   # phi(lo) >= 0
    hi = jnp.max(jnp.where(mask, x - lower, -jnp.inf)) + 1.0  # phi(hi) <= 0

    def phi(tau):
        return jnp.sum(jnp.clip(xm - tau, lower, upper)) - 1.0

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        above = phi(mid) > 0
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    # Enough halvings to shrink the bracket to the dtype's resolution.
    steps = jnp.finfo(x.dtype).nmant + 12
    lo, hi = jax.lax.fori_loop(0, steps, bisect, (lo, hi))
    tau = 0.5 * (lo + hi)
    free = mask & (xm - tau > lower) & (xm - tau < upper)
    at_lower = mask & (xm - tau <= lower)
    at_upper = mask & (xm - tau >= upper)
    fixed_mass = jnp.sum(jnp.where(at_lower, lower, 0.0)) + jnp.sum(jnp.where(at_upper, upper, 0.0))
    n_free = jnp.sum(free)
    exact_tau = (jnp.sum(jnp.where(free, xm, 0.0)) - (1.0 - fixed_mass)) / jnp.maximum(n_free, 1)
    tau = jnp.where(n_free > 0, exact_tau, tau)
    return jnp.where(mask, jnp.clip(xm - tau, lower, upper), 0.0)


def frank_wolfe_gap(w, grad, mask, lower=None, upper=None):
    """max over feasible s of grad . (w - s): zero exactly at a KKT point and, for a convex
    energy, an upper bound on E(w) - min E. With bounds the minimising vertex s fills the
    remaining mass 1 - sum(lower) into the tasks of smallest gradient, each up to its cap.
    """
    g = jnp.where(mask, grad, jnp.inf)
    g_min = jnp.min(g)
    # Centre on min(grad) first: w and s both sum to 1, and a large common gradient would
    # otherwise cancel in float32.
    centred = jnp.where(mask, grad - g_min, 0.0)
    if lower is None:
        return jnp.sum(w * centred)
    room = jnp.where(mask, upper - lower, 0.0)
    order = jnp.argsort(g)
    room_sorted = room[order]
    before = jnp.cumsum(room_sorted) - room_sorted
    remaining = 1.0 - jnp.sum(jnp.where(mask, lower, 0.0))
    fill_sorted = jnp.clip(remaining - before, 0.0, room_sorted)
    s = jnp.where(mask, lower, 0.0).at[order].add(fill_sorted)
    return jnp.sum(jnp.where(mask, (w - s) * centred, 0.0))
