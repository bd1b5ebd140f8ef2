"""All-pairs JSD accumulated over evaluation batches, so a probe loop never stores all logits.

    acc = StreamingJSD(num_models=T)
    state = acc.init()
    for logprobs, weights in batches:          # [T, B, V], [B]
        state = acc.update(state, logprobs, weights)
    D = acc.result(state)                      # [T, T] weighted mean JSD, zero diagonal

`update` validates at the Python boundary, then runs one jitted kernel (the blocked pair kernel of
`_kernel.py`, vectorised over task pairs and the batch). Batches of the same shape reuse one
compiled program. With a `mesh`, the positions are split over all of its devices (each
evaluates every pair on its share; the partial sums are added).
"""

from __future__ import annotations

import dataclasses
import math
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from taskpgm_jax.divergence import _kernel
from taskpgm_jax.divergence._validate import (as_array, check_distribution, check_positive_int,
                                              check_weights, is_traced)

# Tile sizes per platform. CPU: 4 positions x 4096 tokens was fastest on a 2-core EPYC in a
# sweep of 1-8 positions x 1024-4096 tokens (benchmarks/divergence.py). Accelerators: 32 x 4096
# was fastest on an H200 in a sweep of {8, 32, 128} x {4096, 32000} at T x N x V = 32 x 1024 x
# 32000 (benchmarks/divergence_tiles.py: 1.70x the log ceiling, against 2.18x at 8 x 4096); one
# tile then holds 2 x 32 x 4096 float32 per (padded) model, 1 MiB: 64 MiB at T = 64.
_DEFAULT_TILES = {
    "cpu": dict(pair_block=1 << 16, position_block=4, vocab_chunk=4096),
    "accelerator": dict(pair_block=1 << 16, position_block=32, vocab_chunk=4096),
}


def default_tiles(mesh: Mesh | None = None) -> dict:
    """The default `pair_block`, `position_block` and `vocab_chunk` for the devices in use."""
    platform = (mesh.devices.flat[0].platform if mesh is not None
                else jax.default_backend())
    return dict(_DEFAULT_TILES["cpu" if platform == "cpu" else "accelerator"])


class JSDState(NamedTuple):
    """Running sums of the streaming JSD accumulator (Kahan-compensated, so thousands of batches
    lose no float32 digits). K = scheduled pairs, G = groups (1 unless `num_groups` is set).

    pair_sums:    [K, G] float32, sum over seen positions of group g of w_n * JSD_n.
    pair_carry:   [K, G] float32, Kahan compensation of `pair_sums`.
    weight:       [G] float32, sum of seen position weights per group.
    weight_carry: [G] float32, Kahan compensation of `weight`.
    """

    pair_sums: jax.Array
    pair_carry: jax.Array
    weight: jax.Array
    weight_carry: jax.Array


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    """Everything static about one accumulator: hashable, so it is a static jit argument."""

    num_models: int
    pair_block: int
    position_block: int
    vocab_chunk: int
    from_logits: bool
    mesh: Mesh | None
    num_groups: int = 1

    @functools.cached_property
    def schedule(self) -> _kernel.PairSchedule:
        return _kernel.PairSchedule(self.num_models, self.pair_block)


