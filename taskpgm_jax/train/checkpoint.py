"""Checkpoints of a run with orbax-checkpoint: the whole `TrainState`, the data position, metadata.

One checkpoint (a step directory under an absolute root) holds three items:

* "state": the `TrainState` (trainable parameters, optimiser state, step, key, non-finite flag),
  written by every process for its own shards and restored straight into an abstract target of
  `jax.ShapeDtypeStruct`s that carry the shardings (`Trainer.abstract_state()`), so nothing is
  ever gathered onto one device;
* "data": the data iterator's position (`HostIterator.state()`) of every process, JSON: each host
  reads its own share and stands at its own place in it, so the positions are gathered to the
  primary process (which alone writes JSON items) and each process restores its own;
* "meta": the loop's bookkeeping (seed, logged history, metrics not yet logged), JSON.

The frozen base weights under LoRA are not part of the state: they come from the base model
(checkpoints stay adapter-sized).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from taskpgm_jax.train.step import TrainState, check_int

__all__ = ["Checkpointer"]


def _plain_json(value: Any, name: str) -> Any:
    """`value` as plain JSON data (NumPy scalars become Python numbers), checked here: orbax
    writes JSON in a background thread, where a failure surfaces late and without a name."""
    def numpy_scalar(x):
        if isinstance(x, np.generic):
            return x.item()
        raise TypeError(f"{type(x).__name__} {x!r}")

    try:
        return json.loads(json.dumps(value, default=numpy_scalar))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} is not JSON-serialisable ({err}): pass dicts, lists, "
                         "strings, numbers and None only (arrays as .tolist())") from None


def _all_positions(data_state: Any) -> list[Any]:
    """Every process's `data_state`, in process order (collective: every process calls it)."""
    if jax.process_count() == 1:
        return [data_state]
    raw = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray(raw.size, np.int64))  # [P]
    buf = np.zeros(-(-int(np.max(sizes)) // 1024) * 1024, np.uint8)  # few distinct shapes
    buf[:raw.size] = raw
    rows = multihost_utils.process_allgather(buf)  # [P, bytes]
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, sizes, strict=True)]


def _check_step(step: Any) -> int:
    """A checkpoint step as a Python int >= 0 (a 0-d integer array such as `state.step` too):
    a string would fail inside `should_save` naming nothing, a float or negative step be written
    as checkpoint "2.0" / "-2"."""
    if isinstance(step, (jax.Array, np.ndarray)) and step.ndim == 0 \
            and np.issubdtype(step.dtype, np.integer):
        step = int(step)
    return check_int(step, "step", 0)


def check_directory_path(path: Any, name: str, *, optional: bool = False) -> str:
    """`path` (the argument `name`) as a str, refused by name when it is not a str / PathLike
    (os.fspath's TypeError names no argument) or names an existing file (else only the first
    save finds it, in orbax's background thread). `optional`: the message says None is allowed."""
    if not isinstance(path, (str, os.PathLike)):
        none = " or None" if optional else ""
        raise ValueError(f"{name} must be a path (str or os.PathLike){none}, got "
                         f"{type(path).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name}={path!r} is an existing file, not a directory: pass a directory "
                         "path (it is created if missing)")
    return path


