"""MRF potentials and energy over the simplex (DESIGN.md 4).

    E(w) = -beta * u^T w + (lam / 2) * w^T S~ w,    w >= 0, sum(w) = 1,

with S~ the PSD-repaired affinity (`psd_repair`) and u the unary potential: "centrality"
(row sums of S~, the authors' code), "utility" (measured transfer gain, from the cross-likelihood
matrix and the base model's row) or an array. Only beta / lam matters for the minimiser.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from taskpgm_jax.mrf._validate import (as_float_array, check_finite, check_positive,
                                       check_vector, checked_potentials, eager_when_concrete,
                                       register_static_fields)
from taskpgm_jax.mrf.affinity import psd_repair


# The unaries `potentials` computes itself (or pass a [T] array).
UnaryKind = Literal["centrality", "utility"]


class Potentials(NamedTuple):
    """Everything the solvers and the selection need; build it with `potentials(...)`.

    matrix:  [T, T] float32 (float64 for float64 input under x64; bfloat16 / float16 input is
             upcast to float32), S~ = sym(S) + shift * I, positive definite.
    unary:   [T] same dtype, u.
    beta, lam: positive floats, weights of the unary and the pairwise term.
    shift, ridge: the PSD repair applied (shift = max(0, -eig_min) + ridge).
    eig_min, eig_max: extreme eigenvalues of sym(S) before the shift.
    unary_kind: "centrality", "utility" or "array".
    spectrum: "dense" (exact eigenvalues) or "lanczos" (estimated).
    """

    matrix: jax.Array
    unary: jax.Array
    beta: float
    lam: float
    shift: float
    ridge: float
    eig_min: float
    eig_max: float
    unary_kind: str
    spectrum: str

    @property
    def num_tasks(self) -> int:
        return self.matrix.shape[0]

    @property
    def ratio(self) -> float:
        """beta / lam, the only hyperparameter the minimiser depends on."""
        return self.beta / self.lam

    @property
    def lipschitz(self) -> float:
        """lam * largest eigenvalue of S~: the gradient's Lipschitz constant."""
        return self.lam * (self.eig_max + self.shift)

    def with_ratio(self, ratio: float) -> "Potentials":
        """The same potentials with beta = ratio * lam."""
        return self._replace(beta=check_positive(ratio, "ratio") * self.lam)


# The strings are static, so Potentials can be an argument of the caller's jit; the numbers
# (beta, lam, the repair's floats) are leaves and are traced there.
register_static_fields(Potentials, ("unary_kind", "spectrum"))


def utility_unary(cross_likelihood: ArrayLike | Sequence[Sequence[float]],
                  base_likelihood: ArrayLike | Sequence[float]) -> jax.Array:
    """Transfer gain of each task's model: u_i = mean over j != i of L[i, j] - L_base[j].

    Args:
      cross_likelihood: [T, T] L[i, j], model i (trained on task i) on task j's probe examples.
      base_likelihood: [T] the base (not fine-tuned) model on each task's probe examples.

    Returns:
      [T] u; zero for T = 1 (no other task to transfer to).

    Example:
      >>> u = utility_unary(L, L_base)   # u[i] > 0: task i's model helps the other tasks
    """
    L = as_float_array(cross_likelihood, "cross_likelihood", ndim=2)
    if L.shape[0] != L.shape[1]:
        raise ValueError(f"cross_likelihood: expected a square [T, T] matrix, got shape "
                         f"{tuple(L.shape)}.")
    check_finite(L, "cross_likelihood")
    base = check_vector(base_likelihood, "base_likelihood", L.shape[0], dtype=L.dtype)
    T = L.shape[0]
    gain = (L - base[None, :]) * (1.0 - jnp.eye(T, dtype=L.dtype))
    return gain.sum(axis=1) / max(T - 1, 1)


