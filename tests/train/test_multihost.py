"""Two real JAX processes on the CPU (2 devices each, gloo collectives) train exactly like one
process with 4 devices.

`_multihost_worker.py` runs twice as two processes brought up by `maybe_initialize` from the
JAX_* variables, and once as a single process; all three are children (this process already has
its 8-device backend). Both runs train LoRA with `finetune`: a `Trainer` on data=2 x fsdp=2 (the
data axis across the processes) and an `AdapterTrainer` with two adapters on fsdp=4 (parameters
split across the processes), each checkpointed at step 2 and resumed to step 4 from the orbax
checkpoint. Each process reads only its share of the data: the two shares are different and
together make the single process's global batches, and the final parameters and logged losses
agree.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("_multihost_worker.py")
TIMEOUT = 240  # seconds, for all three processes together


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "XLA_"))}
    env.pop("TASKPGM_DISTRIBUTED", None)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _tail(path: Path, n: int = 3000) -> str:
    text = path.read_text(errors="replace")
    # gloo prints a line per connection; keep the tail readable.
    text = "\n".join(line for line in text.splitlines() if not line.startswith("[Gloo]"))
    return text[-n:]


def _run_all(jobs: dict[str, tuple[list[str], dict[str, str]]], logs: Path) -> None:
    """Starts every job at once; when one fails or time runs out, stops the rest and fails with
    every job's stderr tail."""
    procs = {}
    for name, (args, env) in jobs.items():
        with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen([sys.executable, str(WORKER), *args], env=env,
                                           stdout=out, stderr=err, cwd=logs)
    deadline = time.monotonic() + TIMEOUT
    ended: dict[str, int | None] = {}
    try:
        while True:
            ended = {n: p.poll() for n, p in procs.items()}
            if (any(c not in (None, 0) for c in ended.values()) or None not in ended.values()
                    or time.monotonic() > deadline):
                break
            time.sleep(0.2)
    finally:
        # The jobs that ended on their own, before the rest are stopped: a failure among them
        # is the cause (jobs all ending within one poll included); else it was the time limit.
        ended = {n: p.poll() for n, p in procs.items()}
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = {n: p.returncode for n, p in procs.items()}
    if any(codes.values()):
        failed = [n for n, c in ended.items() if c not in (None, 0)]
        why = f"{', '.join(failed)} failed" if failed else f"timed out after {TIMEOUT} s"
        tails = "\n".join(f"--- {n} (exit {codes[n]}) stderr tail ---\n{_tail(logs / f'{n}.err')}"
                          for n in procs)
        raise AssertionError(f"{why}; exit codes {codes}\n{tails}")


def test_two_processes_train_like_one(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    base = _base_env()
    cluster = {**base, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
               "JAX_NUM_PROCESSES": "2"}
    _run_all({"process0": ([str(multi), "multi"], {**cluster, "JAX_PROCESS_ID": "0"}),
              "process1": ([str(multi), "multi"], {**cluster, "JAX_PROCESS_ID": "1"}),
              "single": ([str(single), "single"], base)}, tmp_path)

    # Each process fed its own rows; together they are the single process's global batches.
    rows = [np.load(multi / f"rows{p}.npy") for p in (0, 1)]  # [steps, 4, S] each
    reference = np.load(single / "rows0.npy")                 # [steps, 8, S]
    assert rows[0].shape == rows[1].shape == (4, 4, 16) and reference.shape == (4, 8, 16)
    assert not np.array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(np.concatenate(rows, axis=1), reference)

    got, want = np.load(multi / "result.npz"), np.load(single / "result.npz")
    assert sorted(got.files) == sorted(want.files)
    assert {"trainer/loss", "adapters/loss"} <= set(got.files)
    assert len(got.files) > 10  # every adapter matrix of both runs
    assert got["adapters/loss"].shape == (4, 2)
    for name in got.files:
        assert np.all(np.isfinite(got[name])), name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_run_all_names_the_job_that_failed_when_all_end_at_once(tmp_path, monkeypatch):
    """Jobs that all end within one poll, one of them failing, failed; they did not time out."""
    worker = tmp_path / "worker.py"
    worker.write_text("import sys\nprint('boom in', sys.argv[1], file=sys.stderr)\n"
                      "sys.exit(3 if sys.argv[1] == 'bad' else 0)\n")
    monkeypatch.setattr(sys.modules[__name__], "WORKER", worker)
    jobs = {name: ([name], _base_env()) for name in ("good", "bad")}
    try:
        _run_all(jobs, tmp_path)
    except AssertionError as e:
        message = str(e)
    else:
        raise AssertionError("a failing job passed")
    assert message.startswith("bad failed"), message
    assert "timed out" not in message and "boom in bad" in message, message
