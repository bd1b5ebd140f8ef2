"""`run_pipeline`: the whole TaskPGM experiment, stage by stage, cached and resumable.

    data -> tokenizer -> base -> single_task -> probe -> mixtures -> finetune x (method, seed)
         -> eval x (method, seed) -> results.json -> report.md

Every stage's key hashes its own config section and the keys of its inputs (the data key is a
hash of the examples' content and the task order). A finished stage is skipped; a changed
setting reruns exactly the stages whose keys change: e.g. `mrf.beta` reruns the mixtures and
the TaskPGM fine-tunes, but not the baselines' fine-tunes, whose keys hash their weights.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from taskpgm_jax.config import (
    ConfigError,
    RunConfig,
    config_hash,
    dump_config,
    finetune_view,
    results_view,
    to_dict,
    tokenizer_view,
)
from taskpgm_jax.data import load_tokenizer
from taskpgm_jax.mrf import Mixture
from taskpgm_jax.pipeline import stages
from taskpgm_jax.pipeline.cache import (
    RunDir,
    check_same_key_everywhere,
    is_writer,
    process_0_decides,
    read_json,
    tree_bytes,
    write_json,
    write_npy,
    write_text,
)
from taskpgm_jax.pipeline.inputs import (
    Pools,
    cap_examples,
    checkpoint_dir,
    file_digest,
    load_pools,
    tokenizer_digest,
)
from taskpgm_jax.pipeline.results import summarise


class StageLog:
    """One line per stage: whether it ran or was cached, how long it took, what it found."""

    def __init__(self, echo: Callable[[str], None] = print):
        self.echo = echo
        self.seconds: dict[str, float] = {}
        self.ran: list[str] = []

    def run(self, run: RunDir, label: str, name: str, key: str,
            compute: Callable[[Path], dict | None],
            describe: Callable[[dict], str] = lambda info: "") -> Path:
        run.record(label, name, key)
        check_same_key_everywhere(name, key)
        # Process 0 decides for all: a process with a lagging view of a shared filesystem that
        # skipped a stage the others run (or ran one they skip) would hang them in its
        # collectives.
        if process_0_decides(run.done(name, key)):
            info_file = run.path(name, key) / "stage.json"
            info = read_json(info_file) if info_file.exists() else {}
            # The time it took when it ran: a cached rerun still reports every stage's cost.
            if "seconds" in info:
                self.seconds[label] = float(info["seconds"])
            self.echo(f"[{label}] cached ({name}-{key}) {describe(info.get('info', {}))}".rstrip())
            return run.path(name, key)
        start = time.perf_counter()
        work = run.begin(name, key)
        info = compute(work) or {}
        seconds = time.perf_counter() - start
        if is_writer():
            write_json(work / "stage.json", {"stage": name, "key": key, "seconds": seconds,
                                             "info": info})
        path = run.finish(name, key)
        self.seconds[label] = seconds
        self.ran.append(label)
        self.echo(f"[{label}] done in {seconds:.1f} s {describe(info)}".rstrip())
        return path


def _mesh(cfg: RunConfig):
    import jax

    from taskpgm_jax.pipeline.dryrun import resolve_mesh
    from taskpgm_jax.sharding import make_mesh

    if jax.device_count() == 1:
        return None
    # The sizes checked against the devices as `--dry-run` checks them (a ConfigError naming
    # `mesh` and the fix, rather than make_mesh's own message).
    sizes = resolve_mesh(cfg, jax.device_count())
    return make_mesh(data=sizes["data"], fsdp=sizes["fsdp"], tensor=sizes["tensor"])


def hf_base(cfg: RunConfig):
    """`model.source: hf`: the checkpoint directory, the tokenizer and the base key, which hashes
    the model config, the weights and the tokenizer (its config and the files it was loaded from:
    the tokenizer decides every token the stages see, so another one reruns them all)."""
    base_dir = checkpoint_dir(cfg.model)
    tok_dir = Path(cfg.tokenizer.path).expanduser() if cfg.tokenizer.path else base_dir
    tokenizer = load_tokenizer(tok_dir)
    weights = file_digest([base_dir / "config.json", *base_dir.glob("*.safetensors")])
    key = config_hash(results_view(cfg.model), weights, tokenizer_view(cfg.tokenizer),
                      tokenizer_digest(tok_dir, tokenizer))
    return base_dir, tokenizer, key


def single_task_key(cfg: RunConfig, base_key: str, data_key: str) -> str:
    """The single_task stage key. Memory-only settings (rounds, the checkpoint interval) stay
    out of it (`finetune_view`): changing them resumes the stage instead of rerunning it."""
    return config_hash(finetune_view(cfg.single_task), cfg.lora, base_key, data_key,
                       cfg.model.seq_len)


def finetune_key(cfg: RunConfig, weights: dict[str, float], seed: int, base_key: str,
                 data_key: str) -> str:
    """The key of one mixture fine-tune (`finetune_view` of its section, as single_task)."""
    ft = cfg.finetune
    return config_hash(finetune_view(ft), cfg.lora if ft.trainable == "lora" else None,
                       sorted(weights.items()), cfg.mixture.budget, seed, base_key, data_key,
                       cfg.model.seq_len)


def run_pipeline(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True,
                 echo: Callable[[str], None] = print, report: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the experiment `cfg` in `run_dir`.

    Args:
      cfg: the validated run config (`taskpgm_jax.config.load_config`).
      run_dir: the run directory (created); reusing one skips finished stages.
      progress: progress bars for training stages.
      echo: where the one-line stage summaries go.
      report: write report.md and the figures at the end.

    Returns:
      The results dict (also written to `run_dir/results.json`).
    """
    # Settings no stage can run with, refused before anything is loaded or written: every
    # training stage keeps float32 master weights of what it trains (the trainer refuses
    # others, at the first training stage); `--dry-run` plans either.
    if cfg.model.param_dtype != "float32":
        raise ConfigError(f"config key 'model.param_dtype': the training stages need float32 "
                          f"master weights, got {cfg.model.param_dtype!r}; use param_dtype "
                          "float32 (with model.dtype bfloat16 for bf16 compute)")
    # Batch sizes are global, each process training on its share: refused before anything
    # is written when they do not split over the processes.
    if cfg.model.source == "scratch":
        stages.host_rows(cfg.model.pretrain.batch_size, "model.pretrain.batch_size")
    for section in ("single_task", "finetune"):
        ft = getattr(cfg, section)
        stages.host_rows(ft.batch_size, f"{section}.batch_size", ft.grad_accum)
    mesh = _mesh(cfg)
    run = RunDir(run_dir)
    log = StageLog(echo)
    if is_writer():
        write_text(run.root / "config.yaml", dump_config(cfg))
    seq_len = cfg.model.seq_len

    start = time.perf_counter()
    pools: Pools = load_pools(cfg.data)
    pool = pools.train
    log.seconds["data"] = time.perf_counter() - start
    echo(f"[data] {len(pool)} training tasks, {len(pools.heldout)} held-out tasks, "
         f"{sum(pool.split_sizes('train').values())} training examples (key {pools.key})")

    # Tokenizer and base model.
    if cfg.model.source == "preset":
        raise ConfigError("config key 'model.source': 'preset' models have random weights and "
                          "are only for `taskpgm run --dry-run`; use 'hf' with a checkpoint or "
                          "'scratch'")
    if cfg.model.source == "hf":
        base_dir, tokenizer, base_key = hf_base(cfg)
    else:
        tok_key = config_hash("bpe", cfg.tokenizer, pools.key)
        tok_stage = log.run(run, "tokenizer", "tokenizer", tok_key, lambda work: (
            stages.train_tokenizer(pool, cfg.tokenizer.vocab_size, work)))
        tokenizer = load_tokenizer(tok_stage / "tokenizer")
        base_key = config_hash(results_view(cfg.model), tok_key, pools.key)
        base_dir = log.run(
            run, "base", "base", base_key,
            lambda work: stages.pretrain_base(pool, tokenizer, cfg.model, work, mesh=mesh,
                                              progress=progress),
            lambda info: f"final LM loss {info['loss'][-1]:.3f}" if info.get("loss") else "",
        ) / "model"
    base = stages.load_base(base_dir, cfg.model, mesh=mesh)

    # Single-task adapters, then the probe.
    # Memory-only settings (rounds, chunks) do not change results: they stay out of the keys.
    single_key = single_task_key(cfg, base_key, pools.key)
    single_dir = log.run(
        run, "single_task", "single_task", single_key,
        lambda work: stages.train_single_task(base, tokenizer, pool, cfg.single_task, cfg.lora,
                                              seq_len, work, mesh=mesh, progress=progress,
                                              loss_chunk=cfg.model.loss_chunk),
        lambda info: f"{len(pool)} adapters trained side by side")
    probe_key = config_hash(dataclasses.replace(cfg.probe, adapter_chunk=None), single_key,
                            seq_len)

    def probe(work):
        model, adapters = stages.load_adapters(base, cfg.lora, len(pool), single_dir,
                                                mesh=mesh)
        return stages.run_probe(model, adapters, tokenizer, pool, cfg.probe, seq_len, work,
                                mesh=mesh, progress=progress)

    probe_dir = log.run(run, "probe", "probe", probe_key, probe, lambda info: (
        f"{info.get('probe_examples')} probe examples, mean JSD {info.get('mean_jsd', 0):.4f} nats"))

    # Mixtures.
    mix_key = config_hash(cfg.mrf, cfg.mixture.methods, cfg.mixture.temperature_tau, probe_key,
                          pools.key)

    def mixtures(work):
        from taskpgm_jax.pipeline.mixtures import compute_mixtures

        D = np.load(probe_dir / "divergence.npy")
        L = np.load(probe_dir / "crosslik.npy")
        base_row = np.load(probe_dir / "base_loglik.npy")
        ms = compute_mixtures(pool.names, D, L, base_row, pool.split_sizes("train"), cfg.mrf,
                              cfg.mixture)
        if is_writer():
            write_npy(work / "affinity_jsd.npy", ms.affinities["jsd"])
            write_npy(work / "affinity_pmi.npy", ms.affinities["pmi"])
            write_json(work / "mixtures.json", {m: _mixture_dict(x) for m, x in ms.mixtures.items()})
            write_json(work / "solver_trace.json", ms.trace)
            write_json(work / "greedy.json", ms.greedy)
            if pools.clusters is not None:
                write_json(work / "clusters.json", pools.clusters)
        return {m: round(max(x.weights), 3) for m, x in ms.mixtures.items()}

    mix_dir = log.run(run, "mixtures", "mixtures", mix_key, mixtures, lambda info: (
        "largest weight " + ", ".join(f"{m} {w}" for m, w in info.items())))
    mixture_set = {m: Mixture(**{**d, "names": tuple(d["names"]), "weights": tuple(d["weights"])})
                   for m, d in read_json(mix_dir / "mixtures.json").items()}

    # Mixture fine-tunes and evaluation.
    heldout = pools.heldout
    if cfg.eval.max_examples_per_task is not None:
        heldout = cap_examples(heldout, cfg.eval.max_examples_per_task)
    metrics: dict[str, dict[int, dict]] = {}
    for method, mixture in mixture_set.items():
        weights = mixture.as_dict()
        for seed in cfg.seeds:
            tag = f"{method}/seed{seed}"
            ft_key = finetune_key(cfg, weights, seed, base_key, pools.key)

            def finetune_mixture(work, w=weights, s=seed):
                return stages.finetune_mixture(
                    base, tokenizer, pool, w, cfg.mixture.budget, s, cfg.finetune, cfg.lora,
                    seq_len, work, mesh=mesh, progress=progress,
                    loss_chunk=cfg.model.loss_chunk)

            ft_dir = log.run(
                run, f"finetune/{tag}", "finetune", ft_key, finetune_mixture,
                lambda info: f"final loss {info.get('final_loss', float('nan')):.3f}")
            eval_key = config_hash(cfg.eval, ft_key, pools.key, seq_len)

            def evaluate(work, ft_dir=ft_dir, seed=seed):
                model = stages.load_finetuned(base, cfg.finetune, cfg.lora, seed, ft_dir)
                return stages.evaluate_model(model, tokenizer, heldout, cfg.eval, seq_len, work)

            eval_dir = log.run(run, f"eval/{tag}", "eval", eval_key, evaluate,
                               lambda info: f"held-out macro mean {info.get('aggregate', 0):.4f}")
            metrics.setdefault(method, {})[seed] = read_json(eval_dir / "metrics.json")

    results = summarise(cfg, metrics, mixture_set, pools, run, log.seconds)
    if is_writer():
        write_json(run.root / "results.json", results)
        run.write_manifest({"config": to_dict(cfg)})
        stale = run.unused_partials()
        if stale:
            size = sum(tree_bytes(p) for p in stale) / 2**20
            echo(f"[note] kept {len(stale)} unfinished stage folder(s) of other settings "
                 f"({size:,.1f} MiB) in {run.stages}: {', '.join(p.name for p in stale)}; they "
                 "resume if those settings come back, else delete them to free the space")
        if report:
            from taskpgm_jax.pipeline.report import write_report

            path = write_report(run.root)
            echo(f"[report] {path}")
    return results


def _mixture_dict(m: Mixture) -> dict:
    return {"names": list(m.names), "weights": list(m.weights), "unit": m.unit,
            "provenance": dict(m.provenance)}
