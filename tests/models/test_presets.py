"""Full-size presets: shapes only (nnx.eval_shape allocates nothing), counts equal the published ones."""

import pytest
from flax import nnx

from taskpgm_jax.models import PRESETS, PUBLISHED_PARAM_COUNTS, CausalLM, count_params


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_published(name):
    cfg = PRESETS[name]()
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == PUBLISHED_PARAM_COUNTS[name]
    layers = abstract.model.layers
    assert layers.self_attn.k_proj.kernel.shape == (
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim)


@pytest.mark.parametrize("name, overrides", [
    ("llama2_7b", dict(rope_theta=1e4, num_hidden_layers=2)),
    ("llama3_8b", dict(rope_theta=1e4, num_hidden_layers=2)),
    ("llama31_8b", dict(rope_factor=4.0, num_hidden_layers=2)),
    ("qwen2_7b", dict(qkv_bias=True, num_hidden_layers=2, rope_theta=1e4)),
    ("mistral_7b", dict(sliding_window=1024, num_hidden_layers=2, rope_theta=1e4)),
])
def test_overrides_replace_preset_fields(name, overrides):
    # Every field a preset sets can be overridden (a small model of the same layout, say).
    cfg = PRESETS[name](**overrides)
    assert {k: getattr(cfg, k) for k in overrides} == overrides
    assert cfg.hidden_size == PRESETS[name]().hidden_size


def test_mistral_window_layers_follow_the_final_config():
    assert PRESETS["mistral_7b"](num_hidden_layers=3).sliding_window_layers == (0, 1, 2)
    no_window = PRESETS["mistral_7b"](sliding_window=None)
    assert (no_window.sliding_window, no_window.sliding_window_layers) == (None, ())
    with pytest.raises(ValueError, match="ModelConfig.num_hidden_layers must be a positive int"):
        PRESETS["mistral_7b"](num_hidden_layers=0)
    assert PRESETS["mistral_7b"](num_hidden_layers=2,
                                 sliding_window_layers=(1,)).sliding_window_layers == (1,)
