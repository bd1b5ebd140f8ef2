"""`Mixture`: task names, weights, unit and provenance; integer counts; JSON; exporters to the
formats the JAX training stacks read (reference/peers.md 4); baseline mixtures.

    mix = Mixture.from_solution(names, solve(pot), unit="examples")
    mix.to_counts(100_000)          # {name: int}, sums exactly to the budget
    mix.to_levanter()               # {"train_weights": {name: w}}
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import numbers
import os
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
from jax.typing import ArrayLike

from taskpgm_jax.mrf._validate import check_positive, real_numpy

UNITS = ("examples", "tokens")


def largest_remainder(weights, budget: int) -> np.ndarray:
    """Integer counts proportional to `weights` that sum exactly to `budget`.

    floor(budget * w_i / sum(w)), then one more for the largest fractional parts, ties to the
    earlier task. The arithmetic is exact (integers over a common power-of-two denominator: every
    float is a binary fraction), so a tie is an exact tie of the weights as given (integer
    weights [1, 7, 2] at budget 2 tie, and the 7 wins), never broken by rounding noise. Weights
    that tie only in decimal are not ties once stored as floats (0.7 is stored just below 7/10).

    Args:
      weights: finite non-negative numbers, not all zero (need not sum to 1).
      budget: a non-negative integer.

    Returns:
      int64 counts, one per weight.

    Example:
      >>> largest_remainder([0, 1, 7, 2, 0], 2)   # array([0, 0, 2, 0, 0])
    """
    fr = [fractions.Fraction(float(w)) for w in np.asarray(weights, np.float64).reshape(-1)]
    denom = max(f.denominator for f in fr)  # all powers of two: the largest is a multiple of all
    num = [f.numerator * (denom // f.denominator) for f in fr]
    total, budget = sum(num), int(budget)
    counts = [n * budget // total for n in num]
    rem = [n * budget - c * total for n, c in zip(num, counts, strict=True)]  # numerators over `total`
    order = sorted(range(len(num)), key=lambda i: (-rem[i], i))
    for i in order[:budget - sum(counts)]:
        counts[i] += 1
    return np.array(counts, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Mixture weights over named tasks.

    names: task names (unique). weights: floats >= 0 summing to 1 (checked to 1e-6 and kept as
    given; the constructors below normalise in float64). unit: what a weight is a share of,
    "examples" or "tokens". provenance: how it was made (method, parameters), a JSON-able
    mapping, stored as its JSON round trip (so `from_json(to_json())` gives it back exactly).
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    unit: str = "examples"
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        names = tuple(str(n) for n in _names(self.names))
        w = _weights_for(names, self.weights, "weights").reshape(-1)
        if len(names) != w.size:
            raise ValueError(f"weights: {w.size} weights for {len(names)} names; give one weight "
                             "per task.")
        if len(names) == 0:
            raise ValueError("names: a mixture needs at least one task.")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"names: duplicate task names {dup}.")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights: must be finite and >= 0.")
        if abs(w.sum() - 1.0) > 1e-6:
            raise ValueError(f"weights: must sum to 1 (got {w.sum():.9g}); normalise them, or "
                             "build from counts with Mixture.from_counts.")
        if self.unit not in UNITS:
            raise ValueError(f"unit: expected one of {UNITS}, got {self.unit!r}.")
        object.__setattr__(self, "names", names)
        # Kept as given (the constructors below normalise): dividing by a sum that is 1 only to
        # within rounding again would change the last bits on every JSON round trip.
        object.__setattr__(self, "weights", tuple(float(x) for x in w))
        if not isinstance(self.provenance, Mapping):
            raise ValueError(f"provenance: expected a mapping {{key: JSON value}}, got "
                             f"{type(self.provenance).__name__}.")
        object.__setattr__(self, "provenance", {str(k): _json_value(v, k)
                                                for k, v in self.provenance.items()})

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_solution(cls, names: Sequence[str], solution, *, unit: str = "examples",
                      **provenance) -> "Mixture":
        """From a `solve` result; its method, energy and KKT residual go into provenance."""
        fields = ("weights", "method", "energy", "kkt_residual", "iterations")
        if not all(hasattr(solution, f) for f in fields) or np.ndim(solution.weights) != 1:
            hint = ("for one ratio of a SolutionPath pass Mixture(names, path.weights[i]); "
                    if hasattr(solution, "ratios") else "")
            raise ValueError(f"solution: expected a Solution from solve(pot), got "
                             f"{type(solution).__name__}; {hint}for plain weights use "
                             "Mixture(names, weights), for a Selection a mixture over "
                             "sel.indices (e.g. uniform_mixture of those names).")
        w = real_numpy(solution.weights, "solution.weights")
        info = {"method": solution.method, "energy": float(solution.energy),
                "kkt_residual": float(solution.kkt_residual),
                "iterations": int(solution.iterations)}
        return cls(_names(names), tuple(w / w.sum()), unit, {**info, **provenance})

    @classmethod
    def from_counts(cls, counts: Mapping[str, float], *, unit: str = "examples",
                    **provenance) -> "Mixture":
        """From {name: count} (any non-negative numbers, not all zero)."""
        if not isinstance(counts, Mapping):
            raise ValueError(f"counts: expected a mapping {{name: count}}, got "
                             f"{type(counts).__name__}.")
        names = tuple(counts)
        c = real_numpy([counts[n] for n in names], "counts")
        if c.size == 0 or not np.all(np.isfinite(c)) or np.any(c < 0) or c.sum() <= 0:
            raise ValueError("counts: expected finite non-negative numbers, not all zero.")
        return cls(names, tuple(c / c.sum()), unit, provenance)

    # -- integer counts -------------------------------------------------------------------
    def to_counts(self, budget: int) -> dict[str, int]:
        """Integer counts by largest remainder: floor(w_i * budget), then one more for the
        largest fractional parts (ties to the earlier task) until they sum exactly to budget.
        Exact arithmetic on the stored weights (see `largest_remainder`).

        Example:
          >>> Mixture(("a", "b", "c"), (0.5, 0.3, 0.2)).to_counts(7)   # {a: 4, b: 2, c: 1}
        """
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"budget: expected a non-negative integer, got {budget!r}.")
        counts = largest_remainder(self.weights, int(budget))
        return dict(zip(self.names, (int(c) for c in counts), strict=True))

    # -- JSON -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "weights": list(self.weights),
                           "unit": self.unit, "provenance": self.provenance}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Mixture":
        d = _load_json(text, "text", "a JSON object with 'names' and 'weights'")
        _require(d, ("names", "weights"), "text", "the output of Mixture.to_json()")
        if not isinstance(d["weights"], list):
            raise ValueError(f"weights: expected a JSON list of numbers, one per name (as "
                             f"Mixture.to_json() writes), got {d['weights']!r}.")
        return cls(_names(d["names"]), tuple(d["weights"]), d.get("unit", "examples"),
                   d.get("provenance", {}))

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights, strict=True))

    # -- exporters (reference/peers.md 4) -------------------------------------------------
    def to_seqio(self) -> list[tuple[str, float]]:
        """seqio / t5x `Mixture(name, tasks=[(task_name, rate), ...])` rates (relative)."""
        return list(zip(self.names, self.weights, strict=True))

    @classmethod
    def from_seqio(cls, rates: Sequence[tuple[str, float]], **kw) -> "Mixture":
        rates = [] if isinstance(rates, (str, Mapping)) else list(rates)
        if not rates or not all(isinstance(r, (tuple, list)) and len(r) == 2 for r in rates):
            raise ValueError("rates: expected a non-empty list of (task_name, rate) pairs, as "
                             "in seqio's Mixture(tasks=[...]); for a {name: rate} mapping use "
                             "from_counts.")
        names = [name for name, _ in rates]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:  # dict() would keep the last rate silently
            raise ValueError(f"rates: duplicate task names {dup}; give each task one rate.")
        return cls.from_counts(dict(rates), **kw)

    def to_levanter(self) -> dict[str, dict[str, float]]:
        """Levanter's data config fragment `{"train_weights": {name: weight}}`."""
        return {"train_weights": self.as_dict()}

    @classmethod
    def from_levanter(cls, config: Mapping[str, Mapping[str, float]], **kw) -> "Mixture":
        _require(config, ("train_weights",), "config", 'Levanter\'s {"train_weights": {...}}')
        return cls.from_counts(config["train_weights"], **kw)

    def to_maxtext(self, paths: Mapping[str, str]) -> str:
        """MaxText / Grain `grain_train_mixture_config_path` JSON: {name: {path, weight}}.

        paths: {name: path} (str or os.PathLike); entries for other tasks are not used."""
        if not isinstance(paths, Mapping):
            raise ValueError(f"paths: expected a mapping {{name: path}}, got "
                             f"{type(paths).__name__}.")
        missing = [n for n in self.names if n not in paths]
        if missing:
            raise ValueError(f"paths: no data path for tasks {missing}.")
        out = {}
        for n in self.names:
            p = paths[n]
            if not isinstance(p, (str, os.PathLike)):
                raise ValueError(f"paths[{n!r}]: expected a path (str or pathlib.Path), got "
                                 f"{p!r}.")
            out[n] = os.fspath(p)  # a pathlib.Path is not JSON data
        return json.dumps({n: {"path": out[n], "weight": w}
                           for n, w in zip(self.names, self.weights, strict=True)}, indent=2)

    @classmethod
    def from_maxtext(cls, text: str, **kw) -> tuple["Mixture", dict[str, str]]:
        d = _load_json(text, "text", "a JSON object {name: {path, weight}}")
        if not d:
            raise ValueError("text: the JSON object is empty; expected {name: {path, weight}}.")
        for n, v in d.items():
            _require(v, ("path", "weight"), f"text[{n!r}]", "{path, weight}")
        mix = cls.from_counts({n: v["weight"] for n, v in d.items()}, **kw)
        return mix, {n: v["path"] for n, v in d.items()}

    def to_open_instruct(self, budget: int | None = None, *,
                         sizes: Mapping[str, float] | None = None) -> dict[str, float | int]:
        """open-instruct `dataset_mixer` values, which it reads per dataset: a value v > 1 as v
        examples, v <= 1 as that fraction of the dataset (`int(v * len(dataset))`). So weights
        cannot be written as they are; give exactly one of:

        budget: integer counts by largest remainder (`to_counts`). A count of exactly 1 would
          read as the whole dataset, so it is refused (raise the budget or drop the task).
        sizes: {name: examples in the dataset}: fractions f_i = c w_i / n_i with the largest
          c that every dataset can supply (the largest f_i is 1), so the examples taken are in
          proportion to the weights.
        """
        if (budget is None) == (sizes is None):
            raise ValueError("budget / sizes: give exactly one; open-instruct reads a value <= 1 "
                             "as a fraction of that dataset, so the weights alone do not say "
                             "how many examples to take.")
        if budget is not None:
            counts = self.to_counts(budget)
            ones = [n for n, c in counts.items() if c == 1]
            if ones:
                raise ValueError(f"budget: {budget} gives a count of 1 to {ones}, which "
                                 "open-instruct reads as the whole dataset; raise the budget, or "
                                 "drop those tasks.")
            return dict(counts)  # dict[str, int] as the declared dict[str, float | int]
        n = _sizes(self.names, _sizes_by_name(sizes, self.names))
        w = np.asarray(self.weights)
        ratio = np.where(w > 0, n / np.where(w > 0, w, 1.0), np.inf)
        f = np.minimum(ratio.min() * w / n, 1.0)
        f[np.argmin(ratio)] = 1.0  # the dataset that limits the scale is taken whole, exactly
        return {name: float(x) for name, x in zip(self.names, f, strict=True)}

    @classmethod
    def from_open_instruct(cls, mixer: Mapping[str, float], *,
                           sizes: Mapping[str, float] | None = None, **kw) -> "Mixture":
        """From a `dataset_mixer`, read as open-instruct reads it: v > 1 examples, v <= 1 that
        fraction of the dataset, which needs `sizes` ({name: examples}) unless every v is > 1
        or 0."""
        if not isinstance(mixer, Mapping):
            raise ValueError(f"mixer: expected a mapping {{name: value}}, got "
                             f"{type(mixer).__name__}.")
        values = real_numpy(list(mixer.values()), "mixer")  # strings, bools refused by name
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError("mixer: values must be finite and >= 0.")
        mixer = dict(zip(mixer, values.tolist(), strict=True))
        as_fractions = [n for n, v in mixer.items() if 0 < v <= 1]
        if as_fractions and sizes is None:
            raise ValueError(f"sizes: the values of {as_fractions} are <= 1, which open-instruct "
                             "reads as fractions of those datasets; pass sizes={name: examples}.")
        frac = tuple(as_fractions)  # only these need a size
        n = dict(zip(frac, _sizes(frac, _sizes_by_name(sizes, frac)), strict=True)) if frac else {}
        return cls.from_counts({k: (v if v > 1 or v == 0 else v * n[k])
                                for k, v in mixer.items()}, **kw)


