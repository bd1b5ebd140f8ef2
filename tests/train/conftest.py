"""Shared tiny models and data for the training tests.

Weights are drawn with NumPy into `nnx.eval_shape` structures (XLA's threefry initialiser takes
~10 s to compile). Every test uses the same few shapes (model, batch, config), and the trainers'
compiled steps are cached by shape, so the whole directory compiles only a handful of steps.
"""

import jax
import jax.numpy as jnp
import numpy as np

from taskpgm_jax.data import Encoded, HostIterator, pad_batch
from taskpgm_jax.models import LoraConfig, ModelConfig
from tests.models.conftest import random_model as _random_model

# Float32 compute so that equality tests compare trajectories, not bf16 rounding.
TINY = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, dtype=jnp.float32,
                   scan_layers=False)
LORA = LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "up_proj"))
SEQ, BATCH = 16, 8


def random_model(cfg=TINY, seed=0, lora: LoraConfig | None = None, std=0.3):
    """The shared NumPy-drawn tiny model (tests/models/conftest.py), TINY by default."""
    return _random_model(cfg, seed=seed, std=std, lora=lora)


def successor_seqs(rng, n, *, offset=1, vocab=TINY.vocab_size, lo=6, hi=SEQ):
    """A learnable task: a random prompt token, then each token is the previous + offset (mod
    vocab, skipping 0). The target part is the second half. Lengths vary, so batches carry
    different numbers of target tokens."""
    seqs = []
    for i in range(n):
        length = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(1, vocab))
        ids = (start - 1 + offset * np.arange(length)) % (vocab - 1) + 1
        mask = np.zeros(length, bool)
        mask[length // 2:] = True
        seqs.append(Encoded(ids.astype(np.int32), mask, example=i))
    return seqs


def batches(rng, count, *, offset=1, batch=BATCH):
    return [pad_batch(successor_seqs(rng, batch, offset=offset), SEQ, batch) for _ in range(count)]


def iterator(seed, *, offset=1, n=40, batch=BATCH):
    seqs = successor_seqs(np.random.default_rng(1000 + seed), n, offset=offset)
    return HostIterator(seqs, batch_size=batch, seq_len=SEQ, seed=seed, pack=False)


def tree_max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def tree_copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)
