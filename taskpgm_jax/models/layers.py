"""Building blocks of the decoder: projections (with optional LoRA), RMSNorm, RoPE, attention, MLP.

Every parameter carries its logical axes as NNX metadata (`logical_axes`), resolved to mesh axes by
`taskpgm_jax.sharding`. Layers built for `lax.scan` get a leading "layers" axis on every parameter
(`lead` argument); inside the scan body each layer sees its own unstacked slice.
Sub-module names mirror Hugging Face (`q_proj`, `gate_proj`, `input_layernorm`, ...).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from taskpgm_jax.models.attention import chunked_attention, dot_attention, fused_attention
from taskpgm_jax.models.config import ModelConfig
from taskpgm_jax.sharding import Rules, shard

class LoRAParam(nnx.Variable):
    """A LoRA adapter matrix: its own variable type, so `wrt=LoRAParam` trains adapters only and
    `wrt=nnx.Param` trains base weights only."""


def _lead_axes(lead: tuple[int, ...]) -> tuple[str, ...]:
    return ("layers",) * len(lead)


def matmul_rows(x: jax.Array, w: jax.Array, **dot_kwargs) -> jax.Array:
    """x [..., in] @ w [in, out] as one 2-D matmul over all leading positions.

    The same product as `jnp.dot(x, w)`, but its weight gradient then contracts one flattened
    axis instead of (batch, sequence): XLA:CPU lowered the latter with transposing copies of the
    activations, and a training step of the small benchmark model ran ~25% slower (projections
    and LM head together)."""
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, **dot_kwargs)
    return y.reshape(*x.shape[:-1], w.shape[-1])


class Dense(nnx.Module):
    """y = x W (+ b) (+ scale * (x A) B). W: [*lead, in, out] (HF stores it as [out, in]).

    Args:
      in_features, out_features: sizes of the input and output.
      axes: logical axes of (in, out), e.g. ("embed", "mlp").
      cfg: model config (dtypes, init std).
      use_bias: whether there is a bias [*lead, out].
      lead: leading stacked dims (the layer axis for scanned layers).
      rngs: random streams.
    """

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], cfg: ModelConfig,
                 *, use_bias: bool = False, lead: tuple[int, ...] = (), rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        self.kernel = nnx.Param(
            init(rngs.params(), lead + (in_features, out_features), cfg.param_dtype),
            logical_axes=_lead_axes(lead) + axes,
        )
        self.bias = (
            nnx.Param(jnp.zeros(lead + (out_features,), cfg.param_dtype),
                      logical_axes=_lead_axes(lead) + axes[1:])
            if use_bias else None
        )
        self.dtype = cfg.dtype
        self.axes = axes
        # Filled by `taskpgm_jax.models.lora.add_lora`.
        # nnx.data: these slots hold variables once set, so NNX must treat them as data, not static.
        self.lora_a: LoRAParam | None = nnx.data(None)
        self.lora_b: LoRAParam | None = nnx.data(None)
        self.lora_scale = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = matmul_rows(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            assert self.lora_b is not None  # add_lora sets both factors, merge_lora clears both
            y = y + self.lora_scale * lora_delta(x, self.lora_a[...].astype(self.dtype),
                                                 self.lora_b[...].astype(self.dtype))
        return y


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x A) B for one adapter (A: [in, R], B: [R, out]) or for G stacked adapters (A: [G, in, R],
    B: [G, R, out]) whose inputs are folded into the batch adapter-major: rows [g B', (g+1) B') of
    x [G B', ..., in] belong to adapter g. Folding, rather than a vmap over the adapter axis, keeps
    the base matmuls and attention in the single-model layout (see `multi_adapter_forward`)."""
    if a.ndim == 2:
        return matmul_rows(matmul_rows(x, a), b)
    groups = a.shape[0]
    xg = x.reshape(groups, -1, x.shape[-1])
    low = jnp.einsum("gni,gir->gnr", xg, a)
    return jnp.einsum("gnr,gro->gno", low, b).reshape(*x.shape[:-1], b.shape[-1])


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in float32 whatever the compute dtype.

    Args:
      cfg: model config (size, epsilon, dtypes).
      lead: leading stacked dims.
    """

    def __init__(self, cfg: ModelConfig, *, lead: tuple[int, ...] = ()):
        self.weight = nnx.Param(jnp.ones(lead + (cfg.hidden_size,), cfg.param_dtype),
                                logical_axes=_lead_axes(lead) + ("norm",))
        self.eps = cfg.rms_norm_eps
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] of RoPE, with "linear" or "llama3" scaling applied.

    Computed in float32 like the reference implementation, so positions rotate identically.

    Args:
      cfg: model config.

    Returns:
      float32 NumPy array of shape [head_dim // 2].
    """
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv.astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position * frequency, float32 [B, S, H/2]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, S, heads, H] in the "rotate half" layout Hugging Face checkpoints use.

    The first and second halves of the head dimension form the (real, imaginary) pairs, so no
    permutation of q/k weights is needed when loading HF checkpoints.
    """
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head attention with grouped kv heads, RoPE and optional q/k/v (and o) biases.

    Args:
      cfg: model config.
      lead: leading stacked dims.
      rules: sharding rules for activation constraints.
      rngs: random streams.
    """

    def __init__(self, cfg: ModelConfig, *, lead: tuple[int, ...] = (), rules: Rules | None = None,
                 rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.qkv_bias
        assert qkv_bias is not None  # ModelConfig.__post_init__ resolves None per architecture
        self.q_proj = Dense(d, n * h, ("embed", "heads"), cfg, use_bias=qkv_bias, lead=lead, rngs=rngs)
        self.k_proj = Dense(d, k * h, ("embed", "kv_heads"), cfg, use_bias=qkv_bias, lead=lead, rngs=rngs)
        self.v_proj = Dense(d, k * h, ("embed", "kv_heads"), cfg, use_bias=qkv_bias, lead=lead, rngs=rngs)
        self.o_proj = Dense(n * h, d, ("heads", "embed"), cfg, use_bias=cfg.o_bias, lead=lead, rngs=rngs)
        self.shape = (n, k, h)
        self.dtype = cfg.dtype
        self.impl = cfg.attention_impl
        self.chunk = cfg.attention_chunk
        self.rules = rules

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """x: [B, S, D]; mask: bool [B, S, Sk]; cache: optional (k, v) [B, M, K, H] written at
        `cache_index` (then Sk = M). Without a cache the mask must be causal (no query sees a later
        key), as `CausalLM` builds it; a fused `attention_impl` also takes mask None (plain causal).
        Returns (output [B, S, D], updated cache or None)."""
        n, kv, h = self.shape
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, s, n, h), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, s, kv, h), cos, sin)
        v = self.v_proj(x).reshape(b, s, kv, h)
        if cache is not None:
            ck, cv = cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            cache = (k, v)
        q = shard(q.reshape(b, s, kv, n // kv, h), ("batch", "seq", "kv_heads", None, "head_dim"), self.rules)
        if self.impl == "dot":
            out = dot_attention(q, k, v, mask, self.dtype)
        elif self.impl == "chunked":
            out = chunked_attention(q, k, v, mask, chunk=self.chunk, dtype=self.dtype)
        else:
            out = fused_attention(q.astype(self.dtype), k, v, mask, causal=cache is None,
                                  implementation=self.impl)
        out = out.reshape(b, s, n * h)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).

    Args:
      cfg: model config.
      lead: leading stacked dims.
      rules: sharding rules for activation constraints.
      rngs: random streams.
    """

    def __init__(self, cfg: ModelConfig, *, lead: tuple[int, ...] = (), rules: Rules | None = None,
                 rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Dense(d, f, ("embed", "mlp"), cfg, lead=lead, rngs=rngs)
        self.up_proj = Dense(d, f, ("embed", "mlp"), cfg, lead=lead, rngs=rngs)
        self.down_proj = Dense(f, d, ("mlp", "embed"), cfg, lead=lead, rngs=rngs)
        self.rules = rules

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        hidden = shard(hidden, ("batch", "seq", "mlp"), self.rules)
        return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)).

    Args:
      cfg: model config.
      lead: leading stacked dims ((L,) when the layers are scanned).
      rules: sharding rules for activation constraints.
      rngs: random streams.
    """

    def __init__(self, cfg: ModelConfig, *, lead: tuple[int, ...] = (), rules: Rules | None = None,
                 rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg, lead=lead)
        self.self_attn = Attention(cfg, lead=lead, rules=rules, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg, lead=lead)
        self.mlp = MLP(cfg, lead=lead, rules=rules, rngs=rngs)
        self.rules = rules

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """Returns (x [B, S, D], updated (k, v) cache or None)."""
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        x = shard(x + attn, ("batch", "seq", "act_embed"), self.rules)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return shard(x, ("batch", "seq", "act_embed"), self.rules), cache
