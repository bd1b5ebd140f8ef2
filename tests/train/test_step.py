"""The train step: loss falls, target-only loss, LoRA freezes the base, accumulation, schedule,
the decay mask, the loss's own token count, config validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taskpgm_jax.data import Encoded, pad_batch
from taskpgm_jax.models import LoRAParam, lora_state, stack_adapters
from taskpgm_jax.train import AdapterTrainer, TrainConfig, Trainer, lr_schedule
from taskpgm_jax.train.step import _decay_mask
from tests.train.conftest import (
    LORA,
    TINY,
    batches,
    random_model,
    tree_copy,
    tree_max_diff,
)

CFG = TrainConfig(learning_rate=1e-2, total_steps=40, warmup_steps=3, weight_decay=0.01,
                  max_grad_norm=1.0)


def reference_loss(model, batch):
    """Mean -log p(target) over loss_mask tokens, in NumPy float64 from the model's logits."""
    logits = np.asarray(model(jnp.asarray(batch.input_ids),
                              segment_ids=jnp.asarray(batch.segment_ids),
                              positions=jnp.asarray(batch.positions)), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = np.take_along_axis(logits, batch.targets[..., None], -1)[..., 0] - logz
    mask = batch.loss_mask > 0
    return -logp[mask].sum() / mask.sum()


def test_loss_falls_with_bf16_compute_and_f32_master_weights(rng):
    model = random_model(TINY.replace(dtype=jnp.bfloat16), seed=3, std=0.1)
    trainer = Trainer(model, CFG.replace(learning_rate=3e-2, total_steps=60))
    state = trainer.init(seed=0)
    data = batches(rng, 4)
    losses = []
    for i in range(60):
        state, metrics = trainer.step(state, trainer.place_batch(data[i % 4]))
        losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))
    assert np.all(np.isfinite(losses))
    assert losses[-4:].mean() < 0.4 * losses[:2].mean(), losses
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert trainer.traces == 1  # new data, same shapes: no retrace


def test_loss_is_target_tokens_only_and_lr_follows_warmup_cosine(rng):
    model = random_model(seed=4)
    trainer = Trainer(model, CFG)
    data = batches(rng, 1)[0]
    want = reference_loss(model, data)
    state = trainer.init(seed=0)
    lrs = []
    for _ in range(5):
        state, metrics = trainer.step(state, trainer.place_batch(data))
        lrs.append(float(metrics["lr"]))
        if len(lrs) == 1:
            np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
            assert float(metrics["tokens"]) == data.loss_mask.sum()
    # Independent schedule: linear 0 -> peak over warmup, then cosine to peak * end_lr_ratio.
    peak, w, total, end = CFG.learning_rate, CFG.warmup_steps, CFG.total_steps, CFG.end_lr_ratio
    expect = [peak * s / w if s < w else
              end * peak + (peak - end * peak) * 0.5 * (1 + np.cos(np.pi * (s - w) / (total - w)))
              for s in range(5)]
    np.testing.assert_allclose(lrs, expect, rtol=1e-5, atol=1e-9)
    # Changing only non-target tokens' targets changes nothing.
    noisy = data._replace(targets=np.where(data.loss_mask > 0, data.targets, 7))
    np.testing.assert_allclose(reference_loss(model, noisy), want, rtol=1e-12)


def test_lora_only_leaves_base_bit_identical(rng):
    model = random_model(seed=5, lora=LORA)
    base_before = tree_copy(nnx.state(model, nnx.Param))
    lora_before = tree_copy(nnx.state(model, LoRAParam))
    trainer = Trainer(model, CFG.replace(trainable="lora"))
    state = trainer.init(seed=1)
    for b in batches(rng, 3):
        state, metrics = trainer.step(state, trainer.place_batch(b))
    trained = trainer.model(state)
    base_after = nnx.state(trained, nnx.Param)
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), base_after, base_before)
    assert all(jax.tree.leaves(same))
    assert tree_max_diff(nnx.state(trained, LoRAParam), lora_before) > 1e-3  # adapters did move
    assert float(metrics["loss"]) > 0


