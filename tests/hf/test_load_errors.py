"""Config whitelist and checkpoint mismatch errors: each names what is wrong, all at once."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from taskpgm_jax.hf import (checkpoint_files, config_from_hf, config_to_hf, load_hf_checkpoint,
                            read_hf_config, save_hf_checkpoint)
from taskpgm_jax.hf.config import SUPPORTED
from taskpgm_jax.hf.export import parse_size
from taskpgm_jax.models import ModelConfig
from tests.hf import tiny
from tests.models.conftest import random_model


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


def test_inert_keys_of_published_configs(llama_dir, checkpoints):
    # LLaMA-1 configs carry max_sequence_length, Qwen2.5 configs "use_mrope": false; neither
    # changes the model. use_mrope true (Qwen2-VL's multimodal rope) does, so it is named.
    hf = read_hf_config(llama_dir)
    assert config_from_hf({**hf, "max_sequence_length": 2048}) == config_from_hf(hf)
    qwen = read_hf_config(checkpoints("qwen2_window_tied")[0])
    assert config_from_hf({**qwen, "use_mrope": False}) == config_from_hf(qwen)
    with pytest.raises(ValueError, match="use_mrope=True"):
        config_from_hf({**qwen, "use_mrope": True})


def hf_bias_layouts(model_type):
    """(q/k/v bias, o_proj bias) of every tiny transformers model of `model_type`."""
    model_cls = SUPPORTED[model_type]
    config_cls = model_cls.replace("ForCausalLM", "Config")
    layouts = set()
    for attention_bias in (False, True):
        cfg = getattr(transformers, config_cls)(**{**tiny.BASE, "num_hidden_layers": 1,
                                                   "attention_bias": attention_bias})
        attn = getattr(transformers, model_cls)(cfg).model.layers[0].self_attn
        layouts.add((attn.q_proj.bias is not None, attn.o_proj.bias is not None))
    return layouts


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_model_config_holds_exactly_the_bias_layouts_transformers_builds(model_type):
    # A layout transformers cannot build would export silently and lose (or zero) the biases.
    sizes = dict(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    allowed = hf_bias_layouts(model_type)
    assert (ModelConfig(model_type=model_type, **sizes).qkv_bias, False) in allowed  # the default
    named = f"model_type='{model_type}'.*qkv_bias.*o_bias"
    for qkv in (False, True):
        for o in (False, True):
            if (qkv, o) in allowed:
                ModelConfig(model_type=model_type, qkv_bias=qkv, o_bias=o, **sizes)
            else:
                with pytest.raises(ValueError, match=named):
                    ModelConfig(model_type=model_type, qkv_bias=qkv, o_bias=o, **sizes)


def test_mistral_attention_bias_is_refused(checkpoints):
    # transformers builds Mistral without biases whatever attention_bias says (see above).
    hf = read_hf_config(checkpoints("mistral_window_mqa")[0])
    with pytest.raises(ValueError, match="attention_bias.*mistral"):
        config_from_hf({**hf, "attention_bias": True})


def windows_of(hf_config):
    """(sliding window, indices of windowed layers) as transformers' config object reads them."""
    window = hf_config.sliding_window
    n = hf_config.num_hidden_layers
    types = getattr(hf_config, "layer_types", None) or ["sliding_attention"] * n  # Mistral: all
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    # A window on no layer is full attention: ModelConfig holds that as no window.
    return (None, ()) if window is None or not layers else (window, layers)


@pytest.mark.parametrize("model_type, extra", [
    ("mistral", {}),                                           # no sliding_window key
    ("mistral", {"sliding_window": None}),                     # explicit null: no window
    ("qwen2", {"use_sliding_window": True}),                   # no sliding_window key
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "num_hidden_layers": 30}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
])
def test_absent_window_keys_take_transformers_defaults(model_type, extra):
    config_cls = SUPPORTED[model_type].replace("ForCausalLM", "Config")
    hf = {**tiny.BASE, "model_type": model_type, "num_key_value_heads": 2, **extra}
    ours = config_from_hf(hf)
    ref = getattr(transformers, config_cls).from_dict(hf)
    assert (ours.sliding_window, ours.sliding_window_layers) == windows_of(ref)


