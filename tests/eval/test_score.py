"""Probe scoring against a plain per-model, per-example reference (one sequence at a time,
float64 log-softmax), and its JSD against the float64 pairwise reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax

from taskpgm_jax.data import Encoded, pack_batches, pad_batch
from taskpgm_jax.eval import ProbeScorer, adapter_probe_forward
from taskpgm_jax.models import LoraConfig, ModelConfig, add_lora, lora_state
from tests.divergence.distributions import assert_close_to_reference, reference_pairwise
from tests.models.conftest import random_model

CFG = ModelConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, dtype=jnp.float32)
T = 3  # tasks = single-task adapters
SEQ_LEN, BATCH = 24, 2


def _random_model(rng):
    model = random_model(CFG, seed=int(rng.integers(2**31)))
    return add_lora(model, LoraConfig(rank=2, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(1))


def _examples(rng):
    """A few prompt + target sequences per task, with their task ids."""
    seqs, tasks = [], []
    for task in range(T):
        for _ in range(int(rng.integers(2, 4))):
            prompt, target = int(rng.integers(2, 6)), int(rng.integers(1, 4))
            ids = rng.integers(1, CFG.vocab_size, size=prompt + target).astype(np.int32)
            mask = np.r_[np.zeros(prompt, bool), np.ones(target, bool)]
            seqs.append(Encoded(ids, mask, example=len(seqs)))
            tasks.append(task)
    return seqs, np.asarray(tasks)


# One sequence at a time, right-padded to one length (causal: padding after a token cannot
# change it), so the reference compiles once.
_single = nnx.jit(lambda model, ids, mask: model(ids, mask))


def _reference(model, adapters, seqs, tasks):
    """Per model, per sequence, unpacked: L, the base row, and target-position log-probs."""
    rows, positions = [], []
    for adapter in [*adapters, jax.tree.map(jnp.zeros_like, adapters[0])]:
        nnx.update(model, adapter)
        per_example, per_position = [], []
        for s in seqs:
            n = len(s)
            ids = np.zeros((1, SEQ_LEN), np.int32)
            ids[0, :n] = s.input_ids
            mask = (np.arange(SEQ_LEN) < n).astype(np.int32)[None]
            with jax.default_matmul_precision("highest"):
                logits = np.asarray(_single(model, ids, mask), np.float64)[0, :n]
            logp = log_softmax(logits, axis=-1)
            target_at = np.flatnonzero(s.target_mask[1:])  # position t predicts token t + 1
            per_example.append(sum(logp[t, s.input_ids[t + 1]] for t in target_at))
            per_position.append(logp[target_at])
        rows.append([np.mean(np.asarray(per_example)[tasks == k]) for k in range(T)])
        positions.append(np.concatenate(per_position))
    pos_tasks = np.concatenate([[k] * int(s.target_mask[1:].sum()) for s, k in zip(seqs, tasks, strict=True)])
    lp = np.stack(positions[:T]).astype(np.float32)
    jsd = np.mean([reference_pairwise(lp[:, pos_tasks == k]) for k in range(T)], axis=0)
    return np.asarray(rows[:T]), np.asarray(rows[T]), jsd


def _score(scorer, params, batches):
    state = scorer.init()
    with jax.default_matmul_precision("highest"):
        for batch, seg_tasks in batches:
            state = scorer.update(state, params, batch, seg_tasks)
    return scorer.result(state)


@pytest.mark.parametrize("packed", [False, True])
def test_probe_scoring_matches_per_example_reference(rng, packed):
    model = _random_model(rng)
    adapters = [jax.tree.map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype),
                             lora_state(model)) for _ in range(T)]
    seqs, tasks = _examples(rng)
    if packed:
        # Pack in order; recover each row's sequences to know their tasks.
        batches, order, max_segments = [], iter(range(len(seqs))), SEQ_LEN // 3
        for batch in pack_batches(seqs, SEQ_LEN, BATCH):
            seg_tasks = np.full((BATCH, max_segments), -1)
            for r in range(BATCH):
                for k in range(int(batch.segment_ids[r].max())):
                    seg_tasks[r, k] = tasks[next(order)]
            batches.append((batch, seg_tasks))
    else:
        max_segments = 1
        batches = [(pad_batch(seqs[i:i + BATCH], SEQ_LEN, BATCH),
                    np.pad(tasks[i:i + BATCH], (0, BATCH - len(tasks[i:i + BATCH])),
                           constant_values=-1)[:, None])
                   for i in range(0, len(seqs), BATCH)]
    forward, params = adapter_probe_forward(model, adapters)
    scorer = ProbeScorer(forward, T, T, max_segments=max_segments)
    L, base_row, D, examples = _score(scorer, params, batches)
    # HF-style -100 targets under padding (loss_mask 0) change nothing (same compiled shape).
    hf_batches = [(batch._replace(targets=np.where(batch.loss_mask > 0, batch.targets, -100)),
                   seg_tasks) for batch, seg_tasks in batches]
    np.testing.assert_array_equal(np.asarray(_score(scorer, params, hf_batches)[0]),
                                  np.asarray(L))
    ref_L, ref_base, ref_D = _reference(model, adapters, seqs, tasks)
    np.testing.assert_allclose(np.asarray(L), ref_L, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(base_row), ref_base, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(examples), np.bincount(tasks, minlength=T))
    assert_close_to_reference(np.asarray(D), ref_D, "probe JSD")
    assert np.max(np.asarray(D)) > 1e-3  # the adapters really differ
    if not packed:  # without the base model: same L and D (the JSD then runs on T models only)
        forward, params = adapter_probe_forward(model, adapters, include_base=False)
        scorer = ProbeScorer(forward, T, T, include_base=False)
        L_only, no_base, D_only, _ = _score(scorer, params, batches)
        assert no_base is None
        np.testing.assert_allclose(np.asarray(L_only), ref_L, rtol=1e-5, atol=1e-4)
        assert_close_to_reference(np.asarray(D_only), ref_D, "probe JSD without the base")


def test_probe_scorer_errors(rng):
    model = _random_model(rng)
    forward, params = adapter_probe_forward(model, [lora_state(model)] * T)
    scorer = ProbeScorer(forward, T, T, max_segments=1)
    seqs, _ = _examples(rng)
    batch = pack_batches(seqs, SEQ_LEN, BATCH)[0]
    with pytest.raises(ValueError, match="segment_tasks: expected integer shape"):
        scorer.update(scorer.init(), params, batch, np.zeros((BATCH, 2), int))
    for bad in (T, -2):  # would vanish from L and the JSD inside the jit
        tasks = np.zeros((BATCH, 1), int)
        tasks[0, 0] = bad
        with pytest.raises(ValueError, match=r"segment_tasks: task ids must lie in \[0, "):
            scorer.update(scorer.init(), params, batch, tasks)
    if batch.segment_ids.max() > 1:
        with pytest.raises(ValueError, match="more than max_segments=1"):
            scorer.update(scorer.init(), params, batch, np.zeros((BATCH, 1), int))
    with pytest.raises(ValueError, match="max_segments must be >= 1, got 0"):
        ProbeScorer(forward, T, T, max_segments=0)
    assert ProbeScorer(forward, T, T, max_segments=np.int64(2)).max_segments == 2  # NumPy ints
    # include_base must match the forward's: otherwise the row count is off by one and the
    # error came from inside the accumulators, without naming include_base.
    with pytest.raises(ValueError, match=r"include_base=False but the forward was built with "
                                         r"adapter_probe_forward\(\.\.\., include_base=True\)"):
        ProbeScorer(forward, T, T, include_base=False)
    no_base, _ = adapter_probe_forward(model, [lora_state(model)] * T, include_base=False)
    with pytest.raises(ValueError, match=r"include_base=True but .*include_base=False\): pass the "
                                         r"same include_base to both"):
        ProbeScorer(no_base, T, T)
    # Ids outside the vocabulary (37): under jit an input id would be clipped and a target would
    # make the whole cross-likelihood NaN. A bad loss_mask would weight tokens wrongly.
    tasks = np.zeros((BATCH, 1), int)
    for field, value, match in (("input_ids", 37, r"batch\.input_ids: ids must lie in \[0, "
                                 r"vocab_size=37\), got 37"),
                                ("targets", -1, r"batch\.targets: ids must lie in \[0, "
                                 r"vocab_size=37\), got -1"),
                                ("loss_mask", 2.0, r"batch\.loss_mask must lie in \[0, 1\]")):
        x = np.array(getattr(batch, field))
        x[np.unravel_index(np.argmax(batch.loss_mask), x.shape)] = value  # a target token
        with pytest.raises(ValueError, match=match):
            scorer.update(scorer.init(), params, batch._replace(**{field: x}), tasks)


def test_probe_step_stores_one_batch_of_logits(rng):
    """The compiled step's peak memory stays near one batch of [T + 1, B, S, V] logits: no
    normalised copy, no copy of the T task models' slice (2.8x one batch before, 1.2x after, at
    this size; the rest is arguments and parameters)."""
    cfg = ModelConfig(vocab_size=4096, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, dtype=jnp.float32)
    model = add_lora(random_model(cfg, seed=int(rng.integers(2**31))),
                     LoraConfig(rank=2, targets=("q_proj",)), rngs=nnx.Rngs(1))
    forward, params = adapter_probe_forward(model, [lora_state(model)] * T)
    scorer = ProbeScorer(forward, T, T)
    b, s = 2, 64
    seqs = [Encoded(rng.integers(1, cfg.vocab_size, size=s).astype(np.int32),
                    np.r_[np.zeros(s // 2, bool), np.ones(s // 2, bool)]) for _ in range(b)]
    batch = pad_batch(seqs, s, b)
    tasks = jnp.zeros((b, 1), jnp.int32)
    mem = scorer._step.lower(scorer.init(), params, batch, tasks).compile().memory_analysis()
    peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
    logits_bytes = (T + 1) * b * s * cfg.vocab_size * 4
    assert peak < 1.4 * logits_bytes, (peak / logits_bytes, peak, logits_bytes)
