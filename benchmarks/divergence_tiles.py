"""Sweep of the all-pairs JSD kernel's tile sizes on the current backend (to set the defaults).

    python benchmarks/divergence_tiles.py [--size 32x512x32000] [--position-blocks 4 8 32]
        [--vocab-chunks 4096 32000] [--repeats 5] [--json PATH]

For one (T, N, V), times `pairwise_jsd` at every (position_block, vocab_chunk) pair, median of
`--repeats` after a compile call, in alternating rounds with the fused-log ceiling of
benchmarks/divergence.py (a jitted sum(log(x)) over the input, scaled to the elements all pairs
touch), and checks each result against the default tiles' to 1e-6. Prints one row per tile and
the best; `--json` writes the figures with a top-level `ratios` (best and default over ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _args import add_json_arg, parse_sizes  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from _timing import timed_together  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from taskpgm_jax.divergence import pairwise_jsd  # noqa: E402
from taskpgm_jax.divergence.streaming import default_tiles  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="32x512x32000", help="TxNxV")
    parser.add_argument("--position-blocks", type=int, nargs="+", default=[4, 8, 32])
    parser.add_argument("--vocab-chunks", type=int, nargs="+", default=[4096, 32000])
    parser.add_argument("--repeats", type=int, default=5)
    add_json_arg(parser)
    args = parser.parse_args(argv)
    t, n, v = parse_sizes(parser, "--size", args.size, "32x512x32000")
    if min(args.position_blocks + args.vocab_chunks + [args.repeats]) < 1:
        parser.error("--position-blocks, --vocab-chunks and --repeats must be positive")

    lp = jax.nn.log_softmax(2.0 * jax.random.normal(jax.random.PRNGKey(0), (t, n, v)), axis=-1)
    lp = jax.block_until_ready(lp)
    x = jax.block_until_ready(jnp.exp(lp))
    fused_log = jax.jit(lambda a: jnp.sum(jnp.log(a), axis=-1))
    pairs = t * (t - 1) // 2
    default = default_tiles()
    reference = np.asarray(pairwise_jsd(lp), np.float64)
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} T x N x V = "
          f"{t}x{n}x{v}; default tiles {default}")
    print(f"{'position_block':>14} {'vocab_chunk':>11} {'s':>9} {'compile s':>9} {'/ceil':>6} "
          f"{'Gelem/s':>8} {'max diff':>9}")
    rows = []
    for pb in args.position_blocks:
        for vc in args.vocab_chunks:
            try:
                got = timed_together({"ours": lambda pb=pb, vc=vc: pairwise_jsd(
                    lp, position_block=pb, vocab_chunk=vc), "ceiling": lambda: fused_log(x)},
                    args.repeats)
            except Exception as err:  # noqa: BLE001 (out of memory at one tile: report, go on)
                print(f"{pb:>14} {vc:>11} failed: {type(err).__name__}: {str(err)[:200]}")
                continue
            first, med, _, out = got["ours"]
            ceiling = got["ceiling"][1] * pairs / t
            diff = float(np.max(np.abs(np.asarray(out, np.float64) - reference)))
            assert diff < 1e-6, f"tiles ({pb}, {vc}) differ from the default by {diff}"
            rows.append(dict(position_block=pb, vocab_chunk=vc, seconds=med,
                             compile_s=first - med, over_ceiling=med / ceiling,
                             elements_per_s=pairs * n * v / med, max_diff=diff))
            print(f"{pb:>14} {vc:>11} {med:9.4f} {first - med:9.2f} {med / ceiling:6.2f} "
                  f"{pairs * n * v / med / 1e9:8.1f} {diff:9.1e}")
    best = min(rows, key=lambda r: r["seconds"])
    print(f"best: position_block={best['position_block']} vocab_chunk={best['vocab_chunk']} "
          f"({best['over_ceiling']:.2f} x ceiling)")
    if args.json:
        ratios = {f"best_over_ceiling[{args.size}]": best["over_ceiling"]}
        for r in rows:
            if (r["position_block"], r["vocab_chunk"]) == (default["position_block"],
                                                            default["vocab_chunk"]):
                ratios[f"default_over_ceiling[{args.size}]"] = r["over_ceiling"]
        with open(args.json, "w") as f:
            json.dump({"benchmark": "divergence_tiles", "backend": jax.default_backend(),
                       "size": [t, n, v], "default": default, "results": rows, "best": best,
                       "ratios": ratios}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
