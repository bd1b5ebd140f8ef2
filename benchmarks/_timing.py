"""The timing rules every benchmark here follows: one first call (compile + run), then `repeats`
timed calls, each blocked until the device is done. Where two things are compared as a ratio they
are timed interleaved (`timed_together`), so that drift of the machine over the run (other load,
clock changes: +-10-20% over minutes on a shared host) hits both sides alike."""

from __future__ import annotations

import statistics
import time

import jax


def timed(fn, repeats: int):
    """Returns (first-call seconds, median steady seconds, (min, max) steady seconds, result)."""
    return timed_together({"fn": fn}, repeats)["fn"]


def timed_together(fns: dict, repeats: int):
    """`timed` for several callables, in rounds: each round calls every one once, in order.

    Returns {name: (first-call seconds, median steady seconds, (min, max), last result)}. The
    first calls (compiles) all happen before the first timed round."""
    firsts, outs, times = {}, {}, {name: [] for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        outs[name] = jax.block_until_ready(fn())
        firsts[name] = time.perf_counter() - start
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs[name] = jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: (firsts[name], statistics.median(ts), (min(ts), max(ts)), outs[name])
            for name, ts in times.items()}


def commit_state(module):
    """Commits every array of an NNX module (or optimizer) to the default device, in place.

    A freshly made `nnx.Optimizer` holds uncommitted arrays (`jnp.zeros` with no placement), while
    a jitted step returns committed ones: the second call would then compile again, inside the
    timed rounds, and the compile time reported would be half of the true one."""
    from flax import nnx

    nnx.update(module, jax.device_put(nnx.state(module), jax.devices()[0]))
    return module
