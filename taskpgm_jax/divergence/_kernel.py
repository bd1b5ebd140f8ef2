"""The blocked all-pairs JSD kernel shared by `pairwise_jsd` and the streaming accumulator.

Layout of the work: the [T, N, V] log-probs are cut into tiles of all T models x `position_block`
positions x `vocab_chunk` tokens, read once each (the input is never copied, padded or normalised
as a whole). Against each tile every pair is evaluated once, in the order of a `PairSchedule`:
recursive halving of the model axis turns the upper triangle into a few broadcast blocks
([groups, s, 1] rows against [groups, 1, s] rows), which XLA fuses with the reduction over the
vocabulary, so nothing of size pairs x tile is materialised (a gather of pair rows would be, and
cost ~1.5x). The probabilities P = exp(log P) are computed per tile (T exps against T(T-1)/2
pairs, so nearly free) and never stored for the whole input: peak memory is the input plus a few
tiles (the halves each step reads are copied out of the tile on CPU; the pairs of the small leaf
groups, at most `pair_block` per step, are gathered) and the [pairs, position_block] partial sums,
independent of the number of positions.

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
    """float32 (P, log 2P) with P flushed to 0 below exp(-87) and log 2P finite everywhere.

    log 2P = log P + ln 2 is taken once per model, so that the pair loop forms
    log P - log M = log 2P - log(P + Q) without subtracting ln 2 per pair and element."""
    logp = logp.astype(jnp.float32)
    p = jnp.where(logp > _MIN_LOG, jnp.exp(logp), 0.0)
    return p, jnp.maximum(logp, _FLOOR_LOG) + LN2


def jsd_terms_sum(p, l2p, q, l2q, axis=-1):
    """sum over `axis` of 1/2 P (log P - log M) + 1/2 Q (log Q - log M), as
    1/2 P (log 2P - log(P + Q)) + 1/2 Q (log 2Q - log(P + Q)); inputs from
    `probs_and_safe_logs`. No clamping: rounding can leave values ~1e-8 below 0."""
    ls = jnp.log(jnp.maximum(p + q, _TINY))
    return 0.5 * jnp.sum(p * (l2p - ls) + q * (l2q - ls), axis=axis)


def padded_model_count(num_models: int) -> int:
    """The smallest T' >= T of the form s * 2^m with s <= 16: the halving schedule below needs the
    model axis to split evenly m times; the dummy rows this adds (at most ~1/8 of T) carry
    probability zero and their pairs are dropped."""
    best: int | None = None
    for s in range(1, 17):
        m = 0
        while s * 2**m < num_models:
            m += 1
        if best is None or s * 2**m < best:
            best = s * 2**m
    assert best is not None  # set by the first of the 16 candidates
    return best


class PairSchedule:
    """The static order in which the kernel evaluates the pairs of T models, each exactly once.

    The (padded) models are halved recursively: at level L the rows fall into 2^L groups, each
    split into halves A and B, and every A row meets every B row of its group by broadcasting
    ([groups, a, 1, ...] against [groups, 1, s, ...]). Together the levels cover every pair
    whose models sit in different leaf groups; the pairs inside the leaf groups (odd size
    <= 15) are gathered. Broadcasts and static slices fuse into one loop with the reduction over
    the vocabulary; a gather is materialised first, which is why it is kept to the leaves. (A
    gather-free leaf, cyclic rolls of the group, was measured 1.5x slower at T = 12 and 15: on
    CPU each roll is copied out of the tile too, in more and smaller steps.)

    Each step evaluates at most `pair_block` pairs, or one unit if a unit is larger: one A row
    against its B half at a level, the pairs of one leaf group.

    Attributes:
      steps: tuple of (kind, level or None, first group, groups, first row, rows): one fused
        evaluation each; rows are the A rows of a level step (all of them unless a group's
        half x half pairs exceed `pair_block`), unused (0, 0) for leaf steps.
      pair_i, pair_j: [K] int32 model indices (pair_i < pair_j) of the kernel's outputs, in
        evaluation order.
      valid: [K] bool, False for pairs that involve a padding row.
    """

    def __init__(self, num_models: int, pair_block: int):
        t = padded_model_count(num_models)
        self.num_models, self.padded_models = num_models, t
        # Halve while the group size is even: t = leaf * 2^levels with leaf odd and <= 15.
        levels, leaf = 0, t
        while leaf % 2 == 0:
            levels, leaf = levels + 1, leaf // 2
        self.levels, self.leaf = levels, leaf
        steps: list[tuple[str, int | None, int, int, int, int]] = []
        pi, pj = [], []
        for level in range(levels):
            groups, half = 2**level, t // 2**(level + 1)
            if half * half <= pair_block:  # whole groups per step
                row_chunk, group_chunk = half, max(1, pair_block // (half * half))
            else:  # part of one group's A rows per step
                row_chunk, group_chunk = max(1, pair_block // half), 1
            for g0 in range(0, groups, group_chunk):
                g1 = min(groups, g0 + group_chunk)
                for a0 in range(0, half, row_chunk):
                    a1 = min(half, a0 + row_chunk)
                    steps.append(("level", level, g0, g1 - g0, a0, a1 - a0))
                    for g in range(g0, g1):
                        base = g * 2 * half
                        for a in range(a0, a1):
                            for b in range(half):
                                pi.append(base + a)
                                pj.append(base + half + b)
        leaf_i, leaf_j = np.triu_indices(leaf, k=1)
        if len(leaf_i):
            groups = t // leaf
            group_chunk = max(1, pair_block // len(leaf_i))
            for g0 in range(0, groups, group_chunk):
                g1 = min(groups, g0 + group_chunk)
                steps.append(("leaf", None, g0, g1 - g0, 0, 0))
                for g in range(g0, g1):
                    pi.extend(g * leaf + leaf_i)
                    pj.extend(g * leaf + leaf_j)
        self.steps = tuple(steps)
        self.pair_i = np.asarray(pi, np.int32)
        self.pair_j = np.asarray(pj, np.int32)
        self.valid = (self.pair_i < num_models) & (self.pair_j < num_models)
        self.leaf_pairs = (leaf_i.astype(np.int32), leaf_j.astype(np.int32))

    @property
    def num_outputs(self) -> int:
        return len(self.pair_i)


def _evaluate_schedule(p, lp, schedule: PairSchedule):
    """All scheduled pairs on one tile: p, lp [T', nb, vc] -> [K, nb] sums over the tile."""
    t, nb, vc = p.shape
    outs = []
    for kind, level, g0, gcount, a0, acount in schedule.steps:
        if kind == "level":
            assert level is not None  # a level step always carries its level
            groups, half = 2**level, t // 2**(level + 1)
            pr = p.reshape(groups, 2, half, nb, vc)[g0:g0 + gcount]
            lr = lp.reshape(groups, 2, half, nb, vc)[g0:g0 + gcount]
            out = jsd_terms_sum(pr[:, 0, a0:a0 + acount, None], lr[:, 0, a0:a0 + acount, None],
                                pr[:, 1, None, :], lr[:, 1, None, :])  # [gcount, acount, half, nb]
        else:
            leaf_i, leaf_j = schedule.leaf_pairs
            pr = p.reshape(t // schedule.leaf, schedule.leaf, nb, vc)[g0:g0 + gcount]
            lr = lp.reshape(t // schedule.leaf, schedule.leaf, nb, vc)[g0:g0 + gcount]
            out = jsd_terms_sum(pr[:, leaf_i], lr[:, leaf_i], pr[:, leaf_j], lr[:, leaf_j])
        outs.append(out.reshape(-1, nb))
    return jnp.concatenate(outs) if len(outs) > 1 else outs[0]


def pair_weighted_sums(logprobs, weights, row_offset=None, *, schedule: PairSchedule,
                       position_block: int, vocab_chunk: int):
    """sum_n weights[n, g] * JSD(P_i(.|n), P_j(.|n)) for every pair of the schedule and group g.

    Args:
      logprobs: [T, N, V] validated log-probs, any float dtype (computed in float32).
      weights: [N, G] float32 non-negative position weights, one column per group of positions
        (G = 1 for a plain weighted sum; one column per task for task-balanced means).
      row_offset: optional [2, T, N] float32 (m, s) with x - m - s the log-probs of logits x:
        m the row's max and s = log sum exp(x - m), so logits are normalised tile by tile
        without a normalised copy of the input. Two terms, subtracted in that order, because
        logsumexp(x) = m + s rounded at the magnitude of m would shift every log-prob of the
        row by up to half an ulp of m (5e-5 nats at logits of 1e5).
      schedule: the `PairSchedule` for T.
      position_block, vocab_chunk: tile sizes; clipped to N and V.

    Returns:
      [K, G] float32 weighted sums of per-position JSD in the schedule's pair order (each
      position's JSD clamped to [0, ln 2], the range the true value lies in, which removes
      float32 rounding of order 1e-8).
    """
    t, n, v = logprobs.shape
    k = schedule.num_outputs
    groups = weights.shape[1]
    if k == 0:  # a single model: no pairs
        return jnp.zeros((0, groups), jnp.float32)
    pad_models = schedule.padded_models - t
    nb = min(position_block, n)
    vc = min(vocab_chunk, v)
    num_pos_blocks = -(-n // nb)
    num_vocab_chunks = -(-v // vc)

    def tile_terms(n0, c):
        # The last chunk is shifted back to fit (dynamic_slice clamps); entries that the previous
        # chunk already covered are masked to probability zero so none is counted twice.
        v0 = jnp.minimum(c * vc, v - vc)
        tile = jax.lax.dynamic_slice(logprobs, (0, n0, v0), (t, nb, vc)).astype(jnp.float32)
        if row_offset is not None:
            off = jax.lax.dynamic_slice(row_offset, (0, 0, n0), (2, t, nb))[..., None]
            tile = (tile - off[0]) - off[1]
        fresh = (v0 + jnp.arange(vc)) >= c * vc
        p, lp = probs_and_safe_logs(tile)
        p = jnp.where(fresh, p, 0.0)
        if pad_models:  # rows of probability zero for the padding models
            p = jnp.concatenate([p, jnp.zeros((pad_models, nb, vc), p.dtype)])
            lp = jnp.concatenate([lp, jnp.full((pad_models, nb, vc), _FLOOR_LOG, lp.dtype)])
        return _evaluate_schedule(p, lp, schedule)

    def position_step(total, b):
        n0 = jnp.minimum(b * nb, n - nb)
        w = jax.lax.dynamic_slice(weights, (n0, 0), (nb, groups))
        w = jnp.where(((n0 + jnp.arange(nb)) >= b * nb)[:, None], w, 0.0)

        def vocab_step(acc, c):
            return acc + tile_terms(n0, c), None

        per_pos, _ = jax.lax.scan(vocab_step, jnp.zeros((k, nb), jnp.float32),
                                  jnp.arange(num_vocab_chunks))
        per_pos = jnp.clip(per_pos, 0.0, LN2)
        # HIGHEST: on TPU/GPU a default-precision float32 dot may round through bf16.
        return total + jnp.dot(per_pos, w, precision=jax.lax.Precision.HIGHEST), None

    total, _ = jax.lax.scan(position_step, jnp.zeros((k, groups), jnp.float32),
                            jnp.arange(num_pos_blocks))
    return total


def scatter_symmetric(pair_values, schedule: PairSchedule):
    """[T, T] symmetric matrix from the schedule's pair values, zero diagonal."""
    keep = schedule.valid
    i, j = schedule.pair_i[keep], schedule.pair_j[keep]
    vals = pair_values[np.flatnonzero(keep)]
    t = schedule.num_models
    out = jnp.zeros((t, t), vals.dtype)
    return out.at[i, j].set(vals).at[j, i].set(vals)


def kahan_add(total, carry, value):
    """Compensated (Kahan) summation step: returns the new (total, carry)."""
    y = value - carry
    t = total + y
    return t, (t - total) - y
