"""Checks at the Python boundary of the MRF layer: shapes, finiteness, signs and feasibility.

Every check raises a ValueError that names the argument and says what to do. Inside a caller's
own `jax.jit` the inputs are tracers whose values are unknown: only the static checks (rank,
shape) run there and the caller owns the values.
"""

from __future__ import annotations

import functools
import operator
from typing import Callable, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

_P = ParamSpec("_P")
_R = TypeVar("_R")


def is_traced(x) -> bool:
    """True when `x` is a tracer (inside someone's jit/vmap/grad: values are unknown)."""
    return isinstance(x, jax.core.Tracer)


def eager_when_concrete(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run `fn` eagerly when none of its array arguments is a tracer.

    Functions that read values on the host (spectra, range checks, greedy choices) work on
    concrete arrays. Inside a caller's jit, a closure constant is concrete but every JAX
    operation on it is staged out, so the host reads would fail on tracers; evaluating at
    trace time gives the same result as outside the jit, baked in as a constant.
    """
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if any(is_traced(leaf) for leaf in jax.tree.leaves((args, kwargs))):
            return fn(*args, **kwargs)
        with jax.ensure_compile_time_eval():
            return fn(*args, **kwargs)
    return wrapper


def register_static_fields(cls, static: tuple[str, ...]):
    """Register the NamedTuple `cls` as a pytree whose `static` fields (strings: a method name,
    a unary kind) are auxiliary data instead of leaves, so that it can cross a `jax.jit` or
    `jax.vmap` boundary (as an argument or a result); the other fields stay leaves."""
    leaves = tuple(f for f in cls._fields if f not in static)

    def flatten(obj):
        return (tuple((jax.tree_util.GetAttrKey(f), getattr(obj, f)) for f in leaves),
                tuple(getattr(obj, f) for f in static))

    def unflatten(aux, children):
        return cls(**dict(zip(leaves, children, strict=True)),
                   **dict(zip(static, aux, strict=True)))

    jax.tree_util.register_pytree_with_keys(cls, flatten, unflatten)
    return cls


def float_dtype(x):
    """The float dtype a computation on `x` runs in: float64 for float64 input under
    `jax.enable_x64`, float32 otherwise. bfloat16 / float16 inputs are upcast: their 8-11
    mantissa bits cannot meet the solvers' 1e-6 tolerances (a bf16 solve's weights summed to
    1.001 and lay 0.03 off), and closed_form's Cholesky has no bf16 kernel."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.asarray(np.zeros((), dtype)).dtype
        if dtype.itemsize >= 4:
            return dtype
    return jnp.zeros((), jnp.float32).dtype


def consistent_potentials(pot):
    """`pot` with matrix and unary in one dtype that JAX holds in the current x64 mode.

    Potentials built under `jax.enable_x64` and used outside it carry float64 arrays that every
    float32 operation would reject; float32 ones used inside x64 stay float32 (their precision
    is all there is). The unary follows the matrix.
    """
    dtype = float_dtype(pot.matrix)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"potentials: expected a float matrix, got dtype {pot.matrix.dtype}; "
                         "build them with taskpgm_jax.mrf.potentials(...).")
    matrix, unary = pot.matrix, pot.unary
    if matrix.dtype != dtype or unary.dtype != dtype:
        matrix, unary = jnp.asarray(matrix).astype(dtype), jnp.asarray(unary).astype(dtype)
        pot = pot._replace(matrix=matrix, unary=unary)
    return pot


def as_float_array(x, name: str, *, ndim: int, dtype=None):
    """`x` as a JAX float array of rank `ndim`; raises for other ranks or non-numeric dtypes."""
    if isinstance(x, (list, tuple, int, float)):
        x = np.asarray(x)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name}: expected an array, got {type(x).__name__}.")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected rank {ndim}, got shape {tuple(x.shape)}.")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}.")
    return jnp.asarray(x, dtype=dtype if dtype is not None else float_dtype(x))


