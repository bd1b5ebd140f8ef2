"""Affinities, the PSD repair, potentials, and the errors bad input gets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

import taskpgm_jax.divergence as divergence
import taskpgm_jax.mrf as mrf
from taskpgm_jax.mrf import (affinity_from_jsd, potentials, psd_repair, select_tasks, solve,
                             solve_path, utility_unary)
from taskpgm_jax.mrf._spectrum import _lanczos_extremes, extreme_eigenvalues
from taskpgm_jax.mrf.solve import _prepare
from tests.mrf.conftest import random_affinity


def test_pmi_affinity_is_the_divergence_one():
    assert mrf.pmi_affinity is divergence.pmi_affinity


def test_affinity_from_jsd_matches_scipy(rng):
    T, V = 6, 12
    P = rng.dirichlet(np.ones(V), size=T)
    D = np.array([[jensenshannon(P[i], P[j]) ** 2 for j in range(T)] for i in range(T)])
    np.testing.assert_allclose(np.asarray(affinity_from_jsd(D)), 1 - D / math.log(2), atol=1e-6)
    np.testing.assert_allclose(np.asarray(affinity_from_jsd(D, "rbf", tau=0.1)),
                               np.exp(-D / 0.1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["psd", "signed", "lowrank"])
def test_psd_repair_shift_and_spectrum(rng, kind):
    S = random_affinity(rng, 40, kind)
    rep = psd_repair(S, ridge=1e-3)
    S32 = S.astype(np.float32).astype(np.float64)   # what the float32 repair sees
    eig = np.linalg.eigvalsh(0.5 * (S32 + S32.T))
    assert rep.eig_min == pytest.approx(eig[0], abs=1e-6 * np.abs(eig).max())
    assert rep.shift == pytest.approx(max(0.0, -eig[0]) + 1e-3)
    assert np.linalg.eigvalsh(np.asarray(rep.matrix, np.float64))[0] > 0.5e-3


def test_psd_repair_matrix_is_the_symmetric_part_plus_the_shift(rng):
    """Exactly symmetric input (kept as is) and input asymmetric within tolerance (averaged with
    its transpose) both give sym(S) + shift I."""
    S = random_affinity(rng, 30, "signed").astype(np.float32)
    S = 0.5 * (S + S.T)
    noise = rng.standard_normal(S.shape).astype(np.float32) * 1e-7 * np.abs(S).max()
    for given in (S, S + noise):
        rep = psd_repair(given, ridge=1e-3)
        g64 = given.astype(np.float64)
        expected = 0.5 * (g64 + g64.T) + rep.shift * np.eye(30)
        np.testing.assert_allclose(np.asarray(rep.matrix, np.float64), expected, atol=1e-6)


def test_lanczos_extremes_match_dense(rng):
    S = random_affinity(rng, 300, "signed")
    lo, hi, how = extreme_eigenvalues(S, method="lanczos")
    eig = np.linalg.eigvalsh(S)
    assert how == "lanczos"
    assert lo == pytest.approx(eig[0], rel=1e-4) and hi == pytest.approx(eig[-1], rel=1e-4)


@pytest.mark.parametrize("kind", ["signed", "lowrank"])
def test_lanczos_stops_early_at_the_extremes(rng, kind):
    """Above a few hundred tasks Lanczos stops once both extreme Ritz pairs have converged: the
    values must still match float64 eigvalsh (and lie inside the spectrum, as Ritz values do)."""
    S = random_affinity(rng, 700, kind).astype(np.float32).astype(np.float64)
    S = 0.5 * (S + S.T)
    eig = np.linalg.eigvalsh(S)
    radius = np.abs(eig).max()
    lo, hi, used = _lanczos_extremes(jnp.asarray(S, jnp.float32), steps=256)
    assert int(used) < 256
    assert abs(float(lo) - eig[0]) <= 1e-5 * radius and abs(float(hi) - eig[-1]) <= 1e-5 * radius
    assert float(lo) >= eig[0] - 1e-6 * radius and float(hi) <= eig[-1] + 1e-6 * radius


def test_lanczos_breakdown_gives_the_exact_extremes(rng):
    """A matrix with three distinct eigenvalues spans a 3-dimensional Krylov space: Lanczos breaks
    down after 3 steps and must return the exact ends, not a padded row's value."""
    values = rng.choice([-1.5, 0.25, 2.0], size=200)
    values[:3] = [-1.5, 0.25, 2.0]
    Q, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    S = (Q * values) @ Q.T
    lo, hi, used = _lanczos_extremes(jnp.asarray(S, jnp.float32), steps=256)
    assert int(used) <= 4
    assert float(lo) == pytest.approx(-1.5, abs=1e-4) and float(hi) == pytest.approx(2.0, abs=1e-4)


