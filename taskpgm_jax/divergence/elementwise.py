"""Elementwise divergences over the last axis: JSD, KL and entropy, broadcasting leading axes.

Inputs are log-probabilities (or logits with `from_logits=True`) in any float dtype; every
function computes in float32 and returns nats. Entries equal to -inf are probability zero and
follow 0 * log 0 = 0 exactly: zeros are handled with `jnp.where`, never with an epsilon in a log.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from taskpgm_jax.divergence._kernel import LN2, jsd_terms_sum, probs_and_safe_logs
from taskpgm_jax.divergence._validate import check_distribution


def _prepare(x, name: str, from_logits: bool):
    x = check_distribution(x, name, from_logits=from_logits)
    x = jnp.asarray(x).astype(jnp.float32)
    return jax.nn.log_softmax(x, axis=-1) if from_logits else x


def _broadcastable(a, b, names: str):
    try:
        return jnp.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    except ValueError:
        raise ValueError(f"{names}: leading shapes {tuple(a.shape[:-1])} and "
                         f"{tuple(b.shape[:-1])} do not broadcast.") from None


def jsd(logp: ArrayLike | Sequence[Any], logq: ArrayLike | Sequence[Any], *,
        from_logits: bool = False) -> jax.Array:
    """Jensen-Shannon divergence JSD(P, Q) in nats, over the last axis.

    Computed as 1/2 sum P (log P - log M) + 1/2 sum Q (log Q - log M), M = (P + Q) / 2, which keeps
    its digits when P and Q are close. Equals `scipy.spatial.distance.jensenshannon(p, q) ** 2`.

    Args:
      logp, logq: [..., V] log-probabilities (or logits with `from_logits=True`); leading axes
        broadcast.
      from_logits: apply `log_softmax` (in float32) first.

    Returns:
      [...] float32, in [0, ln 2].

    Example:
      >>> d = jsd(jnp.log(jnp.array([1.0, 0.0])), jnp.log(jnp.array([0.0, 1.0])))  # ln 2
    """
    lp = _prepare(logp, "logp", from_logits)
    lq = _prepare(logq, "logq", from_logits)
    if lp.shape[-1] != lq.shape[-1]:
        raise ValueError(f"logp, logq: vocabulary sizes differ ({lp.shape[-1]} vs "
                         f"{lq.shape[-1]}).")
    _broadcastable(lp, lq, "logp, logq")
    return _jsd(lp, lq)


@jax.jit
def _jsd(lp, lq):
    p, slp = probs_and_safe_logs(lp)
    q, slq = probs_and_safe_logs(lq)
    p, q = jnp.broadcast_arrays(p, q)
    slp, slq = jnp.broadcast_arrays(slp, slq)
    # JSD lies in [0, ln 2]; the clamp removes float32 rounding (~1e-8), nothing else.
    return jnp.clip(jsd_terms_sum(p, slp, q, slq), 0.0, LN2)


def kl(logp: ArrayLike | Sequence[Any], logq: ArrayLike | Sequence[Any], *,
       from_logits: bool = False) -> jax.Array:
    """Kullback-Leibler divergence KL(P || Q) = sum P (log P - log Q) in nats, over the last axis.

    +inf where P puts mass on a token that Q gives probability zero (log Q = -inf): that is the
    true value, not an error.

    Args:
      logp, logq: [..., V] log-probabilities (or logits with `from_logits=True`).

    Returns:
      [...] float32, >= 0.
    """
    lp = _prepare(logp, "logp", from_logits)
    lq = _prepare(logq, "logq", from_logits)
    if lp.shape[-1] != lq.shape[-1]:
        raise ValueError(f"logp, logq: vocabulary sizes differ ({lp.shape[-1]} vs "
                         f"{lq.shape[-1]}).")
    _broadcastable(lp, lq, "logp, logq")
    return _kl(lp, lq)


@jax.jit
def _kl(lp, lq):
    # Decided on the log-probs, not on exp(lp): P can underflow float32 (lp < -104) and still
    # be positive, and then lq = -inf makes KL infinite.
    terms = jnp.where(lp == -jnp.inf, 0.0,
                      jnp.where(lq == -jnp.inf, jnp.inf, jnp.exp(lp) * (lp - lq)))
    return jnp.maximum(jnp.sum(terms, axis=-1), 0.0)


def entropy(logp: ArrayLike | Sequence[Any], *, from_logits: bool = False) -> jax.Array:
    """Shannon entropy H(P) = -sum P log P in nats, over the last axis.

    Args:
      logp: [..., V] log-probabilities (or logits with `from_logits=True`).

    Returns:
      [...] float32, in [0, ln V].
    """
    return _entropy(_prepare(logp, "logp", from_logits))


@jax.jit
def _entropy(lp):
    p = jnp.exp(lp)
    return jnp.maximum(-jnp.sum(jnp.where(p > 0, p * lp, 0.0), axis=-1), 0.0)