def check_finite(x, name: str) -> None:
    if is_traced(x):
        return
    with jax.ensure_compile_time_eval():  # eager for a concrete array inside a caller's jit too
        finite = bool(jnp.all(jnp.isfinite(x)))
    if not finite:
        raise ValueError(f"{name}: contains NaN or inf; every entry must be finite.")


def check_square(x, name: str) -> None:
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{name}: expected a square [T, T] matrix, got shape {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the matrix is empty (T = 0); at least one task is needed.")


def check_vector(x, name: str, size: int, *, dtype) -> jax.Array:
    x = as_float_array(x, name, ndim=1, dtype=dtype)
    if x.shape[0] != size:
        raise ValueError(f"{name}: expected {size} entries (one per task), got {x.shape[0]}.")
    check_finite(x, name)
    return x


CONCRETE_HINT = {
    "beta": " To sweep beta / lam use solve_path(pot, ratios), or jax.vmap a function of beta "
            "that calls solve(pot._replace(beta=beta)).",
}
CONCRETE_HINT["lam"] = CONCRETE_HINT["beta"]


def _real_scalar(value, name: str, what: str) -> float:
    """A Python float from a real number: Python, NumPy or 0-d JAX. Strings are refused (float()
    would parse "1" here while arrays refuse it elsewhere), and so are bools (True would pass as
    1) and complex numbers and arrays of other shapes."""
    if is_traced(value):
        raise ValueError(f"{name}: needs a concrete number, got a traced value (inside jit, vmap "
                         f"or grad); pass it from outside the transformed function."
                         f"{CONCRETE_HINT.get(name, '')}")
    bad = isinstance(value, (str, bytes, bool, np.bool_))
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not bad:
        bad = (np.ndim(value) != 0 or not (jnp.issubdtype(dtype, jnp.floating)
                                           or jnp.issubdtype(dtype, jnp.integer)))
    if not bad:
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{name}: expected {what}, got {value!r}.")


def check_positive(value, name: str) -> float:
    """A positive finite Python float (beta, lam, tau, temperature, ...)."""
    v = _real_scalar(value, name, "a positive number")
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: must be positive and finite, got {value!r}.")
    return v


def check_nonnegative(value, name: str) -> float:
    v = _real_scalar(value, name, "a non-negative number")
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name}: must be >= 0 and finite, got {value!r}.")
    return v


def checked_potentials(pot):
    """`pot` (a `Potentials`) in one consistent dtype; raises naming `pot` for anything else.

    A NamedTuple can be edited with `_replace`, so the shapes and signs are checked here, where
    every consumer passes: a unary of the wrong length would otherwise be padded with zeros or
    truncated by the solvers without a word.
    """
    from taskpgm_jax.mrf.energy import Potentials

    if not isinstance(pot, Potentials):
        raise ValueError(f"pot: expected Potentials from taskpgm_jax.mrf.potentials(...), got "
                         f"{type(pot).__name__}.")
    build = "build it with taskpgm_jax.mrf.potentials(...) (or with_ratio) instead of editing it"
    for field in ("matrix", "unary"):
        if not hasattr(getattr(pot, field), "shape"):
            raise ValueError(f"pot: .{field} is {type(getattr(pot, field)).__name__}, not an "
                             f"array; {build}.")
    shape, ushape = tuple(pot.matrix.shape), tuple(pot.unary.shape)
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
        raise ValueError(f"pot: .matrix must be a square [T, T] matrix with T >= 1, got shape "
                         f"{shape}; {build}.")
    if ushape != (shape[0],):
        raise ValueError(f"pot: .unary has shape {ushape} but .matrix is {shape} (one unary per "
                         f"task: ({shape[0]},)); {build}.")
    for field in ("beta", "lam"):
        value = getattr(pot, field)
        if is_traced(value):
            continue  # vmapped over beta (pot._replace(beta=...) under jax.vmap): caller's values
        try:
            check_positive(value, field)
        except ValueError as e:
            raise ValueError(f"pot: .{str(e).rstrip('.')}; {build}.") from None
    pot = consistent_potentials(pot)
    # `potentials(...)` refuses NaN / inf, but an edited unary or matrix is only seen here: a NaN
    # made the exact solve stop at its start vertex, softmax return the uniform mixture and the
    # selection and its guarantee skip the task, all without an error.
    for field in ("matrix", "unary"):
        value = getattr(pot, field)
        if is_traced(value):
            continue
        with jax.ensure_compile_time_eval():  # eager for a concrete array inside a caller's jit
            finite = bool(_all_finite(value))
        if not finite:
            raise ValueError(f"pot: .{field} contains NaN or inf; every entry must be finite; "
                             f"{build}.")
    return pot


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def check_int(value, name: str, *, minimum: int, what: str = "integer") -> int:
    """A Python int >= minimum from an int or NumPy integer (bool and floats are refused)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected {what}, got {value!r}.") from None
    if v < minimum:
        raise ValueError(f"{name}: expected {what}, got {value!r}.")
    return v


def host_array(value, name: str) -> np.ndarray:
    """`value` as a NumPy array, for checks and choices made on the host; a traced value
    (inside the caller's jit, vmap or grad) gets a ValueError naming `name`, not JAX's
    TracerArrayConversionError from inside our code."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{name}: needs concrete values, got a traced value (inside jit, vmap "
                         "or grad); they are checked on the host, so pass them from outside the "
                         "transformed function.") from None


