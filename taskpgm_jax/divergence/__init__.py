"""Divergence kernels over log-probabilities: elementwise JSD / KL / entropy, the all-pairs JSD
matrix (blocked, streaming over batches, sharded over a mesh), cross-likelihood and PMI
affinities, and a vocabulary-truncated JSD with certified bounds."""

from taskpgm_jax.divergence.crosslik import CrossLikelihood, CrossLikState, pmi_affinity
from taskpgm_jax.divergence.elementwise import entropy, jsd, kl
from taskpgm_jax.divergence.pairwise import pairwise_jsd
from taskpgm_jax.divergence.streaming import (JSDState, StreamingJSD, default_tiles,
                                              task_balanced_weights)
from taskpgm_jax.divergence.truncated import TruncatedJSD, truncated_pairwise_jsd

__all__ = [
    "CrossLikState", "CrossLikelihood", "JSDState", "StreamingJSD", "TruncatedJSD",
    "default_tiles", "entropy", "jsd", "kl", "pairwise_jsd", "pmi_affinity",
    "task_balanced_weights", "truncated_pairwise_jsd",
]
