"""The train step: a pure, jitted update of a donated `TrainState`.

The model is split once into three parts (`nnx.split`): its static structure (graphdef), the
*trainable* variables (every `nnx.Param` for full fine-tuning, only the `LoRAParam` adapters for
LoRA) and the *frozen* rest. Only the trainable part and its optimiser state live in the donated
`TrainState`; the frozen part (the base weights under LoRA) is a separate, never-donated argument,
so LoRA training cannot touch it and T adapter states can share it (see `adapters.py`).

One step: the global batch [B, S] is cut into k micro-batches (rows i, i + k, i + 2k, ... form
micro-batch i, so every device keeps a share of each when B is split over the mesh), gradients of
the *summed* loss are accumulated with `lax.scan` and divided by the total token count the loss
returns for the whole batch (its target tokens for `target_token_loss`). The result is the
gradient of one k-times larger batch, whatever k. Then global-norm clipping and AdamW with
warmup + cosine decay (Optax).

Mixed precision comes from the model config: parameters (the master copy the optimiser updates)
are stored in `param_dtype` (float32), matmuls run in `dtype` (bf16), logits are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import warnings
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from taskpgm_jax.data import Batch, check_batch_values
from taskpgm_jax.data.tasks import check_int
from taskpgm_jax.models import LoRAParam, target_logprobs
from taskpgm_jax.models.init import state_shardings
from taskpgm_jax.sharding import Rules, logical_to_spec, shard

__all__ = ["TrainConfig", "TrainState", "Trainer", "lr_schedule", "make_optimizer",
           "target_token_loss", "train_update"]

TRAINABLE = ("full", "lora")
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)

# loss_fn(model, batch, rng) -> (sum of per-token losses, number of tokens it was summed over).
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, jax.Array]]


def check_seed(seed: Any, span: int = 1, what: str = "adapter") -> int:
    """A run seed as a Python int; seeds seed .. seed + span - 1 (one per adapter or task) must
    all lie in [0, 2**32), the uint32 `PRNGKey` seed (a larger one would wrap around)."""
    why = f"{what} t uses seed + t, for t < {span}" if span > 1 else ""
    return check_int(seed, "seed", 0, 2**32 - span + 1, why)


# The model type a trainer was built with, which `Trainer.model` gives back.
ModelT = TypeVar("ModelT", bound=nnx.Module)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and step settings (frozen and hashable: safe as a static argument).

    Attributes:
      learning_rate: peak learning rate, reached after the warmup.
      total_steps: length of the schedule (warmup included); the cosine ends here.
      warmup_steps: linear warmup from 0 to `learning_rate`.
      end_lr_ratio: the cosine decays to `learning_rate * end_lr_ratio`.
      weight_decay: decoupled (AdamW) decay, applied to matrices only (kernels, embeddings, LoRA
        A and B; not norm weights or biases, scanned layers or not).
      b1, b2, eps: Adam moments and epsilon (eps > 0: it guards Adam's division).
      max_grad_norm: clip the global gradient norm to this (None: no clipping).
      grad_accum: k, micro-batches per step; the batch size must be a multiple of k.
      trainable: "full" (every `nnx.Param`) or "lora" (only `LoRAParam` adapters).
      loss_chunk: apply the LM head and the default loss this many positions at a time
        (`chunked_target_token_loss`): the step then holds about one chunk of [B, S, V] logits
        instead of 2.5x all of them, for one more LM-head matmul per chunk. None: all at once.
        Not part of a run's identity on resume (it changes only the float32 summation order).
    """

    learning_rate: float = 1e-4
    total_steps: int = 1000
    warmup_steps: int = 0
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    trainable: str = "full"
    loss_chunk: int | None = None

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        # Numbers are checked as the float32 the optimiser computes in (1e39 is finite in Python
        # but inf in float32) and stored as Python floats / ints: hashable, JSON-able (checkpoint
        # metadata) and equal whether given as int, float or NumPy scalar.
        for name in ("learning_rate", "end_lr_ratio", "weight_decay", "b1", "b2", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                bad(name, "must be a float")
            if not abs(float(value)) <= _F32_MAX:  # also false for NaN
                bad(name, "must be finite (in float32)")
            object.__setattr__(self, name, float(value))
        for name in ("total_steps", "warmup_steps", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                bad(name, "must be an int")
            object.__setattr__(self, name, int(value))
        if self.max_grad_norm is not None:
            value = self.max_grad_norm
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                bad("max_grad_norm", "must be a float or None")
            if not 0 < float(value) <= _F32_MAX:
                bad("max_grad_norm", "must be finite and > 0, or None for no clipping")
            object.__setattr__(self, "max_grad_norm", float(value))

        if not self.learning_rate > 0:
            bad("learning_rate", "must be > 0")
        if self.total_steps <= 0:
            bad("total_steps", "must be a positive int")
        if not 0 <= self.warmup_steps <= self.total_steps:
            bad("warmup_steps", f"must be an int in [0, total_steps={self.total_steps}]")
        if not 0 <= self.end_lr_ratio <= 1:
            bad("end_lr_ratio", "must be in [0, 1]")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            bad("b1" if not 0 <= self.b1 < 1 else "b2", "must be in [0, 1)")
        # Adam divides by sqrt(v) + eps, and v is 0 for a parameter whose gradient has been 0
        # (a fresh LoRA A): eps = 0 gives 0/0 = NaN, and a subnormal eps is flushed to 0.
        if not self.eps >= _F32_TINY:
            bad("eps", f"must be >= {_F32_TINY:.3g} (float32's smallest normal number); "
                "typical values are 1e-8 to 1e-6")
        if self.grad_accum <= 0:
            bad("grad_accum", "must be a positive int")
        if self.trainable not in TRAINABLE:
            bad("trainable", f"must be one of {TRAINABLE}")
        if self.loss_chunk is not None:
            if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, numbers.Integral) \
                    or self.loss_chunk < 1:
                bad("loss_chunk", "must be a positive int (positions per chunk) or None")
            object.__setattr__(self, "loss_chunk", int(self.loss_chunk))

    def replace(self, **changes) -> TrainConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


class TrainState(NamedTuple):
    """Everything a step updates (donated to the step, checkpointed whole).

    Attributes:
      step: int32 [], steps taken.
      params: the trainable variables (an `nnx.State`, float32 master weights).
      opt_state: the Optax state of `params`.
      rng: uint32 [2], the run's key; each step uses `fold_in(rng, step)`.
      nonfinite_step: int32 [], the first step whose loss, gradient or updated parameters were not
        finite, -1 if none (sticky, so the host can check it only on logging and checkpoint steps).
    Under `AdapterTrainer` every leaf has a leading adapter axis T.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_step: jax.Array


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to `peak * end_lr_ratio`.

    Args:
      cfg: the train config.

    Returns:
      An Optax schedule, step -> learning rate.
    """
    if cfg.warmup_steps == cfg.total_steps:  # warmup only: optax's cosine needs >= 1 step
        return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps, end_value=cfg.learning_rate * cfg.end_lr_ratio)


