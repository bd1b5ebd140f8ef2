"""Cross-likelihood L[i, j] (model i on task j's probe examples) and the PMI affinity.

    acc = CrossLikelihood(num_models=T)
    state = acc.init()
    for scores, task_ids in batches:   # [T, B] per-example target log-likelihood sums, [B]
        state = acc.update(state, scores, task_ids)
    L = acc.result(state)              # [T, T] mean over task j's examples of log p_i(y | x)
    S = pmi_affinity(L)                # DESIGN.md 4
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from taskpgm_jax.divergence._kernel import kahan_add
from taskpgm_jax.divergence._validate import as_array, check_positive_int, is_traced


class CrossLikState(NamedTuple):
    """Running sums of the cross-likelihood accumulator (Kahan-compensated).

    sums:   [M, T] float32, sum over task j's seen examples of model i's score.
    carry:  [M, T] float32, Kahan compensation of `sums`.
    counts: [T] float32, examples seen per task.
    """

    sums: jax.Array
    carry: jax.Array
    counts: jax.Array


@functools.partial(jax.jit, static_argnames="num_tasks")
def _update_impl(state: CrossLikState, scores, task_ids, *, num_tasks: int) -> CrossLikState:
    # One-hot over tasks (padding id -1 matches no task): [M, B] @ [B, T] sums per task.
    onehot = (task_ids[:, None] == jnp.arange(num_tasks)[None, :]).astype(jnp.float32)
    batch_sums = jnp.dot(scores, onehot, precision=jax.lax.Precision.HIGHEST)
    sums, carry = kahan_add(state.sums, state.carry, batch_sums)
    return CrossLikState(sums, carry, state.counts + onehot.sum(axis=0))


class CrossLikelihood:
    """Accumulates L[i, j] = mean over task j's probe examples (x, y) of model i's score of y.

    The score of one example is sum_t log p_i(y_t | x, y_<t) over its target tokens (DESIGN.md 4)
    or, with `per_token=True`, that sum divided by the number of target tokens.

    Args:
      num_models: M, the models scored (rows of L).
      num_tasks: T, the tasks whose examples are scored (columns); default M (model i was trained
        on task i, which `pmi_affinity` requires).
      per_token: normalise each example's score by its number of target tokens.
    """

    def __init__(self, num_models: int, num_tasks: int | None = None, *,
                 per_token: bool = False):
        self.num_models = check_positive_int(num_models, "num_models")
        self.num_tasks = check_positive_int(num_tasks if num_tasks is not None else num_models,
                                            "num_tasks")
        self.per_token = bool(per_token)

    def init(self) -> CrossLikState:
        zeros = jnp.zeros((self.num_models, self.num_tasks), jnp.float32)
        return CrossLikState(zeros, zeros, jnp.zeros((self.num_tasks,), jnp.float32))

    def update(self, state: CrossLikState, scores, task_ids, num_tokens=None) -> CrossLikState:
        """Add one batch of B examples.

        Args:
          state: from `init` or a previous `update`.
          scores: [M, B] each model's summed target log-likelihood of each example (<= 0).
          task_ids: [B] integer task of each example; -1 marks padding (ignored).
          num_tokens: [B] target-token counts; required with `per_token=True`.
        """
        self._check_state(state)
        # Kept as given (NumPy stays NumPy) until the value checks have run: jnp.asarray would
        # turn float64 1e40 into inf and wrap int64 ids past 2**31 first (x64 off).
        scores = as_array(scores, "scores", f"float log-likelihoods [{self.num_models}, B]")
        task_ids = as_array(task_ids, "task_ids", "integer task indices [B]",
                            "; map task names to their indices first")
        if scores.ndim != 2 or scores.shape[0] != self.num_models:
            raise ValueError(f"scores: expected shape ({self.num_models}, B), got "
                             f"{tuple(scores.shape)}.")
        if not jnp.issubdtype(scores.dtype, jnp.floating):
            raise ValueError(f"scores: expected floating log-likelihoods, got {scores.dtype}.")
        batch = scores.shape[1]
        if task_ids.shape != (batch,) or not jnp.issubdtype(task_ids.dtype, jnp.integer):
            raise ValueError(f"task_ids: expected integer shape ({batch},), got "
                             f"{tuple(task_ids.shape)} {task_ids.dtype}.")
        if self.per_token:
            if num_tokens is None:
                raise ValueError("num_tokens: required when per_token=True.")
            num_tokens = as_array(num_tokens, "num_tokens", "target-token counts [B]")
            if num_tokens.shape != (batch,):
                raise ValueError(f"num_tokens: expected shape ({batch},), got "
                                 f"{tuple(num_tokens.shape)}.")
            # bool or complex "counts" would be read as 0/1 or lose their imaginary part.
            if not (jnp.issubdtype(num_tokens.dtype, jnp.integer)
                    or jnp.issubdtype(num_tokens.dtype, jnp.floating)):
                raise ValueError(f"num_tokens: expected integer (or whole float) token counts, "
                                 f"got dtype {num_tokens.dtype}.")
        elif num_tokens is not None:
            raise ValueError("num_tokens: given, but this accumulator sums log-likelihoods per "
                             "example; build it with CrossLikelihood(..., per_token=True) to "
                             "divide by the token counts.")
        if not is_traced(scores) and not is_traced(task_ids):
            ids = np.asarray(task_ids)
            if np.any(ids < -1) or np.any(ids >= self.num_tasks):
                raise ValueError(f"task_ids: ids must lie in [0, {self.num_tasks}) or be -1 for "
                                 f"padding; got range [{ids.min()}, {ids.max()}].")
            vals = np.asarray(scores, np.float64)[:, ids >= 0]
            if not np.all(np.isfinite(vals)):
                raise ValueError("scores: contains NaN or inf for a non-padding example.")
            if np.any(vals > 1e-3 * max(1.0, np.abs(vals).max(initial=0.0))):
                raise ValueError("scores: log-likelihoods must be <= 0; got positive values "
                                 "(did you pass losses? negate them).")
            if np.any(vals < -np.finfo(np.float32).max):
                raise ValueError(f"scores: {vals.min():.3g} is beyond float32's range (the "
                                 "accumulator's dtype); it would be summed as -inf.")
            if self.per_token and not is_traced(num_tokens):
                given = np.asarray(num_tokens, np.float64)[ids >= 0]
                if not np.all(np.isfinite(given)) or np.any(given != np.round(given)):
                    raise ValueError("num_tokens: expected whole token counts; got NaN, inf or "
                                     "a fraction for a non-padding example.")
                if np.any(given < 1):
                    raise ValueError("num_tokens: every non-padding example needs >= 1 target "
                                     "token.")
        scores = jnp.asarray(scores).astype(jnp.float32)
        task_ids = jnp.asarray(task_ids)
        if self.per_token:
            num_tokens = jnp.asarray(num_tokens)
        # Padding columns may hold anything (even NaN): zero them before the one-hot product.
        scores = jnp.where(task_ids[None, :] >= 0, scores, 0.0)
        if self.per_token:
            # Padding columns (score 0) may carry any count: divide them by 1.
            counts = jnp.where(task_ids >= 0, num_tokens.astype(jnp.float32), 1.0)
            scores = scores / counts[None, :]
        return _update_impl(state, scores, task_ids, num_tasks=self.num_tasks)

    def _check_state(self, state) -> None:
        if not isinstance(state, CrossLikState) or (not is_traced(state.sums) and (
                state.sums.shape != (self.num_models, self.num_tasks)
                or state.counts.shape != (self.num_tasks,))):
            raise ValueError("state: expected the CrossLikState returned by this accumulator's "
                             "init() or update().")

    def result(self, state: CrossLikState):
        """[M, T] float32 matrix L. Raises when a task has no examples (outside a jit)."""
        self._check_state(state)
        if not is_traced(state.counts):
            missing = np.flatnonzero(np.asarray(state.counts) == 0)
            if missing.size:
                raise ValueError(f"state: tasks {missing.tolist()} have no scored examples; "
                                 "L[:, j] is undefined for them.")
        return state.sums / jnp.maximum(state.counts, 1.0)[None, :]


def pmi_affinity(cross_likelihood: ArrayLike | Sequence[Sequence[float]]) -> jax.Array:
    """The authors' PMI task affinity from a square cross-likelihood matrix (DESIGN.md 4):

        S[i, j] = 1/2 [(L[i, j] - L[j, j]) + (L[j, i] - L[i, i])],   S[i, i] = 0.

    Symmetric and usually indefinite. Computed in float32 (float64 for float64 input under
    `with jax.enable_x64(True):`); bfloat16 / float16 input is upcast first, since the sum of two
    gains overflows float16 (to -inf) and bf16 rounds it to 8 bits.

    Args:
      cross_likelihood: [T, T] L, with model i trained on task i.

    Returns:
      [T, T] symmetric matrix with zero diagonal.
    """
    L = as_array(cross_likelihood, "cross_likelihood", "a square [T, T] matrix of numbers")
    if L.ndim != 2 or L.shape[0] != L.shape[1] or L.shape[0] == 0:
        raise ValueError(f"cross_likelihood: expected a square [T, T] matrix with T >= 1 (model "
                         f"i trained on task i), got shape {tuple(L.shape)}.")
    # Complex values would lose their imaginary part to a float cast, bools read as 0/1.
    if not (jnp.issubdtype(L.dtype, jnp.floating) or jnp.issubdtype(L.dtype, jnp.integer)):
        raise ValueError(f"cross_likelihood: expected real numbers, got dtype {L.dtype}.")
    if not jnp.issubdtype(L.dtype, jnp.floating) or jnp.dtype(L.dtype).itemsize < 4:
        L = L.astype(np.float32)  # integers, and bf16 / float16 (too narrow for the gains)
    if not is_traced(L):
        host = np.asarray(L)
        if not np.all(np.isfinite(host)):
            raise ValueError("cross_likelihood: contains NaN or inf.")
        # jnp.asarray would turn float64 beyond float32's range into inf (x64 off) silently.
        big = float(np.max(np.abs(host)))
        if jnp.asarray(host[:0]).dtype == np.float32 and big > float(np.finfo(np.float32).max):
            raise ValueError(f"cross_likelihood: values up to {big:.3g} are beyond float32's "
                             "range; rescale them or enable float64 (jax.enable_x64)")
    L = jnp.asarray(L)
    gain = L - jnp.diagonal(L)[None, :]  # L[i, j] - L[j, j]
    return 0.5 * (gain + gain.T)
