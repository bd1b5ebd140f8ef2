"""The `taskpgm` command: mixture solve on a user's matrix, exit codes and one-line errors."""

import json

import numpy as np
import pytest

from taskpgm_jax.cli import main
from taskpgm_jax.mrf import potentials
from tests.mrf.reference import active_set_simplex_qp, energy64


def test_mixture_solve_writes_the_optimal_mixture_and_exports(tmp_path, rng, capsys):
    t = 7
    feats = rng.normal(size=(t, 3))
    S = np.exp(-((feats[:, None] - feats[None]) ** 2).sum(-1))  # an RBF affinity (PSD)
    np.save(tmp_path / "S.npy", S)
    names = [f"task{i}" for i in range(t)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "out"
    code = main(["mixture", "solve", "--affinity", str(tmp_path / "S.npy"), "--names",
                 str(tmp_path / "names.txt"), "--budget", "1000", "--beta", "2.0",
                 "--out", str(out)])
    assert code == 0
    mix = json.loads((out / "mixture.json").read_text())
    w = np.array([dict(zip(mix["names"], mix["weights"], strict=True))[n] for n in names])
    # Independent float64 reference on the same (repaired) problem.
    pot = potentials(S, beta=2.0, lam=2.0 * t)  # the default pairwise weight is 2T
    Q = np.asarray(pot.matrix, np.float64) * pot.lam
    c = pot.beta * np.asarray(pot.unary, np.float64)
    w_ref, _ = active_set_simplex_qp(Q, c)
    scale = abs(c @ w_ref) + 0.5 * abs(w_ref @ Q @ w_ref)
    assert energy64(w, Q, c) - energy64(w_ref, Q, c) <= 1e-6 * scale
    counts = json.loads((out / "counts.json").read_text())
    assert sum(counts.values()) == 1000 and set(counts) == set(names)
    # open-instruct reads values <= 1 as fractions of a dataset: it gets the counts.
    assert json.loads((out / "open_instruct.json").read_text()) == counts
    levanter = json.loads((out / "levanter.json").read_text())["train_weights"]
    np.testing.assert_allclose([levanter[n] for n in names], w, atol=1e-12)
    assert "tasks with weight > 0" in capsys.readouterr().out


def test_mixture_solve_errors_are_one_line(tmp_path, capsys):
    np.save(tmp_path / "S.npy", np.eye(3))
    (tmp_path / "names.txt").write_text("a\nb\n")
    assert main(["mixture", "solve", "--affinity", str(tmp_path / "S.npy"), "--names",
                 str(tmp_path / "names.txt")]) == 2
    err = capsys.readouterr().err
    assert "--names" in err and "3 rows" in err and "Traceback" not in err
    assert main(["mixture", "solve", "--affinity", str(tmp_path / "missing.npy")]) == 2
    assert "--affinity: cannot read" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.ones((2, 3)))
    assert main(["mixture", "solve", "--affinity", str(tmp_path / "bad.npy")]) == 2
    assert "square" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["mixture", "solve"])  # argparse: --affinity is required


def test_mixture_solve_refuses_bad_input_before_writing_anything(tmp_path, capsys):
    np.save(tmp_path / "S.npy", np.eye(3))
    (tmp_path / "names.txt").write_text("a\na\nb\n")
    out = tmp_path / "out"
    base = ["mixture", "solve", "--affinity", str(tmp_path / "S.npy"), "--out", str(out)]
    assert main([*base, "--budget", "-5"]) == 2
    assert "--budget: must be >= 0" in capsys.readouterr().err
    assert main([*base, "--names", str(tmp_path / "names.txt")]) == 2
    assert "--names: " in capsys.readouterr().err
    # Three equal weights and a budget of 3: counts of 1, which open-instruct reads as whole
    # datasets.
    assert main([*base, "--budget", "3"]) == 2
    assert "--budget: 3 gives a count of 1" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command,names", [
    (["bench"], "divergence,divergence_tiles,mrf,model,adapters,probe"),
    (["data", "fetch"], "bigbench")])
def test_passthrough_commands_answer_a_bare_help(command, names, capsys):
    """`taskpgm bench --help` lists the names (options belong to each script: NAME --help);
    without a name it is a usage error, not a traceback."""
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "{" + names + "}" in out and "NAME --help" in out
    assert main(command) == 2
    assert "error: give a" in capsys.readouterr().err


