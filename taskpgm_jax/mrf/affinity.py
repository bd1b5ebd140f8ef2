"""Task affinities and the PSD repair that makes the MRF energy convex (DESIGN.md 4).

`pmi_affinity` lives with the cross-likelihood kernel (taskpgm_jax.divergence.crosslik) and is
re-exported by `taskpgm_jax.mrf`; it is not redefined here.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from taskpgm_jax.mrf._spectrum import extreme_eigenvalues
from taskpgm_jax.mrf._validate import (as_float_array, check_finite, check_nonnegative,
                                       check_positive, check_square, eager_when_concrete,
                                       is_traced)

LN2 = math.log(2.0)
DEFAULT_RELATIVE_RIDGE = 1e-5
SYMMETRY_TOL = 1e-5
SPECTRA = ("auto", "dense", "lanczos")
# The task-level affinities `affinity_from_jsd` builds from a JSD matrix.
AffinityKind = Literal["linear", "rbf"]


@eager_when_concrete
def affinity_from_jsd(divergence: ArrayLike | Sequence[Sequence[float]],
                      kind: AffinityKind = "linear",
                      tau: float | None = None) -> jax.Array:
    """Task affinity from a task-level JSD matrix D (nats).

    kind="linear": S = 1 - D / ln 2, in [0, 1], no hyperparameter (the default).
    kind="rbf":    S = exp(-D / tau), tau > 0 required.

    Args:
      divergence: [T, T] D from `taskpgm_jax.divergence.pairwise_jsd`, entries in [0, ln 2].
      kind: "linear" or "rbf".
      tau: the RBF temperature in nats; only for kind="rbf".

    Returns:
      [T, T] affinity: float64 for float64 input under x64, float32 otherwise (bfloat16 and
      float16 inputs are upcast).

    Example:
      >>> S = affinity_from_jsd(pairwise_jsd(logprobs))            # 1 on the diagonal
      >>> S = affinity_from_jsd(D, kind="rbf", tau=0.05)
    """
    D = as_float_array(divergence, "divergence", ndim=2)
    check_square(D, "divergence")
    check_finite(D, "divergence")
    if not is_traced(D):
        lo, hi = float(jnp.min(D)), float(jnp.max(D))
        # A little slack for float32 rounding of values computed at exactly 0 or ln 2.
        slack = 1e-5 * LN2
        if lo < -slack or hi > LN2 + slack:
            raise ValueError(f"divergence: JSD values must lie in [0, ln 2 = {LN2:.6f}] nats, got "
                             f"[{lo:.6g}, {hi:.6g}]; pass nats (natural log), not bits or "
                             "square-root distances.")
    if kind == "linear":
        if tau is not None:
            raise ValueError("tau: only used with kind='rbf'; leave it None for 'linear'.")
        return 1.0 - D / LN2
    if kind == "rbf":
        if tau is None:
            raise ValueError("tau: kind='rbf' needs a temperature tau > 0 (nats), e.g. the "
                             "median off-diagonal divergence.")
        return jnp.exp(-D / check_positive(tau, "tau"))
    raise ValueError(f"kind: expected 'linear' or 'rbf', got {kind!r}.")


class PSDRepair(NamedTuple):
    """sym(S) shifted to positive definite: matrix = sym(S) + shift * I.

    matrix:   [T, T] float, S~.
    shift:    the added diagonal, max(0, -eig_min) + ridge.
    ridge:    the part of `shift` beyond making S~ PSD.
    eig_min, eig_max: extreme eigenvalues of sym(S) (before the shift).
    spectrum: "dense" (exact) or "lanczos" (estimated) eigenvalues.
    """

    matrix: jax.Array
    shift: float
    ridge: float
    eig_min: float
    eig_max: float
    spectrum: str


def symmetric_part(affinity, name: str = "affinity", *, sym_tol: float = SYMMETRY_TOL):
    """(S + S^T) / 2 after checking that S is square, finite and symmetric up to `sym_tol`
    relative to max |S| (an asymmetric input is usually the wrong matrix, e.g. L instead of S)."""
    S = as_float_array(affinity, name, ndim=2)
    check_square(S, name)
    if is_traced(S):
        return _symmetrise(S)
    finite, scale, asym = _symmetry_stats(S)
    if not bool(finite):
        check_finite(S, name)  # raises, with the message every non-finite input gets
    scale, asym = float(scale), float(asym)
    if asym > sym_tol * max(scale, 1e-30):
        raise ValueError(f"{name}: not symmetric (max |S - S^T| = {asym:.3g}, {asym / scale:.2g} "
                         f"of max |S|; tolerance {sym_tol:g}). Pass a symmetric affinity, or "
                         "symmetrise it yourself with (S + S.T) / 2 if that is intended.")
    # An exactly symmetric S is its own symmetric part: skip a transposing pass (~1 s at T = 1e4).
    return S if asym == 0 else _symmetrise(S)


@jax.jit
def _symmetry_stats(S):
    """(all finite, max |S|, max |S - S^T|), in one fused pass over S."""
    return jnp.all(jnp.isfinite(S)), jnp.max(jnp.abs(S)), jnp.max(jnp.abs(S - S.T))


@jax.jit
def _symmetrise(S):
    return 0.5 * (S + S.T)


@jax.jit
def _add_to_diagonal(S, shift):
    return S + shift * jnp.eye(S.shape[0], dtype=S.dtype)  # fused: no T x T identity is stored


@eager_when_concrete
def psd_repair(affinity: ArrayLike | Sequence[Sequence[float]], ridge: float | None = None, *,
               spectrum: Literal["auto", "dense", "lanczos"] = "auto") -> PSDRepair:
    """Symmetrise S and shift its spectrum so that S~ is positive definite (DESIGN.md 4).

    S~ = sym(S) + (max(0, -eig_min) + ridge) I. A shift of exactly |eig_min| leaves S~ singular
    (the authors' closed form then returns "mixtures" summing to 0.66 ... 4.85), hence ridge > 0.

    Args:
      affinity: [T, T] S, symmetric up to 1e-5 relative (see `symmetric_part`).
      ridge: extra diagonal; None means 1e-5 x the spectral radius of sym(S) (scale-free, and
        well above the float32 error of the eigenvalue estimate); 0 is allowed.
      spectrum: how eig_min is found: "dense", "lanczos" or "auto" (dense up to T = 2048).

    Returns:
      PSDRepair with the matrix and the shift it applied.

    Example:
      >>> rep = psd_repair(S)                  # S indefinite (e.g. PMI)
      >>> rep.shift, rep.eig_min               # shift = -eig_min + ridge
    """
    if spectrum not in SPECTRA:  # checked here: the eigenvalue helper calls it `method`
        raise ValueError(f"spectrum: expected one of {SPECTRA}, got {spectrum!r}.")
    S = symmetric_part(affinity)
    if is_traced(S):
        raise ValueError("affinity: psd_repair reads the spectrum of S, so it runs outside jit; "
                         "build the potentials before entering your jitted code.")
    eig_min, eig_max, how = extreme_eigenvalues(S, method=spectrum)
    if ridge is None:
        radius = max(abs(eig_min), abs(eig_max))
        # S = 0 has radius 0: any positive ridge then makes S~ definite.
        ridge = DEFAULT_RELATIVE_RIDGE * radius if radius > 0 else DEFAULT_RELATIVE_RIDGE
    else:
        ridge = check_nonnegative(ridge, "ridge")
    shift = max(0.0, -eig_min) + ridge
    matrix = _add_to_diagonal(S, jnp.asarray(shift, S.dtype))
    return PSDRepair(matrix, shift, ridge, eig_min, eig_max, how)
