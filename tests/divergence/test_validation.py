"""Bad input gets a ValueError that names the argument, before any kernel runs."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh  # noqa: F401  (documents the accepted mesh type)

from taskpgm_jax.divergence import (StreamingJSD, entropy, jsd, kl, pairwise_jsd,
                                    task_balanced_weights)
from tests.divergence.distributions import random_logprobs


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


def test_unnormalised_rows_suggest_from_logits(lp):
    with pytest.raises(ValueError, match="from_logits=True"):
        pairwise_jsd(lp + 0.5)
    with pytest.raises(ValueError, match="from_logits=True"):
        jsd(jnp.asarray(lp[0] * 2.0), lp[1])
    pairwise_jsd(lp + 0.5, from_logits=True)  # the suggestion works
    # bf16 rounding of a normalised row is not an error.
    pairwise_jsd(jnp.asarray(lp, jnp.bfloat16))


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