def _is_matrix(path, leaf) -> bool:
    """Whether a parameter is a weight matrix (kernel, embedding, LoRA A/B) rather than a norm
    weight or bias, judged by what it is, not its rank: scanned layers stack a norm to [L, H]."""
    axes = leaf.get_metadata().get("logical_axes") if isinstance(leaf, nnx.Variable) else None
    if axes is not None:  # our modules: the logical axes without the stacked layer axis
        return sum(a != "layers" for a in axes) >= 2
    # No logical axes (a module of the user's): go by name, then by rank.
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if names and (names[-1] == "bias" or any("norm" in n for n in names)):
        return False
    return leaf.ndim >= 2


def _decay_mask(params):
    # Decay matrices only: decaying norm weights (init 1) or biases pulls them toward a
    # meaningless 0.
    def one(path, leaf):
        flag = _is_matrix(path, leaf)
        return leaf.replace(flag) if isinstance(leaf, nnx.Variable) else flag

    return jax.tree_util.tree_map_with_path(one, params,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW on `lr_schedule(cfg)`.

    Args:
      cfg: the train config.

    Returns:
      The Optax transformation.

    Example:
      >>> tx = make_optimizer(TrainConfig(learning_rate=3e-4, total_steps=1000, warmup_steps=50))
    """
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


def target_token_loss(model: nnx.Module, batch: Batch,
                      rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over target tokens (`batch.loss_mask`) only.

    Args:
      model: a `CausalLM`.
      batch: a `Batch` of [B, S] arrays.
      rng: unused (the decoder has no dropout); part of the loss interface for custom losses.

    Returns:
      (sum over target tokens of -log p(target), number of target tokens), float32 scalars.
      Returning the sum, not the mean, lets micro-batches add up exactly to the full batch.
      `loss_mask` is 1 on target tokens and 0 elsewhere; a value in between weights its token
      (sum of mask * nll, and the mask's sum as the count). `Trainer` refuses values outside
      [0, 1].
    """
    del rng
    logits = model(batch.input_ids, segment_ids=batch.segment_ids, positions=batch.positions)
    mask = batch.loss_mask.astype(jnp.float32)
    return _masked_nll_sum(logits, batch.targets, mask), jnp.sum(mask)


def _masked_nll_sum(logits, targets, mask):
    """sum of mask * -log softmax(logits)[target] over target tokens (no normalised copy of the
    logits: see `models.target_logprobs`)."""
    nll = -target_logprobs(logits, targets)
    # where, not multiply: a padding row's logits may be anything, and 0 * inf would be NaN.
    return jnp.sum(jnp.where(mask > 0, nll * mask, 0.0))


@functools.lru_cache(maxsize=None)
def chunked_target_token_loss(chunk: int) -> LossFn:
    """`target_token_loss` with the LM head and the loss applied `chunk` positions at a time.

    The [B, S, V] float32 logits never exist at once: each chunk's logits are made, reduced to
    its loss and dropped, and rebuilt in the backward pass (`jax.checkpoint`), so the step holds
    about one chunk of logits where the plain loss holds 2.5x all of them. The price is one more
    LM-head matmul per chunk in the backward pass. Same value and gradients as
    `target_token_loss` (up to float32 summation order).

    Args:
      chunk: positions per chunk, a positive int (S need not be a multiple: the last chunk is
        padded with positions of weight 0).

    Returns:
      A loss function `(model, batch, rng) -> (loss sum, token count)`; the same object for the
      same `chunk`, so trainers built with it share one compiled step.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    chunk = int(chunk)

    def loss(model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        del rng
        h = model.hidden_states(batch.input_ids, segment_ids=batch.segment_ids,
                                positions=batch.positions)
        mask = batch.loss_mask.astype(jnp.float32)
        b, s, d = h.shape
        n = -(-s // chunk)
        pad = n * chunk - s

        def split(x):  # [B, S, ...] -> [n, B, chunk, ...], padding positions of weight 0
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
            return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def piece(total, xs):
            h_c, t_c, m_c = xs
            return total + _masked_nll_sum(model.logits_from_hidden(h_c), t_c, m_c), None

        total, _ = jax.lax.scan(piece, jnp.zeros((), jnp.float32),
                                (split(h), split(batch.targets), split(mask)))
        return total, jnp.sum(mask)

    loss.__name__ = loss.__qualname__ = f"chunked_target_token_loss({chunk})"
    return loss


def batch_rows_sharding(mesh: Mesh, rules: Rules | None, logical_axes: tuple[str, ...],
                        shape: tuple[int, ...], rows_dim: int) -> NamedSharding:
    """The sharding of a batch array with its rows over the mesh's data axes; warns when the
    rows do not divide over them, as the array is then replicated and every device computes
    the whole batch (correct, but no data parallelism)."""
    mesh_shape = dict(mesh.shape)
    spec = logical_to_spec(logical_axes, rules, mesh_shape=mesh_shape, shape=shape)
    wanted = logical_to_spec(logical_axes, rules, mesh_shape=mesh_shape)[rows_dim]
    if wanted is not None and spec[rows_dim] is None:
        names = (wanted,) if isinstance(wanted, str) else tuple(wanted)
        size = int(np.prod([mesh_shape[n] for n in names]))
        warnings.warn(f"a batch of {shape[rows_dim]} rows does not divide over the mesh's data "
                      f"axes {names} (size {size}): it is replicated, so every device computes "
                      f"the whole batch; use a batch size that is a multiple of {size}",
                      stacklevel=3)
    return NamedSharding(mesh, spec)


def _micro_batches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...]; micro-batch i holds rows i, i + k, ... (strided, so a batch split
    over devices in contiguous blocks gives every device a share of every micro-batch)."""
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return shard(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def _refold_key(key: jax.Array, data: jax.Array) -> jax.Array:
    """`fold_in(k, data)` for every key k of a key array of any shape (typed keys, or raw uint32
    keys with their trailing data axis)."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    flat = key.reshape((-1,) + (() if typed else key.shape[-1:]))
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(flat).reshape(key.shape)


def _step_rngs(frozen: nnx.State, key: jax.Array) -> nnx.State:
    """The frozen variables with the module's own RNG streams (`nnx.Rngs`, e.g. held by an
    `nnx.Dropout`) made fresh for this step and micro-batch: every key folded with bits of `key`
    (itself from the run's seed, the step and the micro-batch), in new Variables a stream may
    advance while the loss traces. Without this the streams were the frozen, never-updated values
    of the model the trainer was built with (the same dropout mask every step), and advancing one
    raised Flax's TraceContextError. Resumable with nothing more in the state: the keys follow
    from `TrainState.rng` and `step`. Other variables are passed as they are."""
    if not any(isinstance(v, nnx.RngState)
               for v in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))):
        return frozen
    data = jax.random.bits(key, (), jnp.uint32)

    def one(v):
        if isinstance(v, nnx.RngKey):
            return v.replace(_refold_key(v[...], data))
        if isinstance(v, nnx.RngState):  # the count: a fresh Variable the stream may advance
            return v.replace(v[...])
        return v

    return jax.tree.map(one, frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))


def train_update(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainConfig,
                 loss_fn: LossFn, state: TrainState, frozen: nnx.State,
                 batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step (pure; `Trainer` jits it, `AdapterTrainer` vmaps it over adapters).

    Args:
      graphdef: the model structure from `nnx.split(model, trainable_filter, ...)`.
      tx: the Optax transformation (`make_optimizer`).
      cfg: the train config (`grad_accum`, for the schedule's learning rate metric).
      loss_fn: `(model, batch, rng) -> (loss sum, token count)`, e.g. `target_token_loss`.
      state: the current `TrainState`.
      frozen: the non-trainable variables.
      batch: a `Batch` of [B, S] arrays, B a multiple of `cfg.grad_accum`.

    Returns:
      (new state, metrics): metrics are float32 scalars "loss" (loss sum / token count, both as
      `loss_fn` returns them, summed over the micro-batches), "tokens" (that count), "grad_norm"
      (before clipping) and "lr" (the rate this step used).
    """
    k = cfg.grad_accum
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_sum_fn(params, mb, key):
        model = nnx.merge(graphdef, params, _step_rngs(frozen, key))
        loss_sum, count = loss_fn(model, mb, key)
        return jnp.asarray(loss_sum, jnp.float32), jnp.asarray(count, jnp.float32)

    # Gradients of the *sums*, divided once by the loss's own total count: k micro-batches add up
    # to one k-times larger batch, whatever count the loss reports (not necessarily loss_mask's).
    grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)
    if k == 1:
        (loss_sum, count), grads = grad_fn(state.params, batch, jax.random.fold_in(rng, 0))
    else:
        def body(carry, xs):
            loss_acc, count_acc, grad_acc = carry
            i, mb = xs
            (loss_i, count_i), grads_i = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
            return (loss_acc + loss_i, count_acc + count_i,
                    jax.tree.map(jnp.add, grad_acc, grads_i)), None

        zero = jnp.zeros((), jnp.float32)
        init = (zero, zero, jax.tree.map(jnp.zeros_like, state.params))
        (loss_sum, count, grads), _ = jax.lax.scan(body, init,
                                                   (jnp.arange(k), _micro_batches(batch, k)))
    denom = jnp.where(count > 0, count, 1.0)  # an all-padding batch gives loss 0, not NaN
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The new parameters too: an update can overflow or divide 0/0 (Adam on a zero gradient) while
    # loss and gradient were finite, and such a state must never be checkpointed as good.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x))
                                                   for x in jax.tree.leaves(params)]))
    bad = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
    new = TrainState(state.step + 1, params, opt_state, state.rng, bad.astype(jnp.int32))
    # real_tokens: every non-padding token of the global batch (all processes' rows), for the
    # loop's tokens/s; computed here, not by a second program per step.
    metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm.astype(jnp.float32),
               "lr": jnp.asarray(lr_schedule(cfg)(state.step), jnp.float32),
               "real_tokens": jnp.sum(batch.segment_ids > 0, dtype=jnp.int32)}
    return new, metrics


