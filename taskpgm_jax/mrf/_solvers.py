"""Jitted solver cores on padded inputs: exact (accelerated projected gradient), closed form
(KKT with the equality constraint, then projection) and softmax (Optax on the logits).

Shared conventions. M: [P, P] S~ padded with zeros; u: [P] unary padded with zeros; mask: [P]
real tasks; beta, lam: scalars (traced, so `solve_path` can vmap over them); lower / upper: [P]
bounds (0 / 1 when unbounded). Every core returns
(weights, energy, iterations, kkt_residual, converged, clipped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from taskpgm_jax.mrf._precision import full_float32
from taskpgm_jax.mrf._projection import (SUM_TOL, frank_wolfe_gap, project_capped_simplex,
                                         project_simplex)

HIGHEST = jax.lax.Precision.HIGHEST


def _matvec(M, w):
    return jnp.dot(M, w, precision=HIGHEST)


# The exact solver's iterates and CG directions live on the support of the mixture, which is
# usually a few dozen tasks out of thousands. Below this many non-zeros, M w is taken from the
# rows of M on the support (M is symmetric): O(T * cap) instead of O(T^2) per product.
_SPARSE_CAP = 256


def _support_matvec(M, w, *, absolute: bool = False):
    """M @ w (|M| @ w with `absolute`) for symmetric M, from the rows on the support of w when
    it is small."""
    size = w.shape[0]
    entries = jnp.abs if absolute else (lambda a: a)
    if size <= 2 * _SPARSE_CAP:
        return _matvec(entries(M), w)
    nnz = jnp.sum(w != 0)

    def sparse(_):
        idx = jnp.nonzero(w, size=_SPARSE_CAP, fill_value=0)[0]
        vals = jnp.where(jnp.arange(_SPARSE_CAP) < nnz, w[idx], 0.0)
        return jnp.dot(vals, entries(M[idx]), precision=HIGHEST)

    return jax.lax.cond(nnz <= _SPARSE_CAP, sparse, lambda _: _matvec(entries(M), w), None)


def _energy_parts(w, Mw, u, beta, lam):
    """(energy, scale): scale = |unary term| + |pairwise term| is the yardstick of the relative
    tolerance, so that stopping does not depend on the units of S or on an energy near 0."""
    lin = beta * jnp.dot(u, w)
    quad = 0.5 * lam * jnp.dot(w, Mw)
    return quad - lin, jnp.abs(lin) + jnp.abs(quad) + jnp.finfo(w.dtype).tiny


def _face_step(M, u, beta, lam, mask, lower, upper, w, Mw, face, *, cg_iters: int):
    """Minimise E over the current face (the free tasks, others fixed) by conjugate gradients,
    then move towards that minimiser as far as the bounds allow.

    Projected gradient alone crawls along the flat directions of an ill-conditioned face (a
    low-rank affinity plus a small ridge has curvature ratios of 1e5); CG removes them in about
    as many matrix-vector products as there are free tasks (More and Toraldo's GPCG idea).
    Directions keep sum(d) = 0 on the face, so the iterate stays on the simplex.
    """
    n_face = jnp.maximum(jnp.sum(face), 1)

    def proj(v):
        v = jnp.where(face, v, 0.0)
        return jnp.where(face, v - jnp.sum(v) / n_face, 0.0)

    r0 = -proj(lam * Mw - beta * u)
    rr0 = jnp.dot(r0, r0)
    tiny = jnp.finfo(w.dtype).tiny

    # Relative residual sqrt(eps) is as far as float32 CG resolves. On an ill-conditioned face
    # the recurrences lose orthogonality before that and the residual can blow up, so the
    # iterate with the smallest residual is kept, and a residual 1e6 x the start ends the
    # solve; the outer loop calls it again if more is needed.
    stop = jnp.finfo(w.dtype).eps * rr0

    def cond(c):
        k, _, _, _, rr, _, _ = c
        return (k < cg_iters) & (rr > stop) & (rr > tiny) & (rr < 1e6 * rr0)

    def body(c):
        k, x, r, p, rr, best_x, best_rr = c
        Ap = proj(lam * _support_matvec(M, p))
        curv = jnp.dot(p, Ap)
        alpha = jnp.where(curv > tiny, rr / jnp.where(curv > tiny, curv, 1.0), 0.0)
        x, r = x + alpha * p, r - alpha * Ap
        rr_new = jnp.dot(r, r)
        p = proj(r + (rr_new / jnp.maximum(rr, tiny)) * p)
        improved = rr_new < best_rr
        best_x = jnp.where(improved, x, best_x)
        best_rr = jnp.where(improved, rr_new, best_rr)
        # A direction of zero curvature ends the solve (only with ridge = 0).
        k = jnp.where(curv > tiny, k + 1, cg_iters)
        return k, x, r, p, rr_new, best_x, best_rr

    zero = jnp.zeros_like(w)
    *_, x, _ = jax.lax.while_loop(cond, body, (0, zero, r0, r0, rr0, zero, rr0))
    x = proj(x)  # sum(x) = 0 again after rounding
    # Ratio test: the longest step in [0, 1] along x that keeps every weight within its bounds.
    down = face & (x < 0)
    up = face & (x > 0)
    t_down = jnp.min(jnp.where(down, (w - lower) / jnp.where(down, -x, 1.0), jnp.inf))
    t_up = jnp.min(jnp.where(up, (upper - w) / jnp.where(up, x, 1.0), jnp.inf))
    t = jnp.clip(jnp.minimum(t_down, t_up), 0.0, 1.0)
    w_new = jnp.clip(w + t * x, lower, upper)
    # The blocking tasks land on their bound exactly: rounding would otherwise leave them a
    # hair inside, still free, and the next face step would be blocked by them again at t ~ 0.
    hit_down = down & ((w - lower) <= t * -x)
    hit_up = up & ((upper - w) <= t * x)
    w_new = jnp.where(hit_down & (t < 1), lower, jnp.where(hit_up & (t < 1), upper, w_new))
    w_new = jnp.where(mask, w_new, 0.0)
    return w_new, _support_matvec(M, w_new), t, x


@functools.partial(jax.jit, static_argnames=("bounded", "max_iter", "cg_iters", "max_drops"))
@full_float32
def exact_core(M, u, beta, lam, lipschitz, mask, lower, upper, w0, tol, *, bounded: bool,
               max_iter: int, cg_iters: int = 64, max_drops: int = 64):
    """Accelerated projected gradient (FISTA) with restart, plus conjugate-gradient steps on
    the face once the set of free tasks stops changing.

    M y for the extrapolated point follows from M w by linearity, so a gradient step costs one
    matrix-vector product. A momentum step that raises the energy (measured from the step, not
    as a difference of energies) is discarded and momentum reset (O'Donoghue and Candes 2015);
    a plain step of size 1 / L never raises it for convex E. Stops when the Frank-Wolfe gap (a
    KKT residual that bounds E(w) - E*) <= tol * scale, or at the gap's float rounding floor.
    """
    def project(x):
        if bounded:
            return project_capped_simplex(x, mask, lower, upper)
        return project_simplex(x, mask)

    def project_face(x, face, w):
        # Tasks off the face stay where they are (on a bound).
        if bounded:
            return project_capped_simplex(x, mask, jnp.where(face, lower, w),
                                          jnp.where(face, upper, w))
        return project_simplex(x, face)

    def gap_of(w, Mw):
        g = lam * Mw - beta * u
        return frank_wolfe_gap(w, g, mask, *((lower, upper) if bounded else ()))

    def free_set(w):
        return mask & (w > lower) & (w < upper) if bounded else mask & (w > 0)

    def rise_of(w_new, Mw_new, w, Mw):
        # E(w_new) - E(w) from the step itself: subtracting two energies would lose every digit
        # below float32 rounding of E, and restarts decided by rounding noise stall the method.
        h = 0.5 * lam * (Mw_new + Mw) - beta * u
        return jnp.dot(w_new - w, h - jnp.dot(w, h))  # centred: sum(w_new - w) = 0

    def limit_of(w, Mw, gap):
        # Stop at tol relative to the energy's terms, or at the rounding floor of the gap:
        # g = lam M w - beta u is formed from terms of size lam (|M| w)_i and |beta u_i| (and a
        # one-ulp change of w moves g by as much), so the gap cannot be resolved below a few
        # ulps of them. |M| w <= max|M| (w >= 0 sums to 1) bounds the floor for free; the exact
        # |M| w costs a product, taken only once the gap is down to that bound.
        _, scale = _energy_parts(w, Mw, u, beta, lam)
        ulps = 4.0 * jnp.finfo(M.dtype).eps
        unary_terms = jnp.max(jnp.abs(beta * u))
        coarse = ulps * (lam * max_abs_m + unary_terms)

        def fine(_):
            return ulps * (lam * jnp.max(_support_matvec(M, w, absolute=True)) + unary_terms)

        floor = jax.lax.cond(gap <= coarse, fine, lambda _: coarse, None)
        return jnp.maximum(tol * scale, floor)

    step = 1.0 / jnp.maximum(lipschitz, jnp.finfo(M.dtype).tiny)
    max_abs_m = jnp.max(jnp.abs(M))
    w0 = project(w0)
    Mw0 = _support_matvec(M, w0)
    one = jnp.ones((), M.dtype)
    gap0 = gap_of(w0, Mw0)
    init = (w0, Mw0, w0, Mw0, one, free_set(w0), jnp.int32(0), jnp.int32(0), gap0,
            limit_of(w0, Mw0, gap0))

    def cond(state):
        *_, it, gap, limit = state
        return (it < max_iter) & (gap > limit)

    def body(state):
        w, Mw, y, My, t, face, stable, it, _, _ = state
        g = lam * My - beta * u
        # Projections ignore a constant added to every entry (sum(w) = 1 is fixed); removing the
        # weighted mean keeps float32 steps from being swamped by a large common gradient.
        w_new = project(y - step * (g - jnp.dot(y, g)))
        Mw_new = _support_matvec(M, w_new)
        restart = (t > 1) & (rise_of(w_new, Mw_new, w, Mw) > 0)
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        mom = (t - 1.0) / t_next
        keep = lambda old, new: jnp.where(restart, old, new)  # noqa: E731
        w2, Mw2 = keep(w, w_new), keep(Mw, Mw_new)
        y2 = keep(w, w_new + mom * (w_new - w))
        My2 = keep(Mw, Mw_new + mom * (Mw_new - Mw))
        t2 = keep(one, t_next)
        face2 = free_set(w2)
        stable = jnp.where(jnp.all(face2 == face) & ~restart, stable + 1, 0)
        # Face solves cost up to cg_iters products with M; on a large face (dense products)
        # they wait until projected steps have left the face unchanged a few times.
        large = jnp.sum(face2) > _SPARSE_CAP
        settled = stable >= jnp.where(large, 4, 1)

        def polish(_):
            # Active-set descent on the face: minimise over the free tasks; when a task blocks
            # the step it leaves the face and the smaller face is minimised, until a face
            # minimiser lies inside the bounds (or max_drops faces were tried).
            def inner_cond(c):
                k, _, _, _, done = c
                return (k < max_drops) & ~done

            def inner_body(c):
                k, w, Mw, face, _ = c
                w3, Mw3, t, x = _face_step(M, u, beta, lam, mask, lower, upper, w, Mw, face,
                                           cg_iters=cg_iters)

                def projected_search(_):
                    # The ratio test drops one blocking task per face solve; projecting the
                    # face minimiser w + x onto the feasible set drops all of them at once
                    # (More and Toraldo's projected search), which from a dense start saves
                    # most of the face solves. Taken only when it lowers the energy further.
                    wp = project_face(w + x, face, w)
                    Mwp = _support_matvec(M, wp)
                    take = rise_of(wp, Mwp, w3, Mw3) < 0
                    return jnp.where(take, wp, w3), jnp.where(take, Mwp, Mw3)

                w3, Mw3 = jax.lax.cond(t < 1, projected_search, lambda _: (w3, Mw3), None)
                better = rise_of(w3, Mw3, w, Mw) <= 0
                w3, Mw3 = jnp.where(better, w3, w), jnp.where(better, Mw3, Mw)
                face3 = free_set(w3)
                done = ~better | (t >= 1) | jnp.all(face3 == face)
                return k + 1, w3, Mw3, face3, done

            _, w3, Mw3, _, _ = jax.lax.while_loop(
                inner_cond, inner_body, (0, w2, Mw2, face2, jnp.bool_(False)))
            return w3, Mw3, w3, Mw3, one  # momentum restarts from the polished point

        w2, Mw2, y2, My2, t2 = jax.lax.cond(settled, polish, lambda _: (w2, Mw2, y2, My2, t2),
                                            None)
        stable = jnp.where(settled, 0, stable)
        gap2 = gap_of(w2, Mw2)
        return (w2, Mw2, y2, My2, t2, free_set(w2), stable, it + 1, gap2,
                limit_of(w2, Mw2, gap2))

    w, Mw, _, _, _, _, _, it, gap, limit = jax.lax.while_loop(cond, body, init)
    e, _ = _energy_parts(w, Mw, u, beta, lam)
    # A mixture that does not sum to 1 is not a solution, whatever the gap says.
    ok = (gap <= limit) & (jnp.abs(jnp.sum(w) - 1.0) <= SUM_TOL)
    return w, e, it, gap, ok, jnp.bool_(False)


@functools.partial(jax.jit, static_argnames=("bounded",))
@full_float32
def closed_form_core(M, u, beta, lam, mask, lower, upper, *, bounded: bool):
    """w = (lam S~)^-1 (beta u - nu 1) with 1^T w = 1, then the Euclidean projection.

    One Cholesky factorisation serves both right-hand sides (u and 1). Padded rows get an
    identity block, and a zero right-hand side, so they do not touch the real solution.

    The formula subtracts two large vectors when S~ is nearly singular along a direction that 1
    does not cancel (a PMI affinity repaired with a small ridge: condition ~1e5): in float32 the
    weights then came out ~1e-2 off. The system it solves (lam S~ w + nu 1 = beta u, 1^T w = 1)
    is itself well conditioned on the simplex, so two steps of iterative refinement on its
    residual, with the same factorisation, bring the weights to float32 accuracy.
    """
    dtype = M.dtype
    Mp = M + jnp.diag(jnp.where(mask, 0.0, 1.0).astype(dtype))
    ones = mask.astype(dtype)
    factor = jax.scipy.linalg.cho_factor(Mp, lower=True)
    b = jax.scipy.linalg.cho_solve(factor, ones)
    sum_b = jnp.sum(b)

    def kkt_solve(rhs, total):
        """(dw, dnu) with lam M dw + dnu 1 = rhs and 1^T dw = total."""
        a = jax.scipy.linalg.cho_solve(factor, rhs)
        dnu = (jnp.sum(a) - lam * total) / sum_b
        return jnp.where(mask, (a - dnu * b) / lam, 0.0), dnu

    raw, nu = kkt_solve(jnp.where(mask, beta * u, 0.0), 1.0)
    for _ in range(2):
        residual = jnp.where(mask, beta * u - lam * _matvec(M, raw) - nu * ones, 0.0)
        dw, dnu = kkt_solve(residual, 1.0 - jnp.sum(raw))
        raw, nu = raw + dw, nu + dnu
    w = project_capped_simplex(raw, mask, lower, upper) if bounded else project_simplex(raw, mask)
    # "Clipped" = a raw weight lies outside its bounds by more than rounding of the raw vector
    # (a few ulps of its largest entry) explains; lower / upper are 0 / 1 when unbounded.
    slack = 8 * jnp.finfo(dtype).eps * jnp.max(jnp.abs(raw))
    clipped = jnp.any(mask & ((raw < lower - slack) | (raw > upper + slack)))
    Mw = _matvec(M, w)
    e, _ = _energy_parts(w, Mw, u, beta, lam)
    gap = frank_wolfe_gap(w, lam * Mw - beta * u, mask, *((lower, upper) if bounded else ()))
    ok = jnp.all(jnp.isfinite(raw)) & (jnp.abs(jnp.sum(w) - 1.0) <= SUM_TOL)
    return w, e, jnp.int32(1), gap, ok, clipped


@functools.partial(jax.jit, static_argnames=("optimizer", "max_iter"))
@full_float32
def softmax_core(M, u, beta, lam, mask, theta0, temperature, tol, *,
                 optimizer: optax.GradientTransformation, max_iter: int):
    """w = softmax(theta / temperature); theta minimised by an Optax optimiser inside a
    while_loop, stopped on the Frank-Wolfe gap of w like the exact solver."""
    def weights(theta):
        return jax.nn.softmax(jnp.where(mask, theta / temperature, -jnp.inf))

    def objective(theta):
        w = weights(theta)
        Mw = _matvec(M, w)
        e, scale = _energy_parts(w, Mw, u, beta, lam)
        return e, (w, Mw, scale)

    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def measure(theta):
        (e, (w, Mw, scale)), grad = value_and_grad(theta)
        gap = frank_wolfe_gap(w, lam * Mw - beta * u, mask)
        return grad, gap, scale

    grad0, gap0, scale0 = measure(theta0)
    init = (theta0, optimizer.init(theta0), grad0, jnp.int32(0), gap0, scale0)

    def cond(state):
        *_, it, gap, scale = state
        return (it < max_iter) & (gap > tol * scale)

    def body(state):
        theta, opt_state, grad, it, _, _ = state
        updates, opt_state = optimizer.update(grad, opt_state, theta)
        theta = optax.apply_updates(theta, updates)
        grad, gap, scale = measure(theta)
        return theta, opt_state, grad, it + 1, gap, scale

    theta, _, _, it, gap, scale = jax.lax.while_loop(cond, body, init)
    w = weights(theta)
    e, _ = _energy_parts(w, _matvec(M, w), u, beta, lam)
    return w, e, it, gap, gap <= tol * scale, jnp.bool_(False)
