"""Hugging Face config.json <-> `ModelConfig`, with a whitelist of attributes.

Every key of config.json is either implemented (it changes the computation and we do it), inert
(metadata with no effect on logits), or refused with its name. Silently ignoring an attribute that
changes the maths (a new rope type, qk-norm, MLP bias, ...) would load a model that quietly
computes something else.
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
from typing import Any

import jax.numpy as jnp

from taskpgm_jax.models.config import ModelConfig, check_token_ids

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

# Keys whose value we read and implement.
_IMPLEMENTED = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers",
    "layer_types", "max_position_embeddings", "attention_dropout", "pretraining_tp", "use_mrope",
}
# Keys with no effect on the forward computation (token ids, bookkeeping, output switches).
_INERT = {
    "_name_or_path", "dtype", "torch_dtype",
    "transformers_version", "initializer_range", "use_cache", "id2label", "label2id",
    "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type",
    "return_dict", "chunk_size_feed_forward", "tokenizer_class", "task_specific_params",
    "_attn_implementation_autoset", "use_return_dict", "torchscript", "tie_encoder_decoder",
    "add_cross_attention", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id",
    "cross_attention_hidden_size", "is_decoder", "bad_words_ids", "max_length", "temperature",
    "max_sequence_length",  # LLaMA-1 configs: a copy of max_position_embeddings, read by nothing
}
# Keys with no effect on the logits that ModelConfig carries to the export: without them there,
# transformers takes its config class's defaults (Llama: eos 2, which a Llama 3 vocabulary holds
# as an ordinary token) or none at all, and `generate` of the exported model stops at the wrong
# token or never.
_CARRIED = ("bos_token_id", "eos_token_id", "pad_token_id")
# transformers 5 defaults of keys a config.json may omit (LlamaConfig, Qwen2Config,
# MistralConfig); read as constants because importing those classes imports torch.
_HF_SLIDING_WINDOW = 4096
_HF_MAX_WINDOW_LAYERS = 28
_HF_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "mistral": 131072}
# None: num_attention_heads. An explicit null means num_attention_heads in all three.
_HF_KV_HEADS = {"llama": None, "qwen2": 32, "mistral": 8}
_ROPE_KEYS = {"rope_theta", "rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings", "partial_rotary_factor"}


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads `config.json` from a checkpoint directory (or the file itself)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError("the Hugging Face config must be a dict, a checkpoint directory or a "
                        f"config.json path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        # A Hugging Face Hub id ("meta-llama/Llama-2-7b-hf") lands here too: nothing is fetched.
        raise ValueError(f"{path} does not exist: pass a local checkpoint directory (config.json "
                         "and safetensors) or its config.json; a Hub model is read after a "
                         "download, e.g. huggingface_hub.snapshot_download(repo_id)")
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ValueError(f"no config.json in {path}: a checkpoint directory holds config.json "
                         "beside its safetensors (save_pretrained writes both)")
    with open(file) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{file} must hold a JSON object of config attributes, got "
                         f"{type(hf).__name__}")
    return hf


def _int(hf: dict[str, Any], key: str, default=None, *, minimum: int = 1,
         null_is_default: bool = False) -> int:
    """config.json `key` as an int >= minimum, else a ValueError naming it. An absent key takes
    `default`, and so does null where transformers reads it so (`null_is_default`)."""
    value = hf.get(key, default)
    if value is None and null_is_default:
        value = default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"config.json {key} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _num(where: str, value) -> float:
    """A number of config.json (`where` names it), else a ValueError; the range is
    ModelConfig's to check."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"config.json {where} must be a number, got {value!r}")
    return float(value)


def _flag(hf: dict[str, Any], key: str) -> bool:
    value = hf.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"config.json {key} must be true or false, got {value!r}")
    return value


