"""Run report: `report.md` and PNG figures from the artifacts of a finished run (DESIGN.md 2).

Reads RUN_DIR/results.json, RUN_DIR/manifest.json and the probe and mixtures stage directories it
lists; writes RUN_DIR/report.md and RUN_DIR/figures/*.png. Figures are drawn on
`matplotlib.figure.Figure` objects (Agg renders them on save), never through pyplot: no global
backend switch, no open-figure registry to leak. Every file is written under a temporary name and
renamed, so an interrupted report leaves the previous files or none, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from taskpgm_jax.pipeline.analysis import (
    adjusted_rand_index,
    affinity_order,
    budget_per_cluster,
    cluster_tasks,
)

FIGURE_DIR = "figures"
DPI = 100
METHOD_ORDER = ("taskpgm_jsd", "taskpgm_pmi", "greedy", "uniform", "size_proportional",
                "temperature")
METHOD_LABELS = {"taskpgm_jsd": "TaskPGM (JSD)", "taskpgm_pmi": "TaskPGM (PMI)",
                 "greedy": "greedy (budgeted)", "uniform": "uniform",
                 "size_proportional": "size-proportional", "temperature": "temperature"}
RUN_HINT = "run `taskpgm run CONFIG.yaml` first (finished stages are skipped, others resume)"
_RESULTS_KEYS = ("metric", "eval_tasks", "seeds", "budget", "methods")


@dataclass(frozen=True)
class ReportInputs:
    """Everything `write_report` reads from a run directory (T training tasks).

    run_dir: the run directory. results: parsed results.json (schema in `write_report`).
    names: the T training-task names, in the order of every [T] / [T, T] array below.
    divergence: [T, T] float64 task-level JSD (nats). crosslik: [T, T] float64 L[i, j] (model i
    on task j's probe data). base_loglik: [T] float64 base model on each task's probe data.
    affinity_jsd, affinity_pmi: [T, T] float64 raw affinities S.
    mixtures: {method: {"names", "weights", "unit", "provenance"}}. solver_trace: {method:
    {"iterations", "energy_gap", "kkt_residual"}}. greedy: parsed greedy.json.
    clusters: {task: planted cluster label} (synthetic suite) or None.
    """

    run_dir: Path
    results: Mapping
    names: tuple[str, ...]
    divergence: np.ndarray
    crosslik: np.ndarray
    base_loglik: np.ndarray
    affinity_jsd: np.ndarray
    affinity_pmi: np.ndarray
    mixtures: Mapping
    solver_trace: Mapping
    greedy: Mapping
    clusters: Mapping | None = None


def _require(path: Path, producer: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found at {path}: it is written by {producer}; "
                                f"{RUN_HINT}.")
    return path


def _json(path: Path, producer: str):
    try:
        return json.loads(_require(path, producer).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-run {producer}.") from None


def _array(path: Path, producer: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.load(_require(path, producer), allow_pickle=False).astype(np.float64)
    if arr.shape != shape:
        raise ValueError(f"{path}: expected shape {shape} (T = {shape[0]} tasks in names.json), "
                         f"got {arr.shape}; the stage directories come from different runs?")
    return arr


def load_report_inputs(run_dir) -> ReportInputs:
    """Read and check every artifact the report needs.

    Args:
      run_dir: a run directory written by `taskpgm run` (results.json, manifest.json, stages/).

    Returns:
      A `ReportInputs`. FileNotFoundError names a missing file and the stage that writes it;
      ValueError names a malformed one.

    Example:
      >>> inputs = load_report_inputs("runs/demo"); inputs.names[:3]
    """
    run_dir = Path(run_dir)
    results = _json(run_dir / "results.json", "the evaluation at the end of `taskpgm run`")
    missing = [k for k in _RESULTS_KEYS if k not in results]
    if missing or not results.get("methods"):
        raise ValueError(f"{run_dir / 'results.json'}: missing or empty key(s) "
                         f"{missing or ['methods']}; re-run the evaluation.")
    stages = _json(run_dir / "manifest.json", "`taskpgm run`").get("stages", {})
    dirs = {}
    for stage in ("probe", "mixtures"):
        if stage not in stages:
            raise FileNotFoundError(f"{run_dir / 'manifest.json'}: no {stage!r} stage listed; "
                                    f"{RUN_HINT}.")
        dirs[stage] = run_dir / stages[stage]
    probe, mix = "the probe stage", "the mixtures stage"
    names = tuple(_json(dirs["probe"] / "names.json", probe))
    T = len(names)
    if T == 0 or len(set(names)) != T:
        raise ValueError(f"{dirs['probe'] / 'names.json'}: expected distinct task names, got "
                         f"{T} names ({T - len(set(names))} repeated).")
    mixtures = _json(dirs["mixtures"] / "mixtures.json", mix)
    for method, m in mixtures.items():
        unknown = sorted(set(m["names"]) - set(names))
        if unknown or len(m["names"]) != len(m["weights"]):
            raise ValueError(f"{dirs['mixtures'] / 'mixtures.json'}: mixture {method!r} has "
                             f"{len(m['names'])} names for {len(m['weights'])} weights; "
                             f"unknown tasks: {unknown[:5]}.")
    clusters_path = dirs["mixtures"] / "clusters.json"
    clusters = json.loads(clusters_path.read_text()) if clusters_path.is_file() else None
    if clusters is not None and set(names) - set(clusters):
        raise ValueError(f"{clusters_path}: no planted cluster for {sorted(set(names) - set(clusters))[:5]}.")
    return ReportInputs(
        run_dir=run_dir, results=results, names=names,
        divergence=_array(dirs["probe"] / "divergence.npy", probe, (T, T)),
        crosslik=_array(dirs["probe"] / "crosslik.npy", probe, (T, T)),
        base_loglik=_array(dirs["probe"] / "base_loglik.npy", probe, (T,)),
        affinity_jsd=_array(dirs["mixtures"] / "affinity_jsd.npy", mix, (T, T)),
        affinity_pmi=_array(dirs["mixtures"] / "affinity_pmi.npy", mix, (T, T)),
        mixtures=mixtures,
        solver_trace=_json(dirs["mixtures"] / "solver_trace.json", mix),
        greedy=_json(dirs["mixtures"] / "greedy.json", mix),
        clusters=clusters)


# ----------------------------------------------------------------------------- writing files


def _atomic_write(path: Path, write: Callable) -> None:
    """Write via a temporary file in the same directory, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the report private to its writer
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _save(fig: Figure, path: Path) -> None:
    _atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI))


