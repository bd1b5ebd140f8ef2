"""One process of the multi-host evaluation test (`test_multihost_eval.py`), or its reference.

    python tests/eval/_multihost_eval_worker.py OUT_DIR multi SEED   # 2 local CPU devices; JAX_*
    python tests/eval/_multihost_eval_worker.py OUT_DIR single SEED  # 4 local CPU devices

SEED draws the model, the adapters and the data (the same in all three processes).

Both modes put the same tiny LoRA decoder (vocabulary 40) and T=2 adapters on a data=1 x fsdp=2
x tensor=2 mesh (fsdp across the processes in "multi" mode, tensor inside each) and run:

* "probe": `ProbeScorer` over the same host batches on every process, as the pipeline's
  `stages.run_probe` feeds them;
* "global": `ProbeScorer` over global batches (`data.global_batch`): each process feeds only its
  half of every batch's rows ("single" feeds all of them); the same halves as host arrays are
  refused (ValueError on every process);
* "eval": `evaluate` (a multiple-choice and a generative task) and `choice_logliks` under
  `jax.set_mesh(mesh)`, which turns on the models' activation sharding (rows split over the
  processes).

Process 0 (or the single process) writes `result.npz` and `eval.json`; in "multi" mode every
process writes `rows<process index>.npy`, the input ids of its share of the "global" batches.
"""
# ruff: noqa: E402  (JAX is configured and initialised before the other imports)

import os
import sys
import traceback

MODE = sys.argv[2] if len(sys.argv) > 2 else ""
if MODE not in ("multi", "single"):
    sys.exit("usage: _multihost_eval_worker.py OUT_DIR multi|single SEED")


def _fail_fast(kind, value, tb):
    # An uncaught error would then wait minutes in jax.distributed's shutdown for the other
    # process; exit at once, so the test fails with this traceback right away.
    traceback.print_exception(kind, value, tb)
    sys.stderr.flush()
    os._exit(1)


sys.excepthook = _fail_fast
# Unoptimised XLA:CPU code: the compiles (probe step, scoring, decoding) take half the time, and
# both modes compile alike.
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={2 if MODE == 'multi' else 4}"
                           " --xla_backend_optimization_level=0")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from taskpgm_jax.distributed import maybe_initialize

assert maybe_initialize() is (MODE == "multi"), "JAX_* variables and the mode disagree"

import json

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

from taskpgm_jax.data import (Batch, Encoded, SplitSpec, TaskPool, encode_choices, global_batch,
                              make_task, pad_batch)
from taskpgm_jax.eval import ProbeScorer, adapter_probe_forward, choice_logliks, evaluate
from taskpgm_jax.models import LoraConfig, ModelConfig, lora_state, stack_adapters
from taskpgm_jax.models.init import state_shardings
from taskpgm_jax.sharding import make_mesh
from taskpgm_jax.train.adapters import stacked_adapter_shardings
from tests.models.conftest import random_model

OUT = sys.argv[1]
SEED = int(sys.argv[3])
T = 2                # adapters = tasks
B, S = 4, 16         # probe batch rows (global) and length
HOSTS = 2
CFG = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, dtype=jnp.float32)

assert jax.device_count() == 4, jax.devices()
assert jax.process_count() == (HOSTS if MODE == "multi" else 1)


def char_tokenizer():
    """One token per character (vocabulary 33 <= 40), BOS first, as `train_byte_bpe` does."""
    chars = "abcdefghijklmnopqrstuvwxyz ?:"
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3,
             **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def spans_both_processes(x):
    return {d.process_index for d in x.sharding.device_set} == set(range(jax.process_count()))


mesh = make_mesh(data=1, fsdp=2, tensor=2)
rng = np.random.default_rng(SEED)
model = random_model(CFG, seed=int(rng.integers(2**31)), std=0.5,
                     lora=LoraConfig(rank=2, targets=("q_proj", "v_proj", "up_proj")))
state = nnx.state(model)
nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
adapters = stack_adapters([jax.tree.map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape),
                                                              x.dtype), lora_state(model))
                           for _ in range(T)])
