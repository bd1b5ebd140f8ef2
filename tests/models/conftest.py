"""A tiny float32 model shared by the model tests (one build, few compiles)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taskpgm_jax.models import CausalLM, LoraConfig, ModelConfig, add_lora

# Qwen2 layout: GQA (4 query heads over 2 kv heads), a sliding window on layer 1, untied head,
# q/k/v biases.
TINY = ModelConfig(model_type="qwen2", vocab_size=61, hidden_size=32, intermediate_size=40,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   sliding_window=4, sliding_window_layers=(1,), dtype=jnp.float32, qkv_bias=True)


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.3,
                 lora: LoraConfig | None = None) -> CausalLM:
    """A model (with adapters when `lora` is given, B factors random too) with N(0, std) weights
    drawn by NumPy.

    XLA:CPU needs ~10 s to compile the threefry initialiser of even a tiny model; NumPy draws are
    instant. The large std keeps logits far from uniform, so argmax decisions are not rounding.
    """
    rng = np.random.default_rng(seed)
    def make():
        model = CausalLM(cfg, rngs=nnx.Rngs(0))
        return model if lora is None else add_lora(model, lora, rngs=nnx.Rngs(1))

    graphdef, state = nnx.split(nnx.eval_shape(make))
    state = jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY


@pytest.fixture(scope="session")
def tiny_model():
    return random_model(TINY)


# One jitted forward shared by every test, so equal shapes compile once per session.
forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