def require_concrete_potentials(pot, what: str) -> None:
    """Host-side consumers (greedy choices, set values, the ratio) read `pot`'s values."""
    if is_traced(pot.matrix) or is_traced(pot.unary):
        raise ValueError(f"pot: {what} reads the potentials' values on the host, so it needs "
                         "concrete potentials, got traced ones (inside jit, vmap or grad); "
                         "build them outside your transformed function, or close over them.")


def real_numpy(value, name: str) -> np.ndarray:
    """`value` as a float64 NumPy array; strings, bools and other non-numbers are refused
    (NumPy would parse "0.1" silently), and so are traced values (see `host_array`)."""
    arr = host_array(value, name)
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise ValueError(f"{name}: expected numbers, got {value!r} (dtype {arr.dtype}).")
    return arr.astype(np.float64)


def check_bounds(floor, cap, num_tasks: int, dtype):
    """Per-task bounds as [T] arrays (scalars broadcast); raises when no mixture satisfies them.

    Returns (lower, upper, bounded) where `bounded` is False when neither bound was given.
    """
    if floor is None and cap is None:
        return jnp.zeros((num_tasks,), dtype), jnp.ones((num_tasks,), dtype), False
    def per_task(value, default, name):
        arr = real_numpy(default if value is None else value, name)
        if arr.shape not in ((), (1,), (num_tasks,)):
            raise ValueError(f"{name}: expected a scalar or {num_tasks} entries (one per task), "
                             f"got shape {arr.shape}.")
        return np.broadcast_to(arr, (num_tasks,))

    lo, hi = per_task(floor, 0.0, "floor"), per_task(cap, 1.0, "cap")
    for arr, name in ((lo, "floor"), (hi, "cap")):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: contains NaN or inf.")
    if np.any(lo < 0):
        raise ValueError(f"floor: per-task floors must be >= 0, got min {lo.min():.3g}.")
    if np.any(hi < lo):
        i = int(np.argmax(hi < lo))
        raise ValueError(f"cap: task {i} has cap {hi[i]:.3g} below its floor {lo[i]:.3g}.")
    if lo.sum() > 1 + 1e-9:
        raise ValueError(f"floor: the floors sum to {lo.sum():.6g} > 1, so no mixture satisfies "
                         "them; lower the floors.")
    if hi.sum() < 1 - 1e-9:
        raise ValueError(f"cap: the caps sum to {hi.sum():.6g} < 1, so no mixture satisfies "
                         "them; raise the caps.")
    return jnp.asarray(lo, dtype), jnp.asarray(np.minimum(hi, 1.0), dtype), True
