"""Each benchmark script runs end to end at a tiny size, as a user runs it, and writes the JSON
contract every later tool reads: a top-level `ratios` object of named, finite figures.

The scripts check their own results against their references on the way (the divergence script
compares with scipy and the naive broadcast, the MRF one with SLSQP), so a run that succeeds also
ran those checks. Timings at these sizes mean nothing and are not asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "divergence": (["--sizes", "4x24x96", "3x10x50", "--repeats", "1"],
                   ["scipy_over_ours[4x24x96]", "naive_over_ours[3x10x50]",
                    "ours_over_ceiling[4x24x96]", "ours_over_elementwise_log[3x10x50]",
                    "peak_memory_over_input[4x24x96]"]),
    "divergence_tiles": (["--size", "3x12x40", "--position-blocks", "2", "5",
                          "--vocab-chunks", "16", "--repeats", "1"],
                         ["best_over_ceiling[3x12x40]"]),
    "mrf": (["--sizes", "40", "--greedy-sizes", "60", "--repeats", "1"],
            ["exact_speedup_vs_slsqp_T40", "softmax_speedup_vs_slsqp_T40",
             "greedy_T60_k6_seconds_vs_2s_target", "lazy_vs_plain_greedy_time_T60"]),
    "model": (["--configs", "tiny", "--repeats", "1", "--attention", "xla"],
              ["forward_ours_over_torch[tiny]", "train_ours_over_torch[tiny]",
               "adapters_sequential_over_multi[tiny,probe32]"]),
    "adapters": (["--config", "tiny", "--adapters", "2", "--repeats", "1"],
                 ["train_step_ours_over_plain_nnx[tiny]",
                  "adapters_side_by_side_speedup[tiny,T=2]"]),
    "probe": (["--adapters", "2", "--batches", "2", "--batch-size", "2", "--seq-len", "16",
               "--vocab", "128"], ["peak_memory_over_all_logits"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_writes_ratios(name, tmp_path):
    args, expected = CASES[name]
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's shell has
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args,
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    ratios = payload["ratios"]
    assert ratios, "no ratios written"
    for key, value in ratios.items():  # energy gaps among them may be <= 0
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
    assert set(expected) <= set(ratios), sorted(ratios)
    for key in expected:  # speed-ups and memory ratios
        assert ratios[key] > 0, (key, ratios[key])
    if name == "model":  # the fused attention's masked check reports instead of raising
        assert payload["results"][0]["attention_masked"].startswith("ok"), payload["results"][0]


def _script_main(name, monkeypatch):
    """A script's `main`, imported in this process (its folder on sys.path, as when it is run)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


ARG_ERRORS = [
    ("divergence", ["--sizes", "1x8x16"], "--sizes: '1x8x16' needs T >= 2"),
    ("divergence", ["--sizes", "4x24x96", "4x0x16"], "--sizes: '4x0x16' needs T >= 2"),
    ("divergence", ["--sizes", "4x8x0"], "--sizes: '4x8x0' needs T >= 2"),
    ("divergence_tiles", ["--size", "1x8x16"], "--size: '1x8x16' needs T >= 2"),
    ("model", ["--dtype", "foo"], "argument --dtype: invalid choice: 'foo'"),
    ("adapters", ["--dtype", "foo"], "argument --dtype: invalid choice: 'foo'"),
]


@pytest.mark.parametrize("name, args, message", ARG_ERRORS,
                         ids=[f"{n}:{' '.join(a)}" for n, a, _ in ARG_ERRORS])
def test_bad_arguments_are_refused_by_the_parser(name, args, message, monkeypatch, capsys):
    main = _script_main(name, monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--repeats", "1"])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert message in err and not out  # nothing ran


@pytest.mark.parametrize("name", sorted(CASES))
def test_unwritable_json_path_is_refused_before_the_run(name, tmp_path, monkeypatch, capsys):
    main = _script_main(name, monkeypatch)
    target = tmp_path / "missing" / f"{name}.json"
    with pytest.raises(SystemExit) as exit_:
        main([*CASES[name][0], "--json", str(target)])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert f"--json: the folder {target.parent} of {target} does not exist" in err
    assert not out and not target.parent.exists()  # nothing ran, nothing was created
    with pytest.raises(SystemExit):
        main([*CASES[name][0], "--json", str(tmp_path)])
    assert f"--json: {tmp_path} is a directory" in capsys.readouterr().err


def test_accelerator_script_parses_and_names_existing_files():
    """benchmarks/accelerator.sh runs only on a GPU host; here: its syntax, and every benchmark
    script and test path it names exists (so it cannot rot unseen between GPU sessions)."""
    script = ROOT / "benchmarks" / "accelerator.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    named = set(re.findall(r"(?:benchmarks|tests)/[\w/]+(?:\.\w+)?", text))
    assert any(n.startswith("tests/") for n in named) and len(named) > 8, named
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing
