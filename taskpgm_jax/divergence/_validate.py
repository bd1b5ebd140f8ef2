"""Checks at the Python boundary, before any jit: shapes, dtypes and values of kernel inputs.

Value checks (NaN, +inf, normalisation, signs) need the data, so they cost one small fused
reduction and one device-to-host transfer of a few scalars. Inside a caller's own `jax.jit` the
inputs are tracers whose values are unknown: there only the static checks (rank, shape, dtype)
run, and the caller is responsible for the values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    """True when `x` is a tracer (we are inside someone's jit/vmap/grad and cannot read values)."""
    return isinstance(x, jax.core.Tracer)


def normalisation_tolerance(dtype, vocab_size: int) -> float:
    """How far a row's logsumexp may stray from 0 and still count as normalised.

    Rounding each log-prob x to the input dtype moves it by up to eps/2 * |x|, so the row's
    logsumexp moves by up to eps/2 * sum_v P_v |log P_v| = eps/2 * H(P) <= eps/2 * ln V: for
    bf16 rows of tied entries (V ~ 3000) that is 0.03. Twice that bound, floored at 1e-4 for
    float32 (whose own sum over V rounds too), still rejects logits, whose logsumexp is
    rarely that close to 0.
    """
    eps = float(jnp.finfo(dtype).eps)
    return max(1e-4, eps * (1.0 + math.log(max(vocab_size, 1))))


def as_array(x, name: str, expected: str, strings_hint: str = ""):
    """`x` as an array, or a ValueError naming `name` for None, ragged nesting, strings or other
    non-numbers (which would otherwise fail inside jnp.asarray with an unnamed TypeError).
    Arrays and tracers pass through unchanged; the caller checks shape and numeric kind."""
    if x is None:
        raise ValueError(f"{name}: expected {expected}, got None.")
    given = type(x).__name__
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError):
            raise ValueError(f"{name}: expected {expected}, got a {given} that is not a "
                             "rectangular array of numbers.") from None
    if x.dtype.kind in "US":
        raise ValueError(f"{name}: expected {expected}, got strings{strings_hint}.")
    if x.dtype.kind == "O":  # e.g. None among numbers, or a dict
        raise ValueError(f"{name}: expected {expected}, got a {given} that holds non-numbers.")
    return x


def _as_float_array(x, name: str):
    if isinstance(x, (list, tuple)):
        x = as_array(x, name, "an array of floating-point log-probabilities or logits")
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise ValueError(f"{name}: expected an array, got {type(x).__name__}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{name}: expected floating-point log-probabilities or logits, got dtype {x.dtype}."
        )
    return x


@jax.jit
def _worst_log_mass(x):
    """max over rows of |log sum exp(x)|, in one fused pass for log-probs (entries <= ~0, so
    exp cannot overflow). NaN or inf in the result means something is wrong somewhere, and
    `_diagnose` then finds out what: the slow path runs only on bad input."""
    return jnp.max(jnp.abs(jnp.log(jnp.sum(jnp.exp(x.astype(jnp.float32)), axis=-1))))


@jax.jit
def _worst_logsumexp(x):
    """For logits: NaN or inf anywhere makes the result non-finite."""
    return jnp.max(jnp.abs(jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)))


@jax.jit
def _diagnose(x):
    x = x.astype(jnp.float32)
    any_nan = jnp.any(jnp.isnan(x))
    any_posinf = jnp.any(x == jnp.inf)
    # A row with no finite entry has no mass at all: neither log-probs nor usable logits.
    empty_row = jnp.any(jnp.all(x == -jnp.inf, axis=-1))
    return any_nan, any_posinf, empty_row


