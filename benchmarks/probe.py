"""Probe-scoring throughput: T adapters (+ base) over probe batches, JSD accumulator on.

    python benchmarks/probe.py [--adapters 8] [--batches 20] [--json PATH]

Measures, for a small decoder, the steady-state positions per second of `ProbeScorer.update`
(multi-adapter forward, log-softmax, cross-likelihood and task-grouped JSD accumulation in one
jitted step), its compile time, and its peak memory (the compiled step: arguments, temporaries
and outputs) against the size of all the logits that a store-then-compare pipeline would keep
for the same probe set. Prints a table; `--json` writes the figures with a top-level `ratios`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _args import add_json_arg  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from taskpgm_jax.data import Batch  # noqa: E402
from taskpgm_jax.eval import ProbeScorer, adapter_probe_forward  # noqa: E402
from taskpgm_jax.models import (CausalLM, LoraConfig, ModelConfig, add_lora,  # noqa: E402
                                lora_state)


def _model(cfg, rng):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype),
                         state)
    return add_lora(nnx.merge(graphdef, state), LoraConfig(rank=8), rngs=nnx.Rngs(1))


def _batch(rng, batch, seq, vocab, num_tasks):
    ids = rng.integers(3, vocab, size=(batch, seq)).astype(np.int32)
    targets = np.roll(ids, -1, axis=1)
    targets[:, -1] = 0
    loss_mask = np.zeros((batch, seq), np.float32)
    loss_mask[:, seq // 2:-1] = 1.0  # the second half of each row is the target
    segment_ids = np.ones((batch, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    tasks = rng.integers(0, num_tasks, size=(batch, 1))
    return Batch(ids, targets, loss_mask, segment_ids, positions), tasks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=8, help="T single-task adapters")
    parser.add_argument("--batches", type=int, default=20, help="timed probe batches")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    add_json_arg(parser)
    args = parser.parse_args(argv)
    for name in ("adapters", "batches", "batch_size"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.seq_len < 4:  # the target is the second half of each row, minus the last token
        parser.error(f"--seq-len must be at least 4, got {args.seq_len}")
    if args.vocab < 4:  # token ids are drawn from [3, vocab)
        parser.error(f"--vocab must be at least 4, got {args.vocab}")
    rng = np.random.default_rng(0)
    t = args.adapters
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, dtype=jnp.float32)
    model = _model(cfg, rng)
    adapters = [jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype),
                             lora_state(model)) for _ in range(t)]
    forward, params = adapter_probe_forward(model, adapters)
    scorer = ProbeScorer(forward, t, t)
    batches = [_batch(rng, args.batch_size, args.seq_len, args.vocab, t)
               for _ in range(args.batches)]

    state = scorer.init()
    start = time.perf_counter()
    state = jax.block_until_ready(scorer.update(state, params, *batches[0]))
    compile_s = time.perf_counter() - start
    times = []
    for batch, tasks in batches:
        start = time.perf_counter()
        state = jax.block_until_ready(scorer.update(state, params, batch, tasks))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    positions = args.batch_size * args.seq_len
    targets = int(sum(b.loss_mask.sum() for b, _ in batches)) // len(batches)

    compiled = scorer._step.lower(state, params, batches[0][0],
                                  jnp.asarray(batches[0][1], jnp.int32)).compile()
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            if mem is not None else float("nan"))
    # What storing every model's logits for this probe set would take (float32 [T, N, V]).
    stored = t * args.batches * positions * args.vocab * 4
    row = {"adapters": t, "batch": args.batch_size, "seq": args.seq_len, "vocab": args.vocab,
           "compile_s": compile_s - step_s, "step_s": step_s, "positions_per_s": positions / step_s,
           "target_positions_per_s": targets / step_s, "peak_bytes": peak,
           "all_logits_bytes": stored}
    ratios = {"peak_memory_over_all_logits": peak / stored}
    print(f"backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__}")
    print(f"{'T':>3} {'B x S':>9} {'V':>6} {'compile s':>10} {'step s':>8} {'pos/s':>9} "
          f"{'target pos/s':>13} {'peak MiB':>9} {'logits MiB':>11} {'peak/logits':>12}")
    print(f"{t:>3} {args.batch_size:>4}x{args.seq_len:<4} {args.vocab:>6} {compile_s:>10.2f} "
          f"{step_s:>8.3f} {positions / step_s:>9.0f} {targets / step_s:>13.0f} "
          f"{peak / 2**20:>9.1f} {stored / 2**20:>11.0f} {peak / stored:>12.4f}")
    print(f"(logits MiB: what storing all {t} models' float32 logits for these {args.batches} "
          "batches would take; the scorer keeps one batch)")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"benchmark": "probe", "results": [row], "ratios": ratios}, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
