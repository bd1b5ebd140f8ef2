"""Benchmark of the all-pairs JSD kernel against its references, measured in one run.

    python benchmarks/divergence.py [--sizes 16x256x4096 32x512x32000] [--repeats 5] [--json PATH]

For each (T, N, V) it times, on whatever backend JAX runs on (CPU here, unchanged on GPU/TPU):
  ours     `pairwise_jsd` (the public call, value checks included): compile time reported apart
           from the steady state, median of `--repeats` runs;
  scipy    a float64 loop of `scipy.spatial.distance.jensenshannon(p, q, axis=-1) ** 2` over the
           pairs (on a subset of pairs, scaled per pair, when the whole loop would pass a minute);
  naive    the jitted JAX broadcast that materialises [T, T, N, V] (only where it fits in memory);
  ceiling  the machine's elementwise-log throughput measured now: a jitted sum(log(x)) over an
           input-sized array, scaled to the T(T-1)/2 * N * V elements that all pairs touch (one
           log per element fused with a sum: no output written, the strictest bound);
  log      the same with a plain jitted `jnp.log(x)` that writes its [T, N, V] output, the
           literal "jitted elementwise log" (slower than the fused ceiling: it stores a result).
  formula  the kernel's per-element pair term alone (`_kernel.jsd_terms_sum`, the KL form the
           issue mandates) as one fused broadcast of all T x T ordered pairs per block of
           positions, on P and log 2P computed beforehand (untimed), on the first (at most)
           FORMULA_POSITIONS positions, scaled to all N and to the T(T-1)/2 pairs: the
           arithmetic floor of the mandated form on this backend, without the kernel's
           schedule, exps, weights or checks. ours/formula is what the schedule costs;
           formula/ceiling what the form itself costs against one log.
ours and the two ceilings are timed in alternating rounds (machine drift cancels in their ratios);
the naive broadcast just before them, in a block of its own (freeing its gigabytes keeps the OS
busy for a while and would slow the next call in a round); the scipy loop once, right after them.
It prints a table and, with --json, writes the figures with a top-level `ratios` object.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
# Imported here, not in the loop: the one-pair timing that decides whether the whole scipy loop
# fits in a minute would otherwise include the ~1 s import.
from scipy.spatial.distance import jensenshannon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _args import add_json_arg, parse_sizes  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from _timing import timed, timed_together  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from taskpgm_jax.divergence import _kernel, pairwise_jsd  # noqa: E402
from taskpgm_jax.divergence import streaming  # noqa: E402

SCIPY_BUDGET_S = 60.0
# The pair-formula reference is timed on this many positions and scaled (its work per position is
# the same everywhere): all of them would double the run time at 32 x 512 x 32000.
FORMULA_POSITIONS = 64


def _available_bytes():
    """Memory free for the naive broadcast's intermediates: the accelerator's, else the host's."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _make_inputs(t, n, v, seed=0):
    key = jax.random.PRNGKey(seed)
    logits = 2.0 * jax.random.normal(key, (t, n, v), jnp.float32)
    return jax.block_until_ready(jax.nn.log_softmax(logits, axis=-1))


def _naive(lp):
    """The textbook broadcast: every pair at once, [T, T, N, V] intermediates."""
    p = jnp.exp(lp)
    a, b = p[:, None], p[None, :]
    la, lb = lp[:, None], lp[None, :]
    lm = jnp.log(0.5 * (a + b))
    terms = jnp.where(a > 0, a * (la - lm), 0.0) + jnp.where(b > 0, b * (lb - lm), 0.0)
    return jnp.mean(0.5 * jnp.sum(terms, -1), -1)


