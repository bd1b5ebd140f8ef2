"""The host loop: `finetune(trainer, data, ...)` drives a `Trainer` (or `AdapterTrainer`).

Deterministic by seed: the state's key comes from `seed`, the batches from the data iterator (its
own seed), and a resumed run restores both, so it retraces the uninterrupted run exactly.

The device runs ahead of the host: per-step metrics stay on the device as futures and are fetched
together only on logging and checkpoint steps, where the loop also checks the state's sticky
non-finite flag. A non-finite loss, gradient or updated parameter therefore stops the run at the
next such step, before anything is saved, and the last good checkpoint is kept.

A checkpoint directory belongs to one run: every checkpoint records the settings that define the
trajectory (seed, `TrainConfig`, trainer kind, the trainable parameters' shapes and dtypes), a
resume refuses a checkpoint made with other settings or on other weights (a fingerprint of a few
sampled values of the frozen base and of the initial trainable values), and a fresh run
(`resume=False`) refuses a directory that already holds checkpoints. The optimiser's settings
(learning rate and schedule, Adam's b1, b2, eps, weight decay, the clipping norm) may change on
resume, with a warning: that is how a run that went non-finite goes on from its last good
checkpoint with a lower learning rate.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from taskpgm_jax.data import Batch
from taskpgm_jax.train.checkpoint import Checkpointer, check_directory_path, has_position
from taskpgm_jax.train.step import Trainer, TrainState, check_int, check_seed

__all__ = ["FinetuneResult", "NonFiniteLossError", "finetune"]


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradient norm or the updated parameters became NaN or inf.

    Attributes:
      step: the first bad step (1-based: the step-th update produced it); for an
        `AdapterTrainer`, the earliest over the adapters.
      last_checkpoint: the step of the newest checkpoint kept (None if there is none).
      adapters: for an `AdapterTrainer`, the indices of the adapters that went bad at `step`
        (None for a `Trainer`).
      adapter_steps: for an `AdapterTrainer`, every bad adapter's first bad step (1-based), by
        index (None for a `Trainer`).
    """

    def __init__(self, step: int, last_checkpoint: int | None, directory: str | None,
                 adapter_steps: dict[int, int] | None = None):
        self.step, self.last_checkpoint = step, last_checkpoint
        self.adapter_steps = adapter_steps
        self.adapters: tuple[int, ...] | None = None
        which = ""
        if adapter_steps is not None:
            adapters = self.adapters = tuple(t for t, s in adapter_steps.items() if s == step)
            first = ", ".join(str(t) for t in adapters)
            later = [f"adapter {t} at step {s}" for t, s in adapter_steps.items() if s != step]
            which = f" (adapter{'s' if len(adapters) > 1 else ''} {first}" + \
                (f"; later {', '.join(later)})" if later else ")")
        if last_checkpoint is None:
            where = "no checkpoint was written"
            todo = "Lower TrainConfig.learning_rate (or check the data) and start again."
        else:
            where = f"the last good checkpoint (step {last_checkpoint}) is kept in {directory}"
            todo = ("To go on from it, resume (the same checkpoint_dir, resume=True) with a lower "
                    "TrainConfig.learning_rate, or a longer warmup_steps or smaller max_grad_norm: "
                    "a resume accepts changed optimiser settings, with a warning. Or check the "
                    "data of the steps after it.")
        super().__init__(f"non-finite loss, gradient or parameters at step {step}{which}; "
                         f"training stopped and {where}. {todo}")


@dataclasses.dataclass
class FinetuneResult:
    """What `finetune` returns.

    Attributes:
      state: the final `TrainState` (for adapters: leaves with a leading axis T).
      history: one dict per logging step: "step", "loss" (mean over every target token of the
        steps since the last log, i.e. each step's loss weighted by its token count; for an
        `AdapterTrainer` over every adapter's tokens), "lr", "grad_norm" (last step's),
        "tokens_per_s" (real tokens of the global batches: every process's rows), and "loss_per_adapter" (each
        adapter's own token-weighted mean) for an `AdapterTrainer`.
      resumed_from: the checkpoint step the run continued from, or None.
    """

    state: TrainState
    history: list[dict[str, Any]]
    resumed_from: int | None = None


