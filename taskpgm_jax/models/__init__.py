"""Decoder models (Llama / Qwen2 / Mistral) in Flax NNX, LoRA adapters, presets, greedy decoding."""

from taskpgm_jax.models.config import LORA_TARGETS, LoraConfig, ModelConfig
from taskpgm_jax.models.decoder import CausalLM, KVCache, target_logprobs
from taskpgm_jax.models.generate import greedy_generate, greedy_generator
from taskpgm_jax.models.init import count_params, init_model
from taskpgm_jax.models.layers import LoRAParam
from taskpgm_jax.models.lora import (add_lora, check_adapters_like, lora_state, merge_lora,
                                     merged_kernels, multi_adapter_forward, stack_adapters)
from taskpgm_jax.models.presets import PRESETS, PUBLISHED_PARAM_COUNTS

__all__ = [
    "ModelConfig", "LoraConfig", "LORA_TARGETS", "CausalLM", "KVCache", "greedy_generate",
    "greedy_generator", "target_logprobs",
    "init_model", "count_params", "LoRAParam", "add_lora", "check_adapters_like", "lora_state",
    "stack_adapters",
    "multi_adapter_forward", "merge_lora", "merged_kernels", "PRESETS", "PUBLISHED_PARAM_COUNTS",
]
