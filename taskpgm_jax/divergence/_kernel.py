"""The blocked all-pairs JSD kernel shared by `pairwise_jsd` and the streaming accumulator.

Layout of the work: the [T, N, V] log-probs are cut into tiles of all T models x `position_block`
positions x `vocab_chunk` tokens, read once each (the input is never copied, padded or
normalised as a whole). Against each tile, the pairs are evaluated a block at a time: the rows of
one pair block are gathered from the tile (at most pair_block x position_block x vocab_chunk
floats, the only sizeable temporary) and reduced over the vocabulary. The probabilities
P = exp(log P) are computed per tile (T exps against T(T-1)/2 pairs, so nearly free) and never
stored for the whole input, so peak memory is the input plus one block.

Per element and pair the kernel evaluates the KL form of DESIGN.md 4,
    1/2 P (log P - log M) + 1/2 Q (log Q - log M),   log M = log(P + Q) - ln 2,
with -inf (probability zero) handled without a `where` on the pair path, which would split the
fusion and cost 4x: P is set to exactly 0 below exp(-87) (so a non-zero P is a normal float32
and P + Q never underflows), log P is clamped to a finite value where P is 0 (the product is then
an exact 0), and log(P + Q) is taken of max(P + Q, tiny) (only changes P = Q = 0, where both
products are 0).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

LN2 = math.log(2.0)
# exp(x) is a normal float32 (>= 1.18e-38) for x > -87.3; below that P is treated as exactly 0.
# The mass dropped is < V * 1.7e-38, far below float32 resolution of any sum of probabilities.
_MIN_LOG = -87.0
_FLOOR_LOG = -100.0  # any finite value below _MIN_LOG: where P == 0 the product P * (...) is 0
_TINY = float(np.finfo(np.float32).tiny)


def probs_and_safe_logs(logp):
    """float32 (P, log P) with P flushed to 0 below exp(-87) and log P finite everywhere."""
    logp = logp.astype(jnp.float32)
    p = jnp.where(logp > _MIN_LOG, jnp.exp(logp), 0.0)
    return p, jnp.maximum(logp, _FLOOR_LOG)


def jsd_terms_sum(p, lp, q, lq, axis=-1):
    """sum over `axis` of 1/2 P (log P - log M) + 1/2 Q (log Q - log M); inputs from
    `probs_and_safe_logs`. No clamping: rounding can leave values ~1e-8 below 0."""
    lm = jnp.log(jnp.maximum(p + q, _TINY)) - LN2
    return 0.5 * jnp.sum(p * (lp - lm) + q * (lq - lm), axis=axis)


def upper_triangle_pairs(num_models: int, multiple: int):
    """Row and column indices of the T(T-1)/2 unordered pairs i < j, padded with (0, 0) to a
    multiple of `multiple`. Padded pairs compute JSD(P_0, P_0) and are sliced off by the caller."""
    i, j = np.triu_indices(num_models, k=1)
    num_pairs = len(i)
    padded = max(multiple, -(-num_pairs // multiple) * multiple)
    pad = padded - num_pairs
    return (np.pad(i, (0, pad)).astype(np.int32), np.pad(j, (0, pad)).astype(np.int32),
            num_pairs)


def pair_weighted_sums(logprobs, weights, pair_i, pair_j, row_offset=None, *,
                       position_block: int, vocab_chunk: int, pair_block: int):
    """sum_n weights[n] * JSD(P_i(.|n), P_j(.|n)) for each listed pair (i, j).

    Args:
      logprobs: [T, N, V] validated log-probs, any float dtype (computed in float32).
      weights: [N] float32 non-negative position weights.
      row_offset: optional [T, N] float32 subtracted from every row (the logsumexp of logits,
        so logits are normalised tile by tile without a normalised copy of the input).
      pair_i, pair_j: [K] int32 pair indices, K a multiple of `pair_block`.
      position_block, vocab_chunk, pair_block: tile sizes; clipped to N, V and K.

    Returns:
      [K] float32 weighted sums of per-position JSD (each position's JSD clamped to [0, ln 2],
      the range the true value lies in, which removes float32 rounding of order 1e-8).
    """
    t, n, v = logprobs.shape
    k = pair_i.shape[0]
    nb = min(position_block, n)
    vc = min(vocab_chunk, v)
    pb = min(pair_block, k)
    num_pos_blocks = -(-n // nb)
    num_vocab_chunks = -(-v // vc)
    pair_blocks = (pair_i.reshape(-1, pb), pair_j.reshape(-1, pb))

    def tile_terms(n0, c):
        # The last chunk is shifted back to fit (dynamic_slice clamps); entries that the previous
        # chunk already covered are masked to probability zero so none is counted twice.
        v0 = jnp.minimum(c * vc, v - vc)
        tile = jax.lax.dynamic_slice(logprobs, (0, n0, v0), (t, nb, vc)).astype(jnp.float32)
        if row_offset is not None:
            tile = tile - jax.lax.dynamic_slice(row_offset, (0, n0), (t, nb))[..., None]
        fresh = (v0 + jnp.arange(vc)) >= c * vc
        p, lp = probs_and_safe_logs(tile)
        p = jnp.where(fresh, p, 0.0)

        def one_block(ij):
            bi, bj = ij
            # mode="clip": indices are in range by construction; the default bounds handling
            # adds selects to the fused loop and costs ~30%.
            def rows(x, idx):
                return jnp.take(x, idx, axis=0, mode="clip")
            return jsd_terms_sum(rows(p, bi), rows(lp, bi), rows(p, bj), rows(lp, bj))  # [pb, nb]

        if pb == k:
            return one_block((pair_i, pair_j))
        return jax.lax.map(one_block, pair_blocks).reshape(k, nb)

    def position_step(total, b):
        n0 = jnp.minimum(b * nb, n - nb)
        w = jax.lax.dynamic_slice(weights, (n0,), (nb,))
        w = jnp.where((n0 + jnp.arange(nb)) >= b * nb, w, 0.0)

        def vocab_step(acc, c):
            return acc + tile_terms(n0, c), None

        per_pos, _ = jax.lax.scan(vocab_step, jnp.zeros((k, nb), jnp.float32),
                                  jnp.arange(num_vocab_chunks))
        per_pos = jnp.clip(per_pos, 0.0, LN2)
        # HIGHEST: on TPU/GPU a default-precision float32 dot may round through bf16.
        return total + jnp.dot(per_pos, w, precision=jax.lax.Precision.HIGHEST), None

    total, _ = jax.lax.scan(position_step, jnp.zeros((k,), jnp.float32),
                            jnp.arange(num_pos_blocks))
    return total


def scatter_symmetric(pair_sums, pair_i, pair_j, num_pairs: int, num_models: int):
    """[T, T] symmetric matrix from the upper-triangle pair values, zero diagonal."""
    vals = pair_sums[:num_pairs]
    i, j = pair_i[:num_pairs], pair_j[:num_pairs]
    out = jnp.zeros((num_models, num_models), vals.dtype)
    return out.at[i, j].set(vals).at[j, i].set(vals)


def kahan_add(total, carry, value):
    """Compensated (Kahan) summation step: returns the new (total, carry)."""
    y = value - carry
    t = total + y
    return t, (t - total) - y