def _pair_formula(n):
    """The jitted pair-term reference (see the module docstring): P and log 2P in, a scalar out
    (the sum over all ordered pairs, positions and tokens, so nothing of size pairs x positions
    is written). Positions in blocks as the kernel's CPU tiles, so the broadcast stays small."""
    block = next(b for b in (4, 2, 1) if n % b == 0)

    def run(p, l2p):
        def step(total, i):
            pb = jax.lax.dynamic_slice_in_dim(p, i * block, block, axis=1)
            lb = jax.lax.dynamic_slice_in_dim(l2p, i * block, block, axis=1)
            terms = _kernel.jsd_terms_sum(pb[:, None], lb[:, None], pb[None], lb[None])
            return total + jnp.sum(terms), None

        return jax.lax.scan(step, jnp.float32(0), jnp.arange(n // block))[0]

    return jax.jit(run)


def _scipy_loop(lp, pairs):
    out = []
    for i, j in pairs:
        out.append(np.mean(jensenshannon(lp[i], lp[j], axis=-1) ** 2))
    return out


def bench_size(t, n, v, repeats, scipy_budget=SCIPY_BUDGET_S):
    lp = _make_inputs(t, n, v)
    num_pairs = t * (t - 1) // 2
    pair_elements = num_pairs * n * v
    input_bytes = lp.size * lp.dtype.itemsize
    row = {"T": t, "N": n, "V": v, "pairs": num_pairs, "input_bytes": input_bytes}

    # The naive broadcast first, where its [T, T, N, V] intermediates fit (about 4 live at once).
    # It runs in a block of its own: freeing gigabytes makes the OS busy for a while after each
    # call, which would slow whatever ran next in an interleaved round.
    naive_bytes = 4 * t * t * n * v * 4
    naive_out = None
    if naive_bytes < 0.6 * _available_bytes():
        naive_fn = jax.jit(_naive)
        _, row["naive_s"], _, naive_out = timed(lambda: naive_fn(lp), max(2, repeats // 2))
    else:
        row["naive_s"] = None
        row["naive_note"] = (f"skipped: [T,T,N,V] intermediates need ~{naive_bytes / 2**30:.0f} "
                             f"GiB, {_available_bytes() / 2**30:.0f} GiB available")

    # ours and the two log ceilings, in alternating rounds so that machine drift cancels in their
    # ratios. Compile time of ours = its first call minus the steady state.
    x = jax.block_until_ready(jnp.exp(lp))
    fused_log = jax.jit(lambda a: jnp.sum(jnp.log(a), axis=-1))
    elementwise_log = jax.jit(jnp.log)
    m = min(n, FORMULA_POSITIONS)
    p, l2p = jax.block_until_ready(_kernel.probs_and_safe_logs(lp[:, :m]))
    formula = _pair_formula(m)
    got = timed_together({"ours": lambda: pairwise_jsd(lp),
                          "ceiling": functools.partial(fused_log, x),
                          "log": functools.partial(elementwise_log, x),
                          "formula": functools.partial(formula, p, l2p)}, repeats)
    del x, p, l2p  # the only references left (the partials went with their dict): frees them
    first, ours_s, ours_range, ours_out = got["ours"]
    row.update(ours_s=ours_s, ours_range_s=ours_range, ours_compile_s=max(first - ours_s, 0.0),
               elements_per_s=pair_elements / ours_s)
    # ceilings: T*N*V logs per call, scaled to the pairs*N*V elements that all pairs touch.
    row["ceiling_s"] = got["ceiling"][1] * num_pairs / t
    row["ceiling_elements_per_s"] = lp.size / got["ceiling"][1]
    row["elementwise_log_s"] = got["log"][1] * num_pairs / t
    # formula: T * T ordered pairs on m positions per call, scaled to the T(T-1)/2 pairs the
    # kernel evaluates on all N.
    row["formula_s"] = got["formula"][1] * num_pairs / (t * t) * n / m
    if naive_out is not None:
        np.testing.assert_allclose(np.asarray(naive_out), np.asarray(ours_out), atol=1e-5)
    # The reference computes what we do: on its m positions, the ordered-pair terms' total / m
    # is the sum of all entries of our symmetric matrix of mean JSDs (its diagonal terms are 0).
    on_m = np.sum(np.asarray(pairwise_jsd(lp[:, :m]), np.float64))
    np.testing.assert_allclose(float(got["formula"][3]) / m, on_m, rtol=1e-4, atol=1e-6)

    # Peak memory of the compiled kernel program (arguments + temporaries + outputs).
    acc = streaming.StreamingJSD(t)
    compiled = streaming._update_jit.lower(acc.init(), lp, jnp.ones((n,), jnp.float32),
                                           jnp.zeros((n,), jnp.int32),
                                           config=acc.config).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
        row.update(peak_bytes=int(peak), temp_bytes=int(mem.temp_size_in_bytes),
                   peak_over_input=peak / input_bytes)
    # One tile: P and log P of all (padded) models at position_block x vocab_chunk.
    row["block_bytes"] = (2 * acc.config.schedule.padded_models * acc.config.position_block
                          * min(acc.config.vocab_chunk, v) * 4)

    # scipy float64 loop; time one pair first to decide whether the whole loop fits the budget.
    lp64 = np.exp(np.asarray(lp, np.float64))
    pairs = [(i, j) for i in range(t) for j in range(i + 1, t)]
    start = time.perf_counter()
    first_val = _scipy_loop(lp64, pairs[:1])[0]
    per_pair = time.perf_counter() - start
    if per_pair * len(pairs) <= scipy_budget:
        subset = pairs
    else:
        count = min(len(pairs), max(3, int(scipy_budget / 4 / per_pair)))
        subset = [pairs[k] for k in np.linspace(0, len(pairs) - 1, count).astype(int)]
    start = time.perf_counter()
    vals = _scipy_loop(lp64, subset)
    scipy_subset_s = time.perf_counter() - start
    row["scipy_s"] = scipy_subset_s / len(subset) * len(pairs)
    row["scipy_pairs_timed"] = len(subset)
    ours_np = np.asarray(ours_out, np.float64)
    row["max_abs_error_vs_scipy"] = float(max(abs(ours_np[i, j] - val)
                                              for (i, j), val in zip(subset, vals, strict=True)))
    assert abs(ours_np[0, 1] - first_val) < 1e-5
    del lp64
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["16x256x4096", "32x512x32000"],
                        help="TxNxV problem sizes")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per measurement (the reported figures use 5)")
    parser.add_argument("--scipy-budget", type=float, default=SCIPY_BUDGET_S, metavar="SECONDS",
                        help="longest scipy loop per size before it is timed on a subset of pairs "
                             "and scaled (default %(default)s; lower it to save accelerator time)")
    add_json_arg(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if not args.scipy_budget > 0:
        parser.error(f"--scipy-budget must be positive, got {args.scipy_budget}")
    sizes = [parse_sizes(parser, "--sizes", s, "16x256x4096") for s in args.sizes]

    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"jax={jax.__version__} cpu_count={os.cpu_count()} machine={platform.machine()}")
    rows, ratios = [], {}
    header = (f"{'T x N x V':>16} {'ours s':>8} {'compile':>8} {'scipy s':>9} {'naive s':>8} "
              f"{'ceil s':>7} {'x scipy':>8} {'x naive':>8} {'/ceil':>6} {'/log':>6} {'/form':>6} "
              f"{'form/ceil':>9} {'Gelem/s':>8} {'peak/in':>8} {'err':>8}")
    print(header)
    for t, n, v in sizes:
        row = bench_size(t, n, v, args.repeats, args.scipy_budget)
        rows.append(row)
        tag = f"{t}x{n}x{v}"
        speed_scipy = row["scipy_s"] / row["ours_s"]
        speed_naive = row["naive_s"] / row["ours_s"] if row["naive_s"] else None
        over_ceiling = row["ours_s"] / row["ceiling_s"]
        ratios[f"scipy_over_ours[{tag}]"] = speed_scipy
        if speed_naive is not None:
            ratios[f"naive_over_ours[{tag}]"] = speed_naive
        ratios[f"ours_over_ceiling[{tag}]"] = over_ceiling
        ratios[f"ours_over_elementwise_log[{tag}]"] = row["ours_s"] / row["elementwise_log_s"]
        ratios[f"ours_over_pair_formula[{tag}]"] = row["ours_s"] / row["formula_s"]
        ratios[f"pair_formula_over_ceiling[{tag}]"] = row["formula_s"] / row["ceiling_s"]
        if "peak_over_input" in row:
            ratios[f"peak_memory_over_input[{tag}]"] = row["peak_over_input"]
        naive_txt = f"{row['naive_s']:8.3f}" if row["naive_s"] else f"{'n/a':>8}"
        speed_naive_txt = f"{speed_naive:8.1f}" if speed_naive else f"{'n/a':>8}"
        print(f"{tag:>16} {row['ours_s']:8.3f} {row['ours_compile_s']:8.2f} "
              f"{row['scipy_s']:9.2f} {naive_txt} {row['ceiling_s']:7.3f} {speed_scipy:8.1f} "
              f"{speed_naive_txt} {over_ceiling:6.2f} "
              f"{row['ours_s'] / row['elementwise_log_s']:6.2f} "
              f"{row['ours_s'] / row['formula_s']:6.2f} {row['formula_s'] / row['ceiling_s']:9.2f} "
              f"{row['elements_per_s'] / 1e9:8.2f} "
              f"{row.get('peak_over_input', math.nan):8.2f} "
              f"{row['max_abs_error_vs_scipy']:8.1e}")
        if row["scipy_pairs_timed"] < row["pairs"]:
            print(f"{'':>16} scipy timed on {row['scipy_pairs_timed']} of {row['pairs']} pairs "
                  f"and scaled per pair (the whole loop would pass {args.scipy_budget:g} s)")
        if row.get("naive_note"):
            print(f"{'':>16} naive {row['naive_note']}")
        print(f"{'':>16} peak {row.get('peak_bytes', 0) / 2**20:.0f} MiB = input "
              f"{row['input_bytes'] / 2**20:.0f} MiB + temporaries "
              f"{row.get('temp_bytes', 0) / 2**20:.1f} MiB (one tile: "
              f"{row['block_bytes'] / 2**20:.2f} MiB)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"process max RSS {rss / 2**30:.2f} GiB (includes the scipy/naive references)")
    if args.json:
        payload = {"benchmark": "divergence", "backend": jax.default_backend(),
                   "devices": jax.device_count(), "jax": jax.__version__,
                   "repeats": args.repeats, "results": rows, "ratios": ratios,
                   "max_rss_bytes": rss}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, default=float)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
