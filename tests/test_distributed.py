"""maybe_initialize: which environment triggers which jax.distributed.initialize call.

Nothing is really initialised in this process: `jax.distributed.initialize` is replaced by a
recorder, the environment is cleared of every variable the module reads, and the "backends
already exist" check (true once a test has touched JAX) is patched per test. One test at the end
starts two real child processes on the CPU.
"""

import os
import socket
import subprocess
import sys

import jax
import pytest

from taskpgm_jax import distributed

_READ = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
    "TASKPGM_DISTRIBUTED", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID",
    "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE",
    "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_LOCAL_SIZE",
)

SLURM_STEP = {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-04]",
              "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}


@pytest.fixture
def calls(monkeypatch):
    """Clean env, fresh module state, backends 'not yet initialised'; yields the call list."""
    for name in _READ:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_result", None)
    monkeypatch.setattr(distributed, "_backends_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    return recorded


def _setenv(monkeypatch, values):
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_single_process_does_nothing(calls):
    assert distributed.maybe_initialize() is False
    assert calls == []


@pytest.mark.parametrize("env", [
    {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "1"},
    {"OMPI_COMM_WORLD_SIZE": "1"},
    {"TPU_WORKER_HOSTNAMES": "t1k-w-0"},
    {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
    {**SLURM_STEP, "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.9", "TASKPGM_DISTRIBUTED": "off"},
])
def test_one_process_environments_do_nothing(calls, monkeypatch, env):
    _setenv(monkeypatch, env)
    assert distributed.maybe_initialize() is False
    assert calls == []


@pytest.mark.parametrize(("env", "expected"), [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "3"},
     {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}),
    ({"JAX_COORDINATOR_ADDRESS": "head:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
      "JAX_LOCAL_DEVICE_IDS": "0, 1,2,3"},
     {"coordinator_address": "head:1234", "num_processes": 2, "process_id": 0,
      "local_device_ids": [0, 1, 2, 3]}),
    ({"TASKPGM_DISTRIBUTED": "auto"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"}, {}),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.9:8080"}, {}),
    ({**SLURM_STEP, "JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7"},
     {"local_device_ids": list(range(8))}),
    ({"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
      "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911"}, {}),
])
def test_each_environment_initialises_once(calls, monkeypatch, env, expected):
    _setenv(monkeypatch, env)
    assert distributed.maybe_initialize() is True
    assert calls == [expected]


def test_second_call_is_a_no_op(calls, monkeypatch):
    _setenv(monkeypatch, {"TPU_WORKER_HOSTNAMES": "a,b"})
    assert distributed.maybe_initialize() is True
    assert distributed.maybe_initialize() is True
    assert distributed.maybe_initialize(coordinator_address="x:1", num_processes=2,
                                        process_id=1) is True
    assert calls == [{}]


def test_second_call_after_single_process_is_a_no_op(calls, monkeypatch):
    assert distributed.maybe_initialize() is False
    _setenv(monkeypatch, {"TASKPGM_DISTRIBUTED": "auto"})
    assert distributed.maybe_initialize() is False
    assert calls == []


def test_explicit_arguments_win_over_env(calls, monkeypatch):
    _setenv(monkeypatch, {**SLURM_STEP, "JAX_COORDINATOR_ADDRESS": "env:1",
                          "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "7",
                          "JAX_LOCAL_DEVICE_IDS": "5", "TASKPGM_DISTRIBUTED": "off"})
    assert distributed.maybe_initialize(coordinator_address="arg:2", num_processes=3,
                                        process_id=1, local_device_ids=[0, 1]) is True
    assert calls == [{"coordinator_address": "arg:2", "num_processes": 3, "process_id": 1,
                      "local_device_ids": [0, 1]}]


def test_arguments_complete_the_variables(calls, monkeypatch):
    _setenv(monkeypatch, {"JAX_COORDINATOR_ADDRESS": "head:9", "JAX_NUM_PROCESSES": "2"})
    assert distributed.maybe_initialize(process_id=1, local_device_ids=3) is True
    assert calls == [{"coordinator_address": "head:9", "num_processes": 2, "process_id": 1,
                      "local_device_ids": [3]}]


def test_explicit_single_process_wins_over_cluster(calls, monkeypatch):
    _setenv(monkeypatch, SLURM_STEP)
    assert distributed.maybe_initialize(coordinator_address="localhost:1", num_processes=1,
                                        process_id=0) is False
    assert calls == []


