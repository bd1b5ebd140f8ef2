"""Text normalisation and the metrics of a held-out suite (exact match, choice accuracy)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from taskpgm_jax.data.tasks import DataError, check_names


def normalize_text(text: str) -> str:
    """Strip, lower-case and collapse whitespace: the normalisation exact match compares under."""
    return " ".join(text.strip().lower().split())


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (the whole text if none occurs)."""
    stop = check_names(stop, "stop")
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def exact_match(prediction: str, references: Iterable[str]) -> bool:
    """True when the normalised prediction equals any normalised reference.

    Raises:
      DataError (a ValueError): `references` is one string or not strings, or one of them is
        empty or blank (it would match an empty prediction)."""
    references = check_names(references, "references")
    blank = [r for r in references if not normalize_text(r)]
    if blank:
        raise DataError(f"references: {blank[0]!r} is empty or blank: it would match an empty "
                        "prediction; remove it or give the answer text")
    pred = normalize_text(prediction)
    return any(pred == normalize_text(r) for r in references)


def choice_predictions(loglik: np.ndarray, num_tokens: np.ndarray) -> tuple[int, int]:
    """The chosen index by summed log-likelihood and by length-normalised (per-token) one.

    Args:
      loglik: [C] log p(choice | prompt) summed over each choice's tokens.
      num_tokens: [C] tokens of each choice.
    """
    loglik = np.asarray(loglik, np.float64)
    per_token = loglik / np.maximum(np.asarray(num_tokens, np.float64), 1.0)
    return int(np.argmax(loglik)), int(np.argmax(per_token))


def macro_mean(values: Mapping[str, float]) -> float:
    """Unweighted mean over tasks (every task counts the same, whatever its size)."""
    if not values:
        raise ValueError("values: no task results to average.")
    return float(np.mean(list(values.values())))
