"""Greedy generation with a static-shape KV cache (one compile per prompt shape and length)."""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from taskpgm_jax.models.config import check_int
from taskpgm_jax.models.decoder import CausalLM, as_array


@nnx.jit(static_argnames=("max_new_tokens", "eos_token_id"))
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


class GreedyGenerator(Protocol):
    """What `greedy_generator` returns: `greedy_generate` with its model bound."""

    def __call__(self, input_ids: ArrayLike, attention_mask: ArrayLike | None = None, *,
                 max_new_tokens: int, eos_token_id: int | None = None) -> jax.Array: ...


def greedy_generate(model: CausalLM, input_ids: ArrayLike, attention_mask: ArrayLike | None = None, *,
                    max_new_tokens: int, eos_token_id: int | None = None) -> jax.Array:
    """Greedy decoding: one prefill over the prompt, then one cached step per new token.

    Args:
      model: the `CausalLM`.
      input_ids: int [B, S] prompts (padding on either side, marked in attention_mask).
      attention_mask: [B, S], 1 for prompt tokens (default: all ones).
      max_new_tokens: number of tokens to generate (static), an int >= 1.
      eos_token_id: once a row emits it, the row keeps emitting it. An int in [0, vocab_size) or
        None; a NumPy or concrete JAX int scalar is converted to int (it is a static argument).

    Returns:
      int32 [B, max_new_tokens] generated tokens.

    Raises:
      TypeError: a model that is not a `CausalLM`.
      ValueError: empty prompts (S = 0, or a row of attention_mask without a 1), a mask that is
        not 0/1, or an argument of the wrong type or range (naming it).

    Example:
      >>> tokens = greedy_generate(model, ids, mask, max_new_tokens=16)
    """
    args = _checked_arguments(model, input_ids, attention_mask, max_new_tokens, eos_token_id)
    return _generate(model, *args)


def greedy_generator(model: CausalLM) -> GreedyGenerator:
    """`greedy_generate` bound to one model, for a loop over many prompt batches.

    `greedy_generate(model, ...)` walks the model's module graph on every call (milliseconds on
    a deep model, more than a short generation on a small one); the callable returned here walks
    it once. The model must not be changed while the callable is in use.

    Returns:
      `generate(input_ids, attention_mask=None, *, max_new_tokens, eos_token_id=None)`, with the
      arguments, checks and result of `greedy_generate`.

    Example:
      >>> generate = greedy_generator(model)
      >>> outputs = [generate(ids, mask, max_new_tokens=16) for ids, mask in prompt_batches]
    """
    _check_model(model)
    run = nnx.cached_partial(_generate, model)

    def generate(input_ids: ArrayLike, attention_mask: ArrayLike | None = None, *,
                 max_new_tokens: int, eos_token_id: int | None = None) -> jax.Array:
        return run(*_checked_arguments(model, input_ids, attention_mask, max_new_tokens,
                                       eos_token_id))

    return generate


def _check_model(model: object) -> None:
    # Decoding needs the KV cache (init_cache / decode) and the id checks of a CausalLM: another
    # module would fail deep inside with an AttributeError.
    if not isinstance(model, CausalLM):
        raise TypeError(f"model: greedy decoding needs a taskpgm_jax.models.CausalLM (it uses its "
                        f"KV cache), got {type(model).__name__}")


def _checked_arguments(model, input_ids, attention_mask, max_new_tokens, eos_token_id):
    """greedy_generate's arguments checked (values too: inside _generate they are traced) and
    normalised: (input_ids, attention_mask, max_new_tokens, eos_token_id)."""
    _check_model(model)
    input_ids = model._check_ids(input_ids)  # values too: inside _generate they are traced
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids has no tokens (shape {list(input_ids.shape)}): each prompt "
                         "needs at least one, e.g. the tokenizer's BOS")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens)
    if eos_token_id is not None:
        eos_token_id = check_int("eos_token_id", eos_token_id, minimum=0)
        if eos_token_id >= model.config.vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id} is not below the model's vocab_size="
                             f"{model.config.vocab_size}: the model can never emit it; pass the "
                             "tokenizer that matches the model")
    attention_mask = (jnp.ones_like(input_ids) if attention_mask is None
                      else as_array(attention_mask, "attention_mask"))
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {list(attention_mask.shape)} != input_ids shape "
                         f"{list(input_ids.shape)}")
    if not isinstance(attention_mask, jax.core.Tracer):
        mask = np.asarray(attention_mask)
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold 1 for prompt tokens and 0 for padding, got "
                             f"{sorted(set(np.unique(mask).tolist()) - {0, 1})[:3]}")
        empty = np.flatnonzero(~mask.astype(bool).any(axis=1))
        if empty.size:
            raise ValueError(f"attention_mask rows {empty[:5].tolist()} have no prompt token; "
                             "each prompt needs at least one")
    return input_ids, attention_mask, max_new_tokens, eos_token_id