def _token_mean(loss: np.ndarray, tokens: np.ndarray, axis=None) -> np.ndarray:
    """The mean of per-step mean losses weighted by their token counts: the loss over every
    token of the steps (a plain mean where the steps hold no tokens at all)."""
    total = np.sum(tokens, axis=axis)
    weighted = np.sum(loss * tokens, axis=axis) / np.where(total > 0, total, 1.0)
    return np.where(total > 0, weighted, np.mean(loss, axis=axis))


def _summarise(window: list[dict[str, Any]]) -> dict[str, Any]:
    loss = np.asarray([w["loss"] for w in window], np.float64)  # [steps] or [steps, T]
    # Each step's loss is the mean over its own tokens: weighted by them, the entry's loss is the
    # mean over the window's tokens, as one batch of all of them would report it.
    tokens = np.asarray([w.get("tokens", np.ones_like(w["loss"])) for w in window], np.float64)
    entry: dict[str, Any] = {"loss": float(_token_mean(loss, tokens)),
                             "lr": float(np.mean(window[-1]["lr"])),
                             "grad_norm": float(np.mean(window[-1]["grad_norm"]))}
    if loss.ndim == 2:
        entry["loss_per_adapter"] = [float(x) for x in _token_mean(loss, tokens, axis=0)]
    return entry