def check_state_type(state: Any) -> None:
    """A `TrainState` (a plain tuple or dict of its fields failed inside the step)."""
    if not isinstance(state, TrainState):
        raise ValueError(f"state must be a TrainState (from the trainer's init() or a restored "
                         f"checkpoint), got {type(state).__name__}")


def _check_state_fits(state: TrainState, expected: TrainState) -> None:
    """`state` has the leaves (paths, shapes, dtypes) of `expected`, this trainer's abstract state;
    a state of another trainer (another model, trainable setting or adapter count) failed deep
    inside the step with an unrelated JAX error. Called when the step traces: a new structure or
    shape always retraces, so a fitting state is checked once, not every step."""
    def leaves(tree):
        return {jax.tree_util.keystr(p): (tuple(np.shape(x)), str(x.dtype))
                for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    got, want = leaves(state), leaves(expected)
    if got == want:
        return
    def order(path):  # the parameters first: they name the difference best
        return not path.startswith(".params"), path

    missing = sorted(want.keys() - got.keys(), key=order)
    extra = sorted(got.keys() - want.keys(), key=order)
    if missing or extra:
        diff = "; ".join(f"{what} {len(paths)} leaves, e.g. {paths[0]}" for what, paths in
                         (("lacks", missing), ("has another", extra)) if paths)
    else:
        path = min((p for p in want if got[p] != want[p]), key=order)
        diff = f"{path} is {got[path][1]}{list(got[path][0])}, expected " \
               f"{want[path][1]}{list(want[path][0])}"
    raise ValueError(f"state does not fit this trainer ({diff}): pass a state from this "
                     "trainer's init() or a checkpoint restored into its abstract_state(), not one "
                     "of a trainer of another model, trainable setting or number of adapters")


class _CompiledStep:
    """A jitted, state-donating step shared by every trainer with the same structure, config and
    mesh: a new `Trainer` for the same model shape reuses the compiled executable."""

    def __init__(self, update: Callable, out_shardings, expected: TrainState):
        self.traces = 0

        def counted(state, frozen, batch):
            self.traces += 1
            _check_state_fits(state, expected)  # at trace time: free on every other step
            return update(state, frozen, batch)

        self._fn = jax.jit(counted, donate_argnums=0, out_shardings=out_shardings)

    def __call__(self, state, frozen, batch, mesh):
        if mesh is None:
            return self._fn(state, frozen, batch)
        with jax.set_mesh(mesh):  # activates the models' shard() hints while tracing
            return self._fn(state, frozen, batch)


# Compiled steps by (kind, graphdef, parameter shapes, config, loss, mesh, rules).
_STEP_CACHE: dict[tuple, _CompiledStep] = {}


def attach_shardings(shapes, shardings):
    """`jax.ShapeDtypeStruct`s carrying `shardings` (a tree with one sharding per array or per
    NNX variable), keeping the variables' wrappers so the tree matches the real state."""
    def one(sh, s):
        struct = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
        return s.replace(struct) if isinstance(s, nnx.Variable) else struct

    return jax.tree.map(one, shardings, shapes,
                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def _check_no_mesh_needed(tree, what: str) -> None:
    """Without a mesh the state lives on one device: arrays spread over several (a model built
    on a mesh) would fail inside `init` with JAX's "incompatible devices", naming no argument."""
    spread = max((len(x.sharding.device_set) for x in jax.tree.leaves(tree)
                  if isinstance(x, jax.Array)), default=1)
    if spread > 1:
        raise ValueError(f"mesh=None but {what} lie on {spread} devices (placed on a mesh, e.g. "
                         "init_model(..., mesh=mesh)): pass that mesh: mesh=mesh")


def _check_master_dtype(params: nnx.State) -> None:
    dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
    if dtypes - {"float32"}:
        raise ValueError(f"trainable parameters are {sorted(dtypes)}, but the optimiser needs "
                         "float32 master weights: build the model with ModelConfig.param_dtype="
                         "float32 (ModelConfig.dtype sets the compute dtype)")


class Trainer(Generic[ModelT]):
    """Binds one model, a `TrainConfig` and an optional mesh to a jitted, donating step.

    One code path for one and many devices: without a mesh everything stays on the default
    device; with one, parameters follow their logical-axis shardings (FSDP / tensor parallel per
    the rules), the optimiser state follows its parameters, and batches are split over the mesh's
    data axes ("data", "fsdp") by `place_batch`.

    Args:
      model: a `CausalLM` (with adapters for `trainable="lora"`). Its trainable arrays are copied
        into the state by `init`; the model object itself is not modified by training. The
        trainer keeps a snapshot of the model's variables as they are now (sharing their
        arrays): updating the model afterwards (`nnx.update`) changes neither its training nor
        its frozen base, with a mesh or without.
      cfg: the train config.
      mesh: optional `jax.sharding.Mesh` from `taskpgm_jax.sharding.make_mesh`.
      rules: logical -> mesh rules (default `DEFAULT_RULES`).
      loss_fn: `(model, batch, rng) -> (loss sum, tokens)`; default `target_token_loss`. `rng`
        is new for every step and micro-batch; RNG streams the model holds itself (`nnx.Rngs`,
        e.g. in an `nnx.Dropout(rate, rngs=rngs)`) are refolded from it likewise, so their
        dropout masks also change every step and follow from the seed on resume.

    Example:
      >>> trainer = Trainer(model, TrainConfig(learning_rate=1e-3, total_steps=100))
      >>> state = trainer.init(seed=0)
      >>> state, metrics = trainer.step(state, trainer.place_batch(batch))
    """

    def __init__(self, model: ModelT, cfg: TrainConfig, *, mesh: Mesh | None = None,
                 rules: Rules | None = None, loss_fn: LossFn | None = None):
        if not isinstance(model, nnx.Module):
            # An nnx.State (e.g. nnx.state(model)) would split into nothing callable and fail only
            # inside the first step.
            raise ValueError(f"model must be an nnx.Module (e.g. a CausalLM), got "
                             f"{type(model).__name__}; to train a State, nnx.update a model with "
                             "it first")
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        wrt = LoRAParam if cfg.trainable == "lora" else nnx.Param
        self.graphdef: nnx.GraphDef[ModelT]
        # nnx.split gives one State per filter; its annotation cannot count them (ignore below).
        self.graphdef, params, frozen = nnx.split(model, wrt, ...)  # type: ignore[misc]
        if not jax.tree.leaves(params):
            hint = " (call add_lora first)" if wrt is LoRAParam else ""
            raise ValueError(f"TrainConfig.trainable={cfg.trainable!r} but the model has no "
                             f"{wrt.__name__} variables{hint}")
        _check_master_dtype(params)
        # For the id checks of host batches (under jit ids cannot be checked).
        self._vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        self.cfg, self.mesh, self.rules = cfg, mesh, rules
        if loss_fn is not None and not callable(loss_fn):
            # Else a TypeError from inside the first jitted step.
            raise ValueError(f"loss_fn must be a callable (model, batch, rng) -> (loss sum, token "
                             f"count) or None, got {type(loss_fn).__name__}")
        if loss_fn is not None and cfg.loss_chunk is not None:
            raise ValueError("TrainConfig.loss_chunk chunks the default loss only; with a custom "
                             "loss_fn drop loss_chunk (or pass chunked_target_token_loss(n) as "
                             "loss_fn)")
        self.loss_fn = loss_fn or (target_token_loss if cfg.loss_chunk is None
                                   else chunked_target_token_loss(cfg.loss_chunk))
        self.tx = make_optimizer(cfg)
        # Fresh Variable objects around the same arrays: later in-place updates of `model`
        # (nnx.update) do not reach into this trainer.
        self._params = jax.tree.map(lambda x: x, params)
        self.frozen = self._place(frozen)
        if mesh is not None:
            # Checked now, not at init(): a mesh the rules do not fit (e.g. other axis names)
            # is refused before any work.
            if not isinstance(mesh, Mesh):
                raise ValueError(f"mesh must be a jax.sharding.Mesh (make_mesh) or None, got "
                                 f"{type(mesh).__name__}")
            Trainer._param_shardings(self)  # the model's own (not the stacked adapters)
        else:
            _check_no_mesh_needed((params, frozen), "the model's arrays")

    # -- shardings ---------------------------------------------------------------------------------

    def _default_sharding(self):
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(self.mesh, PartitionSpec())

    def _var_shardings(self, state: nnx.State):
        if self.mesh is None:
            return jax.tree.map(lambda _: self._default_sharding(), state,
                                is_leaf=lambda x: isinstance(x, nnx.Variable))
        return state_shardings(state, self.mesh, self.rules)

    def _place(self, state: nnx.State) -> nnx.State:
        """`state` laid out for this trainer, in fresh Variable objects with or without a mesh, so
        that a later `nnx.update(model, ...)` reaches into neither path. The arrays themselves
        are shared, not copied (immutable; `device_put` to the sharding they already have is a
        no-op), so a large frozen base is never duplicated on the device."""
        if self.mesh is None:
            return jax.tree.map(lambda x: x, state)
        return jax.device_put(state, self._var_shardings(state))

    def _param_shardings(self):
        return self._var_shardings(self._params)

    def _abstract_opt_state(self):
        return jax.eval_shape(self.tx.init, self._params)

    def _trainable(self) -> nnx.State:
        """The trainable variables the state starts from (their shapes define a checkpoint's)."""
        return self._params

    def state_shardings(self) -> TrainState:
        """The sharding of every leaf of the `TrainState` (optimiser moments follow their params;
        scalars and keys are replicated)."""
        param_sh = self._param_shardings()
        abstract_opt = self._abstract_opt_state()
        rep = self._default_sharding()
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, param_sh,
                                       transform_non_params=lambda _: rep,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable))
        return TrainState(rep, param_sh, opt_sh, rep, rep)

    def batch_sharding(self, shape: tuple[int, ...]) -> jax.sharding.Sharding:
        """Sharding of a [B, S] batch array: rows over the data axes of the mesh."""
        return self._rows_sharding(("batch", "seq"), shape, 0)

    def _rows_sharding(self, logical_axes: tuple[str, ...], shape: tuple[int, ...],
                       rows_dim: int) -> jax.sharding.Sharding:
        """`batch_rows_sharding`, once per batch shape: `place_batch` asks every step, and an
        indivisible batch warns once, not every step."""
        if self.mesh is None:
            return self._default_sharding()
        cache = self.__dict__.setdefault("_batch_shardings", {})
        key = (logical_axes, tuple(shape), rows_dim)
        if key not in cache:
            cache[key] = batch_rows_sharding(self.mesh, self.rules, logical_axes, tuple(shape),
                                             rows_dim)
        return cache[key]

    # -- state -------------------------------------------------------------------------------------

    def _init_fn(self, params, seed):
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params),
                          jax.random.PRNGKey(seed), jnp.full((), -1, jnp.int32))

    def init(self, seed: int = 0) -> TrainState:
        """A fresh `TrainState` (step 0, the model's current trainable values, key from `seed`).

        Args:
          seed: the run's seed (the key every step folds its step number into), in [0, 2**32).

        Returns:
          The state, laid out in `state_shardings()` (a copy: donating it never frees the model's
          own arrays).
        """
        seed = check_seed(seed)
        init = jax.jit(self._init_fn, out_shardings=self.state_shardings())
        return init(self._place(self._params), jnp.uint32(seed))

    def _abstract_shapes(self) -> TrainState:
        """The state's leaves as `jax.ShapeDtypeStruct`s, without shardings."""
        return jax.eval_shape(self._init_fn, self._trainable(), jnp.uint32(0))

    def abstract_state(self) -> TrainState:
        """`jax.ShapeDtypeStruct` leaves with shardings: the restore target of a checkpoint."""
        return attach_shardings(self._abstract_shapes(), self.state_shardings())

    def model(self, state: TrainState) -> ModelT:
        """The model with the state's trained values (shares arrays with the state: use it before
        the next `step`, which donates them, or copy it with `nnx.clone`)."""
        return nnx.merge(self.graphdef, state.params, self.frozen)

    # -- step --------------------------------------------------------------------------------------

    def place_batch(self, batch: Batch) -> Batch:
        """This host's rows of the batch -> global arrays split over the data axes.

        Args:
          batch: a `Batch` of NumPy [B_host, S] arrays (this process's rows of the global batch).

        Returns:
          The `Batch` as `jax.Array`s of shape [B_host * process_count, S].

        Raises:
          ValueError: fields of different shapes, a batch size that is not a multiple of
            `grad_accum`, ids outside the model's vocabulary, or `loss_mask` outside [0, 1].
        """
        if isinstance(batch, Batch):
            batch = Batch(*(np.asarray(x) for x in batch))  # host values, checked
        self._check_batch(batch, 0, values=True)
        shape = (batch.input_ids.shape[0] * jax.process_count(), batch.input_ids.shape[1])
        sharding = self.batch_sharding(shape)
        return Batch(*(jax.make_array_from_process_local_data(sharding, x) for x in batch))

    def _check_batch(self, batch, lead: int, *, values: bool) -> None:
        """Shapes always; values (ids, loss_mask) when `values` and the arrays are on the host
        (a placed batch's values would have to be fetched from the devices)."""
        if not isinstance(batch, Batch):
            raise ValueError(f"batch must be a taskpgm_jax.data.Batch, got {type(batch).__name__}")
        shape = np.shape(batch.input_ids)
        if len(shape) != 2 + lead:
            raise ValueError(f"batch.input_ids must have {2 + lead} dims, got shape {list(shape)}")
        for name, x in zip(Batch._fields, batch, strict=True):
            if np.shape(x) != shape:
                raise ValueError(f"batch.{name} must have the shape of batch.input_ids "
                                 f"{list(shape)}, got {list(np.shape(x))}")
        if shape[lead] % self.cfg.grad_accum:
            raise ValueError(f"batch size {shape[lead]} is not a multiple of "
                             f"TrainConfig.grad_accum={self.cfg.grad_accum}")
        if values and not any(isinstance(x, jax.Array) for x in batch):
            check_batch_values(batch, self._vocab_size)

    @property
    def traces(self) -> int:
        """How often this trainer's step function was traced (tests guard against recompiles)."""
        return self._compiled().traces

    def _cache_key(self):
        shapes = tuple((jax.tree_util.keystr(p), x.shape, str(x.dtype))
                       for p, x in jax.tree_util.tree_leaves_with_path(self._params))
        return ("single", self.graphdef, shapes, self.cfg, self.loss_fn, self.mesh, self.rules)

    def _compiled(self) -> _CompiledStep:
        # Looked up once per trainer: the key walks every parameter's path (0.5 ms a step on an
        # 8-layer toy model, 5% of its step), and nothing in it changes after __init__.
        step = self.__dict__.get("_step_fn")
        if step is None:
            step = self._step_fn = self._shared_step(self._cache_key())
        return step

    def _shared_step(self, key) -> _CompiledStep:
        if key not in _STEP_CACHE:
            update = functools.partial(train_update, self.graphdef, make_optimizer(self.cfg),
                                       self.cfg, self.loss_fn)
            out = None if self.mesh is None else (self.state_shardings(), None)
            _STEP_CACHE[key] = _CompiledStep(update, out, self._abstract_shapes())
        return _STEP_CACHE[key]

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One jitted step; `state` is donated (do not use it afterwards).

        Args:
          state: the current state.
          batch: a placed batch (`place_batch`, which checks its values), or NumPy arrays on a
            single device (checked here).

        Returns:
          (new state, metrics dict of device scalars; fetch them only when logging).
        """
        self._check_batch(batch, 0, values=True)
        check_state_type(state)
        return self._compiled()(state, self.frozen, batch, self.mesh)
