"""The mixtures stage's solver trace: it ends at the final solution itself, replays the final
solve's own iterates (softmax), and gives closed_form no iterations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taskpgm_jax.config import MixtureConfig, MrfConfig
from taskpgm_jax.mrf import affinity_from_jsd, potentials
from taskpgm_jax.pipeline.mixtures import compute_mixtures


def _instance(T=6):
    rng = np.random.default_rng(0)
    names = [f"t{i}" for i in range(T)]
    D = np.abs(rng.normal(size=(T, T))) * 0.05
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0.0)
    L = rng.normal(size=(T, T)) - 5
    base = rng.normal(size=T) - 6
    sizes = {n: 40 + i for i, n in enumerate(names)}
    return names, D, L, base, sizes


def _mixtures(solver):
    names, D, L, base, sizes = _instance()
    mrf = MrfConfig(solver=solver)
    ms = compute_mixtures(names, D, L, base, sizes, mrf, MixtureConfig(methods=("taskpgm_jsd",)))
    T = len(names)
    pot = potentials(affinity_from_jsd(D, mrf.jsd_affinity, mrf.jsd_tau), mrf.unary,
                     beta=mrf.beta, lam=2.0 * T, ridge=mrf.ridge)
    M, u = np.asarray(pot.matrix, np.float64), np.asarray(pot.unary, np.float64)
    return ms, M, u, float(pot.beta), float(pot.lam)


def test_closed_form_trace_is_the_solution_without_iterations():
    ms, M, u, beta, lam = _mixtures("closed_form")
    mix = ms.mixtures["taskpgm_jsd"]
    w = np.asarray(mix.weights)
    # The Frank-Wolfe gap of the final weights, written out: g.w - min_i g_i, g = grad E(w).
    g = lam * M @ w - beta * u
    trace = ms.trace["taskpgm_jsd"]
    assert trace["iterations"] == [1] and trace["energy_gap"] == [0.0]
    assert trace["kkt_residual"] == [pytest.approx(g @ w - g.min(), rel=1e-3, abs=1e-6)]
    assert trace["kkt_residual"][-1] == mix.provenance["kkt_residual"]


def test_softmax_trace_replays_the_final_solve():
    ms, M, u, beta, lam = _mixtures("softmax")
    mix = ms.mixtures["taskpgm_jsd"]
    trace = ms.trace["taskpgm_jsd"]
    last = mix.provenance["iterations"]
    assert trace["iterations"][-1] == last > 4
    assert trace["energy_gap"][-1] == 0.0
    assert trace["kkt_residual"][-1] == mix.provenance["kkt_residual"]

    # The softmax solve replayed independently: Adam on theta (w = softmax(theta)) from the
    # uniform mixture, with the documented default schedule over 20000 steps.
    Mj, uj = jnp.asarray(M, jnp.float32), jnp.asarray(u, jnp.float32)

    def energy(theta):
        w = jax.nn.softmax(theta)
        return -beta * uj @ w + 0.5 * lam * w @ Mj @ w

    opt = optax.adam(optax.cosine_decay_schedule(0.1, decay_steps=20_000, alpha=1e-3))
    theta = jnp.full(len(u), jnp.log(1.0 / len(u)), jnp.float32)
    state, energies = opt.init(theta), {}
    for k in range(1, last + 1):
        updates, state = opt.update(jax.grad(energy)(theta), state, theta)
        theta = optax.apply_updates(theta, updates)
        energies[k] = float(energy(theta))
    np.testing.assert_allclose(jax.nn.softmax(theta), mix.weights, atol=1e-4)
    gaps = [max(energies[k] - energies[last], 0.0) for k in trace["iterations"]]
    np.testing.assert_allclose(trace["energy_gap"], gaps, rtol=1e-2, atol=1e-4)