def test_mixture_solve_refuses_an_empty_affinity(tmp_path, capsys):
    np.save(tmp_path / "S0.npy", np.zeros((0, 0)))
    out = tmp_path / "out"
    assert main(["mixture", "solve", "--affinity", str(tmp_path / "S0.npy"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--affinity:" in err and "0 x 0" in err and "lam" not in err
    assert not out.exists()


def test_bench_argument_errors_exit_2_with_the_parser_message(capsys):
    # T = 1 has no pair to compare: refused by the script's parser, not a traceback mid-run.
    assert main(["bench", "divergence", "--sizes", "1x8x16", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "--sizes" in err and "T >= 2" in err and "Traceback" not in err


def _affinity(rng, t):
    feats = rng.normal(size=(t, 3))
    return np.exp(-((feats[:, None] - feats[None]) ** 2).sum(-1))  # an RBF affinity (PSD)


def test_mixture_solve_refuses_an_earlier_solve_and_overwrite_removes_its_stale_exports(
        tmp_path, rng, capsys):
    t1, t2 = int(rng.integers(3, 7)), int(rng.integers(3, 7))
    np.save(tmp_path / "A.npy", _affinity(rng, t1))
    np.save(tmp_path / "B.npy", _affinity(rng, t2))
    names = [f"b{i}_{rng.integers(1 << 20)}" for i in range(t2)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "out"
    assert main(["mixture", "solve", "--affinity", str(tmp_path / "A.npy"), "--budget",
                 str(int(rng.integers(1000, 5000))), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("the user's own file")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"counts.json", "open_instruct.json"} <= set(first)
    capsys.readouterr()
    # Another solve, without --budget: refused, nothing touched.
    second = ["mixture", "solve", "--affinity", str(tmp_path / "B.npy"), "--names",
              str(tmp_path / "names.txt"), "--out", str(out)]
    assert main(second) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--overwrite" in err and "mixture.json" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # With --overwrite: this solve's files only, and the user's own file kept.
    assert main([*second, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "levanter.json", "mixture.json", "notes.txt", "seqio.json"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    mix = json.loads((out / "mixture.json").read_text())
    assert mix["names"] == names
    assert set(json.loads((out / "levanter.json").read_text())["train_weights"]) == set(names)


def test_mixture_solve_messages_name_the_options(tmp_path, rng, capsys):
    t = int(rng.integers(2, 6))
    np.save(tmp_path / "S.npy", _affinity(rng, t))
    out = tmp_path / "out"
    base = ["mixture", "solve", "--affinity", str(tmp_path / "S.npy"), "--out", str(out)]
    beta = -float(rng.uniform(0.1, 5))
    assert main([*base, "--beta", str(beta)]) == 2
    err = capsys.readouterr().err
    assert f"--beta: must be positive and finite, got {beta}" in err
    assert main([*base, "--lam", "0"]) == 2
    assert "error: --lam: must be positive" in capsys.readouterr().err
    # A task-name list given as the matrix: not a .npy file (np.load would advise allow_pickle).
    text = tmp_path / "names.txt"
    text.write_text("\n".join(f"task{i}" for i in range(t)) + "\n")
    assert main(["mixture", "solve", "--affinity", str(text), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--affinity: {text} is not a .npy file" in err and "pickle" not in err
    assert not out.exists()


def test_run_usage_names_only_config_as_required(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("the following arguments are required: config")


@pytest.mark.parametrize("seeds", [1, 3])
def test_run_prints_each_method_with_its_spread_or_one_seed(tmp_path, rng, capsys, monkeypatch,
                                                              seeds):
    from pathlib import Path

    from taskpgm_jax.pipeline import run as run_module
    from taskpgm_jax.pipeline.analysis import seed_summary

    values = {m: rng.uniform(0.2, 0.9, seeds).tolist() for m in ("taskpgm_jsd", "uniform")}
    results = {"metric": "exact_match",
               "methods": {m: {**seed_summary(v), "seeds": v} for m, v in values.items()}}
    monkeypatch.setattr(run_module, "run_pipeline", lambda *a, **k: results)
    demo = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "demo.yaml"
    assert main(["run", str(demo), "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    for m, v in values.items():
        spread = "(1 seed)" if seeds == 1 else f"+- {np.std(v, ddof=1):.4f}"
        assert f"  {m:18s} exact_match {np.mean(v):.4f} {spread}" in out
