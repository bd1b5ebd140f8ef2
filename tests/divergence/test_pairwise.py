import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh

from taskpgm_jax.divergence import (StreamingJSD, _kernel, pairwise_jsd, streaming,
                                    task_balanced_weights)
from tests.divergence.distributions import (KINDS, assert_close_to_reference, random_logprobs,
                                            reference_pairwise)

LN2 = math.log(2.0)
LN2_F32 = np.float32(LN2)  # the bound as float32 can represent it (just above ln 2)
# One fixed problem shape for the property tests (every new shape is a compile); the tile
# options below deliberately do not divide it.
T, N, V = 6, 24, 50
seeds = st.integers(0, 2**32 - 1)


def _weights(rng, n):
    w = rng.random(n).astype(np.float32)
    w[rng.random(n) < 0.3] = 0.0
    w[rng.integers(n)] = 1.0
    return w


@given(seed=seeds, kind=st.sampled_from(KINDS), weighted=st.booleans())
def test_pairwise_matches_float64_reference(seed, kind, weighted):
    rng = np.random.default_rng(seed)
    lp = random_logprobs(rng, (T, N, V), kind)
    w = _weights(rng, N) if weighted else None
    ours = np.asarray(pairwise_jsd(lp, w))
    ref = reference_pairwise(lp, w)
    assert_close_to_reference(ours, ref, "pairwise_jsd")
    np.testing.assert_array_equal(ours, ours.T)
    np.testing.assert_array_equal(np.diag(ours), 0.0)
    assert np.all(ours >= 0) and np.all(ours <= LN2_F32)


@pytest.mark.parametrize("options", [
    dict(pair_block=4, position_block=5, vocab_chunk=16),   # nothing divides: ragged last tiles
    dict(pair_block=1, position_block=24, vocab_chunk=50),  # one tile, pair by pair
    dict(pair_block=1000, position_block=7, vocab_chunk=7),
])
def test_tiling_does_not_change_the_result(rng, options):
    lp = random_logprobs(rng, (T, N, V))
    w = _weights(rng, N)
    ref = reference_pairwise(lp, w)
    assert_close_to_reference(pairwise_jsd(lp, w, **options), ref, str(options))


def test_weights_are_honoured(rng):
    lp = random_logprobs(rng, (T, N, V))
    w = np.zeros(N, np.float32)
    w[:5] = [3.0, 1.0, 0.5, 2.0, 1.0]
    # Zero weight must mean ignored: positions 5.. are replaced by garbage distributions.
    other = lp.copy()
    other[:, 5:] = random_logprobs(rng, (T, N - 5, V), "one_hot")
    ours = np.asarray(pairwise_jsd(other, w))
    assert_close_to_reference(ours, reference_pairwise(lp[:, :5], w[:5]), "weighted")


# Uneven batch boundaries from a fixed set, so the batch shapes (compiles) stay few.
CUTS = [(12,), (8, 16), (4, 12), (12, 16), (4, 8, 12)]  # batch sizes 4, 8 and 12 only


@settings(max_examples=10)
@given(seed=seeds, cuts=st.sampled_from(CUTS))
def test_streaming_uneven_batches_equal_pairwise(seed, cuts):
    rng = np.random.default_rng(seed)
    lp = random_logprobs(rng, (T, N, V))
    w = _weights(rng, N)
    acc = StreamingJSD(T)
    state = acc.init()
    bounds = [0, *sorted(cuts), N]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        state = acc.update(state, lp[:, a:b], w[a:b])
    streamed = np.asarray(acc.result(state))
    ref = reference_pairwise(lp, w)
    assert_close_to_reference(streamed, ref, "streaming")
    np.testing.assert_allclose(streamed, np.asarray(pairwise_jsd(lp, w)), atol=1e-6, rtol=0)


def test_streaming_is_jittable_and_scannable(rng):
    """The state is a plain pytree: a caller can run the whole probe loop inside one jit."""
    batches = jnp.asarray(random_logprobs(rng, (4, T, 6, V)))
    acc = StreamingJSD(T)

    @jax.jit
    def run(batches):
        def step(state, lp):
            return acc.update(state, lp), None
        state, _ = jax.lax.scan(step, acc.init(), batches)
        return acc.result(state)

    lp = np.concatenate(list(np.asarray(batches)), axis=1)
    assert_close_to_reference(run(batches), reference_pairwise(lp), "scan")