def config_from_hf(hf: dict[str, Any] | str | os.PathLike, **overrides) -> ModelConfig:
    """Builds a `ModelConfig` from a Hugging Face config (dict, directory or config.json path).

    Accepts both rope forms: top-level `rope_theta` / `rope_scaling` (transformers 4) and
    `rope_parameters` (transformers 5); when both are present, `rope_scaling` wins, as in
    transformers. Keys absent from config.json take the defaults of transformers' config class
    for the architecture (e.g. max_position_embeddings 2048 / 32768 / 131072 and
    num_key_value_heads = heads / 32 / 8 for llama / qwen2 / mistral). A mistral config with
    `layer_types` is read as `AutoModelForCausalLM` reads it (as MinistralForCausalLM: the window
    on the sliding_attention layers only); without it the window is on every layer.
    The special token ids (bos/eos/pad_token_id) do not change the logits; they are kept in the
    config so that `config_to_hf` writes them back.

    Args:
      hf: the parsed config.json, or where to read it.
      **overrides: `ModelConfig` fields to set (dtype, param_dtype, scan_layers, remat, ...).

    Returns:
      The `ModelConfig`.

    Raises:
      ValueError: unsupported architecture (listing the supported ones), any attribute that
        would change the computation and is not implemented, or a value of the wrong type or
        range (e.g. null, 0 heads, a fractional sliding_window), each naming the key.
    """
    if not isinstance(hf, dict):
        hf = read_hf_config(hf)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"config.json model_type={model_type!r} is not supported; supported: "
                         + ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items()))
    # As transformers' AutoModelForCausalLM: model_type decides the class, architectures only
    # names it (LLaMA-1-era files say "LLaMAForCausalLM"). A checkpoint of another head (e.g.
    # *ForSequenceClassification) is refused by its tensors when loaded.
    archs = hf.get("architectures") or [SUPPORTED[model_type]]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"config.json architectures must be a list of class names, got {archs!r}")
    unknown = sorted(k for k in hf if k not in _IMPLEMENTED and k not in _INERT
                     and k not in _CARRIED)
    if unknown:
        raise ValueError(f"config.json attributes not implemented (they may change the model): {unknown}")

    def require(key, ok, value):
        if not ok:
            raise ValueError(f"config.json {key}={value!r} is not supported")

    require("hidden_act", hf.get("hidden_act", "silu") == "silu", hf.get("hidden_act"))
    require("mlp_bias", not hf.get("mlp_bias", False), hf.get("mlp_bias"))
    require("attention_dropout", not hf.get("attention_dropout", 0.0), hf.get("attention_dropout"))
    # Qwen2-VL's multimodal rope; text-only Qwen2.5 configs carry "use_mrope": false.
    require("use_mrope", not hf.get("use_mrope", False), hf.get("use_mrope"))
    if model_type == "mistral" and hf.get("attention_bias"):
        raise ValueError("config.json attention_bias is not part of the mistral architecture "
                         "(transformers ignores it and builds no biases); remove it")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"config.json is missing required attribute {key!r}")

    sizes = {k: _int(hf, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                       "num_hidden_layers", "num_attention_heads")}
    heads = sizes["num_attention_heads"]
    max_positions = _int(hf, "max_position_embeddings", _HF_MAX_POSITIONS[model_type])
    # As transformers: null (or absent) kv heads and head_dim take these defaults; 0 is refused.
    kwargs: dict[str, Any] = dict(
        model_type=model_type,
        **sizes,
        num_key_value_heads=_kv_heads(hf, model_type, heads),
        head_dim=_head_dim(hf, sizes["hidden_size"], heads),
        rms_norm_eps=_num("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=_flag(hf, "tie_word_embeddings"),
        max_position_embeddings=max_positions,
    )
    kwargs.update(_rope_from_hf(hf, max_positions))
    if model_type == "qwen2":
        # Qwen2 q/k/v projections always have a bias; o_proj never does.
        kwargs.update(qkv_bias=True, o_bias=False)
    elif model_type == "llama":
        bias = _flag(hf, "attention_bias")
        kwargs.update(qkv_bias=bias, o_bias=bias)
    else:
        kwargs.update(qkv_bias=False, o_bias=False)
    kwargs.update(_window_from_hf(hf, model_type))
    kwargs.update({key: check_token_ids(f"config.json {key}", hf.get(key),
                                        several=key == "eos_token_id") for key in _CARRIED})
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def _head_dim(hf: dict[str, Any], hidden: int, heads: int) -> int:
    """head_dim as transformers reads it: absent or null, hidden_size // num_attention_heads."""
    if hf.get("head_dim") is not None:
        return _int(hf, "head_dim")
    derived = hidden // heads
    if derived < 1 or derived % 2:
        # Without this the error would name a ModelConfig.head_dim the user never wrote.
        raise ValueError(f"config.json has no head_dim, and hidden_size={hidden} // "
                         f"num_attention_heads={heads} gives head_dim={derived} (as transformers "
                         f"derives it), which RoPE cannot use (it must be even and positive); "
                         f"add head_dim to config.json or fix hidden_size / num_attention_heads")
    return derived


def _kv_heads(hf: dict[str, Any], model_type: str, heads: int) -> int:
    """num_key_value_heads as transformers reads it: absent takes the architecture's default,
    null takes num_attention_heads."""
    if "num_key_value_heads" in hf:
        return _int(hf, "num_key_value_heads", heads, null_is_default=True)
    kv = _HF_KV_HEADS[model_type] or heads
    if heads % kv:
        # Without this the error would name ModelConfig fields the user never wrote.
        raise ValueError(f"config.json has no num_key_value_heads, and transformers' default for "
                         f"{model_type} ({kv}) does not divide num_attention_heads={heads}; add "
                         f"num_key_value_heads to config.json")
    return kv


def _rope_from_hf(hf: dict[str, Any], max_positions: int) -> dict[str, Any]:
    # As transformers 5 (convert_rope_params_to_dict): a non-empty rope_scaling wins over
    # rope_parameters, and rope_theta comes from the chosen dict, else the top level, else 1e4.
    src = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(src) or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json {src} must be a mapping, got {params!r}")
    params = {"rope_theta": hf.get("rope_theta", 10000.0), **params}
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise ValueError(f"config.json {src} keys not implemented: {unknown}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json {src}.partial_rotary_factor="
                         f"{params['partial_rotary_factor']} is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"config.json {src}.rope_type={rope_type!r} is not supported; "
                         "supported: default, linear, llama3")

    def required(key):
        if key not in params:
            raise ValueError(f"config.json {src}.{key} is missing; "
                             f"rope_type={rope_type!r} needs it")
        return _num(f"{src}.{key}", params[key])

    theta_from = src if "rope_theta" in (hf.get(src) or {}) else "rope_theta"
    out: dict[str, Any] = dict(rope_theta=_num(theta_from, params["rope_theta"]),
                               rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = required("factor")
    if rope_type == "llama3":
        out.update(
            rope_low_freq_factor=required("low_freq_factor"),
            rope_high_freq_factor=required("high_freq_factor"),
            # transformers fills it from max_position_embeddings (or that key's default).
            rope_original_max_position=_int(params, "original_max_position_embeddings",
                                            max_positions, null_is_default=True),
        )
    return out


def _window_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    n = hf["num_hidden_layers"]
    # An absent key takes transformers' default; an explicit null means no window.
    window = hf.get("sliding_window", None if model_type == "llama" else _HF_SLIDING_WINDOW)
    if model_type == "qwen2" and not _flag(hf, "use_sliding_window"):
        window = None  # Qwen2 only uses its window when use_sliding_window is set.
    if model_type == "llama" and window is not None:
        raise ValueError("config.json sliding_window is not part of the llama architecture")
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise ValueError(f"config.json layer_types must be a list, got {layer_types!r}")
        bad = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if bad or len(layer_types) != n:
            raise ValueError(f"config.json layer_types must be {n} of full_attention/sliding_attention, "
                             f"got {bad or len(layer_types)}")
        # For mistral too: transformers' AutoConfig reads a mistral config.json with layer_types
        # (Ministral-style) as "ministral", whose window is on the sliding_attention layers
        # only. MistralForCausalLM alone would ignore the key, with a warning to use AutoModel.
        layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    elif model_type == "qwen2":
        layers = tuple(range(_int(hf, "max_window_layers", _HF_MAX_WINDOW_LAYERS, minimum=0),
                             n))
    else:
        layers = tuple(range(n))
    if window is None:
        return dict(sliding_window=None, sliding_window_layers=())
    # Here window came from a non-null key or, absent, from the default.
    window = _int(hf, "sliding_window", _HF_SLIDING_WINDOW)
    if not layers:
        # No layer uses the window (Qwen2 max_window_layers >= num_hidden_layers, layer_types
        # all full_attention): transformers computes full attention, and so do we.
        return dict(sliding_window=None, sliding_window_layers=())
    return dict(sliding_window=window, sliding_window_layers=layers)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of `cfg`, loadable by transformers 5 and 4.x alike.

    Both forms are written, with the same values: transformers 5's `rope_parameters` (and
    `layer_types` for a window on some layers) and the keys transformers 4.x (which vLLM and many
    tools pin) reads instead, top-level `rope_theta` / `rope_scaling` (null for the default rope)
    and Qwen2's `use_sliding_window` / `sliding_window` / `max_window_layers` (the window on the
    layers from max_window_layers on). transformers 5 reads the two together as the same model.
    A Qwen2 window on layers that are not the last ones has no 4.x form (a warning says so).

    Args:
      cfg: the model config.

    Returns:
      A JSON-serialisable dict.
    """
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    out: dict[str, Any] = dict(
        architectures=[SUPPORTED[cfg.model_type]],
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope,
        # transformers 4.x: rope_theta, and the rest (no rope_theta) in rope_scaling.
        rope_theta=cfg.rope_theta,
        rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"}
        if cfg.rope_type != "default" else None,
        dtype=jnp.dtype(cfg.param_dtype).name,
    )
    for key in _CARRIED:  # unset ones are left out: transformers then takes its defaults
        value = getattr(cfg, key)
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    n = cfg.num_hidden_layers
    # ModelConfig has already refused bias and window layouts the architecture cannot hold.
    if cfg.model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif cfg.model_type == "qwen2":
        layers = sorted(cfg.sliding_window_layers)
        # transformers 4.x windows the layers >= max_window_layers (layer_types is v5's form).
        first = layers[0] if layers else n
        if layers != list(range(first, n)):
            warnings.warn(f"config_to_hf: the Qwen2 sliding window is on layers {layers}, not on "
                          f"the last ones: only readers of layer_types (transformers 5) apply it "
                          f"there; transformers 4.x reads max_window_layers={n}, no window",
                          stacklevel=2)
            first = n
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   max_window_layers=first,
                   layer_types=["sliding_attention" if i in cfg.sliding_window_layers else "full_attention"
                                for i in range(n)])
    else:
        out.update(sliding_window=cfg.sliding_window)
        if cfg.sliding_window is not None and sorted(cfg.sliding_window_layers) != list(range(n)):
            # A window on some layers only is Ministral's layout: transformers' Auto classes
            # load a mistral config.json with layer_types as MinistralForCausalLM.
            out.update(layer_types=["sliding_attention" if i in cfg.sliding_window_layers
                                    else "full_attention" for i in range(n)])
    return out