class Checkpointer:
    """Saves every `every` steps (plus forced saves) and restores into sharded targets.

    Args:
      directory: the run's checkpoint root; made absolute (orbax requires it) and created.
      every: save interval in steps (`save` skips other steps unless forced).
      max_to_keep: keep this many most recent checkpoints (None: all).
      async_save: write in a background thread after the arrays are copied off the device
        (the train step may then donate them); `wait` blocks until written.

    Example:
      >>> ckpt = Checkpointer("/tmp/run/ckpt", every=100)
      >>> ckpt.save(step, state, data_state=it.state(), meta={"seed": 0})
      >>> state, data_state, meta = ckpt.restore(trainer.abstract_state())
    """

    def __init__(self, directory: str | os.PathLike, *, every: int, max_to_keep: int | None = 3,
                 async_save: bool = True):
        every = check_int(every, "every", 1)
        if max_to_keep is not None:
            max_to_keep = check_int(max_to_keep, "max_to_keep", 1)
        self.directory = os.path.abspath(check_directory_path(directory, "directory"))
        self.every = every
        # The interval is ours (`should_save`): orbax's own policy also saves the first step.
        options = ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=max_to_keep,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept, ascending."""
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write without `force`."""
        return _check_step(step) % self.every == 0

    def save(self, step: int, state: TrainState, *, data_state: Any = None,
             meta: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Saves `state` (and the data position and metadata) as checkpoint `step`.

        Args:
          step: the number of steps taken (`state.step`), an int >= 0.
          state: the `TrainState`.
          data_state: this process's data iterator position, JSON-serialisable (None if it has
            none); every process passes its own.
          meta: JSON-serialisable loop metadata.
          force: save even if `step` is not on the interval (the final step).
          NumPy scalars in `data_state` and `meta` are stored as Python numbers.

        Returns:
          Whether a checkpoint was started.

        Raises:
          ValueError: `data_state` or `meta` is not JSON-serialisable (checked before anything
            is written).
        """
        step = _check_step(step)
        if not (force or self.should_save(step)):
            return False
        data_state = _plain_json(data_state, "data_state")
        meta = _plain_json(dict(meta or {}), "meta")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave({"positions": _all_positions(data_state)}),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state: TrainState, step: int | None = None
                ) -> tuple[TrainState, Any, dict[str, Any]]:
        """Restores checkpoint `step` (default: the latest) into the target's shapes and shardings.

        Args:
          abstract_state: `jax.ShapeDtypeStruct` leaves with shardings (`Trainer.abstract_state()`).
          step: which checkpoint; None for the latest.

        Returns:
          (state, this process's data position, meta); the position is None (with a warning)
          when the checkpoint was written by another number of processes.

        Raises:
          FileNotFoundError: there is no checkpoint (at `step`).
        """
        step = self._existing_step(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        if "positions" not in out.data:  # written before positions were kept per process
            return out.state, out.data["position"], out.meta
        positions = out.data["positions"]
        if len(positions) != jax.process_count():  # the state reshards; a host's data cannot
            warnings.warn(f"checkpoint {step} in {self.directory} holds the data positions of "
                          f"{len(positions)} processes, this run has {jax.process_count()}: no "
                          "data position restored (resume with the same number of processes)",
                          stacklevel=2)
            return out.state, None, out.meta
        return out.state, positions[jax.process_index()], out.meta

    def _existing_step(self, step: int | None) -> int:
        """`step`, or the latest when None; FileNotFoundError when there is no such checkpoint."""
        step = self.latest_step() if step is None else _check_step(step)
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} "
                                    f"in {self.directory}")
        return step

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The metadata of checkpoint `step` (default: the latest) alone, without the state: cheap,
        and readable before knowing whether the state fits a target.

        Raises:
          FileNotFoundError: there is no checkpoint (at `step`).
        """
        step = self._existing_step(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        """Blocks until every started save is written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (its threads and files), also when a
        save failed: then that save's error is raised after the release."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # not KeyboardInterrupt: releasing waits for the saves again
            try:
                self.manager.close()
            except Exception as close_err:
                err.add_note(f"releasing the checkpoint manager of {self.directory} failed too: "
                             f"{type(close_err).__name__}: {close_err}")
            raise
        self.manager.close()


def has_position(data) -> bool:
    """Whether an iterator has `state()` and `restore()`: a position a checkpoint can hold (a
    wrapper of other iterators may also need its `resumable`, see `loop.finetune`)."""
    return callable(getattr(data, "state", None)) and callable(getattr(data, "restore", None))
