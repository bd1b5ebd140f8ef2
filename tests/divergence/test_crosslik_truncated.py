import math

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskpgm_jax.divergence import CrossLikelihood, pmi_affinity, truncated_pairwise_jsd
from taskpgm_jax.divergence.truncated import ROUNDING_ALLOWANCE
from tests.divergence.distributions import KINDS, random_logprobs, reference_pairwise
from tests.precision import HIGHEST, dot_precisions

seeds = st.integers(0, 2**32 - 1)


def _examples(rng, num_models, num_tasks, n):
    scores = -rng.gamma(2.0, 5.0, size=(num_models, n)).astype(np.float32)
    task_ids = rng.integers(0, num_tasks, size=n)
    task_ids[: num_tasks] = np.arange(num_tasks)  # every task has at least one example
    tokens = rng.integers(1, 9, size=n)
    return scores, task_ids, tokens


@given(seed=seeds, per_token=st.booleans())
def test_cross_likelihood_matches_numpy_in_uneven_batches(seed, per_token):
    rng = np.random.default_rng(seed)
    m, t, n = 5, 5, 40
    scores, ids, tokens = _examples(rng, m, t, n)
    acc = CrossLikelihood(m, per_token=per_token)
    state = acc.init()
    for a, b in [(0, 7), (7, 8), (8, 31), (31, 40)]:
        # Pad every batch to 24 with junk columns marked -1: shapes stay fixed, junk ignored.
        pad = 24 - (b - a)
        s = np.concatenate([scores[:, a:b], np.full((m, pad), np.nan, np.float32)], 1)
        i = np.concatenate([ids[a:b], -np.ones(pad, int)])
        k = np.concatenate([tokens[a:b], np.zeros(pad, int)])
        state = acc.update(state, s, i, k if per_token else None)
    per_example = scores.astype(np.float64) / (tokens if per_token else 1)
    ref = np.stack([[per_example[mi, ids == tj].mean() for tj in range(t)] for mi in range(m)])
    np.testing.assert_allclose(np.asarray(acc.result(state)), ref, rtol=1e-6, atol=1e-5)


def test_pmi_affinity_matches_the_formula(rng):
    L = rng.normal(size=(7, 7)) * 3 - 20
    S = np.asarray(pmi_affinity(L))
    for i in range(7):
        for j in range(7):
            expect = 0.0 if i == j else 0.5 * ((L[i, j] - L[j, j]) + (L[j, i] - L[i, i]))
            assert S[i, j] == pytest.approx(expect, abs=1e-4)
    np.testing.assert_array_equal(S, S.T)


