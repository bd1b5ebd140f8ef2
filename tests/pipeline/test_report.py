"""Report on a fake run directory: files, valid PNGs, numbers equal to results.json, errors;
the figure helpers' scale choices."""

import itertools
import json
import math
import re

import numpy as np
import pytest
from matplotlib import image

from taskpgm_jax.pipeline import _figures, report
from taskpgm_jax.pipeline.analysis import adjusted_rand_index, cluster_tasks
from taskpgm_jax.pipeline.report import (
    DPI,
    FIGURE_DIR,
    METHOD_LABELS,
    METHOD_ORDER,
    RUN_HINT,
    ReportInputs,
    fmt_delta,
    fmt_mean_std,
    load_report_inputs,
    write_report,
)

METHODS = ("taskpgm_jsd", "taskpgm_pmi", "greedy", "uniform", "size_proportional", "temperature")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _summary(values):
    v = np.asarray(values)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "seeds": v.tolist()}


def make_run_dir(root, rng, *, T=6, num_seeds=3, synthetic=True):
    """A run directory with random artifacts in the layout the pipeline writes."""
    names = [f"task_{i}_{'abcdef'[i % 6]}" for i in range(T)]
    eval_tasks = ["heldout_add", "heldout_logic"]
    seeds = list(range(num_seeds))
    methods = {}
    uniform = None
    for m in ("uniform", *[m for m in METHODS if m != "uniform"]):
        per_task = {t: _summary(rng.uniform(0.3, 0.9, num_seeds)) for t in eval_tasks}
        overall = np.mean([per_task[t]["seeds"] for t in eval_tasks], axis=0)
        methods[m] = {**_summary(overall), "per_task": per_task}
        if m == "uniform":
            uniform = overall
            continue
        d = overall - uniform
        if num_seeds > 1:
            half = 2.0 * d.std(ddof=1) / math.sqrt(num_seeds)
            ci = [float(d.mean() - half), float(d.mean() + half)]
        else:
            ci = [None, None]
        methods[m]["delta_vs_uniform"] = {"mean": float(d.mean()), "ci95": ci, "n": num_seeds}
    clusters = {t: f"c{i % 2}" for i, t in enumerate(names)}
    results = {"metric": "accuracy", "eval_tasks": eval_tasks, "seeds": seeds, "budget": 2000,
               "methods": methods,
               "stage_seconds": {"probe": float(rng.uniform(1, 9)), "mixtures": 0.25}}
    if synthetic:
        results["synthetic"] = {"ari": {"jsd": 1.0, "pmi": float(rng.uniform(0, 1))}}
    run = root / "run"
    probe, mix = run / "stages/probe-abc123", run / "stages/mixtures-def456"
    probe.mkdir(parents=True)
    mix.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    (run / "manifest.json").write_text(json.dumps({"stages": {
        "probe": "stages/probe-abc123", "mixtures": "stages/mixtures-def456",
        "train": "stages/train-000"}}))
    D = rng.uniform(0, np.log(2), (T, T))
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0.0)
    L = rng.normal(-50, 5, (T, T))
    (probe / "names.json").write_text(json.dumps(names))
    np.save(probe / "divergence.npy", D)
    np.save(probe / "crosslik.npy", L)
    np.save(probe / "base_loglik.npy", rng.normal(-60, 5, T))
    np.save(mix / "affinity_jsd.npy", 1 - D / np.log(2))
    pmi = 0.5 * ((L - np.diag(L)[None, :]) + (L.T - np.diag(L)[:, None]))
    np.save(mix / "affinity_pmi.npy", pmi)
    mixtures = {}
    for m in METHODS:
        w = rng.dirichlet(np.ones(T))
        if m == "greedy":  # a subset of the tasks, as the budgeted selection gives
            keep = names[: T // 2]
            mixtures[m] = {"names": keep, "weights": (w[: T // 2] / w[: T // 2].sum()).tolist()}
        else:
            mixtures[m] = {"names": names, "weights": w.tolist()}
        mixtures[m].update(unit="examples", provenance={"method": m})
    (mix / "mixtures.json").write_text(json.dumps(mixtures))
    trace = {}
    for m in ("taskpgm_jsd", "taskpgm_pmi"):
        n = int(rng.integers(5, 30))
        gap = np.sort(rng.uniform(1e-9, 1.0, n))[::-1]
        gap[-1] = 0.0  # the final iterate is w* itself: a log axis must cope with a zero
        trace[m] = {"iterations": list(range(1, n + 1)), "energy_gap": gap.tolist(),
                    "kkt_residual": np.sort(rng.uniform(1e-8, 1.0, n))[::-1].tolist()}
    (mix / "solver_trace.json").write_text(json.dumps(trace))
    gains = np.sort(rng.uniform(0.1, 1.0, 3))[::-1]
    # As the mixtures stage writes it: a cardinality budget, every task costs 1.
    (mix / "greedy.json").write_text(json.dumps({
        "order": [names[4], names[1], names[2]], "gains": gains.tolist(),
        "cumulative_cost": [1.0, 2.0, 3.0], "budget": 3.0, "unit": "tasks",
        "value": float(gains.sum()), "gamma": 0.8, "gamma_exact": True,
        "guarantee": 1 - math.exp(-0.8), "guarantee_note": "cardinality bound",
        "used_best_single": False}))
    if synthetic:
        (mix / "clusters.json").write_text(json.dumps(clusters))
    return run


def _fmt(mean, std):  # the documented table format, written out independently
    return f"{mean:.4f} ± {std:.4f}"


def _section(text, heading):
    """The lines of a '## heading' section, up to the next '## ' heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _tables(text):
    """Every markdown table in `text` as {first cell: {column header: cell}}."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            block = list(itertools.takewhile(lambda ln: ln.startswith("|"), lines[i:]))
            cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in block]
            header = cells[0]
            tables.append({row[0]: dict(zip(header, row, strict=True)) for row in cells[2:]})
    return tables


def _check_pngs(run, text):
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert refs and len(refs) == len(set(refs))
    for ref in refs:
        path = run / ref
        assert path.read_bytes()[:8] == PNG_SIGNATURE, ref
        pixels = image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, ref
        assert pixels.std() > 0, f"{ref} is blank"
    # Nothing else (no temporary leftovers) in the figure folder.
    assert sorted(p.name for p in (run / "figures").iterdir()) == sorted(
        r.split("/")[-1] for r in refs)
    return refs


def test_report_files_and_numbers(tmp_path, rng):
    run = make_run_dir(tmp_path, rng, num_seeds=int(rng.integers(2, 4)))
    path = write_report(run)
    assert path == run / "report.md"
    text = path.read_text()
    refs = _check_pngs(run, text)
    assert {r.split("/")[-1] for r in refs} == {
        "results.png", "affinity_jsd.png", "affinity_pmi.png", "task_graph.png", "weights.png",
        "solver.png", "greedy.png", "clusters.png"}
    results = json.loads((run / "results.json").read_text())
    main, per_task = _tables(_section(text, "Results"))
    assert list(main) == ["taskpgm_jsd", "taskpgm_pmi", "greedy", "uniform", "size_proportional",
                          "temperature"]
    for m, s in results["methods"].items():
        _, mean_std, delta, seeds = main[m].values()
        assert mean_std == _fmt(s["mean"], s["std"])
        assert seeds == ", ".join(f"{v:.4f}" for v in s["seeds"])
        if m != "uniform":
            d = s["delta_vs_uniform"]
            lo, hi = d["ci95"]
            assert delta == f"{d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    assert list(per_task) == results["eval_tasks"]
    for t in results["eval_tasks"]:
        for m, s in results["methods"].items():
            assert per_task[t][m] == _fmt(s["per_task"][t]["mean"], s["per_task"][t]["std"])
    names = json.loads((run / "stages/probe-abc123/names.json").read_text())
    (weights,) = _tables(_section(text, "Mixture weights"))
    for t in names:
        assert t in _section(text, "Run summary") and t in weights
    assert "accuracy" in text and "2,000" in text
    assert f"{results['synthetic']['ari']['pmi']:.3f}" in text
    assert "γ = 0.800 (exact)" in text and f"{1 - math.exp(-0.8):.3f} × OPT" in text
    greedy = _section(text, "Budgeted greedy selection")
    assert "at most 3 tasks (a cardinality budget: every task costs 1" in greedy
    assert "2,000 training examples" in greedy and "stopped" not in greedy
    # Budget per planted cluster (not in results.json here: recomputed from the mixtures).
    clusters = json.loads((run / "stages/mixtures-def456/clusters.json").read_text())
    mixtures = json.loads((run / "stages/mixtures-def456/mixtures.json").read_text())
    shares = _tables(_section(text, "Planted clusters (synthetic suite)"))[-1]
    for m, mix in mixtures.items():
        for label in set(clusters.values()):
            share = sum(w for t, w in zip(mix["names"], mix["weights"], strict=True) if clusters[t] == label)
            assert shares[label][m] == f"{share / sum(mix['weights']):.3f}"
    total = sum(results["stage_seconds"].values())
    assert f"| **total** | {total:.1f} |" in text


def test_weights_table_matches_mixtures(tmp_path, rng):
    run = make_run_dir(tmp_path, rng, synthetic=False)
    # A run without the greedy method writes an empty greedy record.
    (run / "stages/mixtures-def456/greedy.json").write_text("{}")
    (run / "report.md").write_text("a stale report from an earlier run")
    text = write_report(run).read_text()
    assert text.startswith("# TaskPGM report: run\n")  # replaced, not appended to
    mixtures = json.loads((run / "stages/mixtures-def456/mixtures.json").read_text())
    (weights,) = _tables(_section(text, "Mixture weights"))
    names = json.loads((run / "stages/probe-abc123/names.json").read_text())
    assert sorted(weights) == sorted(names)
    for m, mix in mixtures.items():
        w = dict(zip(mix["names"], np.asarray(mix["weights"]) / np.sum(mix["weights"]), strict=True))
        for t in names:
            assert weights[t][m] == f"{w.get(t, 0.0):.3f}"
    # No planted clusters, no greedy record: neither figure nor section.
    for name in ("clusters", "greedy"):
        assert f"{name}.png" not in text and not (run / f"figures/{name}.png").exists()
    _check_pngs(run, text)


def test_single_seed_interval_and_recomputed_synthetic(tmp_path, rng):
    run = make_run_dir(tmp_path, rng, num_seeds=1)
    results = json.loads((run / "results.json").read_text())
    del results["synthetic"]  # the report recomputes ARI and budget shares from the artifacts
    (run / "results.json").write_text(json.dumps(results))
    text = write_report(run).read_text()
    main, _ = _tables(_section(text, "Results"))
    assert main["taskpgm_jsd"]["difference to uniform [95% CI]"].endswith("[CI n/a: n = 1 < 2]")
    clusters = json.loads((run / "stages/mixtures-def456/clusters.json").read_text())
    names = json.loads((run / "stages/probe-abc123/names.json").read_text())
    planted = [clusters[t] for t in names]
    for kind in ("jsd", "pmi"):
        S = np.load(run / f"stages/mixtures-def456/affinity_{kind}.npy")
        ari = adjusted_rand_index(cluster_tasks(S, len(set(planted))), planted)
        assert f"{kind.upper()} affinity: {ari:.3f}" in text
    assert "clusters.png" in text


@pytest.mark.parametrize("relpath, stage", [
    ("results.json", "evaluation"),
    ("manifest.json", "taskpgm run"),
    ("stages/probe-abc123/crosslik.npy", "probe stage"),
    ("stages/probe-abc123/names.json", "probe stage"),
    ("stages/mixtures-def456/greedy.json", "mixtures stage"),
    ("stages/mixtures-def456/affinity_pmi.npy", "mixtures stage"),
])
def test_missing_file_is_named(tmp_path, rng, relpath, stage):
    run = make_run_dir(tmp_path, rng)
    (run / relpath).unlink()
    name = relpath.split("/")[-1]
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(name)}.*{stage}.*taskpgm run"):
        load_report_inputs(run)
    with pytest.raises(FileNotFoundError, match=re.escape(name)):
        write_report(run)
    assert not (run / "report.md").exists()


def test_malformed_inputs(tmp_path, rng):
    run = make_run_dir(tmp_path, rng)
    np.save(run / "stages/probe-abc123/divergence.npy", np.zeros((5, 5)))
    with pytest.raises(ValueError, match=r"divergence.npy: expected shape \(6, 6\)"):
        load_report_inputs(run)
    (run / "manifest.json").write_text(json.dumps({"stages": {"probe": "stages/probe-abc123"}}))
    with pytest.raises(FileNotFoundError, match="no 'mixtures' stage"):
        load_report_inputs(run)


def test_greedy_units_and_early_stop(tmp_path, rng):
    run = make_run_dir(tmp_path, rng, synthetic=False)
    path = run / "stages/mixtures-def456/greedy.json"
    g = {**json.loads(path.read_text()), "budget": 5.0}
    path.write_text(json.dumps(g))
    # The chain stopped below its budget: no remaining task had a positive gain.
    text = write_report(run).read_text()
    greedy = _section(text, "Budgeted greedy selection")
    assert "at most 5 tasks" in greedy
    assert ("stopped after 3 of the 5 tasks allowed: no remaining task has a positive marginal "
            "gain") in greedy
    assert "largest marginal gain (every task costs 1)" in greedy
    _check_pngs(run, text)
    # An older greedy.json names no unit: generic cost units, no claim about tasks.
    old = {k: v for k, v in g.items() if k != "unit"}
    old.update(cumulative_cost=[300.0, 900.0, 1500.0], budget=2000.0)
    greedy = report._greedy_md(old, 2000, run / "figures")
    assert "under budget 2,000 cost units" in greedy and "tasks" not in greedy.split("![")[0]
    assert "stopped at cost 1,500 of 2,000 cost units" in greedy
    # Nothing chosen (no task has a positive gain).
    greedy = report._greedy_md({**g, "order": [], "gains": [], "cumulative_cost": [],
                                "value": 0.0}, 2000, run / "figures")
    assert "(none)" in greedy and "selected nothing" in greedy


def test_public_names_and_figure_scales():
    assert FIGURE_DIR == "figures" and DPI > 0 and "taskpgm run" in RUN_HINT
    assert METHOD_ORDER[0] == "taskpgm_jsd" and set(METHOD_LABELS) == set(METHOD_ORDER)
    assert ReportInputs.__dataclass_fields__["names"]
    assert fmt_mean_std(0.5, 0.01) == "0.5000 ± 0.0100" and fmt_delta(None) == "—"
    # One seed has no spread to show (its std is stored as 0.0, which is not a measured 0).
    assert fmt_mean_std(0.5, 0.0, n=1) == "0.5000 (1 seed)"
    assert fmt_mean_std(0.5, 0.0, n=2) == "0.5000 ± 0.0000"
    # One far-off row (as a task whose model transfers to nothing): symmetric-log colours.
    off = np.array([-10.3, -0.5, 0.4, 1.2, -1.0, 0.8])
    assert _figures.symlog_threshold(off) == pytest.approx(np.median(np.abs(off)))
    assert _figures.symlog_threshold(np.array([-1.0, 0.5, 2.0])) is None
    assert _figures.symlog_threshold(np.zeros(4)) is None
    # The weights axis is cut only when one method's peak dwarfs every other's.
    names, order = ["a", "b", "c", "d"], np.arange(4)
    cut = _figures.weights_figure(names, {"greedy": np.array([1.0, 0, 0, 0]),
                                          "uniform": np.full(4, 0.25)}, order)
    assert cut.axes[0].get_ylim()[1] == pytest.approx(1.3 * 0.25)
    assert [t.get_text() for t in cut.axes[0].texts] == ["1.00 ↑"]
    plain = _figures.weights_figure(names, {"greedy": np.array([0.5, 0.5, 0, 0]),
                                            "uniform": np.full(4, 0.25)}, order)
    assert plain.axes[0].get_ylim()[1] >= 0.5 and not plain.axes[0].texts


@pytest.mark.parametrize("relpath, edit, message", [
    # A mixture without weights, a method without std, a manifest that is a list, as found.
    ("stages/mixtures-def456/mixtures.json",
     lambda d: {**d, "uniform": {k: v for k, v in d["uniform"].items() if k != "weights"}},
     r"mixtures.json: mixture 'uniform' lacks key\(s\) \['weights'\]"),
    ("results.json",
     lambda d: {**d, "methods": {**d["methods"], "greedy": {
         k: v for k, v in d["methods"]["greedy"].items() if k != "std"}}},
     r"results.json: methods.greedy lacks key\(s\) \['std'\]"),
    ("manifest.json", lambda d: [d], r"manifest.json: the file must be a JSON object, got list"),
    ("stages/mixtures-def456/solver_trace.json",
     lambda d: {**d, "taskpgm_jsd": {**d["taskpgm_jsd"], "kkt_residual": "small"}},
     r"solver_trace.json: trace 'taskpgm_jsd' kkt_residual must be a list of numbers"),
    ("stages/mixtures-def456/greedy.json", lambda d: {"order": []},
     r"greedy.json: the file lacks key\(s\) \['gains', 'cumulative_cost', 'budget', 'value'\]"),
    ("stages/probe-abc123/names.json", lambda d: {"names": d},
     r"names.json: expected a list of task names"),
])
def test_malformed_json_names_the_file_and_entry(tmp_path, rng, capsys, relpath, edit, message):
    from taskpgm_jax.cli import main

    run = make_run_dir(tmp_path, rng)
    path = run / relpath
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=message + r".*; re-run "):
        load_report_inputs(run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and "Traceback" not in err
    assert not (run / "report.md").exists()


def test_closed_form_solver_section_says_it_has_no_iterations(tmp_path, rng):
    run = make_run_dir(tmp_path, rng, synthetic=False)
    mix = run / "stages/mixtures-def456"
    mixtures = json.loads((mix / "mixtures.json").read_text())
    trace = json.loads((mix / "solver_trace.json").read_text())
    # As the mixtures stage writes a closed_form solve: one point, the solution itself.
    mixtures["taskpgm_jsd"]["provenance"] = {"method": "closed_form", "kkt_residual": 0.25,
                                             "iterations": 1}
    trace["taskpgm_jsd"] = {"iterations": [1], "energy_gap": [0.0], "kkt_residual": [0.25]}
    (mix / "mixtures.json").write_text(json.dumps(mixtures))
    (mix / "solver_trace.json").write_text(json.dumps(trace))
    text = write_report(run).read_text()
    section = _section(text, "Solver convergence")
    (rows,) = _tables(section)
    assert rows["taskpgm_jsd"]["iterations"] == "none (closed form)"
    assert rows["taskpgm_jsd"]["final energy gap"] == "0.000e+00"
    assert rows["taskpgm_jsd"]["final KKT residual"] == "2.500e-01"
    assert rows["taskpgm_pmi"]["iterations"] == str(trace["taskpgm_pmi"]["iterations"][-1])
    assert "closed-form solution (taskpgm_jsd) is one linear solve with no iterations" in section
    _check_pngs(run, text)


def test_results_table_of_one_seed_shows_no_spread(rng):
    from taskpgm_jax.pipeline.analysis import paired_difference, seed_summary
    v = {m: [float(rng.uniform(0.2, 0.9))] for m in ("uniform", "taskpgm_jsd")}
    task = [float(rng.uniform(0.2, 0.9))]
    methods = {m: {**seed_summary(v[m]), "seeds": v[m],
                   "per_task": {"t0": {**seed_summary(task), "seeds": task}}} for m in v}
    methods["taskpgm_jsd"]["delta_vs_uniform"] = paired_difference(v["taskpgm_jsd"], v["uniform"])
    md = report._results_md({"metric": "accuracy", "eval_tasks": ["t0"], "methods": methods},
                            ["taskpgm_jsd", "uniform"])
    assert f"| taskpgm_jsd | {v['taskpgm_jsd'][0]:.4f} (1 seed) |" in md
    assert f"| t0 | {task[0]:.4f} (1 seed) | {task[0]:.4f} (1 seed) |" in md
    assert "±" not in md.replace("(mean ± std", "")
    # Two seeds show their sample standard deviation (ddof = 1), as NumPy computes it.
    two = [0.25, float(rng.uniform(0.3, 0.9))]
    methods["uniform"] = {**seed_summary(two), "seeds": two, "per_task": {}}
    md = report._results_md({"metric": "accuracy", "eval_tasks": ["t0"], "methods": methods},
                            ["uniform"])
    assert f"{np.mean(two):.4f} ± {np.std(two, ddof=1):.4f}" in md
