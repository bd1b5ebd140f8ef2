"""The timing rule every benchmark here follows: one first call (compile + run), then `repeats`
timed calls, each blocked until the device is done."""

from __future__ import annotations

import statistics
import time

import jax


def timed(fn, repeats: int):
    """Returns (first-call seconds, median steady seconds, (min, max) steady seconds, result)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), (min(times), max(times)), out