@pytest.mark.parametrize("rope", [
    # transformers 5 reads a non-empty rope_scaling in preference to rope_parameters, with
    # rope_theta from the chosen dict, else the top level.
    dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5},
         rope_scaling={"rope_type": "linear", "factor": 4.0}),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5},
         rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=1234.0),
    dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
         rope_scaling=None, rope_theta=1234.0),
    dict(rope_parameters={"rope_type": "linear", "factor": 3.0}, rope_scaling={}, rope_theta=99.0),
])
def test_rope_forms_read_as_transformers_reads_them(llama_dir, rope):
    hf = {**read_hf_config(llama_dir), **rope}
    ref = transformers.LlamaConfig.from_dict(hf).rope_parameters
    ours = config_from_hf(hf)
    assert (ours.rope_type, ours.rope_theta, ours.rope_factor) == (
        ref["rope_type"], ref["rope_theta"], ref.get("factor", 1.0))


def test_unsupported_values_are_named(llama_dir):
    hf = read_hf_config(llama_dir)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf({**hf, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        config_from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ValueError, match="mlp_bias"):
        config_from_hf({**hf, "mlp_bias": True})
    with pytest.raises(ValueError, match=r"rope_parameters\.factor.*rope_type='linear'"):
        config_from_hf({**hf, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}})
    llama3 = dict(rope_type="llama3", factor=8.0, high_freq_factor=4.0)
    with pytest.raises(ValueError, match=r"rope_parameters\.low_freq_factor.*rope_type='llama3'"):
        config_from_hf({**hf, "rope_parameters": llama3})
    with pytest.raises(ValueError, match=r"rope_scaling\.factor.*rope_type='linear'"):
        config_from_hf({**hf, "rope_scaling": {"type": "linear"}})


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


def test_a_path_without_a_checkpoint_says_what_to_pass(tmp_path):
    # A Hub id is the natural first try; nothing is downloaded, and the error says so.
    with pytest.raises(ValueError, match=r"meta-llama/Llama-2-7b-hf does not exist: pass a local "
                                         r"checkpoint directory.*snapshot_download"):
        load_hf_checkpoint("meta-llama/Llama-2-7b-hf")
    with pytest.raises(ValueError, match=r"no config\.json in .*save_pretrained writes both"):
        load_hf_checkpoint(tmp_path)


def test_no_weights_file(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(read_hf_config(llama_dir)))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_checkpoint(tmp_path)
    # Older checkpoints ship pickled PyTorch weights only: the error says how to convert them.
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"PyTorch \.bin weights only.*save_pretrained\(out_dir\)"):
        load_hf_checkpoint(tmp_path)


