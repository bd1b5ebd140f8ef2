"""KV-cache greedy decoding against step-by-step full recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import taskpgm_jax.models.generate as generate_module
from taskpgm_jax.models import greedy_generate, greedy_generator
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
    # The bound generator (one graph walk for many batches) gives the same tokens, and its
    # arguments get the same checks.
    generate = greedy_generator(tiny_model)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_array_equal(np.asarray(generate(ids, mask, max_new_tokens=NEW)), got)
        eos = int(got[0, 1])
        np.testing.assert_array_equal(
            np.asarray(generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos)),
            np.asarray(greedy_generate(tiny_model, ids, mask, max_new_tokens=NEW,
                                       eos_token_id=eos)))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(ids, mask, max_new_tokens=0)


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


def test_decode_refuses_a_cache_it_does_not_fit(tiny_model):
    ids = jnp.zeros((1, 4), jnp.int32)
    pos = jnp.arange(4, dtype=jnp.int32)[None]
    cache = tiny_model.init_cache(1, 6)
    # A write past the end would be clamped by dynamic_update_slice and overwrite slots 2-3.
    with pytest.raises(ValueError, match="4 new tokens at cache index 4 .*max_length=6"):
        tiny_model.decode(ids, cache._replace(index=jnp.int32(4)), positions=pos + 4)
    with pytest.raises(ValueError, match="token_mask must have shape"):
        tiny_model.decode(ids, cache, token_mask=jnp.ones((1, 3)), positions=pos)
    with pytest.raises(ValueError, match="cache was built for batch 2"):
        tiny_model.decode(ids, tiny_model.init_cache(2, 6), positions=pos)


@pytest.mark.parametrize("kwargs, match", [
    ({"input_ids": np.zeros((1, 0), np.int32)}, "input_ids has no tokens"),
    ({"attention_mask": np.asarray([[1, 1, 1], [0, 0, 0]])}, r"attention_mask rows \[1\]"),
    ({"attention_mask": np.asarray([[1, 1, 1], [0.5, 1, 1]])}, "attention_mask must hold 1"),
    ({"max_new_tokens": 2.0}, "max_new_tokens"),
    ({"max_new_tokens": None}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"eos_token_id": TINY.vocab_size}, "eos_token_id=61 .*vocab_size=61"),
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"eos_token_id": [1, 2]}, "eos_token_id"),
])
def test_generate_refuses_bad_arguments(tiny_model, kwargs, match):
    args = {"input_ids": np.ones((2, 3), np.int32), "attention_mask": None, "max_new_tokens": 2,
            **kwargs}
    with pytest.raises(ValueError, match=match):
        greedy_generate(tiny_model, args.pop("input_ids"), args.pop("attention_mask"), **args)


def test_generate_refuses_a_module_without_a_kv_cache():
    class LogitsOnly(nnx.Module):  # the call of a CausalLM, no cache
        def __call__(self, input_ids, attention_mask=None):
            return jnp.zeros((*jnp.shape(input_ids), 7))

    for call in (lambda m: greedy_generate(m, np.ones((1, 2), np.int32), max_new_tokens=1),
                 greedy_generator):
        with pytest.raises(TypeError, match="model: greedy decoding needs a .*CausalLM.*LogitsOnly"):
            call(LogitsOnly())


def test_generate_converts_scalar_arguments_to_static_ints(tiny_model, monkeypatch):
    # jit's static arguments must be hashable: a JAX or NumPy scalar is passed on as an int.
    seen = {}
    monkeypatch.setattr(generate_module, "_generate",
                        lambda model, ids, mask, new, eos: seen.update(new=new, eos=eos))
    greedy_generate(tiny_model, np.ones((1, 3), np.int32), max_new_tokens=np.int64(2),
                    eos_token_id=jnp.int32(7))
    assert seen == {"new": 2, "eos": 7} and type(seen["eos"]) is int
