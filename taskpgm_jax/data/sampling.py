"""Mixture weights -> training examples.

Counts and baseline weights come from `taskpgm_jax.mrf` (`Mixture.to_counts`, the largest-remainder
rule, and the uniform / size-proportional / temperature mixtures): one definition for the whole
project. The counts sum exactly to the budget. Examples are then drawn per task with a seed: without
replacement while a task has enough examples; a task smaller than its count is repeated, each
example ceil- or floor(count / size) times ("balanced", the lowest-variance way to repeat) or,
with `repeat="iid"`, drawn i.i.d. with replacement; either way the task is listed in `repeated`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from taskpgm_jax.data.tasks import DataError, TaskPool, check_int, check_seed, data_error

if TYPE_CHECKING:  # imported where used at run time (mrf imports are lazy here)
    from taskpgm_jax.mrf.mixture import Mixture

    # What `weights` may be: name -> weight, an array in pool order, or an mrf.Mixture.
    Weights = Mapping[str, float] | Sequence[float] | np.ndarray | Mixture

__all__ = [
    "MixtureSample", "baseline_weights", "interleave_mixture", "mixture_counts", "sample_mixture",
]


@overload
def _as_vector(weights: Weights, names: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]: ...


@overload
def _as_vector(weights: Weights, names: None) -> tuple[np.ndarray, tuple[str, ...] | None]: ...


def _as_vector(weights: Weights, names: Sequence[str] | None) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """The weights as a float64 vector, and their task names: `names` when given, the
    mapping's keys, or None for a bare vector."""
    if hasattr(weights, "as_dict") and hasattr(weights, "to_counts"):  # an mrf.Mixture
        unit = getattr(weights, "unit", "examples")
        if unit != "examples":
            raise data_error(f"this mixture's weights are shares of {unit}; drawing "
                             f"examples needs shares of examples (divide each weight by the "
                             f"task's mean tokens per example and renormalise)")
        weights = weights.as_dict()
    keys: tuple[str, ...] | None
    if isinstance(weights, Mapping):
        keys = tuple(weights)
        if names is not None:
            unknown = [k for k in keys if k not in set(names)]
            if unknown:
                raise data_error(f"weights name tasks that are not in the pool: {unknown}")
            keys = tuple(names)
        w = _numbers([weights.get(k, 0.0) for k in keys], weights)
    else:
        w = _numbers(weights, weights)
        keys = tuple(names) if names is not None else None
        if keys is not None and len(keys) != w.size:
            raise data_error(f"{w.size} weights for {len(keys)} tasks")
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise data_error(f"weights must be finite, non-negative and not all zero; got {w}")
    return w, keys


