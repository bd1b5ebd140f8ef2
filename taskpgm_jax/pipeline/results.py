"""results.json: per method, the held-out metric over seeds, per task, and against uniform.

    {"metric": ..., "eval_tasks": [...], "seeds": [...], "budget": N,
     "methods": {NAME: {"mean", "std", "seeds", "per_task": {task: {"mean", "std", "seeds"}},
                        "delta_vs_uniform": {"mean", "ci95", "n"}}},
     "synthetic": {"ari": {"jsd", "pmi"}, "budget_per_cluster": {NAME: {cluster: share}}},
     "stage_seconds": {...}}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from taskpgm_jax.config import RunConfig
from taskpgm_jax.mrf import Mixture
from taskpgm_jax.pipeline.analysis import (
    adjusted_rand_index,
    budget_per_cluster,
    cluster_tasks,
    paired_difference,
    seed_summary,
)


def _metric_name(metrics: dict[str, dict[int, dict]]) -> str:
    names = {r["metric"] for by_seed in metrics.values() for m in by_seed.values()
             for r in m["per_task"].values()}
    return names.pop() if len(names) == 1 else "macro_mean"


def summarise(cfg: RunConfig, metrics: dict[str, dict[int, dict]], mixtures: dict[str, Mixture],
              pools, run, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """The results dict from every (method, seed) evaluation.

    Args:
      metrics: method -> seed -> the eval stage's metrics.json.
      mixtures: method -> its mixture.
      pools: the run's `Pools` (planted clusters for the synthetic suite).
      run: the `RunDir` (affinities for the cluster-recovery score).
    """
    seeds = list(cfg.seeds)
    eval_tasks = list(next(iter(next(iter(metrics.values())).values()))["per_task"])
    methods: dict[str, Any] = {}
    for method, by_seed in metrics.items():
        values = [by_seed[s]["aggregate"] for s in seeds]
        entry = {**seed_summary(values), "seeds": values, "per_task": {}}
        for task in eval_tasks:
            per = [by_seed[s]["per_task"][task]["value"] for s in seeds]
            entry["per_task"][task] = {**seed_summary(per), "seeds": per}
        methods[method] = entry
    if "uniform" in methods:
        for method, entry in methods.items():
            if method != "uniform":
                entry["delta_vs_uniform"] = paired_difference(entry["seeds"],
                                                              methods["uniform"]["seeds"])
    results = {"metric": _metric_name(metrics), "eval_tasks": eval_tasks, "seeds": seeds,
               "budget": cfg.mixture.budget, "methods": methods}
    if pools.clusters is not None:
        names = list(pools.train.names)
        planted = [pools.clusters[n] for n in names]
        k = len(set(planted))
        mix_dir = run.root / run.manifest["mixtures"]
        ari = {}
        for kind in ("jsd", "pmi"):
            S = np.load(mix_dir / f"affinity_{kind}.npy")
            ari[kind] = float(adjusted_rand_index(cluster_tasks(S, k), planted))
        results["synthetic"] = {
            "ari": ari,
            "budget_per_cluster": {m: budget_per_cluster(x.as_dict(), pools.clusters)
                                   for m, x in mixtures.items()}}
    results["stage_seconds"] = {k: round(v, 3) for k, v in stage_seconds.items()}
    return results