def _pair_sums(logprobs, weights, config: _KernelConfig):
    offset = None
    if config.from_logits:  # [2, T, N]: the row max and the log-sum after it (see the kernel)
        x = logprobs.astype(jnp.float32)
        row_max = jnp.max(x, axis=-1)  # finite: a row of -inf only is refused before this
        offset = jnp.stack([row_max, jnp.log(jnp.sum(jnp.exp(x - row_max[..., None]), -1))])
    kernel = functools.partial(_kernel.pair_weighted_sums, schedule=config.schedule,
                               position_block=config.position_block,
                               vocab_chunk=config.vocab_chunk)
    if config.mesh is None:
        return kernel(logprobs, weights, offset)
    # Positions are split over every device of the mesh; each device evaluates all pair blocks
    # on its share and the partial sums are added. Each device holds 1/D of the input, as a
    # data-parallel probe batch already is, instead of a replica of all of it.
    axes = tuple(config.mesh.axis_names)
    devices = config.mesh.size
    n = logprobs.shape[1]
    pad = -n % devices
    if pad:  # padding positions carry weight 0 and a valid (uniform) distribution
        # One pad with the uniform log-prob as its constant: a zero pad followed by
        # `.at[:, n:].set(...)` came out of the SPMD partitioner (jax 0.10) with the last
        # local position of every device but the last zeroed, i.e. P = 1 on every token.
        fill = 0.0 if offset is not None else -math.log(logprobs.shape[2])
        logprobs = jnp.pad(logprobs, ((0, 0), (0, pad), (0, 0)), constant_values=fill)
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        if offset is not None:  # zero logits minus (0, log V): uniform rows there too
            offset = jnp.concatenate([
                jnp.pad(offset[:1], ((0, 0), (0, 0), (0, pad))),
                jnp.pad(offset[1:], ((0, 0), (0, 0), (0, pad)),
                        constant_values=math.log(logprobs.shape[2]))])
    by_position = PartitionSpec(None, axes)

    def local(lp, w, off):
        return jax.lax.psum(kernel(lp, w, off), axes)

    sharded = jax.shard_map(
        local, mesh=config.mesh,
        in_specs=(by_position, PartitionSpec(axes),
                  None if offset is None else PartitionSpec(None, None, axes)),
        out_specs=PartitionSpec(),
        # The kernel's scan carries start as unvarying zeros and become per-device values
        # before the psum; the varying-axes check would reject that carry for no benefit.
        check_vma=False)
    return sharded(logprobs, weights, offset)


def _update_impl(state: JSDState, logprobs, weights, groups, *,
                 config: _KernelConfig) -> JSDState:
    # One weight column per group (group -1 matches none: the position is ignored).
    in_group = groups[:, None] == jnp.arange(config.num_groups)[None, :]
    weights = jnp.where(in_group, weights.astype(jnp.float32)[:, None], 0.0)  # [B, G]
    sums = _pair_sums(logprobs, weights, config)
    pair_sums, pair_carry = _kernel.kahan_add(state.pair_sums, state.pair_carry, sums)
    weight, weight_carry = _kernel.kahan_add(state.weight, state.weight_carry,
                                             jnp.sum(weights, axis=0))
    return JSDState(pair_sums, pair_carry, weight, weight_carry)


# Module level so every accumulator with the same static config shares one compiled program.
_update_jit = jax.jit(_update_impl, static_argnames="config")


@functools.partial(jax.jit, static_argnames="config")
def _result_impl(state: JSDState, *, config: _KernelConfig):
    seen = state.weight > 0
    per_group = state.pair_sums / jnp.where(seen, state.weight, 1.0)  # [K, G]
    # Every group that was seen counts equally (with one group: the plain weighted mean).
    mean = jnp.sum(jnp.where(seen, per_group, 0.0), axis=1) / jnp.maximum(jnp.sum(seen), 1)
    # A weighted mean of values in [0, ln 2] lies there too; only float32 rounding can leave it.
    mean = jnp.clip(mean, 0.0, _kernel.LN2)
    return _kernel.scatter_symmetric(mean, config.schedule)


