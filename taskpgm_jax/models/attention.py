"""Attention kernels: softmax(q k^T / sqrt(H) + mask) v for grouped queries, three ways.

`dot_attention` materialises the [B, N, Sq, Sk] float32 scores; `chunked_attention` walks the
keys a chunk at a time with an online softmax (memory O(Sq x chunk) per head, any backend);
`fused_attention` calls `jax.nn.dot_product_attention` (XLA, or cuDNN flash attention on NVIDIA
GPUs). All take q [B, Sq, K, G, H] (G query heads share each of the K kv heads), k and v
[B, Sk, K, H] and a boolean mask [B, Sq, Sk] shared by the heads, and compute the same function
with a float32 softmax. `ModelConfig.attention_impl` picks one.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

# Large negative score for masked keys: finite, so a row with no visible key (a padding query)
# gives a uniform softmax instead of NaN.
_MASKED = float(np.finfo(np.float32).min)


def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """Grouped-query attention with a float32 softmax.

    Args:
      q: [B, Sq, K, G, H] queries (G query heads share each kv head).
      k, v: [B, Sk, K, H].
      mask: bool [B, Sq, Sk], True where the query may see the key.
      dtype: compute dtype of the value product.

    Returns:
      [B, Sq, K, G, H].
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgqs,bskh->bqkgh", probs.astype(dtype), v.astype(dtype))


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                    causal: bool, implementation: Literal["xla", "cudnn"]) -> jax.Array:
    """`dot_attention` through `jax.nn.dot_product_attention` (XLA or cuDNN flash attention).

    Args:
      q: [B, Sq, K, G, H] queries; k, v: [B, Sk, K, H]; all in one compute dtype.
      mask: bool [B, Sq, Sk], True where the query may see the key (shared by all heads); it
        reaches the kernel as an additive bias. None: plain causal attention (needs `causal`),
        cuDNN's mask-free flash kernel.
      causal: every key after its query is hidden (Sq == Sk): cuDNN then skips the blocks above
        the diagonal. With a mask it never changes the result, only the work.
      implementation: "xla" or "cudnn".

    Returns:
      [B, Sq, K, G, H] in the compute dtype; the softmax runs in float32 in both implementations.
    """
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"ModelConfig.attention_impl='cudnn' needs an NVIDIA GPU, but JAX runs on "
                         f"{jax.default_backend()!r}: use attention_impl='dot' (or 'xla') here")
    if mask is None and not causal:
        raise ValueError("fused_attention: mask=None means plain causal attention; pass causal=True")
    b, sq, kv, g, h = q.shape
    # Heads are kv-major (head n = kv * G + g), the grouping jax.nn uses for grouped queries.
    out = jax.nn.dot_product_attention(
        q.reshape(b, sq, kv * g, h), k.astype(q.dtype), v.astype(q.dtype),
        mask=None if mask is None else mask[:, None], is_causal=causal,
        implementation=implementation)
    return out.reshape(b, sq, kv, g, h)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                      chunk: int, dtype) -> jax.Array:
    """`dot_attention` a chunk of keys at a time, with an online softmax.

    Each step scores the queries against `chunk` keys, rescales what earlier chunks
    accumulated by exp(old max - new max) and adds this chunk's share (the blockwise softmax of
    memory-efficient and flash attention). Only [B, N, Sq, chunk] scores exist at once, and the
    backward pass recomputes them (`jax.checkpoint` on the step) rather than keeping them; it
    keeps each step's running output instead ([B, N, Sq, H] float32 per step).

    Args:
      q, k, v: as `dot_attention`.
      mask: bool [B, Sq, Sk]; None: plain causal attention (Sq == Sk), built a chunk at a time.
      chunk: keys per step; Sk need not be a multiple (the last chunk is padded and masked).
      dtype: compute dtype of the value product (as `dot_attention`).

    Returns:
      [B, Sq, K, G, H] in `dtype`.
    """
    b, sq, kv, g, h = q.shape
    sk = k.shape[1]
    n = -(-sk // chunk)
    pad = n * chunk - sk

    def steps(x):  # [B, Sk, ...] -> [n, B, chunk, ...], padded
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    starts = jnp.arange(n, dtype=jnp.int32) * chunk
    # Mask columns per step: [n, B, Sq, chunk] (None: causal, made from the step's start).
    m_steps = None if mask is None else steps(mask.swapaxes(1, 2)).swapaxes(2, 3)
    scale = h ** -0.5

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def step(carry, xs):
        top, total, acc = carry                      # [B,K,G,Sq] twice, [B,K,G,Sq,H]; float32
        k_c, v_c, m_c, start = xs
        if m_c is None:
            keys = start + jnp.arange(chunk, dtype=jnp.int32)
            m_c = (keys[None, :] <= jnp.arange(sq, dtype=jnp.int32)[:, None]) & (keys < sk)
            m_c = m_c[None]
        s = jnp.einsum("bqkgh,bckh->bkgqc", q, k_c, preferred_element_type=jnp.float32) * scale
        s = jnp.where(m_c[:, None, None], s, _MASKED)
        # The result does not depend on the shift: no gradient flows through it.
        new_top = jax.lax.stop_gradient(jnp.maximum(top, jnp.max(s, axis=-1)))
        p = jnp.exp(s - new_top[..., None])
        keep = jnp.exp(top - new_top)                # rescales what earlier chunks summed
        total = total * keep + jnp.sum(p, axis=-1)
        acc = acc * keep[..., None] + jnp.einsum("bkgqc,bckh->bkgqh", p.astype(dtype),
                                                 v_c.astype(dtype),
                                                 preferred_element_type=jnp.float32)
        return (new_top, total, acc), None

    init = (jnp.full((b, kv, g, sq), _MASKED, jnp.float32), jnp.zeros((b, kv, g, sq), jnp.float32),
            jnp.zeros((b, kv, g, sq, h), jnp.float32))
    (_, total, acc), _ = jax.lax.scan(step, init, (steps(k), steps(v), m_steps, starts))
    return (acc / total[..., None]).transpose(0, 3, 1, 2, 4).astype(dtype)