def finetune(trainer: Trainer, data: Iterator[Batch], *, num_steps: int | None = None,
             seed: int = 0, log_every: int = 10, checkpoint_dir: str | None = None,
             checkpoint_every: int | None = None, max_to_keep: int | None = 3,
             resume: bool = True, progress: bool = True,
             on_log: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Trains for `num_steps` steps, logging, checkpointing and resuming.

    Args:
      trainer: a `Trainer` or `AdapterTrainer` (model, config and mesh bound).
      data: an iterator of host `Batch`es ([B, S], or [T, B, S] for adapters; a list must be
        wrapped in `iter(...)`). With `state()` and `restore()` (`HostIterator`, a
        `StackedIterator` whose task iterators all have them) its position is checkpointed and
        resumed; `checkpoint_dir` with `resume=True` requires both (a plain iterator would replay
        its data from the start), with `resume=False` a plain iterator's checkpoints hold no
        position.
      num_steps: total steps of the run (default `trainer.cfg.total_steps`), at most
        `trainer.cfg.total_steps` (the schedule's end; fewer is fine); a resumed run goes on to
        the same total.
      seed: the run's seed (the step keys), in [0, 2**32) (for T adapters seed + T - 1 too). A
        resumed run must pass the same seed, and a trainer of the same kind, `TrainConfig` and
        trainable parameter shapes, e.g. LoRA rank and targets (`num_steps` may differ: the
        schedule is the config's), and the same base model and initial trainable values
        (compared by a fingerprint of a few sampled values of every array). The optimiser
        settings `TrainConfig.learning_rate`, `total_steps`, `warmup_steps`, `end_lr_ratio`,
        `weight_decay`, `b1`, `b2`, `eps` and `max_grad_norm` (a number for another number,
        not None for one or back) may differ, with a warning: the run goes on from the
        checkpoint under the new settings (e.g. a lower learning rate after a
        `NonFiniteLossError`), and its later checkpoints record them.
      log_every: fetch and record metrics every this many steps (and at the end).
      checkpoint_dir: where to checkpoint (None: no checkpoints); one run's directory (a path
        that is not an existing file).
      checkpoint_every: checkpoint interval, a positive int (default: `log_every`); the last step
        always saves.
      max_to_keep: checkpoints kept.
      resume: (a bool) continue from the newest checkpoint in `checkpoint_dir` if there is one. False
        starts afresh and requires a `checkpoint_dir` without checkpoints (it never deletes them).
      progress: show a tqdm progress bar.
      on_log: a callable, called with each history entry (or None).

    Returns:
      A `FinetuneResult`.

    Raises:
      NonFiniteLossError: the loss, gradient or parameters became NaN/inf; the last good
        checkpoint is kept.
      ValueError: bad arguments, data that ends early or cannot be resumed, a checkpoint made
        with other settings, or `resume=False` with checkpoints already in `checkpoint_dir`.
      A background checkpoint save that failed raises its error when the run ends; when the run
      stopped on an error of its own, that error is raised, with the save's failure as a note.

    Example:
      >>> data = HostIterator(encode_task(tok, pool[name].train, max_length=128), batch_size=8,
      ...                     seq_len=128, seed=0)
      >>> result = finetune(Trainer(model, TrainConfig(total_steps=500)), data,
      ...                   checkpoint_dir="/tmp/run/ckpt", checkpoint_every=100)
    """
    if not isinstance(trainer, Trainer):
        raise ValueError(f"trainer must be a Trainer or AdapterTrainer, got "
                         f"{type(trainer).__name__}")
    num_steps = check_int(trainer.cfg.total_steps if num_steps is None else num_steps,
                          "num_steps", 1)
    if num_steps > trainer.cfg.total_steps:
        # Steps past the schedule's end would all run at the floor rate: never what was meant.
        raise ValueError(f"num_steps={num_steps} > TrainConfig.total_steps="
                         f"{trainer.cfg.total_steps}: the schedule ends at "
                         f"{trainer.cfg.total_steps}; raise total_steps (fewer steps are fine)")
    if not isinstance(resume, (bool, np.bool_)):
        # A string such as "no" would be truthy and resume.
        raise ValueError(f"resume must be True or False, got {resume!r}")
    resume = bool(resume)
    log_every = check_int(log_every, "log_every", 1)
    if checkpoint_every is not None:
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every", 1)
    seed = check_seed(seed, getattr(trainer, "num_adapters", 1))  # a Python int: JSON metadata
    # Checked here, not on first use: a list fails at the first next(), a bad on_log only after
    # log_every steps of training.
    if not callable(getattr(data, "__next__", None)):
        raise ValueError(f"data must be an iterator of Batch (with __next__), got "
                         f"{type(data).__name__}: wrap a list of batches in iter(...), or pass a "
                         "HostIterator / StackedIterator (which can also be resumed)")
    if on_log is not None and not callable(on_log):
        raise ValueError(f"on_log must be a callable taking each history entry (a dict) or None, "
                         f"got {type(on_log).__name__}")
    ckpt = None
    if checkpoint_dir is not None:
        check_directory_path(checkpoint_dir, "checkpoint_dir", optional=True)
        if resume and not _resumable(data):
            what = ("has state()/restore() but resumable=False (a StackedIterator: a task "
                    "iterator without them)" if has_position(data) else "has no state()/restore()")
            raise ValueError(
                f"data ({type(data).__name__}) {what}, so a run checkpointed to "
                f"checkpoint_dir={checkpoint_dir!r} with resume=True could not continue its data "
                "where it stopped (it would replay it from the start): pass an iterator with both "
                "(HostIterator, StackedIterator of HostIterators), or resume=False to write "
                "checkpoints that are never resumed")
        every = log_every if checkpoint_every is None else checkpoint_every
        ckpt = Checkpointer(checkpoint_dir, every=every, max_to_keep=max_to_keep)
    elif checkpoint_every is not None:
        raise ValueError("checkpoint_every is set but checkpoint_dir is None")
    try:
        if ckpt is not None and not resume and ckpt.all_steps():
            raise ValueError(
                f"resume=False but checkpoint_dir {ckpt.directory} already holds checkpoints "
                f"(steps {ckpt.all_steps()}): pass resume=True to continue that run, or give the "
                "new run another (or an emptied) checkpoint_dir")
        result = _run(trainer, data, num_steps, seed, log_every, ckpt, resume, progress, on_log)
    except BaseException as err:
        # Closing waits for the pending saves; if one failed, close() raises too, and raised
        # from a `finally` it would replace the error that stopped the run: attach it instead.
        if ckpt is not None:
            try:
                ckpt.close()
            except Exception as close_err:
                err.add_note(f"closing the checkpoints in {ckpt.directory} failed too (a "
                             f"checkpoint save may be incomplete): {type(close_err).__name__}: "
                             f"{close_err}")
        raise
    if ckpt is not None:
        ckpt.close()  # a failed background save surfaces here
    return result


def _resumable(data) -> bool:
    """Whether `data` has a position to save and restore. A wrapper of other iterators
    (`StackedIterator`) has state()/restore() methods even when its children have none: its
    `resumable` property says whether they all do."""
    return has_position(data) and bool(getattr(data, "resumable", True))


def _raise_nonfinite(bad: np.ndarray, ckpt: Checkpointer | None) -> None:
    """Raises `NonFiniteLossError` for the per-state first bad steps `bad` (0-based, -1: fine;
    [T] for adapters): the earliest bad step, and for adapters which ones went bad."""
    last = None if ckpt is None else ckpt.latest_step()
    directory = None if ckpt is None else ckpt.directory
    if bad.ndim == 0:
        raise NonFiniteLossError(int(bad) + 1, last, directory)
    # The minimum over the bad ones: the max would report a later step than the first bad one
    # (fine adapters hold -1).
    steps = {int(t): int(s) + 1 for t, s in enumerate(bad.reshape(-1)) if s >= 0}
    raise NonFiniteLossError(min(steps.values()), last, directory, adapter_steps=steps)


_PARAM = "param "  # prefix of the settings keys that hold a trainable parameter's shape
# Settings keys of the weights' fingerprints: the frozen base, and the trainable values the run
# starts from (LoRA: the initial adapters; full fine-tuning: the initial weights).
_BASE, _INITIAL = "fingerprint base", "fingerprint initial"
_SAMPLES = 16  # values read per array: enough to tell two models apart, cheap at 7B


def _sample_index(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """The positions fingerprinted in an array of `shape`: the first, the last and a few fixed
    pseudo-random ones in between, the same on every process and in every run."""
    size = int(np.prod(shape))
    if size <= _SAMPLES:
        flat = np.arange(size)
    else:
        rng = np.random.default_rng(size)
        flat = np.unique(np.concatenate([[0, size - 1],
                                         rng.integers(0, size, _SAMPLES - 2)]))
    return tuple(np.asarray(i, np.int32) for i in np.unravel_index(flat, shape))


@functools.lru_cache(maxsize=None)
def _gather_fn(out_sharding):
    # One jitted point-gather over all leaves: slice size 1 on every dimension, so the SPMD
    # partitioner gathers each sample from its own shard and never collects a whole weight.
    # Replicated outputs: every process reads the same values.
    return jax.jit(lambda leaves, index: [x[i] for x, i in zip(leaves, index, strict=True)],
                   out_shardings=out_sharding)


def _fingerprint(tree, replicated) -> str:
    """A short hash of a few sampled values (and the path, shape, dtype) of every array in
    `tree`: tells another base model or other initial weights apart without reading them all."""
    leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
              if hasattr(x, "shape") and hasattr(x, "dtype")]
    if not leaves:
        return "empty"
    arrays = [x for _, x in leaves]
    index = [_sample_index(tuple(x.shape)) if x.ndim else () for x in arrays]
    values = jax.device_get(_gather_fn(replicated)(arrays, index))
    h = hashlib.sha256()
    for (path, x), v in zip(leaves, values, strict=True):
        h.update(f"{path}|{x.dtype}|{tuple(x.shape)}|".encode())
        h.update(np.ascontiguousarray(np.asarray(v)).tobytes())
    return h.hexdigest()[:16]


def _run_settings(trainer: Trainer, seed: int, fingerprints: bool = True) -> dict[str, Any]:
    """What defines a run's trajectory besides its data: stored in every checkpoint, compared on
    resume (before orbax restores anything, so a changed LoRA rank or target list is named by
    parameter; changed optimiser settings, `_TUNABLE`, only warn). `num_steps` is not among them
    (the schedule is `TrainConfig.total_steps`), so a run may stop early and be continued
    further."""
    settings = {"seed": seed, "trainer": type(trainer).__name__,
                "num_adapters": getattr(trainer, "num_adapters", None)}
    # loss_chunk changes only the float32 summation order: a run may resume with it changed
    # (e.g. turned on to fit memory).
    settings.update({f"TrainConfig.{k}": v for k, v in dataclasses.asdict(trainer.cfg).items()
                     if k != "loss_chunk"})
    for path, x in jax.tree_util.tree_leaves_with_path(trainer._trainable()):
        name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        settings[_PARAM + name] = f"{x.dtype}{list(x.shape)}"
    # Shapes alone would let a run resume onto another base (or, for full fine-tuning, replace
    # the given initial weights by the checkpoint's) without a word.
    # Only a run that checkpoints needs them (a compile and a device read otherwise wasted).
    if fingerprints:
        replicated = trainer._default_sharding()
        settings[_BASE] = _fingerprint(trainer.frozen, replicated)
        settings[_INITIAL] = _fingerprint(trainer._trainable(), replicated)
    return settings


# Optimiser settings that leave the state's structure as it is: a resume may change them, with a
# warning (a run that went non-finite goes on from its last good checkpoint with a lower learning
# rate; a run is continued past its planned end). max_grad_norm only from one number to another:
# None <-> a number changes the optimiser state's structure.
_TUNABLE = frozenset(f"TrainConfig.{k}" for k in (
    "learning_rate", "total_steps", "warmup_steps", "end_lr_ratio", "weight_decay", "b1", "b2",
    "eps", "max_grad_norm"))


def _tunable(key: str, saved: Any, now: Any) -> bool:
    return key in _TUNABLE and (key != "TrainConfig.max_grad_norm"
                                or (saved is not None and now is not None))


def _check_same_run(meta: dict[str, Any], now: dict[str, Any], directory: str) -> None:
    saved = meta.get("run")
    if saved is None:  # written before the settings were stored: only the seed is known
        warnings.warn(f"the checkpoint in {directory} does not record its TrainConfig; only its "
                      "seed is checked against this run", stacklevel=4)
        saved, now = {"seed": meta.get("seed")}, {"seed": now["seed"]}
    elif not any(k.startswith(_PARAM) for k in saved):  # written before shapes were stored
        now = {k: v for k, v in now.items() if not k.startswith(_PARAM)}
    prints = [k for k in (_BASE, _INITIAL) if k in now]
    if prints and not any(k in saved for k in prints):  # written before fingerprints were stored
        if "run" in meta:
            warnings.warn(f"the checkpoint in {directory} does not record a fingerprint of its "
                          "base model and initial weights; resuming it without checking that "
                          "they are this run's", stacklevel=4)
        prints = []
    fingerprints = {k: (saved.get(k), now[k]) for k in prints}
    saved = {k: v for k, v in saved.items() if k not in (_BASE, _INITIAL)}
    now = {k: v for k, v in now.items() if k not in (_BASE, _INITIAL)}
    missing = "<absent>"
    changed = [k for k in sorted(saved.keys() | now.keys())
               if saved.get(k, missing) != now.get(k, missing)]
    tuned = [k for k in changed if k in saved and k in now and _tunable(k, saved[k], now[k])]
    diff = [f"{k}: {saved.get(k, missing)!r} vs {now.get(k, missing)!r}"
            for k in changed if k not in tuned]
    if len(diff) > 8:
        diff = diff[:8] + [f"... {len(diff) - 8} more"]
    if diff:
        raise ValueError(f"the checkpoint in {directory} was made by another run (checkpoint vs "
                         f"this run: {'; '.join(diff)}): resume with the same settings, or give "
                         "the new run another (or an emptied) checkpoint_dir")
    what = {_BASE: "another base model (frozen weights)",
            _INITIAL: "other initial trainable weights (the adapters or weights the run starts "
                      "from)"}
    other = [what[k] for k, (a, b) in fingerprints.items() if a != b]
    if other:
        raise ValueError(f"checkpoint_dir {directory} holds a run on {' and '.join(other)}: "
                         "resuming it would continue that run's training on this run's model. "
                         "Use another (or an emptied) checkpoint_dir for this run, or build the "
                         "trainer from the same model and initial weights to resume")
    if tuned:
        changes = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in tuned)
        warnings.warn(f"resuming the checkpoint in {directory} with changed optimiser settings "
                      f"(checkpoint -> this run: {changes}): training goes on from the checkpoint "
                      "under this run's settings, and its next checkpoints record them",
                      stacklevel=4)


def _run(trainer, data, num_steps, seed, log_every, ckpt, resume, progress, on_log):
    history: list[dict[str, Any]] = []
    window: list[dict[str, Any]] = []  # fetched per-step metrics since the last log entry
    resumed_from = None
    settings = _run_settings(trainer, seed, fingerprints=ckpt is not None)
    if ckpt is not None and resume and ckpt.latest_step() is not None:
        # The settings first: another trainer's state would fail to restore with a shape error.
        _check_same_run(ckpt.read_meta(), settings, ckpt.directory)
        state, position, meta = ckpt.restore(trainer.abstract_state())
        if position is None:
            raise ValueError(f"the checkpoint in {ckpt.directory} holds no data position (its run "
                             "had data without state(), or another number of processes), so "
                             "`data` cannot continue where it stopped: give this run another (or "
                             "an emptied) checkpoint_dir")
        data.restore(position)  # `finetune` checked that data has restore()
        history, window = list(meta.get("history", [])), list(meta.get("window", []))
        resumed_from = ckpt.latest_step()
    else:
        state = trainer.init(seed)
    start = int(np.max(jax.device_get(state.step)))
    if start > num_steps:
        raise ValueError(f"the checkpoint is at step {start}, beyond num_steps={num_steps}")

    pending: list[dict[str, jax.Array]] = []  # device metrics not yet fetched
    tokens, clock = 0, time.perf_counter()
    bar = tqdm(total=num_steps, initial=start, disable=not progress, desc="finetune", unit="step")
    try:
        for step in range(start + 1, num_steps + 1):
            try:
                batch = next(data)
            except StopIteration:
                kept = ("nothing was saved (no checkpoint_dir): the steps trained are lost"
                        if ckpt is None else
                        f"the newest checkpoint is step {ckpt.latest_step()} in {ckpt.directory}"
                        if ckpt.latest_step() is not None else
                        f"no checkpoint was written to {ckpt.directory} yet")
                raise ValueError(f"data ran out at step {step} of {num_steps}; {kept}. Use an "
                                 "endless iterator (HostIterator with num_epochs=None), or pass "
                                 "num_steps the data can cover") from None
            placed = trainer.place_batch(batch)
            state, metrics = trainer.step(state, placed)
            pending.append(metrics)
            log_now = step % log_every == 0 or step == num_steps
            save_now = ckpt is not None and (ckpt.should_save(step) or step == num_steps)
            if not (log_now or save_now):
                bar.update(1)
                continue
            # Sync point: the non-finite flag must be clear before anything is saved.
            bad = np.asarray(jax.device_get(state.nonfinite_step))  # [] or [T]; -1: fine
            if np.any(bad >= 0):
                _raise_nonfinite(bad, ckpt)
            fetched = jax.device_get(pending)
            # The global batches' real tokens (every process's rows; the host batch holds this
            # process's only), summed over adapters.
            tokens += int(sum(np.sum(m.pop("real_tokens")) for m in fetched))
            window += [{k: np.asarray(v).tolist() for k, v in m.items()} for m in fetched]
            pending = []
            if log_now:
                elapsed = time.perf_counter() - clock
                entry = {"step": step, **_summarise(window),
                         "tokens_per_s": tokens / max(elapsed, 1e-9)}
                history.append(entry)
                window, tokens, clock = [], 0, time.perf_counter()
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
                if on_log is not None:
                    on_log(entry)
            if save_now:
                # Data that cannot be resumed stores no position (resume=False only: `finetune`
                # refused it otherwise); a resume from such a checkpoint is refused by name.
                position = data.state() if _resumable(data) else None
                ckpt.save(step, state, data_state=position,
                          meta={"run": settings, "history": history, "window": window},
                          force=step == num_steps)
            bar.update(1)
    finally:
        bar.close()
    return FinetuneResult(state, history, resumed_from)
