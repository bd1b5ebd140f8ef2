"""Benchmark of the training engine: the train step, and T adapters side by side vs sequential.

    python benchmarks/adapters.py [--config small] [--adapters 8] [--repeats 5] [--json PATH]

Timed in one run, median of `--repeats` after a warm-up call (compile time shown apart), each
measurement in alternating rounds with its reference (so machine drift cancels in the ratio):
  train step   tokens/s of `Trainer.step` (full fine-tuning: forward, backward, clipping, AdamW
               with the schedule) against a plain `nnx.Optimizer` step on the same model and
               batch (the reference: what our extras cost);
  adapters     T LoRA adapters, each on its own task's batch: one `AdapterTrainer.step` (vmapped,
               base weights shared) against T `Trainer.step` calls one after another (T separate
               runs sharing one compiled step). Target: side by side >= 2x faster;
Probe-scoring throughput (positions/s with the JSD accumulator, peak memory against all the
logits it avoids storing) has its own script, benchmarks/probe.py, with the same conventions.
It prints a table and, with --json, writes the figures with a top-level `ratios` object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _args import DTYPES, add_json_arg  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from _timing import commit_state, timed_together  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from taskpgm_jax.data import Batch, Encoded, pad_batch
from taskpgm_jax.models import (
    CausalLM,
    LoraConfig,
    ModelConfig,
    add_lora,
    lora_state,
    stack_adapters,
)
from taskpgm_jax.train import AdapterTrainer, TrainConfig, Trainer, target_token_loss

CONFIGS = {
    # name: (hidden, layers, heads, kv heads, mlp, vocab, batch, seq, adapter batch, adapter seq)
    "tiny": (64, 2, 4, 2, 128, 512, 4, 64, 2, 64),
    "small": (256, 4, 4, 2, 688, 4096, 8, 256, 2, 128),
}
LORA = LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))


def build_model(name, dtype, lora=False):
    """A random model (NumPy draws into the abstract structure: no initialiser compile)."""
    d, layers, heads, kv, mlp, vocab, *_ = CONFIGS[name]
    cfg = ModelConfig(vocab_size=vocab, hidden_size=d, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=d // heads,
                      dtype=dtype)

    def make():
        model = CausalLM(cfg, rngs=nnx.Rngs(0))
        return add_lora(model, LORA, rngs=nnx.Rngs(1)) if lora else model

    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def random_batch(rng, vocab, batch, seq):
    """Full-length rows, loss on the second half (answer tokens)."""
    seqs = []
    for _ in range(batch):
        mask = np.zeros(seq, bool)
        mask[seq // 2:] = True
        seqs.append(Encoded(rng.integers(1, vocab, seq).astype(np.int32), mask))
    return pad_batch(seqs, seq, batch)


def bench_train_step(name, dtype, repeats):
    """Tokens/s of `Trainer.step` and of a plain nnx.Optimizer step (the reference)."""
    *_, vocab, batch, seq, _, _ = CONFIGS[name]
    rng = np.random.default_rng(0)
    model = build_model(name, dtype)
    cfg = TrainConfig(learning_rate=1e-4, total_steps=10_000, warmup_steps=10)
    trainer = Trainer(model, cfg)
    data = trainer.place_batch(random_batch(rng, vocab, batch, seq))
    box = {"state": trainer.init(seed=0)}

    def ours():
        box["state"], metrics = trainer.step(box["state"], data)
        return metrics["loss"]

    ref_model = commit_state(build_model(name, dtype))  # else its 2nd step compiles again
    optimizer = commit_state(nnx.Optimizer(ref_model, optax.adamw(1e-4), wrt=nnx.Param))

    @nnx.jit(donate_argnums=(0, 1))
    def ref_step(model, optimizer, batch):
        def loss(m):
            total, count = target_token_loss(m, batch, None)
            return total / jnp.maximum(count, 1.0)

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    got = timed_together({"ours": ours, "ref": lambda: ref_step(ref_model, optimizer, data)}, repeats)
    first, med, spread, _ = got["ours"]
    ref_first, ref_med, _, _ = got["ref"]
    tokens = batch * seq
    return {"config": name, "train_tok_s": tokens / med, "train_spread_s": spread,
            "train_compile_s": first - med, "ref_train_tok_s": tokens / ref_med,
            "ref_compile_s": ref_first - ref_med}


def bench_adapters(name, dtype, num, repeats):
    """Seconds per step of all T adapters: side by side (one step) vs T sequential steps."""
    *_, vocab, _, _, batch, seq = CONFIGS[name]
    rng = np.random.default_rng(1)
    model = build_model(name, dtype, lora=True)
    adapters = [jax.tree.map(lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype),
                             lora_state(model)) for _ in range(num)]
    cfg = TrainConfig(learning_rate=1e-3, total_steps=10_000, trainable="lora")
    per_task = [random_batch(rng, vocab, batch, seq) for _ in range(num)]

    joint = AdapterTrainer(model, cfg, stack_adapters(adapters))
    stacked = joint.place_batch(Batch(*(np.stack(xs) for xs in zip(*per_task, strict=True))))
    box = {"state": joint.init(seed=0)}

    def side_by_side():
        box["state"], metrics = joint.step(box["state"], stacked)
        return metrics["loss"]

    single = Trainer(model, cfg)
    states = []
    for t in range(num):  # T separate runs: each its own adapter, state and batches
        nnx.update(model, adapters[t])
        states.append(Trainer(model, cfg).init(seed=t))
    placed = [single.place_batch(b) for b in per_task]

    def sequential():
        out = []
        for t in range(num):
            states[t], metrics = single.step(states[t], placed[t])
            out.append(metrics["loss"])
        return out

    got = timed_together({"joint": side_by_side, "seq": sequential}, repeats)
    first, med_joint, _, _ = got["joint"]
    seq_first, med_seq, _, _ = got["seq"]
    tokens = num * batch * seq
    return {"adapters": num, "adapter_batch": [batch, seq], "side_by_side_s": med_joint,
            "sequential_s": med_seq, "side_by_side_tok_s": tokens / med_joint,
            "sequential_tok_s": tokens / med_seq, "side_by_side_compile_s": first - med_joint,
            "sequential_compile_s": seq_first - med_seq}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    add_json_arg(parser)
    args = parser.parse_args(argv)
    if args.adapters <= 0 or args.repeats <= 0:
        parser.error("--adapters and --repeats must be positive")

    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    print(f"backend={backend} device={device} threads={os.cpu_count()} dtype={dtype.name} "
          f"jax={jax.__version__}")

    train = bench_train_step(args.config, dtype, args.repeats)
    adapters = bench_adapters(args.config, dtype, args.adapters, args.repeats)
    ratios = {
        f"train_step_ours_over_plain_nnx[{args.config}]": train["train_tok_s"] / train["ref_train_tok_s"],
        f"adapters_side_by_side_speedup[{args.config},T={args.adapters}]":
            adapters["sequential_s"] / adapters["side_by_side_s"],
    }

    print(f"{'measure':42} {'ours':>12} {'reference':>12} {'ratio':>7}")
    print(f"{'train step tokens/s (' + args.config + ')':42} {train['train_tok_s']:12.0f} "
          f"{train['ref_train_tok_s']:12.0f} {train['train_tok_s'] / train['ref_train_tok_s']:7.2f}")
    print(f"{'train step compile s':42} {train['train_compile_s']:12.2f} {train['ref_compile_s']:12.2f}")
    label = f"{args.adapters} adapters: s/step (side by side, seq.)"
    print(f"{label:42} {adapters['side_by_side_s']:12.4f} {adapters['sequential_s']:12.4f} "
          f"{adapters['sequential_s'] / adapters['side_by_side_s']:7.2f}x")
    print(f"{'  tokens/s':42} {adapters['side_by_side_tok_s']:12.0f} {adapters['sequential_tok_s']:12.0f}")
    print("ratios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))

    if args.json:
        payload = {"benchmark": "adapters", "backend": backend, "device": device,
                   "threads": os.cpu_count(), "jax": jax.__version__,
                   "python": platform.python_version(), "repeats": args.repeats,
                   "train_step": train, "adapters": adapters, "ratios": ratios}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=float)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
