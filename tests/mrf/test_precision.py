"""Every matrix product in the compiled MRF programs asks for full float32 precision.

A GPU's default float32 matmul rounds its operands to TF32 (10 mantissa bits: the LoRA merge's
exported logits moved by 2e-4 on an H200), which the solvers' 1e-6 tolerances and the Lanczos
re-orthogonalisation cannot absorb. On a CPU every precision computes the same, so the tests read
the programs (their jaxprs, traced under the fastest default) instead of the numbers.
"""

import jax
import numpy as np
import pytest

from taskpgm_jax.mrf import _solvers, _spectrum, energy, potentials, solve
from tests.mrf.conftest import random_affinity
from tests.precision import HIGHEST, dot_precisions


@pytest.fixture
def traced_cores(monkeypatch):
    """Runs the real cores and keeps the jaxpr of each call, traced under bf16 default precision."""
    seen = {}

    def spy(name, core):
        def call(*args, **kwargs):
            with jax.default_matmul_precision("bfloat16"):
                seen[name] = core.trace(*args, **kwargs).jaxpr
            return core(*args, **kwargs)
        return call

    for name in ("exact_core", "closed_form_core", "softmax_core"):
        monkeypatch.setattr(_solvers, name, spy(name, getattr(_solvers, name)))
    monkeypatch.setattr(_spectrum, "_lanczos_extremes",
                        spy("lanczos", _spectrum._lanczos_extremes))
    return seen


def test_solver_and_spectrum_products_use_highest_precision(traced_cores, rng):
    T = 7
    pot = potentials(random_affinity(rng, T, "signed"), rng.normal(size=T), beta=1.0, lam=0.5)
    for method in ("exact", "closed_form", "softmax"):
        solve(pot, method)
    _spectrum.extreme_eigenvalues(np.asarray(pot.matrix), method="lanczos")
    assert set(traced_cores) == {"exact_core", "closed_form_core", "softmax_core", "lanczos"}
    for name, jaxpr in traced_cores.items():
        precisions = dot_precisions(jaxpr)
        assert precisions, f"{name}: no matrix product found (the walk missed its loops)"
        low = [p for p in precisions if p != HIGHEST]
        assert not low, f"{name}: {len(low)} of {len(precisions)} products below HIGHEST: {low[:3]}"


def test_energy_products_use_highest_precision(rng):
    T = 5
    pot = potentials(random_affinity(rng, T, "psd"), rng.normal(size=T))
    weights = rng.dirichlet(np.ones(T), size=3)
    with jax.default_matmul_precision("bfloat16"):
        jaxpr = jax.make_jaxpr(lambda w: energy(w, pot))(weights)
    precisions = dot_precisions(jaxpr)
    assert precisions and all(p == HIGHEST for p in precisions), precisions