# ----------------------------------------------------------------------------- formatting


def fmt_mean_std(mean: float, std: float) -> str:
    """The table format of a seed summary, e.g. '0.6123 ± 0.0100'."""
    return f"{mean:.4f} ± {std:.4f}"


def fmt_delta(delta: Mapping | None) -> str:
    """The table format of a paired difference, e.g. '+0.0200 [-0.0100, +0.0500]'."""
    if not delta:  # no uniform run to compare with
        return "—"
    lo, hi = delta["ci95"]
    if lo is None or hi is None:
        return f"{delta['mean']:+.4f} [CI n/a: n = {delta['n']} < 2]"
    return f"{delta['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _md(text) -> str:
    return str(text).replace("|", "\\|")


def _num(x) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _embed(name: str, alt: str, caption: str) -> str:
    return f"![{alt}]({FIGURE_DIR}/{name})\n\n*{caption}*"


def _ordered(methods) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _color(method: str) -> str:
    i = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return f"C{i % 10}"


def _weights(inputs: ReportInputs, method: str) -> np.ndarray:
    """[T] weights of `method` in names.json order, normalised to sum 1 (absent tasks: 0)."""
    m = inputs.mixtures[method]
    by_name = dict(zip(m["names"], np.asarray(m["weights"], dtype=np.float64), strict=True))
    w = np.array([by_name.get(t, 0.0) for t in inputs.names])
    return w / w.sum() if w.sum() > 0 else w


