"""T single-task LoRA adapters trained side by side in one jitted step, over one shared base.

The single-model update (`train_update`) is `jax.vmap`ped over a leading adapter axis T of the
whole `TrainState` (adapter values, Adam moments, step, key) and of the batch ([T, B, S]: adapter
t sees only its own task's rows), with the frozen base weights entering unmapped
(`in_axes=None`): they are shared, never copied T times, and each base matmul becomes one matmul
over T x B x S rows. That is where the speed-up over T separate runs comes from. Clipping and
Adam act per adapter (inside the vmap), so adapter t follows exactly the trajectory of a separate
run with the same initial adapter, seed and batches.

Full fine-tuning per task cannot share weights; `sequential_finetune` runs it one task after
another with the same loop.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from taskpgm_jax.data import Batch
from taskpgm_jax.models import LoRAParam, check_adapters_like, stack_adapters
from taskpgm_jax.sharding import Rules, named_sharding
from taskpgm_jax.train.checkpoint import check_directory_path, has_position
from taskpgm_jax.train.step import (
    _STEP_CACHE,
    LossFn,
    ModelT,
    TrainConfig,
    Trainer,
    TrainState,
    _check_no_mesh_needed,
    _CompiledStep,
    check_int,
    check_seed,
    check_state_type,
    make_optimizer,
    train_update,
)

__all__ = ["AdapterTrainer", "StackedIterator", "init_adapters", "sequential_finetune"]


def init_adapters(model: nnx.Module, num_adapters: int, *, seed: int = 0,
                  std: float = 0.02, first: int = 0) -> nnx.State:
    """T fresh adapters shaped like the model's: A ~ N(0, std), B = 0 (no change at start).

    Args:
      model: a model with adapters (`add_lora`); only their shapes are used.
      num_adapters: T.
      seed: adapter t draws A from `fold_in(PRNGKey(seed), first + t)`; in [0, 2**32).
      std: standard deviation of A, a finite number >= 0. The default 0.02 equals
        `LoraConfig`'s default `init_std`; the model does not keep its `LoraConfig`, so a
        non-default `init_std` is not read from it: pass `std=lora_config.init_std`.
      first: the index of the first adapter, so that adapters `first .. first + T - 1` of a
        larger set can be made without the others (training them in rounds).

    Returns:
      A stacked adapter state, leading axis T (the form `AdapterTrainer` and
      `multi_adapter_forward` take).
    """
    num_adapters = check_int(num_adapters, "num_adapters", 1)
    first = check_int(first, "first", 0)
    seed = check_seed(seed)
    # NaN would give NaN adapters, a string a TypeError from inside jax.random.
    # 0-d NumPy / JAX numbers count as numbers (bools and complex do not).
    kind = None if isinstance(std, (str, bytes)) or np.ndim(std) else np.asarray(std).dtype.kind
    if kind not in ("f", "i", "u") or not (np.isfinite(float(std)) and float(std) >= 0):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    std = float(std)
    template = nnx.state(model, LoRAParam)
    if not jax.tree.leaves(template):
        raise ValueError("init_adapters: the model has no LoRAParam variables; call add_lora first")

    def one(key):
        leaves, treedef = jax.tree.flatten_with_path(template)
        keys = jax.random.split(key, len(leaves))
        out = [jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(p)
               else std * jax.random.normal(k, x.shape, x.dtype)
               for (p, x), k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(treedef, out)

    keys = jax.vmap(lambda t: jax.random.fold_in(jax.random.PRNGKey(seed), t))(
        first + jnp.arange(num_adapters))
    return jax.jit(jax.vmap(one))(keys)


def _check_stacked(adapters: nnx.State, own: nnx.State) -> None:
    """One adapter (leaves of the model's own ranks) instead of a stack: say so, rather than
    report every leaf's shape as a mismatch."""
    given, model = jax.tree.leaves(adapters), jax.tree.leaves(own)
    if given and len(given) == len(model) and all(
            np.ndim(a) == np.ndim(b) for a, b in zip(given, model, strict=True)):
        raise ValueError("adapters must be stacked [T, ...] (one leading adapter axis): use "
                         "init_adapters(model, T) or stack_adapters([...]); got one adapter "
                         "shaped like the model's own")


def stacked_adapter_shardings(adapters: nnx.State, mesh: Mesh,
                              rules: Rules | None = None) -> nnx.State:
    """Shardings of stacked adapters ([T, ...] leaves): the adapter axis replicated, each
    adapter's matrices split like the base weights they adapt (their logical axes).

    Example:
      >>> adapters = jax.device_put(adapters, stacked_adapter_shardings(adapters, mesh))
    """
    def one(var):
        axes = var.get_metadata().get("logical_axes") or (None,) * (len(var.shape) - 1)
        return named_sharding(mesh, ("adapters",) + tuple(axes), var.shape, rules)

    return jax.tree.map(one, adapters, is_leaf=lambda x: isinstance(x, nnx.Variable))


class AdapterTrainer(Trainer[ModelT]):
    """Trains T LoRA adapters of one base model side by side (one jitted, donating step).

    The interface is `Trainer`'s (so `finetune` drives both), with a leading adapter axis T on
    every leaf of the state, the batch ([T, B, S]) and the metrics ([T]).

    Args:
      model: the base model with adapters added (`add_lora`); its adapter values are ignored.
      cfg: the train config; `trainable` must be "lora".
      adapters: the T initial adapters, a stacked state (`init_adapters` or `stack_adapters`).
      mesh, rules, loss_fn: as for `Trainer`. The adapter axis is replicated; each adapter's
        batch is split over the data axes.

    Example:
      >>> trainer = AdapterTrainer(model, cfg, init_adapters(model, 8, seed=0))
      >>> state = trainer.init(seed=0)            # adapter t uses seed 0 + t
      >>> state, m = trainer.step(state, trainer.place_batch(stacked_batch))   # m["loss"]: [8]
    """

    def __init__(self, model: ModelT, cfg: TrainConfig,
                 adapters: nnx.State | Sequence[nnx.State], *, mesh: Mesh | None = None,
                 rules: Rules | None = None, loss_fn: LossFn | None = None):
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        if cfg.trainable != "lora":
            raise ValueError(f"AdapterTrainer trains adapters only: TrainConfig.trainable must be "
                             f"'lora', got {cfg.trainable!r} (use sequential_finetune for full "
                             "fine-tuning per task)")
        super().__init__(model, cfg, mesh=mesh, rules=rules, loss_fn=loss_fn)
        if not isinstance(adapters, nnx.State):
            # Anything else fails inside list() or jnp.stack, naming no argument.
            items = None if isinstance(adapters, (str, bytes, Mapping)) or \
                not isinstance(adapters, Iterable) else list(adapters)
            kinds = None if items is None else \
                sorted({type(a).__name__ for a in items if not isinstance(a, nnx.State)})
            if kinds is None or kinds:
                got = type(adapters).__name__ if kinds is None else \
                    f"a {type(adapters).__name__} holding {', '.join(kinds)}"
                raise ValueError(f"adapters must be a stacked nnx.State (init_adapters, "
                                 f"stack_adapters) or a list of nnx.State (lora_state), got {got}")
            adapters = stack_adapters(items or [])
        _check_stacked(adapters, self._params)
        check_adapters_like(adapters, self._params, "adapters", "the model's adapters", leading=1)
        sizes = {x.shape[0] for x in jax.tree.leaves(adapters)}
        if len(sizes) != 1:
            raise ValueError("adapters must be stacked along one leading axis T; adapter axis "
                             f"sizes {sorted(sizes)}")
        self.num_adapters = sizes.pop()
        if mesh is None:
            _check_no_mesh_needed(adapters, "the adapters' arrays")
        # Fresh Variables around the same arrays, as `Trainer._place` does for the model: a
        # later in-place update of the caller's State must not change what `init` starts from.
        self._stacked = jax.tree.map(lambda x: x, adapters)

    # -- shardings: a replicated adapter axis in front of every per-adapter sharding -------------

    def _stacked_shardings(self, state: nnx.State):
        if self.mesh is None:
            return jax.tree.map(lambda _: self._default_sharding(), state,
                                is_leaf=lambda x: isinstance(x, nnx.Variable))
        return stacked_adapter_shardings(state, self.mesh, self.rules)

    # `Trainer.state_shardings` over the stacked adapters: scalars (step, count, ...) and the
    # keys gain the adapter axis and stay replicated.
    def _param_shardings(self):
        return self._stacked_shardings(self._stacked)

    def _abstract_opt_state(self):
        return jax.eval_shape(jax.vmap(self.tx.init), self._stacked)

    def _trainable(self) -> nnx.State:
        return self._stacked

    def batch_sharding(self, shape: tuple[int, ...]) -> jax.sharding.Sharding:
        """Sharding of a [T, B, S] batch: the adapter axis replicated, rows over the data axes."""
        return self._rows_sharding(("adapters", "batch", "seq"), shape, 1)

    # -- state -------------------------------------------------------------------------------------

    def _init_fn(self, params, seed):
        seeds = seed + jnp.arange(self.num_adapters, dtype=jnp.uint32)
        return jax.vmap(super()._init_fn)(params, seeds)

    def init(self, seed: int = 0) -> TrainState:
        """The stacked state: adapter t starts from `adapters[t]` with key `PRNGKey(seed + t)`.

        Args:
          seed: the first adapter's seed; seed + T - 1 must be < 2**32.

        Returns:
          A `TrainState` whose leaves have a leading axis T.
        """
        seed = check_seed(seed, self.num_adapters)
        init = jax.jit(self._init_fn, out_shardings=self.state_shardings())
        stacked = self._stacked
        if self.mesh is not None:
            stacked = jax.device_put(stacked, self._stacked_shardings(stacked))
        return init(stacked, jnp.uint32(seed))

    def adapters(self, state: TrainState) -> nnx.State:
        """The trained adapters, stacked [T, ...] (what `multi_adapter_forward` takes)."""
        return state.params

    def model(self, state: TrainState, index: int | None = None) -> ModelT:
        """The base model carrying adapter `index` (required: there are T of them).

        Args:
          state: the stacked state.
          index: which adapter, 0 <= index < T.

        Returns:
          A model sharing the base weights.
        """
        # A float or bool would index the stack as something else (1.0: an error inside JAX,
        # True: adapter 1).
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, numbers.Integral) \
                or not 0 <= index < self.num_adapters:
            raise ValueError(f"index must be an int adapter index in [0, {self.num_adapters}), "
                             f"got {index!r}")
        index = int(index)
        return nnx.merge(self.graphdef, jax.tree.map(lambda x: x[index], state.params), self.frozen)

    # -- step --------------------------------------------------------------------------------------

    def place_batch(self, batch: Batch) -> Batch:
        """[T, B_host, S] NumPy rows (adapter t's own task) -> global arrays split over the data
        axes.

        Args:
          batch: a `Batch` of [T, B_host, S] arrays, e.g. from `StackedIterator`.

        Returns:
          The `Batch` as `jax.Array`s of shape [T, B_host * process_count, S].
        """
        if isinstance(batch, Batch):
            batch = Batch(*(np.asarray(x) for x in batch))  # host values, checked
        self._check_batch(batch, 1, values=True)
        shape = np.shape(batch.input_ids)
        glob = (shape[0], shape[1] * jax.process_count(), shape[2])
        sharding = self.batch_sharding(glob)
        return Batch(*(jax.make_array_from_process_local_data(sharding, x, glob) for x in batch))

    def _check_batch(self, batch, lead: int, *, values: bool) -> None:
        super()._check_batch(batch, lead, values=values)
        rows = np.shape(batch.input_ids)[0]
        if rows != self.num_adapters:  # step() would fail inside vmap, naming no argument
            raise ValueError(f"batch has {rows} task rows on axis 0, expected "
                             f"num_adapters={self.num_adapters}")

    def _cache_key(self):
        return ("adapters", self.num_adapters) + super()._cache_key()[1:]

    def _shared_step(self, key) -> _CompiledStep:
        if key not in _STEP_CACHE:
            update = functools.partial(train_update, self.graphdef, make_optimizer(self.cfg),
                                       self.cfg, self.loss_fn)
            vmapped = jax.vmap(update, in_axes=(0, None, 0))
            out = None if self.mesh is None else (self.state_shardings(), None)
            _STEP_CACHE[key] = _CompiledStep(vmapped, out, self._abstract_shapes())
        return _STEP_CACHE[key]

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One side-by-side step for all T adapters; `state` is donated.

        Args:
          state: the stacked state.
          batch: a placed [T, B, S] batch (or NumPy arrays on a single device, checked here).

        Returns:
          (new state, metrics of shape [T]).
        """
        self._check_batch(batch, 1, values=True)
        check_state_type(state)
        return self._compiled()(state, self.frozen, batch, self.mesh)


def check_task_iterators(iterators: Any, name: str) -> list:
    """A list of per-task iterators, checked before anything consumes it: one iterator given
    instead (itself iterable, `list()` would drain it, forever if it is endless) or an element
    that is not an iterator would otherwise hang or fail at the first batch."""
    one = (f"{name} must be a list of per-task iterators, got one {type(iterators).__name__} of "
           "batches: for one task pass [it]")
    if has_position(iterators):  # a HostIterator / StackedIterator: batches, never tasks
        raise ValueError(one)
    if isinstance(iterators, (str, bytes)) or not hasattr(iterators, "__iter__"):
        raise ValueError(f"{name} must be a list of per-task iterators, got "
                         f"{type(iterators).__name__}")
    if callable(getattr(iterators, "__next__", None)):
        # A generator of per-task iterators is fine; one of batches (endless, often) is not:
        # look at the first element before anything drains it.
        first = next(iterators, None)
        if isinstance(first, Batch):
            raise ValueError(one)
        out = [] if first is None else [first, *iterators]
    else:
        out = list(iterators)
    if not out:
        raise ValueError(f"{name} is empty: give one iterator per task")
    for t, it in enumerate(out):
        if not callable(getattr(it, "__next__", None)):
            raise ValueError(f"{name}[{t}] must be an iterator of Batch (with __next__), got "
                             f"{type(it).__name__}: wrap a list of batches in iter(...), or "
                             "pass a HostIterator")
    return out


class StackedIterator:
    """Zips T per-task iterators into [T, B, S] batches, with a joint resumable position.

    The position (`state()` / `restore()`) exists only if every task iterator has one
    (`resumable`); `finetune` checks that before a run that would need it.

    Args:
      iterators: one iterator of `Batch` per task (e.g. `HostIterator`s), same batch shape.

    Example:
      >>> data = StackedIterator([HostIterator(seqs_t, batch_size=8, seq_len=64, seed=t)
      ...                         for t, seqs_t in enumerate(per_task)])
    """

    def __init__(self, iterators: Sequence[Iterator[Batch]]):
        self.iterators = check_task_iterators(iterators, "iterators")

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        # When a finite task iterator stops, the ones before it have already given a batch that
        # is never yielded: roll them back so that state() stays where training stopped.
        saved = [it.state() if has_position(it) else None for it in self.iterators]
        batches = []
        for it in self.iterators:
            try:
                batches.append(next(it))
            except StopIteration:
                for done, st in zip(self.iterators[:len(batches)], saved, strict=False):
                    if st is not None:
                        done.restore(st)
                raise
        shapes = {np.shape(b.input_ids) for b in batches}
        if len(shapes) != 1:
            raise ValueError(f"per-task batches differ in shape: {sorted(shapes)}")
        return Batch(*(np.stack(xs) for xs in zip(*batches, strict=True)))

    @property
    def resumable(self) -> bool:
        """Whether every task iterator has `state()` and `restore()` (so this one has a
        position); plain iterators (generators, `iter(list)`) do not."""
        return all(has_position(it) for it in self.iterators)

    def _check_resumable(self, method: str) -> None:
        plain = [t for t, it in enumerate(self.iterators) if not has_position(it)]
        if plain:
            raise ValueError(f"StackedIterator.{method}(): task iterators {plain} have no "
                             "state()/restore(), so this iterator has no position; use "
                             "HostIterators (or check `resumable` first)")

    def state(self) -> dict[str, Any]:
        """Every task iterator's position (JSON-serialisable); requires `resumable`."""
        self._check_resumable("state")
        return {"tasks": [it.state() for it in self.iterators]}

    def restore(self, state: dict[str, Any]) -> None:
        """Continues every task iterator from a saved `state()`; requires `resumable`."""
        self._check_resumable("restore")
        tasks = state.get("tasks") if isinstance(state, dict) else None
        if not isinstance(tasks, (list, tuple)):
            got = "a dict without a 'tasks' list" if isinstance(state, dict) else \
                type(state).__name__
            raise ValueError("state must be a dict {'tasks': [...]} from StackedIterator.state(), "
                             f"got {got}")
        if len(tasks) != len(self.iterators):
            raise ValueError(f"saved state has {len(tasks)} tasks, this iterator "
                             f"{len(self.iterators)}")
        for it, st in zip(self.iterators, tasks, strict=True):
            it.restore(st)


