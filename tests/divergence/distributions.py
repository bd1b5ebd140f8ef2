"""Random log-probability rows of the shapes that stress a divergence kernel, plus a float64
NumPy/scipy reference for the all-pairs matrix."""

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax

KINDS = ("flat", "peaked", "sparse", "one_hot", "mixed")


def random_logprobs(rng: np.random.Generator, shape, kind: str = "mixed") -> np.ndarray:
    """float32 log-probs over the last axis; -inf entries where the kind has zeros."""
    shape = tuple(shape)
    v = shape[-1]
    if kind == "mixed":
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        kinds = rng.choice(KINDS[:4], size=rows)
        out = np.stack([random_logprobs(rng, (v,), k) for k in kinds]) if rows else np.zeros(
            (0, v), np.float32)
        return out.reshape(shape)
    if kind == "flat":
        logits = rng.normal(scale=0.1, size=shape)
    elif kind == "peaked":
        logits = rng.normal(scale=8.0, size=shape)
    elif kind == "sparse":
        logits = rng.normal(scale=2.0, size=shape)
        zero = rng.random(shape) < 0.6
        keep = rng.integers(0, v, size=shape[:-1])  # at least one finite entry per row
        np.put_along_axis(zero, keep[..., None], False, axis=-1)
        logits = np.where(zero, -np.inf, logits)
    elif kind == "one_hot":
        logits = np.full(shape, -np.inf)
        np.put_along_axis(logits, rng.integers(0, v, size=shape[:-1])[..., None], 0.0, axis=-1)
    else:
        raise ValueError(kind)
    return log_softmax(logits, axis=-1).astype(np.float32)


def scipy_jsd(lp, lq) -> np.ndarray:
    """float64 JSD (nats) of float32 log-prob rows, via scipy (which returns the distance)."""
    p = np.exp(np.asarray(lp, np.float64))
    q = np.exp(np.asarray(lq, np.float64))
    p, q = np.broadcast_arrays(p, q)
    return jensenshannon(p, q, axis=-1) ** 2


def reference_pairwise(logprobs, weights=None) -> np.ndarray:
    """float64 [T, T] weighted mean JSD by an explicit loop over pairs."""
    t, n, _ = logprobs.shape
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    out = np.zeros((t, t))
    for i in range(t):
        for j in range(i + 1, t):
            out[i, j] = out[j, i] = np.sum(w * scipy_jsd(logprobs[i], logprobs[j])) / w.sum()
    return out


def assert_close_to_reference(ours, ref, what=""):
    """The kernel contract: within 1e-6 absolute plus 1e-5 relative to the largest entry."""
    ours = np.asarray(ours, np.float64)
    tol = 1e-6 + 1e-5 * np.max(np.abs(ref), initial=0.0)
    err = np.max(np.abs(ours - ref), initial=0.0)
    assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g}"