class StreamingJSD:
    """Accumulates the [T, T] weighted mean JSD between T models over batches of probe positions.

    Args:
      num_models: T, the number of models (tasks) compared.
      from_logits: batches are logits; each row is normalised (in float32) inside the kernel.
      pair_block: pairs evaluated together in one fused step.
      position_block, vocab_chunk: the tile of positions x tokens read per step (all T models);
        one tile of the input plus one pair block's partial sums is all the kernel holds.
        `None` takes `default_tiles(mesh)` for the platform.
      mesh: a `jax.sharding.Mesh`; positions are split over all of its devices.
      num_groups: G. With groups (e.g. the task each probe position comes from), `update` takes
        a group id per position, each group's weighted mean is kept apart, and `result` averages
        the groups with equal weight: the DESIGN.md default, where every task's probe examples
        carry the same total weight, in one streaming pass without knowing the totals upfront.

    `init`, `update` and `result` are pure: the state is a small pytree (`JSDState`) that can be
    carried through a caller's own `jax.jit` or `lax.scan` (value checks are skipped on tracers).
    """

    def __init__(self, num_models: int, *, from_logits: bool = False,
                 pair_block: int | None = None, position_block: int | None = None,
                 vocab_chunk: int | None = None, mesh: Mesh | None = None,
                 num_groups: int | None = None):
        num_models = check_positive_int(num_models, "num_models")
        self.grouped = num_groups is not None
        num_groups = check_positive_int(num_groups, "num_groups") if self.grouped else 1
        if mesh is not None and not isinstance(mesh, Mesh):
            raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}.")
        tiles = default_tiles(mesh)
        given = dict(pair_block=pair_block, position_block=position_block,
                     vocab_chunk=vocab_chunk)
        for name, value in given.items():
            if value is not None:
                tiles[name] = check_positive_int(value, name)
        self.config = _KernelConfig(num_models=num_models, from_logits=bool(from_logits),
                                    mesh=mesh, num_groups=num_groups, **tiles)

    @property
    def num_models(self) -> int:
        return self.config.num_models

    def init(self) -> JSDState:
        k, g = self.config.schedule.num_outputs, self.config.num_groups
        sums = jnp.zeros((k, g), jnp.float32)
        weight = jnp.zeros((g,), jnp.float32)
        state = JSDState(sums, sums, weight, weight)
        if self.config.mesh is not None:
            # Replicated over the mesh, as `update` returns it: the first and later updates
            # then see the same input shardings and share one compiled program.
            state = jax.device_put(state, NamedSharding(self.config.mesh, PartitionSpec()))
        return state

    def update(self, state: JSDState, logprobs, weights=None, groups=None) -> JSDState:
        """Add one batch.

        Args:
          state: from `init` or a previous `update`.
          logprobs: [T, B, V] log-probabilities (logits if `from_logits`) of the T models at
            the same B probe positions; any float dtype, computed in float32.
          weights: [B] non-negative position weights (0 for padding); default all ones. A
            batch that is entirely padding (all zeros) is allowed and changes nothing.
          groups: [B] int group of each position in [0, num_groups), -1 to ignore a position;
            required exactly when the accumulator was built with `num_groups`.

        Returns:
          The new state.
        """
        logprobs = check_distribution(logprobs, "logprobs", rank=3,
                                      from_logits=self.config.from_logits)
        if logprobs.shape[0] != self.num_models:
            raise ValueError(f"logprobs: axis 0 has {logprobs.shape[0]} models, the "
                             f"accumulator was built for num_models={self.num_models}.")
        batch = logprobs.shape[1]
        if batch == 0:
            raise ValueError("logprobs: the batch (positions) axis is empty.")
        if weights is None:
            weights = jnp.ones((batch,), jnp.float32)
        weights = check_weights(weights, "weights", batch, allow_all_zero=True)
        groups = self._check_groups(groups, batch)
        self._check_state(state)
        return _update_jit(state, jnp.asarray(logprobs), jnp.asarray(weights), groups,
                           config=self.config)

    def _check_state(self, state) -> None:
        shape = (self.config.schedule.num_outputs, self.config.num_groups)
        if not isinstance(state, JSDState) or (not is_traced(state.pair_sums) and (
                state.pair_sums.shape != shape or state.weight.shape != shape[1:])):
            raise ValueError("state: expected the JSDState returned by this accumulator's "
                             "init() or update().")

    def _check_groups(self, groups, batch: int):
        if not self.grouped:
            if groups is not None:
                raise ValueError("groups: given, but the accumulator has no groups; build it "
                                 "with StreamingJSD(..., num_groups=G).")
            return jnp.zeros((batch,), jnp.int32)
        if groups is None:
            raise ValueError(f"groups: required (a group id per position) since the "
                             f"accumulator was built with num_groups={self.config.num_groups}.")
        # Checked before jnp.asarray, which would wrap int64 ids past 2**31 (x64 off).
        groups = as_array(groups, "groups", f"integer group ids [{batch}]",
                          "; map group names to their indices first")
        if groups.shape != (batch,) or not jnp.issubdtype(groups.dtype, jnp.integer):
            raise ValueError(f"groups: expected integer shape ({batch},), got "
                             f"{tuple(groups.shape)} {groups.dtype}.")
        if not is_traced(groups):
            g = np.asarray(groups)
            if np.any(g < -1) or np.any(g >= self.config.num_groups):
                raise ValueError(f"groups: ids must lie in [0, {self.config.num_groups}) or be "
                                 f"-1 (ignored); got range [{g.min()}, {g.max()}].")
        return jnp.asarray(groups).astype(jnp.int32)

    def result(self, state: JSDState):
        """[T, T] float32 symmetric matrix of weighted mean JSD (nats), zero diagonal.

        Raises ValueError when no position with positive weight has been seen, or when the
        accumulated weights overflowed float32 (checked only outside a jit).
        """
        self._check_state(state)
        if not is_traced(state.weight):
            total = float(jnp.sum(state.weight))
            # Each batch's weights are checked, but their running sum can still overflow; the
            # compensated sum then holds inf - inf = NaN, which would read as "never seen".
            if not (np.isfinite(total) and bool(jnp.all(jnp.isfinite(state.pair_sums)))):
                raise ValueError("state: the accumulated weights or sums overflowed float32; "
                                 "rescale the weights passed to update() (only their ratios "
                                 "matter) so that their total over all batches stays below "
                                 "~3e38.")
            if total <= 0:
                raise ValueError("state: no position with positive weight has been "
                                 "accumulated; call update() with at least one weighted "
                                 "position first.")
        return _result_impl(state, config=self.config)


