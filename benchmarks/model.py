"""Benchmark of the NNX decoder against Hugging Face transformers (PyTorch eager), in one run.

    python benchmarks/model.py [--configs small large] [--repeats 5] [--json PATH]

For each config it builds a random HF `LlamaForCausalLM`, saves it, loads it with our loader (so
both sides run the very same weights) and times, median of `--repeats` after a warm-up, each of
ours in alternating rounds with the thing it is compared with (so machine drift cancels):
  forward     tokens/s of ours (jitted) and of PyTorch eager under no_grad, same thread count;
  train step  tokens/s of one full step (forward, backward, AdamW update) on both sides;
  compile     our first-call time minus the steady state, shown apart from the throughput;
  adapters    (first config) T=8 LoRA adapters in one `multi_adapter_forward` call against 8
              sequential jitted forwards of the same adapters (at the config's batch, at a 1-row
              probe batch and at a 1 x 32-token probe, where one call pays most).
On a GPU host with a CUDA build of PyTorch the comparison runs there too: PyTorch on the same GPU
with float32 weights under bf16 autocast and its default (SDPA) attention, the mixed precision we
run; both sides' MFU is reported against `--peak-tflops` (or a built-in table of device peaks).
On a TPU, or a GPU without CUDA PyTorch, PyTorch is skipped and only our MFU is reported.
`--attention xla|cudnn` runs our side with that `ModelConfig.attention_impl` (cudnn: flash
attention, NVIDIA GPUs) after asserting its logits and gradients against the default "dot" on the
same weights; `--skip-torch` leaves PyTorch out (its figures do not depend on our attention).
It prints a table and, with --json, writes the figures with a top-level `ratios` object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _args import DTYPES, add_json_arg  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from _timing import commit_state, timed_together  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from taskpgm_jax.hf import load_hf_checkpoint  # noqa: E402
from taskpgm_jax.models import (LoraConfig, LoRAParam, add_lora, lora_state,  # noqa: E402
                                multi_adapter_forward, stack_adapters)

CONFIGS = {
    # name: (hidden, layers, heads, kv heads, mlp, vocab, batch, seq)
    "tiny": (64, 2, 4, 2, 128, 512, 2, 32),  # a smoke run (tests/test_benchmarks.py)
    "small": (256, 4, 4, 2, 688, 4096, 8, 256),
    "large": (384, 6, 6, 2, 1024, 8192, 4, 256),
    # accelerator sizes: about 0.5B parameters (a Llama-1B shape at half depth), long sequences
    "medium": (2048, 8, 16, 8, 5632, 32000, 8, 1024),
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5": 197.0}
ADAPTERS = 8


def build_hf(name, tmp, attn="eager"):
    import torch
    import transformers

    d, n_layers, heads, kv, mlp, vocab, _, seq = CONFIGS[name]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=mlp,
                                   num_hidden_layers=n_layers, num_attention_heads=heads,
                                   num_key_value_heads=kv, max_position_embeddings=seq,
                                   attn_implementation=attn)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp)
    return model


def torch_device():
    """"cpu" on a CPU backend; "cuda" on a GPU backend with a CUDA PyTorch; else None (skipped)."""
    backend = jax.default_backend()
    try:
        import torch
    except ImportError:
        return None
    if backend == "cpu":
        return "cpu"
    if backend == "gpu" and torch.cuda.is_available():
        return "cuda"
    return None


def loss_fn(model, ids, attention_mask=None, with_logits=False):
    """Mean next-token cross-entropy over the predicted positions (B x (S - 1) without a mask),
    as HF computes it with labels=ids; with `with_logits`, (loss, logits). The labels are
    shifted, not the logits: slicing [B, S, V] logits is a copy in XLA (and a pad of the
    gradient), where in PyTorch it is a free view."""
    logits = model(ids, attention_mask)
    labels = jnp.roll(ids, -1, axis=1)  # the last position's label is unused (weight 0)
    weight = (jnp.arange(ids.shape[1]) < ids.shape[1] - 1).astype(jnp.float32)
    if attention_mask is not None:  # a position counts when the token it predicts is real
        weight = weight * jnp.roll(attention_mask, -1, axis=1)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = jnp.sum(nll * weight) / jnp.sum(jnp.broadcast_to(weight, ids.shape))
    return (loss, logits) if with_logits else loss


def jitted_steps(model, optimizer):
    """Our forward and training step, jitted on split state (`nnx.split` once, `jax.jit` on the
    state pytree), as `taskpgm_jax.train.Trainer` runs them: `nnx.jit` walks the module graph on
    every call, about 3 ms a call on the H200 host, more than a small model's whole step."""
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def forward(state, ids):
        model, _ = nnx.merge(graphdef, state)
        return model(ids)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, ids):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, ids)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return graphdef, state, forward, train_step


