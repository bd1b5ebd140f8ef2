"""MRF benchmark: solvers against scipy SLSQP, and greedy task selection.

    python benchmarks/mrf.py                     # prints the table
    python benchmarks/mrf.py --json mrf.json     # also writes the figures ("ratios": name -> x)

For T in {100, 316, 1000, 5000}: the exact, closed_form and softmax solvers (compile time apart
from the steady state, median of repeats) and their energy gap to scipy's SLSQP on the same
problem in the same run (scipy's default ftol; the gap is taken against the better of SLSQP
and a float64 exact solve at tol 1e-10, so a negative gap means better than SLSQP). T = 316 is
the authors' PMI matrix when ../shared/data holds it. SLSQP runs once per T and is skipped at
T = 5000 (hours). Greedy selection of k = T / 10 tasks for T in {1000, 10000} (plain and lazy).

Problem: the affinity 1 - JSD / ln 2 between tasks whose next-token distributions mix a few
latent skills (as single-task models of related tasks do), centrality unary, beta / lam = 2 / T
(a sparse mixture: the regime where the closed form clips).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _timing  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from _args import add_json_arg  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from taskpgm_jax.mrf import affinity_from_jsd, potentials, select_tasks, solve  # noqa: E402

PMI = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "authors_pmi_316.npy")


def skill_affinity(T: int, rng, vocab: int = 64, skills: int = 6) -> np.ndarray:
    """1 - JSD / ln 2 between T tasks' next-token distributions (mixtures of latent skills)."""
    base = rng.dirichlet(np.full(vocab, 0.3), size=skills)
    P = rng.dirichlet(np.full(skills, 0.5), size=T) @ base
    P = 0.9 * P + 0.1 * rng.dirichlet(np.ones(vocab), size=T)
    logP = np.log(P)
    D = np.empty((T, T))
    for i in range(0, T, 128):     # blocks keep the [block, T, V] temporary small
        Pi, Li = P[i:i + 128, None], logP[i:i + 128, None]
        logM = np.log(0.5 * (Pi + P[None]))
        D[i:i + 128] = 0.5 * (Pi * (Li - logM)).sum(-1) + 0.5 * (P[None] * (logP[None] - logM)).sum(-1)
    D = np.clip(0.5 * (D + D.T), 0.0, math.log(2.0))
    np.fill_diagonal(D, 0.0)
    return np.asarray(affinity_from_jsd(D), np.float64)


def timed(fn, repeats: int):
    """(compile seconds = first call - steady, median steady seconds, spread, result)."""
    first, med, (lo, hi), out = _timing.timed(fn, repeats)
    return max(first - med, 0.0), med, hi - lo, out


def slsqp(Q, c):
    T = len(c)
    t0 = time.perf_counter()
    res = minimize(lambda w: 0.5 * w @ Q @ w - c @ w, np.full(T, 1.0 / T),
                   jac=lambda w: Q @ w - c, method="SLSQP", bounds=[(0.0, 1.0)] * T,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                 "jac": lambda w: np.ones(T)}],
                   options={"maxiter": 300})   # scipy's default ftol (1e-6)
    return time.perf_counter() - t0, res.x


