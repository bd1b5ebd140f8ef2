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
