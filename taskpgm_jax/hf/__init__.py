"""Hugging Face checkpoints: config.json parsing, sharded safetensors loading, export."""

from taskpgm_jax.hf.config import config_from_hf, config_to_hf, read_hf_config
from taskpgm_jax.hf.export import hf_tensors, iter_hf_tensors, save_hf_checkpoint
from taskpgm_jax.hf.load import checkpoint_files, load_hf_checkpoint, load_tokenizer

__all__ = ["config_from_hf", "config_to_hf", "read_hf_config", "load_hf_checkpoint",
           "checkpoint_files", "load_tokenizer", "save_hf_checkpoint", "hf_tensors",
           "iter_hf_tensors"]
