"""One process of the multi-host CPU test (`test_multihost.py`), or its single-process reference.

    python tests/train/_multihost_worker.py OUT_DIR multi    # 2 local CPU devices; JAX_* set
    python tests/train/_multihost_worker.py OUT_DIR single   # 4 local CPU devices, one process

Both modes train the same two LoRA runs over 4 devices in all, each for 2 steps, a checkpoint
(orbax), then a fresh `finetune` that restores it and goes on to step 4:

* "trainer": `Trainer(trainable="lora", grad_accum=2)` on a data=2 x fsdp=2 mesh (the data axis
  crosses the processes, FSDP stays inside each), packed `HostIterator` batches;
* "adapters": `AdapterTrainer` with T=2 adapters on an fsdp=4 mesh (the parameters are split
  across the processes), a `StackedIterator` of per-task `HostIterator`s.

In "multi" mode every process reads only its share (`HostIterator` picks its shard from
`jax.process_index()`); "single" reads both shares with explicit `process_index=0, 1` and puts
process 0's rows first, as the 2-process global batch does. Process 0 (or the single process)
writes `result.npz` (gathered final parameters, logged losses); every process writes
`rows<process index>.npy`, the input ids it fed to the "trainer" run.
"""

import os
import sys
import traceback

MODE = sys.argv[2] if len(sys.argv) > 2 else ""
if MODE not in ("multi", "single"):
    sys.exit("usage: _multihost_worker.py OUT_DIR multi|single")


def _fail_fast(kind, value, tb):
    # An uncaught error would otherwise wait in jax.distributed's shutdown for the other
    # process, itself stuck in a collective, until the test's time limit: exit at once, so the
    # test fails with this traceback right away.
    traceback.print_exception(kind, value, tb)
    sys.stderr.flush()
    os._exit(1)


sys.excepthook = _fail_fast
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={2 if MODE == 'multi' else 4}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from taskpgm_jax.distributed import maybe_initialize

# Before anything touches a device: the parent's JAX_* variables make this one process of two.
assert maybe_initialize() is (MODE == "multi"), "JAX_* variables and the mode disagree"

import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from taskpgm_jax.data import Batch, HostIterator
from taskpgm_jax.models import lora_state, stack_adapters
from taskpgm_jax.sharding import make_mesh
from taskpgm_jax.train import (
    AdapterTrainer,
    StackedIterator,
    TrainConfig,
    Trainer,
    finetune,
)
from tests.train.conftest import LORA, SEQ, random_model, successor_seqs

OUT = sys.argv[1]
HOSTS = 2           # processes in "multi" mode; shares read in "single" mode
HOST_BATCH = 4      # rows per process and step: global batch 8
CFG = TrainConfig(learning_rate=1e-2, total_steps=4, warmup_steps=1, weight_decay=0.01,
                  max_grad_norm=1.0, trainable="lora")

assert jax.device_count() == 4, jax.devices()
assert jax.local_device_count() == (2 if MODE == "multi" else 4)
assert jax.process_count() == (HOSTS if MODE == "multi" else 1)


class BothShares:
    """The single-process reference: both hosts' `HostIterator`s, process 0's rows first."""

    def __init__(self, make):
        self.hosts = [make(p, HOSTS) for p in range(HOSTS)]

    def __iter__(self):
        return self

    def __next__(self):
        return Batch(*(np.concatenate(xs) for xs in zip(*(next(h) for h in self.hosts), strict=True)))

    def state(self):
        return {"hosts": [h.state() for h in self.hosts]}

    def restore(self, state):
        for h, s in zip(self.hosts, state["hosts"], strict=True):
            h.restore(s)


class Recorder:
    """Passes batches through, keeping the input ids this process fed."""

    def __init__(self, it, rows):
        self.it, self.rows = it, rows

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.rows.append(np.asarray(batch.input_ids))
        return batch

    def state(self):
        return self.it.state()

    def restore(self, state):
        self.it.restore(state)


def task_data(task, *, pack):
    seqs = successor_seqs(np.random.default_rng(500 + task), 48, offset=task + 1)

    def make(index=None, count=None):
        return HostIterator(seqs, batch_size=HOST_BATCH, seq_len=SEQ, seed=task, pack=pack,
                            process_index=index, process_count=count)

    return make() if MODE == "multi" else BothShares(make)


def gather(tree):
    """name -> the whole array on the host (all processes take part)."""
    named = jax.tree_util.tree_leaves_with_path(tree)
    leaves = [x for _, x in named]
    if MODE == "multi":
        leaves = multihost_utils.process_allgather(leaves, tiled=True)
    return {jax.tree_util.keystr(p): np.asarray(x) for (p, _), x in zip(named, leaves, strict=True)}


def spans_both_processes(x):
    return {d.process_index for d in x.sharding.device_set} == set(range(jax.process_count()))


def run(name, trainer, make_data, rows=None):
    """Two steps with a checkpoint, then a new `finetune` restoring it and going on to step 4."""
    ckpt = os.path.join(OUT, f"ckpt_{name}")
    kw = {"log_every": 1, "progress": False, "checkpoint_dir": ckpt, "checkpoint_every": 2}

    def data():
        return make_data() if rows is None else Recorder(make_data(), rows)

    first = finetune(trainer, data(), num_steps=2, **kw)
    assert first.resumed_from is None
    resumed = finetune(trainer, data(), num_steps=4, **kw)
    assert resumed.resumed_from == 2, resumed.resumed_from
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    return resumed


results = {}

# -- Trainer: LoRA adapters of one model, data axis across the processes -------------------------
mesh = make_mesh(data=2, fsdp=2)
trainer = Trainer(random_model(seed=21, lora=LORA), CFG.replace(grad_accum=2), mesh=mesh)
rows = []
out = run("trainer", trainer, lambda: task_data(0, pack=True), rows)
lora_a = out.state.params["model"]["layers"][0]["mlp"]["up_proj"]["lora_a"][...]
assert lora_a.sharding.spec == P("fsdp", None), lora_a.sharding.spec
assert trainer.batch_sharding((HOSTS * HOST_BATCH, SEQ)).spec == P(("data", "fsdp"), None)
results.update({f"trainer/{k}": v for k, v in gather(out.state.params).items()})
results["trainer/loss"] = np.asarray([h["loss"] for h in out.history])
np.save(os.path.join(OUT, f"rows{jax.process_index()}.npy"), np.stack(rows))

# -- AdapterTrainer: T=2 adapters side by side, FSDP across the processes ------------------------
mesh = make_mesh(data=1, fsdp=4)
model = random_model(seed=22, lora=LORA)
rng = np.random.default_rng(23)
adapters = stack_adapters([jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape),
                                                              x.dtype), lora_state(model))
                           for _ in range(2)])
trainer = AdapterTrainer(model, CFG, adapters, mesh=mesh)
out = run("adapters", trainer,
          lambda: StackedIterator([task_data(t, pack=False) for t in (1, 2)]))
lora_a = out.state.params["model"]["layers"][0]["mlp"]["up_proj"]["lora_a"][...]
assert lora_a.sharding.spec == P(None, "fsdp", None), lora_a.sharding.spec
assert spans_both_processes(lora_a) and lora_a.is_fully_addressable == (MODE == "single")
results.update({f"adapters/{k}": v for k, v in gather(out.state.params).items()})
results["adapters/loss"] = np.asarray([h["loss_per_adapter"] for h in out.history])

if jax.process_index() == 0:
    np.savez(os.path.join(OUT, "result.npz"), **results)
if MODE == "multi":
    jax.distributed.shutdown()
print(f"worker {MODE} {jax.process_index()} done", flush=True)
