"""Probe scoring: T single-task models on the shared probe batches, streamed once.

Each batch goes through one jitted step that runs every model (for LoRA: T adapters over one base
in a single multi-adapter forward, plus the base model itself), takes float32 log-probs, and feeds

* the cross-likelihood accumulator: per-example sums of target-token log-probs, L[i, j] = model
  i on task j's probe examples (and the base model's row, for the "utility" unary);
* the streaming JSD accumulator: the log-probs at every target position, grouped by task so
  each task's positions carry equal total weight (DESIGN.md 4).

Memory is bounded by one batch of logits, stored once (no normalised copy: see `token_logprobs`
and the JSD's `from_logits`); nothing but the accumulators' small states survives a step, and
nothing leaves the device until `result`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from taskpgm_jax.data import Batch, check_batch_values
from taskpgm_jax.data.tasks import check_int
from taskpgm_jax.divergence import (
    CrossLikelihood,
    CrossLikState,
    JSDState,
    StreamingJSD,
)
from taskpgm_jax.eval._multihost import differing_on_processes, local_pieces
from taskpgm_jax.models import multi_adapter_forward, stack_adapters, target_logprobs

Forward = Callable[[Any, Any], jax.Array]  # (params, batch) -> float32 logits [M, B, S, V]


def token_logprobs(logits: ArrayLike, targets: ArrayLike) -> jax.Array:
    """log p(targets[b, s] | prefix) from logits [..., B, S, V]: float32 [..., B, S]
    (`models.target_logprobs`: no normalised copy of the logits is stored)."""
    return target_logprobs(jnp.asarray(logits), jnp.asarray(targets))


def _vocab_size(model) -> int | None:
    """The vocabulary a model's ids must lie in, or None for a module without a config."""
    return getattr(getattr(model, "config", None), "vocab_size", None)


def segment_sums(values: ArrayLike, loss_mask: ArrayLike, segment_ids: ArrayLike,
                 max_segments: int) -> jax.Array:
    """Sum of `values * loss_mask` over each segment of each row.

    Args:
      values: [..., B, S] per-token values (e.g. target log-probs).
      loss_mask: [B, S] 1 on target tokens.
      segment_ids: [B, S] 0 on padding, 1..max_segments for the sequences packed in a row.
      max_segments: static upper bound on segments per row.

    Returns:
      [..., B, max_segments] sums (0 for segments that do not exist).
    """
    values, loss_mask, segment_ids = (jnp.asarray(x) for x in (values, loss_mask, segment_ids))
    onehot = (segment_ids[..., None] == jnp.arange(1, max_segments + 1)).astype(jnp.float32)
    # where, not multiply: a target under padding (HF's -100, say) gathers NaN, and 0 * NaN
    # is NaN.
    weighted = jnp.where(loss_mask > 0, values * loss_mask.astype(jnp.float32), 0.0)
    return jnp.einsum("...bs,bsm->...bm", weighted, onehot,
                      precision=jax.lax.Precision.HIGHEST)


class ProbeState(NamedTuple):
    """Accumulated probe statistics (small: [M, K] and [T, T]-sized sums)."""

    cross: CrossLikState
    base: CrossLikState | None
    jsd: JSDState


class ProbeResult(NamedTuple):
    """cross_likelihood: [T, K] L[i, j]; base_row: [K] the base model's L row (or None);
    jsd: [T, T] task-balanced mean JSD over target positions; examples: [K] examples seen."""

    cross_likelihood: jax.Array
    base_row: jax.Array | None
    jsd: jax.Array
    examples: jax.Array


