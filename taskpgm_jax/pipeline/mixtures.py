"""From probe measurements to the compared mixtures (the `mixtures` stage's computation).

TaskPGM with JSD and with PMI affinities, the budgeted greedy selection (weakly submodular,
with the guarantee measured on the instance), and the baselines uniform, size-proportional and
temperature; plus what the report plots: the solver's convergence and the greedy curve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from taskpgm_jax.config import MixtureConfig, MrfConfig
from taskpgm_jax.mrf import (
    Mixture,
    affinity_from_jsd,
    pmi_affinity,
    potentials,
    select_tasks,
    size_proportional_mixture,
    solve,
    submodularity_ratio,
    temperature_mixture,
    uniform_mixture,
)
# solve's default softmax optimiser, passed explicitly so that the trace's re-runs take the
# final solve's steps.
from taskpgm_jax.mrf.solve import DEFAULT_MAX_ITER, SolveMethod, default_softmax_optimizer


class MixtureSet(NamedTuple):
    """mixtures: method -> Mixture; affinities: "jsd"/"pmi" -> [T, T]; trace, greedy: JSON-able
    records for the report."""

    mixtures: dict[str, Mixture]
    affinities: dict[str, np.ndarray]
    trace: dict[str, dict[str, list]]
    greedy: dict[str, Any]


def _solver_options(method: str) -> dict[str, Any]:
    # softmax: Adam's schedule decays over max_iter steps, so a re-run with max_iter=k under the
    # default optimiser would take other steps; one optimiser for all keeps k steps a prefix.
    return ({"optimizer": default_softmax_optimizer(DEFAULT_MAX_ITER["softmax"])}
            if method == "softmax" else {})


def _convergence(pot, method: SolveMethod, final) -> dict[str, list]:
    """Energy gap to the final solution and KKT residual after 1, 2, 4, ... iterations of the
    solve that produced `final`, ending with `final` itself (gap 0, its own residual).

    The earlier points re-run the same solver for k < final.iterations steps. closed_form is one
    linear solve with no iterates: its trace is the single point of `final` (the report says so)
    rather than an iterate of another solver, which would contradict the mixture's provenance.
    """
    iters, gaps, kkts = [], [], []
    e_final = float(final.energy)
    last = int(final.iterations)
    opts = _solver_options(method)
    k = 1
    while method != "closed_form" and k < last:
        sol = solve(pot, method, max_iter=k, tol=1e-30, **opts)  # run exactly k iterations
        iters.append(k)
        gaps.append(max(float(sol.energy) - e_final, 0.0))
        kkts.append(float(sol.kkt_residual))
        k *= 2
    iters.append(last)
    gaps.append(0.0)
    kkts.append(float(final.kkt_residual))
    return {"iterations": iters, "energy_gap": gaps, "kkt_residual": kkts}


def _greedy(pot, names: Sequence[str], k: int) -> tuple[Mixture, dict[str, Any]]:
    sel = select_tasks(pot, k)
    ratio = submodularity_ratio(pot, k, selection=sel)
    chosen = [names[int(i)] for i in sel.indices]
    # The selected tasks share the budget equally (the selection decides which, not how much).
    weights = {n: (1.0 / len(chosen) if n in chosen else 0.0) for n in names}
    mixture = Mixture(tuple(names), tuple(weights[n] for n in names), "examples",
                      {"method": "greedy", "selected": chosen, "value": float(sel.value),
                       "gamma": float(ratio.gamma), "bound": float(ratio.bound)})
    record = {"order": chosen, "gains": [float(g) for g in sel.gains],
              "cumulative_cost": [float(c) for c in np.arange(1, len(chosen) + 1)],
              "budget": float(k), "value": float(sel.value), "gamma": float(ratio.gamma),
              "gamma_exact": bool(ratio.exact),
              "guarantee": float(ratio.bound) if ratio.bound > 0 else None,
              "guarantee_note": ratio.theorem, "used_best_single": bool(sel.used_single),
              "unit": "tasks"}
    return mixture, record


def compute_mixtures(names: Sequence[str], divergence, cross_likelihood, base_likelihood,
                     train_sizes: Mapping[str, int], mrf: MrfConfig,
                     mix: MixtureConfig) -> MixtureSet:
    """Every mixture the run compares, from the probe stage's matrices.

    Args:
      names: the T training tasks, in pool order.
      divergence: [T, T] task-level JSD D (nats).
      cross_likelihood: [T, T] L[i, j]; base_likelihood: [T] the base model's row.
      train_sizes: examples in each task's training split (size-proportional, temperature).
      mrf, mix: the config sections.

    Returns:
      A `MixtureSet` with the methods listed in `mix.methods`.
    """
    names = list(names)
    T = len(names)
    lam = float(mrf.lam) if mrf.lam is not None else 2.0 * T
    affinities = {"jsd": np.asarray(affinity_from_jsd(divergence, mrf.jsd_affinity, mrf.jsd_tau),
                                    np.float64),
                  "pmi": np.asarray(pmi_affinity(cross_likelihood), np.float64)}
    mixtures: dict[str, Mixture] = {}
    trace: dict[str, dict[str, list]] = {}
    greedy: dict[str, Any] = {}
    measured = ({"cross_likelihood": cross_likelihood, "base_likelihood": base_likelihood}
                if mrf.unary == "utility" else {})
    for kind in ("jsd", "pmi"):
        pot = potentials(affinities[kind], mrf.unary, beta=mrf.beta, lam=lam, ridge=mrf.ridge,
                         **measured)
        method = f"taskpgm_{kind}"
        if method not in mix.methods:
            continue
        sol = solve(pot, mrf.solver, **_solver_options(mrf.solver))
        mixtures[method] = Mixture.from_solution(names, sol, affinity=kind, unary=mrf.unary,
                                                 beta=mrf.beta, lam=lam)
        trace[method] = _convergence(pot, mrf.solver, sol)
    if "greedy" in mix.methods:
        k = mrf.select_tasks if mrf.select_tasks is not None else max(1, T // 2)
        select_lam = mrf.select_lam if mrf.select_lam is not None else mrf.beta
        pot = potentials(affinities["jsd"], mrf.unary, beta=mrf.beta, lam=select_lam,
                         ridge=mrf.ridge, **measured)
        mixtures["greedy"], greedy = _greedy(pot, names, min(k, T))
    sizes = [int(train_sizes[n]) for n in names]
    if "uniform" in mix.methods:
        mixtures["uniform"] = uniform_mixture(names)
    if "size_proportional" in mix.methods:
        mixtures["size_proportional"] = size_proportional_mixture(names, sizes)
    if "temperature" in mix.methods:
        mixtures["temperature"] = temperature_mixture(names, sizes, mix.temperature_tau)
    ordered = {m: mixtures[m] for m in mix.methods}
    return MixtureSet(ordered, affinities, trace, greedy)