@eager_when_concrete
def potentials(affinity: ArrayLike | Sequence[Sequence[float]],
               unary: UnaryKind | ArrayLike | Sequence[float] = "centrality",
               *, beta: float = 1.0, lam: float = 1.0, ridge: float | None = None,
               cross_likelihood: ArrayLike | Sequence[Sequence[float]] | None = None,
               base_likelihood: ArrayLike | Sequence[float] | None = None,
               spectrum: Literal["auto", "dense", "lanczos"] = "auto") -> Potentials:
    """Build the MRF potentials from a task affinity matrix.

    Args:
      affinity: [T, T] S (JSD or PMI affinity), symmetric up to 1e-5 relative; may be indefinite.
      unary: "centrality" (row sums of S~), "utility" (needs `cross_likelihood` and
        `base_likelihood`, see `utility_unary`) or a [T] array.
      beta: weight of the unary term, > 0.
      lam: weight of the pairwise term, > 0. Only beta / lam matters for the minimiser; with
        "centrality" the unconstrained optimum is the uniform mixture at beta / lam = 1 / T.
      ridge: extra diagonal of the PSD repair; None: 1e-5 x spectral radius of sym(S); 0 is
        allowed when S is already positive definite.
      cross_likelihood, base_likelihood: inputs of unary="utility".
      spectrum: eigenvalue method of the repair, "auto" | "dense" | "lanczos".

    Returns:
      Potentials (S~, u, beta, lam and the repair's shift).

    Example:
      >>> pot = potentials(pmi_affinity(L), beta=1.0, lam=316.0)
      >>> pot.shift                            # what the PSD repair added to the diagonal
    """
    beta = check_positive(beta, "beta")
    lam = check_positive(lam, "lam")
    rep = psd_repair(affinity, ridge, spectrum=spectrum)
    T = rep.matrix.shape[0]
    if isinstance(unary, str):
        if unary == "centrality":
            u, kind = rep.matrix.sum(axis=1), "centrality"
        elif unary == "utility":
            if cross_likelihood is None or base_likelihood is None:
                raise ValueError("unary: 'utility' needs cross_likelihood=L ([T, T]) and "
                                 "base_likelihood=L_base ([T]).")
            u, kind = utility_unary(cross_likelihood, base_likelihood), "utility"
            if u.shape[0] != T:
                raise ValueError(f"cross_likelihood: has {u.shape[0]} tasks but affinity has {T}.")
        else:
            raise ValueError(f"unary: expected 'centrality', 'utility' or a [T] array, got "
                             f"{unary!r}.")
    else:
        u, kind = check_vector(unary, "unary", T, dtype=rep.matrix.dtype), "array"
    if kind != "utility" and (cross_likelihood is not None or base_likelihood is not None):
        raise ValueError("cross_likelihood: only used with unary='utility'.")
    return Potentials(rep.matrix, u.astype(rep.matrix.dtype), beta, lam, rep.shift, rep.ridge,
                      rep.eig_min, rep.eig_max, kind, rep.spectrum)


def energy(weights: ArrayLike | Sequence[Any], pot: Potentials) -> jax.Array:
    """E(w) = -beta * u^T w + (lam / 2) * w^T S~ w for one mixture or a batch [..., T].

    Args:
      weights: [..., T] mixtures (not checked to lie on the simplex, so that it can be used on
        intermediate points).
      pot: from `potentials`.

    Returns:
      [...] energies in the potentials' dtype.

    Example:
      >>> energy(jnp.full(T, 1 / T), pot)
    """
    pot = checked_potentials(pot)
    w = jnp.asarray(weights, pot.matrix.dtype)
    if w.ndim == 0 or w.shape[-1] != pot.num_tasks:
        raise ValueError(f"weights: expected [..., {pot.num_tasks}] mixtures (one weight per "
                         f"task), got shape {tuple(w.shape)}.")
    quad = jnp.einsum("...i,ij,...j->...", w, pot.matrix, w,
                      precision=jax.lax.Precision.HIGHEST)
    lin = jnp.matmul(w, pot.unary, precision=jax.lax.Precision.HIGHEST)
    return -pot.beta * lin + 0.5 * pot.lam * quad