class ProbeScorer:
    """Streams probe batches through M = T (+ 1 base) models and accumulates L and the JSD.

    Args:
      forward: `(params, batch) -> logits [M, B, S, V]`; see `adapter_probe_forward`. If it has
        a `model` attribute (a `CausalLM`, as `adapter_probe_forward` sets), every batch's
        `input_ids` and `targets` are checked against its vocabulary before the step.
      num_models: T, the single-task models (rows 0..T-1 of the forward's output).
      num_tasks: K, the tasks whose probe examples are scored (columns of L).
      max_segments: sequences per row at most (1 for padded batches, more for packed ones).
      include_base: the forward's last output (row T) is the base model; its row of L is kept.
        Must match the forward's own `include_base` attribute where it has one (as
        `adapter_probe_forward` sets).
      per_token: L from per-token means instead of per-example sums.
      **jsd_options: tile / mesh options for the `StreamingJSD` accumulator.

    Example:
      >>> forward, params = adapter_probe_forward(model, adapters)
      >>> scorer = ProbeScorer(forward, num_models=T, num_tasks=T)
      >>> state = scorer.init()
      >>> for batch, segment_tasks in probe_batches:
      ...     state = scorer.update(state, params, batch, segment_tasks)
      >>> L, base_row, D, _ = scorer.result(state)
    """

    def __init__(self, forward: Forward, num_models: int, num_tasks: int, *,
                 max_segments: int = 1, include_base: bool = True, per_token: bool = False,
                 **jsd_options):
        if not callable(forward):
            raise ValueError("forward: expected a callable (params, batch) -> logits.")
        max_segments = check_int(max_segments, "max_segments", 1)  # NumPy ints too
        built_with = getattr(forward, "include_base", None)  # set by adapter_probe_forward
        if built_with is not None and bool(built_with) != bool(include_base):
            # Otherwise the row count is off by one and the error comes from deep inside the
            # accumulators, without naming include_base.
            raise ValueError(f"include_base={bool(include_base)} but the forward was built with "
                             f"adapter_probe_forward(..., include_base={bool(built_with)}): pass "
                             "the same include_base to both")
        self.forward = forward
        self.num_models = num_models
        self.num_tasks = num_tasks
        self.max_segments = max_segments
        self.include_base = bool(include_base)
        self.cross = CrossLikelihood(num_models, num_tasks, per_token=per_token)
        self.base = CrossLikelihood(1, num_tasks, per_token=per_token) if include_base else None
        # from_logits: the kernel normalises the raw logits tile by tile, so no normalised copy
        # of the batch's [M, B, S, V] logits is ever stored (one batch of logits is the peak).
        # All M models, the base too, with its pairs dropped in `result`: slicing the T task
        # models out of the logits would store a copy of T / M of them (measured: +90% peak).
        self.jsd = StreamingJSD(num_models + self.include_base, num_groups=num_tasks,
                                from_logits=True, **jsd_options)
        self._step = jax.jit(self._step_impl)
        self._same_everywhere = jax.process_count() == 1  # checked on the first update

    def init(self) -> ProbeState:
        return ProbeState(self.cross.init(), self.base.init() if self.base else None,
                          self.jsd.init())

    def update(self, state: ProbeState, params, batch, segment_tasks) -> ProbeState:
        """Score one batch.

        Args:
          state: from `init` or a previous `update`.
          params: the forward's parameters (passed through to `forward`).
          batch: a `taskpgm_jax.data.Batch` (input_ids, targets, loss_mask, segment_ids,
            positions), all [B, S]. On several processes: the same host arrays on every
            process (JAX takes a host input to be identical everywhere), or global `jax.Array`s
            (`data.global_batch`) of which each process holds its own rows; each process then
            checks the rows it holds. The first update checks that host arrays are the same on
            every process (ValueError otherwise, on every process).
          segment_tasks: int [B, max_segments], the task of each packed sequence (-1 where a
            row has fewer sequences); host or global like `batch`.

        Raises:
          ValueError: ids outside the model's vocabulary (see `check_batch_values`), a
            `loss_mask` outside [0, 1], or bad `segment_tasks`.
        """
        # Global arrays (`data.global_batch` on several processes) are checked piece by piece:
        # each process the rows it holds (np.asarray of the whole would raise).
        vocab = _vocab_size(getattr(self.forward, "model", None))
        for ids, targets, mask, seg in local_pieces(
                [batch.input_ids, batch.targets, batch.loss_mask, batch.segment_ids]):
            check_batch_values(Batch(ids, targets, mask, seg, seg), vocab)  # positions unused
        segment_tasks = jnp.asarray(segment_tasks)
        b = batch.input_ids.shape[0]
        if segment_tasks.shape != (b, self.max_segments) or not jnp.issubdtype(
                segment_tasks.dtype, jnp.integer):
            raise ValueError(f"segment_tasks: expected integer shape ({b}, {self.max_segments}) "
                             f"(rows x max_segments), got {tuple(segment_tasks.shape)} "
                             f"{segment_tasks.dtype}.")
        tasks = np.concatenate([p[0].ravel() for p in local_pieces([segment_tasks])])
        if np.any(tasks < -1) or np.any(tasks >= self.num_tasks):
            raise ValueError(f"segment_tasks: task ids must lie in [0, {self.num_tasks}) or be -1 "
                             f"(no sequence); got range [{tasks.min()}, {tasks.max()}].")
        most = max(int(np.max(p[0], initial=0)) for p in local_pieces([batch.segment_ids]))
        if most > self.max_segments:
            raise ValueError(f"batch.segment_ids: a row holds {most} sequences, more than "
                             f"max_segments={self.max_segments}.")
        if not self._same_everywhere:
            # Once per scorer (a collective): host rows that differ between the processes.
            fields = {f"batch.{k}": getattr(batch, k) for k in Batch._fields}
            differ = differing_on_processes({**fields, "segment_tasks": segment_tasks})
            if differ:
                raise ValueError(
                    f"{', '.join(differ)}: the host arrays differ between the "
                    f"{jax.process_count()} processes, but a host array is taken to be the same "
                    f"on every process: each process's rows would be scored as the whole batch, "
                    f"and every process would get its own partial L and JSD. Pass the same host "
                    f"batch on every process, or each process's rows as global arrays: "
                    f"data.global_batch(batch, sharding) and jax.make_array_from_process_local_"
                    f"data(sharding, segment_tasks), e.g. with sharding = "
                    f"NamedSharding(mesh, PartitionSpec(('data', 'fsdp'))).")
            self._same_everywhere = True
        return self._step(state, params, batch, segment_tasks.astype(jnp.int32))

    def _step_impl(self, state: ProbeState, params, batch, segment_tasks) -> ProbeState:
        logits = self.forward(params, batch)  # [M, B, S, V]
        seg = jnp.asarray(batch.segment_ids)
        mask = jnp.asarray(batch.loss_mask, jnp.float32)
        token_lp = token_logprobs(logits, jnp.asarray(batch.targets))  # [M, B, S]
        sums = segment_sums(token_lp, mask, seg, self.max_segments)  # [M, B, G]
        counts = segment_sums(jnp.ones_like(mask), mask, seg, self.max_segments)  # [B, G]
        # A sequence without target tokens (or a missing one) is not an example.
        example_tasks = jnp.where(counts > 0, segment_tasks, -1).reshape(-1)
        m = sums.shape[0]
        flat = sums.reshape(m, -1)
        tokens = counts.reshape(-1) if self.cross.per_token else None
        t = self.num_models
        cross = self.cross.update(state.cross, flat[:t], example_tasks, tokens)
        base = (self.base.update(self._base_state(state), flat[t:t + 1], example_tasks, tokens)
                if self.base else None)
        # JSD over target positions only, grouped by the task of the position's sequence.
        pos_task = jnp.take_along_axis(segment_tasks, jnp.maximum(seg - 1, 0), axis=1)
        pos_task = jnp.where((seg > 0) & (mask > 0), pos_task, -1).reshape(-1)
        b, s = seg.shape
        jsd = self.jsd.update(state.jsd, logits.reshape(m, b * s, -1), mask.reshape(-1),
                              pos_task)
        return ProbeState(cross, base, jsd)

    @staticmethod
    def _base_state(state: ProbeState) -> CrossLikState:
        if state.base is None:
            raise ValueError("state: has no base-model statistics, but this scorer has "
                             "include_base=True; pass the state from this scorer's init() or "
                             "update().")
        return state.base

    def result(self, state: ProbeState) -> ProbeResult:
        """The cross-likelihood matrix, the base row, the JSD matrix and the examples per task."""
        base_row = self.base.result(self._base_state(state))[0] if self.base else None
        t = self.num_models
        jsd = self.jsd.result(state.jsd)[:t, :t]
        return ProbeResult(self.cross.result(state.cross), base_row, jsd, state.cross.counts)


