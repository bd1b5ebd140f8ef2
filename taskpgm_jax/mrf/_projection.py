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


# |sum(w) - 1| above this is reported as not converged: a float32 sum of a mixture is good to a
# few ulps of 1, so anything larger is a projection that lost its digits.
SUM_TOL = 1e-6


def _fix_sum(w, free, lower=0.0, upper=1.0):
    """Spread the leftover 1 - sum(w) evenly over the free entries (the projection's rounding
    lands there; entries on a bound stay exactly on it)."""
    n_free = jnp.maximum(jnp.sum(free), 1).astype(w.dtype)
    w = jnp.where(free, w + (1.0 - jnp.sum(w)) / n_free, w)
    return jnp.where(free, jnp.clip(w, lower, upper), w)


def project_simplex(x, mask):
    """Euclidean projection of the masked entries of x onto the unit simplex (optax's sort-based
    projection); padded entries are 0. Returns x's dtype.

    The projection ignores a constant added to every entry, so x is shifted to max(x) = 0 first:
    the support then holds entries in [-1, 0], and inputs of size 1e4 (closed form at large
    beta / lam) do not cancel in float32. Padded entries are set to -2, below any threshold.
    """
    top = jnp.max(jnp.where(mask, x, -jnp.inf))
    x = jnp.where(mask, x - top, -2.0)
    # optax computes in float64 under x64 whatever x's dtype; bring it back.
    w = jnp.where(mask, optax.projections.projection_simplex(x).astype(x.dtype), 0.0)
    return _fix_sum(w, mask & (w > 0))


def project_capped_simplex(x, mask, lower, upper):
    """Euclidean projection onto {lower <= w <= upper, sum(w) = 1} over the masked entries.

    The projection is clip(x - tau, lower, upper) with tau the root of the decreasing function
    phi(tau) = sum clip(x - tau, lower, upper) - 1. Bisection brackets tau; then x is centred on
    that estimate (the difference of nearby floats is exact, so entries near the root keep their
    digits even when x is 1e4) and exact steps solve phi = 0 on the entries strictly between
    their bounds, so the sum is 1 to rounding.
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
    z = jnp.where(mask, xm - 0.5 * (lo + hi), 0.0)

    def exact_step(_, delta):
        # phi is linear on the entries strictly inside their bounds: solve it there. The
        # bisection left delta within rounding of the root, so two steps settle the free set.
        free = mask & (z - delta > lower) & (z - delta < upper)
        fixed = jnp.where(mask & ~free, jnp.clip(z - delta, lower, upper), 0.0)
        n_free = jnp.sum(free)
        step = ((jnp.sum(jnp.where(free, z, 0.0)) - (1.0 - jnp.sum(fixed)))
                / jnp.maximum(n_free, 1).astype(x.dtype))
        return jnp.where(n_free > 0, step, delta)

    delta = jax.lax.fori_loop(0, 2, exact_step, jnp.zeros((), x.dtype))
    w = jnp.where(mask, jnp.clip(z - delta, lower, upper), 0.0)
    w = _fix_sum(w, mask & (w > lower) & (w < upper), lower, upper)
    w = _fill_leftover(w, z, mask, lower, upper)
    # The fill's leftover was computed at the size of a sum far from 1 (an over-full 1.8 when
    # every entry had landed on a bound), so its rounding (~1e-6) remains; computed again near 1
    # it goes to the entries the fill left free.
    return _fix_sum(w, mask & (w > lower) & (w < upper), lower, upper)


def _fill_leftover(w, z, mask, lower, upper):
    """Feasibility when rounding left no free entry to take the leftover (inputs ~1e6 resolve
    tau only to ~0.06 in float32, so an entry that should sit just above its floor can land on
    it): the leftover 1 - sum(w) goes to the entries nearest to moving, in order of z (largest
    first when mass is missing, smallest first when there is too much), each up to its bound."""
    leftover = 1.0 - jnp.sum(w)
    up = leftover > 0
    room = jnp.where(mask, jnp.where(up, upper - w, w - lower), 0.0)
    key = jnp.where(mask, jnp.where(up, -z, z), jnp.inf)
    order = jnp.argsort(key)
    room_sorted = room[order]
    before = jnp.cumsum(room_sorted) - room_sorted
    take = jnp.clip(jnp.abs(leftover) - before, 0.0, room_sorted)
    change = jnp.zeros_like(w).at[order].add(take)
    return w + jnp.where(up, change, -change)


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
