"""KV-cache greedy decoding against step-by-step full recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from taskpgm_jax.models import greedy_generate
from tests.models.conftest import TINY, forward

NEW = 5


def test_cached_greedy_equals_full_recomputation(tiny_model, rng):
    s = 6
    ids = rng.integers(0, TINY.vocab_size, size=(3, s))
    mask = np.ones((3, s), np.int64)
    mask[1, :2] = 0  # left padding
    mask[2, 4:] = 0  # right padding
    with jax.default_matmul_precision("highest"):
        got = np.asarray(greedy_generate(tiny_model, ids, mask, max_new_tokens=NEW))
        # Reference: the whole sequence recomputed for every new token, at one fixed shape
        # (future slots masked out, which causal attention ignores anyway).
        full_ids = np.concatenate([ids, np.zeros((3, NEW), np.int64)], axis=1)
        full_mask = np.concatenate([mask, np.zeros((3, NEW), np.int64)], axis=1)
        want = []
        for t in range(NEW):
            logits = np.asarray(forward(tiny_model, jnp.asarray(full_ids, jnp.int32),
                                        jnp.asarray(full_mask, jnp.int32)))
            last = np.max(np.where(full_mask > 0, np.arange(s + NEW), 0), axis=1)
            token = logits[np.arange(3), last].argmax(-1)
            want.append(token)
            full_ids[:, s + t] = token
            full_mask[:, s + t] = 1
    np.testing.assert_array_equal(got, np.stack(want, axis=1))


def test_decode_logits_equal_forward(tiny_model, rng):
    # The window of layer 1 (4) is shorter than the sequence, so the cache path must apply it too.
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, size=(2, 9)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    step = nnx.jit(lambda m, i, c, p: m.decode(i, c, positions=p))
    with jax.default_matmul_precision("highest"):
        ref = forward(tiny_model, ids, jnp.ones_like(ids))
        cache = tiny_model.init_cache(2, 12)
        first, cache = step(tiny_model, ids[:, :6], cache, pos[:, :6])
        rest = []
        for t in range(6, 9):
            logits, cache = step(tiny_model, ids[:, t:t + 1], cache, pos[:, t:t + 1])
            rest.append(logits)
    np.testing.assert_allclose(first, ref[:, :6], atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate(rest, axis=1), ref[:, 6:], atol=1e-5)
    assert int(cache.index) == 9
