"""Multi-process start-up: find the cluster, call `jax.distributed.initialize` once.

On one host nothing happens. On many hosts (a TPU slice, SLURM or Open MPI GPU nodes, or
processes started by hand) every process runs the same program and must call
`jax.distributed.initialize` once, before any JAX computation; `maybe_initialize()` decides
whether this process is one of many and does that call. Where it looks, first match wins:

1. its arguments (`coordinator_address`, `num_processes`, `process_id`, `local_device_ids`);
2. `TASKPGM_DISTRIBUTED=off`: a single process, whatever else the environment says;
3. our variables `JAX_COORDINATOR_ADDRESS` ("host:port" of process 0), `JAX_NUM_PROCESSES`,
   `JAX_PROCESS_ID` (all three together) and optionally `JAX_LOCAL_DEVICE_IDS` ("0,1,2,3");
4. `TASKPGM_DISTRIBUTED=auto`: initialise and let JAX detect the cluster. `experiments/tpu/run.sh`
   sets it, because on a TPU VM slice made with `gcloud compute tpus tpu-vm create` the worker
   list lives in the metadata server, not in the environment;
5. Cloud TPU with several workers: `TPU_WORKER_HOSTNAMES` naming more than one host, or
   `MEGASCALE_COORDINATOR_ADDRESS` (multislice); JAX detects the rest;
6. SLURM: `SLURM_NTASKS` > 1 inside an `srun` step; JAX detects the rest;
7. Open MPI: `OMPI_COMM_WORLD_SIZE` > 1 under `mpirun`; JAX detects the rest.

GPU note: when JAX detects SLURM or Open MPI it gives each process only the GPU of its local
rank. Launch one process per GPU, or with one process per host set `JAX_LOCAL_DEVICE_IDS`
(e.g. "0,1,2,3,4,5,6,7") so the process sees all its GPUs; a warning says so when it matters.

Example:
  >>> from taskpgm_jax.distributed import maybe_initialize, process_summary
  >>> maybe_initialize()          # first thing in main(), before anything touches JAX
  False
  >>> print(process_summary())    # doctest: +SKIP
  process 0 of 1: 8 local / 8 global devices, platform cpu (cpu)
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax

__all__ = ["maybe_initialize", "process_summary"]

logger = logging.getLogger(__name__)

_OURS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_ARGS = ("coordinator_address", "num_processes", "process_id")
# The variables JAX's own SLURM detection reads; all exist only inside an `srun` step.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")

_lock = threading.Lock()
_result: bool | None = None  # the first completed call's answer; later calls return it


class _Plan(NamedTuple):
    """What to do: where the cluster was found, and the keyword arguments for initialize."""

    source: str
    kwargs: dict[str, Any]


def _parse_int(value: str, name: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _parse_device_ids(value: int | Sequence[int] | str, name: str) -> list[int]:
    if isinstance(value, str):
        items = [v for v in value.split(",") if v.strip()]
        if not items:
            raise ValueError(f"{name}={value!r} lists no device ids; expected e.g. '0,1,2,3'")
        ids = [_parse_int(v, name) for v in items]
    elif isinstance(value, bool):  # an int to Python, but not a device id
        raise ValueError(f"{name}={value!r} must be a non-empty list of ints")
    elif isinstance(value, int):
        ids = [value]
    else:
        ids = list(value)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{name}={value!r} must be a non-empty list of ints")
    if any(i < 0 for i in ids):
        raise ValueError(f"{name}={value!r} has a negative device id")
    return ids


def _check_address(address: str, name: str) -> str:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{name}={address!r} must be 'host:port' (process 0's address and a "
                         "free port, e.g. '10.0.0.2:8476')")
    return address.strip()


def _one_task_per_node(env: Mapping[str, str]) -> bool:
    # SLURM_STEP_TASKS_PER_NODE looks like "1", "1(x4)" or "8,4(x2)".
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", ""))
    if re.fullmatch(r"1(\(x\d+\))?", per_node.strip()):
        return True
    return env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "").strip() == "1"


def _plan(
    env: Mapping[str, str],
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    local_device_ids: int | Sequence[int] | None,
) -> _Plan | None:
    """The initialize call this environment asks for, or None for a single process."""
    device_ids = None
    if local_device_ids is not None:
        device_ids = _parse_device_ids(local_device_ids, "local_device_ids")
    elif env.get("JAX_LOCAL_DEVICE_IDS", "").strip():
        device_ids = _parse_device_ids(env["JAX_LOCAL_DEVICE_IDS"], "JAX_LOCAL_DEVICE_IDS")
    extra = {} if device_ids is None else {"local_device_ids": device_ids}

    explicit = dict(zip(_ARGS, (coordinator_address, num_processes, process_id), strict=True))
    mode = env.get("TASKPGM_DISTRIBUTED", "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ValueError(f"TASKPGM_DISTRIBUTED={env['TASKPGM_DISTRIBUTED']!r}: expected 'auto' "
                         "(initialise and let JAX detect the cluster) or 'off' (single process)")
    if mode == "off" and all(v is None for v in explicit.values()):
        return None

    # 1 and 3: arguments, each one over its variable.
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for arg, var in zip(_ARGS, _OURS, strict=True):
        if explicit[arg] is not None:
            values[arg], names[arg] = explicit[arg], arg
        elif mode != "off" and env.get(var, "").strip():
            values[arg], names[arg] = env[var], var
    if values:
        missing = [f"{var} (or {arg}=)" for arg, var in zip(_ARGS, _OURS, strict=True)
                   if arg not in values]
        if missing:
            given = ", ".join(names[a] for a in _ARGS if a in values)
            raise ValueError(f"{given} given without {' and '.join(missing)}: a multi-process "
                             "run needs the coordinator address, the process count and this "
                             "process's id together")
        address = _check_address(str(values["coordinator_address"]), names["coordinator_address"])
        count, index = values["num_processes"], values["process_id"]
        count = _parse_int(count, names["num_processes"]) if isinstance(count, str) else count
        index = _parse_int(index, names["process_id"]) if isinstance(index, str) else index
        for value, name in ((count, names["num_processes"]), (index, names["process_id"])):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be an int")
        if count < 1:
            raise ValueError(f"{names['num_processes']}={count} must be at least 1")
        if not 0 <= index < count:
            raise ValueError(f"{names['process_id']}={index} must lie in [0, {count}) "
                             f"({names['num_processes']}={count})")
        if count == 1:
            return None
        source = " and ".join(sorted({"arguments" if n in _ARGS else "JAX_* variables"
                                      for n in names.values()}))
        kwargs = {"coordinator_address": address, "num_processes": count, "process_id": index}
        return _Plan(source, {**kwargs, **extra})

    # 4 to 7: a cluster JAX detects by itself.
    if mode == "auto":
        return _Plan("TASKPGM_DISTRIBUTED=auto", extra)
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return _Plan(f"Cloud TPU ({len(hosts)} workers in TPU_WORKER_HOSTNAMES)", extra)
    if env.get("MEGASCALE_COORDINATOR_ADDRESS", "").strip():
        return _Plan("Cloud TPU multislice (MEGASCALE_COORDINATOR_ADDRESS)", extra)
    if env.get("SLURM_NTASKS", "").strip():
        tasks = _parse_int(env["SLURM_NTASKS"], "SLURM_NTASKS")
        if tasks > 1:
            absent = [v for v in _SLURM_STEP if v not in env]
            if absent:
                # An salloc shell or the batch script itself: one process, not a job step.
                logger.warning("SLURM_NTASKS=%d but %s unset: not inside an srun step, so this "
                               "runs as a single process; launch with srun for %d processes",
                               tasks, ", ".join(absent), tasks)
                return None
            if device_ids is None and _one_task_per_node(env):
                _warn_one_gpu("SLURM")
            return _Plan(f"SLURM (SLURM_NTASKS={tasks})", extra)
    if env.get("OMPI_COMM_WORLD_SIZE", "").strip():
        size = _parse_int(env["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE")
        if size > 1:
            if "OMPI_MCA_orte_hnp_uri" not in env:
                raise ValueError(f"OMPI_COMM_WORLD_SIZE={size} but OMPI_MCA_orte_hnp_uri is "
                                 "unset (Open MPI 5 / PMIx), so JAX cannot find the coordinator; "
                                 "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                                 "JAX_PROCESS_ID instead")
            if device_ids is None and _one_task_per_node(env):
                _warn_one_gpu("Open MPI")
            return _Plan(f"Open MPI (OMPI_COMM_WORLD_SIZE={size})", extra)
    if device_ids is not None:
        warnings.warn("local_device_ids / JAX_LOCAL_DEVICE_IDS has no effect in a single "
                      "process; restrict devices with CUDA_VISIBLE_DEVICES instead", stacklevel=3)
    return None


def _warn_one_gpu(launcher: str) -> None:
    warnings.warn(f"{launcher} runs one process per node, and JAX then gives each process only "
                  "the GPU of its local rank; set JAX_LOCAL_DEVICE_IDS=0,1,...,7 to use all of a "
                  "node's GPUs, or launch one process per GPU", stacklevel=4)


def _backends_initialized() -> bool:
    """Whether JAX has already created its backends (then initialize is too late)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # private module moved: jax.distributed.initialize raises for us
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def maybe_initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` once if this is one process of many.

    Call it first thing, before any JAX computation (even `jax.devices()`). It reads the
    environment as the module docstring lists; arguments win over variables. Calling it again is
    harmless: later calls return the first call's answer and never initialise twice.

    Args:
      coordinator_address: "host:port" of process 0 (with `num_processes` and `process_id`).
      num_processes: how many processes take part.
      process_id: this process's index in [0, num_processes).
      local_device_ids: the local devices this process uses (default: JAX's choice).

    Returns:
      True when this function initialised the distributed system (on this call or an earlier
      one); False for a single process, or when `jax.distributed.initialize` was already called
      elsewhere.

    Raises:
      ValueError: a malformed or incomplete setting, naming the variable or argument.
      TypeError: `num_processes` or `process_id` is not an int.
      RuntimeError: a multi-process environment, but JAX backends already exist in this process.

    Example:
      >>> if maybe_initialize():
      ...     print(process_summary())
    """
    global _result
    with _lock:
        if _result is not None:
            return _result
        if jax.distributed.is_initialized():
            logger.info("jax.distributed was already initialised elsewhere; nothing to do")
            _result = False
            return _result
        plan = _plan(os.environ, coordinator_address, num_processes, process_id, local_device_ids)
        if plan is None:
            _result = False
            return _result
        if _backends_initialized():
            raise RuntimeError(
                f"found a multi-process environment ({plan.source}), but JAX backends are "
                "already initialised in this process: call "
                "taskpgm_jax.distributed.maybe_initialize() first, before any JAX computation "
                "(including jax.devices() or creating arrays)")
        logger.info("jax.distributed.initialize(%s) for %s",
                    ", ".join(f"{k}={v!r}" for k, v in plan.kwargs.items()), plan.source)
        jax.distributed.initialize(**plan.kwargs)
        _result = True
        return _result


def process_summary() -> str:
    """One line for logs: process index and count, local and global devices, platform.

    Initialises the JAX backends, so call it after `maybe_initialize()`.

    Returns:
      e.g. "process 0 of 4: 4 local / 16 global devices, platform tpu (TPU v4)".
    """
    devices = jax.devices()
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    return (f"process {jax.process_index()} of {jax.process_count()}: "
            f"{jax.local_device_count()} local / {jax.device_count()} global devices, "
            f"platform {devices[0].platform} ({kinds})")
