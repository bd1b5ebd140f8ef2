"""What a user's type checker sees of the public API: checked by mypy in `tests/test_lint.py`,
never imported or run. Each `assert_type` fails the check when an annotation loses the type
(e.g. a trainer that gives back a bare `nnx.Module` for the `CausalLM` it was built with)."""

from typing import assert_type

import jax.numpy as jnp

from taskpgm_jax.divergence import pairwise_jsd
from taskpgm_jax.hf import load_hf_checkpoint, save_hf_checkpoint
from taskpgm_jax.models import CausalLM
from taskpgm_jax.train import AdapterTrainer, Trainer, TrainConfig, TrainState


def trained_models_export(model: CausalLM, state: TrainState, stacked: TrainState) -> None:
    trainer = Trainer(model, TrainConfig())
    assert_type(trainer, Trainer[CausalLM])
    assert_type(trainer.model(state), CausalLM)
    save_hf_checkpoint(trainer.model(state), "/tmp/export")
    adapters = AdapterTrainer(model, TrainConfig(trainable="lora"), [])
    save_hf_checkpoint(adapters.model(stacked, 0), "/tmp/export-0")


def loaded_model_is_a_causal_lm() -> None:
    assert_type(load_hf_checkpoint("/ckpt"), CausalLM)


def kernels_return_arrays() -> None:
    out = pairwise_jsd(jnp.zeros((2, 3, 4)))
    assert_type(out, jnp.ndarray)
