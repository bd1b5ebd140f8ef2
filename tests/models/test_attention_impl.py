"""`ModelConfig.attention_impl`: the chunked and fused paths against our einsums ("dot").

"chunked" runs here as everywhere. CPU has no cuDNN, so the fused path runs here with its XLA
implementation: that checks everything of ours on that path (head grouping, masks for padding,
packing, sliding windows and the KV cache, the causal flag, gradients). The cuDNN kernel itself
is checked by `benchmarks/model.py --attention cudnn` on a GPU host, which asserts its logits
and gradients against "dot" before timing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taskpgm_jax.models import ModelConfig, greedy_generate, target_logprobs
from taskpgm_jax.models.attention import chunked_attention, dot_attention, fused_attention
from tests.models.conftest import TINY, forward, random_model

# Chunks of 4 keys: the 9- and 11-slot tests below take 3 steps, the last one padded.
IMPLS = {"xla": {"attention_impl": "xla"},
         "chunked": {"attention_impl": "chunked", "attention_chunk": 4}}


@pytest.fixture(scope="module", params=sorted(IMPLS))
def other_model(request, tiny_model):
    """TINY's weights under another attention_impl."""
    model = random_model(TINY.replace(**IMPLS[request.param]))
    nnx.update(model, nnx.state(tiny_model))
    return model


def _packed_loss(model, ids, seg, targets):
    lp = target_logprobs(model(ids, segment_ids=seg), targets)
    return -jnp.sum(jnp.where(seg > 0, lp, 0.0))


# Module-level, so that the "dot" reference compiles once for both parametrisations.
_packed_forward = nnx.jit(lambda m, i, s: m(i, segment_ids=s))
_packed_grad = nnx.jit(nnx.grad(_packed_loss))


def _batch(rng):
    """Right and left padding plus a packed row, longer than layer 1's window of 4."""
    ids = rng.integers(0, TINY.vocab_size, size=(3, 9))
    seg = np.array([[1] * 9, [0, 0] + [1] * 7, [1] * 4 + [2] * 3 + [0] * 2])
    return jnp.asarray(ids, jnp.int32), jnp.asarray(seg, jnp.int32)


def test_kernels_equal_a_float64_softmax(rng):
    # Grouped queries (2 kv heads x 3 queries each), an arbitrary causal mask with an empty row.
    b, s, kv, g, h = 2, 7, 2, 3, 8
    q = rng.standard_normal((b, s, kv, g, h)).astype(np.float32)
    k = rng.standard_normal((b, s, kv, h)).astype(np.float32)
    v = rng.standard_normal((b, s, kv, h)).astype(np.float32)
    mask = np.tril(rng.random((b, s, s)) < 0.7)
    mask[:, np.arange(s), np.arange(s)] = True
    mask[1, 3] = False  # a query that sees nothing (padding): any finite output
    scores = np.einsum("bqkgh,bskh->bkgqs", q.astype(np.float64), k) / np.sqrt(h)
    scores = np.where(mask[:, None, None], scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True, initial=0.0, where=np.isfinite(scores))
    probs = np.exp(scores - top)
    probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)
    want = np.einsum("bkgqs,bskh->bqkgh", probs, v)
    args = tuple(map(jnp.asarray, (q, k, v, mask)))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(fused_attention(*args, causal=True, implementation="xla"))
        ours = np.asarray(dot_attention(*args, jnp.float32))
        chunks = {c: np.asarray(chunked_attention(*args, chunk=c, dtype=jnp.float32))
                  for c in (3, 16)}  # three steps, the last padded; one step past Sk
    seen = mask.any(-1)  # [B, S]
    for out in (got, ours, *chunks.values()):
        np.testing.assert_allclose(out[seen], want[seen], atol=2e-6)
        assert np.isfinite(out).all()
    # mask=None: plain causal attention.
    causal = np.broadcast_to(np.tril(np.ones((s, s), bool)), (b, s, s))
    with jax.default_matmul_precision("highest"):
        plain = np.asarray(fused_attention(*map(jnp.asarray, (q, k, v)), None, causal=True,
                                           implementation="xla"))
        ref = np.asarray(dot_attention(*map(jnp.asarray, (q, k, v, causal)), jnp.float32))
        plain_chunked = np.asarray(chunked_attention(*map(jnp.asarray, (q, k, v)), None, chunk=3,
                                                     dtype=jnp.float32))
    np.testing.assert_allclose(plain, ref, atol=2e-6)
    np.testing.assert_allclose(plain_chunked, ref, atol=2e-6)
    with pytest.raises(ValueError, match="mask=None means plain causal attention"):
        fused_attention(*map(jnp.asarray, (q, k, v)), None, causal=False, implementation="xla")


