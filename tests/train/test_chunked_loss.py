"""The chunked LM head + loss: same value, gradients and training steps as the plain loss, far
less memory; its settings checked by name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taskpgm_jax.data import Batch, Encoded, pad_batch
from taskpgm_jax.models import lora_state, stack_adapters
from taskpgm_jax.train import (AdapterTrainer, TrainConfig, Trainer, chunked_target_token_loss,
                               target_token_loss)
from taskpgm_jax.train.loop import _run_settings
from tests.train.conftest import LORA, SEQ, TINY, batches, random_model, tree_copy, tree_max_diff

CFG = TrainConfig(learning_rate=1e-2, total_steps=40, warmup_steps=3, weight_decay=0.01,
                  max_grad_norm=1.0)


def _value_and_grad(model, loss_fn, batch):
    """((loss sum, count), gradient of the sum) with respect to every nnx.Param."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def total(p, b):
        return loss_fn(nnx.merge(graphdef, p, rest), b, None)

    return jax.jit(jax.value_and_grad(total, has_aux=True))(params, batch)


def test_chunked_loss_equals_the_plain_loss(rng):
    model = random_model(seed=int(rng.integers(1000)))
    batch = batches(rng, 1)[0]
    # HF-style -100 under padding and fractional weights: both losses must treat them alike.
    targets = np.where(batch.loss_mask > 0, batch.targets, -100)
    weights = batch.loss_mask * rng.uniform(0.2, 1.0, size=batch.loss_mask.shape)
    batch = Batch(*(jnp.asarray(x) for x in batch._replace(targets=targets, loss_mask=weights)))
    with jax.default_matmul_precision("highest"):
        (plain, plain_count), plain_grad = _value_and_grad(model, target_token_loss, batch)
        # one position per chunk; a remainder chunk (S = 16 = 3 x 5 + 1); one chunk past S
        for chunk in (1, 5, 3 * SEQ):
            (got, count), grad = _value_and_grad(model, chunked_target_token_loss(chunk), batch)
            assert float(count) == float(plain_count) == pytest.approx(float(np.sum(weights)),
                                                                       rel=1e-6)
            np.testing.assert_allclose(float(got), float(plain), rtol=2e-6, err_msg=str(chunk))
            assert tree_max_diff(grad, plain_grad) < 1e-5, chunk


def test_trainers_with_loss_chunk_match_the_plain_ones(rng):
    data = batches(rng, 3)
    runs = {}
    for chunk in (None, 5):
        trainer = Trainer(random_model(seed=3), CFG.replace(loss_chunk=chunk))
        state = trainer.init(seed=0)
        for b in data:
            state, metrics = trainer.step(state, trainer.place_batch(b))
        runs[chunk] = (tree_copy(state.params), float(metrics["loss"]))
    assert tree_max_diff(runs[None][0], runs[5][0]) < 1e-5
    assert runs[5][1] == pytest.approx(runs[None][1], rel=1e-5)
    # T adapters side by side, chunked, equal the plain side-by-side step.
    model = random_model(seed=4, lora=LORA)
    adapters = stack_adapters([jax.tree.map(lambda x, t=t: x + 0.01 * (t + 1), lora_state(model))
                               for t in range(2)])
    stacked = Batch(*(np.stack(xs) for xs in zip(*batches(rng, 2), strict=True)))
    out = {}
    for chunk in (None, 7):
        trainer = AdapterTrainer(model, CFG.replace(trainable="lora", loss_chunk=chunk), adapters)
        state, _ = trainer.step(trainer.init(seed=0), trainer.place_batch(stacked))
        out[chunk] = tree_copy(state.params)
    assert tree_max_diff(out[None], out[7]) < 1e-5


def test_chunked_step_holds_about_one_chunk_of_logits():
    """Temporaries of the whole training step with 8 chunks: under 1.2x the [B, S, V] float32
    logits (2.5x with the plain loss, 0.8-1.0x measured here; the rest is gradients and
    activations). The plain step's bound is in test_step.py, at these same shapes."""
    cfg = dataclasses.replace(TINY, vocab_size=8192)
    b, s = 4, 128
    batch = pad_batch([Encoded(np.arange(1, s + 1, dtype=np.int32),
                               np.r_[np.zeros(s // 2, bool), np.ones(s // 2, bool)])] * b, s, b)
    trainer = Trainer(random_model(cfg), CFG.replace(loss_chunk=s // 8))
    compiled = trainer._compiled()._fn.lower(trainer.init(seed=0), trainer.frozen,
                                             trainer.place_batch(batch)).compile()
    temps = compiled.memory_analysis().temp_size_in_bytes / (b * s * cfg.vocab_size * 4)
    assert temps < 1.2, temps


def test_loss_chunk_settings_are_checked_and_not_part_of_a_run():
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="TrainConfig.loss_chunk"):
            TrainConfig(loss_chunk=bad)
        if not isinstance(bad, (bool, str, float)):
            with pytest.raises(ValueError, match="chunk must be a positive int"):
                chunked_target_token_loss(bad)
    assert chunked_target_token_loss(8) is chunked_target_token_loss(8)  # shared compiled step
    with pytest.raises(ValueError, match="loss_chunk chunks the default loss only"):
        Trainer(random_model(), CFG.replace(loss_chunk=4), loss_fn=target_token_loss)
    # Resuming with loss_chunk changed is allowed: it changes only the summation order.
    plain = _run_settings(Trainer(random_model(), CFG), seed=0)
    chunked = _run_settings(Trainer(random_model(), CFG.replace(loss_chunk=4)), seed=0)
    assert plain == chunked