def test_grad_accumulation_equals_one_larger_batch(rng):
    # Micro-batches hold different numbers of target tokens (variable lengths), so a mean of
    # per-micro-batch means would differ; the step must weight by tokens.
    data = batches(rng, 3)
    halves = [(b.loss_mask[0::2].sum(), b.loss_mask[1::2].sum()) for b in data]
    assert any(a != b for a, b in halves)
    model = random_model(seed=6)
    runs = {}
    for k in (1, 2):
        trainer = Trainer(model, CFG.replace(grad_accum=k))
        state = trainer.init(seed=0)
        losses = []
        for b in data:
            state, metrics = trainer.step(state, trainer.place_batch(b))
            losses.append(float(metrics["loss"]))
        runs[k] = (tree_copy(state.params), losses)
    assert tree_max_diff(runs[1][0], runs[2][0]) < 1e-5
    np.testing.assert_allclose(runs[1][1], runs[2][1], rtol=1e-5)
    assert tree_max_diff(runs[1][0], tree_copy(nnx.state(model, nnx.Param))) > 1e-3


def test_bad_config_and_inputs_name_the_key():
    with pytest.raises(ValueError, match="TrainConfig.warmup_steps"):
        TrainConfig(total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="TrainConfig.trainable"):
        TrainConfig(trainable="adapters")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    model = random_model(seed=0)
    with pytest.raises(ValueError, match="add_lora"):
        Trainer(model, CFG.replace(trainable="lora"))
    with pytest.raises(ValueError, match="param_dtype"):
        Trainer(random_model(TINY.replace(param_dtype=jnp.bfloat16)), CFG)
    trainer = Trainer(model, CFG.replace(grad_accum=3))
    with pytest.raises(ValueError, match="grad_accum=3"):
        trainer.place_batch(batches(np.random.default_rng(0), 1)[0])


@pytest.mark.parametrize("field,fix,match", [
    # Out of the vocabulary (32): under jit an input id is clipped, a target gives NaN.
    ("input_ids", lambda x: np.where(x == x.max(), 40, x), r"batch\.input_ids: ids must lie in "
     r"\[0, vocab_size=32\), got 40"),
    ("targets", lambda x: x + 32, r"batch\.targets: ids must lie in "
     r"\[0, vocab_size=32\), got \d+ under loss_mask > 0"),
    ("targets", lambda x: x - 100, r"batch\.targets: ids must lie in \[0, vocab_size=32\), got -"),
    ("input_ids", lambda x: x.astype(np.float32), r"batch\.input_ids must be an int array"),
    ("targets", lambda x: x[:, :4], r"batch\.targets must have the shape of batch\.input_ids"),
    ("loss_mask", lambda x: 2 * x, r"batch\.loss_mask must lie in \[0, 1\].*got 2\.0"),
    ("loss_mask", lambda x: x - 1, r"batch\.loss_mask must lie in \[0, 1\].*got -1\.0"),
    ("loss_mask", lambda x: x * np.nan, r"batch\.loss_mask must lie in \[0, 1\].*got nan"),
])
def test_host_batches_are_checked_before_the_step(lora_trainers, field, fix, match):
    """Values are checked on the host (place_batch, or step given NumPy arrays): under jit they
    cannot be. Refused before any state is touched (no state is even passed)."""
    single, side_by_side = lora_trainers
    good = batches(np.random.default_rng(0), 1)[0]
    bad = good._replace(**{field: fix(getattr(good, field))})
    for check in (single.place_batch, lambda b: single.step(None, b)):
        with pytest.raises(ValueError, match=match):
            check(bad)
    with pytest.raises(ValueError, match=match):  # [T, B, S]
        side_by_side.place_batch(type(bad)(*(np.stack([x, x]) for x in bad)))


