"""Frozen, hashable configurations of the decoder and of LoRA adapters."""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any, Literal, get_args

import jax.numpy as jnp
import numpy as np

ARCHITECTURES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
AttentionImpl = Literal["dot", "chunked", "xla", "cudnn"]
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)


def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` as a Python int >= minimum, or a ValueError naming `name`. NumPy ints and concrete
    JAX int scalars are accepted (they convert with `operator.index`), bools and floats are not."""
    try:
        number = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def _int(owner: str, name: str, value, minimum: int = 1) -> int:
    return check_int(f"{owner}.{name}", value, minimum)


def _real(owner: str, name: str, value, positive: bool = True) -> float:
    """`value` as a finite float > 0 (>= 0 unless `positive`), or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{owner}.{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {value!r}")
    return float(value)


def _bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}.{name} must be True or False, got {value!r}")
    return bool(value)


def _tuple(owner: str, name: str, value, item) -> tuple:
    """A list or tuple as a tuple of distinct `item(owner, name[i], x)` (a config must be
    hashable: it is a static jit argument)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{owner}.{name} must be a tuple, got {value!r}")
    value = tuple(item(owner, f"{name}[{i}]", x) for i, x in enumerate(value))
    if len(set(value)) != len(value):
        raise ValueError(f"{owner}.{name} has duplicates: {list(value)}")
    return value


def _name(owner: str, name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{owner}.{name} must be a string, got {value!r}")
    return value


def check_token_ids(name: str, value, several: bool = False):
    """A special token id: None, an int (NumPy ints too; negative ones are kept, as LLaMA-1's
    pad_token_id -1), or, when `several`, a list or tuple of ints stored as a tuple; else a
    ValueError naming `name`."""
    def one(x):
        if isinstance(x, (bool, np.bool_)):
            return None
        try:
            return operator.index(x)
        except TypeError:
            return None

    if value is None:
        return None
    if several and isinstance(value, (list, tuple)):
        ids = tuple(one(x) for x in value)
        if None not in ids:
            return ids
    elif one(value) is not None:
        return one(value)
    what = "an int, a list of ints" if several else "an int"
    raise ValueError(f"{name} must be {what} or None, got {value!r}")


def float_dtype(value, name: str) -> np.dtype:
    """`value` (a floating dtype, its scalar type or its name) as a `jnp.dtype`, else a ValueError
    naming `name`."""
    try:
        dtype = None if value is None else jnp.dtype(value)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype such as jnp.float32, jnp.bfloat16 or "
                         f"'bfloat16', got {value!r}")
    return dtype


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
      rms_norm_eps, rope_theta, rope_factor, rope_*_freq_factor: finite and > 0; for "llama3"
        rope_high_freq_factor > rope_low_freq_factor.
      max_position_embeddings: recorded for export; positions are not clipped to it.
      tie_word_embeddings: the LM head reuses the embedding matrix.
      qkv_bias: biases on q/k/v projections (Qwen2 always; Llama with attention_bias). None (the
        default) takes the architecture's own: True for qwen2, False otherwise.
      o_bias: bias on the output projection (Llama with attention_bias only). Each architecture
        holds only its own bias layout (qwen2: q/k/v only; mistral: none; llama: all four or
        none); any other combination is refused here rather than lost at export.
      sliding_window: window W (a query sees the W most recent keys including itself) or None;
        a window needs at least one layer in sliding_window_layers (an empty tuple is refused).
      sliding_window_layers: indices of the layers that use the window (Mistral: all, or those
        of layer_types; Qwen2: those >= max_window_layers when use_sliding_window), no
        duplicates; a list is stored as a tuple (the config is hashable: it is a static argument
        under jit). Llama has no window (one is refused, as transformers builds none). A
        mistral window on some layers only is Ministral's layout: exported with `layer_types`,
        which transformers' Auto classes load as MinistralForCausalLM.
      dtype: compute dtype of matmuls (bf16 by default). Norms, softmax and logits are always f32.
      param_dtype: storage dtype of parameters (f32 by default, for training).
        Both take any floating dtype `jnp.dtype` understands (jnp.bfloat16, np.float32,
        "bfloat16") and are stored as a `jnp.dtype`, so equal dtypes give equal configs.
      scan_layers: stack the layers and run them with `lax.scan` (compile time independent of depth).
      remat: recompute each layer's activations in the backward pass (`jax.checkpoint`).
      attention_impl: how attention runs; every choice computes the same function.
        "dot" (the default): our einsums with a float32 softmax; the [B, N, S, S] scores are
          materialised (and kept for the backward pass unless `remat`).
        "chunked": the keys `attention_chunk` at a time with an online softmax (any backend):
          [B, N, S, attention_chunk] scores at a time instead of [B, N, S, S].
        "xla": `jax.nn.dot_product_attention` with its XLA implementation (the same algorithm;
          there so that the fused path's layout and masks are tested on any backend).
        "cudnn": `jax.nn.dot_product_attention` with cuDNN flash attention: scores never
          materialise, causal blocks above the diagonal are skipped. NVIDIA GPUs only (checked
          when traced), `dtype` bfloat16 or float16 and head_dim a multiple of 8 (checked here).
      attention_chunk: keys per step of "chunked" attention (a positive int; unused otherwise).
      init_std: standard deviation of random initialisation.
      bos_token_id, eos_token_id, pad_token_id: the checkpoint's special token ids (None: not
        set). They do not change the logits; they are read from config.json and written back on
        export, where transformers' `generate` takes its stopping token from eos_token_id (one
        int, or a tuple of ints as in Llama 3.1 Instruct; a list is stored as a tuple).

    Sizes are ints (NumPy ints are accepted and stored as int, bools are refused); the flags are
    bools. Anything else raises a ValueError naming the field.
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
    attention_impl: AttentionImpl = "dot"
    attention_chunk: int = 512
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        self._check_types()
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
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError("ModelConfig.rope_high_freq_factor must be > rope_low_freq_factor for "
                             f"rope_type='llama3', got {self.rope_high_freq_factor} and "
                             f"{self.rope_low_freq_factor}")
        bad = [i for i in self.sliding_window_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"ModelConfig.sliding_window_layers has out-of-range layers {bad}")
        if self.sliding_window_layers and self.sliding_window is None:
            raise ValueError("ModelConfig.sliding_window_layers is set but sliding_window is None")
        self._check_window_layout()
        if self.sliding_window is not None and not self.sliding_window_layers:
            # A window on no layer would be silently ignored (and exported as full attention).
            raise ValueError(
                f"ModelConfig.sliding_window={self.sliding_window} applies to no layer: "
                f"sliding_window_layers is empty. Set sliding_window_layers to the windowed "
                f"layers (every layer, as in Mistral: tuple(range({self.num_hidden_layers}))), "
                f"or sliding_window=None for full attention")
        self._check_attention_impl()

    def _check_types(self):
        """Checks (and normalises) every field's type and range; stored back in place."""
        def put(name, value):
            object.__setattr__(self, name, value)

        own = "ModelConfig"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "rope_original_max_position", "max_position_embeddings", "attention_chunk"):
            put(name, _int(own, name, getattr(self, name)))
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            put(name, _real(own, name, getattr(self, name)))
        put("init_std", _real(own, "init_std", self.init_std, positive=False))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            put(name, check_token_ids(f"{own}.{name}", getattr(self, name),
                                      several=name == "eos_token_id"))
        for name in ("tie_word_embeddings", "o_bias", "scan_layers", "remat"):
            put(name, _bool(own, name, getattr(self, name)))
        if self.qkv_bias is not None:
            put("qkv_bias", _bool(own, "qkv_bias", self.qkv_bias))
        if self.sliding_window is not None:
            put("sliding_window", _int(own, "sliding_window", self.sliding_window))
        layers = _tuple(own, "sliding_window_layers", self.sliding_window_layers,
                        lambda o, n, i: _int(o, n, i, minimum=0))
        put("sliding_window_layers", layers)
        put("dtype", float_dtype(self.dtype, "ModelConfig.dtype"))
        put("param_dtype", float_dtype(self.param_dtype, "ModelConfig.param_dtype"))

    def _check_attention_impl(self):
        impl = self.attention_impl
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"ModelConfig.attention_impl={impl!r} is not supported; choose one of "
                             f"{ATTENTION_IMPLS}")
        if impl != "cudnn":
            return
        if self.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"ModelConfig.attention_impl='cudnn' needs dtype bfloat16 or float16 "
                             f"(cuDNN flash attention has no float32 kernel), got dtype={self.dtype}; "
                             f"set dtype=jnp.bfloat16 or attention_impl='dot'")
        if self.head_dim % 8:
            raise ValueError(f"ModelConfig.attention_impl='cudnn' needs head_dim a multiple of 8, "
                             f"got {self.head_dim}; use attention_impl='dot'")

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

    def _check_window_layout(self):
        # As with biases: transformers' Llama has no window, so a llama config with one would
        # export as a model that computes something else.
        if self.model_type == "llama" and self.sliding_window is not None:
            raise ValueError(f"ModelConfig(model_type='llama') has no sliding window, got "
                             f"sliding_window={self.sliding_window}: set sliding_window=None, or "
                             f"use model_type='mistral' or 'qwen2' (window on the layers in "
                             f"sliding_window_layers)")

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
      targets: projection names that get an adapter (subset of `LORA_TARGETS`, no duplicates; a
        list is stored as a tuple so the config stays hashable).
      init_std: std of A's random init; B starts at zero so a fresh adapter changes nothing.
      param_dtype: storage dtype of A and B, float32 by default whatever the base's
        `ModelConfig.param_dtype` (the trainer needs float32 master weights, and a bfloat16 base
        is the usual way to fit a large model for LoRA). Any floating dtype `jnp.dtype`
        understands, stored as a `jnp.dtype`. The adapters compute in the model's compute dtype
        (`ModelConfig.dtype`), as the base does.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    init_std: float = 0.02
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "rank", _int("LoraConfig", "rank", self.rank))
        object.__setattr__(self, "alpha", _real("LoraConfig", "alpha", self.alpha))
        object.__setattr__(self, "init_std", _real("LoraConfig", "init_std", self.init_std,
                                                   positive=False))
        object.__setattr__(self, "param_dtype", float_dtype(self.param_dtype,
                                                            "LoraConfig.param_dtype"))
        if isinstance(self.targets, str):
            raise ValueError(f"LoraConfig.targets must be a tuple of projection names, got the "
                             f"string {self.targets!r}; write ({self.targets!r},)")
        object.__setattr__(self, "targets", _tuple("LoraConfig", "targets", self.targets, _name))
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"LoraConfig.targets has unknown names {unknown or '(empty)'}; "
                f"choose from {LORA_TARGETS}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
