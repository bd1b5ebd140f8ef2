"""Loading onto 8 emulated devices: every parameter in its rule-given sharding, same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from taskpgm_jax.hf import load_hf_checkpoint, load_tokenizer, save_hf_checkpoint
from taskpgm_jax.sharding import make_mesh
from tests.hf import tiny


@pytest.fixture(scope="module")
def sharded(checkpoints, tmp_path_factory):
    # Re-export with several files so the sharded read also crosses safetensors shards.
    path, _ = checkpoints("qwen2_window_tied")
    out = tmp_path_factory.mktemp("qwen2_multi")
    save_hf_checkpoint(load_hf_checkpoint(path, dtype=jnp.float32), out, max_shard_size="16KB")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    return out, mesh, load_hf_checkpoint(out, mesh=mesh, dtype=jnp.float32)


def test_parameters_carry_rule_shardings(sharded):
    _, mesh, model = sharded
    layers = model.model.layers
    expect = [
        (layers.self_attn.q_proj.kernel, P(None, "fsdp", "tensor")),  # [L, D, N*H]
        (layers.self_attn.q_proj.bias, P(None, "tensor")),
        (layers.self_attn.o_proj.kernel, P(None, "tensor", "fsdp")),
        (layers.mlp.down_proj.kernel, P(None, "tensor", "fsdp")),
        (layers.input_layernorm.weight, P(None, None)),
        (model.model.embed_tokens.embedding, P(None, "fsdp")),
    ]
    for var, spec in expect:
        sharding = var[...].sharding
        assert sharding.mesh == mesh and sharding.spec == spec, (var, sharding.spec)
    # Each device holds a strict part of a split weight, never the full array.
    q = layers.self_attn.q_proj.kernel[...]
    assert q.addressable_shards[0].data.size == q.size // 4


@pytest.mark.parametrize("attention_impl", ["dot", "chunked", "xla"])
def test_sharded_logits_equal_unsharded(sharded, rng, attention_impl):
    # Chunked and fused attention under tensor-parallel heads and a data x fsdp batch.
    path, mesh, model = sharded
    if attention_impl != "dot":
        model = load_hf_checkpoint(path, mesh=mesh, dtype=jnp.float32,
                                   attention_impl=attention_impl, attention_chunk=4)
    ids, mask = tiny.random_batch(rng, batch=4)
    single = load_hf_checkpoint(path, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(single(ids, mask))
        with jax.set_mesh(mesh):
            out = nnx.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask))
    assert out.sharding.spec[0] == ("data", "fsdp")
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=1e-5, rtol=0)


def test_tokenizer_from_same_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)("hello world")["input_ids"] == [1, 2]


def test_custom_rules_change_the_layout(sharded):
    # Rules live in one table: a pure data-parallel table replicates every weight.
    path, mesh, _ = sharded
    from taskpgm_jax.sharding import DEFAULT_RULES

    replicated = tuple((name, None if name != "batch" else ("data", "fsdp")) for name, _ in DEFAULT_RULES)
    model = load_hf_checkpoint(path, mesh=mesh, rules=replicated, dtype=jnp.float32)
    for var in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert all(axis is None for axis in var.sharding.spec)
