"""Our loader + decoder against PyTorch transformers, and the export round trip."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from safetensors.numpy import load_file

from taskpgm_jax.hf import load_hf_checkpoint, save_hf_checkpoint
from taskpgm_jax.models import LoraConfig, ModelConfig, add_lora
from tests.hf import tiny
from tests.models.conftest import random_model

ATOL = 1e-4


def ours(model, ids, mask):
    with jax.default_matmul_precision("highest"):
        return np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


def assert_close_on_tokens(a, b, mask, atol=ATOL):
    real = mask.astype(bool)  # logits at padding positions are not defined
    np.testing.assert_allclose(a[real], b[real], atol=atol, rtol=0)


@pytest.mark.parametrize("case", sorted(tiny.CASES))
def test_logits_match_transformers(case, checkpoints, rng):
    path, torch_model = checkpoints(case)
    ids, mask = tiny.random_batch(rng)
    model = load_hf_checkpoint(path, dtype=jnp.float32)
    ref = tiny.torch_logits(torch_model, ids, mask)
    out = ours(model, ids, mask)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert_close_on_tokens(out, ref, mask)


@pytest.mark.parametrize("options", [{"scan_layers": False, "remat": True},
                                     {"attention_impl": "xla"},
                                     {"attention_impl": "chunked", "attention_chunk": 4}],
                         ids=["unscanned_remat", "fused", "chunked"])
def test_layer_options_match_transformers(options, checkpoints, rng):
    # Multi-query attention with a sliding window: the hardest layout for the fused attention.
    path, torch_model = checkpoints("mistral_window_mqa")
    ids, mask = tiny.random_batch(rng)
    model = load_hf_checkpoint(path, dtype=jnp.float32, **options)
    assert_close_on_tokens(ours(model, ids, mask), tiny.torch_logits(torch_model, ids, mask), mask)


def test_sliding_window_is_exercised(checkpoints, rng):
    # Guard against a vacuous window test: without the window, transformers' logits differ.
    path, torch_model = checkpoints("mistral_window_mqa")
    ids, mask = tiny.random_batch(rng)
    full = transformers.MistralForCausalLM(
        transformers.MistralConfig(**{**torch_model.config.to_dict(), "sliding_window": None})).eval()
    full.load_state_dict(torch_model.state_dict())
    assert np.abs(tiny.torch_logits(full, ids, mask) - tiny.torch_logits(torch_model, ids, mask)).max() > 1e-2


def _linked_copy(path, tmp_path):
    """The checkpoint's files linked into tmp_path, except config.json: returned for editing."""
    for name in os.listdir(path):
        if name != "config.json":
            os.symlink(os.path.join(path, name), tmp_path / name)
    return json.loads((path / "config.json").read_text())


def test_transformers4_rope_form(checkpoints, rng, tmp_path):
    # Older config.json files carry rope_theta / rope_scaling at the top level.
    path, torch_model = checkpoints("llama3_rope_mqa")
    cfg = _linked_copy(path, tmp_path)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids, mask = tiny.random_batch(rng)
    model = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert model.config.rope_type == "llama3" and model.config.rope_theta == 500000.0
    assert_close_on_tokens(ours(model, ids, mask), tiny.torch_logits(torch_model, ids, mask), mask)


def test_rope_scaling_wins_over_rope_parameters(checkpoints, rng, tmp_path):
    # A transformers 5 config.json (rope_parameters) with an old-style rope_scaling added on top:
    # transformers applies the rope_scaling, so must we.
    path, torch_model = checkpoints("llama_mha_untied")
    cfg = _linked_copy(path, tmp_path)
    assert "rope_parameters" in cfg
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids, mask = tiny.random_batch(rng)
    scaled = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ref = tiny.torch_logits(scaled, ids, mask)
    # Not vacuous: the scaling changes transformers' logits.
    assert np.abs(ref - tiny.torch_logits(torch_model, ids, mask))[mask.astype(bool)].max() > 1e-2
    model = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert_close_on_tokens(ours(model, ids, mask), ref, mask)