def test_unreadable_and_missing_weight_files_are_named(llama_dir, tmp_path):
    garbage = copy_checkpoint(llama_dir, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00\x01not a safetensors header" * 3)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_hf_checkpoint(garbage)
    sharded = copy_checkpoint(llama_dir, tmp_path / "sharded")
    names = list(load_file(sharded / "model.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: "model-00001-of-00001.safetensors" for name in names}}))
    (sharded / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model-00001-of-00001\.safetensors: the checkpoint "
                                         r"lists this file but it is missing"):
        load_hf_checkpoint(sharded)


_LLAMA = {**tiny.BASE, "model_type": "llama", "num_key_value_heads": 2}


@pytest.mark.parametrize("extra, match", [
    ({"num_attention_heads": 0}, "num_attention_heads must be an int >= 1, got 0"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be an int"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be an int >= 1, got 0"),
    ({"head_dim": 0}, "head_dim must be an int >= 1, got 0"),
    ({"vocab_size": 96.0}, "vocab_size must be an int"),
    ({"rms_norm_eps": None}, "rms_norm_eps must be a number, got None"),
    ({"rope_theta": None}, "rope_theta must be a number, got None"),
    ({"max_position_embeddings": None}, "max_position_embeddings must be an int"),
    ({"rope_scaling": {"rope_type": "linear", "factor": None}}, r"rope_scaling\.factor must be"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list"),
    ({"model_type": "mistral", "sliding_window": 4.7}, "sliding_window must be an int"),
    ({"model_type": "mistral", "layer_types": "fs"}, "layer_types must be a list"),
    ({"eos_token_id": "</s>"}, "eos_token_id must be an int, a list of ints or None"),
    ({"bos_token_id": 1.0}, "bos_token_id must be an int or None"),
])
def test_bad_config_values_name_the_key(extra, match):
    with pytest.raises(ValueError, match=f"config.json {match}"):
        config_from_hf({**_LLAMA, **extra})


def test_null_heads_take_transformers_defaults():
    cfg = config_from_hf({**_LLAMA, "num_key_value_heads": None, "head_dim": None})
    assert (cfg.num_key_value_heads, cfg.head_dim) == (4, 8)


@pytest.mark.parametrize("name, text, match", [
    ("config.json", "{bad", r"config\.json is not valid JSON"),
    ("config.json", "[1, 2]", r"config\.json must hold a JSON object"),
    ("model.safetensors.index.json", '{"metadata": {}}', r"index\.json has no weight_map"),
])
def test_malformed_json_files_are_named(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    read = config_from_hf if name == "config.json" else checkpoint_files
    with pytest.raises(ValueError, match=match):
        read(tmp_path)


@pytest.mark.parametrize("size, match", [
    (True, "max_shard_size must be an int of bytes"), (0.5, "max_shard_size must be an int"),
    ("0GB", "max_shard_size must be at least one byte, got '0GB'"),
    ("5 parsecs", "max_shard_size='5 parsecs'"),
])
def test_save_refuses_bad_arguments_before_writing(tmp_path, size, match):
    model = random_model(ModelConfig(**{k: v for k, v in _LLAMA.items() if k != "model_type"},
                                     head_dim=8, dtype=jnp.float32))
    out = tmp_path / "export"
    with pytest.raises(ValueError, match=match):
        save_hf_checkpoint(model, out, max_shard_size=size)
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        save_hf_checkpoint(model, out, dtype=jnp.int8)  # would write int8 weights
    assert not out.exists()
    assert parse_size(np.int64(1000)) == 1000 and parse_size("1.5KB") == 1500


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_absent_sizes_take_each_architecture_defaults(model_type):
    # transformers' config classes differ: LlamaConfig kv heads = heads and 2048 positions,
    # Qwen2Config 32 and 32768, MistralConfig 8 and 131072; an absent llama3
    # original_max_position_embeddings is filled from max_position_embeddings.
    config_cls = SUPPORTED[model_type].replace("ForCausalLM", "Config")
    hf = {**{k: v for k, v in tiny.BASE.items() if k != "max_position_embeddings"},
          "model_type": model_type, "hidden_size": 64, "num_attention_heads": 32,
          "rope_parameters": dict(rope_type="llama3", rope_theta=1e4, factor=8.0,
                                  low_freq_factor=1.0, high_freq_factor=4.0)}
    ref = getattr(transformers, config_cls).from_dict(hf)
    ours = config_from_hf(hf)
    assert (ours.num_key_value_heads, ours.max_position_embeddings,
            ours.rope_original_max_position) == (
        ref.num_key_value_heads, ref.max_position_embeddings,
        ref.rope_parameters["original_max_position_embeddings"])
    # An explicit null is num_attention_heads, as LlamaConfig and Qwen2Config read it.
    # MistralConfig 5 refuses null in its type check, though its __post_init__ (and
    # transformers 4) reads it the same way; we accept it as the others.
    null = {**hf, "num_key_value_heads": None}
    assert config_from_hf(null).num_key_value_heads == 32
    if model_type != "mistral":
        assert getattr(transformers, config_cls).from_dict(null).num_key_value_heads == 32


def test_absent_kv_heads_default_that_cannot_divide_is_named():
    # MistralConfig's default of 8 kv heads cannot serve 4 query heads.
    with pytest.raises(ValueError, match="no num_key_value_heads.*mistral.*add num_key_value_heads"):
        config_from_hf({**tiny.BASE, "model_type": "mistral"})


def test_tensor_absent_from_the_file_the_index_names(llama_dir, tmp_path):
    # Reported with the other problems, naming the tensor and the file, not as a raw
    # SafetensorError from deep inside the read.
    tensors = load_file(llama_dir / "model.safetensors")
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    moved, dropped = "model.layers.1.mlp.down_proj.weight", "model.norm.weight"
    assert moved in second and dropped in second
    shards = {"model-00001-of-00002.safetensors": first,
              "model-00002-of-00002.safetensors": [n for n in second if n not in (moved, dropped)]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    weight_map = {n: f for f, keys in shards.items() for n in keys}
    weight_map[moved] = "model-00001-of-00002.safetensors"  # the wrong file
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(read_hf_config(llama_dir)))
    with pytest.raises(ValueError) as err:
        load_hf_checkpoint(tmp_path)
    msg = str(err.value)
    assert "missing tensors (1): model.norm.weight" in msg
    assert (f"tensors not in the file model.safetensors.index.json names (1): {moved} "
            "(the index names model-00001-of-00002.safetensors)") in msg


def _export_model(seed=0):
    return random_model(ModelConfig(**{k: v for k, v in _LLAMA.items() if k != "model_type"},
                                    head_dim=8, dtype=jnp.float32), seed=seed)


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_export_converts_the_config_before_writing(tmp_path, monkeypatch):
    from taskpgm_jax.hf import export

    save_hf_checkpoint(_export_model(0), tmp_path, max_shard_size="20KB")
    before = _files(tmp_path)

    def refuse(cfg):
        raise ValueError("cannot convert")

    monkeypatch.setattr(export, "config_to_hf", refuse)
    with pytest.raises(ValueError, match="cannot convert"):
        save_hf_checkpoint(_export_model(1), tmp_path)
    assert _files(tmp_path) == before  # the old checkpoint is untouched, no new weights beside it


def test_export_replaces_every_file_of_an_old_checkpoint(tmp_path, monkeypatch):
    from taskpgm_jax.hf import export

    save_hf_checkpoint(_export_model(0), tmp_path, max_shard_size="20KB")
    (tmp_path / "notes.txt").write_text("kept")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    save_hf_checkpoint(_export_model(1), tmp_path)  # one file now: no old shard may stay
    assert sorted(_files(tmp_path)) == ["config.json", "model.safetensors", "notes.txt"]
    # And back: no old single file beside the new index (transformers would read either).
    names = save_hf_checkpoint(_export_model(1), tmp_path, max_shard_size="20KB")
    assert sorted(_files(tmp_path)) == sorted(["config.json", "model.safetensors.index.json",
                                               "notes.txt", *names])

    # An export that fails while writing weights leaves the old checkpoint as it was.
    before = _files(tmp_path)

    def broken(model, dtype=None):
        yield from []
        raise OSError("disk full")

    monkeypatch.setattr(export, "iter_hf_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(_export_model(2), tmp_path)
    assert _files(tmp_path) == before


def _tiny_logits(model, ids):
    with jax.default_matmul_precision("highest"):
        return np.asarray(model(jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize("fail_at, error", [(1, OSError("No space left on device")),
                                            (2, KeyboardInterrupt())])
def test_interrupted_export_keeps_the_old_checkpoint(tmp_path, monkeypatch, rng, fail_at, error):
    # The writer fails after some shards are on disk: the old sharded checkpoint must still load
    # with its own weights, and no temporary may be left behind.
    from safetensors.numpy import save_file as real_save_file

    from taskpgm_jax.hf import export

    old = _export_model(0)
    save_hf_checkpoint(old, tmp_path, max_shard_size="20KB")
    before = _files(tmp_path)
    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > fail_at:
            real_save_file(tensors, filename, metadata=metadata)  # written, then interrupted
            raise error
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(export, "save_file", failing)
    with pytest.raises(type(error)):
        save_hf_checkpoint(_export_model(1), tmp_path, max_shard_size="20KB")
    assert len(calls) == fail_at + 1
    assert _files(tmp_path) == before
    ids = rng.integers(0, tiny.VOCAB, size=(2, 7))
    np.testing.assert_array_equal(_tiny_logits(load_hf_checkpoint(tmp_path, dtype=jnp.float32),
                                               ids), _tiny_logits(old, ids))


def test_export_refuses_what_is_not_a_model_or_a_directory(tmp_path):
    from flax import nnx

    model = _export_model(0)
    with pytest.raises(ValueError, match="save_hf_checkpoint: model must be a CausalLM.*State"):
        save_hf_checkpoint(nnx.state(model), tmp_path / "a")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"save_hf_checkpoint: path .*afile is an existing file"):
        save_hf_checkpoint(model, afile)
    assert afile.read_text() == "x" and not (tmp_path / "a").exists()


def test_window_on_no_layer_is_no_window_as_transformers_reads_it():
    # Qwen2 with max_window_layers >= num_hidden_layers, or layer_types without a sliding
    # layer: transformers attends fully, so the config holds no window (not a window on no layer).
    qwen = {**_LLAMA, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 3,
            "max_window_layers": 2}
    cfg = config_from_hf(qwen)
    assert (cfg.sliding_window, cfg.sliding_window_layers) == (None, ())
    assert windows_of(transformers.Qwen2Config.from_dict(qwen)) == (None, ())
    mistral = {**_LLAMA, "model_type": "mistral", "sliding_window": 3,
               "layer_types": ["full_attention"] * 2}
    assert config_from_hf(mistral).sliding_window is None
    assert config_to_hf(cfg)["use_sliding_window"] is False


def test_tensor_with_nan_is_named(llama_dir, tmp_path):
    path = copy_checkpoint(llama_dir, tmp_path / "nan")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    tensors["model.norm.weight"][0] = np.inf
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor (model\.layers\.1\.mlp\.up_proj|model\.norm)"
                                         r"\.weight holds NaN or inf"):
        load_hf_checkpoint(path)


def test_derived_head_dim_names_the_config_keys():
    # hidden_size 30 over 4 heads: transformers derives head_dim 7, which RoPE cannot use.
    with pytest.raises(ValueError, match=r"config.json has no head_dim, and hidden_size=30 // "
                                         r"num_attention_heads=4 gives head_dim=7"):
        config_from_hf({**_LLAMA, "hidden_size": 30})
    assert config_from_hf({**_LLAMA, "hidden_size": 34}).head_dim == 8  # as transformers


@pytest.mark.parametrize("where", ["hf", "data"])
def test_load_tokenizer_errors_name_the_directory(tmp_path, llama_dir, where):
    # Both entry points (the data package's, and its re-export beside the checkpoint loader).
    import importlib

    load_tokenizer = importlib.import_module(f"taskpgm_jax.{where}").load_tokenizer
    with pytest.raises(ValueError, match=r"load_tokenizer: .*nowhere is not a directory"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"load_tokenizer: path must be a directory"):
        load_tokenizer(None)
    # A checkpoint without tokenizer files: transformers would say sentencepiece is missing.
    with pytest.raises(ValueError, match=r"no tokenizer files \(tokenizer\.json, "
                                         r"tokenizer_config\.json, .*\) in .*save_pretrained"):
        load_tokenizer(llama_dir)


def _replace_failing_at(monkeypatch, fail_at, error, dead_after=False):
    """os.replace raising `error` at its `fail_at`-th call (1-based); with `dead_after`, every
    later os.replace / os.remove raises too (the process was killed there)."""
    import os

    real_replace, real_remove = os.replace, os.remove
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at or (dead_after and len(calls) > fail_at):
            raise error
        real_replace(src, dst)

    def remove(p):
        if dead_after and len(calls) >= fail_at:
            raise error
        real_remove(p)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "remove", remove)
    return calls


@pytest.mark.parametrize("new_shard_size", ["20KB", "5GB"], ids=["sharded", "single"])
def test_export_failing_in_its_final_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch,
                                                                     new_shard_size):
    # The new files are complete and the old ones are being replaced: whichever rename fails
    # (disk error, Ctrl-C), the old checkpoint must be left whole, byte for byte.
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    save_hf_checkpoint(_export_model(0), old_dir, max_shard_size="20KB")
    (old_dir / "notes.txt").write_text("kept")
    before = _files(old_dir)
    new = _export_model(1)
    save_hf_checkpoint(new, new_dir, max_shard_size=new_shard_size)
    # Each old checkpoint file goes aside, each new one comes in.
    renames = len(before) - 1 + len(_files(new_dir))
    for fail_at, error in [(k, OSError(f"rename {k} failed")) for k in range(1, renames + 1)] + [
            (renames - 1, KeyboardInterrupt())]:
        with monkeypatch.context() as m:
            _replace_failing_at(m, fail_at, error)
            with pytest.raises(type(error)):
                save_hf_checkpoint(new, old_dir, max_shard_size=new_shard_size)
        assert _files(old_dir) == before, f"failed at rename {fail_at}"
    save_hf_checkpoint(new, old_dir, max_shard_size=new_shard_size)  # and it does succeed
    assert _files(old_dir) == {**_files(new_dir), "notes.txt": b"kept"}


@pytest.mark.parametrize("killed_at", [2, 9, 11])  # old files going aside / new ones coming in
def test_export_killed_in_its_final_renames_is_undone_by_the_next_one(tmp_path, monkeypatch,
                                                                     killed_at):
    # Killed outright (no cleanup ran): the next export puts the old checkpoint back before it
    # starts, so that one failing too still leaves the old checkpoint, not a mix or nothing.
    from taskpgm_jax.hf import export

    save_hf_checkpoint(_export_model(0), tmp_path, max_shard_size="20KB")  # 6 shards, 8 files
    before = _files(tmp_path)
    with monkeypatch.context() as m:
        _replace_failing_at(m, killed_at, OSError("killed"), dead_after=True)
        with pytest.raises(OSError, match="killed"):
            save_hf_checkpoint(_export_model(1), tmp_path, max_shard_size="20KB")
    assert "config.json" not in _files(tmp_path)  # caught between old and new

    def broken(model, dtype=None):
        yield from []
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(export, "iter_hf_tensors", broken)
        with pytest.raises(OSError, match="disk full"):
            save_hf_checkpoint(_export_model(1), tmp_path)
    assert _files(tmp_path) == before


def read_like_transformers4(hf):
    """(rope fields, window, windowed layers) as transformers 4.x reads a config.json: rope from
    the top-level rope_theta (default 1e4) and rope_scaling only, a Qwen2 window from
    use_sliding_window / sliding_window on the layers >= max_window_layers, a Mistral window on
    every layer; rope_parameters and layer_types are unknown to it."""
    scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope = (rope_type, hf.get("rope_theta", 10000.0), scaling.get("factor"),
            scaling.get("low_freq_factor"), scaling.get("high_freq_factor"),
            scaling.get("original_max_position_embeddings"))
    n = hf["num_hidden_layers"]
    if hf["model_type"] == "qwen2":
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
        layers = tuple(range(hf.get("max_window_layers", 28), n))
    else:
        window, layers = hf.get("sliding_window"), tuple(range(n))
    return rope, ((None, ()) if window is None or not layers else (window, layers))


@pytest.mark.parametrize("model_type, rope_type", [
    ("llama", "llama3"), ("llama", "linear"), ("llama", "default"), ("qwen2", "default"),
    ("qwen2", "linear"), ("mistral", "default")])
def test_exported_config_reads_the_same_in_transformers_4(rng, model_type, rope_type):
    # vLLM and many tools pin transformers 4.x: the export must hold its rope_theta /
    # rope_scaling and Qwen2's max_window_layers besides the v5 rope_parameters / layer_types,
    # and transformers 5 must read the two forms together as the same model.
    n = int(rng.integers(2, 6))
    rope = {"rope_theta": float(rng.choice([1e4, 5e5, 1e6])) + float(rng.integers(0, 100))}
    if rope_type != "default":
        rope["rope_factor"] = float(rng.integers(2, 9))
    if rope_type == "llama3":
        rope.update(rope_low_freq_factor=1.0, rope_high_freq_factor=float(rng.integers(2, 5)),
                    rope_original_max_position=int(rng.integers(8, 64)))
    window: dict = {}
    if model_type == "qwen2":
        window = dict(sliding_window=int(rng.integers(2, 9)),
                      sliding_window_layers=tuple(range(int(rng.integers(0, n)), n)))
    elif model_type == "mistral":
        window = dict(sliding_window=int(rng.integers(2, 9)), sliding_window_layers=tuple(range(n)))
    sizes = {k: v for k, v in _LLAMA.items() if k != "model_type"}
    cfg = ModelConfig(**{**sizes, "num_hidden_layers": n}, model_type=model_type, head_dim=8,
                      rope_type=rope_type, **rope, **window)
    hf = config_to_hf(cfg)
    expect_rope = (cfg.rope_type, cfg.rope_theta,
                   cfg.rope_factor if rope_type != "default" else None,
                   *((cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                      cfg.rope_original_max_position) if rope_type == "llama3" else (None,) * 3))
    assert read_like_transformers4(json.loads(json.dumps(hf))) == (
        expect_rope, (cfg.sliding_window, cfg.sliding_window_layers))
    # transformers 5 reads both forms together as the same model, as do we.
    config_cls = SUPPORTED[model_type].replace("ForCausalLM", "Config")
    ref = getattr(transformers, config_cls).from_dict(hf)
    assert ref.rope_parameters == hf["rope_parameters"]
    if model_type != "llama":  # LlamaConfig has no window
        assert windows_of(ref) == (cfg.sliding_window, cfg.sliding_window_layers)
    assert config_from_hf(hf) == cfg


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_file_of_the_checkpoint_is_refused_naming_its_directory(llama_dir, name):
    # As transformers' from_pretrained, a file is refused; the error names the directory to
    # pass (not weights looked for inside config.json/, nor a safetensors parsed as JSON).
    import re

    for load in (load_hf_checkpoint, checkpoint_files):
        with pytest.raises(ValueError, match=rf"{load.__name__}: .*{name} is a file, not a "
                                             rf"checkpoint directory; pass its directory, "
                                             rf"{re.escape(str(llama_dir))}"):
            load(llama_dir / name)


def test_value_overflowing_float16_is_not_called_damage(llama_dir, tmp_path, rng):
    # A finite weight beyond float16's range (65504) becomes inf only in the cast to
    # param_dtype=float16: the error must say so and what to load with, not call the file damaged.
    path = copy_checkpoint(llama_dir, tmp_path / "big")
    tensors = load_file(path / "model.safetensors")
    weight = tensors["model.layers.1.mlp.up_proj.weight"]
    big = float(rng.uniform(1.0, 100.0)) * float(np.finfo(np.float16).max)
    weight[tuple(rng.integers(0, weight.shape))] = big
    assert np.isfinite(weight).all() and big > float(np.finfo(np.float16).max)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"checkpoint tensor model\.layers\.1\.mlp\.up_proj\.weight "
                                         r"holds values .* that overflow float16 .*"
                                         r"param_dtype=jnp\.bfloat16 or jnp\.float32"):
        load_hf_checkpoint(path, param_dtype=jnp.float16)
    assert load_hf_checkpoint(path, param_dtype=jnp.bfloat16) is not None


@pytest.mark.parametrize("arch", ["LLaMAForCausalLM", "LlamaForCausalLM"])
def test_architectures_are_read_as_transformers_auto_classes_read_them(llama_dir, tmp_path, arch):
    # LLaMA-1-era config.json files name "LLaMAForCausalLM": AutoModelForCausalLM builds the
    # class of model_type (the architectures name only picks among several), so must we.
    hf = {**read_hf_config(llama_dir), "architectures": [arch]}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    auto = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(tmp_path))
    assert type(auto).__name__ == SUPPORTED["llama"]
    assert config_from_hf(tmp_path) == config_from_hf(llama_dir)
