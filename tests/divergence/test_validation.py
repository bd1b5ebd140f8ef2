"""Bad input gets a ValueError that names the argument, before any kernel runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh  # noqa: F401  (documents the accepted mesh type)

from taskpgm_jax.divergence import (CrossLikelihood, StreamingJSD, entropy, jsd, kl,
                                    pairwise_jsd, task_balanced_weights,
                                    truncated_pairwise_jsd)
from tests.divergence.distributions import (assert_close_to_reference, random_logprobs,
                                            reference_pairwise)


@pytest.fixture
def lp(rng):
    return random_logprobs(rng, (3, 4, 10))


def test_shape_and_rank_errors(lp, rng):
    with pytest.raises(ValueError, match=r"logprobs: expected rank 3"):
        pairwise_jsd(lp[0])
    with pytest.raises(ValueError, match=r"logp, logq: vocabulary sizes differ"):
        jsd(lp[0], random_logprobs(rng, (4, 5)))
    with pytest.raises(ValueError, match=r"do not broadcast"):
        jsd(lp[:, :3], lp[:2])
    with pytest.raises(ValueError, match=r"axis 0 has 3 models"):
        StreamingJSD(4).update(StreamingJSD(4).init(), lp)
    with pytest.raises(ValueError, match=r"expected floating"):
        entropy(np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match=r"weights: expected shape \(4,\)"):
        pairwise_jsd(lp, np.ones(5))


@pytest.mark.parametrize("bad, message", [(np.nan, "contains NaN"), (np.inf, r"contains \+inf")])
def test_nan_and_posinf_are_refused(lp, bad, message):
    x = lp.copy()
    x[1, 2, 3] = bad
    with pytest.raises(ValueError, match=f"logprobs: {message}"):
        pairwise_jsd(x)
    with pytest.raises(ValueError, match=f"logq: {message}"):
        kl(lp[0], x[1])


def test_concrete_arrays_closed_over_in_a_jit_are_checked(lp):
    # A closure constant inside the caller's jit has values: they are checked (eagerly), and a
    # good one gives the result of the call outside jit.
    good = jnp.asarray(lp)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda: pairwise_jsd(good))()),
                               np.asarray(pairwise_jsd(good)), atol=1e-7)
    bad = good.at[1, 2, 3].set(jnp.nan)
    with pytest.raises(ValueError, match="logprobs: contains NaN"):
        jax.jit(lambda: pairwise_jsd(bad))()


def test_unnormalised_rows_suggest_from_logits(lp):
    with pytest.raises(ValueError, match="from_logits=True"):
        pairwise_jsd(lp + 0.5)
    with pytest.raises(ValueError, match="from_logits=True"):
        jsd(jnp.asarray(lp[0] * 2.0), lp[1])
    pairwise_jsd(lp + 0.5, from_logits=True)  # the suggestion works
    # bf16 rounding of a normalised row is not an error.
    pairwise_jsd(jnp.asarray(lp, jnp.bfloat16))


@pytest.mark.parametrize("dtype, vocab", [(jnp.bfloat16, 3077), (jnp.float16, 2992)])
def test_low_precision_rows_of_tied_entries_pass(dtype, vocab):
    """Uniform rows round every entry the same way: logsumexp moves by ~eps/2 * ln V (0.03 in
    bf16 here), which is still a normalised distribution, not logits."""
    lp = jnp.full((2, 1, vocab), -np.log(vocab), jnp.float32).astype(dtype)
    np.testing.assert_allclose(np.asarray(pairwise_jsd(lp)), np.zeros((2, 2)), atol=1e-6)
    with pytest.raises(ValueError, match="from_logits=True"):
        pairwise_jsd(jnp.asarray(lp, jnp.float32) + 0.5)


def test_weight_scale_does_not_matter_or_is_refused(lp):
    """Only ratios of weights matter in a one-shot mean: any finite scale gives the same
    matrix. A streaming batch whose weights float32 cannot hold is refused by name."""
    plain = np.asarray(pairwise_jsd(lp))
    for scale in (1e38, 1e300, 1e-50):
        np.testing.assert_allclose(np.asarray(pairwise_jsd(lp, np.full(4, scale))), plain,
                                   rtol=1e-6, atol=1e-7)
    acc = StreamingJSD(3)
    with pytest.raises(ValueError, match="weights: the weights overflow float32"):
        acc.update(acc.init(), lp, np.full(4, 1e39))
    with pytest.raises(ValueError, match="weights: every positive weight underflows"):
        acc.update(acc.init(), lp, np.full(4, 1e-50))
    # Subnormal in float32 (XLA on CPU flushes those to 0): refused the same way.
    with pytest.raises(ValueError, match="weights: every positive weight underflows"):
        acc.update(acc.init(), lp, np.full(4, 1e-39))
    # Each batch fits float32, their running total does not: result refuses rather than
    # returning a matrix of zeros (NaN totals once read as "nothing seen").
    state = acc.init()
    for _ in range(4):
        state = acc.update(state, lp, np.full(4, 3e37))
    with pytest.raises(ValueError, match="state: the accumulated weights or sums overflowed"):
        acc.result(state)


def test_empty_rows_and_weights(lp):
    x = lp.copy()
    x[0, 1, :] = -np.inf
    with pytest.raises(ValueError, match="-inf everywhere"):
        pairwise_jsd(x)
    with pytest.raises(ValueError, match="negative"):
        pairwise_jsd(lp, np.array([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="all weights are zero"):
        pairwise_jsd(lp, np.zeros(4))
    with pytest.raises(ValueError, match="weights: contains NaN"):
        pairwise_jsd(lp, np.array([1.0, np.nan, 1.0, 1.0]))
    acc = StreamingJSD(3)
    state = acc.update(acc.init(), lp, np.zeros(4))  # an all-padding batch is fine ...
    with pytest.raises(ValueError, match="no position with positive weight"):
        acc.result(state)  # ... but a result needs something


def test_option_errors(lp):
    with pytest.raises(ValueError, match="pair_block"):
        pairwise_jsd(lp, pair_block=0)
    with pytest.raises(ValueError, match="vocab_chunk"):
        StreamingJSD(3, vocab_chunk=2.5)
    with pytest.raises(ValueError, match="mesh"):
        StreamingJSD(3, mesh="cpu")
    with pytest.raises(ValueError, match="task_ids"):
        task_balanced_weights(np.array([-1, -1]))


_STATE_ERROR = "state: expected the .*State returned by this accumulator"


@pytest.mark.parametrize("call, match", [
    # Empty axes once hit a ZeroDivisionError or blamed num_models instead of the input.
    (lambda: pairwise_jsd(jnp.zeros((0, 5, 7))), r"logprobs: the models axis \(T"),
    (lambda: truncated_pairwise_jsd(jnp.zeros((2, 0, 4)), top_k=2),
     r"logprobs: the positions axis \(N\)"),
    (lambda: truncated_pairwise_jsd(jnp.zeros((0, 3, 4)), top_k=2), r"logprobs: the models"),
    # Another accumulator's state, or none, once failed deep inside with a raw error.
    (lambda: CrossLikelihood(2).update(CrossLikelihood(3).init(), -jnp.ones((2, 4)),
                                       jnp.array([0, 1, 0, 1])), _STATE_ERROR),
    (lambda: CrossLikelihood(2).update(None, -jnp.ones((2, 4)), jnp.array([0, 1, 0, 1])),
     _STATE_ERROR),
    (lambda: CrossLikelihood(2).result(None), _STATE_ERROR),
    (lambda: StreamingJSD(3).result(None), _STATE_ERROR),
    (lambda: StreamingJSD(3).result(StreamingJSD(4).init()), _STATE_ERROR),
    # num_tasks=2.7 was truncated to 2 and "3" parsed.
    (lambda: task_balanced_weights([0, 1], num_tasks=2.7), "num_tasks: expected a positive"),
    (lambda: task_balanced_weights([0, 1], num_tasks="3"), "num_tasks: expected a positive"),
    (lambda: task_balanced_weights([0, 1], num_tasks=0), "num_tasks: expected a positive"),
    # Traced ids (in a jitted probe step) raised JAX's TracerArrayConversionError from inside.
    (lambda: jax.jit(task_balanced_weights)(jnp.array([0, 1, 1])),
     r"task_ids: needs concrete values.*num_groups"),
])
def test_empty_axes_foreign_states_and_counts_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_task_balanced_weights_takes_numpy_integers():
    np.testing.assert_allclose(np.asarray(task_balanced_weights([0, 1, 1], np.int64(3))),
                               [0.5, 0.25, 0.25])


@pytest.mark.parametrize("scale", [1e40, 1e-46])
def test_weight_lists_are_read_in_float64_like_arrays(lp, rng, scale):
    """A list of weights once went through float32 before the rescale: 1e40 became inf
    ("contains NaN or inf") and 1e-46 became 0 ("all weights are zero")."""
    w = (rng.random(4) + 0.1) * scale
    ref = reference_pairwise(lp, w / w.max())
    assert_close_to_reference(pairwise_jsd(lp, w.tolist()), ref, "list weights")
    bounds = truncated_pairwise_jsd(lp, w.tolist(), top_k=3)
    assert np.all(np.asarray(bounds.lower) <= ref + 1e-6)
    assert np.all(np.asarray(bounds.upper) >= ref - 1e-6)
    # A streaming batch has no rescale: the list is refused for what float32 does to it.
    acc = StreamingJSD(3)
    message = "the weights overflow float32" if scale > 1 else "every positive weight underflows"
    with pytest.raises(ValueError, match=f"weights: {message}"):
        acc.update(acc.init(), lp, w.tolist())


def test_large_integer_weights_are_not_wrapped(lp, rng):
    """int64 weights past 2**31 once reached the kernel through jnp.asarray, which wraps them
    (x64 off): 2**40 counted as 0."""
    w = rng.integers(1, 10, size=4)
    w[rng.integers(4)] = 2**40
    acc = StreamingJSD(3)
    assert_close_to_reference(acc.result(acc.update(acc.init(), lp, w)),
                              reference_pairwise(lp, w.astype(np.float64)), "int64 weights")


_STRINGS = "got strings"


@pytest.mark.parametrize("call, match", [
    # Task names instead of indices, strings or None once failed inside jnp.asarray.
    (lambda: CrossLikelihood(3).update(CrossLikelihood(3).init(), -np.ones((3, 2)),
                                       ["arith", "logic"]),
     f"task_ids: expected integer task indices .*{_STRINGS}; map task names to their indices"),
    (lambda: CrossLikelihood(3).update(CrossLikelihood(3).init(), None, [0, 1]),
     "scores: expected float log-likelihoods .*got None"),
    (lambda: CrossLikelihood(3).update(CrossLikelihood(3).init(), "x", [0, 1]),
     f"scores: .*{_STRINGS}"),
    (lambda: CrossLikelihood(3, per_token=True).update(
        CrossLikelihood(3, per_token=True).init(), -np.ones((3, 2)), [0, 1], "12"),
     f"num_tokens: .*{_STRINGS}"),
    (lambda: CrossLikelihood(3, per_token=True).update(
        CrossLikelihood(3, per_token=True).init(), -np.ones((3, 2)), [0, 1], [4, None]),
     "num_tokens: .*holds non-numbers"),
    (lambda: CrossLikelihood(3, per_token=True).update(
        CrossLikelihood(3, per_token=True).init(), -np.ones((3, 2)), [0, 1], [True, True]),
     "num_tokens: expected integer .*got dtype bool"),
    (lambda: StreamingJSD(3, num_groups=2).update(StreamingJSD(3, num_groups=2).init(),
                                                  np.log(np.full((3, 2, 4), 0.25)), None,
                                                  ["a", "b"]),
     f"groups: .*{_STRINGS}; map group names to their indices"),
    (lambda: pairwise_jsd(np.log(np.full((3, 2, 4), 0.25)), ["1", "1"]),
     f"weights: .*{_STRINGS}"),
    (lambda: pairwise_jsd([[[0.0]], [[0.0], [0.0]]]),
     "logprobs: .*not a rectangular array"),
    # Ids past 2**31 once wrapped around in jnp.asarray (2**32 read as task 0) and passed.
    (lambda: CrossLikelihood(3).update(CrossLikelihood(3).init(), -np.ones((3, 2)),
                                       np.array([2**32, 1])),
     r"task_ids: ids must lie in \[0, 3\)"),
    (lambda: StreamingJSD(3, num_groups=2).update(StreamingJSD(3, num_groups=2).init(),
                                                  np.log(np.full((3, 2, 4), 0.25)), None,
                                                  np.array([2**32, 0])),
     r"groups: ids must lie in \[0, 2\)"),
    # float64 scores past float32's range were blamed as "NaN or inf" after the cast.
    (lambda: CrossLikelihood(3).update(CrossLikelihood(3).init(), np.full((3, 2), -1e40),
                                       [0, 1]),
     "scores: -1e\\+40 is beyond float32's range"),
])
def test_non_numeric_and_out_of_range_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_kernel_option_is_named(lp):
    with pytest.raises(ValueError, match="kernel_options: unknown option 'block'; expected "
                                         "pair_block, position_block, vocab_chunk, mesh"):
        truncated_pairwise_jsd(lp, top_k=2, block=4)
    # The known ones still reach the kernel.
    bounds = truncated_pairwise_jsd(lp, top_k=2, pair_block=1, vocab_chunk=3)
    ref = reference_pairwise(lp)
    assert np.all(np.asarray(bounds.lower) <= ref + 1e-6)
    assert np.all(np.asarray(bounds.upper) >= ref - 1e-6)
