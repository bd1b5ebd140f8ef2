"""Full float32 matrix products for the MRF programs, whatever the platform's default.

A GPU's default float32 matmul rounds its operands to TF32 (10 mantissa bits) and a TPU's to
bfloat16: far coarser than the solvers' 1e-6 tolerances and the Lanczos re-orthogonalisation.
The products here are T x T at most, so full precision costs nothing measurable.
"""

from __future__ import annotations

import functools

import jax


def full_float32(fn):
    """Traces `fn` with every matrix product at HIGHEST precision (apply it under `jax.jit`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapper
