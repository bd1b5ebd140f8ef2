"""The report's figures, each drawn on its own `matplotlib.figure.Figure` (never through pyplot).

Every function takes plain arrays and JSON records (no file access) and returns the figure; the
report saves it. Method order, labels and colours are shared with the report's tables so that a
method looks the same everywhere.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.artist import Artist
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize, SymLogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

METHOD_ORDER = ("taskpgm_jsd", "taskpgm_pmi", "greedy", "uniform", "size_proportional",
                "temperature")
METHOD_LABELS = {"taskpgm_jsd": "TaskPGM (JSD)", "taskpgm_pmi": "TaskPGM (PMI)",
                 "greedy": "greedy (budgeted)", "uniform": "uniform",
                 "size_proportional": "size-proportional", "temperature": "temperature"}


def ordered_methods(methods) -> list[str]:
    """`methods` in METHOD_ORDER, unknown ones after them in name order."""
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _color(method: str) -> str:
    i = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return f"C{i % 10}"


def fmt_num(x) -> str:
    """1600.0 -> '1,600'; 0.5 -> '0.5'."""
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def _tick_step(T: int) -> int:
    return max(1, -(-T // 60))  # at most ~60 labels per axis stay legible


def _tick_fontsize(T: int) -> float:
    return max(4.0, min(9.0, 320.0 / T))


def results_figure(res: Mapping, methods: list[str]) -> Figure:
    """Bars of the held-out metric per method (mean ± std over seeds) with one dot per seed."""
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
    ax.set_xticks(x, labels=[method_label(m) for m in methods], rotation=20, ha="right")
    ax.set_ylabel(f"{res['metric']} (macro mean over {len(res['eval_tasks'])} held-out tasks)")
    ax.set_title(f"Held-out {res['metric']} per mixture method\n"
                 f"({len(res['seeds'])} seeds, {fmt_num(res['budget'])} training examples)")
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def symlog_threshold(off: np.ndarray) -> float | None:
    """Linear range of a symmetric-log colour scale for the off-diagonal values `off`, or None
    for a linear scale. A log scale is used when the largest |value| exceeds 4x the median one:
    a few far-off cells would otherwise leave every other cell near the centre colour."""
    a = np.abs(off[off != 0])
    if a.size == 0:
        return None
    med = float(np.median(a))
    return med if float(a.max()) > 4.0 * med else None


def heatmap_figure(S, names: Sequence[str], order, title: str, cbar_label: str,
                   diverging: bool) -> Figure:
    """[T, T] affinity `S` with rows and columns in `order`.

    diverging: a red-blue scale centred on 0 (PMI: the sign says whether transfer helps), turned
    symmetric-log when `symlog_threshold` asks for it; otherwise viridis over the off-diagonal
    range, with the diagonal (S^JSD_ii = 1) above the top of the scale.
    """
    T = len(names)
    side = min(12.0, 3.0 + 0.3 * T)
    fig = Figure(figsize=(side + 1.8, side + 0.6), layout="constrained")
    ax = fig.add_subplot()
    M = S[np.ix_(order, order)]
    off = M[~np.eye(T, dtype=bool)] if T > 1 else M.ravel()
    extend = "neither"
    if diverging:
        lim = float(np.abs(off).max()) or 1.0
        lin = symlog_threshold(off)
        if lin is None:
            norm = Normalize(vmin=-lim, vmax=lim)
        else:
            norm = SymLogNorm(linthresh=lin, linscale=1.0, vmin=-lim, vmax=lim, base=10)
            cbar_label += f"\n(symmetric log scale, linear within ±{lin:.2g})"
        im = ax.imshow(M, cmap="RdBu_r", norm=norm, interpolation="nearest")
    else:  # the off-diagonal range sets the scale; the diagonal (1) would wash it out
        lo, hi = float(off.min()), float(off.max())
        im = ax.imshow(M, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        if float(M.max()) > hi:
            extend = "max"
            cbar_label += f"\n(diagonal = {float(np.diag(M).max()):.3g}, above the scale)"
    step, fs = _tick_step(T), _tick_fontsize(T)
    ticks = np.arange(0, T, step)
    labels = [names[order[i]] for i in ticks]
    ax.set_xticks(ticks, labels=labels, rotation=90, fontsize=fs)
    ax.set_yticks(ticks, labels=labels, fontsize=fs)
    ax.set_xlabel("task (average-linkage leaf order)")
    ax.set_ylabel("task (average-linkage leaf order)")
    ax.set_title(title)
    cbar = fig.colorbar(im, ax=ax, label=cbar_label, shrink=0.8, extend=extend)
    if diverging:  # plain numbers (-10, -1, 0, 1, 10), not 10^k, on a symmetric-log bar
        cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    return fig


def graph_figure(names: Sequence[str], affinity, order, weights: np.ndarray | None,
                 clusters: Mapping | None) -> tuple[Figure, int]:
    """The 2T strongest edges of sym(`affinity`) on a circle in `order`.

    weights: [T] TaskPGM-JSD weights for the node areas (None: equal nodes). clusters: {task:
    planted label} to colour the nodes, or None. Returns the figure and the number of edges.
    """
    T = len(names)
    S = 0.5 * (affinity + affinity.T)
    iu, ju = np.triu_indices(T, k=1)
    k = min(2 * T, iu.size)
    top = np.argsort(-S[iu, ju], kind="stable")[:k]
    # Clustered tasks sit next to each other on the circle, so their edges stay short.
    angle = np.empty(T)
    angle[order] = 2 * np.pi * np.arange(T) / T
    pos = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    fig = Figure(figsize=(8.5, 6.5), layout="constrained")
    ax = fig.add_subplot()
    legend: list[Artist] = []
    if k:
        vals = S[iu[top], ju[top]]
        lo, hi = float(vals.min()), float(vals.max())
        span = hi - lo if hi > lo else 1.0
        widths = 0.6 + 4.4 * (vals - lo) / span
        ax.add_collection(LineCollection(list(pos[np.stack([iu[top], ju[top]], 1)]), colors="0.45",
                                         linewidths=widths, alpha=0.7, zorder=1))
        legend += [Line2D([], [], color="0.45", lw=0.6 + 4.4 * (v - lo) / span,
                          label=f"edge S^JSD = {v:.3f}") for v in sorted({lo, hi})]
    sizes = np.full(T, 200.0)
    if weights is not None:
        scale = 900.0 / max(float(weights.max()), 1e-12)
        sizes = 30.0 + scale * weights
        legend += [ax.scatter([], [], s=30.0 + scale * v, color="0.7", edgecolors="black",
                              label=f"weight {v:.2f}")
                   for v in sorted({weights.max(), np.median(weights)})]
    colors = ["C0"] * T
    if clusters is not None:  # colour by planted cluster: does the graph find them?
        planted = sorted({str(clusters[t]) for t in names})
        colors = [f"C{planted.index(str(clusters[t])) % 10}" for t in names]
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
    node = ("node area ∝ TaskPGM-JSD weight" if weights is not None
            else "equal node sizes (no TaskPGM-JSD mixture)")
    ax.set_title(f"Task graph: the {k} strongest JSD-affinity edges\n(line width ∝ affinity; "
                 f"{node})", fontsize=10)
    if legend:
        fig.legend(handles=legend, loc="outside right upper", fontsize=8,
                   labelspacing=1.8, borderpad=1.0, handletextpad=1.5)
    return fig, k


def weights_figure(names: Sequence[str], weights: Mapping[str, np.ndarray], order) -> Figure:
    """Grouped bars of each method's [T] weights (names order), tasks in `order`.

    When one method's largest weight is over 3x every other method's (a greedy selection of one
    task gets weight 1), the axis is cut above the others and the cut bars carry their value.
    """
    T, methods = len(names), list(weights)
    fig = Figure(figsize=(min(18.0, max(6.0, 0.16 * T * len(methods) + 2.5)), 4.5),
                 layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(methods), 1)
    peaks = np.sort([float(np.max(weights[m], initial=0.0)) for m in methods])[::-1]
    cap = 1.3 * peaks[1] if len(peaks) > 1 and peaks[0] > 3.0 * peaks[1] > 0 else None
    for j, m in enumerate(methods):
        x = np.arange(T) + (j - (len(methods) - 1) / 2) * width
        w = np.asarray(weights[m])[order]
        ax.bar(x, w, width=width, color=_color(m), label=method_label(m))
        for xi, wi in zip(x, w, strict=True):
            if cap is not None and wi > cap:
                ax.text(xi, 0.97 * cap, f"{wi:.2f} ↑", rotation=90, ha="center", va="top",
                        fontsize=7, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})
    if cap is not None:
        ax.set_ylim(0, cap)
    step = _tick_step(T)
    ticks = np.arange(0, T, step)
    ax.set_xticks(ticks, labels=[names[order[i]] for i in ticks],
                  rotation=90 if T > 8 else 30, ha="center" if T > 8 else "right",
                  fontsize=_tick_fontsize(T))
    ax.set_xlabel("training task (JSD-affinity leaf order)")
    ax.set_ylabel("mixture weight (share of the training budget)")
    ax.set_title("Mixture weights per method" + (
        f"\n(axis cut at {cap:.2f}; bars above it are labelled with their weight)"
        if cap is not None else ""))
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def solver_figure(trace: Mapping) -> Figure:
    """Energy gap and KKT residual per sampled iteration of each TaskPGM solve (log axes)."""
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    axes = fig.subplots(1, 2)
    keys = (("energy_gap", "energy gap E(w_k) - E(w*)"), ("kkt_residual", "KKT residual"))
    for ax, (key, ylabel) in zip(axes, keys, strict=True):
        zeros = False
        for j, m in enumerate(ordered_methods(trace)):
            it = np.asarray(trace[m]["iterations"])
            y = np.asarray(trace[m][key], dtype=np.float64)
            positive = y > 0
            ax.semilogy(it, np.where(positive, y, np.nan), marker=".", color=_color(m),
                        label=method_label(m))
            if not positive.all():  # exact zeros have no place on a log axis: mark them below
                zeros = True
                ax.plot(it[~positive], np.full((~positive).sum(), 0.03 + 0.05 * j), ls="", marker="v",
                        ms=7, color=_color(m), transform=ax.get_xaxis_transform(),
                        clip_on=False, zorder=3)
        handles, _ = ax.get_legend_handles_labels()
        if zeros:
            handles.append(Line2D([], [], ls="", marker="v", ms=7, color="0.4",
                                  label="exactly 0 (off the log axis)"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{ylabel} (log scale)")
        ax.set_title(ylabel)
        ax.legend(handles=handles, fontsize=8)
    fig.suptitle("MRF solver convergence (TaskPGM mixtures)")
    return fig


def guarantee_text(g: Mapping) -> str:
    """The submodularity ratio and the approximation guarantee (or why there is none)."""
    gamma = g.get("gamma")
    how = "exact" if g.get("gamma_exact") else "sampled estimate"
    gamma_txt = f"γ = {gamma:.3f} ({how})" if gamma is not None else "γ not computed"
    if g.get("guarantee") is not None:
        return f"{gamma_txt}; guarantee F(greedy) ≥ {g['guarantee']:.3f} × OPT"
    return f"{gamma_txt}; no guarantee: {g.get('guarantee_note', '')}"


def greedy_stop_note(g: Mapping, unit: str) -> str | None:
    """Why the greedy chain stopped below its budget (it only adds tasks with a positive
    marginal gain), or None when it used the budget or the best single task was returned."""
    if g.get("used_best_single"):
        return None
    n, budget = len(g["order"]), float(g["budget"])
    if n == 0:
        return "selected nothing: no task has a positive marginal gain"
    spent = float(g["cumulative_cost"][-1])
    if spent >= budget:
        return None
    if unit == "tasks":
        return (f"stopped after {n} of the {fmt_num(budget)} tasks allowed: no remaining task "
                "has a positive marginal gain")
    return (f"stopped at cost {fmt_num(spent)} of {fmt_num(budget)} {unit}: no remaining task "
            "with a positive marginal gain fits the budget left")


def greedy_figure(g: Mapping, unit: str) -> Figure:
    """Cumulative set value F(A_k) against cumulative cost, with the budget and the returned F.

    unit: the cost unit of greedy.json; "tasks" (every task costs 1) gives integer ticks.
    """
    cost = np.concatenate([[0.0], np.asarray(g["cumulative_cost"], dtype=np.float64)])
    value = np.concatenate([[0.0], np.cumsum(np.asarray(g["gains"], dtype=np.float64))])
    budget = float(g["budget"])
    fig = Figure(figsize=(9.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(cost, value, marker="o", color="C2", label="greedy chain: F(A_k) = cumulative gain")
    every = max(1, -(-len(g["order"]) // 30))  # at most ~30 task names along the curve
    for i, (c, v, name) in enumerate(zip(cost[1:], value[1:], g["order"], strict=True)):
        if i % every == 0 or i == len(g["order"]) - 1:
            ax.annotate(name, (c, v), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        rotation=30)
    tasks = unit == "tasks"
    ax.axvline(budget, ls="--", color="C3", label=f"budget B = {fmt_num(budget)} {unit}")
    ax.axhline(float(g["value"]), ls=":", color="0.3", label=f"returned F = {g['value']:.4g}")
    note = greedy_stop_note(g, unit)
    if note:
        ax.plot([], [], " ", label=textwrap.fill(note, 40))
    right = max(budget, float(cost.max()))
    ax.set_xlim(-0.04 * right, 1.06 * right)
    ax.margins(y=0.15)  # room for the rotated task names above the last points
    if tasks:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tasks selected (cardinality budget: each task costs 1)" if tasks
                  else f"cumulative cost ({unit})")
    ax.set_ylabel("set value F(A) (F(∅) = 0)")
    ax.set_title("Budgeted greedy task selection\n" + textwrap.fill(guarantee_text(g), 75),
                 fontsize=9)
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def clusters_figure(shares: Mapping, methods: list[str]) -> Figure:
    """Stacked bars: each method's share of the training budget per planted cluster."""
    labels = sorted({c for m in methods for c in shares[m]}, key=str)
    fig = Figure(figsize=(max(5.0, 1.0 * len(methods) + 3), 4.2), layout="constrained")
    ax = fig.add_subplot()
    bottom = np.zeros(len(methods))
    for i, c in enumerate(labels):
        h = np.array([shares[m].get(c, 0.0) for m in methods])
        ax.bar(np.arange(len(methods)), h, bottom=bottom, color=f"C{i % 10}",
               label=f"planted cluster {c}")
        bottom += h
    ax.set_xticks(np.arange(len(methods)), labels=[method_label(m) for m in methods],
                  rotation=20, ha="right")
    ax.set_ylabel("share of the training budget")
    ax.set_title("Budget per planted cluster (synthetic suite)")
    handles, names = ax.get_legend_handles_labels()  # top of the stack first, as drawn
    fig.legend(handles[::-1], names[::-1], loc="outside right upper", fontsize=8)
    return fig