def test_targets_under_padding_may_be_anything(rng):
    """HF-style -100 targets where loss_mask is 0 pass the host check and change nothing: the
    loss takes `where` on the mask, so the NaN they gather never reaches the sum."""
    from taskpgm_jax.data import check_batch_values
    from taskpgm_jax.train import target_token_loss

    good = batches(rng, 1)[0]
    hf_style = good._replace(targets=np.where(good.loss_mask > 0, good.targets, -100))
    check_batch_values(hf_style, TINY.vocab_size)
    model = random_model(seed=int(rng.integers(1000)))
    want = target_token_loss(model, good, None)
    got = target_token_loss(model, hf_style, None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.isfinite(np.asarray(got[0]))


@pytest.fixture(scope="module")
def lora_trainers():
    model = random_model(seed=0, lora=LORA)
    lora_cfg = CFG.replace(trainable="lora")
    return (Trainer(model, lora_cfg),
            AdapterTrainer(model, lora_cfg, stack_adapters([lora_state(model)] * 2)))


def test_loss_mask_fractions_are_weights_and_seeds_are_checked(lora_trainers):
    single, side_by_side = lora_trainers
    b = batches(np.random.default_rng(0), 1)[0]
    placed = single.place_batch(b._replace(loss_mask=0.5 * b.loss_mask))  # a weight: accepted
    np.testing.assert_array_equal(np.asarray(placed.loss_mask), 0.5 * b.loss_mask)
    for seed, match in ((-1, r"seed must be in \[0, 2\*\*32\), got -1"),
                        (2**32, r"seed must be in \[0, 2\*\*32\)"),
                        (None, "seed must be an int, got None"), (True, "seed must be an int")):
        with pytest.raises(ValueError, match=match):
            single.init(seed)
    # Adapter t uses seed + t: the last one must fit in uint32 too (it would wrap around).
    with pytest.raises(ValueError, match=r"seed must be in \[0, 4294967295\).*seed \+ t"):
        side_by_side.init(2**32 - 1)


@pytest.mark.parametrize("warmup", [0, 3, 10])
def test_lr_schedule_matches_the_formula(warmup):
    """Linear warmup to the peak, then cosine to peak * end_lr_ratio at total_steps (a warmup as
    long as the run is a warmup only)."""
    cfg = TrainConfig(learning_rate=0.5, total_steps=10, warmup_steps=warmup, end_lr_ratio=0.2)
    schedule = lr_schedule(cfg)
    for step in range(11):
        if step < warmup:
            want = 0.5 * step / warmup
        elif warmup == 10:
            want = 0.5
        else:
            frac = (step - warmup) / (10 - warmup)
            want = 0.5 * (0.2 + 0.8 * 0.5 * (1 + np.cos(np.pi * frac)))
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-7), step


def _by_name(tree):
    """{path without layer indices: leaves}, so a scanned model's stacked variable and an
    unscanned model's per-layer copies land under one name."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(str(k.key) for k in path
                        if isinstance(k, jax.tree_util.DictKey) and not isinstance(k.key, int))
        out.setdefault(name, []).append(x)
    return out


def test_weight_decay_skips_norms_and_biases_scanned_or_not(rng):
    """The decay mask depends on what a variable is, not its rank (scanning stacks a norm to
    [L, H]); a zero-gradient step under scan then leaves norms and biases untouched and shrinks
    every matrix by exactly (1 - lr * weight_decay)."""
    masks = {}
    for scan in (False, True):
        model = random_model(TINY.replace(scan_layers=scan, qkv_bias=True, o_bias=True), seed=1)
        mask = _by_name(_decay_mask(nnx.state(model, nnx.Param)))
        assert all(len(set(v)) == 1 for v in mask.values())  # every layer alike
        masks[scan] = {k: v[0] for k, v in mask.items()}
    assert masks[True] == masks[False]
    kept = sorted(k for k, m in masks[True].items() if not m)
    assert kept and all(k.endswith("bias") or "norm" in k for k in kept)
    assert all(k.endswith(("kernel", "embedding")) for k, m in masks[True].items() if m)

    def zero_loss(model, batch, key):  # a gradient of exactly 0 for every parameter
        return 0.0 * jnp.sum(model.lm_head.kernel[...]), jnp.asarray(1.0)

    model = random_model(TINY.replace(scan_layers=True, qkv_bias=True, o_bias=True), seed=1)
    before = _by_name(tree_copy(nnx.state(model, nnx.Param)))
    cfg = TrainConfig(learning_rate=0.1, total_steps=10, weight_decay=0.5, max_grad_norm=None)
    trainer = Trainer(model, cfg, loss_fn=zero_loss)
    state, _ = trainer.step(trainer.init(seed=0), trainer.place_batch(batches(rng, 1)[0]))
    after = _by_name(tree_copy(state.params))
    for name, [x] in before.items():
        want = x * (1 - 0.1 * 0.5) if masks[True][name] else x
        np.testing.assert_allclose(after[name][0], want, rtol=1e-6, err_msg=name)


def embedding_loss(model, batch, rng):
    """Sum over every real token (prompt included) of |E[token]|^2, and that token count: a
    count other than loss_mask's, a gradient computable by hand, no decoder to compile."""
    del rng
    e = model.model.embed_tokens.embedding[...][batch.input_ids]
    real = batch.segment_ids > 0
    return jnp.sum(jnp.where(real, jnp.sum(e * e, axis=-1), 0.0)), jnp.sum(real)


