"""Full-size configurations of the published checkpoints (sizes from their config.json files)."""

from __future__ import annotations

from typing import Any

from taskpgm_jax.models.config import ModelConfig, check_int


def llama2_7b(**overrides) -> ModelConfig:
    """meta-llama/Llama-2-7b-hf: 32 layers, multi-head attention, 32k vocabulary."""
    fields = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2)
    return ModelConfig(**{**fields, **overrides})


def llama3_8b(**overrides) -> ModelConfig:
    """meta-llama/Meta-Llama-3-8B: grouped queries (8 kv heads), 128k vocabulary, theta 5e5."""
    fields = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                  bos_token_id=128000, eos_token_id=128001)
    return ModelConfig(**{**fields, **overrides})


def llama31_8b(**overrides) -> ModelConfig:
    """meta-llama/Llama-3.1-8B: Llama-3-8B with llama3 rope scaling to 128k context."""
    fields = dict(rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, rope_original_max_position=8192,
                  max_position_embeddings=131072)
    return llama3_8b(**{**fields, **overrides})


def qwen2_7b(**overrides) -> ModelConfig:
    """Qwen/Qwen2-7B: q/k/v biases, 4 kv heads, 152k vocabulary, theta 1e6, no sliding window."""
    fields = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=131072,
                  qkv_bias=True, bos_token_id=151643, eos_token_id=151643)
    return ModelConfig(**{**fields, **overrides})


def mistral_7b(**overrides) -> ModelConfig:
    """mistralai/Mistral-7B-v0.1: 8 kv heads, sliding window 4096 on every layer.

    Unless given, sliding_window_layers follows the final num_hidden_layers and sliding_window
    (every layer, or none when sliding_window=None).
    """
    fields: dict[str, Any] = dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=32768,
        sliding_window=4096, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    if "sliding_window_layers" not in overrides:
        layers = check_int("ModelConfig.num_hidden_layers", fields["num_hidden_layers"])
        fields["sliding_window_layers"] = (
            tuple(range(layers)) if fields["sliding_window"] is not None else ())
    return ModelConfig(**fields)


PRESETS = {
    "llama2_7b": llama2_7b,
    "llama3_8b": llama3_8b,
    "llama31_8b": llama31_8b,
    "qwen2_7b": qwen2_7b,
    "mistral_7b": mistral_7b,
}

# Parameter counts published with the checkpoints (safetensors metadata total / model cards).
PUBLISHED_PARAM_COUNTS = {
    "llama2_7b": 6_738_415_616,
    "llama3_8b": 8_030_261_248,
    "llama31_8b": 8_030_261_248,
    "qwen2_7b": 7_615_616_512,
    "mistral_7b": 7_241_732_096,
}
