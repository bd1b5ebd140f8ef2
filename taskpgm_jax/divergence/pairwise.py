"""`pairwise_jsd`: the [T, T] matrix of weighted mean JSD between T models on the same positions."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.typing import ArrayLike

from taskpgm_jax.divergence import streaming
from taskpgm_jax.divergence._validate import (check_distribution, check_models_and_positions,
                                              check_weights)
from taskpgm_jax.divergence.streaming import StreamingJSD


def pairwise_jsd(logprobs: ArrayLike | Sequence[Any],
                 weights: ArrayLike | Sequence[float] | None = None, *,
                 from_logits: bool = False, pair_block: int | None = None,
                 position_block: int | None = None, vocab_chunk: int | None = None,
                 mesh: Mesh | None = None) -> jax.Array:
    """Weighted mean JSD between every pair of T models over N shared positions.

    D[i, j] = sum_n w_n JSD(P_i(.|n), P_j(.|n)) / sum_n w_n. Each unordered pair is evaluated
    once (upper triangle) with one log per element per pair; the work is tiled so that no more
    than one block of pairs x positions x vocabulary is live at a time.

    Args:
      logprobs: [T, N, V] log-probabilities (logits with `from_logits=True`), any float dtype,
        computed in float32.
      weights: [N] non-negative position weights, not all zero; default uniform. See
        `task_balanced_weights` for the DESIGN.md default over a multi-task probe set.
      from_logits: normalise each row (float32 logsumexp) inside the kernel.
      pair_block: pairs evaluated together in one fused step.
      position_block, vocab_chunk: tile of positions x tokens (all T models) per step.
        Tile options left as `None` take `default_tiles(mesh)` for the platform.
      mesh: split the positions over all devices of this `jax.sharding.Mesh`; each device
        evaluates every pair on its share and the partial sums are added.

    Returns:
      [T, T] float32 symmetric, zero diagonal, entries in [0, ln 2] nats.

    Example:
      >>> logprobs = jax.nn.log_softmax(jax.random.normal(key, (4, 128, 1000)), -1)
      >>> D = pairwise_jsd(logprobs)           # [4, 4]
    """
    logprobs = check_distribution(logprobs, "logprobs", rank=3, from_logits=from_logits)
    check_models_and_positions(logprobs, "logprobs")
    if weights is not None:
        weights = check_weights(weights, "weights", logprobs.shape[1], rescale=True)
    return pairwise_jsd_unchecked(logprobs, weights, from_logits=from_logits,
                                  pair_block=pair_block, position_block=position_block,
                                  vocab_chunk=vocab_chunk, mesh=mesh)


def pairwise_jsd_unchecked(logprobs, weights=None, *, from_logits: bool = False, **options):
    """`pairwise_jsd` without the value checks (for validated or sub-normalised inputs such as
    the truncated variant's kept tokens): one accumulator step on the whole input, so both entry
    points share one code path and one compiled program per shape."""
    acc = StreamingJSD(logprobs.shape[0], from_logits=from_logits, **options)
    if weights is None:
        weights = jnp.ones((logprobs.shape[1],), jnp.float32)
    groups = jnp.zeros((logprobs.shape[1],), jnp.int32)
    state = streaming._update_jit(acc.init(), jnp.asarray(logprobs), jnp.asarray(weights),
                                  groups, config=acc.config)
    return acc.result(state)
