"""Tiny random Hugging Face PyTorch checkpoints, written locally (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)

# name -> (config class, model class, config overrides). Covers GQA with 1, 2 and 4 kv heads,
# tied and untied embeddings, llama3 rope scaling, Qwen2 biases and both sliding-window styles.
CASES = {
    "llama_mha_untied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama_gqa2_tied_bias": ("LlamaConfig", "LlamaForCausalLM",
                             dict(num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True)),
    "llama3_rope_mqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8))),
    "qwen2_window_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True, sliding_window=3,
        max_window_layers=1)),
    "mistral_window_mqa": ("MistralConfig", "MistralForCausalLM",
                           dict(num_key_value_heads=1, sliding_window=3, head_dim=16)),
}


def build(case: str, seed: int = 0) -> torch.nn.Module:
    """A random float32 HF model for `case`, weights ~ N(0, 0.15) so logits are far from uniform."""
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**BASE, **extra})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # non-trivial norm scales
            else:
                p.normal_(0.0, 0.15)
    return model


def torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits of the PyTorch reference, float32 NumPy [B, S, V]."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def random_batch(rng: np.random.Generator, batch: int = 3, seq: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens with right padding in row 1 and left padding in row 2."""
    ids = rng.integers(0, VOCAB, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq - 3:] = 0
    if batch > 2:
        mask[2, :2] = 0
    return ids, mask
