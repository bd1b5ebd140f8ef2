import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import rel_entr
from scipy.stats import entropy as scipy_entropy

from taskpgm_jax.divergence import entropy, jsd, kl
from tests.divergence.distributions import (KINDS, assert_close_to_reference, random_logprobs,
                                            scipy_jsd)

LN2 = math.log(2.0)
LN2_F32 = np.float32(LN2)  # the bound as float32 can represent it (just above ln 2)
# A few fixed shapes: every new shape is a compile.
SHAPES = [(2,), (7,), (5, 64), (3, 4, 7)]
seeds = st.integers(0, 2**32 - 1)


@given(seed=seeds, shape=st.sampled_from(SHAPES), kind_p=st.sampled_from(KINDS),
       kind_q=st.sampled_from(KINDS))
def test_jsd_matches_scipy_float64(seed, shape, kind_p, kind_q):
    rng = np.random.default_rng(seed)
    lp = random_logprobs(rng, shape, kind_p)
    lq = random_logprobs(rng, shape, kind_q)
    ours = np.asarray(jsd(lp, lq))
    ref = scipy_jsd(lp, lq)
    assert ours.shape == ref.shape
    assert_close_to_reference(ours, ref, "jsd")
    assert np.all(ours >= 0) and np.all(ours <= LN2_F32)
    # Symmetric up to a few ulps: XLA may fuse a multiply-add either way round.
    np.testing.assert_allclose(ours, np.asarray(jsd(lq, lp)), atol=4 * 2**-24, rtol=0)  # ulps


@given(seed=seeds, kind=st.sampled_from(KINDS))
def test_identical_rows_give_zero_and_disjoint_supports_give_ln2(seed, kind):
    rng = np.random.default_rng(seed)
    lp = random_logprobs(rng, (5, 64), kind)
    assert np.max(np.abs(np.asarray(jsd(lp, lp)))) <= 1e-6
    # Disjoint supports: each row puts its mass on one half of the vocabulary.
    half = random_logprobs(rng, (5, 32), kind)
    neg = np.full((5, 32), -np.inf, np.float32)
    a = np.concatenate([half, neg], -1)
    b = np.concatenate([neg, random_logprobs(rng, (5, 32), kind)], -1)
    np.testing.assert_allclose(np.asarray(jsd(a, b)), LN2, atol=1e-6)


def test_one_hot_rows_exact():
    a = log0(np.array([[1.0, 0, 0], [1.0, 0, 0], [0.5, 0.5, 0]], np.float32))
    b = log0(np.array([[1.0, 0, 0], [0, 0, 1.0], [1.0, 0, 0]], np.float32))
    ours = np.asarray(jsd(a, b))
    np.testing.assert_allclose(ours, scipy_jsd(a, b), atol=1e-7)
    assert ours[0] == 0.0 and abs(ours[1] - LN2) < 1e-7


def test_broadcasting_over_leading_axes(rng):
    lp = random_logprobs(rng, (3, 1, 7))
    lq = random_logprobs(rng, (1, 4, 7))
    ours = np.asarray(jsd(lp, lq))
    assert ours.shape == (3, 4)
    assert_close_to_reference(ours, scipy_jsd(lp, lq), "broadcast")


def test_from_logits(rng):
    logits_p = rng.normal(size=(5, 64)).astype(np.float32) * 3 + 7.0
    logits_q = rng.normal(size=(5, 64)).astype(np.float32) * 3 - 2.0
    lp = logits_p - np.log(np.exp(logits_p.astype(np.float64)).sum(-1, keepdims=True))
    lq = logits_q - np.log(np.exp(logits_q.astype(np.float64)).sum(-1, keepdims=True))
    ours = np.asarray(jsd(logits_p, logits_q, from_logits=True))
    assert_close_to_reference(ours, scipy_jsd(lp, lq), "from_logits")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_within_their_tolerance(rng, dtype):
    lp = random_logprobs(rng, (5, 64), "mixed")
    lq = random_logprobs(rng, (5, 64), "mixed")
    lp16, lq16 = jnp.asarray(lp, dtype), jnp.asarray(lq, dtype)
    ours = np.asarray(jsd(lp16, lq16))
    assert ours.dtype == np.float32
    # The reference sees exactly the rounded inputs; the kernel must lose nothing beyond them.
    ref = scipy_jsd(np.asarray(lp16, np.float32), np.asarray(lq16, np.float32))
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(ours, ref, atol=4 * eps * LN2, rtol=0)


@given(seed=seeds, shape=st.sampled_from(SHAPES), kind_p=st.sampled_from(KINDS),
       kind_q=st.sampled_from(["flat", "peaked"]))
def test_kl_and_entropy_match_scipy(seed, shape, kind_p, kind_q):
    rng = np.random.default_rng(seed)
    lp = random_logprobs(rng, shape, kind_p)
    lq = random_logprobs(rng, shape, kind_q)  # full support, so KL(P || Q) is finite
    p = np.exp(lp.astype(np.float64))
    q = np.exp(lq.astype(np.float64))
    ref_kl = rel_entr(p, q).sum(-1)
    ours_kl = np.asarray(kl(lp, lq))
    np.testing.assert_allclose(ours_kl, ref_kl, atol=2e-5, rtol=1e-5)
    ref_h = scipy_entropy(p, axis=-1)
    np.testing.assert_allclose(np.asarray(entropy(lp)), ref_h, atol=2e-5, rtol=1e-5)


def test_kl_is_infinite_where_q_has_no_mass():
    lp = np.log(np.array([0.5, 0.5], np.float32))
    lq = log0(np.array([1.0, 0.0], np.float32))
    assert np.isinf(np.asarray(kl(lp, lq)))
    assert float(kl(lq, lp)) == pytest.approx(math.log(2.0), abs=1e-6)
    # P's mass on the second token underflows float32 (e^-120) but is not zero: still infinite,
    # as scipy's float64 rel_entr says.
    tiny = np.array([np.log1p(-np.exp(-120.0)), -120.0], np.float32)
    assert np.isinf(rel_entr(np.exp(tiny.astype(np.float64)), [1.0, 0.0]).sum())
    assert np.isinf(np.asarray(kl(tiny, np.array([0.0, -np.inf], np.float32))))


def log0(x):
    """log with log 0 = -inf and no divide-by-zero warning."""
    with np.errstate(divide="ignore"):
        return np.log(x)
