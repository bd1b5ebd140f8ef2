"""All-pairs JSD on a truncated vocabulary, with certified lower and upper bounds.

For very large V, keep at each position only the union K_n of the T models' top-k tokens and merge
every other token into one tail bucket. With f(p, q) = 1/2 p log(2p/(p+q)) + 1/2 q log(2q/(p+q))
(so JSD = sum_v f(P_v, Q_v)), and tail masses t_P = sum_{v not in K_n} P_v:

  lower = sum_{v in K_n} f(P_v, Q_v) + f(t_P, t_Q)           (merging outcomes never raises JSD:
                                                            f is convex and 1-homogeneous)
  upper = sum_{v in K_n} f(P_v, Q_v) + ln 2 * (t_P + t_Q) / 2  (f(p, q) <= ln 2 * (p + q) / 2)

Both are averaged over positions with the same weights as `pairwise_jsd` and widened by its
float32 accuracy (`ROUNDING_ALLOWANCE`, 1e-6 nats), so lower <= D <= upper holds for the exact
matrix. The gap is at most ln 2 * (tail_i + tail_j) / 2 with
tail_i model i's mean tail mass: the bounds are tight when the union of top-k tokens carries
nearly all of every model's mass (peaked next-token distributions, as from fine-tuned LMs), and
loose for flat distributions. The cost is one pass over [T, N, V] (top-k and tail masses) plus the
pair kernel over [T, N, T*k + 1] instead of [T, N, V].
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple, Sequence, TypedDict, Unpack

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.typing import ArrayLike

from taskpgm_jax.divergence._kernel import LN2
from taskpgm_jax.divergence._validate import (check_distribution, check_models_and_positions,
                                              check_positive_int, check_weights)
from taskpgm_jax.divergence.pairwise import pairwise_jsd, pairwise_jsd_unchecked

# The absolute float32 accuracy of `pairwise_jsd` (the tests hold it to this against scipy in
# float64); both bounds are widened by it.
ROUNDING_ALLOWANCE = 1e-6

# The kernel options `pairwise_jsd` takes (its keyword-only arguments but `from_logits`, which
# is this function's own): read from its signature so the two cannot drift apart.
_KERNEL_OPTIONS = tuple(
    name for name, p in inspect.signature(pairwise_jsd).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "from_logits")


class _KernelOptions(TypedDict, total=False):
    """The `**kernel_options` of `truncated_pairwise_jsd`, as typed in `pairwise_jsd`."""

    pair_block: int | None
    position_block: int | None
    vocab_chunk: int | None
    mesh: Mesh | None


class TruncatedJSD(NamedTuple):
    """Result of `truncated_pairwise_jsd`.

    lower:      [T, T] float32 certified lower bound on the weighted mean JSD (JSD of the
                merged distributions, less 1e-6 for float32 rounding, floored at 0); zero
                diagonal.
    upper:      [T, T] float32 certified upper bound; zero diagonal; lower <= upper <= ln 2.
    tail_mass:  [T] float32 weighted mean over positions of each model's probability outside
                the kept tokens (the bound gap is <= ln 2 * (tail_i + tail_j) / 2).
    kept_tokens: number of candidate kept tokens per position (T * top_k, duplicates masked).
    """

    lower: jax.Array
    upper: jax.Array
    tail_mass: jax.Array
    kept_tokens: int


@functools.partial(jax.jit, static_argnames=("top_k", "from_logits"))
def _truncate(logprobs, *, top_k: int, from_logits: bool):
    lp = logprobs.astype(jnp.float32)
    if from_logits:
        lp = jax.nn.log_softmax(lp, axis=-1)
    t, n, v = lp.shape
    _, top = jax.lax.top_k(lp, top_k)  # [T, N, k]
    cand = jnp.sort(jnp.transpose(top, (1, 0, 2)).reshape(n, t * top_k), axis=-1)  # [N, U]
    dup = jnp.concatenate([jnp.zeros((n, 1), bool), cand[:, 1:] == cand[:, :-1]], axis=-1)
    kept = jnp.take_along_axis(lp, jnp.broadcast_to(cand[None], (t, n, t * top_k)), axis=-1)
    kept = jnp.where(dup[None], -jnp.inf, kept)
    in_union = jnp.zeros((n, v), bool).at[jnp.arange(n)[:, None], cand].set(True)
    # The tail's log-mass from the tail entries themselves: 1 - sum(kept) would cancel.
    tail = jax.nn.logsumexp(jnp.where(in_union[None], -jnp.inf, lp), axis=-1)  # [T, N]
    return kept, tail


def truncated_pairwise_jsd(logprobs: ArrayLike | Sequence[Any],
                           weights: ArrayLike | Sequence[float] | None = None, *,
                           top_k: int = 64, from_logits: bool = False,
                           **kernel_options: Unpack[_KernelOptions]) -> TruncatedJSD:
    """Bounds on `pairwise_jsd` computed on the union of the models' top-k tokens per position.

    Args:
      logprobs: [T, N, V] log-probabilities (logits with `from_logits=True`).
      weights: [N] non-negative position weights, not all zero; default uniform.
      top_k: tokens kept per model and position (the union over models is kept).
      from_logits: normalise rows first.
      **kernel_options: `pair_block`, `position_block`, `vocab_chunk`, `mesh`, passed on to
        `pairwise_jsd` for the reduced problem.

    Returns:
      A `TruncatedJSD` with lower and upper bound matrices and the tail masses.
    """
    unknown = [name for name in kernel_options if name not in _KERNEL_OPTIONS]
    if unknown:
        raise ValueError(f"kernel_options: unknown option {unknown[0]!r}; expected "
                         f"{', '.join(_KERNEL_OPTIONS)}.")
    logprobs = check_distribution(logprobs, "logprobs", rank=3, from_logits=from_logits)
    check_models_and_positions(logprobs, "logprobs")
    top_k = check_positive_int(top_k, "top_k")
    if top_k > logprobs.shape[-1]:
        raise ValueError(f"top_k: {top_k} exceeds the vocabulary size {logprobs.shape[-1]}.")
    w = jnp.ones(logprobs.shape[1], jnp.float32) if weights is None else jnp.asarray(
        check_weights(weights, "weights", logprobs.shape[1], rescale=True))
    kept, tail = _truncate(jnp.asarray(logprobs), top_k=top_k, from_logits=from_logits)
    tail = tail[..., None]  # [T, N, 1]
    # The kept part and the tail term each sum f over their own outcomes; their sum is the JSD
    # of the merged distributions (the lower bound).
    # Both are sub-distributions (they do not sum to 1 alone), so the normalisation check of the
    # public entry point does not apply; the input itself was checked above.
    kept_part = pairwise_jsd_unchecked(kept, w, **kernel_options)
    tail_term = pairwise_jsd_unchecked(tail, w, **kernel_options)
    tail_mass = jnp.matmul(jnp.exp(tail[..., 0]), w,  # full float32: it widens a certified bound
                           precision=jax.lax.Precision.HIGHEST) / jnp.sum(w)
    off_diagonal = 1.0 - jnp.eye(kept_part.shape[0], dtype=kept_part.dtype)
    # Widened by the kernel's float32 accuracy, so they bound the exact value, not just the
    # exact value of these float32 sums (with no tail they would tie and round either way).
    lower = jnp.maximum(kept_part + tail_term - ROUNDING_ALLOWANCE, 0.0)
    upper = kept_part + 0.5 * LN2 * (tail_mass[:, None] + tail_mass[None, :])
    upper = jnp.minimum(upper + ROUNDING_ALLOWANCE, LN2) * off_diagonal
    return TruncatedJSD(lower, upper, tail_mass, logprobs.shape[0] * top_k)
