"""Multi-adapter forward against separate forwards; zero adapters; merge."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from taskpgm_jax.data import Encoded, pad_batch
from taskpgm_jax.hf import save_hf_checkpoint
from taskpgm_jax.models import (CausalLM, LoraConfig, LoRAParam, add_lora, count_params,
                                lora_state, merge_lora, multi_adapter_forward, stack_adapters)
from taskpgm_jax.models.lora import merged_kernels
from taskpgm_jax.train import TrainConfig, Trainer
from tests.models.conftest import TINY, forward, random_model
from tests.train.conftest import TINY as TRAIN_TINY

T = 3
LORA = LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"))


@pytest.fixture(scope="module")
def adapted(tiny_model):
    model = nnx.clone(tiny_model)
    return add_lora(model, LORA, rngs=nnx.Rngs(7))


def random_adapter(model, rng):
    """A state like lora_state(model) with every matrix random (B no longer zero)."""
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                        lora_state(model))


multi = nnx.jit(multi_adapter_forward, static_argnames=("adapter_chunk",))


def test_fresh_adapters_leave_the_model_unchanged(tiny_model, adapted, rng):
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, size=(2, 7)), jnp.int32)
    mask = jnp.ones_like(ids)
    assert len(jax.tree.leaves(lora_state(adapted))) == 2 * 5
    np.testing.assert_allclose(forward(adapted, ids, mask), forward(tiny_model, ids, mask), atol=1e-6)


def test_count_params_leaves_adapters_out(tiny_model, adapted):
    # The base parameters only, whether given the model or its whole state (adapters included).
    base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(tiny_model, nnx.Param)))
    assert jax.tree.leaves(lora_state(adapted))
    assert count_params(adapted) == count_params(nnx.state(adapted)) == base


def test_multi_adapter_equals_separate_forwards(adapted, rng):
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, size=(2, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
    adapters = [random_adapter(adapted, rng) for _ in range(T)]
    with jax.default_matmul_precision("highest"):
        out = multi(adapted, stack_adapters(adapters), ids, mask)
        per_input = multi(adapted, stack_adapters(adapters), jnp.stack([ids] * T), jnp.stack([mask] * T),
                          adapter_chunk=2)  # T=3 in chunks of 2: also checks the remainder
        assert out.shape == (T, 2, 7, TINY.vocab_size)
        singles = []
        for t in range(T):
            model = nnx.clone(adapted)
            nnx.update(model, adapters[t])
            singles.append(forward(model, ids, mask))
    real = np.asarray(mask) > 0
    for t in range(T):
        np.testing.assert_allclose(np.asarray(out[t])[real], np.asarray(singles[t])[real], atol=1e-5)
        np.testing.assert_allclose(np.asarray(per_input[t])[real], np.asarray(singles[t])[real], atol=1e-5)
    # Different adapters really give different outputs.
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-2


def test_merge_keeps_outputs_and_removes_adapters(adapted, rng):
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, size=(2, 7)), jnp.int32)
    mask = jnp.ones_like(ids)
    model = nnx.clone(adapted)
    nnx.update(model, random_adapter(model, rng))
    with jax.default_matmul_precision("highest"):
        before = forward(model, ids, mask)
        merge_lora(model)
        after = forward(model, ids, mask)
    assert not jax.tree.leaves(nnx.state(model, LoRAParam))
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_merge_products_ask_for_full_float32_precision(adapted):
    """On a GPU the default float32 matmul rounds its operands (TF32), which moved exported logits
    by 2e-4 on an H200: the one-off merge products must ask for HIGHEST whatever the default."""
    with jax.default_matmul_precision("bfloat16"):
        jaxpr = jax.make_jaxpr(lambda: merged_kernels(adapted))()
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    # one product per target, batched over the layers when they are scanned
    assert len(dots) == len(LORA.targets) * (1 if TINY.scan_layers else TINY.num_hidden_layers)
    highest = jax.lax.Precision.HIGHEST
    assert all(e.params["precision"] == (highest, highest) for e in dots), \
        [e.params["precision"] for e in dots]


def test_add_lora_takes_an_int_seed_and_refuses_other_rngs(tiny_model):
    seeded = add_lora(nnx.clone(tiny_model), LORA, rngs=5)
    streams = add_lora(nnx.clone(tiny_model), LORA, rngs=nnx.Rngs(5))
    for a, b in zip(jax.tree.leaves(lora_state(seeded)), jax.tree.leaves(lora_state(streams)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for bad in ("5", 1.5, None, -1, True):
        with pytest.raises(ValueError, match="add_lora: rngs must be an nnx.Rngs or an int seed"):
            add_lora(nnx.clone(tiny_model), LORA, rngs=bad)


def test_add_lora_rejects_absent_targets(tiny_model):
    with pytest.raises(ValueError, match="no projection"):
        add_lora(nnx.clone(tiny_model.model.norm), LoraConfig(targets=("q_proj",)), rngs=nnx.Rngs(0))


def test_multi_adapter_errors(tiny_model, adapted):
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        multi_adapter_forward(tiny_model, stack_adapters([lora_state(adapted)]), ids)
    with pytest.raises(ValueError, match="input_ids"):
        multi_adapter_forward(adapted, stack_adapters([lora_state(adapted)]), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="adapter_chunk"):
        multi_adapter_forward(adapted, stack_adapters([lora_state(adapted)]), ids, adapter_chunk=0)
    with pytest.raises(ValueError, match="2 rows on its adapter axis but there are 1 adapters"):
        multi_adapter_forward(adapted, stack_adapters([lora_state(adapted)]), jnp.zeros((2, 1, 4), jnp.int32))
    # Adapters of another rank would run with this model's alpha / rank scale: refused by leaf.
    other = add_lora(nnx.clone(tiny_model), dataclasses.replace(LORA, rank=3), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"adapters differs from the model's adapters at .*, 3\] vs"):
        multi_adapter_forward(adapted, stack_adapters([lora_state(other)]), ids)
    with pytest.raises(ValueError, match=r"stack_adapters: adapters\[1\] differs from adapters\[0\]"):
        stack_adapters([lora_state(adapted), lora_state(other)])
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lora_state(adapted))
    with pytest.raises(ValueError, match=r"adapters\[1\] differs .*bfloat16"):
        stack_adapters([lora_state(adapted), half])
    with pytest.raises(ValueError, match="must be a list of lora_state results"):
        stack_adapters(lora_state(adapted))


def test_lora_config_values_are_named():
    assert LoraConfig(rank=np.int64(4)).rank == 4
    for kwargs, field in (({"alpha": "16"}, "alpha"), ({"alpha": -1.0}, "alpha"),
                          ({"rank": True}, "rank"), ({"init_std": -1.0}, "init_std"),
                          ({"targets": "q_proj"}, "targets")):
        with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
            LoraConfig(**kwargs)


def test_multi_adapter_unscanned_layers_in_chunks(rng):
    """Unscanned layers (adapters [T, in, R] without a layer axis), shared inputs, T=3 in chunks of
    2, against each adapter merged into its own model."""
    model = random_model(TINY.replace(scan_layers=False), seed=3, lora=LORA)
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, size=(2, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2], jnp.int32)
    adapters = [random_adapter(model, rng) for _ in range(T)]
    with jax.default_matmul_precision("highest"):
        out = multi(model, stack_adapters(adapters), ids, mask, adapter_chunk=2)
        singles = []
        for adapter in adapters:
            one = nnx.clone(model)
            nnx.update(one, adapter)
            singles.append(forward(one, ids, mask))
    real = np.asarray(mask) > 0
    for t in range(T):
        np.testing.assert_allclose(np.asarray(out[t])[real], np.asarray(singles[t])[real], atol=1e-5)


def test_add_lora_refuses_to_replace_adapters(adapted):
    model = nnx.clone(adapted)
    q = model.model.layers.self_attn.q_proj
    q.lora_b[...] = jnp.ones_like(q.lora_b[...])  # as if trained
    with pytest.raises(ValueError, match="already has adapters on .*q_proj.*merge_lora"):
        add_lora(model, LoraConfig(rank=4, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(2))
    assert q.lora_b[...].shape[-2] == LORA.rank and bool(jnp.all(q.lora_b[...] == 1))
    assert model.model.layers.self_attn.v_proj.lora_a is None  # nothing half-added


@pytest.mark.parametrize("kwargs, match", [
    ({"attention_mask": jnp.ones((1, 3))}, r"attention_mask must have shape \[1, 4\]"),
    ({"positions": jnp.zeros((2, 4), jnp.int32)}, "positions must have shape"),
    ({"adapter_chunk": 1.0}, "adapter_chunk"),
    ({"adapter_chunk": True}, "adapter_chunk"),
])
def test_multi_adapter_refuses_bad_arguments(adapted, kwargs, match):
    stacked = stack_adapters([lora_state(adapted)] * 2)
    with pytest.raises(ValueError, match=f"multi_adapter_forward: {match}"):
        multi_adapter_forward(adapted, stacked, jnp.zeros((1, 4), jnp.int32), **kwargs)



# The training tests' smaller unscanned model (a train step on it compiles in half the time).
BF16 = TRAIN_TINY.replace(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)


@pytest.fixture(scope="module")
def bf16_adapted():
    """A bfloat16 base (as `load_hf_checkpoint(path, param_dtype=jnp.bfloat16)` gives) with
    adapters of `add_lora`'s default param_dtype (A and B drawn by NumPy in their dtype)."""
    return random_model(BF16, seed=4, lora=LORA)