def test_no_recompilation_across_batches_of_one_shape(rng, monkeypatch):
    chex.clear_trace_counter()
    counted = jax.jit(chex.assert_max_traces(streaming._update_impl, n=1),
                      static_argnames="config")
    monkeypatch.setattr(streaming, "_update_jit", counted)
    acc = StreamingJSD(T, vocab_chunk=32)
    state = acc.init()
    for _ in range(4):  # fresh data, fresh weights, same shapes: one trace
        state = acc.update(state, random_logprobs(rng, (T, 8, V)), _weights(rng, 8))
    # A second accumulator with the same settings shares the compiled program.
    other = StreamingJSD(T, vocab_chunk=32)
    other.update(other.init(), random_logprobs(rng, (T, 8, V)))
    assert np.isfinite(np.asarray(acc.result(state))).all()


def test_from_logits_and_bf16(rng):
    lp = random_logprobs(rng, (T, N, V), "flat")
    logits = lp * 1.0 + rng.normal(size=(T, N, 1)).astype(np.float32) * 5
    ref = reference_pairwise(lp)
    assert_close_to_reference(pairwise_jsd(logits, from_logits=True), ref, "from_logits")
    # Large logits: a row's logsumexp rounded at the logits' magnitude once shifted all its
    # log-probs (2.6e-6 nats off at 3000, 5e-5 at 1e5). The reference reads the same float32
    # logits, normalised in float64.
    big = (lp + rng.uniform(1e5, 3e5, size=(T, N, 1))).astype(np.float32)
    big64 = big.astype(np.float64)
    big_lp = big64 - scipy.special.logsumexp(big64, axis=-1, keepdims=True)
    assert_close_to_reference(pairwise_jsd(big, from_logits=True), reference_pairwise(big_lp),
                              "from_logits, large")
    lp16 = jnp.asarray(lp, jnp.bfloat16)
    ref16 = reference_pairwise(np.asarray(lp16, np.float32))
    np.testing.assert_allclose(np.asarray(pairwise_jsd(lp16)), ref16, atol=4 * 2**-8 * LN2)


def test_sharded_equals_unsharded(rng):
    lp = random_logprobs(rng, (T, N, V))
    w = _weights(rng, N)
    single = np.asarray(pairwise_jsd(lp, w, pair_block=2))
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("data", "fsdp"))
    sharded = np.asarray(pairwise_jsd(lp, w, pair_block=2, mesh=mesh))
    np.testing.assert_allclose(sharded, single, atol=1e-6, rtol=0)
    # Logits, task groups and a batch (10) that the 8 devices do not divide, on the mesh.
    logits = lp + rng.normal(size=(T, N, 1)).astype(np.float32)
    tasks = rng.integers(0, 2, size=N)
    plain, sharded = StreamingJSD(T, from_logits=True, num_groups=2), StreamingJSD(
        T, from_logits=True, num_groups=2, mesh=mesh)
    results = []
    for acc in (plain, sharded):
        state = acc.update(acc.init(), logits[:, :10], w[:10], tasks[:10])
        state = acc.update(state, logits[:, 10:], w[10:], tasks[10:])
        results.append(np.asarray(acc.result(state)))
    np.testing.assert_allclose(results[1], results[0], atol=1e-6, rtol=0)
    # Log-probs with N = 23 = -1 mod 8: one padding position. Its pad-then-set once came out
    # of the partitioner with a position of every device but the last set to P = 1.
    n = 23
    assert_close_to_reference(pairwise_jsd(lp[:, :n], w[:n], pair_block=2, mesh=mesh),
                              reference_pairwise(lp[:, :n].astype(np.float64), w[:n]), "mesh")