def test_utility_unary(rng):
    T = 5
    L = -rng.uniform(1, 5, size=(T, T))
    base = -rng.uniform(2, 6, size=T)
    u = np.asarray(utility_unary(L, base))
    expected = [np.mean([L[i, j] - base[j] for j in range(T) if j != i]) for i in range(T)]
    # float32 means of differences of inputs up to 6 can cancel to ~1e-4: allow their rounding
    # (measured max 0.61 eps * max|input| over 5000 seeds; 1.5% of seeds failed rtol alone).
    atol = 2 * np.finfo(np.float32).eps * max(np.abs(L).max(), np.abs(base).max())
    np.testing.assert_allclose(u, expected, rtol=1e-5, atol=atol)
    pot = potentials(divergence.pmi_affinity(L), "utility", cross_likelihood=L,
                     base_likelihood=base)
    assert pot.unary_kind == "utility"


def _pot(n=4):
    return potentials(np.eye(n))


@pytest.mark.parametrize("call, match", [
    (lambda: potentials(np.ones((3, 4))), "affinity: expected a square"),
    (lambda: potentials(np.array([[0.0, np.nan], [np.nan, 0.0]])), "affinity: contains NaN"),
    (lambda: potentials(np.array([[0.0, 1.0], [0.0, 0.0]])), "affinity: not symmetric"),
    (lambda: potentials(np.eye(3), np.ones(4)), "unary: expected 3 entries"),
    (lambda: potentials(np.eye(3), beta=0.0), "beta: must be positive"),
    (lambda: potentials(np.eye(3), lam=-1.0), "lam: must be positive"),
    (lambda: potentials(np.eye(3), ridge=-1e-3), "ridge"),
    (lambda: potentials(np.eye(3), "utility"), "unary: 'utility' needs"),
    (lambda: potentials(np.eye(3), "bogus"), "unary: expected"),
    (lambda: potentials(np.eye(3), cross_likelihood=np.eye(3)), "only used with"),
    (lambda: potentials(np.zeros((0, 0))), "empty"),
    (lambda: affinity_from_jsd(np.full((2, 2), 0.9)), "ln 2"),
    (lambda: affinity_from_jsd(np.zeros((2, 2)), "rbf"), "tau"),
    (lambda: affinity_from_jsd(np.zeros((2, 2)), "cosine"), "kind"),
    (lambda: solve(_pot(), "newton"), "method"),
    (lambda: solve(np.eye(3)), "pot: expected Potentials"),
    (lambda: solve(_pot(), floor=0.3), "floors sum to 1.2"),
    (lambda: solve(_pot(), cap=0.2), "caps sum to 0.8"),
    (lambda: solve(_pot(), floor=-0.1), "floor"),
    (lambda: solve(_pot(), floor=np.full(3, 0.1)), r"floor: expected a scalar or 4 entries"),
    (lambda: solve(_pot(), cap=np.ones((2, 2))), r"cap: expected a scalar or 4 entries"),
    (lambda: solve(_pot(), "softmax", cap=0.5), "softmax cannot"),
    (lambda: solve(_pot(), "softmax", init=np.array([1.0, 0, 0, 0])), "init"),
    (lambda: solve(_pot(), init=np.ones(4)), "init: expected a mixture"),
    (lambda: solve(_pot(), init=np.ones(3) / 3), "init: expected 4 entries"),
    (lambda: solve(_pot(), max_iter=0), "max_iter"),
    (lambda: solve(_pot(), tol=-1.0), "tol"),
    (lambda: solve_path(_pot(), [0.1, -1.0]), "ratios"),
    (lambda: select_tasks(_pot(), 0.5), "budget: 0.5 is below the cheapest"),
    (lambda: select_tasks(_pot(), 3, costs=np.array([1.0, -1, 1, 1])), "costs: every task"),
    (lambda: select_tasks(_pot(), 3, costs=np.ones(3)), "costs: expected 4"),
    (lambda: select_tasks(_pot(), 0), "budget"),
    # Strings were parsed by NumPy, 2-D ratios flattened, index lists misread.
    (lambda: solve(_pot(), floor="0.1"), "floor: expected numbers"),
    (lambda: solve_path(_pot(), "0.1"), "ratios: expected numbers"),
    (lambda: solve_path(_pot(), [[0.1, 0.2]]), r"ratios: expected a 1-D array .* \(1, 2\)"),
    (lambda: select_tasks(_pot(), 2, costs=["a"] * 4), "costs: expected numbers"),
    (lambda: mrf.set_value(_pot(), [True, False, True]), "subset: .*boolean mask"),
    (lambda: mrf.set_value(_pot(), [-1]), r"subset: indices must lie in \[0, 4\)"),
    (lambda: mrf.set_value(_pot(), [5]), r"subset: indices must lie in \[0, 4\)"),
    (lambda: mrf.set_value(_pot(), [0, 0]), "subset: repeated"),
    (lambda: mrf.set_value(_pot(), [0.7]), "subset: expected a 1-D list of integer"),
    (lambda: mrf.set_value(np.eye(4), [0]), "pot: expected Potentials"),
    (lambda: mrf.energy(np.ones(3) / 3, _pot()), r"weights: expected \[\.\.\., 4\]"),
    (lambda: mrf.energy(np.ones(4) / 4, np.eye(4)), "pot: expected Potentials"),
    (lambda: mrf.submodularity_ratio(_pot(), num_samples=0), "num_samples: expected a positive"),
    (lambda: mrf.submodularity_ratio(_pot(), k=1.7), "k: expected a positive set size"),
    (lambda: mrf.submodularity_ratio(_pot(), k="x"), "k: expected a positive set size"),
    (lambda: mrf.submodularity_ratio(_pot(), seed="a"), "seed: expected a non-negative"),
    (lambda: mrf.submodularity_ratio(_pot(), costs=[1, 2]), "costs: expected 4 entries"),
    (lambda: mrf.submodularity_ratio(_pot(), costs=[]), "costs: expected 4 entries"),
    (lambda: mrf.submodularity_ratio(_pot(), selection=[0, 1]), "selection: expected the"),
    (lambda: mrf.submodularity_ratio(np.eye(4)), "pot: expected Potentials"),
])
def test_bad_input_raises_a_named_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_numpy_integers_are_accepted_as_counts():
    pot = _pot()
    # Checked without a solve (a compile): max_iter reaches the solver as a plain int, the
    # static jit argument and optimiser cache key that an int 100 gives.
    _, opts = _prepare(pot, "exact", None, None, None, None, np.int64(100), 1.0)
    assert opts["max_iter"] == 100 and type(opts["max_iter"]) is int
    assert mrf.set_value(pot, np.array([0, 2])) == mrf.set_value(pot, [0, 2])
    rep = mrf.submodularity_ratio(pot, k=np.int64(2), num_samples=np.int32(5), seed=np.uint8(1))
    assert rep == mrf.submodularity_ratio(pot, k=2)