def _numbers(values: Any, weights: Any) -> np.ndarray:
    """`values` as a flat float64 vector, or a `DataError` showing `weights` (text or an object
    among them failed in NumPy without naming the weights; None became NaN)."""
    if not (values is None or (isinstance(values, (list, tuple))
                               and any(v is None for v in values))):
        try:
            return np.asarray(values, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            pass
    raise data_error(f"weights must be numbers (a mapping task -> weight, an array in pool "
                     f"order, or an mrf.Mixture); got {weights!r:.200}")


def mixture_counts(weights: Weights, budget: int) -> dict[str, int] | np.ndarray:
    """Integer example counts per task, by largest remainder: they sum exactly to `budget`.

    Each task gets floor(w_i / sum(w) * budget); the examples left over go one each to the tasks
    with the largest fractional parts (ties to the earlier task). The arithmetic is exact on the
    weights as given (`taskpgm_jax.mrf.mixture.largest_remainder`), so integer weights that tie
    are tied.

    Args:
      weights: non-negative weights (normalised here): a mapping name -> weight, an array, or a
        `taskpgm_jax.mrf.Mixture`.
      budget: total number of examples.

    Returns:
      The counts, as a dict in the same order when `weights` is a mapping, else an int64 array.

    Example:
      >>> mixture_counts({"a": 0.5, "b": 0.3, "c": 0.2}, 7)
      {'a': 4, 'b': 2, 'c': 1}
    """
    budget = check_int(budget, "budget")
    # One definition of the rounding for the whole project (Mixture.to_counts uses it too), on
    # the weights as given: normalising them first in floating point would turn exact ties
    # (integer weights 7 and 2 at budget 2) into rounding noise.
    from taskpgm_jax.mrf.mixture import largest_remainder

    w, keys = _as_vector(weights, None)
    counts = largest_remainder(w, int(budget))
    if keys is not None:
        return dict(zip(keys, (int(c) for c in counts), strict=True))
    return counts


def baseline_weights(sizes: Mapping[str, int], kind: str = "uniform", *,
                     temperature: float = 1.0, cap: int | None = None,
                     seed: int = 0) -> dict[str, float]:
    """The standard mixtures TaskPGM is compared against.

    Args:
      sizes: task name -> number of (training) examples, e.g. `pool.split_sizes("train")`.
      kind: "uniform" (equal weight), "size" (proportional to size) or "temperature"
        (proportional to size ** (1 / temperature), so temperature 1 is "size" and a large one
        tends to uniform), or "random" (a seeded Dirichlet(1) draw).
      temperature: for "temperature".
      cap: sizes above this count as `cap` (the T5 / seqio examples-proportional cap).
      seed: for "random".

    Returns:
      Weights on the simplex, name -> weight, in the order of `sizes`.

    Raises:
      DataError: `sizes` not a non-empty mapping, `temperature` not a finite number > 0, `cap`
        not a positive int, `seed` not an int in [0, 2**32), or an empty task for size weights.
    """
    from taskpgm_jax.mrf import mixture as mrf_mixture

    # Checked here, so the message names this function's arguments, not the mrf ones.
    if not isinstance(sizes, Mapping) or not sizes:
        raise DataError(f"sizes must be a non-empty mapping task name -> size, e.g. "
                        f"pool.split_sizes('train'); got {sizes!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not 0 < float(temperature) < math.inf:
        raise DataError(f"temperature must be a finite number > 0, got {temperature!r}")
    if cap is not None:
        cap = check_int(cap, "cap", 1)
    seed = check_seed(seed)
    names = tuple(sizes)
    n = np.array([min(s, cap) if cap is not None else s for s in sizes.values()], np.float64)
    if kind not in ("uniform", "random") and np.any(n <= 0):
        empty = [k for k, v in zip(names, n, strict=True) if v <= 0]
        raise data_error(f"size-based weights need every task non-empty; empty: {empty}")
    if kind == "uniform":
        mix = mrf_mixture.uniform_mixture(names)
    elif kind in ("size", "size_proportional"):
        mix = mrf_mixture.size_proportional_mixture(names, n)
    elif kind == "temperature":
        mix = mrf_mixture.temperature_mixture(names, n, float(temperature))
    elif kind == "random":
        mix = mrf_mixture.random_mixture(names, seed)
    else:
        raise ValueError(f"unknown baseline {kind!r}; expected uniform, size, temperature or "
                         f"random")
    return mix.as_dict()


@dataclasses.dataclass(frozen=True)
class MixtureSample:
    """The examples a mixture selects.

    Attributes:
      names: task names, in pool order.
      weights: float64 [tasks], normalised weights.
      counts: name -> number of examples drawn.
      indices: name -> int64 [count] row indices into the task's `split` (not its full examples).
      repeated: name -> (count, available) for every task drawn more times than it has examples.
      order: int64 [budget, 2] (task index, k): the k-th drawn example of that task; a seeded
        shuffle across tasks, the order a trainer should read them in.
      split: which split the examples come from.
      seed: the sampling seed.
    """

    names: tuple[str, ...]
    weights: np.ndarray
    counts: dict[str, int]
    indices: dict[str, np.ndarray]
    repeated: dict[str, tuple[int, int]]
    order: np.ndarray
    split: str
    seed: int

    @property
    def budget(self) -> int:
        return int(sum(self.counts.values()))

    def rows(self, pool: TaskPool):
        """Yields the drawn examples in `order`, each a dict with a `task` key added."""
        # Whole columns once per task: indexing a Dataset row by row is slow.
        cols = {n: pool.split(n, self.split)[:] for n in self.names if self.counts[n]}
        for t, k in self.order:
            name = self.names[t]
            i = int(self.indices[name][k])
            yield {"task": name, **{c: v[i] for c, v in cols[name].items()}}


def _draw(rng: np.random.Generator, available: int, count: int, repeat: str) -> np.ndarray:
    if count <= available:
        return rng.choice(available, size=count, replace=False)
    if repeat == "iid":
        return rng.integers(0, available, size=count)
    full, rest = divmod(count, available)
    picks = np.concatenate([np.tile(np.arange(available), full),
                            rng.choice(available, size=rest, replace=False)])
    return rng.permutation(picks)


def sample_mixture(pool: TaskPool, weights: Weights, budget: int, *, seed: int = 0, split: str = "train",
                   repeat: str = "balanced") -> MixtureSample:
    """Draws `budget` examples from the pool's `split` following `weights`.

    Args:
      pool: the tasks.
      weights: name -> weight (absent names weigh 0), an array in pool order, or an
        `taskpgm_jax.mrf.Mixture`.
      budget: total number of examples.
      seed: the sampling seed, an int in [0, 2**32) (same seed, same pool -> same sample).
      split: the split to draw from ("train" normally).
      repeat: how a task smaller than its count is repeated: "balanced" (every example
        floor/ceil(count / size) times) or "iid" (with replacement).

    Returns:
      A `MixtureSample`; `repeated` lists the tasks drawn with repetition.

    Raises:
      DataError: weights on unknown tasks, a positive count for a task whose split is empty, or
        a seed that is not an int in [0, 2**32).
    """
    if repeat not in ("balanced", "iid"):
        raise ValueError(f"repeat must be 'balanced' or 'iid', got {repeat!r}")
    seed = check_seed(seed)  # a plain int: it goes into the manifest
    w, names = _as_vector(weights, pool.names)
    counts_vec = mixture_counts(w, budget)
    # One generator per task, keyed by (seed, task position and name): a task's draw does not
    # depend on the tasks after it.
    counts, indices, repeated = {}, {}, {}
    for t, (name, c) in enumerate(zip(names, counts_vec, strict=True)):
        c = int(c)
        available = len(pool.indices(name, split))
        if c and not available:
            raise data_error(f"{c} examples requested from an empty {split} split",
                             task=name, source=pool[name].source)
        rng = np.random.default_rng([seed, t, *name.encode()])
        indices[name] = _draw(rng, available, c, repeat) if c else np.zeros(0, np.int64)
        counts[name] = c
        if c > available:
            repeated[name] = (c, available)
    order = np.concatenate([np.stack([np.full(c, t), np.arange(c)], axis=1)
                            for t, c in enumerate(counts.values())] or [np.zeros((0, 2))])
    order = np.random.default_rng([seed, len(names)]).permutation(order.astype(np.int64))
    return MixtureSample(names, w / w.sum(), counts, indices, repeated, order, split, seed)


def interleave_mixture(pool: TaskPool, weights: Weights,
                       *, seed: int = 0, split: str = "train", streaming: bool = False,
                       stopping_strategy: str = "all_exhausted") -> Any:
    """The streaming form: `datasets.interleave_datasets` with the weights as probabilities.

    Unlike `sample_mixture` the per-task counts are random (multinomial in expectation), and
    the stream length depends on `stopping_strategy` ("first_exhausted", "all_exhausted").

    Args:
      pool, weights, seed, split: as in `sample_mixture` (zero-weight tasks are left out).
      streaming: return an `IterableDataset` (each task split turned into a stream).

    Returns:
      A `datasets.Dataset` (or `IterableDataset`) whose rows carry a `task` column.

    Raises:
      DataError: weights on unknown tasks, a positive weight on a task whose split is empty
        (naming it), or a seed that is not an int in [0, 2**32).
    """
    import datasets

    seed = check_seed(seed)
    w, names = _as_vector(weights, pool.names)
    keep = [i for i in range(len(names)) if w[i] > 0]
    parts = []
    for i in keep:
        ds = pool.split(names[i], split)
        if not ds.num_rows:  # `datasets` would refuse it by position, or fail to shard it
            raise data_error(f"weight {w[i]:g} on an empty {split} split: nothing to draw; give "
                             f"the task weight 0 or more examples", task=names[i],
                             source=pool[names[i]].source)
        ds = ds.add_column("task", [names[i]] * ds.num_rows)
        parts.append(ds.to_iterable_dataset() if streaming else ds)
    probs = (w[keep] / w[keep].sum()).tolist()
    return datasets.interleave_datasets(parts, probabilities=probs, seed=seed,
                                        stopping_strategy=stopping_strategy)
