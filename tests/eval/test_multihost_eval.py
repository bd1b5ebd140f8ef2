"""Two real JAX processes on the CPU (2 devices each, gloo collectives) score the probe set and
the held-out suite exactly like one process with 4 devices.

`_multihost_eval_worker.py` runs twice as two processes brought up by `maybe_initialize` from the
JAX_* variables, and once as a single process (the process start-up and the three-process
runner are `tests/train/test_multihost.py`'s). The model's weights are split across the
processes. `ProbeScorer` gets the same batches on every process (as the pipeline feeds it) and,
separately, global batches of which each process feeds only its own rows; `evaluate` and
`choice_logliks` run under `jax.set_mesh`, where the model splits each batch's rows over the
processes. L, the base row, the JSD, the choice log-likelihoods and every metric and prediction
agree with the single process.
"""

import json
from pathlib import Path

import numpy as np

from tests.train import test_multihost as runner

WORKER = Path(__file__).with_name("_multihost_eval_worker.py")


def test_two_processes_score_and_evaluate_like_one(tmp_path, monkeypatch, rng):
    monkeypatch.setattr(runner, "WORKER", WORKER)
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    base = runner._base_env()
    cluster = {**base, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{runner._free_port()}",
               "JAX_NUM_PROCESSES": "2"}
    seed = str(rng.integers(2**31))
    runner._run_all({"process0": ([str(multi), "multi", seed], {**cluster, "JAX_PROCESS_ID": "0"}),
                     "process1": ([str(multi), "multi", seed], {**cluster, "JAX_PROCESS_ID": "1"}),
                     "single": ([str(single), "single", seed], base)}, tmp_path)

    # Each process fed different rows of the "global" batches.
    rows = [np.load(multi / f"rows{p}.npy") for p in (0, 1)]  # [batches, 2, S]
    assert rows[0].shape == rows[1].shape == (3, 2, 16)
    assert not np.array_equal(rows[0], rows[1])

    got, want = np.load(multi / "result.npz"), np.load(single / "result.npz")
    assert sorted(got.files) == sorted(want.files)
    for feed in ("probe", "global"):
        assert {f"{feed}/{k}" for k in ("cross_likelihood", "base_row", "jsd", "examples")} <= \
            set(got.files)
    assert got["probe/cross_likelihood"].shape == (2, 2) and got["eval/choice_loglik"].shape == (15,)
    assert np.max(want["probe/jsd"]) > 1e-3  # the adapters really differ
    for name in got.files:
        assert np.all(np.isfinite(got[name])), name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # One process, two ways of feeding: the same numbers.
    for k in ("cross_likelihood", "base_row", "jsd", "examples"):
        np.testing.assert_allclose(want[f"global/{k}"], want[f"probe/{k}"], rtol=1e-5, atol=1e-5)

    got_eval = json.loads((multi / "eval.json").read_text())
    want_eval = json.loads((single / "eval.json").read_text())
    assert set(want_eval["per_task"]) == {"mc", "gen"}
    assert want_eval["per_task"]["gen"]["count"] == want_eval["per_task"]["mc"]["count"] == 5
    assert got_eval == want_eval
