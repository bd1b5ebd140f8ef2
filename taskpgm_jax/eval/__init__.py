"""Evaluation and probe scoring: the single-task models on the shared probe set, streamed into
the divergence accumulators."""

from taskpgm_jax.eval.score import (ProbeResult, ProbeScorer, ProbeState, adapter_probe_forward,
                                    segment_sums, token_logprobs)

__all__ = ["ProbeResult", "ProbeScorer", "ProbeState", "adapter_probe_forward", "segment_sums",
           "token_logprobs"]
