"""Greedy generation with a static-shape KV cache (one compile per prompt shape and length)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from taskpgm_jax.models.decoder import CausalLM


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "eos_token_id"))
def _generate(model: CausalLM, input_ids, attention_mask, max_new_tokens: int, eos_token_id):
    b, s = input_ids.shape
    mask = attention_mask.astype(jnp.int32)
    cache = model.init_cache(b, s + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.decode(input_ids, cache, token_mask=mask, positions=positions)
    # The prediction comes from the last real token, wherever the padding is (left or right).
    last = jnp.max(jnp.where(mask > 0, jnp.arange(s), 0), axis=1)
    token = jnp.argmax(logits[jnp.arange(b), last], axis=-1).astype(jnp.int32)
    next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)
    done = jnp.zeros((b,), bool) if eos_token_id is None else token == eos_token_id

    def step(carry, _):
        token, pos, done, cache = carry
        logits, cache = model.decode(token[:, None], cache, positions=pos[:, None])
        new = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        if eos_token_id is not None:  # finished rows keep emitting eos
            new = jnp.where(done, eos_token_id, new)
            done = done | (new == eos_token_id)
        return (new, pos + 1, done, cache), new

    _, rest = jax.lax.scan(step, (token, next_pos, done, cache), None, length=max_new_tokens - 1)
    return jnp.concatenate([token[:, None], rest.T], axis=1)


def greedy_generate(model: CausalLM, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                    max_new_tokens: int, eos_token_id: int | None = None) -> jax.Array:
    """Greedy decoding: one prefill over the prompt, then one cached step per new token.

    Args:
      model: the `CausalLM`.
      input_ids: int [B, S] prompts (padding on either side, marked in attention_mask).
      attention_mask: [B, S], 1 for prompt tokens (default: all ones).
      max_new_tokens: number of tokens to generate (static).
      eos_token_id: once a row emits it, the row keeps emitting it.

    Returns:
      int32 [B, max_new_tokens] generated tokens.

    Example:
      >>> tokens = greedy_generate(model, ids, mask, max_new_tokens=16)
    """
    input_ids = model._check_ids(input_ids)  # values too: inside _generate they are traced
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if jnp.shape(attention_mask) != input_ids.shape:
        raise ValueError(f"attention_mask shape {list(jnp.shape(attention_mask))} != input_ids shape "
                         f"{list(input_ids.shape)}")
    return _generate(model, input_ids, jnp.asarray(attention_mask), max_new_tokens, eos_token_id)
