"""Host-side access to arrays that may span several processes (a TPU pod slice, multi-node GPU).

In multi-controller JAX, `np.asarray` of a `jax.Array` that lives partly on other processes'
devices raises (unless it is replicated). Two cases come up here:

* results to bring to the host (`to_host`): gathered from every process, which is a collective,
  so every process must make the same call, as SPMD code does;
* a global input batch to check (`local_pieces`): each process checks the pieces it holds; the
  processes together check every row, and nothing is moved between them;
* host inputs, which JAX takes to be the same on every process (`differing_on_processes`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def spans_processes(x) -> bool:
    """Whether `x` is a `jax.Array` with data on another process's devices."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def to_host(x) -> np.ndarray:
    """The whole value of `x` as a NumPy array on this host.

    A `jax.Array` split over several processes' devices (rows split over the processes, say,
    under `jax.set_mesh`) is gathered from all of them: every process must reach this call."""
    if spans_processes(x) and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _pieces(x) -> dict[tuple, np.ndarray]:
    """This process's distinct pieces of `x`, keyed by their index into `x` (as tuples of
    (start, stop, step): slices are not hashable before Python 3.12)."""
    out: dict[tuple, np.ndarray] = {}
    for shard in x.addressable_shards:
        key = tuple(s.indices(n) for s, n in zip(shard.index, x.shape, strict=True))
        out.setdefault(key, np.asarray(shard.data))
    return out


def local_pieces(arrays: Sequence) -> list[list[np.ndarray]]:
    """Aligned host pieces of `arrays` (all of one shape) that this process holds.

    Returns a list of groups, one value per array in each, every group covering the same
    elements of all arrays: `[[np.asarray(a) for a in arrays]]` when no array spans other
    processes; otherwise each piece this process holds, when the arrays share one sharding.
    Arrays split differently (or mixed with host arrays) are gathered whole (`to_host`, a
    collective: every process must make the same call)."""
    if not any(spans_processes(a) for a in arrays):
        return [[np.asarray(a) for a in arrays]]
    first = arrays[0]
    if all(spans_processes(a) and a.shape == first.shape and a.sharding == first.sharding
           for a in arrays):
        pieces = [_pieces(a) for a in arrays]
        return [[p[key] for p in pieces] for key in pieces[0]]
    return [[to_host(a) for a in arrays]]


def _fingerprint(x) -> int:
    x = np.asarray(x)
    crc = zlib.crc32(repr((x.shape, x.dtype.str)).encode())
    return zlib.crc32(np.ascontiguousarray(x).tobytes(), crc)


def differing_on_processes(arrays: Mapping[str, object]) -> list[str]:
    """The names of the host arrays whose values are not the same on every process.

    A host (NumPy) input to a computation over a mesh that spans several processes is taken to
    be one replicated value, identical everywhere; each process's own rows passed that way would
    each be taken for the whole. A collective (a checksum per array from every process): every
    process must make the same call. Empty on one process, or for arrays that span processes."""
    names = [k for k, x in arrays.items() if not spans_processes(x)]
    if jax.process_count() == 1 or not names:
        return []
    mine = np.asarray([_fingerprint(arrays[k]) for k in names], np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, arrays]
    return [k for j, k in enumerate(names) if np.any(every[:, j] != every[0, j])]