def test_step_divides_by_the_count_the_loss_returns(rng):
    # Micro-batches of unequal counts (random lengths tie now and then: redraw until they don't).
    while True:
        b = batches(rng, 1)[0]
        real = np.asarray(b.segment_ids) > 0
        if real[0::2].sum() != real[1::2].sum():
            break
    assert real.sum() != b.loss_mask.sum()
    model = random_model(seed=14)
    # By hand, float64: loss = mean over real tokens of |E[id]|^2; dloss/dE[v] = 2 E[v] n_v / n.
    emb = np.asarray(model.model.embed_tokens.embedding[...], np.float64)
    ids, n = np.asarray(b.input_ids)[real], real.sum()
    want_loss = np.sum(emb[ids] ** 2) / n
    want_norm = np.linalg.norm(2 * emb * np.bincount(ids, minlength=len(emb))[:, None] / n)
    for k in (1, 2):
        trainer = Trainer(model, CFG.replace(grad_accum=k), loss_fn=embedding_loss)
        _, metrics = trainer.step(trainer.init(seed=0), trainer.place_batch(b))
        np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["grad_norm"]), want_norm, rtol=1e-5)
        assert float(metrics["tokens"]) == n


@pytest.mark.parametrize("field,value,why", [
    ("learning_rate", float("inf"), "finite"), ("learning_rate", 1e39, "finite"),
    ("learning_rate", 0.0, "> 0"), ("learning_rate", "1e-4", "float"),
    ("weight_decay", float("nan"), "finite"), ("weight_decay", -0.1, ">= 0"),
    ("eps", 0.0, ">= 1.18e-38"), ("eps", -1e-8, ">= 1.18e-38"), ("eps", 1e-45, ">= 1.18e-38"),
    ("b2", float("nan"), "finite"), ("end_lr_ratio", 1.5, r"\[0, 1\]"),
    ("max_grad_norm", float("inf"), "finite"), ("max_grad_norm", 0.0, "> 0"),
    ("total_steps", True, "int"), ("grad_accum", True, "int"), ("warmup_steps", True, "int"),
    ("total_steps", 10.0, "int"),
])
def test_train_config_refuses_bad_values_by_name(field, value, why):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}=.*{why}"):
        TrainConfig(**{field: value})


def test_train_config_normalises_numbers():
    cfg = TrainConfig(learning_rate=1, total_steps=np.int64(5), max_grad_norm=np.float32(2))
    assert type(cfg.learning_rate) is float and type(cfg.total_steps) is int
    assert type(cfg.max_grad_norm) is float
    assert cfg == TrainConfig(learning_rate=1.0, total_steps=5, max_grad_norm=2.0)


