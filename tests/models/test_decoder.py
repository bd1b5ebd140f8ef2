"""Decoder behaviour that needs no checkpoint: packing, layer modes, dtypes, training, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from taskpgm_jax.models import LoraConfig, ModelConfig, greedy_generate
from tests.models.conftest import forward, random_model


def test_packed_segments_equal_separate_rows(tiny_model, rng):
    # Row 0 packs a 4-token and a 5-token sequence plus 1 pad; each segment alone must match.
    a = rng.integers(0, 61, size=4)
    b = rng.integers(0, 61, size=5)
    packed = jnp.asarray(np.concatenate([a, b, [0]])[None], jnp.int32)
    seg = jnp.asarray([[1] * 4 + [2] * 5 + [0]], jnp.int32)
    packed_fwd = nnx.jit(lambda m, ids, seg, pos: m(ids, segment_ids=seg, positions=pos))
    with jax.default_matmul_precision("highest"):
        out = packed_fwd(tiny_model, packed, seg, None)
        explicit = packed_fwd(tiny_model, packed, seg,
                              jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]], jnp.int32))
        # Each segment alone, right-padded to the packed length (one compiled shape).
        alone_a = forward(tiny_model, jnp.asarray(np.pad(a, (0, 6))[None], jnp.int32),
                          jnp.asarray([[1] * 4 + [0] * 6], jnp.int32))[:, :4]
        alone_b = forward(tiny_model, jnp.asarray(np.pad(b, (0, 5))[None], jnp.int32),
                          jnp.asarray([[1] * 5 + [0] * 5], jnp.int32))[:, :5]
    np.testing.assert_allclose(out[0, :4], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 4:9], alone_b[0], atol=1e-5)
    np.testing.assert_allclose(explicit[0, :9], out[0, :9], atol=1e-6)
    # As in transformers, any non-zero attention_mask entry marks a real token: a mask of 3s
    # (not 1s) once split the row into segments and shifted the positions.
    with jax.default_matmul_precision("highest"):
        threes = forward(tiny_model, jnp.asarray(np.pad(a, (0, 6))[None], jnp.int32),
                         jnp.asarray([[3] * 4 + [0] * 6], jnp.int32))[:, :4]
    np.testing.assert_allclose(threes, alone_a, atol=1e-6)


def test_scan_unscanned_remat_agree(tiny_cfg, tiny_model, rng):
    ids = jnp.asarray(rng.integers(0, 61, size=(2, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2], jnp.int32)
    with jax.default_matmul_precision("highest"):
        ref = forward(tiny_model, ids, mask)
        unrolled = random_model(tiny_cfg.replace(scan_layers=False, remat=True), seed=5)
        # Copy the stacked weights into the list of layers, layer by layer.
        for i, layer in enumerate(unrolled.model.layers):
            nnx.update(layer, jax.tree.map(lambda x, i=i: x[i], nnx.state(tiny_model.model.layers)))
        for name in ("embed_tokens", "norm"):
            nnx.update(getattr(unrolled.model, name), nnx.state(getattr(tiny_model.model, name)))
        nnx.update(unrolled.lm_head, nnx.state(tiny_model.lm_head))
        out = forward(unrolled, ids, mask)
    np.testing.assert_allclose(out[mask > 0], ref[mask > 0], atol=1e-5)


def test_bf16_compute_keeps_f32_logits(tiny_cfg, tiny_model, rng):
    ids = jnp.asarray(rng.integers(0, 61, size=(2, 7)), jnp.int32)
    mask = jnp.ones_like(ids)
    half = random_model(tiny_cfg.replace(dtype=jnp.bfloat16), seed=5)
    nnx.update(half, nnx.state(tiny_model))
    assert half.model.layers.mlp.up_proj.kernel[...].dtype == jnp.float32  # params stay f32
    out = forward(half, ids, mask)
    ref = forward(tiny_model, ids, mask)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_no_retrace_for_new_data(tiny_model, rng):
    @chex.assert_max_traces(n=1)
    def fn(model, ids, mask):
        return model(ids, mask)

    jitted = nnx.jit(fn)
    for _ in range(3):
        ids = jnp.asarray(rng.integers(0, 61, size=(2, 6)), jnp.int32)
        jitted(tiny_model, ids, jnp.ones_like(ids)).block_until_ready()


def loss_fn(model, ids, mask):
    logits = model(ids, mask)[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    weights = mask[:, 1:]
    return jnp.sum(ce * weights) / jnp.sum(weights)


@nnx.jit
def train_step(model, optimizer, ids, mask):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model, ids, mask)
    optimizer.update(model, grads)
    return loss


# LoRA-only only: full fine-tuning steps are covered by tests/train and benchmarks/model.py, and
# each variant costs a ~10 s compile of the remat + scan gradient on the CI CPU.
@pytest.mark.parametrize("wrt", ["lora"])
def test_training_reduces_loss_and_lora_trains_only_adapters(tiny_cfg, rng, wrt):
    from taskpgm_jax.models import LoRAParam, add_lora

    model = random_model(tiny_cfg.replace(remat=True), seed=1)
    target = nnx.Param
    if wrt == "lora":
        add_lora(model, LoraConfig(rank=4, targets=("q_proj", "v_proj", "up_proj")), rngs=nnx.Rngs(2))
        target = LoRAParam
    base_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=target)
    ids = jnp.asarray(rng.integers(0, 61, size=(4, 8)), jnp.int32)
    mask = jnp.ones_like(ids)
    losses = [float(train_step(model, optimizer, ids, mask)) for _ in range(4)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    base_after = nnx.state(model, nnx.Param)
    unchanged = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), base_before, base_after)
    assert all(jax.tree.leaves(unchanged)) == (wrt == "lora")


def test_bad_inputs_name_the_argument(tiny_model):
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="input_ids"):
        tiny_model(jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(ids, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        tiny_model(ids, segment_ids=jnp.ones((5,), jnp.int32))
    # Out-of-range ids (transformers raises IndexError) are named with the value, before any work.
    for bad in (61, -1):
        with pytest.raises(ValueError, match=f"input_ids.*vocab_size=61.*got {bad}"):
            tiny_model(ids.at[1, 4].set(bad), jnp.ones((2, 5), jnp.int32))
        with pytest.raises(ValueError, match=f"input_ids.*vocab_size=61.*got {bad}"):
            greedy_generate(tiny_model, ids.at[0, 0].set(bad), max_new_tokens=2)


def test_float_positions_and_segment_ids_are_refused(tiny_model, rng):
    # Truncated to int they ran silently: positions + 0.7 gave the default logits, segment ids
    # of 0.5 became 0 (all padding). Refused by dtype, which is known under jit too.
    ids = jnp.asarray(rng.integers(0, 61, size=(1, 6)), jnp.int32)
    positions = jnp.arange(6.0)[None] + 0.7
    with pytest.raises(ValueError, match="positions must be an int array, got float32"):
        tiny_model(ids, positions=positions)
    with pytest.raises(ValueError, match="segment_ids must be an int array, got float32"):
        tiny_model(ids, segment_ids=jnp.full((1, 6), 0.5))
    with pytest.raises(ValueError, match="positions must be an int array"):
        nnx.jit(lambda m, i, p: m(i, positions=p))(tiny_model, ids, positions)
    with pytest.raises(ValueError, match="positions must be an int array"):
        tiny_model.decode(ids, tiny_model.init_cache(1, 6), positions=positions)


def test_ragged_rows_are_named(tiny_model):
    ragged = [[1, 2, 3], [4, 5]]
    msg = (r"input_ids rows have different lengths; pad them \(tokenizer\(\.\.\., "
           r"padding=True\)\) and pass attention_mask")
    with pytest.raises(ValueError, match=msg):
        tiny_model(ragged)
    with pytest.raises(ValueError, match=msg):
        greedy_generate(tiny_model, ragged, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask rows have different lengths"):
        greedy_generate(tiny_model, [[1, 2, 3], [4, 5, 6]], [[1, 1, 1], [1, 1]],
                        max_new_tokens=2)


def test_models_refuse_a_config_that_is_not_a_model_config(tiny_cfg):
    from taskpgm_jax.models import CausalLM, init_model

    fields = {f: getattr(tiny_cfg, f) for f in ("vocab_size", "hidden_size")}
    with pytest.raises(ValueError, match="init_model: cfg must be a ModelConfig, got dict"):
        init_model(fields)
    with pytest.raises(ValueError, match="CausalLM: cfg must be a ModelConfig, got dict"):
        CausalLM(fields, rngs=nnx.Rngs(0))


def test_concrete_ids_closed_over_in_a_jit_are_checked_and_run(tiny_model, rng):
    # A concrete array inside someone's jit (a closure constant) still has values: the range
    # check reads them eagerly rather than failing on a traced reduction.
    graphdef, state = nnx.split(tiny_model)
    ids = jnp.asarray(rng.integers(0, 61, size=(2, 5)), jnp.int32)
    mask = jnp.ones((2, 5), jnp.int32)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda st: nnx.merge(graphdef, st)(ids, mask))(state)
        want = forward(tiny_model, ids, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    bad = ids.at[0, 2].set(61)
    with pytest.raises(ValueError, match="input_ids.*vocab_size=61.*got 61"):
        jax.jit(lambda st: nnx.merge(graphdef, st)(bad, mask))(state)


def test_out_of_range_padding_ids_under_jit_leave_real_tokens_alone(tiny_model, rng):
    # Inside jit ids cannot be checked; junk ids under padding must not turn logits into NaN.
    ids = rng.integers(0, 61, size=(2, 7))
    mask = np.asarray([[1] * 7, [1] * 4 + [0] * 3])
    junk = ids.copy()
    junk[1, 4:] = [61, -1, 10**6]
    with jax.default_matmul_precision("highest"):
        clean = forward(tiny_model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
        out = forward(tiny_model, jnp.asarray(junk, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out[mask > 0], clean[mask > 0], atol=1e-5)


def test_bad_config_names_the_field(tiny_cfg):
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_cfg.replace(num_key_value_heads=3)
    with pytest.raises(ValueError, match="model_type='gpt2'.*llama, qwen2, mistral"):
        tiny_cfg.replace(model_type="gpt2")
    with pytest.raises(ValueError, match="rope_type"):
        tiny_cfg.replace(rope_type="yarn")
    with pytest.raises(ValueError, match="sliding_window_layers"):
        tiny_cfg.replace(sliding_window_layers=(5,))
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(vocab_size=8, hidden_size=0, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=1, num_key_value_heads=1, head_dim=4)


_SIZES = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8)


@pytest.mark.parametrize("kwargs, field", [
    ({"vocab_size": True}, "vocab_size"),
    ({"max_position_embeddings": -5}, "max_position_embeddings"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"rope_theta": "1e4"}, "rope_theta"),
    ({"rope_type": "linear", "rope_factor": 0.0}, "rope_factor"),
    ({"rope_type": "llama3", "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 4.0},
     "rope_high_freq_factor"),
    ({"init_std": -1.0}, "init_std"),
    ({"sliding_window": True, "sliding_window_layers": (0,)}, "sliding_window"),
    ({"sliding_window": 2.5, "sliding_window_layers": (0,)}, "sliding_window"),
    ({"sliding_window": 2, "sliding_window_layers": (0, 0)}, "sliding_window_layers"),
    ({"sliding_window": 2, "sliding_window_layers": "01"}, "sliding_window_layers"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"dtype": jnp.int32}, "dtype"),
    ({"param_dtype": "float33"}, "param_dtype"),
    ({"eos_token_id": "</s>"}, "eos_token_id"),
    ({"eos_token_id": [2, 2.5]}, "eos_token_id"),
    ({"bos_token_id": [1]}, "bos_token_id"),
    ({"pad_token_id": True}, "pad_token_id"),
])
def test_model_config_refuses_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        ModelConfig(**{**_SIZES, **kwargs})


def test_model_config_normalises_accepted_values():
    cfg = ModelConfig(**{**_SIZES, "model_type": "qwen2", "vocab_size": np.int64(32),
                         "dtype": "bfloat16", "sliding_window": np.int32(2),
                         "sliding_window_layers": [1, 0]})
    assert type(cfg.vocab_size) is int and type(cfg.sliding_window) is int
    assert cfg.sliding_window_layers == (1, 0)
    same = ModelConfig(**{**_SIZES, "model_type": "qwen2", "dtype": jnp.bfloat16,
                          "sliding_window": 2, "sliding_window_layers": (1, 0)})
    assert cfg == same and hash(cfg) == hash(same)  # usable as a static jit argument
    ids = ModelConfig(**_SIZES, eos_token_id=[np.int64(2), 7], pad_token_id=-1)
    assert ids.eos_token_id == (2, 7) and ids.pad_token_id == -1 and hash(ids)
    lora = LoraConfig(targets=["q_proj", "v_proj"])
    assert lora.targets == ("q_proj", "v_proj") and hash(lora) == hash(LoraConfig())
    with pytest.raises(ValueError, match="LoraConfig.targets has duplicates"):
        LoraConfig(targets=("q_proj", "q_proj"))


@pytest.mark.parametrize("model_type, layers", [
    ("llama", (0, 1)), ("llama", ()), ("mistral", (0, 1)), ("mistral", (1,)), ("qwen2", (1,)),
])
def test_model_config_refuses_a_llama_window(model_type, layers):
    # transformers' Llama has no window: it would export as a model that computes something
    # else. Mistral (a window on some layers is Ministral's layout) and Qwen2 take any layers.
    kwargs = {**_SIZES, "model_type": model_type, "sliding_window": 2,
              "sliding_window_layers": layers}
    if model_type == "llama":
        with pytest.raises(ValueError, match=r"model_type='llama'\) has no sliding window.*"
                                             r"sliding_window=None"):
            ModelConfig(**kwargs)
    else:
        assert ModelConfig(**kwargs).sliding_window_layers == layers
    assert ModelConfig(**{**_SIZES, "model_type": model_type}).sliding_window is None


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_model_config_refuses_a_window_on_no_layer(model_type):
    # It was never applied: the logits equalled the windowless model's, and the export said
    # full attention on every layer.
    with pytest.raises(ValueError, match=r"ModelConfig\.sliding_window=2 applies to no layer.*"
                                         r"sliding_window_layers.*tuple\(range\(2\)\).*"
                                         r"sliding_window=None"):
        ModelConfig(**{**_SIZES, "model_type": model_type, "sliding_window": 2})


def test_presets_refuse_a_window_on_no_layer():
    from taskpgm_jax.models import PRESETS

    with pytest.raises(ValueError, match=r"sliding_window=4096 applies to no layer"):
        PRESETS["qwen2_7b"](sliding_window=4096)
    with pytest.raises(ValueError, match=r"sliding_window=4096 applies to no layer"):
        PRESETS["mistral_7b"](sliding_window_layers=())
    assert PRESETS["qwen2_7b"](sliding_window=4096,
                               sliding_window_layers=(27,)).sliding_window_layers == (27,)


@pytest.mark.parametrize("seed,match", [(-1, "an int >= 0"), (1.5, "an int >= 0"),
                                        (2**32, "< 2\\*\\*32")])
def test_init_model_refuses_bad_seeds(seed, match):
    """Checked before anything is traced (nnx.Rngs would wrap or fail deep inside)."""
    from taskpgm_jax.models.init import init_model

    with pytest.raises(ValueError, match=rf"init_model: seed .*{match}"):
        init_model(ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                               num_hidden_layers=1, num_attention_heads=1,
                               num_key_value_heads=1, head_dim=8), seed=seed)


def test_target_logprobs_match_a_float64_log_softmax(rng):
    from scipy.special import log_softmax

    from taskpgm_jax.models import target_logprobs

    logits = (3.0 * rng.standard_normal((2, 5, 37))).astype(np.float32)
    targets = rng.integers(0, 37, size=(2, 5))
    want = np.take_along_axis(log_softmax(logits.astype(np.float64), axis=-1),
                              targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(target_logprobs(jnp.asarray(logits), targets)), want,
                               atol=1e-5)