def test_bf16_base_gets_float32_adapters_that_merge_like_float64(bf16_adapted, rng):
    """Adapters used to take the base kernel's dtype: a bf16 base got bf16 adapters, which the
    trainer refuses (float32 master weights), so a bf16 base could not be LoRA-trained."""
    assert {x.dtype for x in jax.tree.leaves(lora_state(bf16_adapted))} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16_adapted, nnx.Param))} == \
        {jnp.dtype(jnp.bfloat16)}
    half = nnx.eval_shape(lambda: add_lora(CausalLM(BF16, rngs=nnx.Rngs(0)),
                                           dataclasses.replace(LORA, param_dtype="bfloat16"),
                                           rngs=nnx.Rngs(3)))
    assert {x.dtype for x in jax.tree.leaves(lora_state(half))} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="LoraConfig.param_dtype"):
        LoraConfig(param_dtype=jnp.int32)
    model = nnx.clone(bf16_adapted)
    nnx.update(model, random_adapter(model, rng))
    # Merged into the bf16 kernels: W + scale A B in float64, rounded once to bf16 (the f32 sum
    # rounded again to bf16 is at most a hair beyond half a bf16 ulp, 2**-8 relative).
    merged = nnx.jit(merged_kernels)(model)
    assert len(merged) == len(LORA.targets) * BF16.num_hidden_layers  # unscanned
    for path, dense in nnx.iter_modules(model):
        key = tuple(path) + ("kernel",)
        if key not in merged:
            continue
        w = np.asarray(dense.kernel[...], np.float64)
        a, b = (np.asarray(x[...], np.float64) for x in (dense.lora_a, dense.lora_b))
        want = w + LORA.scale * np.einsum("...ir,...ro->...io", a, b)
        assert merged[key].dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(merged[key], np.float64), want,
                                   rtol=2.0 ** -8 * 1.001, atol=1e-30)
        assert np.abs(want - w).max() > 0.1  # the adapter really moved the kernel
    # The adapters compute in the compute dtype, as the base does: the same values stored in
    # bf16 give the very same bf16 output (layer 0's q_proj, run eagerly: no model compile).
    x = jnp.asarray(rng.standard_normal((3, BF16.hidden_size)), jnp.float32)
    outs = []
    for cast in (False, True):
        graphdef, state = nnx.split(model.model.layers[0].self_attn.q_proj)
        if cast:
            state = jax.tree.map(lambda v: v.astype(jnp.bfloat16), state)
        y = nnx.merge(graphdef, state)(x)
        assert y.dtype == jnp.bfloat16
        outs.append(np.asarray(y, np.float32))
    np.testing.assert_array_equal(outs[0], outs[1])
    merge_lora(model)
    assert not jax.tree.leaves(lora_state(model))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}