def sequential_finetune(model: nnx.Module, cfg: TrainConfig, data: Sequence[Iterator[Batch]], *,
                        num_steps: int | None = None, seed: int = 0,
                        checkpoint_root: str | None = None, mesh: Mesh | None = None,
                        rules: Rules | None = None, loss_fn: LossFn | None = None,
                        **loop_kwargs) -> list[nnx.State]:
    """Full (or LoRA) fine-tuning of one model per task, one task after another.

    Every task starts from the same initial `model` (which is not modified) and uses seed
    `seed + t`; the compiled step is shared, so only the first task compiles.

    Args:
      model: the initial model.
      cfg: the train config (any `trainable`).
      data: one batch iterator per task.
      num_steps: steps per task (default `cfg.total_steps`).
      seed: the first task's seed.
      checkpoint_root: if given, task t checkpoints under `<checkpoint_root>/task_<t>`; unless
        `resume=False`, every task's iterator must then have `state()`/`restore()` (checked for
        all tasks before the first trains).
      mesh, rules, loss_fn: as for `Trainer` (one loss for every task; default
        `target_token_loss`).
      **loop_kwargs: passed on to `finetune` (log_every, progress, checkpoint_every, ...).

    Returns:
      The T trained parameter states (`nnx.State`; `nnx.update(model_copy, state)` loads one).
    """
    import os

    from taskpgm_jax.train.loop import _resumable, finetune

    data = check_task_iterators(data, "data")
    seed = check_seed(seed, len(data), "task")
    # Checked for every task now: `finetune` would check task t only after tasks 0 .. t - 1 trained.
    if "checkpoint_dir" in loop_kwargs:
        raise ValueError("sequential_finetune takes checkpoint_root (task t checkpoints under "
                         "<checkpoint_root>/task_<t>), not checkpoint_dir")
    if checkpoint_root is None:
        if loop_kwargs.get("checkpoint_every") is not None:
            raise ValueError("checkpoint_every is set but checkpoint_root is None")
    else:
        check_directory_path(checkpoint_root, "checkpoint_root", optional=True)
        resume = loop_kwargs.get("resume", True)  # a non-bool is refused by `finetune`
        if isinstance(resume, (bool, np.bool_)) and resume:
            for t, task_data in enumerate(data):
                if not _resumable(task_data):
                    raise ValueError(
                        f"data[{t}] ({type(task_data).__name__}) has no state()/restore(), so task "
                        f"{t} checkpointed under checkpoint_root={os.fspath(checkpoint_root)!r} "
                        "with resume=True could not continue its data where it stopped: pass "
                        "iterators with both (HostIterator), or resume=False to write checkpoints "
                        "that are never resumed")
    trainer = Trainer(model, cfg, mesh=mesh, rules=rules, loss_fn=loss_fn)
    out = []
    for t, task_data in enumerate(data):
        ckpt = None if checkpoint_root is None else os.path.join(checkpoint_root, f"task_{t}")
        result = finetune(trainer, task_data, num_steps=num_steps, seed=seed + t,
                          checkpoint_dir=ckpt, **loop_kwargs)
        out.append(result.state.params)
    return out