# -- baselines ------------------------------------------------------------------------------
def _sizes(names: tuple, sizes):
    s = _weights_for(names, sizes, "sizes")
    if s.shape != (len(names),):
        raise ValueError(f"sizes: expected {len(names)} entries (one per task), got {s.shape}.")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("sizes: every task needs a positive, finite size.")
    return s


def _weights_for(names: tuple, values, name: str) -> np.ndarray:
    """Per-task numbers in the order of `names`, as float64: a sequence in that order, or a
    mapping keyed by exactly those names (reordered). Strings and bools are refused."""
    if isinstance(values, Mapping):
        keys = [str(k) for k in values]
        if sorted(keys) != sorted(names) or len(set(keys)) != len(keys):
            raise ValueError(f"{name}: a mapping must have exactly the task names as keys; "
                             f"missing {sorted(set(names) - set(keys))}, extra "
                             f"{sorted(set(keys) - set(names))}.")
        by_name = {str(k): v for k, v in values.items()}
        values = [by_name[n] for n in names]
    elif isinstance(values, (str, bytes)):
        raise ValueError(f"{name}: expected numbers, one per task, got the string {values!r}.")
    return real_numpy(values, name)


def _sizes_by_name(sizes, names: tuple) -> list:
    if not isinstance(sizes, Mapping):
        raise ValueError(f"sizes: expected a mapping {{name: examples}}, got "
                         f"{type(sizes).__name__}.")
    missing = [n for n in names if n not in sizes]
    if missing:
        raise ValueError(f"sizes: no size for tasks {missing}.")
    return [sizes[n] for n in names]