def test_cross_likelihood_errors():
    acc = CrossLikelihood(3)
    state = acc.init()
    with pytest.raises(ValueError, match="task_ids"):
        acc.update(state, -np.ones((3, 2), np.float32), np.array([0, 3]))
    with pytest.raises(ValueError, match="scores"):
        acc.update(state, -np.ones((2, 2), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="<= 0"):
        acc.update(state, np.ones((3, 2), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(state, np.full((3, 2), np.nan, np.float32), np.array([0, 1]))
    state = acc.update(state, -np.ones((3, 2), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"tasks \[2\]"):
        acc.result(state)
    with pytest.raises(ValueError, match="num_tokens"):
        CrossLikelihood(3, per_token=True).update(state, -np.ones((3, 2), np.float32),
                                                  np.array([0, 1]))
    per_token = CrossLikelihood(3, per_token=True)
    for bad in ([1.0, np.nan], [1.0, np.inf], [1.0, 0.5], [1, 0]):
        with pytest.raises(ValueError, match="num_tokens"):
            per_token.update(per_token.init(), -np.ones((3, 2), np.float32), np.array([0, 1]),
                             np.array(bad))
    # Padding columns may carry any count (here 0); a count on a per-example sum is refused.
    per_token.update(per_token.init(), -np.ones((3, 2), np.float32), np.array([0, -1]),
                     np.array([2, 0]))
    with pytest.raises(ValueError, match="num_tokens: given"):
        acc.update(acc.init(), -np.ones((3, 2), np.float32), np.array([0, 1]), np.array([1, 1]))
    with pytest.raises(ValueError, match="square"):
        pmi_affinity(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN or inf"):
        pmi_affinity(np.full((3, 3), np.inf))


def test_pmi_affinity_refuses_what_a_float_cast_would_hide(rng):
    L = rng.normal(size=(4, 4)) - 20
    # A complex matrix lost its imaginary part, a 0 x 0 one came back empty, strings and bools
    # were parsed, and float64 beyond float32's range became inf, all without an error.
    square = r"expected a square \[T, T\] matrix"
    cases = [(L + 1j * rng.normal(size=(4, 4)), "expected real numbers, got dtype complex128"),
             (np.zeros((0, 0)), square + r" with T >= 1 .*\(0, 0\)"),
             (L.astype(str), square + " of numbers, got strings"),
             (L > -20, "expected real numbers"),
             (np.where(np.eye(4, dtype=bool), -1e39, L),
              r"values up to 1e\+39 are beyond float32's range")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=f"cross_likelihood: {match}"):
            pmi_affinity(bad)
    # Integer log-likelihood sums are real numbers: the formula, in float.
    Li = rng.integers(-50, 0, size=(4, 4))
    S = np.asarray(pmi_affinity(Li))
    want = 0.5 * ((Li - np.diag(Li)[None]) + (Li - np.diag(Li)[None]).T)
    np.testing.assert_allclose(S, want, atol=1e-5)


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_pmi_affinity_of_low_precision_input_is_computed_in_float32(rng, low):
    # bfloat16 (NumPy kind "V") and float16 are floats: accepted, and upcast like every other
    # divergence function's input. In their own dtype the gains were rounded to 8 bits (bf16)
    # and their sum overflowed float16 to -inf (-40000 nats: a long target of a bad model).
    import jax.numpy as jnp
    L = -rng.uniform(1.0, 400.0, size=(5, 5))
    L[0, 1] = L[1, 0] = -rng.uniform(35000.0, 40000.0)
    Lb = jnp.asarray(L, low)
    Lb64 = np.asarray(Lb.astype(jnp.float32), np.float64)  # the values the caller passed
    gain = Lb64 - np.diag(Lb64)[None]
    S = pmi_affinity(Lb)
    assert S.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(S, np.float64), 0.5 * (gain + gain.T), rtol=1e-6,
                               atol=1e-5)


T, N, V = 6, 24, 50


@given(seed=seeds, kind=st.sampled_from(KINDS), top_k=st.sampled_from([1, 3, 8]))
def test_truncated_bounds_bracket_the_exact_value(seed, kind, top_k):
    rng = np.random.default_rng(seed)
    lp = random_logprobs(rng, (T, N, V), kind)
    w = rng.random(N).astype(np.float32)
    exact = reference_pairwise(lp, w)
    out = truncated_pairwise_jsd(lp, w, top_k=top_k)
    lower, upper = np.asarray(out.lower, np.float64), np.asarray(out.upper, np.float64)
    # Certified against the exact (float64) value: no slack here, the bounds carry their own.
    assert np.all(lower <= exact), np.max(lower - exact)
    assert np.all(exact <= upper), np.max(exact - upper)
    # The gap is what the tail masses say it can be at most, plus the two rounding allowances.
    tail = np.asarray(out.tail_mass, np.float64)
    gap_bound = 0.5 * math.log(2) * (tail[:, None] + tail[None, :])
    assert np.all(upper - lower <= gap_bound + 2 * ROUNDING_ALLOWANCE + 1e-7)
    # The tail mass is model i's mean probability outside the union of top-k sets.
    assert np.all((tail >= 0) & (tail <= 1))


def test_truncated_is_exact_when_the_union_covers_the_vocabulary(rng):
    lp = random_logprobs(rng, (T, N, V), "sparse")
    out = truncated_pairwise_jsd(lp, top_k=V)
    exact = reference_pairwise(lp)
    lower, upper = np.asarray(out.lower, np.float64), np.asarray(out.upper, np.float64)
    # No tail: the bounds are the exact value less / plus the rounding allowance, and hold.
    assert np.all(lower <= exact) and np.all(exact <= upper)
    np.testing.assert_allclose(lower, exact, atol=2e-6)
    np.testing.assert_allclose(upper, exact, atol=2e-6)
    np.testing.assert_allclose(np.asarray(out.tail_mass), 0.0, atol=1e-6)


def test_truncated_peaked_models_are_tight(rng):
    """Fine-tuned LMs are peaked: with k = 8 of 50 tokens the bounds pin the value down. The
    gap is at most ln 2 (tail_i + tail_j) / 2 plus the rounding allowance on each side (the
    documented bound); here the tails are below 1% of the mass, the gap a few 1e-3 nats at
    most (1.4e-3 the worst of 1000 seeds; a fixed 1e-3 once failed on a random seed)."""
    lp = random_logprobs(rng, (T, N, V), "peaked")
    out = truncated_pairwise_jsd(lp, top_k=8)
    gap = np.asarray(out.upper - out.lower, np.float64)
    tail = np.asarray(out.tail_mass, np.float64)
    bound = math.log(2) * (tail[:, None] + tail[None]) / 2 + 2 * ROUNDING_ALLOWANCE + 1e-7
    off = ~np.eye(T, dtype=bool)
    assert np.all(gap[off] <= bound[off])
    assert tail.max() < 0.05 and gap.max() < 5e-3
    with pytest.raises(ValueError, match="top_k"):
        truncated_pairwise_jsd(lp, top_k=V + 1)
    assert jax.numpy.asarray(out.lower).shape == (T, T)


def test_truncated_and_cross_likelihood_products_use_highest_precision(rng):
    """The tail mass widens a certified bound and L is a sum over thousands of examples: neither
    may take a GPU's TF32 default (traced under bf16 default, read from the program)."""
    lp = jax.numpy.asarray(random_logprobs(rng, (3, 5, 40), "flat"))
    with jax.default_matmul_precision("bfloat16"):
        bounds = jax.make_jaxpr(lambda x: truncated_pairwise_jsd(x, top_k=3).upper)(lp)
        acc = CrossLikelihood(3)
        scores = jax.numpy.asarray(rng.normal(size=(3, 6)), jax.numpy.float32)
        tasks = jax.numpy.asarray(rng.integers(0, 3, size=6), jax.numpy.int32)
        crosslik = jax.make_jaxpr(lambda s: acc.update(acc.init(), s, tasks))(scores)
    for name, jaxpr in (("truncated", bounds), ("cross-likelihood", crosslik)):
        precisions = dot_precisions(jaxpr)
        assert precisions and all(p == HIGHEST for p in precisions), (name, precisions)


def test_truncated_kernel_options_are_typed_as_pairwise_jsd_takes_them():
    """`**kernel_options` is typed by a TypedDict: its keys must stay the keyword-only options
    that `pairwise_jsd` accepts (and that `truncated_pairwise_jsd` forwards at run time)."""
    import inspect
    import typing

    from taskpgm_jax.divergence import pairwise_jsd, truncated

    taken = {name for name, p in inspect.signature(pairwise_jsd).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "from_logits"}
    assert set(typing.get_type_hints(truncated._KernelOptions)) == taken == set(truncated._KERNEL_OPTIONS)
