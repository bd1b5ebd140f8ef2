"""Packed batches through the project's decoder: each segment scores as if it were alone."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from taskpgm_jax.data import encode_task, pack_batches, pad_batch, synthetic_suite
from taskpgm_jax.models import CausalLM, ModelConfig


def _tiny_model(vocab: int, rng) -> CausalLM:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, dtype=jnp.float32)
    # NumPy weights: compiling the random initialiser costs more than the whole test.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                         state)
    return nnx.merge(graphdef, state)


def test_packed_target_loglik_equals_separate_rows(tokenizer, rng):
    pool = synthetic_suite(seed=int(rng.integers(1000)), examples=(30, 40), heldout_examples=5)
    name = pool.names[int(rng.integers(len(pool)))]
    seqs = encode_task(tokenizer, pool.train(name), max_length=24)[:12]
    model = _tiny_model(len(tokenizer), rng)
    fwd = nnx.jit(lambda m, ids, seg, pos: m(ids, segment_ids=seg, positions=pos))

    packed = pack_batches(seqs, seq_len=64, batch_size=4)
    assert max(int(b.segment_ids.max()) for b in packed) >= 2  # rows really hold several
    got = []
    with jax.default_matmul_precision("highest"):
        for b in packed:
            logp = jax.nn.log_softmax(fwd(model, b.input_ids, b.segment_ids, b.positions), -1)
            tok = np.take_along_axis(np.asarray(logp), b.targets[..., None], -1)[..., 0]
            for r in range(b.input_ids.shape[0]):
                for k in range(1, int(b.segment_ids[r].max()) + 1):
                    where = b.segment_ids[r] == k
                    got.append(float((tok[r] * b.loss_mask[r])[where].sum()))
        # Reference: each sequence alone in a padded row, log p(target | prompt) summed directly
        # from the logits and the unshifted target mask.
        # Same [4, 64] shape as the packed batches, so the forward compiles once.
        logps = []
        for i in range(0, len(seqs), 4):
            alone = pad_batch(seqs[i:i + 4], seq_len=64, batch_size=4)
            logps.append(np.asarray(jax.nn.log_softmax(
                fwd(model, alone.input_ids, alone.segment_ids, alone.positions), -1)))
        logp = np.concatenate(logps)
    want = []
    for r, s in enumerate(seqs):
        ids, mask = s.input_ids, s.target_mask
        want.append(sum(float(logp[r, t - 1, ids[t]]) for t in range(1, len(s)) if mask[t]))
    assert len(got) == len(want)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