def solver_rows(sizes, repeats, rng):
    rows, ratios = [], {}
    for T in sizes:
        if T == 316 and os.path.exists(PMI):
            S, name = np.load(PMI), "authors PMI"
        else:
            S, name = skill_affinity(T, rng), "JSD skills"
        t0 = time.perf_counter()
        pot = potentials(S, beta=2.0 / T, lam=1.0)
        t_pot = time.perf_counter() - t0
        Q = np.asarray(pot.matrix, np.float64) * pot.lam
        c = pot.beta * np.asarray(pot.unary, np.float64)
        energy = lambda w: 0.5 * w @ Q @ w - c @ w  # noqa: E731
        with jax.enable_x64(True):   # float64 exact solve: a second, tighter yardstick
            w64 = np.asarray(solve(potentials(S, beta=2.0 / T, lam=1.0), tol=1e-10).weights)
        if T <= 1000:
            t_ref, w_ref = slsqp(Q, c)
            ref_name = "slsqp"
        else:
            t_ref, w_ref, ref_name = None, w64, "exact f64"  # not timed (n/a; JSON null)
        # The gap is measured against the better of the two references.
        e_ref = min(energy(w_ref), energy(w64))
        scale = abs(c @ w_ref) + 0.5 * abs(w_ref @ Q @ w_ref)
        rows.append(dict(T=T, instance=name, method=ref_name, compile_s=None, steady_s=t_ref,
                         spread_s=0.0, iterations=None, gap=(energy(w_ref) - e_ref) / scale,
                         support=int((w_ref > 1e-6).sum()), potentials_s=t_pot))
        for method in ("exact", "closed_form", "softmax"):
            reps = repeats if T <= 1000 else max(1, repeats // 2)
            comp, med, spread, sol = timed(lambda: solve(pot, method), reps)
            w = np.asarray(sol.weights, np.float64)
            gap = (energy(w) - e_ref) / scale
            rows.append(dict(T=T, instance=name, method=method, compile_s=comp, steady_s=med,
                             spread_s=spread, iterations=int(sol.iterations), gap=gap,
                             support=int((w > 1e-6).sum()), potentials_s=t_pot))
            if ref_name == "slsqp":
                ratios[f"{method}_speedup_vs_slsqp_T{T}"] = t_ref / med
            ratios[f"{method}_energy_gap_T{T}"] = gap
    return rows, ratios


def greedy_rows(sizes, repeats, rng):
    rows, ratios = [], {}
    for T in sizes:
        F = rng.dirichlet(np.full(8, 0.3), size=T)    # tasks mixing 8 skills: S >= 0
        S = F @ F.T
        t0 = time.perf_counter()
        pot = potentials(S, beta=1.0, lam=10.0 / T)
        t_pot = time.perf_counter() - t0
        k = max(1, T // 10)
        comp, med, spread, sel = timed(lambda: select_tasks(pot, k), repeats)
        t0 = time.perf_counter()
        lazy = select_tasks(pot, k, lazy=True)
        t_lazy = time.perf_counter() - t0
        # Same chain, or one of equal value: float64 lazy gains and float32 plain gains may
        # order near-ties differently.
        same = bool(np.array_equal(sel.indices, lazy.indices)
                    or abs(lazy.value - sel.value) <= 1e-6 * abs(sel.value))
        rows.append(dict(T=T, k=k, chosen=len(sel.indices), compile_s=comp, steady_s=med,
                         spread_s=spread, lazy_s=t_lazy, lazy_same=same,
                         lazy_evaluations=lazy.evaluations, potentials_s=t_pot))
        ratios[f"greedy_T{T}_k{k}_seconds_vs_2s_target"] = med / 2.0
        ratios[f"lazy_vs_plain_greedy_time_T{T}"] = t_lazy / med
    return rows, ratios


def _sizes(ap, flag, text):
    """Comma-separated task counts >= 2 (a problem needs two tasks)."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        ap.error(f"{flag}: expected comma-separated integers such as 100,1000, got {text!r}")
    if any(t < 2 for t in sizes):
        ap.error(f"{flag}: every size must be at least 2, got {text!r}")
    return sizes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_json_arg(ap)
    ap.add_argument("--sizes", default="100,316,1000,5000")
    ap.add_argument("--greedy-sizes", default="1000,10000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    rng = np.random.default_rng(args.seed)
    sizes, gsizes = (_sizes(ap, flag, text) for flag, text in
                     (("--sizes", args.sizes), ("--greedy-sizes", args.greedy_sizes)))
    srows, sratios = solver_rows(sizes, args.repeats, rng)
    grows, gratios = greedy_rows(gsizes, args.repeats, rng)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, float32; energy gap = "
          "(E - E_ref) / (|unary| + |pairwise|) in float64")
    print(f"{'T':>5} {'instance':<12} {'method':<12} {'compile s':>9} {'steady s':>9} "
          f"{'spread s':>9} {'iters':>6} {'support':>7} {'energy gap':>11} {'SLSQP/this':>10}")
    ref_time = {}
    for r in srows:
        if r["compile_s"] is None:
            ref_time[r["T"]] = (r["steady_s"], r["method"])
        ref_s = ref_time[r["T"]][0]
        speed = "n/a" if ref_s is None else f"{ref_s / r['steady_s']:.1f}x"
        comp = "" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        steady = "n/a" if r["steady_s"] is None else f"{r['steady_s']:.4f}"
        iters = "" if r["iterations"] is None else str(r["iterations"])
        print(f"{r['T']:>5} {r['instance']:<12} {r['method']:<12} {comp:>9} {steady:>9} "
              f"{r['spread_s']:>9.4f} {iters:>6} {r['support']:>7} {r['gap']:>11.2e} "
              f"{speed:>10}")
    print(f"\n{'T':>6} {'k':>5} {'chosen':>6} {'compile s':>9} {'greedy s':>9} {'lazy s':>8} "
          f"{'lazy F==F':>11} {'potentials s':>12}")
    for r in grows:
        print(f"{r['T']:>6} {r['k']:>5} {r['chosen']:>6} {r['compile_s']:>9.2f} "
              f"{r['steady_s']:>9.4f} {r['lazy_s']:>8.4f} {str(r['lazy_same']):>11} "
              f"{r['potentials_s']:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "platform": jax.devices()[0].platform,
                       "solvers": srows, "greedy": grows, "ratios": {**sratios, **gratios}},
                      f, indent=2)


if __name__ == "__main__":
    main()