@pytest.mark.parametrize(("env", "kwargs", "named"), [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, {},
     "JAX_NUM_PROCESSES='two'"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, {}, "JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, {}, "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, {},
     "JAX_PROCESS_ID=2"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, {},
     "JAX_COORDINATOR_ADDRESS='h'"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, {},
     "JAX_NUM_PROCESSES=0"),
    ({"TASKPGM_DISTRIBUTED": "auto", "JAX_LOCAL_DEVICE_IDS": "0,x"}, {}, "JAX_LOCAL_DEVICE_IDS"),
    ({"TASKPGM_DISTRIBUTED": "yes"}, {}, "TASKPGM_DISTRIBUTED='yes'"),
    ({"SLURM_NTASKS": "four"}, {}, "SLURM_NTASKS='four'"),
    ({"OMPI_COMM_WORLD_SIZE": "4.0"}, {}, "OMPI_COMM_WORLD_SIZE='4.0'"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, {}, "OMPI_MCA_orte_hnp_uri"),
    ({}, {"coordinator_address": "h:1"}, "num_processes="),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0,
          "local_device_ids": [-1]}, "local_device_ids"),
])
def test_malformed_settings_name_the_variable(calls, monkeypatch, env, kwargs, named):
    _setenv(monkeypatch, env)
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace("*", r"\*")):
        distributed.maybe_initialize(**kwargs)
    assert calls == []
    assert distributed._result is None  # a failed call settles nothing


def test_non_int_argument_is_a_type_error(calls):
    with pytest.raises(TypeError, match="num_processes"):
        distributed.maybe_initialize(coordinator_address="h:1", num_processes=2.0, process_id=0)


def test_slurm_outside_a_step_is_one_process(calls, monkeypatch, caplog):
    # salloc shell / batch script: SLURM_NTASKS is set but no srun step is running.
    _setenv(monkeypatch, {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "77"})
    assert distributed.maybe_initialize() is False
    assert calls == []
    assert "srun" in caplog.text


def test_slurm_one_task_per_node_warns_about_gpus(calls, monkeypatch):
    _setenv(monkeypatch, SLURM_STEP)
    with pytest.warns(UserWarning, match="JAX_LOCAL_DEVICE_IDS"):
        assert distributed.maybe_initialize() is True
    assert calls == [{}]


def test_device_ids_in_a_single_process_warn(calls, monkeypatch):
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")
    with pytest.warns(UserWarning, match="no effect"):
        assert distributed.maybe_initialize() is False
    assert calls == []


def test_already_initialised_backends_raise(calls, monkeypatch):
    monkeypatch.setattr(distributed, "_backends_initialized", lambda: True)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
    with pytest.raises(RuntimeError, match="maybe_initialize\\(\\) first"):
        distributed.maybe_initialize()
    assert calls == []


def test_already_initialised_backends_fine_for_one_process(calls, monkeypatch):
    monkeypatch.setattr(distributed, "_backends_initialized", lambda: True)
    assert distributed.maybe_initialize() is False


def test_backend_check_sees_this_process():
    # Once this process has touched a device the real check must say so (the guard is live).
    jax.devices()
    assert distributed._backends_initialized() is True


def test_initialised_elsewhere_is_left_alone(calls, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
    assert distributed.maybe_initialize() is False
    assert calls == []


def test_process_summary():
    line = distributed.process_summary()
    assert line.startswith("process 0 of 1: 8 local / 8 global devices, platform cpu")


_TWO_PROCESSES = """
from taskpgm_jax.distributed import maybe_initialize, process_summary
assert maybe_initialize() is True
assert maybe_initialize() is True
import jax
from taskpgm_jax.sharding import make_mesh
print(process_summary())
print("mesh", dict(make_mesh().shape))
jax.distributed.shutdown()
"""


def test_two_real_processes_on_the_cpu(tmp_path):
    # End to end, in child processes (this one stays single-process): our JAX_* variables bring
    # up a real 2-process JAX with 2 x 4 CPU devices, and the mesh spans all 8.
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_",
                                                                       "TPU_", "MEGASCALE_"))}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2")
    base.pop("TASKPGM_DISTRIBUTED", None)
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES],
                              env={**base, "JAX_PROCESS_ID": str(i)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err[-2000:]
        assert f"process {i} of 2: 4 local / 8 global devices, platform cpu" in out
        assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
