"""`taskpgm run --dry-run`: validate a run config and plan it without computing anything heavy.

The dry run resolves the base architecture (from config.json, a preset, or the scratch sizes as
`pipeline.inputs.scratch_config` builds them), builds the model abstractly (`nnx.eval_shape`:
shapes only, no memory), counts the tasks, resolves the mesh against a device count, and
estimates the memory each stage needs per device. Nothing is initialised, downloaded or
compiled, so a 7B plan for a 64-chip slice runs on a laptop (pass `num_devices`).

Memory (bytes per device; each stage lists its parts) is `pipeline/_memory.py`: parameters,
gradients and Adam moments counted exactly from the sharding rules on the planned mesh,
activations and logits estimated (within a factor of about 2), and, for the single-task stage,
the round's initial adapters kept whole on one device.

Stages: `pretrain` (scratch bases only), `single_task` (T LoRA adapters over one frozen base,
trained side by side in rounds), `probe` (T single-task models plus the base on each probe batch:
(T + 1) x rows x S x V float32 logits, scored as they are, with no log-softmax copy),
`mixture_finetune` (one fine-tune per mixture method and seed) and `eval` (a fine-tuned model plus
the KV cache of greedy generation).

Two config keys change memory and never results; the plan uses them exactly as the run will:

* `single_task.adapters_per_round` (G; null: all T at once): the single-task stage trains G
  adapters side by side per round (adapter t follows the same trajectory whether trained alone or
  beside others, `pipeline/stages.py`).
* `probe.adapter_chunk` (C; null: all T + 1 at once): the probe forward runs the T + 1 models C at
  a time (`multi_adapter_forward(..., adapter_chunk=C)`); the raw logits of all T + 1 are still
  kept for the divergences (eval/score.py normalises them tile by tile, `from_logits=True`).

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

from taskpgm_jax.config import ConfigError, FinetuneConfig, RunConfig
from taskpgm_jax.hf.config import config_from_hf, read_hf_config
from taskpgm_jax.models import PRESETS, LoraConfig, ModelConfig
from taskpgm_jax.pipeline._memory import (
    GIB,
    PLAN_FRACTION,
    MemoryPart,
    MemorySetting,
    StageMemory,
    gib,
    model_sizes,
    rows_per_device,
    total,
)
from taskpgm_jax.pipeline.inputs import dtypes as model_dtypes
from taskpgm_jax.pipeline.inputs import scratch_config
from taskpgm_jax.sharding import MESH_AXES

__all__ = ["GIB", "PLANNING_TASKS", "PLAN_FRACTION", "STAGES", "DryRunReport", "MemoryPart",
           "StagePlan", "dry_run", "format_dry_run", "resolve_mesh"]

PLANNING_TASKS = 64  # T assumed when the task count is unknown without reading the data
STAGES = ("pretrain", "single_task", "probe", "mixture_finetune", "eval")


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
        return total(self.parts)

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
    dtypes = {"dtype": dtype, "param_dtype": param_dtype, "remat": m.remat,
              "attention_impl": m.attention_impl}
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
    # RunConfig validated these on construction: a preset name for 'preset', a checkpoint for 'hf'.
    if m.source == "preset":
        assert m.preset is not None
        return from_preset(m.preset), f"preset {m.preset} (random weights)", notes
    assert m.checkpoint is not None
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
    assert d.files.path is not None  # RunConfig validated it (check_source_data)
    path = Path(d.files.path).expanduser()
    if path.is_dir():
        from taskpgm_jax.data.sources.files import SUFFIXES

        # As the loader reads a directory: task files by suffix, hidden files skipped.
        files = sorted(f for f in path.iterdir()
                       if f.suffix in SUFFIXES and not f.name.startswith("."))
        # A file that holds the task column is split by it (FLAN-style shards): then T is only
        # known once the files are read. Files without it are one task each.
        if files and not any(_may_hold_column(f, d.files.task_column) for f in files):
            return len(files), True, f"task files in {path}, none with a {d.files.task_column!r} column"
        if files:
            return max(PLANNING_TASKS, len(files)), False, (
                f"{len(files)} task files in {path}, some with a {d.files.task_column!r} column: "
                f"{unknown}")
    return PLANNING_TASKS, False, f"data.files.path {path}: {unknown}"


def _may_hold_column(path: Path, column: str | None) -> bool:
    """Whether a task file may hold `column`: a Parquet file's schema names it, a JSON file
    mentions `"column"` in its first MiB (a planning estimate, not a parse of every row)."""
    if not column:
        return False
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return column in pq.read_schema(path).names
        except (OSError, ValueError):  # unreadable here: the data stage names the problem
            return True
    with open(path, "rb") as f:
        return f'"{column}"'.encode() in f.read(1 << 20)


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


# -- planning -------------------------------------------------------------------------------------

_SECTIONS = {"pretrain": "model.pretrain", "single_task": "single_task", "probe": "probe",
             "mixture_finetune": "finetune", "eval": "eval"}


def _suggest(stage: StagePlan, cfg: RunConfig, mesh) -> str:
    """What would shrink the stage's largest part."""
    big = max(stage.parts, key=lambda p: p.per_device).name
    section = _SECTIONS[stage.name]
    sec = cfg.model.pretrain if stage.name == "pretrain" else getattr(cfg, section)
    train = stage.name not in ("probe", "eval")
    rows = rows_per_device(sec.batch_size // getattr(sec, "grad_accum", 1), mesh)
    tips = []
    if any(w in big for w in ("activations", "logits", "log-softmax", "KV cache")):
        if rows > 1:
            tips.append(f"a smaller {section}.batch_size" + (" or a larger grad_accum" if train
                                                             and stage.name != "pretrain" else "")
                        + f" (now {rows} rows per device)")
        if train and not cfg.model.remat:
            tips.append("model.remat=true")
        if train and "logits" in big and cfg.model.loss_chunk is None:
            tips.append(f"model.loss_chunk={max(cfg.model.seq_len // 8, 1)} (the training loss "
                        "a chunk of positions at a time)")
        if "activations" in big and cfg.model.attention_impl == "dot":
            tips.append("model.attention_impl=cudnn on an NVIDIA GPU (flash attention: no "
                        "S x S scores per head), or chunked elsewhere (512 keys at a time)")
        tips.append("mesh.tensor > 1 (splits the vocabulary, heads and MLP)")
        tips.append("a shorter model.seq_len")
    if any(w in big for w in ("params", "grads", "moments", "adapters")):
        tips.append(f"a larger mesh.fsdp (now {mesh['fsdp']})")
        if isinstance(sec, FinetuneConfig) and sec.trainable == "full":  # the fine-tune stages
            tips.append(f"LoRA ({section}.trainable=lora)")
    tips.append("more devices")
    return "; ".join(dict.fromkeys(tips))


def _over(stage: StagePlan, limit: int, setting: MemorySetting | None, cfg: RunConfig,
          mesh) -> str:
    """The overage of a stage that does not fit, and what fixes it: a stage whose configured
    round / chunk is above the largest that fits is fixed by that memory-only setting (results do
    not change), so the message gives the exact override."""
    msg = (f"{stage.name}: needs {gib(stage.per_device, mib=False)} per device, has "
           f"{gib(limit, mib=False)}: over by {gib(stage.per_device - limit, mib=False)}; ")
    if setting is not None:
        fixed = total(setting.build(setting.best))
        if setting.value > setting.best and fixed <= limit:
            return msg + (f"set {setting.key}={setting.best} ({gib(fixed)} per device; memory "
                          "only, results do not change)")
        if setting.value > 1:
            msg += f"even {setting.key}=1 needs {gib(total(setting.build(1)))}; "
    return msg + f"try {_suggest(stage, cfg, mesh)}"


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
    sizes = model_sizes(model, _lora_config(cfg) if uses_lora else None, mesh)
    limit, limit_source = _device_memory(cfg)
    if cfg.model.param_dtype != "float32":
        notes.append(f"model.param_dtype={cfg.model.param_dtype}: the trainer needs float32 "
                     "master weights for what it trains (train/step.py refuses others); use "
                     "param_dtype float32 with dtype bfloat16 for bf16 compute")
    mem = StageMemory(model, sizes, mesh, cfg.model.seq_len, cfg.model.param_dtype,
                      cfg.model.loss_chunk)
    st, pr, ft = cfg.single_task, cfg.probe, cfg.finetune

    # The round size and probe chunk exactly as the pipeline uses them (null: all at once), and
    # the largest within PLAN_FRACTION of the device (everything when memory is unknown).
    group = MemorySetting.plan("single_task.adapters_per_round", st.adapters_per_round, t,
                               lambda g: mem.single_task(st.batch_size, st.grad_accum, t, g),
                               limit)
    chunk = MemorySetting.plan("probe.adapter_chunk", pr.adapter_chunk, t + 1,
                               lambda c: mem.probe(pr.batch_size, t, c), limit)

    stages: list[StagePlan] = []
    if cfg.model.source == "scratch":
        p = cfg.model.pretrain
        stages.append(StagePlan("pretrain", p.steps, f"{p.steps} steps of {p.batch_size} rows",
                                tuple(mem.training(p.batch_size))))
    rounds = -(-t // group.value)
    stages.append(StagePlan(
        "single_task", st.steps * rounds,
        f"{st.steps} steps x {rounds} round(s) of {group.value} adapter(s) side by side "
        f"({group.how})", tuple(group.build(group.value)), group.note()))
    probe_steps = None
    probe_text = (f"one pass over the probe splits, batches of {pr.batch_size} rows, "
                  f"{chunk.value} of {t + 1} models per forward ({chunk.how})")
    if pr.max_examples_per_task is not None:
        probe_steps = -(-t * pr.max_examples_per_task // pr.batch_size)
        probe_text += f", at most {probe_steps} batches"
    stages.append(StagePlan("probe", probe_steps, probe_text, tuple(chunk.build(chunk.value)),
                            chunk.note()))
    n_methods, n_seeds = len(cfg.mixture.methods), len(cfg.seeds)
    n_mix = n_methods * n_seeds
    lora = ft.trainable == "lora"
    stages.append(StagePlan(
        "mixture_finetune", ft.steps * n_mix,
        f"{ft.steps} steps x {n_mix} fine-tunes ({n_methods} methods x {n_seeds} seeds)",
        tuple(mem.training(ft.batch_size, ft.grad_accum, 1 if lora else 0))))
    stages.append(StagePlan(
        "eval", None, f"{n_mix} fine-tuned models on the held-out suite, batches of "
        f"{cfg.eval.batch_size}, {cfg.eval.max_new_tokens} new tokens",
        tuple(mem.eval(cfg.eval.batch_size, cfg.eval.max_new_tokens, lora))))

    settings = {"single_task": group, "probe": chunk}
    over = [] if limit is None else [_over(s, limit, settings.get(s.name), cfg, mesh)
                                     for s in stages if s.per_device > limit]
    return DryRunReport(
        config=cfg, model=model, model_source=source, base_params=sizes.base_params,
        adapter_params=sizes.adapter_params if uses_lora else 0, num_tasks=t, tasks_known=known,
        tasks_text=tasks_text, mesh=mesh, num_devices=num_devices, device_memory=limit,
        device_memory_source=limit_source, stages=tuple(stages), adapters_per_round=group.value,
        probe_adapter_chunk=chunk.value, max_adapters_per_round=group.best,
        max_probe_adapter_chunk=chunk.best, single_task_finetunes=t, mixture_finetunes=n_mix,
        over=tuple(over), notes=tuple(notes))


# -- printing -------------------------------------------------------------------------------------

def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _row(label: str, text: str) -> str:
    """A line of the header: `label` in a column of 9."""
    return f"{label:<9}{text}"


def _stage_row(name: str, size: str, fits: str, steps: str) -> str:
    """A line of the stage table (and its heading)."""
    return f"{name:<18}{size:>12}  {fits:<5} {steps}"


def format_dry_run(report: DryRunReport) -> str:
    """The text `taskpgm run --dry-run` prints: architecture, T, mesh, memory and steps per stage."""
    r, m, cfg = report, report.model, report.config
    lines = [f"dry run: {cfg.name}"]
    window = f", sliding window {m.sliding_window}" if m.sliding_window else ""
    lines.append(_row("model", f"{m.model_type} from {r.model_source}: {m.num_hidden_layers} "
                      f"layers, hidden {m.hidden_size}, mlp {m.intermediate_size}, "
                      f"{m.num_attention_heads} heads ({m.num_key_value_heads} kv, head_dim "
                      f"{m.head_dim}), vocab {m.vocab_size}{window}: {_count(r.base_params)} "
                      "parameters"))
    lines.append(_row("", f"compute {cfg.model.dtype}, parameters {cfg.model.param_dtype}, "
                      f"seq_len {cfg.model.seq_len}, remat {'on' if m.remat else 'off'}, "
                      f"attention {m.attention_impl}"
                      + (f", loss_chunk {cfg.model.loss_chunk}" if cfg.model.loss_chunk else "")))
    if r.adapter_params:
        lines.append(_row("lora", f"rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}: "
                          f"{_count(r.adapter_params)} per adapter, "
                          f"{_count(r.adapter_params * r.num_tasks)} for {r.num_tasks} adapters"))
    lines.append(_row("tasks", f"T = {r.num_tasks} ({r.tasks_text})"))
    mesh = " x ".join(f"{a} {r.mesh[a]}" for a in MESH_AXES)
    lines.append(_row("mesh", f"{mesh} = {r.num_devices} devices; batch split over data x fsdp = "
                      f"{r.mesh['data'] * r.mesh['fsdp']}"))
    lines.append(_row("device", f"memory {r.device_memory_source}" if r.device_memory is None
                      else f"{gib(r.device_memory)} per device ({r.device_memory_source})"))
    lines.append(_row("plan", f"{r.single_task_finetunes} single-task fine-tunes + "
                      f"{r.mixture_finetunes} mixture fine-tunes ({len(cfg.mixture.methods)} "
                      f"methods x {len(cfg.seeds)} seeds)"))
    lines.append("")
    lines.append(_stage_row("stage", "per device", "fits", "steps"))
    for s in r.stages:
        fits = "?" if r.device_memory is None else "yes" if s.per_device <= r.device_memory else "NO"
        lines.append(_stage_row(s.name, gib(s.per_device), fits, s.steps_text))
        for p in s.parts:
            lines.append(f"    {p.name:<70}{gib(p.per_device):>12}")
        if s.note:
            lines.append(f"    note: {s.note}")
    if r.notes:
        lines.append("")
        lines += [f"note: {n}" for n in r.notes]
    lines.append("")
    if r.device_memory is None:
        lines.append("fit: not checked (device memory unknown; set mesh.device_memory_gb)")
    elif r.fits:
        lines.append(f"fit: every stage fits in {gib(r.device_memory)} per device")
    else:
        lines.append("DOES NOT FIT:")
        lines += [f"  {o}" for o in r.over]
    return "\n".join(lines)
