"""Extreme eigenvalues of a symmetric matrix: the PSD shift and the solvers' step size need the
smallest and the largest, never the whole spectrum.

Small matrices use a dense float64 `eigvalsh` on the host (exact, ~0.2 s at T = 1000). Above
`DENSE_MAX` a full eigendecomposition costs tens of seconds on a CPU (25 s at T = 5000), so a
jitted Lanczos iteration with full re-orthogonalisation estimates both ends from at most
LANCZOS_STEPS matrix-vector products, stopping as soon as both extreme Ritz pairs have converged
(64-150 products on the matrices tried, T = 300 ... 10^4: each product reads the whole matrix, so
that is most of the cost; 1.1 s instead of 4 s at T = 10^4).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from taskpgm_jax.mrf._precision import full_float32

DENSE_MAX = 2048
LANCZOS_STEPS = 256
# Convergence is tested every LANCZOS_BLOCK steps once LANCZOS_MIN_STEPS are done: both extreme
# Ritz values must have residual bounds under LANCZOS_TOL x the spectral radius (10x under the
# PSD repair's default ridge of 1e-5 x radius, so the repaired matrix stays definite). The
# minimum guards against stopping on an interior eigenvalue before the Krylov space has reached
# the true extremes (a Ritz value converges to *an* eigenvalue; the extreme ones come first).
LANCZOS_BLOCK = 16
LANCZOS_MIN_STEPS = 64
LANCZOS_TOL = 1e-6


def _tridiagonal(alphas, betas, alive):
    """The Lanczos tridiagonal, padded to full size: rows after a breakdown (or not yet reached)
    get the first Ritz value alpha_0 on the diagonal and no coupling, which lies inside the
    spectrum and so moves neither end."""
    diag = jnp.where(alive, alphas, alphas[0])
    off = betas[:-1] * alive[1:]
    return jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)


@functools.partial(jax.jit, static_argnames=("steps", "block", "min_steps"))
@full_float32
def _lanczos_extremes(matrix, *, steps: int, block: int = LANCZOS_BLOCK,
                      min_steps: int = LANCZOS_MIN_STEPS, tol: float = LANCZOS_TOL):
    """(min, max) Ritz values of `matrix` and the number of Lanczos rows used (at most `steps`,
    from a fixed random start, with full re-orthogonalisation), stopping early once both extreme
    Ritz pairs have converged (residual bound beta_k |y_k| <= tol x the largest |Ritz value|).

    Ritz values lie inside the spectrum and the extreme ones converge first. Every matrix-vector
    product reads the whole matrix, so at large T the steps saved are most of the cost.
    """
    n = matrix.shape[0]
    dtype = matrix.dtype
    v0 = jax.random.normal(jax.random.PRNGKey(0), (n,), dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((steps + 1, n), dtype).at[0].set(v0)
    eps = jnp.finfo(dtype).eps

    def step(carry, i):
        basis, alphas, betas, alive, prev_beta = carry
        v = basis[i]
        w = matrix @ v
        alpha = jnp.dot(w, v)
        # Full re-orthogonalisation (twice is enough, Kahan-Parlett) keeps the Ritz values from
        # turning into ghost copies; rows not yet filled are zero and project out nothing.
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(jnp.abs(alpha), prev_beta) + jnp.finfo(dtype).tiny
        ok = alive[i] & (beta > 64 * eps * scale)
        basis = basis.at[i + 1].set(jnp.where(ok, w / jnp.where(ok, beta, 1.0), 0.0))
        beta = jnp.where(ok, beta, 0.0)
        alphas = alphas.at[i].set(alpha)
        betas = betas.at[i].set(beta)
        # alive[i]: row i is a real Lanczos row; a breakdown ends the rows after it.
        alive = alive.at[i + 1].set(ok, mode="drop")
        return (basis, alphas, betas, alive, beta), None

    def rows(alive, done):
        return alive & (jnp.arange(steps) < done)  # rows whose alpha has been computed

    def run_block(state):
        carry, done, _ = state
        carry, _ = jax.lax.scan(step, carry, done + jnp.arange(block))
        done = done + block
        _, alphas, betas, alive, _ = carry
        valid = rows(alive, done)
        ritz, vecs = jnp.linalg.eigh(_tridiagonal(alphas, betas, valid))
        # Residual bound of a Ritz pair of the k x k tridiagonal: beta_k times the last entry of
        # its eigenvector (zero after a breakdown: the Krylov space is then invariant).
        last = jnp.maximum(jnp.sum(valid) - 1, 0)
        radius = jnp.maximum(jnp.abs(ritz[0]), jnp.abs(ritz[-1]))
        residual = betas[last] * jnp.maximum(jnp.abs(vecs[last, 0]), jnp.abs(vecs[last, -1]))
        converged = (done >= min_steps) & (residual <= tol * radius)
        stop = converged | (jnp.sum(valid) < done) | (done >= steps)
        return carry, done, stop

    alive0 = jnp.zeros((steps,), bool).at[0].set(True)
    zeros = jnp.zeros((steps,), dtype)
    carry = (basis, zeros, zeros, alive0, jnp.zeros((), dtype))
    carry, done, _ = jax.lax.while_loop(lambda s: ~s[2], run_block,
                                        (carry, jnp.int32(0), jnp.bool_(False)))
    _, alphas, betas, alive, _ = carry
    valid = rows(alive, done)
    ritz = jnp.linalg.eigvalsh(_tridiagonal(alphas, betas, valid))
    return ritz[0], ritz[-1], jnp.sum(valid)


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
    steps = int(min(n, LANCZOS_STEPS))
    block = min(LANCZOS_BLOCK, steps)
    steps = -(-steps // block) * block  # whole blocks; a breakdown at n ends the run anyway
    lo, hi, _ = _lanczos_extremes(jnp.asarray(matrix), steps=steps, block=block)
    return float(lo), float(hi), "lanczos"
