"""The model stages: base model, single-task adapters, probe, mixture fine-tunes, evaluation.

Each function computes one stage into a work directory (`RunDir.begin`) and leaves artifacts
there; `run.py` decides what to run from the cache keys. Training stages checkpoint inside the
work directory, so a run killed mid-stage resumes from the last checkpoint; an artifact saved
again replaces the leftover of a run killed after saving it but before the stage was published.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from taskpgm_jax.config import (
    BaseModelConfig,
    ConfigError,
    EvalConfig,
    FinetuneConfig,
    LoraSection,
    ProbeConfig,
)
from taskpgm_jax.data import (
    HostIterator,
    TaskPool,
    encode_task,
    pad_batch,
    sample_mixture,
    train_byte_bpe,
)
from taskpgm_jax.eval import ProbeScorer, adapter_probe_forward, evaluate
from taskpgm_jax.hf import load_hf_checkpoint, save_hf_checkpoint
from taskpgm_jax.models import LoraConfig, LoRAParam, add_lora, init_model
from taskpgm_jax.pipeline.cache import (
    _barrier,
    is_writer,
    process_0_decides,
    write_json,
    write_npy,
)
from taskpgm_jax.pipeline.inputs import dtypes, scratch_config, training_texts
from taskpgm_jax.train import (
    AdapterTrainer,
    StackedIterator,
    TrainConfig,
    Trainer,
    finetune,
)
from taskpgm_jax.train.adapters import init_adapters, stacked_adapter_shardings


def _train_config(ft: FinetuneConfig, trainable: str | None = None,
                  loss_chunk: int | None = None) -> TrainConfig:
    return TrainConfig(learning_rate=ft.learning_rate, total_steps=ft.steps,
                       warmup_steps=ft.warmup_steps, weight_decay=ft.weight_decay,
                       grad_accum=ft.grad_accum, trainable=trainable or ft.trainable,
                       loss_chunk=loss_chunk)


def host_rows(batch_size: int, key: str, grad_accum: int = 1) -> int:
    """This process's rows of a training batch of `batch_size` rows: the config's batch sizes
    are global (the dry run plans them so), and each process's `HostIterator` reads its share,
    so a run on P hosts trains the batches of the same size as on one.

    Raises:
      ConfigError: `batch_size` does not split evenly over the processes, or a process's share
        over the `grad_accum` micro-batches (naming the config key `key`).
    """
    count = jax.process_count()
    if batch_size % (count * grad_accum):
        accum = "" if grad_accum == 1 else f" x {grad_accum} micro-batches (grad_accum)"
        raise ConfigError(f"config key {key!r}: {batch_size} rows per step do not split over "
                          f"{count} processes{accum}; use a multiple of {count * grad_accum}")
    return batch_size // count


def _save_tree(path: Path, tree) -> None:
    """An orbax checkpoint of a pure-dict pytree (every process writes its shards).

    Replaces an existing one: inside an unpublished stage that is a leftover of a run killed
    after the save (orbax itself writes to a temporary name and renames, so `path` is never
    half-written)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.absolute(), tree, force=True)


def _restore_tree(path: Path, like):
    """Restores into the shapes, dtypes and shardings of `like`: device arrays (or abstract
    ones) restore onto their devices, NumPy arrays onto the host.

    Raises:
      ValueError: the checkpoint holds other keys or shapes than `like` (written with other
        settings).
    """
    target = jax.tree.map(lambda x: x if isinstance(x, np.ndarray) else jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
    stale = (f"checkpoint {path} does not hold the expected parameters{{}}; delete it (a "
             "leftover of a run with other settings) and run again")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path.absolute(), target)
    except ValueError as e:  # other keys (orbax's own message can be unhelpful)
        raise ValueError(stale.format(f" ({e})")) from e
    # Orbax restores the stored shapes whatever the target says: a mismatch must fail here, not
    # as a wrong-sized array several stages later.
    # jaxlib ships no stub for PyTreeDef, so mypy cannot compare two (ignore below).
    if jax.tree.structure(restored) != jax.tree.structure(target):  # type: ignore[operator]
        raise ValueError(stale.format(""))
    bad = [f"{jax.tree_util.keystr(k)}: stored {x.shape} {x.dtype}, expected {y.shape} {y.dtype}"
           for (k, x), y in zip(jax.tree_util.tree_leaves_with_path(restored),
                                jax.tree.leaves(target), strict=True)
           if x.shape != y.shape or x.dtype != y.dtype]
    if bad:
        more = "; ..." if len(bad) > 3 else ""
        raise ValueError(stale.format(f" ({'; '.join(bad[:3])}{more})"))
    return restored