def test_concrete_arrays_closed_over_in_a_jit_build_the_same_mixture(rng):
    """Inside a caller's jit a closure constant has values, but every JAX operation on it is
    staged out: the host reads (spectrum, range checks, greedy choices) run eagerly instead, and
    the whole chain gives what it gives outside jit; a bad constant gets the named error."""
    T = 5
    P = rng.dirichlet(np.full(16, 0.3), size=T)
    D = jnp.asarray([[jensenshannon(P[i], P[j]) ** 2 for j in range(T)] for i in range(T)],
                    jnp.float32)

    def chain():
        pot = potentials(affinity_from_jsd(D), beta=1.0, lam=4.0)
        return (psd_repair(D).matrix, pot.matrix, solve(pot).weights,
                jnp.asarray(select_tasks(pot, 2).indices))

    for inside, outside in zip(jax.jit(chain)(), chain(), strict=True):
        np.testing.assert_allclose(np.asarray(inside), np.asarray(outside), rtol=1e-6, atol=1e-7)
    # The solver's answer is the simplex minimiser: check it against the float64 KKT conditions.
    S = 1 - np.asarray(D, np.float64) / math.log(2)
    w = np.asarray(jax.jit(chain)()[2], np.float64)
    grad = 4.0 * S @ w - S.sum(1)
    support = w > 1e-6
    assert abs(w.sum() - 1) < 1e-5
    assert np.ptp(grad[support]) < 1e-3 and grad[~support].min(initial=np.inf) > grad[support].max() - 1e-3

    bad = D.at[0, 1].set(jnp.nan)
    with pytest.raises(ValueError, match="divergence: contains NaN"):
        jax.jit(lambda: affinity_from_jsd(bad))()
    asymmetric = D.at[0, 1].add(0.1)
    with pytest.raises(ValueError, match="affinity: not symmetric"):
        jax.jit(lambda: psd_repair(asymmetric))()
