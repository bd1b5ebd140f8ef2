"""Decoder models (Llama / Qwen2 / Mistral) in Flax NNX, LoRA adapters, presets, greedy decoding."""