def _tick_step(T: int) -> int:
    return max(1, -(-T // 60))  # at most ~60 labels per axis stay legible


# ----------------------------------------------------------------------------- figures


def _results_figure(inputs: ReportInputs, methods: list[str]) -> Figure:
    res = inputs.results
    fig = Figure(figsize=(max(5.0, 1.1 * len(methods) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(methods))
    stats = [res["methods"][m] for m in methods]
    ax.bar(x, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=4,
           color=[_color(m) for m in methods], alpha=0.8, label="mean ± std over seeds")
    for i, s in enumerate(stats):
        seeds = s.get("seeds", [])
        ax.scatter(np.full(len(seeds), x[i]), seeds, color="black", s=12, zorder=3,
                   label="one seed" if i == 0 else None)
    ax.set_xticks(x, labels=[_label(m) for m in methods], rotation=20, ha="right")
    ax.set_ylabel(f"{res['metric']} (macro mean over {len(res['eval_tasks'])} held-out tasks)")
    ax.set_title(f"Held-out {res['metric']} per mixture method\n"
                 f"({len(res['seeds'])} seeds, {_num(res['budget'])} training examples)")
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def _heatmap_figure(S, names, order, title: str, cbar_label: str, diverging: bool) -> Figure:
    T = len(names)
    side = min(12.0, 3.0 + 0.3 * T)
    fig = Figure(figsize=(side + 1.8, side + 0.6), layout="constrained")
    ax = fig.add_subplot()
    M = S[np.ix_(order, order)]
    off = M[~np.eye(T, dtype=bool)] if T > 1 else M.ravel()
    if diverging:  # centre 0: the sign of PMI means transfer helps (+) or hurts (-)
        lim = float(np.abs(off).max()) or 1.0
        im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    else:  # the off-diagonal range sets the scale; the diagonal (1) would wash it out
        im = ax.imshow(M, cmap="viridis", vmin=float(off.min()), vmax=float(M.max()),
                       interpolation="nearest")
    step, fs = _tick_step(T), max(4.0, min(9.0, 320.0 / T))
    ticks = np.arange(0, T, step)
    labels = [names[order[i]] for i in ticks]
    ax.set_xticks(ticks, labels=labels, rotation=90, fontsize=fs)
    ax.set_yticks(ticks, labels=labels, fontsize=fs)
    ax.set_xlabel("task (average-linkage leaf order)")
    ax.set_ylabel("task (average-linkage leaf order)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar_label, shrink=0.8)
    return fig


def _graph_figure(inputs: ReportInputs, order: np.ndarray) -> tuple[Figure, int]:
    names, T = inputs.names, len(inputs.names)
    S = 0.5 * (inputs.affinity_jsd + inputs.affinity_jsd.T)
    iu, ju = np.triu_indices(T, k=1)
    k = min(2 * T, iu.size)
    top = np.argsort(-S[iu, ju], kind="stable")[:k]
    # Clustered tasks sit next to each other on the circle, so their edges stay short.
    angle = np.empty(T)
    angle[order] = 2 * np.pi * np.arange(T) / T
    pos = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    fig = Figure(figsize=(8.5, 6.5), layout="constrained")
    ax = fig.add_subplot()
    legend = []
    if k:
        vals = S[iu[top], ju[top]]
        lo, hi = float(vals.min()), float(vals.max())
        span = hi - lo if hi > lo else 1.0
        widths = 0.6 + 4.4 * (vals - lo) / span
        ax.add_collection(LineCollection(pos[np.stack([iu[top], ju[top]], 1)], colors="0.45",
                                         linewidths=widths, alpha=0.7, zorder=1))
        legend += [Line2D([], [], color="0.45", lw=0.6 + 4.4 * (v - lo) / span,
                          label=f"edge S^JSD = {v:.3f}") for v in sorted({lo, hi})]
    sizes = np.full(T, 200.0)
    if "taskpgm_jsd" in inputs.mixtures:
        w = _weights(inputs, "taskpgm_jsd")
        scale = 900.0 / max(float(w.max()), 1e-12)
        sizes = 30.0 + scale * w
        legend += [ax.scatter([], [], s=30.0 + scale * v, color="0.7", edgecolors="black",
                              label=f"weight {v:.2f}") for v in sorted({w.max(), np.median(w)})]
    colors = ["C0"] * T
    if inputs.clusters is not None:  # colour by planted cluster: does the graph find them?
        planted = sorted({str(inputs.clusters[t]) for t in names})
        colors = [f"C{planted.index(str(inputs.clusters[t])) % 10}" for t in names]
        legend += [Line2D([], [], ls="", marker="o", color=f"C{i % 10}",
                          label=f"planted cluster {c}") for i, c in enumerate(planted)]
    ax.scatter(pos[:, 0], pos[:, 1], s=sizes, c=colors, edgecolors="black", zorder=2)
    for (x, y), a, name in zip(pos, np.degrees(angle), names, strict=True):
        # Radial labels: they never overlap their neighbours, however many tasks sit on the circle.
        ax.text(1.17 * x, 1.17 * y, name, fontsize=max(5.0, min(9.0, 300 / T)), va="center",
                ha="left" if x >= 0 else "right", rotation=a if x >= 0 else a - 180,
                rotation_mode="anchor")
    ax.set_xlim(-1.75, 1.75)
    ax.set_ylim(-1.6, 1.6)
    ax.set_aspect("equal")
    ax.axis("off")
    node = ("node area ∝ TaskPGM-JSD weight" if "taskpgm_jsd" in inputs.mixtures
            else "equal node sizes (no TaskPGM-JSD mixture)")
    ax.set_title(f"Task graph: the {k} strongest JSD-affinity edges\n(line width ∝ affinity; "
                 f"{node})", fontsize=10)
    if legend:
        fig.legend(handles=legend, loc="outside right upper", fontsize=8,
                   labelspacing=1.4, borderpad=1.0, handletextpad=1.5)
    return fig, k


def _weights_figure(inputs: ReportInputs, methods: list[str], order: np.ndarray) -> Figure:
    T = len(inputs.names)
    fig = Figure(figsize=(min(18.0, max(6.0, 0.16 * T * len(methods) + 2.5)), 4.5),
                 layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        ax.bar(np.arange(T) + (j - (len(methods) - 1) / 2) * width, _weights(inputs, m)[order],
               width=width, color=_color(m), label=_label(m))
    step = _tick_step(T)
    ticks = np.arange(0, T, step)
    ax.set_xticks(ticks, labels=[inputs.names[order[i]] for i in ticks],
                  rotation=90 if T > 8 else 30, ha="center" if T > 8 else "right",
                  fontsize=max(4.0, min(9.0, 320.0 / T)))
    ax.set_xlabel("training task (JSD-affinity leaf order)")
    ax.set_ylabel("mixture weight (share of the training budget)")
    ax.set_title("Mixture weights per method")
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def _solver_figure(trace: Mapping) -> Figure:
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    axes = fig.subplots(1, 2)
    keys = (("energy_gap", "energy gap E(w_k) - E(w*)"), ("kkt_residual", "KKT residual"))
    for ax, (key, ylabel) in zip(axes, keys, strict=True):
        for m in _ordered(trace):
            it = np.asarray(trace[m]["iterations"])
            y = np.asarray(trace[m][key], dtype=np.float64)
            # Exact zeros (the last iterate's gap) have no place on a log axis.
            ax.semilogy(it, np.where(y > 0, y, np.nan), marker=".", color=_color(m),
                        label=_label(m))
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{ylabel} (log scale)")
        ax.set_title(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle("MRF solver convergence (TaskPGM mixtures)")
    return fig


def _guarantee_text(g: Mapping) -> str:
    gamma = g.get("gamma")
    how = "exact" if g.get("gamma_exact") else "sampled estimate"
    gamma_txt = f"γ = {gamma:.3f} ({how})" if gamma is not None else "γ not computed"
    if g.get("guarantee") is not None:
        return f"{gamma_txt}; guarantee F(greedy) ≥ {g['guarantee']:.3f} × OPT"
    return f"{gamma_txt}; no guarantee: {g.get('guarantee_note', '')}"


def _greedy_figure(g: Mapping, unit: str) -> Figure:
    cost = np.concatenate([[0.0], np.asarray(g["cumulative_cost"], dtype=np.float64)])
    value = np.concatenate([[0.0], np.cumsum(np.asarray(g["gains"], dtype=np.float64))])
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(cost, value, marker="o", color="C2", label="greedy chain: F(A_k) = cumulative gain")
    for c, v, name in zip(cost[1:], value[1:], g["order"], strict=True):
        ax.annotate(name, (c, v), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    rotation=20)
    ax.axvline(float(g["budget"]), ls="--", color="C3", label=f"budget B = {_num(g['budget'])}")
    ax.axhline(float(g["value"]), ls=":", color="0.3", label=f"returned F = {g['value']:.4g}")
    ax.plot([], [], " ", label=_guarantee_text(g))  # the guarantee as a legend line
    ax.set_xlabel(f"cumulative cost ({unit})")
    ax.set_ylabel("set value F(A) (F(∅) = 0)")
    ax.set_title("Budgeted greedy task selection\n" + _guarantee_text(g), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def _clusters_figure(shares: Mapping, methods: list[str]) -> Figure:
    labels = sorted({c for m in methods for c in shares[m]}, key=str)
    fig = Figure(figsize=(max(5.0, 1.0 * len(methods) + 3), 4.2), layout="constrained")
    ax = fig.add_subplot()
    bottom = np.zeros(len(methods))
    for i, c in enumerate(labels):
        h = np.array([shares[m].get(c, 0.0) for m in methods])
        ax.bar(np.arange(len(methods)), h, bottom=bottom, color=f"C{i % 10}",
               label=f"planted cluster {c}")
        bottom += h
    ax.set_xticks(np.arange(len(methods)), labels=[_label(m) for m in methods], rotation=20,
                  ha="right")
    ax.set_ylabel("share of the training budget")
    ax.set_title("Budget per planted cluster (synthetic suite)")
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


# ----------------------------------------------------------------------------- report.md


def _results_md(res: Mapping, methods: list[str]) -> str:
    metric = _md(res["metric"])
    rows = [[_md(m), fmt_mean_std(s["mean"], s["std"]),
             "(reference)" if m == "uniform" else fmt_delta(s.get("delta_vs_uniform")),
             ", ".join(f"{v:.4f}" for v in s.get("seeds", []))]
            for m, s in ((m, res["methods"][m]) for m in methods)]
    main = _table(["method", f"{metric} (mean ± std)", "difference to uniform [95% CI]",
                   "per seed"], rows)
    tasks = list(res["eval_tasks"])
    tasks += sorted({t for m in methods for t in res["methods"][m].get("per_task", {})}
                    - set(tasks))
    per_task = []
    for t in tasks:
        cells = []
        for m in methods:
            s = res["methods"][m].get("per_task", {}).get(t)
            cells.append(fmt_mean_std(s["mean"], s["std"]) if s else "—")
        per_task.append([_md(t), *cells])
    return "\n\n".join([
        "## Results", main,
        _embed("results.png", f"{metric} per method",
               "Bars: mean over seeds, whiskers: one standard deviation, dots: single seeds; a "
               "difference interval that excludes 0 means the method beats (or trails) uniform "
               "consistently across seeds."),
        f"### {metric} per held-out task (mean ± std over seeds)",
        _table(["held-out task", *[_md(m) for m in methods]], per_task)])


def _synthetic_md(inputs: ReportInputs, methods: list[str], figdir: Path) -> str:
    """Planted-cluster section: ARI and budget per cluster (from results.json, else recomputed)."""
    syn = inputs.results.get("synthetic") or {}
    planted = [inputs.clusters[t] for t in inputs.names]
    k = len(set(map(str, planted)))
    ari = syn.get("ari") or {
        kind: adjusted_rand_index(cluster_tasks(S, k), np.array(planted, dtype=str))
        for kind, S in (("jsd", inputs.affinity_jsd), ("pmi", inputs.affinity_pmi))}
    shares = syn.get("budget_per_cluster") or {
        m: budget_per_cluster(dict(zip(inputs.names, _weights(inputs, m), strict=True)),
                              inputs.clusters) for m in methods}
    shown = [m for m in methods if m in shares]
    _save(_clusters_figure(shares, shown), figdir / "clusters.png")
    labels = sorted({c for m in shown for c in shares[m]}, key=str)
    rows = [[_md(c), *[f"{shares[m].get(c, 0.0):.3f}" for m in shown]] for c in labels]
    members = [[_md(c), ", ".join(_md(t) for t in inputs.names if str(inputs.clusters[t]) ==
                                  str(c))] for c in labels]
    ari_txt = "; ".join(f"{kind.upper()} affinity: {v:.3f}" for kind, v in ari.items())
    return "\n\n".join([
        "## Planted clusters (synthetic suite)",
        (f"Adjusted Rand index between the planted clusters and average-linkage clusters "
         f"(k = {k}) of each affinity (1 = recovered exactly, about 0 = chance): {ari_txt}."),
        _table(["planted cluster", "tasks"], members),
        _table(["planted cluster", *[_md(m) for m in shown]], rows),
        _embed("clusters.png", "budget per planted cluster",
               "Share of the training budget each method gives every planted cluster; the "
               "baselines ignore the clusters, so differences show what the affinities changed."
               )])


def _greedy_md(g: Mapping, figdir: Path) -> str:
    unit = g.get("unit", "cost units")  # greedy.json may name its cost unit (tasks, examples)
    _save(_greedy_figure(g, unit), figdir / "greedy.png")
    text = (f"Chosen in order: {', '.join(_md(t) for t in g['order']) or '(none)'}; value F = "
            f"{g['value']:.4g} at budget {_num(g['budget'])} {unit}. {_guarantee_text(g)}.")
    if g.get("guarantee") is not None and g.get("guarantee_note"):
        text += f" Bound: {g['guarantee_note']}."
    if g.get("used_best_single"):
        text += " The best single task beat the greedy chain and was returned instead."
    return "\n\n".join([
        "## Budgeted greedy selection", text,
        _embed("greedy.png", "greedy selection curve",
               "Each step adds the task with the best gain per cost; the curve flattens where "
               "new tasks mostly repeat what is already chosen.")])


def write_report(run_dir, inputs: ReportInputs | None = None) -> Path:
    """Write RUN_DIR/report.md and its figures in RUN_DIR/figures/.

    results.json holds {"metric", "eval_tasks", "seeds", "budget", "methods": {method: {"mean",
    "std", "seeds", "per_task": {task: {"mean", "std", "seeds"}}, "delta_vs_uniform": {"mean",
    "ci95", "n"}}}, "synthetic" (optional): {"ari", "budget_per_cluster"}, "stage_seconds"}.

    Figures: results.png, affinity_jsd.png, affinity_pmi.png, task_graph.png, weights.png,
    solver.png, greedy.png, and clusters.png when planted clusters are present.

    Args:
      run_dir: the run directory.
      inputs: already-loaded inputs (default: `load_report_inputs(run_dir)`).

    Returns:
      The path of report.md.

    Example:
      >>> write_report("runs/demo")   # PosixPath('runs/demo/report.md')
    """
    run_dir = Path(run_dir)
    inputs = load_report_inputs(run_dir) if inputs is None else inputs
    figdir = run_dir / FIGURE_DIR
    figdir.mkdir(parents=True, exist_ok=True)
    res, names, T = inputs.results, inputs.names, len(inputs.names)
    methods = _ordered(res["methods"])
    mix_methods = _ordered(inputs.mixtures)
    order_jsd = affinity_order(inputs.affinity_jsd)
    order_pmi = affinity_order(inputs.affinity_pmi)
    seeds = ", ".join(str(s) for s in res["seeds"])
    parts = [
        f"# TaskPGM report: {_md(run_dir.name)}",
        "## Run summary",
        "\n".join([
            (f"- **Metric**: {_md(res['metric'])}, macro mean over {len(res['eval_tasks'])} "
             f"held-out tasks ({', '.join(_md(t) for t in res['eval_tasks'])})"),
            f"- **Seeds**: {seeds} (n = {len(res['seeds'])})",
            f"- **Budget**: {_num(res['budget'])} training examples per mixture fine-tune",
            f"- **Training tasks** (T = {T}): {', '.join(_md(t) for t in names)}",
            f"- **Methods**: {', '.join(f'{_label(m)} (`{m}`)' for m in methods)}"])]

    _save(_results_figure(inputs, methods), figdir / "results.png")
    parts.append(_results_md(res, methods))

    _save(_heatmap_figure(inputs.affinity_jsd, names, order_jsd, "JSD affinity S = 1 - D / ln 2",
                          "S^JSD (1 = identical next-token distributions)", False),
          figdir / "affinity_jsd.png")
    _save(_heatmap_figure(inputs.affinity_pmi, names, order_pmi, "PMI affinity (cross-likelihood)",
                          "S^PMI (nats per example; 0 = as good as the task's own model)", True),
          figdir / "affinity_pmi.png")
    parts += ["## Task affinities",
              _embed("affinity_jsd.png", "JSD affinity heatmap",
                     "Bright blocks on the diagonal are groups of tasks whose single-task models "
                     "predict the probe set alike (tasks ordered by average-linkage clustering)."),
              _embed("affinity_pmi.png", "PMI affinity heatmap",
                     "Each cell is the log-likelihood change (nats per example, both directions "
                     "averaged) when a task's probe data is scored by the other task's model "
                     "instead of its own: white = interchangeable models, blue = poor "
                     "transfer, red = the other model does even better.")]

    fig, k = _graph_figure(inputs, order_jsd)
    _save(fig, figdir / "task_graph.png")
    parts += ["## Task graph",
              _embed("task_graph.png", "task graph",
                     f"The {k} most similar task pairs (JSD affinity) as edges, thicker = more "
                     "similar; node area is the TaskPGM-JSD weight, which shows whether the "
                     "mixture spends its budget on one task per group or on every member.")]

    if mix_methods:
        _save(_weights_figure(inputs, mix_methods, order_jsd), figdir / "weights.png")
        rows = [[_md(names[i]), *[f"{_weights(inputs, m)[i]:.3f}" for m in mix_methods]]
                for i in order_jsd]
        parts += ["## Mixture weights",
                  _embed("weights.png", "mixture weights per method",
                         "Where each method puts the training budget; compare TaskPGM's "
                         "weights with the uniform and size-based baselines task by task."),
                  _table(["task", *[_md(m) for m in mix_methods]], rows)]

    trace = inputs.solver_trace
    if trace:
        _save(_solver_figure(trace), figdir / "solver.png")
        rows = [[_md(m), str(trace[m]["iterations"][-1] if trace[m]["iterations"] else 0),
                 *[f"{trace[m][key][-1]:.3e}" if trace[m][key] else "—"
                   for key in ("energy_gap", "kkt_residual")]] for m in _ordered(trace)]
        parts += ["## Solver convergence",
                  _embed("solver.png", "solver convergence",
                         "Both curves should fall to the stopping tolerance; a curve that ends "
                         "high means the solver stopped on its iteration limit, not converged."),
                  _table(["method", "iterations", "final energy gap", "final KKT residual"],
                         rows)]

    if inputs.greedy:  # {} when the run did not compare the greedy selection
        parts.append(_greedy_md(inputs.greedy, figdir))

    if inputs.clusters is not None:
        parts.append(_synthetic_md(inputs, mix_methods, figdir))

    timings = res.get("stage_seconds") or {}
    if timings:
        rows = [[_md(s), f"{float(v):.1f}"] for s, v in timings.items()]
        rows.append(["**total**", f"{sum(float(v) for v in timings.values()):.1f}"])
        parts += ["## Stage timings", _table(["stage", "seconds"], rows)]

    path = run_dir / "report.md"
    text = "\n\n".join(parts) + "\n"
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
    return path

