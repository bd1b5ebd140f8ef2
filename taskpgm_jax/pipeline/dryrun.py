"""`taskpgm run --dry-run`: validate a run config and plan it without computing anything heavy.

The dry run resolves the base architecture (from config.json, a preset, or the scratch sizes as
`pipeline.inputs.scratch_config` builds them), builds the model abstractly (`nnx.eval_shape`:
shapes only, no memory), counts the tasks, resolves the mesh against a device count, and
estimates the memory each stage needs per device. Nothing is initialised, downloaded or
compiled, so a 7B plan for a 64-chip slice runs on a laptop (pass `num_devices`).

Memory model (bytes per device; each stage lists its parts):

* Parameters, gradients and Adam moments are counted exactly: every variable of the abstract
  model, with its dtype, divided by the number of devices its `logical_axes` are split over under
  `DEFAULT_RULES` on the planned mesh (the same `logical_to_spec` call the real sharding makes,
  so a dimension the mesh does not divide stays replicated). AdamW keeps two moments in the
  dtype of the parameter; gradient accumulation (`grad_accum > 1`) adds one accumulator.
* Activations are an estimate, good to within a factor of about 2. Per token and layer, with
  c the bytes of the compute dtype and p the tensor-parallel split of heads / MLP / vocabulary:

      layer = c * 4D + 8D                     (norm inputs and outputs, residual; f32 norms)
            + c * (2 N H + 2 K H + 3 F) / p   (q, attention output, k, v, gate, up, product)
            + (8 + c) * N * S / p             (attention scores and probabilities, f32 + c:
                                               the attention is materialised, S x S per head)

  Training keeps `layer` for every layer plus one for the backward pass (L + 1 layers); with
  `model.remat` it keeps each layer's input (c * D per layer) and one recomputed layer with its
  gradient (2 x layer). Logits add 4 * V / p bytes per token per copy: three copies in training
  (logits, log-softmax, gradient), two in a forward pass. A forward pass (probe, eval) holds one
  layer at a time. Tokens per device are the rows a device holds (the batch is split over
  data x fsdp only when that product divides it, as the real sharding does) times the sequence.
  FSDP gathers each layer's weights at use: two layers in the compute dtype and the embedding
  table are counted as "gathered weights".
* The single-task stage also counts the whole (unsplit) adapters `pipeline/stages.py` keeps on
  the default device between rounds: the T initial ones, the rounds trained so far, the round's
  slice and, at the end, the stack of all T (`_single_task_parts`).

Stages: `pretrain` (scratch bases only), `single_task` (T LoRA adapters over one frozen base,
trained side by side in rounds), `probe` (T single-task models plus the base on each probe batch:
(T + 1) x rows x S x V float32 logits and a log-softmax copy), `mixture_finetune` (one fine-tune
per mixture method and seed) and `eval` (a fine-tuned model plus the KV cache of greedy
generation).

Two config keys change memory and never results; the plan uses them exactly as the run will:

* `single_task.adapters_per_round` (G; null: all T at once): the single-task stage trains G
  adapters side by side per round (adapter t follows the same trajectory whether trained alone or
  beside others, `pipeline/stages.py`).
* `probe.adapter_chunk` (C; null: all T + 1 at once): the probe forward runs the T + 1 models C at
  a time (`multi_adapter_forward(..., adapter_chunk=C)`); the logits of all T + 1 are still kept
  for the divergences.

The plan also finds the largest G and C whose stage fits in `PLAN_FRACTION` of the device memory
(room for XLA's temporaries and the activation estimate's error). The fit check compares each
stage with the whole device memory; when the configured G or C makes a stage not fit, the overage
message gives the override that fixes it, e.g. `set single_task.adapters_per_round=13`.

When the number of tasks is not known without reading the data (a single file with a task
column, a hub collection, BIG-bench without a task list), the plan uses `PLANNING_TASKS` and
says so.

Example:
  >>> report = dry_run(load_config("experiments/configs/llama2_7b_bbh.yaml"), num_devices=16)
  >>> print(format_dry_run(report)); report.fits
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from taskpgm_jax.config import ConfigError, FinetuneConfig, RunConfig
from taskpgm_jax.hf.config import config_from_hf, read_hf_config
from taskpgm_jax.models import PRESETS, LoraConfig, LoRAParam, ModelConfig, add_lora
from taskpgm_jax.models.decoder import CausalLM
from taskpgm_jax.pipeline.inputs import dtypes as model_dtypes
from taskpgm_jax.pipeline.inputs import scratch_config
from taskpgm_jax.sharding import MESH_AXES, logical_to_spec

__all__ = ["PLANNING_TASKS", "STAGES", "DryRunReport", "MemoryPart", "StagePlan", "dry_run",
           "format_dry_run", "resolve_mesh"]

PLANNING_TASKS = 64  # T assumed when the task count is unknown without reading the data
# The largest adapter rounds and probe chunks are sized to this share of the device memory: room
# for XLA's temporaries and for the activation estimate's error.
PLAN_FRACTION = 0.8
STAGES = ("pretrain", "single_task", "probe", "mixture_finetune", "eval")
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class MemoryPart:
    """One part of a stage's memory: `logical` bytes (one unsharded copy), `per_device` bytes."""

    name: str
    logical: int
    per_device: int


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A stage: its steps (None when not countable before the data is read) and memory."""

    name: str
    steps: int | None
    steps_text: str
    parts: tuple[MemoryPart, ...]
    note: str = ""

    @property
    def per_device(self) -> int:
        return sum(p.per_device for p in self.parts)

    def part(self, name: str) -> MemoryPart:
        for p in self.parts:
            if p.name.startswith(name):
                return p
        raise KeyError(f"stage {self.name!r} has no memory part {name!r}: "
                       f"{[p.name for p in self.parts]}")


@dataclasses.dataclass(frozen=True)
class DryRunReport:
    """What `dry_run` found. Sizes in bytes; `fits` is False when a stage exceeds the device.

    Attributes:
      config: the run config.
      model: the resolved base `ModelConfig`.
      model_source: where the architecture came from (one line).
      base_params: parameters of the base model.
      adapter_params: parameters of one LoRA adapter (0 when no stage uses LoRA).
      num_tasks: T (the planning value when not known).
      tasks_known: whether T comes from the config itself.
      tasks_text: how T was found.
      mesh: {"data": ., "fsdp": ., "tensor": .} resolved sizes.
      num_devices: the device count the mesh was resolved against.
      device_memory: bytes per device, or None when unknown (no fit check).
      device_memory_source: where that figure came from.
      stages: the planned stages in order.
      adapters_per_round: G, adapters trained side by side per single-task round, as the run
        will train them: `single_task.adapters_per_round` (T when null), at most T.
      probe_adapter_chunk: C, models per probe forward pass, as the run will: `probe.adapter_chunk`
        (T + 1 when null), at most T + 1.
      max_adapters_per_round, max_probe_adapter_chunk: the largest G and C whose stage fits in
        `PLAN_FRACTION` of the device memory (T and T + 1 when the memory is unknown; 1 when
        nothing fits).
      single_task_finetunes, mixture_finetunes: planned fine-tunes (T; methods x seeds).
      over: one message per stage that does not fit, with a suggestion.
      notes: warnings and planning assumptions.
    """

    config: RunConfig
    model: ModelConfig
    model_source: str
    base_params: int
    adapter_params: int
    num_tasks: int
    tasks_known: bool
    tasks_text: str
    mesh: dict[str, int]
    num_devices: int
    device_memory: int | None
    device_memory_source: str
    stages: tuple[StagePlan, ...]
    adapters_per_round: int
    probe_adapter_chunk: int
    max_adapters_per_round: int
    max_probe_adapter_chunk: int
    single_task_finetunes: int
    mixture_finetunes: int
    over: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return not self.over

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in this plan: {[s.name for s in self.stages]}")


# -- resolution -----------------------------------------------------------------------------------

def resolve_mesh(cfg: RunConfig, num_devices: int) -> dict[str, int]:
    """The (data, fsdp, tensor) sizes of `cfg.mesh` on `num_devices` devices (-1 takes the rest).

    Raises:
      ConfigError: naming `mesh`, when the sizes do not multiply to the device count.
    """
    sizes = {a: getattr(cfg.mesh, a) for a in MESH_AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    text = " x ".join(f"{a}={s}" for a, s in sizes.items())
    if -1 in sizes.values():
        if num_devices % fixed:
            raise ConfigError(f"config key 'mesh': {text} needs a multiple of {fixed} devices, "
                              f"there are {num_devices}")
        sizes = {a: (num_devices // fixed if s == -1 else s) for a, s in sizes.items()}
    elif fixed != num_devices:
        raise ConfigError(f"config key 'mesh': data*fsdp*tensor = {text} = {fixed} devices, but "
                          f"there are {num_devices}; set the sizes to multiply to {num_devices} "
                          "(or one of them to -1)")
    return sizes


def _resolve_model(cfg: RunConfig) -> tuple[ModelConfig, str, list[str]]:
    m = cfg.model
    dtype, param_dtype = model_dtypes(m)
    dtypes = {"dtype": dtype, "param_dtype": param_dtype, "remat": m.remat}
    notes: list[str] = []

    def from_preset(name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"config key 'model.preset': unknown preset {name!r}; "
                              f"known: {sorted(PRESETS)}")
        return PRESETS[name](**dtypes)

    if m.source == "scratch":
        try:  # the pipeline's own sizing; the trained BPE may end a little below vocab_size
            model = scratch_config(m, cfg.tokenizer.vocab_size)
        except ValueError as e:
            raise ConfigError(f"config key 'model.size': {e}") from None
        return model, "scratch (pretrained briefly on the pool)", notes
    if m.source == "preset":
        return from_preset(m.preset), f"preset {m.preset} (random weights)", notes
    path = Path(m.checkpoint).expanduser()
    if not path.is_dir():
        if m.preset is not None:
            notes.append(f"checkpoint directory {path} not found: sizes from preset {m.preset} "
                         "(a real run needs the directory)")
            return from_preset(m.preset), f"hf {path} (not found; preset {m.preset})", notes
        raise ConfigError(f"config key 'model.checkpoint': directory {str(path)!r} not found; it "
                          "should hold the Hugging Face checkpoint: config.json and *.safetensors "
                          "(or set model.preset to size the plan without it)")
    try:
        model = config_from_hf(read_hf_config(path), **dtypes)
    except ValueError as e:
        raise ConfigError(f"config key 'model.checkpoint': {path}: {e}") from None
    if not any(path.glob("*.safetensors")):
        notes.append(f"no *.safetensors in {path}: a real run needs the weights")
    if m.preset is not None and m.preset in PRESETS:
        ref = PRESETS[m.preset](**dtypes)
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim")
        diff = [k for k in keys if getattr(ref, k) != getattr(model, k)]
        if diff:
            notes.append(f"{path}/config.json differs from preset {m.preset} in {diff}; "
                         "the plan uses config.json")
    return model, f"hf {path}", notes


def _count_tasks(cfg: RunConfig) -> tuple[int, bool, str]:
    d = cfg.data
    unknown = f"unknown before the data is read: planning with T = {PLANNING_TASKS}"
    if d.source == "synthetic":
        s = d.synthetic
        t = sum(s.cluster_sizes) + s.n_unique + s.n_noise
        return t, True, (f"synthetic suite: {sum(s.cluster_sizes)} clustered + {s.n_unique} "
                         f"unique + {s.n_noise} noise")
    if d.source == "bigbench":
        b = d.bigbench
        if b.tasks is not None:
            t = len(b.tasks) if b.max_tasks is None else min(len(b.tasks), b.max_tasks)
            return t, True, "data.bigbench.tasks (a container task counts as one)"
        if b.max_tasks is not None:
            return b.max_tasks, True, "data.bigbench.max_tasks (at most)"
        return PLANNING_TASKS, False, f"every BIG-bench JSON task: {unknown}"
    if d.source == "hub":
        if any(dict(spec).get("task_column") for spec in d.hub.train):
            return max(PLANNING_TASKS, len(d.hub.train)), False, \
                f"a hub dataset with a task_column: {unknown}"
        return len(d.hub.train), True, "one task per data.hub.train entry"
    path = Path(d.files.path).expanduser()
    if path.is_dir():
        t = sum(1 for f in path.iterdir() if f.suffix in (".jsonl", ".json", ".parquet"))
        if t:
            return t, True, f"task files in {path}"
    return PLANNING_TASKS, False, f"data.files.path {path}: {unknown}"


def _lora_config(cfg: RunConfig) -> LoraConfig:
    s = cfg.lora
    try:
        return LoraConfig(rank=s.rank, alpha=s.alpha, targets=tuple(s.targets))
    except ValueError as e:
        raise ConfigError(f"config key 'lora': {e}") from None


def _device_memory(cfg: RunConfig) -> tuple[int | None, str]:
    if cfg.mesh.device_memory_gb is not None:
        return int(cfg.mesh.device_memory_gb * GIB), "mesh.device_memory_gb"
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except (RuntimeError, NotImplementedError):  # backends without memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{jax.devices()[0].device_kind} bytes_limit"
    return None, "unknown (no mesh.device_memory_gb, and the device does not say): no fit check"


# -- sizes ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Sizes:
    base: tuple[int, int]          # (logical, per-device) bytes of the base parameters
    adapter: tuple[int, int]       # ... of one adapter
    base_params: int
    adapter_params: int
    layer_params: int              # parameters of one decoder layer
    embed_bytes: int               # the embedding table in its storage dtype


def _split(mesh: dict[str, int], axes, shape) -> int:
    """Number of devices an array with `axes` and `shape` is split over (the rest replicate)."""
    spec = logical_to_spec(tuple(axes), mesh_shape=mesh, shape=tuple(shape))
    names = [n for entry in spec if entry is not None
             for n in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(mesh[n] for n in names)


def _state_bytes(state, mesh) -> tuple[int, int, int]:
    logical = per_device = count = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        n = int(np.prod(var.shape))
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        size = n * jnp.dtype(var.dtype).itemsize
        count += n
        logical += size
        per_device += size // _split(mesh, axes, var.shape)
    return logical, per_device, count


def _sizes(model_cfg: ModelConfig, lora: LoraConfig | None, mesh) -> _Sizes:
    def make():
        model = CausalLM(model_cfg, rngs=nnx.Rngs(0))
        return add_lora(model, lora, rngs=nnx.Rngs(1)) if lora is not None else model

    model = nnx.eval_shape(make)
    base = _state_bytes(nnx.state(model, nnx.Param), mesh)
    adapter = _state_bytes(nnx.state(model, LoRAParam), mesh)
    layers = _state_bytes(nnx.state(model.model.layers, nnx.Param), mesh)[2]
    emb = model.model.embed_tokens.embedding
    return _Sizes(base[:2], adapter[:2], base[2], adapter[2], layers // model_cfg.num_hidden_layers,
                  int(np.prod(emb.shape)) * jnp.dtype(emb.dtype).itemsize)


# -- activations ----------------------------------------------------------------------------------

def _rows_per_device(rows: int, mesh) -> int:
    return rows // _split(mesh, ("batch",), (rows,))


def _layer_bytes_per_token(m: ModelConfig, seq_len: int, tensor: int) -> float:
    c = jnp.dtype(m.dtype).itemsize
    d, n, k, h, f = (m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim,
                     m.intermediate_size)

    def p(size):  # the tensor axis splits a dimension only when it divides it
        return tensor if size % tensor == 0 else 1

    return (c * 4 * d + 8 * d
            + c * (2 * n * h / p(n) + 2 * k * h / p(k) + 3 * f / p(f))
            + (8 + c) * n * seq_len / p(n))


def _activation_parts(m: ModelConfig, sizes: _Sizes, tokens: int, seq_len: int, mesh, *,
                      train: bool, label: str) -> list[MemoryPart]:
    """Activations, logits and gathered weights for `tokens` tokens on one device."""
    tensor = mesh["tensor"]
    c = jnp.dtype(m.dtype).itemsize
    layer = _layer_bytes_per_token(m, seq_len, tensor)
    if not train:
        act, how = tokens * layer, "one layer live"
    elif m.remat:
        act, how = tokens * (m.num_hidden_layers * c * m.hidden_size + 2 * layer), "remat"
    else:
        act, how = tokens * (m.num_hidden_layers + 1) * layer, "no remat"
    vocab_split = tensor if m.vocab_size % tensor == 0 else 1
    copies = 3 if train else 2
    logits = tokens * copies * 4 * m.vocab_size // vocab_split
    gathered = 2 * sizes.layer_params * c // tensor + (sizes.embed_bytes if mesh["fsdp"] > 1 else 0)
    return [
        MemoryPart(f"activations: {label} ({how})", int(act), int(act)),
        MemoryPart(f"logits (float32 x {copies}: logits, log-softmax"
                   + (", gradient)" if train else ")"), int(logits), int(logits)),
        MemoryPart("gathered weights (two layers in compute dtype"
                   + (" + embedding table)" if mesh["fsdp"] > 1 else ")"), gathered, gathered),
    ]


# -- stages ---------------------------------------------------------------------------------------

def _optimizer_parts(what: str, state: tuple[int, int], copies: int, grad_accum: int):
    logical, dev = state
    grads = 2 if grad_accum > 1 else 1
    return [
        MemoryPart(f"{what} params", copies * logical, copies * dev),
        MemoryPart(f"{what} grads" + (" + accumulator" if grads > 1 else ""),
                   grads * copies * logical, grads * copies * dev),
        MemoryPart(f"{what} adam moments (mu, nu)", 2 * copies * logical, 2 * copies * dev),
    ]


def _finetune_parts(cfg: RunConfig, ft: FinetuneConfig, m: ModelConfig, sizes: _Sizes, mesh,
                    adapters: int) -> list[MemoryPart]:
    """One training step of `adapters` LoRA adapters side by side (0: a full fine-tune)."""
    micro = ft.batch_size // ft.grad_accum
    rows = max(adapters, 1) * _rows_per_device(micro, mesh)
    seq = cfg.model.seq_len
    if adapters:
        pdt = cfg.model.param_dtype
        parts = [MemoryPart(f"base params ({pdt}, frozen)", *sizes.base)]
        parts += _optimizer_parts(f"{adapters} adapter(s):", sizes.adapter, adapters, ft.grad_accum)
        label = f"{adapters} adapter(s) x {rows // max(adapters, 1)} row(s) x {seq} tokens"
    else:
        parts = _optimizer_parts("model:", sizes.base, 1, ft.grad_accum)
        label = f"{rows} row(s) x {seq} tokens"
    return parts + _activation_parts(m, sizes, rows * seq, seq, mesh, train=True, label=label)


def _single_task_parts(cfg: RunConfig, st: FinetuneConfig, m: ModelConfig, sizes: _Sizes, mesh,
                       t: int, g: int) -> list[MemoryPart]:
    """The single-task stage in rounds of `g` of the `t` adapters, at its peak.

    Besides a round's training step, `pipeline/stages.py` keeps whole adapters on the default
    device: the `t` initial ones, the rounds trained so far and, with several rounds, the round's
    slice of the initial ones and the final stack (a single round slices and stacks nothing).
    The peak is the last full round, the last partial round, or the end (the last round's trainer
    state beside every copy), whichever is largest.
    """
    one = sizes.adapter[0]  # whole on one device, not split over the mesh
    full, rem = divmod(t, g)
    several = full + (rem > 0) > 1

    def held(n: int, what: str) -> MemoryPart:
        return MemoryPart(f"{n} whole adapters on one device ({what})", n * one, n * one)

    what = "initial, trained, round slice" if several else "initial"
    phases = [_finetune_parts(cfg, st, m, sizes, mesh, g)
              + [held(t + full * g if several else t, what)]]
    if rem:
        phases.append(_finetune_parts(cfg, st, m, sizes, mesh, rem) + [held(2 * t, what)])
    last = rem or g
    end = [p for p in _finetune_parts(cfg, st, m, sizes, mesh, last)[:4] if "grads" not in p.name]
    phases.append(end + [held(3 * t + last if several else 2 * t,
                              "end: initial, trained, slice, stack" if several else
                              "end: initial, trained")])
    return max(phases, key=lambda parts: sum(p.per_device for p in parts))


def _probe_parts(cfg: RunConfig, m: ModelConfig, sizes: _Sizes, mesh, t: int, chunk: int,
                 lora: bool) -> list[MemoryPart]:
    rows = _rows_per_device(cfg.probe.batch_size, mesh)
    seq = cfg.model.seq_len
    vocab = m.vocab_size // (mesh["tensor"] if m.vocab_size % mesh["tensor"] == 0 else 1)
    logits = (t + 1) * rows * seq * vocab * 4
    if lora:
        parts = [MemoryPart(f"base params ({cfg.model.param_dtype})", *sizes.base),
                 # The probe keeps the T trained adapters replicated (small next to the base).
                 MemoryPart(f"{t} adapters (replicated)", t * sizes.adapter[0],
                            t * sizes.adapter[0])]
    else:
        parts = [MemoryPart(f"{t + 1} full models' params", (t + 1) * sizes.base[0],
                            (t + 1) * sizes.base[1])]
    parts += [
        MemoryPart(f"logits ({t + 1} models x {rows} row(s) x {seq} x {vocab} float32)",
                   logits, logits),
        MemoryPart("log-softmax copy", logits, logits),
    ]
    act = int(chunk * rows * seq * _layer_bytes_per_token(m, seq, mesh["tensor"]))
    parts.append(MemoryPart(f"activations: {chunk} model(s) x {rows} row(s) x {seq} tokens "
                            "(one layer live)", act, act))
    return parts


def _eval_parts(cfg: RunConfig, m: ModelConfig, sizes: _Sizes, mesh, lora: bool):
    rows = _rows_per_device(cfg.eval.batch_size, mesh)
    seq = cfg.model.seq_len
    c = jnp.dtype(m.dtype).itemsize
    kv_split = mesh["tensor"] if m.num_key_value_heads % mesh["tensor"] == 0 else 1
    cache = (2 * m.num_hidden_layers * rows * (seq + cfg.eval.max_new_tokens)
             * m.num_key_value_heads * m.head_dim * c // kv_split)
    parts = [MemoryPart(f"params ({cfg.model.param_dtype})", *sizes.base)]
    if lora:
        parts.append(MemoryPart("adapter", *sizes.adapter))
    parts.append(MemoryPart(f"KV cache ({rows} row(s) x {seq + cfg.eval.max_new_tokens} "
                            "positions)", cache, cache))
    parts += _activation_parts(m, sizes, rows * seq, seq, mesh, train=False,
                               label=f"prefill of {rows} row(s) x {seq} tokens")[:2]
    return parts


def _largest_fitting(build, upper: int, limit: int | None) -> int:
    """The largest n in [1, upper] with build(n) <= PLAN_FRACTION * limit (upper when the
    limit is unknown; 1 when nothing fits)."""
    if limit is not None:
        limit = int(PLAN_FRACTION * limit)
    if limit is None or sum(p.per_device for p in build(upper)) <= limit:
        return upper
    if sum(p.per_device for p in build(1)) > limit:
        return upper if upper == 1 else 1
    lo, hi = 1, upper  # build(lo) fits, build(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(p.per_device for p in build(mid)) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def _margin_note(value: int, total: int, best: int, key: str, all_bytes: int,
                 limit: int | None) -> str:
    """What the configured round / chunk `value` (of `total`) leaves out, and the largest
    `best` within PLAN_FRACTION of the device, as the override that sets it."""
    notes = []
    if value < total:
        notes.append(f"all {total} at once would need {_gib(all_bytes)}")
    if limit is not None and best != value:
        notes.append(f"largest within {PLAN_FRACTION:.0%} of the device memory: {key}={best}")
    return "; ".join(notes)


_SECTIONS = {"pretrain": "model.pretrain", "single_task": "single_task", "probe": "probe",
             "mixture_finetune": "finetune", "eval": "eval"}


def _suggest(stage: StagePlan, cfg: RunConfig, mesh) -> str:
    """What would shrink the stage's largest part."""
    big = max(stage.parts, key=lambda p: p.per_device).name
    section = _SECTIONS[stage.name]
    sec = cfg.model.pretrain if stage.name == "pretrain" else getattr(cfg, section)
    train = stage.name not in ("probe", "eval")
    rows = _rows_per_device(sec.batch_size // getattr(sec, "grad_accum", 1), mesh)
    tips = []
    if any(w in big for w in ("activations", "logits", "log-softmax", "KV cache")):
        if rows > 1:
            tips.append(f"a smaller {section}.batch_size" + (" or a larger grad_accum" if train
                                                             and stage.name != "pretrain" else "")
                        + f" (now {rows} rows per device)")
        if train and not cfg.model.remat:
            tips.append("model.remat=true")
        tips.append("mesh.tensor > 1 (splits the vocabulary, heads and MLP)")
        tips.append("a shorter model.seq_len")
    if any(w in big for w in ("params", "grads", "moments", "adapters")):
        tips.append(f"a larger mesh.fsdp (now {mesh['fsdp']})")
        if stage.name in ("single_task", "mixture_finetune") and sec.trainable == "full":
            tips.append(f"LoRA ({section}.trainable=lora)")
    tips.append("more devices")
    return "; ".join(dict.fromkeys(tips))


def dry_run(cfg: RunConfig, *, num_devices: int | None = None) -> DryRunReport:
    """Validates `cfg` and plans the run: architecture, tasks, mesh, memory and steps per stage.

    Args:
      cfg: the run config.
      num_devices: devices to plan for (default `jax.device_count()`); the mesh must use them all.

    Returns:
      A `DryRunReport`; `report.fits` is False when a stage needs more memory per device than
      the device has (`mesh.device_memory_gb`, else what the device reports).

    Raises:
      ConfigError: a mesh that does not match the device count, a missing checkpoint directory
        without a preset, an unknown preset, an unreadable or unsupported config.json.

    Example:
      >>> report = dry_run(load_config("experiments/configs/demo.yaml"))
      >>> print(format_dry_run(report))
    """
    num_devices = jax.device_count() if num_devices is None else int(num_devices)
    mesh = resolve_mesh(cfg, num_devices)
    model, source, notes = _resolve_model(cfg)
    t, known, tasks_text = _count_tasks(cfg)
    if not known:
        notes.append(f"T is {tasks_text}")
    uses_lora = "lora" in (cfg.single_task.trainable, cfg.finetune.trainable)
    sizes = _sizes(model, _lora_config(cfg) if uses_lora else None, mesh)
    limit, limit_source = _device_memory(cfg)
    if cfg.model.param_dtype != "float32":
        notes.append(f"model.param_dtype={cfg.model.param_dtype}: the trainer needs float32 "
                     "master weights for what it trains (train/step.py refuses others); use "
                     "param_dtype float32 with dtype bfloat16 for bf16 compute")

    stages: list[StagePlan] = []
    n_methods, n_seeds = len(cfg.mixture.methods), len(cfg.seeds)
    if cfg.model.source == "scratch":
        p = cfg.model.pretrain
        rows = _rows_per_device(p.batch_size, mesh)
        parts = _optimizer_parts("model:", sizes.base, 1, 1) + _activation_parts(
            model, sizes, rows * cfg.model.seq_len, cfg.model.seq_len, mesh, train=True,
            label=f"{rows} row(s) x {cfg.model.seq_len} tokens")
        stages.append(StagePlan("pretrain", p.steps, f"{p.steps} steps of {p.batch_size} rows",
                                tuple(parts)))

    st = cfg.single_task
    pr = cfg.probe

    def need(parts) -> int:
        return sum(p.per_device for p in parts)

    # The round size and probe chunk exactly as the pipeline uses them (null: all at once).
    group = min(st.adapters_per_round or t, t)
    chunk = min(pr.adapter_chunk or t + 1, t + 1)

    def single(g):
        return _single_task_parts(cfg, st, model, sizes, mesh, t, g)

    def probe(c):
        return _probe_parts(cfg, model, sizes, mesh, t, c, True)

    # The largest values within PLAN_FRACTION of the device (everything when memory is unknown).
    group_max = _largest_fitting(single, t, limit)
    chunk_max = _largest_fitting(probe, t + 1, limit)
    rounds = -(-t // group)
    how = "all at once" if st.adapters_per_round is None else \
        f"single_task.adapters_per_round={st.adapters_per_round}"
    stages.append(StagePlan(
        "single_task", st.steps * rounds,
        f"{st.steps} steps x {rounds} round(s) of {group} adapter(s) side by side ({how})",
        tuple(single(group)),
        _margin_note(group, t, group_max, "single_task.adapters_per_round", need(single(t)),
                     limit)))
    probe_steps = None
    how = "all at once" if pr.adapter_chunk is None else f"probe.adapter_chunk={pr.adapter_chunk}"
    probe_text = (f"one pass over the probe splits, batches of {pr.batch_size} rows, {chunk} of "
                  f"{t + 1} models per forward ({how})")
    if pr.max_examples_per_task is not None:
        probe_steps = -(-t * pr.max_examples_per_task // pr.batch_size)
        probe_text += f", at most {probe_steps} batches"
    stages.append(StagePlan(
        "probe", probe_steps, probe_text, tuple(probe(chunk)),
        _margin_note(chunk, t + 1, chunk_max, "probe.adapter_chunk", need(probe(t + 1)),
                     limit)))

    ft = cfg.finetune
    n_mix = n_methods * n_seeds
    stages.append(StagePlan(
        "mixture_finetune", ft.steps * n_mix,
        f"{ft.steps} steps x {n_mix} fine-tunes ({n_methods} methods x {n_seeds} seeds)",
        tuple(_finetune_parts(cfg, ft, model, sizes, mesh, 1 if ft.trainable == "lora" else 0))))
    stages.append(StagePlan(
        "eval", None, f"{n_mix} fine-tuned models on the held-out suite, batches of "
        f"{cfg.eval.batch_size}, {cfg.eval.max_new_tokens} new tokens",
        tuple(_eval_parts(cfg, model, sizes, mesh, ft.trainable == "lora"))))

    # A stage over the device whose configured round / chunk is above the largest that fits is
    # fixed by that memory-only setting (results do not change); say the exact override.
    fixes = {"single_task": ("single_task.adapters_per_round", group, group_max, single),
             "probe": ("probe.adapter_chunk", chunk, chunk_max, probe)}
    over = []
    if limit is not None:
        for s in stages:
            if s.per_device <= limit:
                continue
            msg = (f"{s.name}: needs {s.per_device / GIB:.2f} GiB per device, has "
                   f"{limit / GIB:.2f} GiB: over by {(s.per_device - limit) / GIB:.2f} GiB; ")
            key, value, best, build = fixes.get(s.name, (None, 0, 0, None))
            if key is not None and value > best and need(build(best)) <= limit:
                msg += (f"set {key}={best} ({_gib(need(build(best)))} per device; memory only, "
                        "results do not change)")
            else:
                if key is not None and value > 1:
                    msg += f"even {key}=1 needs {_gib(need(build(1)))}; "
                msg += f"try {_suggest(s, cfg, mesh)}"
            over.append(msg)
    return DryRunReport(
        config=cfg, model=model, model_source=source, base_params=sizes.base_params,
        adapter_params=sizes.adapter_params if uses_lora else 0, num_tasks=t, tasks_known=known,
        tasks_text=tasks_text, mesh=mesh, num_devices=num_devices, device_memory=limit,
        device_memory_source=limit_source, stages=tuple(stages), adapters_per_round=group,
        probe_adapter_chunk=chunk, max_adapters_per_round=group_max,
        max_probe_adapter_chunk=chunk_max, single_task_finetunes=t, mixture_finetunes=n_mix,
        over=tuple(over), notes=tuple(notes))


# -- printing -------------------------------------------------------------------------------------

def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.01 * GIB else f"{n / 2 ** 20:.2f} MiB"


def format_dry_run(report: DryRunReport) -> str:
    """The text `taskpgm run --dry-run` prints: architecture, T, mesh, memory and steps per stage."""
    r, m, cfg = report, report.model, report.config
    lines = [f"dry run: {cfg.name}"]
    window = f", sliding window {m.sliding_window}" if m.sliding_window else ""
    lines.append(f"model    {m.model_type} from {r.model_source}: {m.num_hidden_layers} layers, "
                 f"hidden {m.hidden_size}, mlp {m.intermediate_size}, {m.num_attention_heads} "
                 f"heads ({m.num_key_value_heads} kv, head_dim {m.head_dim}), vocab "
                 f"{m.vocab_size}{window}: {_count(r.base_params)} parameters")
    lines.append(f"         compute {cfg.model.dtype}, parameters {cfg.model.param_dtype}, "
                 f"seq_len {cfg.model.seq_len}, remat {'on' if m.remat else 'off'}")
    if r.adapter_params:
        lines.append(f"lora     rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}: "
                     f"{_count(r.adapter_params)} per adapter, "
                     f"{_count(r.adapter_params * r.num_tasks)} for {r.num_tasks} adapters")
    lines.append(f"tasks    T = {r.num_tasks} ({r.tasks_text})")
    mesh = " x ".join(f"{a} {r.mesh[a]}" for a in MESH_AXES)
    lines.append(f"mesh     {mesh} = {r.num_devices} devices; batch split over data x fsdp = "
                 f"{r.mesh['data'] * r.mesh['fsdp']}")
    if r.device_memory is None:
        lines.append(f"device   memory {r.device_memory_source}")
    else:
        lines.append(f"device   {_gib(r.device_memory)} per device ({r.device_memory_source})")
    lines.append(f"plan     {r.single_task_finetunes} single-task fine-tunes + "
                 f"{r.mixture_finetunes} mixture fine-tunes ({len(cfg.mixture.methods)} methods "
                 f"x {len(cfg.seeds)} seeds)")
    lines.append("")
    lines.append(f"{'stage':<18}{'per device':>12}  {'fits':<5} steps")
    for s in r.stages:
        fits = "?" if r.device_memory is None else "yes" if s.per_device <= r.device_memory else "NO"
        lines.append(f"{s.name:<18}{_gib(s.per_device):>12}  {fits:<5} {s.steps_text}")
        for p in s.parts:
            lines.append(f"    {p.name:<70}{_gib(p.per_device):>12}")
        if s.note:
            lines.append(f"    note: {s.note}")
    if r.notes:
        lines.append("")
        lines += [f"note: {n}" for n in r.notes]
    lines.append("")
    if r.device_memory is None:
        lines.append("fit: not checked (device memory unknown; set mesh.device_memory_gb)")
    elif r.fits:
        lines.append(f"fit: every stage fits in {_gib(r.device_memory)} per device")
    else:
        lines.append("DOES NOT FIT:")
        lines += [f"  {o}" for o in r.over]
    return "\n".join(lines)