def test_float32_export_of_a_bf16_base_keeps_the_float32_adapters(bf16_adapted, rng, tmp_path):
    """save_hf_checkpoint(dtype=float32) of a bf16 base with float32 adapters used to write the
    bf16-rounded merge cast up (2e-3 off): the merge is now rounded once, to the file dtype."""
    model = nnx.clone(bf16_adapted)
    nnx.update(model, random_adapter(model, rng))
    save_hf_checkpoint(model, tmp_path, dtype=jnp.float32)
    files = load_file(tmp_path / "model.safetensors")
    merged = merged_kernels(model, "float32")
    for layer in range(BF16.num_hidden_layers):
        dense = model.model.layers[layer].self_attn.q_proj
        w = np.asarray(dense.kernel[...], np.float64)  # the bf16 base, exactly
        a, b = (np.asarray(x[...], np.float64) for x in (dense.lora_a, dense.lora_b))
        want = w + LORA.scale * a @ b
        got = files[f"model.layers.{layer}.self_attn.q_proj.weight"]
        assert got.dtype == np.float32
        tol = 4 * np.finfo(np.float32).eps * np.abs(want).max()
        np.testing.assert_allclose(got.T, want, rtol=0, atol=tol)
        key = ("model", "layers", layer, "self_attn", "q_proj", "kernel")
        assert merged[key].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(merged[key]), want, rtol=0, atol=tol)
    # The default still gives the base kernel's dtype; a non-float dtype is refused by name.
    assert {x.dtype for x in merged_kernels(model).values()} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="merged_kernels: dtype must be a floating dtype"):
        merged_kernels(model, jnp.int8)