def check_distribution(x, name: str, *, from_logits: bool, rank: int | None = None,
                       min_rank: int = 1) -> jax.Array | np.ndarray:
    """Validate log-probs (or logits) over the last axis and return them as given.

    Raises:
      ValueError naming `name` for a non-float dtype, a wrong rank, an empty vocabulary axis,
      NaN or +inf entries, a row with no finite entry, or (log-probs only) rows whose
      probabilities do not sum to 1.
    """
    x = _as_float_array(x, name)
    if rank is not None and x.ndim != rank:
        raise ValueError(f"{name}: expected rank {rank}, got shape {tuple(x.shape)}.")
    if x.ndim < min_rank:
        raise ValueError(f"{name}: expected at least rank {min_rank}, got shape {tuple(x.shape)}.")
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: the vocabulary (last) axis is empty.")
    if is_traced(x) or x.size == 0:
        return x
    # Eagerly, also when a concrete array is closed over inside the caller's jit (there the
    # reduction would otherwise be traced and have no value to read).
    with jax.ensure_compile_time_eval():
        worst = float(_worst_logsumexp(x) if from_logits else _worst_log_mass(x))
        if not math.isfinite(worst):
            _raise_bad_values(x, name)
    tol = normalisation_tolerance(x.dtype, x.shape[-1])
    if not from_logits and worst > tol:
        raise ValueError(
            f"{name}: rows are not normalised log-probabilities (|logsumexp| up to {worst:.3g}, "
            f"tolerance {tol:.2g}); pass from_logits=True if these are logits."
        )
    return x


def _raise_bad_values(x, name: str):
    any_nan, any_posinf, empty_row = jax.device_get(_diagnose(x))
    if any_nan:
        raise ValueError(f"{name}: contains NaN.")
    if any_posinf:
        raise ValueError(f"{name}: contains +inf.")
    if empty_row:
        raise ValueError(
            f"{name}: a row is -inf everywhere (no token has probability); every row needs mass."
        )
    # Only large positive entries remain: exp overflowed, so these cannot be log-probs.
    raise ValueError(f"{name}: rows are not normalised log-probabilities (entries far above 0); "
                     "pass from_logits=True if these are logits.")


def check_weights(w, name: str, n: int, *, allow_all_zero: bool = False,
                  rescale: bool = False):
    """Validate per-position weights of shape [n]: finite, non-negative, not all zero, and
    representable in float32 (the kernel's dtype).

    `allow_all_zero` is for one streaming batch that is entirely padding. `rescale` divides the
    weights by their maximum (in float64, before the float32 cast) where only their ratios matter
    (a one-shot weighted mean), so that any finite scale works.

    Returns the weights as float32 (a NumPy array outside a jit; tracers are returned as given).
    """
    if isinstance(w, (list, tuple)):
        # float64, as a NumPy array of the same values: a float32 cast here would turn 1e40
        # into inf and 1e-46 into 0 before the rescale below could fix their scale.
        w = as_array(w, name, f"numeric weights of shape ({n},)")
        if w.dtype.kind in "biuf":
            w = w.astype(np.float64)
    if not hasattr(w, "shape"):
        raise ValueError(f"{name}: expected an array of shape [{n}], got {type(w).__name__}.")
    if tuple(w.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},) (one weight per position), got "
                         f"{tuple(w.shape)}.")
    if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)
            or w.dtype == bool):
        raise ValueError(f"{name}: expected numeric weights, got dtype {w.dtype}.")
    if is_traced(w):
        return w
    wn = np.asarray(jax.device_get(w), dtype=np.float64)
    if not np.all(np.isfinite(wn)):
        raise ValueError(f"{name}: contains NaN or inf.")
    if np.any(wn < 0):
        raise ValueError(f"{name}: contains negative weights (min {wn.min():.3g}).")
    if not allow_all_zero and not np.any(wn > 0):
        raise ValueError(f"{name}: all weights are zero; at least one position must count.")
    if rescale and np.any(wn > 0):
        wn = wn / wn.max()
    with np.errstate(over="ignore"):  # overflow is reported below, by name
        w32 = wn.astype(np.float32)
        total32 = w32.sum(dtype=np.float32)
    if not np.isfinite(total32):
        raise ValueError(f"{name}: the weights overflow float32 (sum {wn.sum():.3g}); rescale "
                         "them (only their ratios matter within a batch).")
    # Subnormal float32 counts as zero: XLA on CPU flushes subnormals to 0.
    if np.any(wn > 0) and not np.any(w32 >= np.finfo(np.float32).tiny):
        raise ValueError(f"{name}: every positive weight underflows to 0 in float32 (max "
                         f"{wn.max():.3g}); rescale them.")
    # The checked float32 copy, not `w`: jnp.asarray would wrap int64 weights above 2**31
    # around (x64 off) without a word.
    return w32


def check_models_and_positions(x, name: str) -> None:
    """A [T, N, V] input needs at least one model and one position."""
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the models axis (T, axis 0) is empty; give at least one "
                         "model.")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: the positions axis (N) is empty.")


def check_positive_int(value, name: str, *, allow_none: bool = False):
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}.")
    return int(value)
