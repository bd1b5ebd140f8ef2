"""Run report: `report.md` and PNG figures from the artifacts of a finished run (DESIGN.md 2).

Reads RUN_DIR/results.json, RUN_DIR/manifest.json and the probe and mixtures stage directories it
lists; writes RUN_DIR/report.md and RUN_DIR/figures/*.png. This module loads and checks the
inputs and writes the markdown; the figures are drawn in `_figures` on `matplotlib.figure.Figure`
objects (Agg renders them on save), never through pyplot: no global backend switch, no
open-figure registry to leak. Every file is written under a temporary name and renamed, so an
interrupted report leaves the previous files or none, never half of one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from taskpgm_jax._atomic import write_atomic, write_text_atomic
from taskpgm_jax.pipeline import _figures as figs
from taskpgm_jax.pipeline._figures import METHOD_LABELS, METHOD_ORDER
from taskpgm_jax.pipeline._figures import fmt_num as _num
from taskpgm_jax.pipeline._figures import method_label as _label
from taskpgm_jax.pipeline._figures import ordered_methods as _ordered
from taskpgm_jax.pipeline.analysis import (
    adjusted_rand_index,
    affinity_order,
    budget_per_cluster,
    cluster_tasks,
)

__all__ = ["DPI", "FIGURE_DIR", "METHOD_LABELS", "METHOD_ORDER", "RUN_HINT", "ReportInputs",
           "fmt_delta", "fmt_mean_std", "load_report_inputs", "write_report"]

FIGURE_DIR = "figures"
DPI = 100
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


def _malformed(path: Path, producer: str, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; re-run {producer}.")


def _mapping(obj, path: Path, producer: str, what: str, keys=()) -> Mapping:
    """`obj` as a JSON object holding `keys`, else a ValueError naming the file and the entry."""
    if not isinstance(obj, Mapping):
        raise _malformed(path, producer, f"{what} must be a JSON object, got "
                                         f"{type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _malformed(path, producer, f"{what} lacks key(s) {missing}")
    return obj


def _numbers(obj, path: Path, producer: str, what: str) -> list:
    if not isinstance(obj, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            for v in obj):
        raise _malformed(path, producer, f"{what} must be a list of numbers")
    return obj


def _check_results(results, path: Path, producer: str) -> None:
    _mapping(results, path, producer, "the file")
    missing = [k for k in _RESULTS_KEYS if k not in results]
    if missing or not results.get("methods"):
        raise _malformed(path, producer, f"missing or empty key(s) {missing or ['methods']}")
    for key in ("eval_tasks", "seeds"):
        if not isinstance(results[key], list):
            raise _malformed(path, producer, f"{key!r} must be a list")
    _numbers([results["budget"]], path, producer, "'budget'")
    for method, entry in _mapping(results["methods"], path, producer, "'methods'").items():
        where = f"methods.{method}"
        _numbers([_mapping(entry, path, producer, where, ("mean", "std"))[k]
                  for k in ("mean", "std")], path, producer, f"{where} mean and std")
        _numbers(entry.get("seeds", []), path, producer, f"{where}.seeds")
        for task, s in _mapping(entry.get("per_task", {}), path, producer,
                                f"{where}.per_task").items():
            _mapping(s, path, producer, f"{where}.per_task.{task}", ("mean", "std"))
        if entry.get("delta_vs_uniform"):
            d = _mapping(entry["delta_vs_uniform"], path, producer, f"{where}.delta_vs_uniform",
                         ("mean", "ci95", "n"))
            if not isinstance(d["ci95"], list) or len(d["ci95"]) != 2:
                raise _malformed(path, producer, f"{where}.delta_vs_uniform.ci95 must be "
                                                 "[low, high]")


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
    evaluation = "the evaluation (`taskpgm run`)"
    results = _json(run_dir / "results.json", evaluation)
    _check_results(results, run_dir / "results.json", evaluation)
    manifest = run_dir / "manifest.json"
    stages = _mapping(_mapping(_json(manifest, "`taskpgm run`"), manifest, "`taskpgm run`",
                               "the file").get("stages", {}),
                      manifest, "`taskpgm run`", "'stages'")
    dirs = {}
    for stage in ("probe", "mixtures"):
        if stage not in stages:
            raise FileNotFoundError(f"{manifest}: no {stage!r} stage listed; {RUN_HINT}.")
        if not isinstance(stages[stage], str):
            raise _malformed(manifest, "`taskpgm run`", f"stages.{stage} must be a directory "
                                                        "name")
        dirs[stage] = run_dir / stages[stage]
    probe, mix = "the probe stage", "the mixtures stage"
    names_path = dirs["probe"] / "names.json"
    names = _json(names_path, probe)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _malformed(names_path, probe, "expected a list of task names")
    names = tuple(names)
    T = len(names)
    if T == 0 or len(set(names)) != T:
        raise ValueError(f"{names_path}: expected distinct task names, got "
                         f"{T} names ({T - len(set(names))} repeated).")
    mix_path = dirs["mixtures"] / "mixtures.json"
    mixtures = _mapping(_json(mix_path, mix), mix_path, mix, "the file")
    for method, m in mixtures.items():
        _mapping(m, mix_path, mix, f"mixture {method!r}", ("names", "weights"))
        _numbers(m["weights"], mix_path, mix, f"mixture {method!r} weights")
        unknown = sorted(set(map(str, m["names"])) - set(names))
        if unknown or len(m["names"]) != len(m["weights"]):
            raise ValueError(f"{mix_path}: mixture {method!r} has "
                             f"{len(m['names'])} names for {len(m['weights'])} weights; "
                             f"unknown tasks: {unknown[:5]}.")
        _mapping(m.get("provenance", {}), mix_path, mix, f"mixture {method!r} provenance")
    trace_path = dirs["mixtures"] / "solver_trace.json"
    trace = _mapping(_json(trace_path, mix), trace_path, mix, "the file")
    for method, tr in trace.items():
        keys = ("iterations", "energy_gap", "kkt_residual")
        for key in keys:
            _numbers(_mapping(tr, trace_path, mix, f"trace {method!r}", keys)[key], trace_path,
                     mix, f"trace {method!r} {key}")
    greedy_path = dirs["mixtures"] / "greedy.json"
    greedy = _mapping(_json(greedy_path, mix), greedy_path, mix, "the file")
    if greedy:  # {} when the run did not compare the greedy selection
        _mapping(greedy, greedy_path, mix, "the file",
                 ("order", "gains", "cumulative_cost", "budget", "value"))
    clusters_path = dirs["mixtures"] / "clusters.json"
    clusters = (_mapping(_json(clusters_path, mix), clusters_path, mix, "the file")
                if clusters_path.is_file() else None)
    if clusters is not None and set(names) - set(clusters):
        raise ValueError(f"{clusters_path}: no planted cluster for {sorted(set(names) - set(clusters))[:5]}.")
    return ReportInputs(
        run_dir=run_dir, results=results, names=names,
        divergence=_array(dirs["probe"] / "divergence.npy", probe, (T, T)),
        crosslik=_array(dirs["probe"] / "crosslik.npy", probe, (T, T)),
        base_loglik=_array(dirs["probe"] / "base_loglik.npy", probe, (T,)),
        affinity_jsd=_array(dirs["mixtures"] / "affinity_jsd.npy", mix, (T, T)),
        affinity_pmi=_array(dirs["mixtures"] / "affinity_pmi.npy", mix, (T, T)),
        mixtures=mixtures, solver_trace=trace, greedy=greedy, clusters=clusters)


# ----------------------------------------------------------------------------- writing files


def _save(fig: Figure, path: Path) -> None:
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI))


# ----------------------------------------------------------------------------- formatting


def fmt_mean_std(mean: float, std: float, n: int | None = None) -> str:
    """The table format of a seed summary, e.g. '0.6123 ± 0.0100'; with n = 1 seed,
    '0.6123 (1 seed)': a spread of one value is unknown, not 0."""
    if n == 1:
        return f"{mean:.4f} (1 seed)"
    return f"{mean:.4f} ± {std:.4f}"


def _seed_count(summary: Mapping) -> int | None:
    """n of a results.json seed summary ("n", else the length of "seeds"; None if neither)."""
    n, seeds = summary.get("n"), summary.get("seeds")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    return len(seeds) if isinstance(seeds, list) else None


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


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _embed(name: str, alt: str, caption: str) -> str:
    return f"![{alt}]({FIGURE_DIR}/{name})\n\n*{caption}*"


def _weights(inputs: ReportInputs, method: str) -> np.ndarray:
    """[T] weights of `method` in names.json order, normalised to sum 1 (absent tasks: 0)."""
    m = inputs.mixtures[method]
    by_name = dict(zip(m["names"], np.asarray(m["weights"], dtype=np.float64), strict=True))
    w = np.array([by_name.get(t, 0.0) for t in inputs.names])
    return w / w.sum() if w.sum() > 0 else w


# ----------------------------------------------------------------------------- report.md


def _results_md(res: Mapping, methods: list[str]) -> str:
    metric = _md(res["metric"])
    rows = [[_md(m), fmt_mean_std(s["mean"], s["std"], _seed_count(s)),
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
            cells.append(fmt_mean_std(s["mean"], s["std"], _seed_count(s)) if s else "—")
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
    assert inputs.clusters is not None  # the report adds this section only when there are some
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
    _save(figs.clusters_figure(shares, shown), figdir / "clusters.png")
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


def _greedy_md(g: Mapping, examples, figdir: Path) -> str:
    """The greedy section; `examples` is the fine-tune budget (training examples per mixture)."""
    unit = g.get("unit", "cost units")  # "tasks": cardinality budget, every task costs 1
    _save(figs.greedy_figure(g, unit), figdir / "greedy.png")
    chosen = ", ".join(_md(t) for t in g["order"]) or "(none)"
    if unit == "tasks":
        budget = (f"a budget of at most {_num(g['budget'])} tasks (a cardinality budget: every "
                  f"task costs 1; not the {_num(examples)} training examples of each fine-tune, "
                  "which the greedy mixture spreads over the chosen tasks)")
        step = "the task with the largest marginal gain (every task costs 1)"
    else:
        budget = f"budget {_num(g['budget'])} {unit}"
        step = f"the task with the best marginal gain per cost ({unit})"
    text = (f"Chosen in order: {chosen}; value F = {g['value']:.4g} under {budget}. "
            f"{figs.guarantee_text(g)}.")
    if g.get("guarantee") is not None and g.get("guarantee_note"):
        text += f" Bound: {g['guarantee_note']}."
    note = figs.greedy_stop_note(g, unit)
    if note:
        text += f" The chain {note}."
    if g.get("used_best_single"):
        text += " The best single task beat the greedy chain and was returned instead."
    return "\n\n".join([
        "## Budgeted greedy selection", text,
        _embed("greedy.png", "greedy selection curve",
               f"Each step adds {step} while the budget allows and the gain is positive; the "
               "curve flattens where new tasks mostly repeat what is already chosen.")])


def _solver_md(trace: Mapping, mixtures: Mapping) -> list[str]:
    """Caption and table of the solver traces; closed_form solves have no iterations."""
    def solver(m):
        return (mixtures.get(m, {}).get("provenance") or {}).get("method")

    closed = [m for m in _ordered(trace) if solver(m) == "closed_form"]
    rows = [[_md(m), "none (closed form)" if m in closed else
             str(trace[m]["iterations"][-1] if trace[m]["iterations"] else 0),
             *[f"{trace[m][key][-1]:.3e}" if trace[m][key] else "—"
               for key in ("energy_gap", "kkt_residual")]] for m in _ordered(trace)]
    caption = ("The energy gap is measured to the solver's own final solution, so it always "
               "ends at 0 (▼: exact zeros, which a log axis cannot show); convergence shows in "
               "the KKT residual, which should fall to the stopping tolerance: one that ends high "
               "means the solver stopped on its iteration limit.")
    if closed:
        caption += (" The closed-form solution (" + ", ".join(_md(m) for m in closed) + ") is "
                    "one linear solve with no iterations, so it shows as a single point; a KKT "
                    "residual there well above float rounding means the projection onto the "
                    "simplex changed the KKT solution, which is then not the constrained "
                    "minimiser.")
    return [_embed("solver.png", "solver convergence", caption),
            _table(["method", "iterations", "final energy gap", "final KKT residual"], rows)]


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

    _save(figs.results_figure(res, methods), figdir / "results.png")
    parts.append(_results_md(res, methods))

    _save(figs.heatmap_figure(inputs.affinity_jsd, names, order_jsd, "JSD affinity S = 1 - D / ln 2",
                          "S^JSD (1 = identical next-token distributions)", False),
          figdir / "affinity_jsd.png")
    _save(figs.heatmap_figure(inputs.affinity_pmi, names, order_pmi, "PMI affinity (cross-likelihood)",
                          "S^PMI (nats per example; 0 = as good as the task's own model)", True),
          figdir / "affinity_pmi.png")
    off_pmi = inputs.affinity_pmi[~np.eye(T, dtype=bool)] if T > 1 else inputs.affinity_pmi
    lin = figs.symlog_threshold(off_pmi.ravel())
    pmi_scale = ("" if lin is None else
                 f" The colour scale is symmetric-logarithmic beyond ±{lin:.2g} nats (a few cells "
                 "are far larger than the rest), so small differences near 0 stay visible.")
    parts += ["## Task affinities",
              _embed("affinity_jsd.png", "JSD affinity heatmap",
                     "Bright blocks on the diagonal are groups of tasks whose single-task models "
                     "predict the probe set alike (tasks ordered by average-linkage clustering; "
                     "the colour scale spans the off-diagonal values, so the diagonal S = 1 "
                     "sits above it)."),
              _embed("affinity_pmi.png", "PMI affinity heatmap",
                     "Each cell is the log-likelihood change (nats per example, both directions "
                     "averaged) when a task's probe data is scored by the other task's model "
                     "instead of its own: white = interchangeable models, blue = poor "
                     "transfer, red = the other model does even better." + pmi_scale)]

    weights = {m: _weights(inputs, m) for m in mix_methods}
    fig, k = figs.graph_figure(names, inputs.affinity_jsd, order_jsd, weights.get("taskpgm_jsd"),
                               inputs.clusters)
    _save(fig, figdir / "task_graph.png")
    parts += ["## Task graph",
              _embed("task_graph.png", "task graph",
                     f"The {k} most similar task pairs (JSD affinity) as edges, thicker = more "
                     "similar; node area is the TaskPGM-JSD weight, which shows whether the "
                     "mixture spends its budget on one task per group or on every member.")]

    if mix_methods:
        _save(figs.weights_figure(names, weights, order_jsd), figdir / "weights.png")
        rows = [[_md(names[i]), *[f"{weights[m][i]:.3f}" for m in mix_methods]]
                for i in order_jsd]
        parts += ["## Mixture weights",
                  _embed("weights.png", "mixture weights per method",
                         "Where each method puts the training budget; compare TaskPGM's "
                         "weights with the uniform and size-based baselines task by task."),
                  _table(["task", *[_md(m) for m in mix_methods]], rows)]

    trace = inputs.solver_trace
    if trace:
        _save(figs.solver_figure(trace), figdir / "solver.png")
        parts += ["## Solver convergence", *_solver_md(trace, inputs.mixtures)]

    if inputs.greedy:  # {} when the run did not compare the greedy selection
        parts.append(_greedy_md(inputs.greedy, res["budget"], figdir))

    if inputs.clusters is not None:
        parts.append(_synthetic_md(inputs, mix_methods, figdir))

    timings = res.get("stage_seconds") or {}
    if timings:
        rows = [[_md(s), f"{float(v):.1f}"] for s, v in timings.items()]
        rows.append(["**total**", f"{sum(float(v) for v in timings.values()):.1f}"])
        parts += ["## Stage timings", _table(["stage", "seconds"], rows)]

    path = run_dir / "report.md"
    text = "\n\n".join(parts) + "\n"
    write_text_atomic(path, text)
    return path