def test_loss_stores_no_normalised_copy_of_the_logits():
    """The loss is logsumexp minus the target's logit: a log_softmax would keep a normalised
    float32 copy of the [B, S, V] logits beside them (the step's temporaries were 4.5x the logits
    with it, 2.5x without: at 7B, V = 32000 and 8 x 2048 tokens, 4 GB less per device)."""
    cfg = dataclasses.replace(TINY, vocab_size=8192)
    trainer = Trainer(random_model(cfg), CFG)
    b, s = 4, 128
    batch = trainer.place_batch(pad_batch(
        [Encoded(np.arange(1, s + 1, dtype=np.int32), np.r_[np.zeros(s // 2, bool),
                                                             np.ones(s // 2, bool)])] * b, s, b))
    state = trainer.init(seed=0)
    mem = trainer._compiled()._fn.lower(state, trainer.frozen, batch).compile().memory_analysis()
    logits_bytes = b * s * cfg.vocab_size * 4
    assert mem.temp_size_in_bytes < 3.2 * logits_bytes, mem.temp_size_in_bytes / logits_bytes


def test_a_loss_fn_that_is_not_callable_is_refused_when_built():
    """Was a TypeError "'str' object is not callable" from inside the first jitted step."""
    model = random_model(seed=0)
    for bad in ("target_token_loss", 3):
        with pytest.raises(ValueError, match=r"loss_fn must be a callable \(model, batch, rng\) "
                                             rf"-> \(loss sum, token count\) or None, got "
                                             rf"{type(bad).__name__}"):
            Trainer(model, CFG, loss_fn=bad)


class _DropoutModule(nnx.Module):
    """A user's module holding its own RNG stream (`nnx.Rngs`) in an `nnx.Dropout`."""

    def __init__(self, seed):
        self.w = nnx.Param(jnp.ones((64,), jnp.float32))
        self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=seed))

    def __call__(self, x):
        return self.drop(x * self.w[...])


def test_a_modules_own_dropout_stream_draws_new_masks_every_step_and_resumes(rng):
    """The module's RNG stream was in the trainer's frozen part: advancing it inside the step
    raised Flax's TraceContextError (and a stream read without advancing would repeat its mask
    every step). Now it is refolded per step and micro-batch from the run's key."""
    masks = []

    def loss_fn(model, batch, key):
        del key
        y = model(jnp.ones((64,)))
        jax.debug.callback(lambda m: masks.append(np.asarray(m)), y != 0)
        return jnp.sum(y), jnp.asarray(1.0)

    data = batches(rng, 1)[0]
    model = _DropoutModule(int(rng.integers(0, 2**31)))

    def run(trainer, state, n):
        start = len(masks)
        for _ in range(n):
            state, metrics = trainer.step(state, data)
            jax.block_until_ready(metrics)
        return state, np.stack(masks[start:])

    trainer = Trainer(model, CFG.replace(grad_accum=2), loss_fn=loss_fn)
    seed = int(rng.integers(0, 2**31))
    _, first = run(trainer, trainer.init(seed=seed), 3)  # 3 steps x 2 micro-batches
    assert first.shape == (6, 64)
    assert len({m.tobytes() for m in first}) == 6, "a dropout mask repeated"
    assert 0.2 < first.mean() < 0.8  # rate 0.5 drops about half
    # Same seed: the same masks; resumed from a host copy of the state after step 1 (as from a
    # checkpoint): the same masks for steps 2 and 3, with nothing more in the state.
    state, again = run(trainer, trainer.init(seed=seed), 1)
    _, rest = run(trainer, jax.device_put(tree_copy(state)), 2)
    np.testing.assert_array_equal(np.concatenate([again, rest]), first)
    _, other = run(trainer, trainer.init(seed=seed + 1), 1)
    assert not np.array_equal(other, first[:2])


def test_a_state_of_another_trainer_is_refused_by_name(lora_trainers):
    """Was a raw JAX error from inside the step ("truth value of an array ... is ambiguous",
    "fold_in accepts a single key", a dot_general shape mismatch)."""
    single, side_by_side = lora_trainers
    b = batches(np.random.default_rng(0), 1)[0]
    stacked = type(b)(*(np.stack([x, x]) for x in b))
    full = Trainer(random_model(seed=0, lora=LORA), CFG)
    fit = r"state does not fit this trainer \("
    with pytest.raises(ValueError, match=fit + r"\.params\[.*lora_a.* is float32\[2, .*\], "
                                             r"expected float32\[\d+, \d+\]\).*init\(\)"):
        single.step(side_by_side.init(), b)
    with pytest.raises(ValueError, match=fit + r"\.params\[.*lora_a.* is float32\[\d+, \d+\], "
                                             r"expected float32\[2, \d+, \d+\]"):
        side_by_side.step(single.init(), stacked)
    with pytest.raises(ValueError, match=fit + r"lacks \d+ leaves, e\.g\. \.params\[.*kernel"
                                             r".*has another \d+ leaves, e\.g\. \.params.*lora"):
        full.step(single.init(), b)
    with pytest.raises(ValueError, match="state must be a TrainState .* got tuple"):
        single.step(tuple(single.init()), b)
