"""The decoder-only language model shared by Llama 1/2/3, Qwen2 and Mistral.

Structure and names mirror Hugging Face's `*ForCausalLM`: `model.embed_tokens`, `model.layers`,
`model.norm`, `lm_head`, so the checkpoint key map is a rename plus a transpose.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from taskpgm_jax.models.config import ModelConfig
from taskpgm_jax.models.layers import DecoderLayer, Dense, RMSNorm, matmul_rows, rope_angles, rope_inv_freq
from taskpgm_jax.sharding import Rules, shard

# Window of a layer without sliding-window attention: larger than any sequence.
_NO_WINDOW = np.iinfo(np.int32).max


class KVCache(NamedTuple):
    """Static-shape key/value cache for incremental decoding (M = maximum length).

    k, v:   [L, B, M, K, H], compute dtype.
    valid:  [B, M] bool, slot holds a real (non-padding) token.
    pos:    [B, M] int32, RoPE position of the token in each slot.
    index:  [] int32, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    pos: jax.Array
    # The field shadows tuple.index (a method), which mypy reports; the public name stays.
    index: jax.Array  # type: ignore[assignment]


class Embed(nnx.Module):
    """Token embedding [V, D]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        self.embedding = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype),
                                   logical_axes=("embed_vocab", "embed"))
        self.dtype = cfg.dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather from an all-gathered table (what FSDP does for every weight at use): a gather from
        # an embed-split table yields embed-split rows that XLA cannot cheaply turn batch-split.
        table = shard(self.embedding[...], (None, None))
        # Under jit the ids cannot be checked (CausalLM._check_ids does it when they are concrete):
        # clip, so an out-of-range id (junk under padding) gives a finite row, not NaNs that
        # attention spreads to every real token (0 * NaN).
        return jnp.take(table, ids, axis=0, mode="clip").astype(self.dtype)


class DecoderModel(nnx.Module):
    """Embedding, the stack of decoder layers and the final norm (HF's `model`)."""

    def __init__(self, cfg: ModelConfig, *, rules: Rules | None = None, rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg, rngs=rngs)
        # One stacked layer (leading axis L) when scanned, else a list of L layers.
        self.layers: DecoderLayer | nnx.List[DecoderLayer]
        if cfg.scan_layers:
            self.layers = DecoderLayer(cfg, lead=(cfg.num_hidden_layers,), rules=rules, rngs=rngs)
        else:
            self.layers = nnx.List(
                [DecoderLayer(cfg, rules=rules, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
            )
        self.norm = RMSNorm(cfg)


def _segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its segment: index minus the index where the segment began."""
    s = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def target_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets | prefix) from logits [..., V]: float32 [...] (the shared target scorer of
    the training loss, probe scoring and evaluation).

    The target's logit minus its row's logsumexp: two fused reads of the logits, where a
    log_softmax gather would store a normalised float32 copy of them all (the train step's
    temporaries were 4.5x the logits with it, 2.5x without; the probe step's peak 2.95x one batch
    of logits, 1.13x without). Out-of-range targets (HF's -100 under padding) give garbage or
    NaN: mask them with `where`, not a product."""
    logits32 = logits.astype(jnp.float32)
    idx = jnp.broadcast_to(targets[..., None], logits.shape[:-1] + (1,)).astype(jnp.int32)
    picked = jnp.take_along_axis(logits32, idx, axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits32, axis=-1)


class CausalLM(nnx.Module):
    """Decoder-only LM: `model(input_ids, attention_mask)` -> float32 logits [B, S, V].

    Args:
      cfg: the model config.
      rngs: random streams for initialisation.
      rules: logical -> mesh sharding rules for activation constraints (default rules if None).

    Example:
      >>> cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
      ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
      >>> model = CausalLM(cfg, rngs=nnx.Rngs(0))
      >>> logits = model(jnp.zeros((2, 8), jnp.int32))   # [2, 8, 128] float32
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: Rules | None = None):
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"CausalLM: cfg must be a ModelConfig, got {type(cfg).__name__}; "
                             "build one with ModelConfig(**fields)")
        self.config = cfg
        self.rules = rules
        self.model = DecoderModel(cfg, rules=rules, rngs=rngs)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else Dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs)
        )
        windows = np.full(cfg.num_hidden_layers, _NO_WINDOW, np.int32)
        windows[list(cfg.sliding_window_layers)] = cfg.sliding_window or _NO_WINDOW
        self._windows = tuple(int(w) for w in windows)  # static: hashable, not a parameter

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
        """Logits of the next token at every position: `logits_from_hidden(hidden_states(...))`.

        Args and checks as `hidden_states`.

        Returns:
          float32 logits [B, S, V]. Rows of padding positions are meaningless.
        """
        return self.logits_from_hidden(self.hidden_states(
            input_ids, attention_mask, segment_ids=segment_ids, positions=positions))

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None) -> jax.Array:
        """The final (normed) hidden states, before the LM head: for losses that apply the head
        a chunk of positions at a time, so that [B, S, V] logits never exist at once.

        Args:
          input_ids: int [B, S] in [0, vocab_size): checked (ValueError) when concrete; under jit
            an out-of-range id is clipped, so junk ids under padding do not reach real tokens.
          attention_mask: optional [B, S], 1 (any non-zero, as in transformers) for real tokens
            and 0 for padding (left or right).
          segment_ids: optional int [B, S] for packed rows: a token attends only to earlier
            tokens of its own segment; 0 marks padding.
          positions: optional int [B, S] RoPE positions. Default: the index inside the segment
            (with segment_ids), else the count of earlier real tokens (with attention_mask), else
            0..S-1.
          segment_ids and positions must have an int dtype (a float array is refused: it would
          be truncated); input_ids rows of different lengths are refused (pad them).

        Returns:
          [B, S, hidden_size] in the compute dtype. Rows of padding positions are meaningless.
        """
        input_ids = self._check_ids(input_ids)
        b, s = input_ids.shape
        if segment_ids is None:
            # As transformers: any non-zero mask entry is a real token (not a segment id).
            seg = jnp.ones((b, s), jnp.int32) if attention_mask is None else (self._check_2d(
                attention_mask, "attention_mask", (b, s)) != 0).astype(jnp.int32)
            if positions is None:
                positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0) if attention_mask is not None \
                    else jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        else:
            seg = self._check_2d(segment_ids, "segment_ids", (b, s), integer=True).astype(
                jnp.int32)
            if attention_mask is not None:
                seg = seg * (self._check_2d(attention_mask, "attention_mask", (b, s)) != 0).astype(
                    jnp.int32)
            if positions is None:
                positions = _segment_positions(seg)
        positions = self._check_2d(positions, "positions", (b, s), integer=True).astype(jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if (self.config.attention_impl != "dot" and attention_mask is None and segment_ids is None
                and self.config.sliding_window is None):
            # Plain causal rows: a fused kernel applies causality itself, with no mask operand
            # (cuDNN then runs its mask-free flash kernel and never computes a bias gradient).
            allowed = None
        else:
            allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) \
                & (slots[:, None, :] <= slots[:, :, None])
        h, _ = self._run(input_ids, positions, allowed, positions, None, None)
        return h

    def decode(self, input_ids: jax.Array, cache: KVCache, *, token_mask: jax.Array | None = None,
               positions: jax.Array) -> tuple[jax.Array, KVCache]:
        """Runs S new tokens against the cache (prefill: S = prompt length; decode: S = 1).

        Args:
          input_ids: int [B, S], written to cache slots index .. index + S - 1.
          cache: the `KVCache` from `init_cache(B, M)`; index + S must not exceed M (checked
            when the index is concrete; under jit a write past the end would overwrite earlier
            slots, so size M for the whole generation).
          token_mask: optional [B, S], 0 for padding tokens (never attended to).
          positions: int [B, S] RoPE positions of the new tokens.

        Returns:
          (float32 logits [B, S, V], updated cache).
        """
        input_ids = self._check_ids(input_ids)
        b, s = input_ids.shape
        self._check_cache(cache, b, s)
        valid_new = jnp.ones((b, s), bool) if token_mask is None else self._check_2d(
            token_mask, "token_mask", (b, s)).astype(bool)
        positions = self._check_2d(positions, "positions", (b, s), integer=True).astype(jnp.int32)
        at = (0, cache.index)
        valid = jax.lax.dynamic_update_slice(cache.valid, valid_new, at)
        kpos = jax.lax.dynamic_update_slice(cache.pos, positions, at)
        m = valid.shape[1]
        q_slot = cache.index + jnp.arange(s, dtype=jnp.int32)
        allowed = valid[:, None, :] & (jnp.arange(m, dtype=jnp.int32)[None, None, :] <= q_slot[None, :, None])
        h, (k, v) = self._run(input_ids, positions, allowed, kpos, (cache.k, cache.v), cache.index)
        return self.logits_from_hidden(h), KVCache(k, v, valid, kpos, cache.index + s)

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty `KVCache` for `batch` rows of at most `max_length` tokens."""
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
        return KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype),
                       jnp.zeros((batch, max_length), bool), jnp.zeros((batch, max_length), jnp.int32),
                       jnp.zeros((), jnp.int32))

    # -- internals -------------------------------------------------------------------------------

    def _run(self, input_ids, q_pos, allowed, k_pos, cache, cache_index):
        cfg = self.config
        cos, sin = rope_angles(q_pos, rope_inv_freq(cfg))
        windows = jnp.asarray(self._windows, jnp.int32)
        # Distance in positions, for sliding windows (a query sees keys with distance < W).
        dist = (q_pos[:, :, None] - k_pos[:, None, :]) if cfg.sliding_window is not None else None
        h = shard(self.model.embed_tokens(input_ids), ("batch", "seq", "act_embed"), self.rules)

        def layer_fn(layer, h, window, layer_cache):
            # allowed None: plain causal attention, no windows (`hidden_states`, fused only).
            mask = allowed if dist is None else allowed & (dist < window)
            return layer(h, cos, sin, mask, layer_cache, cache_index)

        if cfg.scan_layers:
            graphdef, state = nnx.split(self.model.layers)

            def body(h, xs):
                st, window, layer_cache = xs
                return layer_fn(nnx.merge(graphdef, st), h, window, layer_cache)

            if cfg.remat:
                body = jax.checkpoint(body, prevent_cse=False)
            h, new_cache = jax.lax.scan(body, h, (state, windows, cache))
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.model.layers):
                layer_cache = None if cache is None else (cache[0][i], cache[1][i])
                if cfg.remat:
                    graphdef, st = nnx.split(layer)
                    h, layer_cache = jax.checkpoint(
                        lambda st, h, w, c, g=graphdef: layer_fn(nnx.merge(g, st), h, w, c),
                        prevent_cse=False)(st, h, windows[i], layer_cache)
                else:
                    h, layer_cache = layer_fn(layer, h, windows[i], layer_cache)
                if layer_cache is not None:
                    ks.append(layer_cache[0])
                    vs.append(layer_cache[1])
            new_cache = (jnp.stack(ks), jnp.stack(vs)) if ks else None
        return self.model.norm(h), new_cache

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """The LM head: float32 logits [B, S', V] from hidden states [B, S', hidden_size] (S' may
        be a chunk of the positions)."""
        # Logits leave the model in float32 whatever the compute dtype (softmax / CE downstream).
        if self.lm_head is None:
            w = self.model.embed_tokens.embedding[...].astype(h.dtype).T
        else:
            w = self.lm_head.kernel[...].astype(h.dtype)
        logits = matmul_rows(h, w, preferred_element_type=jnp.float32)
        if self.lm_head is not None and self.lm_head.bias is not None:
            logits = logits + self.lm_head.bias[...].astype(jnp.float32)
        return shard(logits, ("batch", "seq", "vocab"), self.rules)

    def _check_ids(self, input_ids) -> jax.Array:
        input_ids = as_array(input_ids, "input_ids")
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError("input_ids must be an int array [batch, seq], got "
                             f"{input_ids.dtype}{list(input_ids.shape)}")
        # Values are known only for concrete arrays (a tracer has none; Embed clips instead).
        # Read eagerly: a concrete array closed over inside a caller's jit has values too.
        if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
            with jax.ensure_compile_time_eval():
                lo, hi = int(input_ids.min()), int(input_ids.max())
            vocab = self.config.vocab_size
            if lo < 0 or hi >= vocab:
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={vocab}), got {lo if lo < 0 else hi}; "
                    "pad with a valid id (e.g. the tokenizer's pad or eos id; padding is masked "
                    "anyway) or resize the embeddings to the tokenizer's vocabulary")
        return input_ids

    @staticmethod
    def _check_cache(cache: KVCache, b: int, s: int) -> None:
        batch, m = cache.valid.shape
        if batch != b:
            raise ValueError(f"decode: cache was built for batch {batch} (init_cache), but "
                             f"input_ids has batch {b}")
        # The index is known only outside jit; a traced one is the caller's to keep in range.
        index = None if isinstance(cache.index, jax.core.Tracer) else int(cache.index)
        if s > m or (index is not None and index + s > m):
            at = "" if index is None else f" at cache index {index}"
            raise ValueError(f"decode: {s} new tokens{at} do not fit the cache's "
                             f"max_length={m}; build it with init_cache(batch, max_length) large "
                             "enough for the prompt and every new token")

    @staticmethod
    def _check_2d(x, name: str, shape: tuple[int, int], integer: bool = False) -> jax.Array:
        x = as_array(x, name)
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {list(shape)} like input_ids, got {list(x.shape)}")
        # The dtype is static (known under jit too); a float would be truncated silently.
        if integer and not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array, got {x.dtype}; pass integer values "
                             f"(e.g. {name}.astype(jnp.int32) if they are whole numbers)")
        return x


def as_array(x, name: str) -> jax.Array:
    """`jnp.asarray(x)`, with rows of different lengths (a ragged list) named as such."""
    try:
        return jnp.asarray(x)
    except (ValueError, TypeError):
        # NumPy's own message ("inhomogeneous shape") does not say what to do.
        if isinstance(x, (list, tuple)) and len({len(r) if hasattr(r, "__len__") else -1
                                                 for r in x}) > 1:
            raise ValueError(f"{name} rows have different lengths; pad them "
                             "(tokenizer(..., padding=True)) and pass attention_mask") from None
        raise