adapters = jax.device_put(adapters, stacked_adapter_shardings(adapters, mesh))
weights = jax.tree.leaves(nnx.state(model, nnx.Param))
assert all(spans_both_processes(x) and x.is_fully_addressable == (MODE == "single")
           for x in weights)
assert any(not x.is_fully_replicated for x in weights)  # split, not copied

# -- probe: the same batches everywhere (the pipeline), then each process its own rows ------------
seqs, tasks = [], []
for i in range(3 * B):
    n = int(rng.integers(5, S + 1))
    mask = np.zeros(n, bool)
    mask[n // 2:] = True
    seqs.append(Encoded(rng.integers(4, 33, n).astype(np.int32), mask, example=i))
    tasks.append(int(rng.integers(T)))
batches = [(pad_batch(seqs[i:i + B], S, B), np.asarray(tasks[i:i + B], np.int32)[:, None])
           for i in range(0, len(seqs), B)]
forward, params = adapter_probe_forward(model, adapters)
scorer = ProbeScorer(forward, T, T)
results = {}


def score(feed):
    state = jax.device_put(scorer.init(), NamedSharding(mesh, P()))
    for batch, seg_tasks in feed:
        state = scorer.update(state, params, batch, seg_tasks)
    return {k: np.asarray(v) for k, v in scorer.result(state)._asdict().items()}


results.update({f"probe/{k}": v for k, v in score(batches).items()})

rows_sharding = NamedSharding(mesh, P(("data", "fsdp")))
mine = slice(jax.process_index() * B // HOSTS, (jax.process_index() + 1) * B // HOSTS)
if MODE == "single":
    mine = slice(0, B)
local = [(Batch(*(x[mine] for x in batch)), seg[mine]) for batch, seg in batches]
feed = [(global_batch(batch, rows_sharding),
         jax.make_array_from_process_local_data(rows_sharding, seg)) for batch, seg in local]
assert feed[0][0].input_ids.shape == (B, S)
assert feed[0][0].input_ids.is_fully_addressable == (MODE == "single")
if MODE == "multi":
    np.save(os.path.join(OUT, f"rows{jax.process_index()}.npy"),
            np.stack([np.asarray(batch.input_ids) for batch, _ in local]))
results.update({f"global/{k}": v for k, v in score(feed).items()})

# Each process its own rows as host arrays: taken for the whole batch, they would give every
# process its own partial L; refused on every process, before any compile.
if MODE == "multi":
    try:
        ProbeScorer(forward, T, T).update(scorer.init(), params, *local[0])
    except ValueError as e:
        refused = str(e)
    else:
        raise AssertionError("per-process host rows were taken for the whole batch")
    assert "batch.input_ids" in refused and "global_batch" in refused, refused

# -- evaluate under jax.set_mesh ------------------------------------------------------------------
tokenizer = char_tokenizer()
words = ["yes", "no", "red", "blue", "cat"]
mc = [{"prompt": f"{w}? ", "choices": ["yes", "no", "maybe"], "answer": int(rng.integers(3))}
      for w in words]
gen = [{"prompt": f"say {w}: ", "target": w} for w in words]
pool = TaskPool([make_task("mc", "multiple_choice", mc), make_task("gen", "generate", gen)],
                SplitSpec(probe=0.0, eval=1.0))
rows = [r for ex in mc for r in encode_choices(tokenizer, ex["prompt"], ex["choices"],
                                                 max_length=S)]
with jax.set_mesh(mesh):
    out = evaluate(model, tokenizer, pool, seq_len=S, batch_size=B, max_new_tokens=3, stop=())
    sums, counts = choice_logliks(model, rows, seq_len=S, batch_size=B)
results.update({"eval/choice_loglik": sums, "eval/choice_tokens": counts})

if jax.process_index() == 0:
    np.savez(os.path.join(OUT, "result.npz"), **results)
    with open(os.path.join(OUT, "eval.json"), "w") as f:
        json.dump({"aggregate": out.aggregate, "per_task": out.per_task}, f)
if MODE == "multi":
    jax.distributed.shutdown()
print(f"worker {MODE} {jax.process_index()} done", flush=True)
