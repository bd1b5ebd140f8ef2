"""Config whitelist and checkpoint mismatch errors: each names what is wrong, all at once."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from taskpgm_jax.hf import config_from_hf, config_to_hf, load_hf_checkpoint, read_hf_config
from taskpgm_jax.hf.config import SUPPORTED


@pytest.fixture(scope="module")
def llama_dir(checkpoints):
    return checkpoints("llama_mha_untied")[0]


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_config_round_trip_through_transformers_format(checkpoints):
    for case in ("llama3_rope_mqa", "qwen2_window_tied", "mistral_window_mqa", "llama_gqa2_tied_bias"):
        path, _ = checkpoints(case)
        cfg = config_from_hf(path)
        assert config_from_hf(config_to_hf(cfg)) == cfg


def test_qwen2_window_layers_and_biases(checkpoints):
    cfg = config_from_hf(checkpoints("qwen2_window_tied")[0])
    assert cfg.qkv_bias and not cfg.o_bias
    assert cfg.sliding_window == 3 and cfg.sliding_window_layers == (1,)
    mistral = config_from_hf(checkpoints("mistral_window_mqa")[0])
    assert mistral.sliding_window_layers == (0, 1) and mistral.head_dim == 16


def test_unknown_attribute_is_named(llama_dir):
    hf = read_hf_config(llama_dir)
    with pytest.raises(ValueError, match="qk_layernorm"):
        config_from_hf({**hf, "qk_layernorm": True})


def test_unsupported_values_are_named(llama_dir):
    hf = read_hf_config(llama_dir)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf({**hf, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        config_from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ValueError, match="mlp_bias"):
        config_from_hf({**hf, "mlp_bias": True})


def test_unsupported_architecture_lists_supported(llama_dir):
    hf = read_hf_config(llama_dir)
    with pytest.raises(ValueError, match="gemma") as err:
        config_from_hf({**hf, "model_type": "gemma"})
    for arch in SUPPORTED:
        assert arch in str(err.value)


def test_missing_unexpected_and_misshaped_reported_together(llama_dir, tmp_path):
    path = copy_checkpoint(llama_dir, tmp_path / "broken")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["model.norm.weight"] = np.ones((7,), np.float32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_hf_checkpoint(path)
    msg = str(err.value)
    assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensors (1): model.layers.0.self_attn.extra.weight" in msg
    assert "model.norm.weight: checkpoint [7], model expects [32]" in msg


def test_no_weights_file(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(read_hf_config(llama_dir)))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_checkpoint(tmp_path)