def test_sharded_streaming_compiles_once(rng):
    """init() places the state as update() returns it (replicated over the mesh), so every
    same-shape batch, the first included, runs one compiled program."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    acc = StreamingJSD(T, mesh=mesh, vocab_chunk=32)
    state = acc.update(acc.init(), random_logprobs(rng, (T, 8, V)))  # may compile
    before = streaming._update_jit._cache_size()
    for _ in range(3):
        state = acc.update(state, random_logprobs(rng, (T, 8, V)), _weights(rng, 8))
    assert streaming._update_jit._cache_size() == before
    fresh = acc.update(acc.init(), random_logprobs(rng, (T, 8, V)))
    assert streaming._update_jit._cache_size() == before
    assert np.isfinite(np.asarray(acc.result(fresh))).all()


def test_single_model_and_task_balanced_weights(rng):
    lp = random_logprobs(rng, (1, 4, V))
    np.testing.assert_array_equal(np.asarray(pairwise_jsd(lp)), np.zeros((1, 1)))
    ids = np.array([0, 0, 0, 1, -1, 2, 2])
    w = np.asarray(task_balanced_weights(ids))
    np.testing.assert_allclose([w[ids == k].sum() for k in range(3)], [1 / 3] * 3, rtol=1e-6)
    assert w[4] == 0.0


@given(num_models=st.integers(1, 400), pair_block=st.sampled_from([1, 7, 64, 1 << 16]))
def test_pair_schedule_visits_every_pair_exactly_once(num_models, pair_block):
    schedule = _kernel.PairSchedule(num_models, pair_block)
    pairs = list(zip(schedule.pair_i[schedule.valid].tolist(),
                     schedule.pair_j[schedule.valid].tolist(), strict=True))
    expected = {(i, j) for i in range(num_models) for j in range(i + 1, num_models)}
    assert len(pairs) == len(expected) and set(pairs) == expected
    # Padding to s * 2^m (s <= 16) adds at most ~1/8 of the models: < 30% more pairs.
    assert schedule.num_outputs <= 1.3 * len(expected) + 1
    # No step evaluates more than pair_block pairs, unless one unit is larger (one A row
    # against its B half at a level; the pairs of one leaf group).
    t, leaf_pairs = schedule.padded_models, schedule.leaf * (schedule.leaf - 1) // 2
    for kind, level, _, groups, _, rows in schedule.steps:
        half = t // 2**(level + 1) if kind == "level" else None
        pairs, unit = (groups * rows * half, half) if kind == "level" else (
            groups * leaf_pairs, leaf_pairs)
        assert pairs <= max(pair_block, unit)


@pytest.mark.parametrize("num_models", [15, 24])
def test_kernel_memory_is_bounded_by_tiles_not_positions(num_models):
    """Compiled scratch memory is a few tiles (slices of the current tile for each level of
    the schedule, the gathered leaf pairs), whatever the number of positions. T = 15 is all
    leaf (105 gathered pairs), T = 24 mixes levels and leaves of 3."""
    acc = StreamingJSD(num_models, position_block=2, vocab_chunk=64)
    tile = num_models * 2 * 64 * 4
    temps = []
    for n in (8, 64):
        args = (acc.init(), jax.ShapeDtypeStruct((num_models, n, 128), jnp.float32),
                jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32))
        compiled = streaming._update_jit.lower(*args, config=acc.config).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    schedule = acc.config.schedule
    pair_tile = 2 * 64 * 4  # one pair's rows of one tile, bytes
    gathered = 4 * (schedule.padded_models // schedule.leaf) * len(schedule.leaf_pairs[0])
    assert temps[1] - temps[0] <= 64 * 4 * schedule.num_outputs  # only [pairs, N] sums grow
    assert temps[1] <= 4 * (schedule.levels + 2) * tile + gathered * pair_tile, (temps, tile)


def test_padded_model_axis(rng):
    """T = 17 is padded to 18 models (9 * 2): the dummy row must not leak into any result."""
    lp = random_logprobs(rng, (17, 7, V))
    w = _weights(rng, 7)
    assert _kernel.PairSchedule(17, 1 << 16).padded_models == 18
    ref = reference_pairwise(lp, w)
    assert_close_to_reference(pairwise_jsd(lp, w), ref, "T=17")
    assert_close_to_reference(pairwise_jsd(lp, w, pair_block=1), ref, "T=17, one group a step")


@given(seed=seeds)
def test_grouped_streaming_gives_every_task_equal_weight(seed):
    """Task-balanced JSD in one pass: equals the one-shot task_balanced_weights result and the
    float64 mean over tasks of each task's mean JSD."""
    rng = np.random.default_rng(seed)
    lp = random_logprobs(rng, (T, N, V))
    tasks = rng.integers(-1, 3, size=N)  # -1: positions that belong to no task (ignored)
    tasks[:3] = [0, 1, 2]
    acc = StreamingJSD(T, num_groups=3)
    state = acc.init()
    for a, b in [(0, 10), (10, N)]:
        state = acc.update(state, lp[:, a:b], None, tasks[a:b])
    streamed = np.asarray(acc.result(state))
    per_task = [reference_pairwise(lp[:, tasks == k]) for k in range(3)]
    assert_close_to_reference(streamed, np.mean(per_task, axis=0), "grouped")
    one_shot = pairwise_jsd(lp, task_balanced_weights(tasks, 3))
    np.testing.assert_allclose(streamed, np.asarray(one_shot), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="groups: required"):
        acc.update(state, lp)
    with pytest.raises(ValueError, match=r"groups: ids must lie in \[0, 3\)"):
        acc.update(state, lp, None, np.full(N, 3))
    with pytest.raises(ValueError, match="no groups"):
        StreamingJSD(T).update(StreamingJSD(T).init(), lp, None, tasks)
