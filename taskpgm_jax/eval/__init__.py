"""Evaluation and probe scoring: held-out metrics (multiple-choice log-likelihood, greedy exact
match) and the single-task models on the shared probe set, streamed into the divergence
accumulators."""

from taskpgm_jax.eval.evaluate import (EVAL_METRICS, EvalResult, choice_logliks, evaluate, generate_texts,
                                       score_generation, score_multiple_choice)
from taskpgm_jax.eval.metrics import (choice_predictions, cut_at_stop, exact_match, macro_mean,
                                      normalize_text)
from taskpgm_jax.eval.score import (ProbeResult, ProbeScorer, ProbeState, adapter_probe_forward,
                                    segment_sums, token_logprobs)

__all__ = [
    "EVAL_METRICS", "EvalResult", "ProbeResult", "ProbeScorer", "ProbeState", "adapter_probe_forward",
    "choice_logliks", "choice_predictions", "cut_at_stop", "evaluate", "exact_match",
    "generate_texts", "macro_mean", "normalize_text", "score_generation",
    "score_multiple_choice", "segment_sums", "token_logprobs",
]