def task_balanced_weights(task_ids: ArrayLike | Sequence[int],
                          num_tasks: int | None = None) -> jax.Array:
    """Position weights that give each task's probe positions equal total weight (DESIGN.md 4),
    so large tasks do not dominate the mean. Padding positions carry task id -1 and weight 0.

    Args:
      task_ids: [N] integer task index of each probe position (-1 for padding).
      num_tasks: number of tasks (default: max id + 1).

    Returns:
      [N] float32 weights summing to 1 (each present task's positions sum to 1 / tasks present).
    """
    if is_traced(task_ids):  # np.asarray would raise JAX's TracerArrayConversionError
        raise ValueError("task_ids: needs concrete values (the weights count each task's "
                         "positions on the host), got a traced array inside jit, vmap or grad; "
                         "compute the weights outside, or stream with StreamingJSD(T, "
                         "num_groups=K) and pass the ids as `groups` to update().")
    ids = np.asarray(task_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"task_ids: expected a 1-D integer array, got shape {ids.shape} "
                         f"dtype {ids.dtype}.")
    if np.any(ids < -1):
        raise ValueError("task_ids: ids must be >= 0 (or -1 for padding).")
    valid = ids >= 0
    if not np.any(valid):
        raise ValueError("task_ids: every position is padding (-1); nothing to weight.")
    num_tasks = (int(ids.max()) + 1 if num_tasks is None
                 else check_positive_int(num_tasks, "num_tasks"))
    if ids.max() >= num_tasks:
        raise ValueError(f"task_ids: id {ids.max()} is out of range for num_tasks={num_tasks}.")
    counts = np.bincount(ids[valid], minlength=num_tasks)
    present = np.count_nonzero(counts)
    w = np.zeros(ids.shape, np.float64)
    w[valid] = 1.0 / (present * counts[ids[valid]])
    return jnp.asarray(w, jnp.float32)