def check_attention(tmp, dtype, model, attention, ids):
    """Asserts that `model` (the timed one, loaded with `attention`) gives the logits, loss and
    gradients of the default "dot" path on the same checkpoint, to the rounding of the compute
    dtype: for plain causal rows (the rows timed here), then for rows with padding (the masked
    path, as the training engine's packed rows take it), whose failure is reported rather than
    raised.

    Returns (relative logit error of the plain rows, what the masked check found)."""
    mask = np.ones(ids.shape, np.int32)
    mask[0, ids.shape[1] * 3 // 4:] = 0  # right padding on row 0

    def run(model, attention_mask):
        graphdef, state = nnx.split(model)

        def loss(state):
            return loss_fn(nnx.merge(graphdef, state), ids, attention_mask, with_logits=True)

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        real = np.ones(ids.shape, bool) if attention_mask is None else attention_mask > 0
        return np.asarray(logits, np.float32)[real], float(value), float(optax.global_norm(grads))

    def compare(ref, got):
        (ref, ref_loss, ref_norm), (got, loss, norm) = ref, got
        tol = 5e-2 if jnp.dtype(dtype).itemsize == 2 else 1e-4
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= tol, f"--attention {attention}: logits differ from 'dot' by {err:.2e} (relative)"
        assert abs(loss - ref_loss) <= tol * abs(ref_loss), (loss, ref_loss)
        assert abs(norm - ref_norm) <= 2 * tol * ref_norm, (norm, ref_norm)
        return err

    # `model` is the one timed afterwards; only the "dot" reference is loaded here.
    models = {"dot": load_hf_checkpoint(tmp, dtype=dtype), attention: model}
    err = compare(run(models["dot"], None), run(models[attention], None))
    try:
        masked = f"ok, {compare(run(models['dot'], mask), run(models[attention], mask)):.1e}"
    except Exception as e:  # noqa: BLE001  (reported in the table: the plain path still times)
        masked = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return err, masked


def bench_config(name, repeats, dtype, peak, torch_on, adapters=True, attention="dot"):
    d, n_layers, heads, kv, mlp, vocab, batch, seq = CONFIGS[name]
    tokens = batch * seq
    rng = np.random.default_rng(0)
    ids_np = rng.integers(0, vocab, size=(batch, seq))
    ids = jnp.asarray(ids_np, jnp.int32)
    row = dict(config=name, hidden=d, layers=n_layers, batch=batch, seq=seq, dtype=jnp.dtype(dtype).name)
    with tempfile.TemporaryDirectory() as tmp:
        # PyTorch's default SDPA attention on a GPU (its fast path); eager on the CPU, where
        # SDPA is no faster at these sizes and eager is the reference the targets were set on.
        hf = build_hf(name, tmp, "sdpa" if torch_on == "cuda" else "eager")
        model = load_hf_checkpoint(tmp, dtype=dtype, attention_impl=attention)
        if attention != "dot":
            row["attention_rel_err"], row["attention_masked"] = check_attention(
                tmp, dtype, model, attention, ids)
    row["attention"] = attention
    if torch_on is None:
        del hf
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    row["params"] = n_params
    # MFU counts matmul parameters: an untied input embedding is a lookup, not a matmul.
    embed = model.model.embed_tokens.embedding[...]
    matmul_params = n_params - (0 if model.config.tie_word_embeddings else int(embed.size))

    optimizer = commit_state(nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param))
    graphdef, state, forward, train_step = jitted_steps(model, optimizer)
    box = {"state": state}

    def ours_train():
        box["state"], loss = train_step(box["state"], ids)
        return loss

    # Each of ours is timed in rounds with its PyTorch counterpart (`timed_together`), so that
    # drift of the machine over the run does not bias the ratio.
    fwd_fns = {"ours": lambda: forward(box["state"], ids)}
    train_fns = {"ours": ours_train}
    if torch_on:
        import contextlib

        import torch

        on_gpu = torch_on == "cuda"
        hf = hf.to(torch_on)
        t_ids = torch.tensor(ids_np).to(torch_on)
        # fused AdamW is PyTorch's fastest CUDA optimiser step (one kernel for all tensors)
        torch_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, **({"fused": True} if on_gpu else {}))
        # float32 weights, bf16 compute: the same mixed precision as ours (`dtype` on our side)
        cast = (torch.autocast("cuda", dtype=getattr(torch, jnp.dtype(dtype).name))
                if on_gpu and dtype != jnp.float32 else contextlib.nullcontext())
        sync = torch.cuda.synchronize if on_gpu else (lambda: None)  # CUDA calls are async

        def torch_fwd():
            hf.eval()
            with torch.no_grad(), cast:
                logits = hf(input_ids=t_ids).logits
            sync()
            return logits

        def torch_step():
            hf.train()
            torch_opt.zero_grad(set_to_none=True)
            with cast:
                out = hf(input_ids=t_ids, labels=t_ids)
            out.loss.backward()
            torch_opt.step()
            sync()

        fwd_fns["torch"], train_fns["torch"] = torch_fwd, torch_step

    got = timed_together(fwd_fns, repeats)
    first, med, spread, _ = got["ours"]
    row.update(fwd_compile_s=first - med, fwd_s=med, fwd_spread=spread, fwd_tok_s=tokens / med)
    if torch_on:
        row["torch_fwd_s"] = got["torch"][1]
    got = timed_together(train_fns, repeats)
    first, med, spread, _ = got["ours"]
    row.update(train_compile_s=first - med, train_s=med, train_spread=spread, train_tok_s=tokens / med)
    if torch_on:
        del fwd_fns, train_fns, torch_opt, hf  # free the GPU memory before the adapters
        row["torch_train_s"] = got["torch"][1]
        row["torch_fwd_tok_s"] = tokens / row["torch_fwd_s"]
        row["torch_train_tok_s"] = tokens / row["torch_train_s"]

    if peak:
        # 2 N flops per token forward, 6 N for a training step (attention score FLOPs added).
        attn = 2 * 2 * n_layers * seq * d
        row["fwd_mfu"] = (2 * matmul_params + attn) * tokens / row["fwd_s"] / (peak * 1e12)
        row["train_mfu"] = 3 * (2 * matmul_params + attn) * tokens / row["train_s"] / (peak * 1e12)
        if torch_on:
            row["torch_fwd_mfu"] = row["fwd_mfu"] * row["fwd_s"] / row["torch_fwd_s"]
            row["torch_train_mfu"] = row["train_mfu"] * row["train_s"] / row["torch_train_s"]

    if not adapters:
        return row
    model, _ = nnx.merge(graphdef, box.pop("state"))  # the trained model (the old arrays were donated)
    # T adapters: one multi-adapter call against T sequential calls (both jitted, same adapters).
    add_lora(model, LoraConfig(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj")), rngs=nnx.Rngs(1))
    commit_state(model)  # fresh LoRA arrays are uncommitted: the second call would compile again
    adapters = [jax.tree.map(lambda x, t=t: x + 0.01 * (t + 1), lora_state(model)) for t in range(ADAPTERS)]
    stacked = stack_adapters(adapters)
    graphdef, lora_now, rest = nnx.split(model, LoRAParam, ...)
    single = jax.jit(lambda lora, rest, x: nnx.merge(graphdef, lora, rest)(x))
    # jitted on split state too, like the sequential forwards (see `jitted_steps`)
    multi = jax.jit(lambda lora, rest, a, x: multi_adapter_forward(nnx.merge(graphdef, lora, rest), a, x))
    for tag, x in (("batch", ids), ("probe1", ids[:1]), ("probe32", ids[:1, :32])):
        got = timed_together({"multi": lambda: multi(lora_now, rest, stacked, x),
                              "seq": lambda: [single(a, rest, x) for a in adapters]}, repeats)
        first, med_multi, _, _ = got["multi"]
        med_seq = got["seq"][1]
        row[f"adapters_{tag}_multi_s"] = med_multi
        row[f"adapters_{tag}_seq_s"] = med_seq
        row[f"adapters_{tag}_compile_s"] = first - med_multi
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["small", "large"], choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak, for MFU")
    parser.add_argument("--attention", default="dot", choices=["dot", "chunked", "xla", "cudnn"],
                        help="our ModelConfig.attention_impl (checked against 'dot' first)")
    parser.add_argument("--skip-torch", action="store_true", help="leave PyTorch out")
    add_json_arg(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    on_cpu = backend == "cpu"
    dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    threads = os.cpu_count()
    torch_on = None if args.skip_torch else torch_device()
    if torch_on == "cpu":
        import torch

        torch.set_num_threads(threads)  # PyTorch gets every core, like XLA:CPU's thread pool
    print(f"backend={backend} device={device} threads={threads} dtype={dtype.name} jax={jax.__version__}"
          f" torch={torch_on or 'skipped'} attention={args.attention}")

    rows, ratios = [], {}
    for i, name in enumerate(args.configs):
        # The adapter comparison runs on the first config only (it dominates the run time on a CPU).
        row = bench_config(name, args.repeats, dtype, None if on_cpu else peak, torch_on, adapters=i == 0,
                           attention=args.attention)
        rows.append(row)
        if torch_on:
            ratios[f"forward_ours_over_torch[{name}]"] = row["fwd_tok_s"] / row["torch_fwd_tok_s"]
            ratios[f"train_ours_over_torch[{name}]"] = row["train_tok_s"] / row["torch_train_tok_s"]
        for tag in ("batch", "probe1", "probe32") if "adapters_batch_multi_s" in row else ():
            ratios[f"adapters_sequential_over_multi[{name},{tag}]"] = (
                row[f"adapters_{tag}_seq_s"] / row[f"adapters_{tag}_multi_s"])
        if "train_mfu" in row:
            ratios[f"train_mfu[{name}]"] = row["train_mfu"]

    header = (f"{'config':7} {'params':>9} {'fwd tok/s':>10} {'torch':>9} {'train tok/s':>11} {'torch':>9} "
              f"{'compile fwd/train s':>19} {'8 adapters: seq/multi (batch, 1 row, 1x32)':>44}")
    print(header)
    for r in rows:
        print(f"{r['config']:7} {r['params'] / 1e6:8.1f}M {r['fwd_tok_s']:10.0f} "
              f"{r.get('torch_fwd_tok_s', float('nan')):9.0f} {r['train_tok_s']:11.0f} "
              f"{r.get('torch_train_tok_s', float('nan')):9.0f} "
              f"{r['fwd_compile_s']:9.2f}/{r['train_compile_s']:<9.2f} "
              + (" ".join(f"{r[f'adapters_{tag}_seq_s'] / r[f'adapters_{tag}_multi_s']:13.2f}x"
                          for tag in ("batch", "probe1", "probe32"))
                 if "adapters_batch_multi_s" in r else " ".join([f"{'-':>14}"] * 3)))
        if "attention_rel_err" in r:
            print(f"        attention {r['attention']}: logits within {r['attention_rel_err']:.1e} "
                  "(relative) of 'dot', loss and gradient norm too; padded rows (masked path): "
                  f"{r['attention_masked']}")
        if "train_mfu" in r:
            print(f"        MFU forward {r['fwd_mfu']:.1%}  train {r['train_mfu']:.1%} (peak {peak} TFLOP/s)"
                  + (f"; PyTorch forward {r['torch_fwd_mfu']:.1%}  train {r['torch_train_mfu']:.1%}"
                     if "torch_train_mfu" in r else ""))
    print("ratios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))

    if args.json:
        payload = {"benchmark": "model", "backend": backend, "device": device, "threads": threads,
                   "jax": jax.__version__, "python": platform.python_version(), "repeats": args.repeats,
                   "results": rows, "ratios": ratios}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=float)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