def _names(names) -> tuple:
    """Task names as a tuple; a single string is refused (it would split into characters)."""
    if isinstance(names, (str, bytes)):
        raise ValueError(f"names: expected a list of task names, got the string {names!r}; "
                         f"wrap a single name in a list: [{names!r}].")
    try:
        return tuple(names)
    except TypeError:
        raise ValueError(f"names: expected a list of task names, got "
                         f"{type(names).__name__}.") from None


def _refuse_duplicate_keys(pairs):
    """json's object_pairs_hook: a key given twice would otherwise keep only its last value."""
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise _DuplicateKeys(dup)
    return dict(pairs)


class _DuplicateKeys(Exception):
    pass


def _load_json(text, name: str, expected: str) -> dict:
    try:
        d = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKeys as e:
        raise ValueError(f"{name}: duplicate keys {e.args[0]} in a JSON object (only the last "
                         "would be kept); give each key once.") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: not valid JSON ({e}); expected {expected}.") from None
    if not isinstance(d, dict):
        raise ValueError(f"{name}: expected {expected}, got a JSON {type(d).__name__}.")
    return d


def _require(d, keys, name: str, expected: str) -> None:
    missing = [k for k in keys if not isinstance(d, Mapping) or k not in d]
    if missing:
        raise ValueError(f"{name}: missing {missing}; expected {expected}.")


