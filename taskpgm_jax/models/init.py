"""Creating models: abstract (no memory), or randomly initialised straight into their shardings."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from taskpgm_jax.models.config import ModelConfig, check_int
from taskpgm_jax.models.decoder import CausalLM
from taskpgm_jax.sharding import Rules, named_sharding


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None):
    """A `NamedSharding` for every variable of `state`, from its `logical_axes` metadata.

    Args:
      state: an (abstract or concrete) model state.
      mesh: the mesh.
      rules: logical -> mesh rules (default `DEFAULT_RULES`).

    Returns:
      A pytree like `state` with a `NamedSharding` in place of every variable.
    """

    def one(var):
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        return named_sharding(mesh, axes, var.shape, rules)

    return jax.tree.map(one, state, is_leaf=_is_var)


def init_model(cfg: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None,
               rules: Rules | None = None) -> CausalLM:
    """A randomly initialised `CausalLM`, created directly in its shardings when `mesh` is given.

    The initialiser runs under `jax.jit(..., out_shardings=...)`, so each device computes only its
    own block: the full model never exists on one device. (Without a mesh it is jitted too: one
    compile instead of one dispatch per random op.)

    Args:
      cfg: the model config.
      seed: PRNG seed of the initialisation, an int in [0, 2**32) (NumPy ints too).
      mesh: optional mesh to shard the parameters over.
      rules: logical -> mesh rules.

    Returns:
      The model.
    """
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"init_model: cfg must be a ModelConfig, got {type(cfg).__name__}; "
                         "build one with ModelConfig(**fields), a preset (taskpgm_jax.models."
                         "PRESETS) or taskpgm_jax.hf.config_from_hf")
    seed = check_int("init_model: seed", seed, minimum=0)
    if seed >= 2**32:  # the uint32 PRNGKey seed: a larger one would wrap around
        raise ValueError(f"init_model: seed must be < 2**32, got {seed}")

    def make():
        return CausalLM(cfg, rngs=nnx.Rngs(seed), rules=rules)

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = None if mesh is None else state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def count_params(model_or_state: nnx.Module | nnx.State) -> int:
    """Number of scalars in the `nnx.Param` variables (abstract models count too).

    Args:
      model_or_state: a module (for example from `nnx.eval_shape`) or a state; LoRA adapters
        (`LoRAParam`) and any other non-`nnx.Param` variables are not counted in either.

    Returns:
      The parameter count.
    """
    state = (nnx.filter_state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.State)
             else nnx.state(model_or_state, nnx.Param))
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(state, is_leaf=_is_var)))
