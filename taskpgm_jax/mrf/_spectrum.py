"""Extreme eigenvalues of a symmetric matrix: the PSD shift and the solvers' step size need the
smallest and the largest, never the whole spectrum.

Small matrices use a dense float64 `eigvalsh` on the host (exact, ~0.2 s at T = 1000). Above
`DENSE_MAX` a full eigendecomposition costs tens of seconds on a CPU (25 s at T = 5000), so a
jitted Lanczos iteration with full re-orthogonalisation estimates both ends from a few hundred
matrix-vector products instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DENSE_MAX = 2048
LANCZOS_STEPS = 256


@functools.partial(jax.jit, static_argnames="steps")
def _lanczos_extremes(matrix, *, steps: int):
    """(min, max) Ritz values of `matrix` after `steps` Lanczos steps from a fixed random start.

    Ritz values lie inside the spectrum and the extreme ones converge first. A breakdown (an
    invariant subspace found before `steps`) leaves the remaining rows zero; those rows get the
    first Ritz value on the diagonal, which lies inside the spectrum and so cannot move either
    end.
    """
    n = matrix.shape[0]
    dtype = matrix.dtype
    v0 = jax.random.normal(jax.random.PRNGKey(0), (n,), dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((steps + 1, n), dtype).at[0].set(v0)

    def step(carry, i):
        basis, prev_beta, alive = carry
        v = basis[i]
        w = matrix @ v
        alpha = jnp.dot(w, v)
        # Full re-orthogonalisation (twice is enough, Kahan-Parlett) keeps the Ritz values from
        # turning into ghost copies; rows not yet filled are zero and project out nothing.
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(jnp.abs(alpha), prev_beta) + jnp.finfo(dtype).tiny
        ok = alive & (beta > 64 * jnp.finfo(dtype).eps * scale)
        basis = basis.at[i + 1].set(jnp.where(ok, w / jnp.where(ok, beta, 1.0), 0.0))
        return (basis, jnp.where(ok, beta, 0.0), ok), (alpha, jnp.where(ok, beta, 0.0), alive)

    _, (alphas, betas, alive) = jax.lax.scan(
        step, (basis, jnp.zeros((), dtype), jnp.bool_(True)), jnp.arange(steps))
    diag = jnp.where(alive, alphas, alphas[0])
    off = betas[:-1] * alive[1:]
    tri = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    ritz = jnp.linalg.eigvalsh(tri)
    return ritz[0], ritz[-1]


def extreme_eigenvalues(matrix, *, method: str = "auto") -> tuple[float, float, str]:
    """Smallest and largest eigenvalue of a symmetric matrix.

    Args:
      matrix: [T, T] symmetric.
      method: "dense" (float64 eigvalsh on the host), "lanczos" (jitted, `LANCZOS_STEPS` steps)
        or "auto" (dense up to T = DENSE_MAX, and whenever the matrix is traced: Lanczos).

    Returns:
      (eig_min, eig_max, method_used); Python floats when the matrix is concrete.

    Example:
      >>> lo, hi, how = extreme_eigenvalues(jnp.eye(3))   # (1.0, 1.0, "dense")
    """
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"method: expected 'auto', 'dense' or 'lanczos', got {method!r}.")
    n = matrix.shape[0]
    if method == "auto":
        method = "dense" if n <= DENSE_MAX else "lanczos"
    if method == "dense":
        eig = np.linalg.eigvalsh(np.asarray(matrix, np.float64))
        return float(eig[0]), float(eig[-1]), "dense"
    lo, hi = _lanczos_extremes(jnp.asarray(matrix), steps=int(min(n, LANCZOS_STEPS)))
    return float(lo), float(hi), "lanczos"