def adapter_probe_forward(
        model: nnx.Module, adapters: nnx.State | list[nnx.State] | tuple[nnx.State, ...], *,
        include_base: bool = True, adapter_chunk: int | None = None,
) -> tuple[Forward, tuple[nnx.State, nnx.State]]:
    """A probe forward for T LoRA adapters over one base model (one multi-adapter call).

    Args:
      model: the base `CausalLM` with adapters added (`taskpgm_jax.models.add_lora`).
      adapters: `stack_adapters([...])` with leading axis T, or a list of adapter states.
      include_base: append the base model (all adapters zero) as output row T.
      adapter_chunk: run this many models per pass (bounds activation memory); None: all.

    Returns:
      (forward, params): `forward(params, batch)` gives logits [T (+1), B, S, V]; pass `params`
      to `ProbeScorer.update`, and the same `include_base` to `ProbeScorer` (recorded as
      `forward.include_base`, checked there).
    """
    rows: nnx.State = stack_adapters(adapters) if isinstance(adapters, (list, tuple)) else adapters
    if include_base:
        # The base model is the adapter whose B factors are zero (A x B = 0): append it as row T.
        zero = jax.tree.map(lambda x: jnp.zeros_like(x[:1]), rows)
        rows = jax.tree.map(lambda a, z: jnp.concatenate([a, z]), rows, zero)
    # The model's own adapter values are ignored: multi_adapter_forward substitutes `stacked`.
    graphdef, base_state = nnx.split(model)

    def forward(params, batch):
        state, stacked = params
        base_model = nnx.merge(graphdef, state)
        return multi_adapter_forward(base_model, stacked, jnp.asarray(batch.input_ids),
                                     segment_ids=jnp.asarray(batch.segment_ids),
                                     positions=jnp.asarray(batch.positions),
                                     adapter_chunk=adapter_chunk)

    # Function attributes (mypy does not model them: hence the ignores). The model's vocabulary
    # is for ProbeScorer.update's id check; ProbeScorer refuses an include_base mismatch by name.
    forward.model = model  # type: ignore[attr-defined]
    forward.include_base = bool(include_base)  # type: ignore[attr-defined]
    return forward, (base_state, rows)