def test_bf16_base_multi_adapter_equals_each_adapter(bf16_adapted, rng):
    model = bf16_adapted
    ids = jnp.asarray(rng.integers(0, BF16.vocab_size, size=(2, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
    adapters = [random_adapter(model, rng) for _ in range(T)]
    out = np.asarray(multi(model, stack_adapters(adapters), ids, mask))
    real = np.asarray(mask) > 0
    for t in range(T):
        one = nnx.clone(model)
        nnx.update(one, adapters[t])
        single = np.asarray(forward(one, ids, mask))[real]
        # bf16 compute: the grouped LoRA products round differently from the per-model ones.
        np.testing.assert_allclose(out[t][real], single, atol=0.05 * np.abs(single).max())
    assert np.abs(out[0] - out[1])[real].max() > 0.3 * np.abs(out[0][real]).max()


def test_trainer_lora_step_on_bf16_base(bf16_adapted, rng):
    """Trainer(trainable="lora") on a bf16 base: the float32 check accepts the adapters, one step
    moves them and leaves the bf16 base bit-identical."""
    model = bf16_adapted
    trainer = Trainer(model, TrainConfig(trainable="lora", learning_rate=1e-2, total_steps=2,
                                         warmup_steps=0))
    state = trainer.init(seed=0)
    seqs = [Encoded(rng.integers(1, BF16.vocab_size, size=7).astype(np.int32),
                    np.array([0, 0, 0, 1, 1, 1, 1], bool), example=i) for i in range(2)]
    state, metrics = trainer.step(state, trainer.place_batch(pad_batch(seqs, 7, 2)))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    trained = trainer.model(state)
    assert {x.dtype for x in jax.tree.leaves(lora_state(trained))} == {jnp.dtype(jnp.float32)}
    moved = [float(jnp.abs(x - y).max()) for x, y in
             zip(jax.tree.leaves(lora_state(trained)), jax.tree.leaves(lora_state(model)), strict=True)]
    assert max(moved) > 1e-4
    for x, y in zip(jax.tree.leaves(nnx.state(trained, nnx.Param)),
                    jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
