"""Frozen, hashable configurations of the decoder and of LoRA adapters."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp

ARCHITECTURES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder for Llama 1/2/3, Qwen2 and Mistral.

    Field names follow the Hugging Face config keys so the mapping to config.json is readable.

    Attributes:
      model_type: "llama", "qwen2" or "mistral" (only written back into config.json).
      vocab_size, hidden_size, intermediate_size, num_hidden_layers: sizes V, D, F, L.
      num_attention_heads, num_key_value_heads, head_dim: N, K, H (K divides N: grouped queries).
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base.
      rope_type: "default", "linear" or "llama3".
      rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position:
        parameters of "linear" (factor only) and "llama3" scaling.
      max_position_embeddings: recorded for export; positions are not clipped to it.
      tie_word_embeddings: the LM head reuses the embedding matrix.
      qkv_bias: biases on q/k/v projections (Qwen2 always; Llama with attention_bias). None (the
        default) takes the architecture's own: True for qwen2, False otherwise.
      o_bias: bias on the output projection (Llama with attention_bias only). Each architecture
        holds only its own bias layout (qwen2: q/k/v only; mistral: none; llama: all four or
        none); any other combination is refused here rather than lost at export.
      sliding_window: window W (a query sees the W most recent keys including itself) or None.
      sliding_window_layers: indices of the layers that use the window (Mistral: all; Qwen2: those
        >= max_window_layers when use_sliding_window).
      dtype: compute dtype of matmuls (bf16 by default). Norms, softmax and logits are always f32.
      param_dtype: storage dtype of parameters (f32 by default, for training).
      scan_layers: stack the layers and run them with `lax.scan` (compile time independent of depth).
      remat: recompute each layer's activations in the backward pass (`jax.checkpoint`).
      init_std: standard deviation of random initialisation.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool | None = None
    o_bias: bool = False
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] = ()
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"ModelConfig.model_type={self.model_type!r} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.model_type == "qwen2")
        self._check_biases()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"ModelConfig.rope_type={self.rope_type!r} is not supported; supported: {ROPE_TYPES}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be positive, got {self.sliding_window}")
        bad = [i for i in self.sliding_window_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"ModelConfig.sliding_window_layers has out-of-range layers {bad}")
        if self.sliding_window_layers and self.sliding_window is None:
            raise ValueError("ModelConfig.sliding_window_layers is set but sliding_window is None")

    def _check_biases(self):
        # transformers builds each architecture with a fixed bias layout and drops (or zero-fills)
        # any other, so such a model would export without error and compute something else.
        got = f"got qkv_bias={self.qkv_bias}, o_bias={self.o_bias}"
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ValueError(f"ModelConfig(model_type='qwen2') has biases on q/k/v and none on "
                             f"o_proj: set qkv_bias=True and o_bias=False ({got})")
        if self.model_type == "mistral" and (self.qkv_bias or self.o_bias):
            raise ValueError(f"ModelConfig(model_type='mistral') has no attention biases: set "
                             f"qkv_bias=False and o_bias=False, or use model_type='llama' (q/k/v/o "
                             f"biases) or 'qwen2' (q/k/v biases) ({got})")
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ValueError(f"ModelConfig(model_type='llama') has one attention_bias for q/k/v "
                             f"and o_proj: set qkv_bias and o_bias equal, or use "
                             f"model_type='qwen2' for q/k/v biases only ({got})")

    def replace(self, **changes) -> ModelConfig:
        """Returns a copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def num_groups(self) -> int:
        """Query heads per kv head (G = N / K)."""
        return self.num_attention_heads // self.num_key_value_heads


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: W x + (alpha / rank) * B(A(x)), A: [in, R], B: [R, out].

    Attributes:
      rank: R.
      alpha: scale numerator; the update is scaled by alpha / rank.
      targets: projection names that get an adapter (subset of `LORA_TARGETS`).
      init_std: std of A's random init; B starts at zero so a fresh adapter changes nothing.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) \
                or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))
        for name in ("alpha", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value) or value < 0 or (name == "alpha" and value == 0):
                raise ValueError(f"LoraConfig.{name} must be a finite number "
                                 f"{'> 0' if name == 'alpha' else '>= 0'}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.targets, str):
            raise ValueError(f"LoraConfig.targets must be a tuple of projection names, got the "
                             f"string {self.targets!r}; write ({self.targets!r},)")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"LoraConfig.targets has unknown names {unknown or '(empty)'}; "
                f"choose from {LORA_TARGETS}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
