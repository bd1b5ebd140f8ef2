"""Experiment configuration: frozen dataclasses for every stage, YAML loading, dotted overrides.

A run is described by one `RunConfig`. Each stage of the pipeline receives only its own section
(`cfg.single_task`, `cfg.mrf`, ...), and the cache keys a stage by that section plus the keys of
its inputs, so changing one setting reruns only what depends on it.

    cfg = load_config("experiments/configs/demo.yaml", ["single_task.steps=50", "seeds=[0]"])

Unknown keys, wrong types and impossible values raise `ConfigError`, which names the dotted key
(and the file) and says what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

# The string options, as the library types them (kept here too: this module imports no JAX; a
# test keeps them equal): `ModelConfig.attention_impl`, `mrf.solve(method=)`,
# `mrf.potentials(unary=)` and `mrf.affinity_from_jsd(kind=)`. YAML values are checked against
# them as they load.
AttentionImpl = Literal["dot", "chunked", "xla", "cudnn"]
SolveMethod = Literal["exact", "closed_form", "softmax"]
UnaryKind = Literal["centrality", "utility"]
AffinityKind = Literal["linear", "rbf"]
ATTENTION_IMPLS: tuple[str, ...] = typing.get_args(AttentionImpl)

SCRATCH_SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
SOURCES = ("synthetic", "bigbench", "files", "hub")
# len(taskpgm_jax.data.sources.synthetic.SKILLS), kept here: importing the data package would
# cost seconds per config load (a test keeps the two equal).
SYNTHETIC_SKILLS = 10
MIXTURE_METHODS = ("taskpgm_jsd", "taskpgm_pmi", "greedy", "uniform", "size_proportional",
                   "temperature")


class ConfigError(ValueError):
    """A bad configuration: the message names the key (and file) and what to do."""


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    """The planted suite (`taskpgm_jax.data.synthetic_suite`)."""

    seed: int = 0
    cluster_sizes: tuple[int, ...] = (4, 3, 3, 2, 2)
    n_unique: int = 2
    n_noise: int = 2
    examples: tuple[int, int] = (150, 400)
    heldout_examples: int = 100


@dataclasses.dataclass(frozen=True)
class BigbenchData:
    """BIG-bench JSON tasks (`taskpgm_jax.data.load_bigbench`); `bbh` is held out by default."""

    tasks: tuple[str, ...] | None = None  # None: every JSON task not held out
    keywords: tuple[str, ...] | None = None
    heldout: tuple[str, ...] = ("bbh",)
    max_tasks: int | None = None  # keep the first N training tasks (sorted by name)
    cache_dir: str | None = None
    archive: str | None = None


@dataclasses.dataclass(frozen=True)
class FilesData:
    """Local JSONL / JSON / Parquet task files (`taskpgm_jax.data.load_task_files`)."""

    path: str | None = None
    heldout_path: str | None = None
    columns: tuple[tuple[str, str], ...] = ()  # our field -> the file's column
    # The same for the held-out files when their columns differ (empty: `columns` for both);
    # a mapped column must exist in the files it is applied to.
    heldout_columns: tuple[tuple[str, str], ...] = ()
    kind: str | None = None
    task_column: str = "task"


@dataclasses.dataclass(frozen=True)
class HubData:
    """Hugging Face datasets (`taskpgm_jax.data.HubSpec` fields, one mapping per dataset)."""

    train: tuple[tuple[tuple[str, Any], ...], ...] = ()
    heldout: tuple[tuple[tuple[str, Any], ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the task pool and the held-out suite come from, and how tasks are split."""

    source: str = "synthetic"
    synthetic: SyntheticData = SyntheticData()
    bigbench: BigbenchData = BigbenchData()
    files: FilesData = FilesData()
    hub: HubData = HubData()
    probe_fraction: float = 0.1
    eval_fraction: float = 0.1
    split_seed: int = 0
    max_examples_per_task: int | None = None  # cap: each task's first N examples, in file order


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """`bpe`: a byte-level BPE trained on the pool's training text; `pretrained`: load one."""

    kind: str = "bpe"
    vocab_size: int = 512
    path: str | None = None  # pretrained: a tokenizer directory (default: the model's checkpoint)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Brief language-model pretraining of a from-scratch base on the pool's training text."""

    steps: int = 200
    learning_rate: float = 3e-3
    batch_size: int = 16  # rows per step, all processes together


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """The base model every fine-tune starts from.

    source: "scratch" (a small decoder of `size`, pretrained briefly), "hf" (a local Hugging Face
    checkpoint directory at `checkpoint`) or "preset" (a named architecture, random weights;
    only for dry runs and benchmarks).
    """

    source: str = "scratch"
    checkpoint: str | None = None
    preset: str | None = None
    # scratch: `ModelConfig` sizes that replace those of `SCRATCH_SIZE` (vocab_size comes from
    # the tokenizer); a mapping in YAML, e.g. {hidden_size: 128, num_hidden_layers: 4}.
    size: tuple[tuple[str, int], ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    seq_len: int = 64
    remat: bool = False  # recompute activations in the backward pass: memory only, out of the keys
    # "dot", "chunked" (keys 512 at a time, online softmax), "xla" or "cudnn" (flash attention:
    # NVIDIA GPUs, dtype bfloat16); the same results, so it stays out of the stage keys
    # (`results_view`). See `ModelConfig.attention_impl`.
    attention_impl: AttentionImpl = "dot"
    # Every training stage applies the LM head and the loss this many positions at a time
    # (`TrainConfig.loss_chunk`): the [B, S, V] logits never exist at once. Memory only: out of
    # the stage keys too. None: all positions at once.
    loss_chunk: int | None = None
    pretrain: PretrainConfig = PretrainConfig()


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning phase (single-task models or the mixture fine-tunes)."""

    trainable: str = "lora"  # "lora" or "full"
    steps: int = 100
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 8  # rows per step, all processes together (single_task: per adapter)
    grad_accum: int = 1
    checkpoint_every: int = 50  # when to save for a resume, not what is trained: out of the keys
    # single_task only (refused under finetune): train this many adapters side by side per
    # round (None: all T at once). Bounds activation memory (`--dry-run` says what fits);
    # results do not depend on it.
    adapters_per_round: int | None = None


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    batch_size: int = 16
    max_examples_per_task: int | None = None
    per_token: bool = False  # L from per-token means instead of per-example sums
    # Models (T adapters + the base) per forward pass (None: all at once); memory only.
    adapter_chunk: int | None = None


@dataclasses.dataclass(frozen=True)
class MrfConfig:
    """Potentials, solver and the budgeted selection (DESIGN.md 4)."""

    unary: UnaryKind = "centrality"  # or "utility" (measured transfer gain)
    beta: float = 1.0
    # None: 2T. Only beta / lam matters: at 1/T the centrality mixture is exactly uniform, at 0
    # it is the inverse-affinity weights S~^-1 1 (one share per redundant cluster); 1/(2T) is
    # halfway. Ratios above 1/T move towards central (redundant) tasks instead.
    lam: float | None = None
    ridge: float | None = None
    solver: SolveMethod = "exact"
    jsd_affinity: AffinityKind = "linear"  # "linear" (1 - D / ln 2) or "rbf" (exp(-D / tau))
    jsd_tau: float | None = None
    select_tasks: int | None = None  # greedy cardinality budget (None: half the tasks)
    # The selection's pairwise weight (None: beta). The set function F(A) = beta sum_A u -
    # lam/2 sum_{i != j in A} S~ has its own scale: with the mixture's lam = 2T every second
    # task already has a negative gain, while at lam = beta F grows along the greedy chain.
    select_lam: float | None = None


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    methods: tuple[str, ...] = MIXTURE_METHODS
    budget: int = 2000  # training examples drawn for each mixture fine-tune
    temperature_tau: float = 2.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int = 8
    max_examples_per_task: int | None = None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """("data", "fsdp", "tensor") sizes; -1 takes the devices left over (at most one axis)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Memory per device for the dry run's fit check (None: ask the device, when it says).
    device_memory_gb: float | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seeds: tuple[int, ...] = (0,)
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: BaseModelConfig = BaseModelConfig()
    lora: LoraSection = LoraSection()
    single_task: FinetuneConfig = FinetuneConfig()
    probe: ProbeConfig = ProbeConfig()
    mrf: MrfConfig = MrfConfig()
    mixture: MixtureConfig = MixtureConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        _validate(self)


# -- validation of values (types are checked while parsing) -------------------------------------

def _need(ok: bool, key: str, what: str) -> None:
    """The config checks' one way to refuse a value: a ConfigError naming the dotted key."""
    if not ok:
        raise ConfigError(f"config key {key!r}: {what}")


def _validate(cfg: RunConfig) -> None:
    need = _need

    d, m = cfg.data, cfg.model
    need(len(cfg.seeds) > 0 and len(set(cfg.seeds)) == len(cfg.seeds), "seeds",
         f"give at least one seed, without repeats; got {list(cfg.seeds)}")
    for key, seeds in (("seeds", cfg.seeds), ("data.synthetic.seed", (d.synthetic.seed,)),
                       ("data.split_seed", (d.split_seed,))):
        need(all(0 <= s < 2**32 for s in seeds), key,
             f"seeds must lie in [0, 2**32) (NumPy's seed range); got {list(seeds)}")
    need(d.source in SOURCES, "data.source", f"must be one of {SOURCES}, got {d.source!r}")
    for key in ("probe_fraction", "eval_fraction"):
        need(getattr(d, key) > 0, f"data.{key}", f"must be > 0, got {getattr(d, key)!r}")
    if d.probe_fraction + d.eval_fraction >= 1:
        raise ConfigError(f"config keys 'data.probe_fraction' and 'data.eval_fraction': must sum "
                          f"to less than 1 (the rest is the training split), got "
                          f"{d.probe_fraction} + {d.eval_fraction}")
    check_source_data(d)
    # An empty list would read as "no selection" (every task): say which is meant.
    need(d.bigbench.tasks is None or len(d.bigbench.tasks) > 0, "data.bigbench.tasks",
         "an empty list selects no task; leave it out (null) for every JSON task not held out")
    _validate_hub(d.hub, need)
    need(cfg.tokenizer.kind in ("bpe", "pretrained"), "tokenizer.kind",
         f"must be 'bpe' or 'pretrained', got {cfg.tokenizer.kind!r}")
    need(m.source in ("scratch", "hf", "preset"), "model.source",
         f"must be 'scratch', 'hf' or 'preset', got {m.source!r}")
    if m.source == "hf":
        need(m.checkpoint is not None, "model.checkpoint",
             "source 'hf' needs the local checkpoint directory (config.json + *.safetensors)")
    if m.source == "preset":
        need(m.preset is not None, "model.preset", "source 'preset' needs a preset name")
    if m.source == "scratch":
        bad = sorted(set(dict(m.size)) - set(SCRATCH_SIZE) - {"intermediate_size"})
        need(not bad, "model.size", f"unknown sizes {bad}; give any of {sorted(SCRATCH_SIZE)}")
        need(cfg.tokenizer.kind == "bpe", "tokenizer.kind",
             "a from-scratch model trains its own tokenizer: use 'bpe'")
    for key in ("dtype", "param_dtype"):
        need(getattr(m, key) in ("float32", "bfloat16"), f"model.{key}",
             f"must be 'float32' or 'bfloat16', got {getattr(m, key)!r}")
    need(m.seq_len >= 8, "model.seq_len", f"must be >= 8, got {m.seq_len}")
    need(m.loss_chunk is None or m.loss_chunk > 0, "model.loss_chunk",
         "must be > 0 (positions per chunk), or null: all at once")
    need(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
         _not_one_of(AttentionImpl, m.attention_impl))
    need(m.attention_impl != "cudnn" or m.dtype == "bfloat16", "model.attention_impl",
         f"'cudnn' (flash attention) needs model.dtype 'bfloat16', got {m.dtype!r}")
    for section in ("single_task", "finetune"):
        ft: FinetuneConfig = getattr(cfg, section)
        need(ft.trainable in ("lora", "full"), f"{section}.trainable",
             f"must be 'lora' or 'full', got {ft.trainable!r}")
        for key in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            need(getattr(ft, key) > 0, f"{section}.{key}", "must be > 0")
        need(ft.batch_size % ft.grad_accum == 0, f"{section}.grad_accum",
             f"must divide batch_size={ft.batch_size}")
        need(ft.learning_rate > 0, f"{section}.learning_rate", "must be > 0")
        need(ft.warmup_steps <= ft.steps, f"{section}.warmup_steps",
             f"must be <= {section}.steps={ft.steps} (the warmup is part of the run), got "
             f"{ft.warmup_steps}")
        need(ft.adapters_per_round is None or ft.adapters_per_round > 0,
             f"{section}.adapters_per_round", "must be > 0 (or null: all at once)")
    need(cfg.single_task.trainable == "lora", "single_task.trainable",
         "the pipeline trains single-task LoRA adapters side by side; full fine-tuning per task "
         "is `taskpgm_jax.train.sequential_finetune` for your own scripts")
    need(cfg.probe.adapter_chunk is None or cfg.probe.adapter_chunk > 0, "probe.adapter_chunk",
         "must be > 0 (or null: all at once)")
    bad = [x for x in cfg.mixture.methods if x not in MIXTURE_METHODS]
    need(not bad and len(cfg.mixture.methods) > 0, "mixture.methods",
         f"unknown {bad}; choose from {MIXTURE_METHODS}")
    need(cfg.mixture.budget > 0, "mixture.budget", "must be > 0 (training examples per mixture)")
    for name, value, kind in (("solver", cfg.mrf.solver, SolveMethod),
                              ("unary", cfg.mrf.unary, UnaryKind),
                              ("jsd_affinity", cfg.mrf.jsd_affinity, AffinityKind)):
        need(value in typing.get_args(kind), f"mrf.{name}", _not_one_of(kind, value))
    if cfg.mrf.jsd_affinity == "rbf":
        need(cfg.mrf.jsd_tau is not None and cfg.mrf.jsd_tau > 0, "mrf.jsd_tau",
             "the rbf affinity needs a temperature > 0 (nats)")
    _validate_ranges(cfg, need)
    _validate_unused(cfg, need)
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    need(all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1, "mesh",
         f"axis sizes must be positive, with at most one -1; got {sizes}")


def check_source_data(d: DataConfig) -> None:
    """The data the chosen source needs: a pool and a held-out suite (`files`, `hub`). Checked
    when a config loads and again by `load_pools`, which also takes a `DataConfig` built in
    code."""
    need = _need

    if d.source == "files":
        need(d.files.path is not None, "data.files.path", "source 'files' needs a path")
        need(d.files.heldout_path is not None, "data.files.heldout_path",
             "source 'files' needs the held-out evaluation tasks (e.g. a BBH directory of "
             "JSONL files)")
    if d.source == "hub":
        need(len(d.hub.train) > 0, "data.hub.train", "source 'hub' needs at least one dataset")
        need(len(d.hub.heldout) > 0, "data.hub.heldout",
             "source 'hub' needs at least one held-out evaluation dataset")


def _validate_unused(cfg: RunConfig, need) -> None:
    """Keys the chosen variant never reads: refused rather than silently ignored. A value
    other than the default (None, or the section's defaults) is one the user set."""
    tok, m, mrf = cfg.tokenizer, cfg.model, cfg.mrf
    unused = [("tokenizer.path", tok.path, "tokenizer.kind", tok.kind, tok.kind != "pretrained",
               "a bpe tokenizer is trained on the pool; set tokenizer.kind: pretrained to load "
               "one"),
              ("model.checkpoint", m.checkpoint, "model.source", m.source, m.source != "hf",
               "set model.source: hf to start from a checkpoint"),
              # hf reads the preset too: the dry run sizes a missing checkpoint from it
              ("model.preset", m.preset, "model.source", m.source, m.source == "scratch",
               "a scratch model takes its sizes from model.size; set model.source: preset for "
               "a named architecture"),
              # model.size is not here: a scratch config switched to model.source=hf on the
              # command line keeps its sizes, and no override can clear a mapping
              ("mrf.jsd_tau", mrf.jsd_tau, "mrf.jsd_affinity", mrf.jsd_affinity,
               mrf.jsd_affinity != "rbf", "only the rbf affinity has a temperature")]
    for key, value, setting, chosen, ignored, fix in unused:
        need(value is None or not ignored, key,
             f"unused because {setting} is {chosen!r} ({fix}); remove {key}")
    # Only the chosen source's section is read. Not data.synthetic: the demo's suite settings
    # stay put when a command line switches data.source.
    d = cfg.data
    for source in ("bigbench", "files", "hub"):
        if d.source == source:
            continue
        section, default = getattr(d, source), getattr(DataConfig(), source)
        changed = [f.name for f in dataclasses.fields(section)
                   if getattr(section, f.name) != getattr(default, f.name)]
        key = f"data.{source}.{changed[0]}" if changed else ""
        need(not changed, key, f"unused because data.source is {d.source!r} (only source "
             f"{source!r} reads data.{source}); remove it, or set data.source: {source}")
    need(cfg.finetune.adapters_per_round is None, "finetune.adapters_per_round",
         "unused: each mixture fine-tune trains one model (only single_task trains adapters "
         "side by side, in rounds); remove finetune.adapters_per_round")


def _validate_hub(hub: HubData, need) -> None:
    """Each hub entry holds `HubSpec` fields (a typo would otherwise fail only when loading)."""
    if not hub.train and not hub.heldout:
        return
    from taskpgm_jax.data.sources.hub import HubSpec

    fields = [f.name for f in dataclasses.fields(HubSpec)]
    for part in ("train", "heldout"):
        for i, entry in enumerate(getattr(hub, part)):
            key = f"data.hub.{part}[{i}]"
            given = [k for k, _ in entry]
            bad = [k for k in given if k not in fields]
            if bad:
                close = difflib.get_close_matches(bad[0], fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                need(False, f"{key}.{bad[0]}", f"unknown dataset field{hint}; valid: "
                     f"{', '.join(fields)}")
            need("path" in given, f"{key}.path", "every dataset needs a path (the hub name or "
                 "a builder such as json)")


def _validate_ranges(cfg: RunConfig, need) -> None:
    """Sizes, counts and weights: checked here so that both a run and `--dry-run` refuse them
    at load time, naming the key, instead of failing stages later (or dividing by zero)."""
    from taskpgm_jax.models.config import LORA_TARGETS

    def value(key: str):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        return node

    for key in ("lora.rank", "lora.alpha", "probe.batch_size", "eval.batch_size",
                "eval.max_new_tokens", "model.pretrain.steps", "model.pretrain.learning_rate",
                "model.pretrain.batch_size", "mixture.temperature_tau", "mrf.beta",
                "data.synthetic.heldout_examples"):
        need(value(key) > 0, key, f"must be > 0, got {value(key)!r}")
    for key in ("data.max_examples_per_task", "probe.max_examples_per_task",
                "eval.max_examples_per_task", "data.bigbench.max_tasks", "mrf.lam",
                "mrf.jsd_tau", "mrf.select_tasks", "mrf.select_lam", "mesh.device_memory_gb"):
        need(value(key) is None or value(key) > 0, key,
             f"must be > 0 (or null for the default), got {value(key)!r}")
    for key in ("single_task.warmup_steps", "single_task.weight_decay", "finetune.warmup_steps",
                "finetune.weight_decay", "data.synthetic.n_unique", "data.synthetic.n_noise"):
        need(value(key) >= 0, key, f"must be >= 0, got {value(key)!r}")
    need(cfg.mrf.ridge is None or cfg.mrf.ridge >= 0, "mrf.ridge",
         f"must be >= 0 (or null: a small multiple of the spectral radius), got {cfg.mrf.ridge!r}")
    lora = cfg.lora
    need(len(lora.targets) > 0 and set(lora.targets) <= set(LORA_TARGETS)
         and len(set(lora.targets)) == len(lora.targets), "lora.targets",
         f"give distinct projection names from {LORA_TARGETS}; got {list(lora.targets)}")
    methods = cfg.mixture.methods
    need(len(set(methods)) == len(methods), "mixture.methods",
         f"each method at most once; got {list(methods)}")
    if cfg.tokenizer.kind == "bpe":
        # The byte-level BPE holds the 256 bytes and 3 special tokens before any merge.
        need(cfg.tokenizer.vocab_size >= 259, "tokenizer.vocab_size",
             f"must be >= 259 (256 bytes + 3 special tokens), got {cfg.tokenizer.vocab_size}")
    for name, size in cfg.model.size:
        need(isinstance(size, int) and size > 0, f"model.size.{name}",
             f"must be a whole number > 0, got {size!r}")
    syn = cfg.data.synthetic
    need(len(syn.cluster_sizes) > 0 and all(1 <= c <= 4 for c in syn.cluster_sizes),
         "data.synthetic.cluster_sizes",
         f"give at least one cluster, each of 1 to 4 tasks (4 prompt forms per skill); got "
         f"{list(syn.cluster_sizes)}")
    lo, hi = syn.examples
    need(1 <= lo <= hi, "data.synthetic.examples",
         f"give [min, max] examples per task with 1 <= min <= max; got {[lo, hi]}")
    # Each cluster and each unique task takes its own skill; the pipeline needs two tasks.
    keys = "config keys 'data.synthetic.cluster_sizes' and 'data.synthetic.n_unique'"
    n_skills = len(syn.cluster_sizes) + syn.n_unique
    if n_skills > SYNTHETIC_SKILLS:
        raise ConfigError(f"{keys}: {len(syn.cluster_sizes)} clusters + {syn.n_unique} unique "
                          f"tasks need {n_skills} skills; the synthetic suite has "
                          f"{SYNTHETIC_SKILLS} (give at most {SYNTHETIC_SKILLS} together)")
    n_tasks = sum(syn.cluster_sizes) + syn.n_unique + syn.n_noise
    if n_tasks < 2:
        raise ConfigError(f"config keys 'data.synthetic.cluster_sizes', 'data.synthetic.n_unique' "
                          f"and 'data.synthetic.n_noise': the suite would have {n_tasks} task(s); "
                          "TaskPGM needs at least two")


# -- parsing ------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _not_one_of(tp, value: Any) -> str:
    return f"must be {_type_name(tp)}, got {value!r}"


def _convert(value: Any, tp, key: str):
    """`value` (from YAML) as type `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping of "
                              f"{[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return _build(tp, value, key)
    if tp is Any:
        return _freeze(value)
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
            return value
        raise ConfigError(f"config key {key!r}: {_not_one_of(tp, value)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, dict) and args and typing.get_origin(args[0]) is tuple:
            value = list(value.items())  # a YAML mapping stored as hashable (key, value) pairs
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is float:
        number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
            return float(number)
    if tp is int and type(value) is not int:
        number = _number(value)
        # 1e3 and 1000.0 are whole numbers; 2.5 for a count is a mistake, not a rounding job.
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        if isinstance(number, int):
            return number
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _number(value) -> int | float | None:
    """A number from YAML, or from a string Python parses: YAML 1.1 reads `1e-3` (no dot) as a
    string, though everyone means the float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    return None


class _Pairs(tuple):
    """A mapping under an `Any` key, frozen (hashable) as (key, value) pairs. A tuple, so it
    hashes and dumps as before; its type tells `thaw` to give back a dict, which a list of
    pairs (also a tuple of tuples once frozen) is not."""

    __slots__ = ()


def _freeze(value):
    if isinstance(value, dict):
        return _Pairs((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def hub_specs(entries: tuple[tuple[tuple[str, Any], ...], ...]) -> list[dict[str, Any]]:
    """`data.hub.train` / `heldout` entries as the dicts a user passes to `load_hub_tasks`
    (nested mappings such as `data_files` and `columns` as dicts, not frozen pairs)."""
    return [{k: to_dict(v) for k, v in entry} for entry in entries]


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"under {prefix!r}" if prefix else "at the top level"
            raise ConfigError(f"config key {key!r} is unknown{hint}; valid keys {where}: "
                              f"{', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _key(loader, node):
    """A mapping key as YAML reads it (so `1` and `1.0` are one key, as in the loaded dict)."""
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_object(node)
    return f"<{node.id} at line {node.start_mark.line + 1}>"  # a complex key: never equal


def _check_duplicates(loader, node, path: str, seen: set[int]) -> None:
    """Raises ConfigError for a key given twice in one mapping, at any depth: YAML loaders keep
    the later silently, which would drop a whole section."""
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[Any, Any] = {}  # key -> where it first appears
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overriding is its point
                _check_duplicates(loader, value_node, path, seen)
                continue
            key = _key(loader, key_node)
            dotted = f"{path}.{key}" if path else str(key)
            mark = key_node.start_mark
            if key in lines:
                first = lines[key]
                where = (f"lines {first.line + 1} and {mark.line + 1}" if first.line != mark.line
                         else f"line {mark.line + 1}, columns {first.column + 1} and "
                         f"{mark.column + 1}")
                fix = ("merge the two sections into one" if isinstance(value_node, yaml.MappingNode)
                       else "keep one of the two values")
                raise ConfigError(f"key {dotted!r} appears twice ({where}); {fix}")
            lines[key] = mark
            _check_duplicates(loader, value_node, dotted, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(loader, item, f"{path}[{i}]", seen)


def _safe_load(text: str):
    """`yaml.safe_load`, refusing duplicate keys (ConfigError)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(loader, node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`["a.b=1", "c=[0, 1]"]` -> nested dict; values are parsed as YAML scalars / lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value (e.g. "
                              "single_task.steps=50)")
        try:
            value = _safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: dict, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated `RunConfig` from a (YAML-shaped) mapping and dotted overrides."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    return _build(RunConfig, _merge(raw, parse_overrides(overrides)), "")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML config, applies `key=value` overrides and validates the result.

    Raises:
      ConfigError: unreadable file, invalid YAML, a key given twice, unknown key, wrong type or
        impossible value; the message names the file and the dotted key.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r}: cannot read it ({e.strerror}).") from None
    try:
        raw = _safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r}: not valid YAML ({e}).") from None
    except ConfigError as e:
        raise ConfigError(f"config file {str(path)!r}: {e}") from None
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(obj) -> Any:
    """A JSON/YAML-able view of a config: tuples become lists (pair tuples stay lists), and a
    mapping written under an `Any` key (e.g. a hub entry's `data_files`) a dict again."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, _Pairs):  # a mapping the user wrote under an `Any` key
        return {k: to_dict(v) for k, v in obj}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _view_at_defaults(section, names: tuple[str, ...]) -> dict:
    """`to_dict(section)` with the fields `names` at their defaults: settings that never change
    results hash as if unset, so a run resumes across them, and keys of configs that left them
    at their defaults are those of earlier versions, which hashed them."""
    view = to_dict(section)
    for f in dataclasses.fields(section):
        if f.name in names:
            view[f.name] = to_dict(f.default)
    return view


def results_view(model: BaseModelConfig) -> dict:
    """The `model` section as stage keys hash it: without `attention_impl` and `loss_chunk`
    (added after the first keys, so dropped), and with `remat` at its default: they change how
    the model runs (speed, memory), never its results (beyond float32 rounding). A base that is
    not trained from scratch (`hf`: its weights are the checkpoint's) reads neither `size` nor
    `pretrain`, so they hash at their defaults there too."""
    unread = ("remat",) if model.source == "scratch" else ("remat", "size", "pretrain")
    view = _view_at_defaults(model, unread)
    del view["attention_impl"], view["loss_chunk"]
    return view


def tokenizer_view(tokenizer: TokenizerConfig) -> dict:
    """The `tokenizer` section as stage keys hash it: a pretrained tokenizer is loaded as it
    is, so `vocab_size` (the size of a bpe tokenizer to train) hashes at its default."""
    return _view_at_defaults(tokenizer, ("vocab_size",) if tokenizer.kind == "pretrained" else ())


def finetune_view(ft: FinetuneConfig) -> dict:
    """A `single_task` / `finetune` section as stage keys hash it: `checkpoint_every` (when a
    resumable checkpoint is saved, not what is trained) and `adapters_per_round` (memory only
    for single_task; finetune never reads it) at their defaults."""
    return _view_at_defaults(ft, ("checkpoint_every", "adapters_per_round"))


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections and input keys (canonical JSON)."""
    text = json.dumps([to_dict(p) for p in parts], sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