def _lora(base, cfg: LoraSection, seed: int = 0):
    """A copy of `base` with fresh adapters (`add_lora` works in place; the base stays clean)."""
    return add_lora(nnx.clone(base), LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets),
                    rngs=nnx.Rngs(seed))


# -- tokenizer and base model -------------------------------------------------------------------

def train_tokenizer(pool: TaskPool, vocab_size: int, work: Path) -> None:
    """A byte-level BPE on the pool's training text (one process writes it; the others read it
    once the stage is published)."""
    if is_writer():
        train_byte_bpe(training_texts(pool), work / "tokenizer", vocab_size=vocab_size)


def pretrain_base(pool: TaskPool, tokenizer, cfg: BaseModelConfig, work: Path, *, mesh=None,
                  progress: bool = True) -> dict:
    """A from-scratch base: random init, language-model training on every training text, then
    written as a Hugging Face checkpoint (`work/model`), so every later stage loads it like a
    real checkpoint."""
    model_cfg = scratch_config(cfg, len(tokenizer))
    model = init_model(model_cfg, seed=0, mesh=mesh)
    seqs = []
    for name in pool.names:
        for s in encode_task(tokenizer, pool.train(name), max_length=cfg.seq_len):
            # Pretraining predicts every token, prompt included.
            seqs.append(dataclasses.replace(s, target_mask=np.ones(len(s), bool)))
    pre = cfg.pretrain
    trainer = Trainer(model, TrainConfig(learning_rate=pre.learning_rate, total_steps=pre.steps,
                                         warmup_steps=min(20, pre.steps // 10),
                                         trainable="full", loss_chunk=cfg.loss_chunk), mesh=mesh)
    data = HostIterator(seqs, batch_size=host_rows(pre.batch_size, "model.pretrain.batch_size"),
                        seq_len=cfg.seq_len, seed=0)
    result = finetune(trainer, data, checkpoint_dir=str(work / "checkpoints"),
                      checkpoint_every=max(pre.steps // 4, 1), progress=progress,
                      log_every=max(pre.steps // 10, 1))
    save_hf_checkpoint(trainer.model(result.state), work / "model")
    if is_writer():
        tokenizer.save_pretrained(str(work / "model"))
    return {"loss": [h["loss"] for h in result.history], "params": int(sum(
        x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))}


def load_base(directory: Path, cfg: BaseModelConfig, *, mesh=None):
    """The base model from a Hugging Face checkpoint directory (ours or the user's)."""
    dtype, param_dtype = dtypes(cfg)
    return load_hf_checkpoint(directory, mesh=mesh, dtype=dtype, param_dtype=param_dtype,
                              remat=cfg.remat, attention_impl=cfg.attention_impl)


# -- single-task adapters -----------------------------------------------------------------------

def _task_iterator(tokenizer, rows, seq_len: int, batch_size: int, seed: int,
                   grad_accum: int = 1, key: str = "single_task.batch_size") -> HostIterator:
    """This process's share of batches of `batch_size` rows in all (`host_rows`)."""
    seqs = encode_task(tokenizer, rows, max_length=seq_len)
    return HostIterator(seqs, batch_size=host_rows(batch_size, key, grad_accum), seq_len=seq_len,
                        seed=seed)


def train_single_task(base, tokenizer, pool: TaskPool, ft: FinetuneConfig, lora: LoraSection,
                      seq_len: int, work: Path, *, mesh=None, progress: bool = True,
                      loss_chunk: int | None = None) -> dict:
    """T LoRA adapters on the base, trained side by side (one vmapped step), in rounds of
    `ft.adapters_per_round`; saved stacked to `work/adapters`.

    Adapter t always starts from the same A (`init_adapters(..., seed=0)` row t), reads its task
    with data seed t and steps with key seed t, so the rounds do not change what it learns. Only
    the current round is on the devices: finished rounds are saved (`work/rounds/<start>-<size>`,
    so a killed run redoes at most one round) and wait on the host.
    """
    model = _lora(base, lora)
    T = len(pool)
    per_round = ft.adapters_per_round or T
    finished, losses = [], {}
    for start in range(0, T, per_round):
        names = pool.names[start:start + per_round]
        # Named by start and size: a run resumed with another adapters_per_round must not take
        # a round of other adapters (or its checkpoints) for its own.
        tag = f"{start:05d}-{len(names):05d}"
        done, loss_file = work / "rounds" / tag, work / "rounds" / f"{tag}.json"
        # The losses are written last, so they mark a complete round; a round killed after its
        # save is redone, which resumes from its final checkpoint (no training steps). Process 0
        # decides for all: a process skipping a round the others train would hang them.
        if not process_0_decides(loss_file.exists()):
            chunk = init_adapters(model, len(names), seed=0, first=start)
            trainer = AdapterTrainer(model, _train_config(ft, "lora", loss_chunk), chunk, mesh=mesh)
            data = StackedIterator([
                _task_iterator(tokenizer, pool.train(n), seq_len, ft.batch_size, start + i,
                               ft.grad_accum)
                for i, n in enumerate(names)])
            result = finetune(trainer, data, seed=start,
                              checkpoint_dir=str(work / "checkpoints" / tag),
                              checkpoint_every=ft.checkpoint_every, progress=progress,
                              log_every=max(ft.steps // 10, 1))
            _save_tree(done, nnx.to_pure_dict(trainer.adapters(result.state)))
            if is_writer():
                write_json(loss_file,
                           dict(zip(names, map(float, result.history[-1]["loss_per_adapter"]), strict=True)))
        # Only process 0 writes the loss file: no process reads it before it is there.
        _barrier(f"taskpgm single_task round {tag}")
        shapes = nnx.to_pure_dict(jax.eval_shape(functools.partial(
            init_adapters, model, len(names), seed=0, first=start)))
        finished.append(_restore_tree(done, jax.tree.map(
            lambda x: np.zeros(x.shape, x.dtype), shapes)))
        losses.update(json.loads(loss_file.read_text()))
    stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *finished)
    leading = {x.shape[0] for x in jax.tree.leaves(stacked)}
    if leading != {T} or list(losses) != list(pool.names):
        raise RuntimeError(f"single_task: the rounds stack to {sorted(leading)} adapters for "
                           f"{T} tasks; delete {work} and run again")
    # The rounds stay until the stage is published: `RunDir.finish` removes them afterwards, so
    # a kill while they are deleted cannot leave a round marker next to a half-deleted round.
    _save_tree(work / "adapters", stacked)
    return {"final_loss_per_task": losses, "rounds": -(-T // per_round)}


def load_adapters(base, lora: LoraSection, num_tasks: int, directory: Path, *, mesh=None):
    """The base with adapters added, and the T trained adapters (stacked; on a mesh each split
    like the weights it adapts)."""
    model = _lora(base, lora)
    template = init_adapters(model, num_tasks, seed=0)
    if mesh is not None:
        template = jax.device_put(template, stacked_adapter_shardings(template, mesh))
    restored = _restore_tree(directory / "adapters", nnx.to_pure_dict(template))
    nnx.replace_by_pure_dict(template, restored)
    return model, template


# -- probe --------------------------------------------------------------------------------------

def probe_batches(tokenizer, pool: TaskPool, cfg: ProbeConfig, seq_len: int):
    """Padded probe batches over the union of the tasks' probe splits, with each row's task
    (a list: token ids are small next to the logits, and the length drives the progress bar)."""
    seqs, tasks = [], []
    for t, name in enumerate(pool.names):
        rows = pool.probe(name)
        if cfg.max_examples_per_task is not None:
            rows = rows.select(range(min(cfg.max_examples_per_task, len(rows))))
        encoded = encode_task(tokenizer, rows, max_length=seq_len)
        seqs.extend(encoded)
        tasks.extend([t] * len(encoded))
    b = cfg.batch_size
    batches = []
    for i in range(0, len(seqs), b):
        chunk = seqs[i:i + b]
        seg_tasks = np.full((b, 1), -1, np.int32)
        seg_tasks[:len(chunk), 0] = tasks[i:i + b]
        batches.append((pad_batch(chunk, seq_len, b), seg_tasks))
    return batches


def run_probe(model, adapters, tokenizer, pool: TaskPool, cfg: ProbeConfig, seq_len: int,
              work: Path, *, mesh=None, progress: bool = True) -> dict:
    """L, the base row and the task-level JSD D from every adapter on the shared probe set."""
    forward, params = adapter_probe_forward(model, adapters, adapter_chunk=cfg.adapter_chunk)
    scorer = ProbeScorer(forward, len(pool), len(pool), per_token=cfg.per_token)
    state = scorer.init()
    if mesh is not None:  # the accumulators live beside the sharded model, replicated
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    batches = probe_batches(tokenizer, pool, cfg, seq_len)
    for batch, seg_tasks in tqdm(batches, desc="probe", unit="batch", disable=not progress):
        state = scorer.update(state, params, batch, seg_tasks)
    L, base_row, D, counts = (np.asarray(x, np.float64) for x in scorer.result(state))
    if is_writer():
        write_npy(work / "divergence.npy", D)
        write_npy(work / "crosslik.npy", L)
        write_npy(work / "base_loglik.npy", base_row)
        write_npy(work / "probe_counts.npy", counts)
        write_json(work / "names.json", list(pool.names))
    return {"probe_examples": int(counts.sum()), "mean_jsd": float(D[~np.eye(len(D), dtype=bool)].mean())}


# -- mixture fine-tunes and evaluation ----------------------------------------------------------

def finetune_mixture(base, tokenizer, pool: TaskPool, weights: dict[str, float], budget: int,
                     seed: int, ft: FinetuneConfig, lora: LoraSection, seq_len: int, work: Path,
                     *, mesh=None, progress: bool = True, loss_chunk: int | None = None) -> dict:
    """The target model on one mixture: `budget` examples drawn with `seed`, then `ft.steps`
    steps (LoRA on the base, or full fine-tuning); the trained weights go to `work/params`."""
    sample = sample_mixture(pool, weights, budget, seed=seed)
    rows = list(sample.rows(pool))
    seqs = encode_task(tokenizer, rows, max_length=seq_len)
    model = _lora(base, lora, seed) if ft.trainable == "lora" else base
    trainer = Trainer(model, _train_config(ft, loss_chunk=loss_chunk), mesh=mesh)
    data = HostIterator(seqs, batch_size=host_rows(ft.batch_size, "finetune.batch_size",
                                                   ft.grad_accum), seq_len=seq_len, seed=seed)
    result = finetune(trainer, data, seed=seed, checkpoint_dir=str(work / "checkpoints"),
                      checkpoint_every=ft.checkpoint_every, progress=progress,
                      log_every=max(ft.steps // 10, 1))
    _save_tree(work / "params", nnx.to_pure_dict(result.state.params))
    return {"counts": sample.counts, "repeated": {k: list(v) for k, v in sample.repeated.items()},
            "final_loss": float(result.history[-1]["loss"])}


def load_finetuned(base, ft: FinetuneConfig, lora: LoraSection, seed: int, directory: Path):
    """The fine-tuned target model (adapters merged into a copy of the base when LoRA)."""
    model = _lora(base, lora, seed) if ft.trainable == "lora" else nnx.clone(base)
    state = nnx.state(model, LoRAParam if ft.trainable == "lora" else nnx.Param)
    restored = _restore_tree(directory / "params", nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def evaluate_model(model, tokenizer, heldout: TaskPool, cfg: EvalConfig, seq_len: int,
                   work: Path) -> dict:
    """Scores the held-out suite; writes `metrics.json`."""
    result = evaluate(model, tokenizer, heldout, split="eval", seq_len=seq_len,
                      batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
    per_task = {n: {"metric": r["metric"], "value": float(r["value"]), "count": int(r["count"]),
                    "truncated": int(r["truncated"])} for n, r in result.per_task.items()}
    record = {"aggregate": float(result.aggregate), "num_tasks": result.num_tasks,
              "num_examples": result.num_examples, "per_task": per_task}
    if is_writer():
        write_json(work / "metrics.json", record)
    return record


def copy_tokenizer(src: Path, dst: Path) -> None:
    if is_writer():
        shutil.copytree(src, dst, dirs_exist_ok=True)
