"""Independent float64 references for the MRF tests: a primal active-set QP solver on the
simplex, scipy's SLSQP (for bounds), and exhaustive search over subsets.

None of this shares code with taskpgm_jax.mrf: it is written from the textbook algorithms.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import minimize


def active_set_simplex_qp(Q, c, *, tol=1e-12, max_iter=None):
    """argmin 1/2 w^T Q w - c^T w over the simplex, Q positive definite (primal active set).

    Returns (w, nu) with the multiplier nu of sum(w) = 1: Q w - c + nu 1 >= 0, = 0 on supp(w).
    """
    Q = np.asarray(Q, np.float64)
    c = np.asarray(c, np.float64)
    n = len(c)
    k = int(np.argmin(0.5 * np.diag(Q) - c))   # best vertex
    w = np.zeros(n)
    w[k] = 1.0
    free = [k]
    for _ in range(max_iter or 20 * n + 20):
        F = np.array(free)
        m = len(F)
        kkt = np.zeros((m + 1, m + 1))
        kkt[:m, :m] = Q[np.ix_(F, F)]
        kkt[:m, m] = 1.0
        kkt[m, :m] = 1.0
        sol = np.linalg.solve(kkt, np.concatenate([c[F], [1.0]]))
        z, nu = sol[:m], sol[m]
        if np.all(z >= -tol):
            w = np.zeros(n)
            w[F] = np.maximum(z, 0.0)
            mu = Q @ w - c + nu
            mu[F] = np.inf
            j = int(np.argmin(mu))
            if mu[j] >= -tol * max(1.0, np.abs(c).max()):
                return w, nu
            free.append(j)
        else:
            d = z - w[F]
            neg = d < 0
            alpha = np.min(w[F][neg] / -d[neg])
            w[F] = w[F] + alpha * d
            w[F][w[F] < 1e-15] = 0.0
            free = [int(i) for i in F if w[i] > 1e-15]
    raise RuntimeError("active set did not converge")


def slsqp_qp(Q, c, lower=None, upper=None, w0=None, ftol=1e-15):
    """The same QP with optional bounds, by scipy's SLSQP (analytic gradient)."""
    n = len(c)
    lower = np.zeros(n) if lower is None else np.broadcast_to(lower, (n,))
    upper = np.ones(n) if upper is None else np.broadcast_to(upper, (n,))
    x0 = np.clip(np.full(n, 1.0 / n) if w0 is None else w0, lower, upper)
    res = minimize(lambda w: 0.5 * w @ Q @ w - c @ w, x0, jac=lambda w: Q @ w - c,
                   method="SLSQP", bounds=list(zip(lower, upper, strict=True)),
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                 "jac": lambda w: np.ones(n)}],
                   options={"ftol": ftol, "maxiter": 2000})
    return res.x


def energy64(w, Q, c):
    w = np.asarray(w, np.float64)
    return 0.5 * w @ Q @ w - c @ w


def set_value(A, beta, u, lam, S):
    """F(A) = beta sum_{i in A} u_i - lam / 2 sum_{i != j in A} S_ij (float64)."""
    A = list(A)
    if not A:
        return 0.0
    sub = S[np.ix_(A, A)]
    return beta * u[A].sum() - 0.5 * lam * (sub.sum() - np.trace(sub))


def best_subset(beta, u, lam, S, costs, budget):
    """Exhaustive max of F over subsets with total cost <= budget (T <= 12)."""
    n = len(u)
    best, best_set = 0.0, ()
    for r in range(1, n + 1):
        for A in itertools.combinations(range(n), r):
            if costs[list(A)].sum() <= budget + 1e-12:
                v = set_value(A, beta, u, lam, S)
                if v > best:
                    best, best_set = v, A
    return best, best_set