def _numpy_to_python(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError


def _json_value(value, key):
    """A provenance value as its JSON round trip (NumPy scalars and arrays, also nested, become
    Python numbers and lists; tuples lists; keys strings), so `to_json` cannot fail after the
    mixture was built and `from_json(to_json())` gives the same mixture back."""
    try:
        return json.loads(json.dumps(value, default=_numpy_to_python, allow_nan=True))
    except (TypeError, ValueError):
        raise ValueError(f"provenance: {key!r} = {value!r} is not JSON data (numbers, strings, "
                         "lists, dicts).") from None


def uniform_mixture(names: Iterable[str], *,
                    unit: Literal["examples", "tokens"] = "examples") -> Mixture:
    """Every task the same weight."""
    names = _names(names)
    n = len(names)
    if n == 0:
        raise ValueError("names: a mixture needs at least one task.")
    return Mixture(names, (1.0 / n,) * n, unit, {"method": "uniform"})


def size_proportional_mixture(names: Iterable[str],
                              sizes: ArrayLike | Sequence[float] | Mapping[str, float], *,
                              unit: Literal["examples", "tokens"] = "examples") -> Mixture:
    """w_i proportional to n_i (examples or tokens per task)."""
    names = _names(names)  # once: a generator would be empty the second time
    s = _sizes(names, sizes)
    return Mixture(names, tuple(s / s.sum()), unit, {"method": "size_proportional"})


def temperature_mixture(names: Iterable[str],
                        sizes: ArrayLike | Sequence[float] | Mapping[str, float], tau: float, *,
                        unit: Literal["examples", "tokens"] = "examples") -> Mixture:
    """w_i proportional to n_i^(1 / tau): tau = 1 is size-proportional, tau -> inf uniform."""
    tau = check_positive(tau, "tau")  # Python, NumPy or 0-d JAX numbers, as beta / lam
    names = _names(names)
    logits = np.log(_sizes(names, sizes)) / tau
    w = np.exp(logits - logits.max())
    return Mixture(names, tuple(w / w.sum()), unit, {"method": "temperature", "tau": tau})


def random_mixture(names: Iterable[str], seed: int, *,
                   unit: Literal["examples", "tokens"] = "examples") -> Mixture:
    """A Dirichlet(1) draw: uniform over the simplex, reproducible from the seed."""
    names = _names(names)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"random_mixture: seed must be an int in [0, 2**32), got {seed!r}")
    w = np.random.default_rng(seed).dirichlet(np.ones(len(names)))
    return Mixture(names, tuple(w), unit, {"method": "random", "seed": int(seed)})