def test_model_equals_dot_on_padding_packing_and_windows(tiny_model, other_model, rng):
    ids, seg = _batch(rng)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(_packed_forward(tiny_model, ids, seg))
        got = np.asarray(_packed_forward(other_model, ids, seg))
        # And through the plain attention_mask path the other tests share.
        mask = (seg > 0).astype(jnp.int32)
        np.testing.assert_allclose(np.asarray(forward(other_model, ids, mask))[mask > 0],
                                   np.asarray(forward(tiny_model, ids, mask))[mask > 0], atol=1e-5)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-5)


def test_plain_causal_rows_reach_the_kernel_without_a_mask(rng, monkeypatch):
    # No padding, packing or window: the fused kernel gets mask=None and is_causal (cuDNN's
    # mask-free flash path), and the logits and gradients stay those of "dot".
    cfg = TINY.replace(sliding_window=None, sliding_window_layers=())
    dot = random_model(cfg, seed=2)
    fused = random_model(cfg.replace(attention_impl="xla"), seed=2)
    chunked = random_model(cfg.replace(**IMPLS["chunked"]), seed=2)  # its causal mask per step
    seen = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["mask"] is None, kwargs["is_causal"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, size=(2, 9)), jnp.int32)

    def loss(model, ids):
        return jnp.sum(target_logprobs(model(ids), jnp.roll(ids, -1, axis=1)))

    grad = nnx.jit(nnx.value_and_grad(loss))
    with jax.default_matmul_precision("highest"):
        want, want_grad = grad(dot, ids)
        got, got_grad = grad(fused, ids)
        masked = forward(fused, ids, jnp.ones_like(ids))  # an attention_mask: the masked path
        plain = forward(dot, ids, jnp.ones_like(ids))
        got_c, got_c_grad = grad(chunked, ids)
    assert seen and all(s == (True, True) for s in seen[:-1]) and seen[-1] == (False, True)
    np.testing.assert_allclose(np.asarray(masked), np.asarray(plain), atol=1e-5)
    for value, grads in ((got, got_grad), (got_c, got_c_grad)):
        np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
        for (path, a), (_, b) in zip(nnx.to_flat_state(want_grad), nnx.to_flat_state(grads),
                                     strict=True):
            np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), atol=2e-5,
                                       rtol=1e-4, err_msg=str(path))


def test_model_gradients_equal_dot(tiny_model, other_model, rng):
    ids, seg = _batch(rng)
    targets = jnp.roll(ids, -1, axis=1)
    with jax.default_matmul_precision("highest"):
        want = nnx.to_flat_state(_packed_grad(tiny_model, ids, seg, targets))
        got = nnx.to_flat_state(_packed_grad(other_model, ids, seg, targets))
    assert len(want) > 0
    for (path, a), (_, b) in zip(want, got, strict=True):
        np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), atol=2e-5, rtol=1e-4,
                                   err_msg=str(path))


def test_model_generates_the_same_tokens(tiny_model, other_model, rng):
    # Prefill and single-token decode run against the KV cache (not causal-aligned: causal=False).
    ids = rng.integers(0, TINY.vocab_size, size=(2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0
    with jax.default_matmul_precision("highest"):
        want = np.asarray(greedy_generate(tiny_model, ids, mask, max_new_tokens=5))
        got = np.asarray(greedy_generate(other_model, ids, mask, max_new_tokens=5))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kwargs, match", [
    ({"attention_impl": "flash"}, "attention_impl='flash' is not supported"),
    ({"attention_impl": "cudnn"}, "needs dtype bfloat16 or float16"),
    ({"attention_impl": "cudnn", "dtype": jnp.bfloat16, "head_dim": 12},
     "needs head_dim a multiple of 8"),
    ({"attention_impl": "chunked", "attention_chunk": 0}, "attention_chunk must be a positive int"),
])
def test_attention_impl_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**kwargs)


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
def test_cudnn_refused_off_gpu_by_name(rng, monkeypatch, backend):
    # The backend is pinned, so the refusal is checked on any host (a GPU one included).
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      dtype=jnp.bfloat16, attention_impl="cudnn")
    model = random_model(cfg)
    with pytest.raises(ValueError, match=f"attention_impl='cudnn' needs an NVIDIA GPU, but JAX "
                                         f"runs on '{backend}'"):
        model(jnp.asarray(rng.integers(0, 61, size=(1, 4)), jnp.int32))