def test_mistral_layer_types_read_and_written_as_transformers_auto_classes(checkpoints, rng,
                                                                           tmp_path):
    # Ministral-style config.json files are model_type mistral with layer_types: transformers'
    # Auto classes load them as MinistralForCausalLM, the window on the sliding layers only.
    path, torch_model = checkpoints("mistral_window_mqa")
    (tmp_path / "in").mkdir()
    cfg = _linked_copy(path, tmp_path / "in")
    cfg["layer_types"] = ["full_attention", "sliding_attention"]
    (tmp_path / "in" / "config.json").write_text(json.dumps(cfg))
    ids, mask = tiny.random_batch(rng)
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "in").eval()
    assert type(auto).__name__ == "MinistralForCausalLM"
    ref = tiny.torch_logits(auto, ids, mask)
    # Not vacuous: windowing both layers (plain Mistral) gives other logits.
    assert np.abs(ref - tiny.torch_logits(torch_model, ids, mask))[mask.astype(bool)].max() > 1e-2
    model = load_hf_checkpoint(tmp_path / "in", dtype=jnp.float32)
    assert model.config.sliding_window_layers == (1,)
    assert_close_on_tokens(ours(model, ids, mask), ref, mask)
    # Re-exported with its layer_types, it loads back as the same model.
    save_hf_checkpoint(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_close_on_tokens(tiny.torch_logits(back, ids, mask), ref, mask, atol=1e-6)


def test_llama3_rope_without_max_positions_takes_transformers_defaults(checkpoints, rng, tmp_path):
    # Without max_position_embeddings transformers takes LlamaConfig's 2048 and fills the absent
    # original_max_position_embeddings from it. theta 1e4 puts the head's frequencies on both
    # sides of the llama3 thresholds, so another default would change the logits.
    path, _ = checkpoints("llama3_rope_mqa")
    cfg = _linked_copy(path, tmp_path)
    del cfg["max_position_embeddings"]
    cfg["rope_parameters"] = dict(rope_type="llama3", rope_theta=1e4, factor=8.0,
                                  low_freq_factor=1.0, high_freq_factor=4.0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids, mask = tiny.random_batch(rng)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert model.config.rope_original_max_position == \
        hf.config.rope_parameters["original_max_position_embeddings"] == 2048
    assert_close_on_tokens(ours(model, ids, mask), tiny.torch_logits(hf, ids, mask), mask)


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "llama"])
def test_default_model_config_exports_the_tensors_transformers_expects(model_type, tmp_path):
    # ModelConfig(model_type=...) without bias flags takes the architecture's bias layout, so the
    # export holds exactly transformers' tensors (none dropped or zero-filled) and reloads here.
    cfg = ModelConfig(model_type=model_type, vocab_size=tiny.VOCAB, hidden_size=32,
                      intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    save_hf_checkpoint(random_model(cfg), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == set(hf.state_dict())
    assert load_hf_checkpoint(tmp_path).config == cfg


def test_float64_export_without_x64_writes_float64_files(rng, tmp_path):
    # JAX without jax_enable_x64 casts float64 to float32 (a warning only): the files were
    # float32 under a config.json saying float64. The cast now happens on the host.
    cfg = ModelConfig(model_type="llama", vocab_size=tiny.VOCAB, hidden_size=32,
                      intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    model = random_model(cfg, seed=int(rng.integers(1 << 30)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "float64 ... will be truncated to float32"
        save_hf_checkpoint(model, tmp_path, dtype="float64")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float64"
    files = load_file(tmp_path / "model.safetensors")
    assert {x.dtype for x in files.values()} == {np.dtype(np.float64)}
    np.testing.assert_array_equal(files["model.layers.1.mlp.up_proj.weight"],
                                  np.asarray(model.model.layers.mlp.up_proj.kernel[...][1],
                                             np.float64).T)


def test_export_keeps_the_special_token_ids(checkpoints, tmp_path):
    # Llama 3.1 Instruct stops on any of three eos ids. Left out of the exported config.json,
    # transformers would take LlamaConfig's bos 1 / eos 2 and its generate would stop at the
    # wrong token (eos 2) or never (no eos in the generation config).
    path, _ = checkpoints("llama_mha_untied")
    (tmp_path / "in").mkdir()
    cfg = _linked_copy(path, tmp_path / "in")
    cfg.update(bos_token_id=90, eos_token_id=[91, 92, 93], pad_token_id=94)
    (tmp_path / "in" / "config.json").write_text(json.dumps(cfg))
    source = transformers.AutoConfig.from_pretrained(tmp_path / "in")
    save_hf_checkpoint(load_hf_checkpoint(tmp_path / "in"), tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(back.config, key) == getattr(source, key) == cfg[key], key
    assert back.generation_config.eos_token_id == [91, 92, 93]


@pytest.mark.parametrize("case", ["qwen2_window_tied", "llama3_rope_mqa"])
def test_export_round_trip_sharded_files(case, checkpoints, rng, tmp_path):
    path, torch_model = checkpoints(case)
    ids, mask = tiny.random_batch(rng)
    model = load_hf_checkpoint(path, dtype=jnp.float32)
    files = save_hf_checkpoint(model, tmp_path, max_shard_size="20KB")
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ref = tiny.torch_logits(torch_model, ids, mask)
    assert_close_on_tokens(tiny.torch_logits(back, ids, mask), ref, mask, atol=1e-6)
    again = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert_close_on_tokens(ours(again, ids, mask), ref, mask)


def test_export_merges_lora_and_bf16_files(checkpoints, rng, tmp_path):
    path, _ = checkpoints("llama_mha_untied")
    ids, mask = tiny.random_batch(rng)
    model = load_hf_checkpoint(path, dtype=jnp.float32)
    add_lora(model, LoraConfig(rank=2, targets=("q_proj", "down_proj")), rngs=nnx.Rngs(3))
    for dense in (model.model.layers.self_attn.q_proj, model.model.layers.mlp.down_proj):
        dense.lora_b[...] = 0.1 * jnp.asarray(rng.standard_normal(dense.lora_b.shape), jnp.float32)
    with_adapter = ours(model, ids, mask)
    save_hf_checkpoint(model, tmp_path / "f32")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f32").eval()
    assert_close_on_tokens(tiny.torch_logits(back, ids, mask), with_adapter, mask)

    save_hf_checkpoint(model, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    half = load_hf_checkpoint(tmp_path / "bf16", dtype=jnp.float32, param_dtype=jnp.bfloat16)
    assert half.model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    # bf16 weights: only a loose agreement is expected.
    assert np.abs(ours(half, ids, mask) - with_adapter)[mask.astype(bool)].max() < 0.3


def test_tied_config_with_a_distinct_lm_head_loads_untied_as_transformers(checkpoints, rng,
                                                                        tmp_path):
    # config.json says tied, but the file holds its own lm_head: transformers keeps the file's
    # head (with a warning); tying would replace the trained head with the embeddings.
    path, _ = checkpoints("llama_mha_untied")
    cfg = _linked_copy(path, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    ids, mask = tiny.random_batch(rng)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ref = tiny.torch_logits(hf, ids, mask)
    with pytest.warns(UserWarning, match=r"tie_word_embeddings=true.*model\.safetensors holds an "
                                         r"lm_head\.weight that differs from "
                                         r"model\.embed_tokens\.weight.*loaded untied"):
        model = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert not model.config.tie_word_embeddings
    assert_close_on_tokens(ours(model, ids, mask), ref, mask)

    # A head stored as a copy of the embeddings is no reason to untie (and no warning).
    from safetensors.numpy import save_file

    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    (tmp_path / "model.safetensors").unlink()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tied = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert tied.config.tie_word_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_close_on_tokens(ours(tied, ids, mask), tiny.torch_logits(hf, ids, mask), mask)
