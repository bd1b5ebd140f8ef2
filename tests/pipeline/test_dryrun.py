"""The dry run: every shipped config plans and fits, counts match real models, errors name keys."""

import json
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import taskpgm_jax.distributed
from taskpgm_jax.cli import main
from taskpgm_jax.config import ConfigError, config_from_dict, load_config
from taskpgm_jax.hf.config import config_to_hf
from taskpgm_jax.models import (
    PRESETS,
    PUBLISHED_PARAM_COUNTS,
    LoraConfig,
    LoRAParam,
    add_lora,
    count_params,
)
from taskpgm_jax.models.decoder import CausalLM
from taskpgm_jax.models.init import state_shardings
from taskpgm_jax.pipeline.dryrun import (
    GIB,
    PLAN_FRACTION,
    PLANNING_TASKS,
    STAGES,
    DryRunReport,
    MemoryPart,
    StagePlan,
    dry_run,
    format_dry_run,
    resolve_mesh,
)
from taskpgm_jax.sharding import make_mesh
from taskpgm_jax.train import AdapterTrainer, TrainConfig, Trainer, init_adapters

CONFIGS = sorted((Path(__file__).parents[2] / "experiments" / "configs").glob("*.yaml"))
LLAMA = str(Path(__file__).parents[2] / "experiments" / "configs" / "llama2_7b_bbh.yaml")

SMALL = {
    "name": "small",
    "tokenizer": {"vocab_size": 384},
    "model": {"size": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
              "seq_len": 32},
    "lora": {"rank": 4, "targets": ["q_proj", "o_proj"]},
    "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
}


def _config(**sections):
    raw = {**SMALL, **sections}
    return config_from_dict(raw)


def _hf_7b(preset: str, memory_gb=32, attention_impl="dot", loss_chunk=None, **extra):
    raw = {"name": preset, "tokenizer": {"kind": "pretrained"},
           "model": {"source": "hf", "checkpoint": "/nonexistent/ckpt", "preset": preset,
                     "dtype": "bfloat16", "seq_len": 1024, "remat": True,
                     "attention_impl": attention_impl, "loss_chunk": loss_chunk},
           "data": {"source": "files", "files": {"path": "/nonexistent/tasks",
                                                 "heldout_path": "/nonexistent/bbh"}},
           "mesh": {"data": 1, "fsdp": 8, "tensor": 1, "device_memory_gb": memory_gb}, **extra}
    return config_from_dict(raw)


def _devices(cfg) -> int:
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return 8 if -1 in sizes else math.prod(sizes)


def test_configs_are_there():
    names = {p.name for p in CONFIGS}
    assert {"bigbench_small.yaml", "llama2_7b_bbh.yaml", "qwen2_7b_bbh.yaml",
            "mistral_7b_bbh.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_plans_and_fits(path):
    cfg = load_config(path)
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path.name} must open with a header comment"
    assert f"taskpgm run experiments/configs/{path.name}" in "\n".join(header)
    report = dry_run(cfg, num_devices=_devices(cfg))
    assert isinstance(report, DryRunReport)
    text = format_dry_run(report)
    for stage in report.stages:
        assert isinstance(stage, StagePlan) and stage.name in text
        assert all(isinstance(p, MemoryPart) for p in stage.parts)
        assert stage.per_device == sum(p.per_device for p in stage.parts)
    names = [s.name for s in report.stages]
    assert names == [s for s in STAGES if s in names]  # in pipeline order
    expected = {"single_task", "probe", "mixture_finetune", "eval"}
    if cfg.model.source == "scratch":
        expected.add("pretrain")
    assert {s.name for s in report.stages} == expected
    if cfg.mesh.device_memory_gb is not None:
        assert report.fits, text
        assert "fit: every stage fits" in text
    if cfg.model.source == "hf":
        assert cfg.model.preset is not None and report.base_params == \
            PUBLISHED_PARAM_COUNTS[cfg.model.preset]
        assert report.model.dtype == jax.numpy.bfloat16
        assert report.adapter_params > 0 and cfg.lora.rank == 16
        # The memory-only settings are in the file, used as they are, within the margin.
        assert report.adapters_per_round == cfg.single_task.adapters_per_round \
            <= report.max_adapters_per_round
        assert report.probe_adapter_chunk == cfg.probe.adapter_chunk \
            <= report.max_probe_adapter_chunk
        assert f"of {report.adapters_per_round} adapter(s) side by side " \
            f"(single_task.adapters_per_round={report.adapters_per_round})" in text
        assert f"probe.adapter_chunk={report.probe_adapter_chunk})" in text
        # The 8-GPU overrides of the header fit too, with 59 GiB per GPU: what an 80 GB GPU
        # reports as its limit under JAX's default preallocation (75%).
        lines = [h.lstrip("# ").strip() for h in header]
        line = lines[next(i for i, h in enumerate(lines) if h.startswith("On one 8-GPU")) + 1]
        gpu = dry_run(load_config(path, [o.replace("=null", "=59") if "device_memory" in o else o
                                         for o in line.split()]), num_devices=8)
        assert gpu.fits, format_dry_run(gpu)
        assert gpu.adapters_per_round <= gpu.max_adapters_per_round
        assert gpu.probe_adapter_chunk <= gpu.max_probe_adapter_chunk


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAM_COUNTS))
def test_preset_counts_equal_published(preset, tmp_path):
    cfg = config_from_dict({"model": {"source": "preset", "preset": preset},
                            "mesh": {"fsdp": 8, "device_memory_gb": 1000}})
    report = dry_run(cfg, num_devices=8)
    assert report.base_params == PUBLISHED_PARAM_COUNTS[preset]
    # The same sizes through the config.json reader (no weights: a note says so).
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(PRESETS[preset]())))
    hf = config_from_dict({"model": {"source": "hf", "checkpoint": str(tmp_path)},
                           "tokenizer": {"kind": "pretrained"}, "mesh": {"fsdp": 8}})
    report = dry_run(hf, num_devices=8)
    assert report.base_params == PUBLISHED_PARAM_COUNTS[preset]
    assert any("safetensors" in n for n in report.notes)


def _shard_bytes(tree) -> int:
    """Bytes device 0 holds of every array of `tree` (real shardings, nothing estimated)."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)
               if getattr(x, "ndim", 0) >= 1)


def _real_model_with_adapter(model_cfg, mesh):
    """A really initialised model with one adapter, created in its shardings (as init_model)."""
    def make():
        model = CausalLM(model_cfg, rngs=nnx.Rngs(0))
        return add_lora(model, LoraConfig(rank=4, targets=("q_proj", "o_proj")), rngs=nnx.Rngs(1))

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()), out_shardings=state_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def small_model(cpu_mesh_devices):
    """SMALL's model, really initialised with one adapter in its shardings on a 2 x 2 x 2 mesh
    (shared: initialising it compiles for seconds)."""
    mesh = make_mesh(2, 2, 2)
    return _real_model_with_adapter(dry_run(_config(), num_devices=8).model, mesh), mesh


def test_counts_and_bytes_equal_a_real_sharded_model(small_model):
    # intermediate 96 and 2 kv heads x 16 divide the tensor axis; vocab 384 over fsdp too.
    cfg = _config(finetune={"trainable": "lora", "grad_accum": 2, "batch_size": 8})
    report = dry_run(cfg, num_devices=8)
    size = dict(cfg.model.size)
    assert (report.model.hidden_size, report.model.intermediate_size,
            report.model.num_hidden_layers, report.model.vocab_size) == \
        (size["hidden_size"], size["intermediate_size"], size["num_hidden_layers"], 384)
    model, mesh = small_model
    assert model.config == report.model  # the shared model is this config's
    # Counts: the abstract model's against the real one's leaves.
    assert report.base_params == count_params(model)
    assert report.base_params == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    lora = nnx.state(model, LoRAParam)
    assert report.adapter_params == sum(x.size for x in jax.tree.leaves(lora))
    # Bytes per device: the estimate against device 0's real shards.
    pre = report.stage("pretrain")
    params = _shard_bytes(nnx.state(model, nnx.Param))
    assert pre.part("model: params").per_device == params
    assert params < pre.part("model: params").logical  # really split
    state = Trainer(model, TrainConfig(total_steps=10, trainable="full"), mesh=mesh).init(0)
    assert pre.part("model: adam moments").per_device == _shard_bytes(state.opt_state)
    assert pre.part("model: grads").per_device == params
    mix = report.stage("mixture_finetune")
    assert mix.part("1 adapter(s): params").per_device == _shard_bytes(lora)
    assert mix.part("1 adapter(s): grads + accumulator").per_device == 2 * _shard_bytes(lora)
    assert mix.part("base params").per_device == params


def test_stage_that_cannot_fit_reports_the_overage():
    report = dry_run(_hf_7b("llama2_7b", memory_gb=1), num_devices=8)
    assert not report.fits
    text = format_dry_run(report)
    assert "DOES NOT FIT" in text
    for stage in report.stages:
        if stage.per_device > GIB:
            msg = next(o for o in report.over if o.startswith(stage.name + ":"))
            need = stage.per_device / GIB
            assert f"needs {need:.2f} GiB per device, has 1.00 GiB: over by {need - 1:.2f} GiB" \
                in msg
            assert "try " in msg
    # Not even one adapter per round fits: the message says so rather than suggesting it.
    single = next(o for o in report.over if o.startswith("single_task:"))
    assert "even single_task.adapters_per_round=1 needs" in single and "set " not in single
    assert any(o.startswith("probe:") for o in report.over)


def test_all_at_once_that_does_not_fit_gives_the_override():
    # Null rounds and chunks (the defaults): all 64 adapters side by side, all 65 models per
    # forward, as the pipeline would run them. They do not fit in 64 GiB (8 devices).
    cfg = _hf_7b("llama2_7b", memory_gb=64)
    report = dry_run(cfg, num_devices=8)
    t = report.num_tasks
    assert not report.tasks_known and t == PLANNING_TASKS
    assert (report.adapters_per_round, report.probe_adapter_chunk) == (t, t + 1)
    assert not report.fits
    st, probe = report.stage("single_task"), report.stage("probe")
    assert st.steps == cfg.single_task.steps and "1 round(s) of 64 adapter(s)" in st.steps_text
    assert st.part("64 adapter(s): params")
    assert probe.part("activations: 65 model(s)")
    g, c = report.max_adapters_per_round, report.max_probe_adapter_chunk
    assert 1 <= g < t and 1 <= c < t + 1
    text = format_dry_run(report)
    for name, key, value in (("single_task", "single_task.adapters_per_round", g),
                             ("probe", "probe.adapter_chunk", c)):
        msg = next(o for o in report.over if o.startswith(name + ":"))
        assert f"; set {key}={value} (" in msg and f"  {msg}" in text
        assert "must" not in msg
    assert "must" not in text
    # The override, pasted, fits within the planning margin; one more does not.
    fixed = dry_run(_hf_7b("llama2_7b", memory_gb=64, single_task={"adapters_per_round": g},
                           probe={"adapter_chunk": c}), num_devices=8)
    assert fixed.fits and (fixed.adapters_per_round, fixed.probe_adapter_chunk) == (g, c)
    margin = PLAN_FRACTION * fixed.device_memory
    assert fixed.stage("single_task").per_device <= margin
    assert fixed.stage("probe").per_device <= margin
    assert fixed.stage("single_task").steps == -(-t // g) * cfg.single_task.steps
    bigger = dry_run(_hf_7b("llama2_7b", memory_gb=64, single_task={"adapters_per_round": g + 1},
                            probe={"adapter_chunk": c + 1}), num_devices=8)
    assert bigger.stage("single_task").per_device > margin
    assert bigger.stage("probe").per_device > margin


def test_configured_rounds_and_chunks_are_what_is_estimated(small_model):
    # T = 18 (the default synthetic suite) in 3 rounds of 6; the probe 4 models per forward.
    g, c = 6, 4
    cfg = _config(single_task={"adapters_per_round": g, "steps": 20},
                  probe={"adapter_chunk": c, "batch_size": 8})
    report = dry_run(cfg, num_devices=8)
    t = report.num_tasks
    assert t == 18 and (report.adapters_per_round, report.probe_adapter_chunk) == (g, c)
    st = report.stage("single_task")
    assert st.steps == 3 * 20
    assert "3 round(s) of 6 adapter(s) side by side (single_task.adapters_per_round=6)" \
        in st.steps_text
    # The adapter parts against the state shardings of an AdapterTrainer of 6 adapters on the
    # 2 x 2 x 2 mesh (its own sharding code; shapes only, nothing compiled).
    model, mesh = small_model
    stacked = jax.eval_shape(lambda: init_adapters(model, g, seed=0))
    state = AdapterTrainer(model, TrainConfig(total_steps=10, trainable="lora"), stacked,
                           mesh=mesh).abstract_state()

    def shard(tree):  # device 0's bytes of every array with a per-adapter matrix ([G, ., .])
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(tree) if len(x.shape) >= 3)

    assert st.part(f"{g} adapter(s): params").per_device == shard(state.params)
    # mu and nu (not the [G] step counts)
    assert st.part(f"{g} adapter(s): adam moments").per_device == shard(state.opt_state)
    # The round's initial adapters, whole on one device (finished rounds wait on the host).
    one = sum(math.prod(x.shape) * x.dtype.itemsize
              for x in jax.tree.leaves(jax.eval_shape(lambda: init_adapters(model, 1, seed=0))))
    held = st.part(f"{g} whole adapters")
    assert held.per_device == held.logical == g * one
    # The probe: C models' activations, the logits of all T + 1.
    probe = report.stage("probe")
    assert probe.part(f"activations: {c} model(s)")
    assert f"{c} of {t + 1} models per forward (probe.adapter_chunk={c})" in probe.steps_text
    rows = 8 // 4  # batch over data x fsdp
    logits = (t + 1) * rows * 32 * (384 // 2) * 4  # vocab over tensor = 2
    assert probe.part("logits").per_device == logits
    # Null: all at once, as the pipeline runs it.
    every = dry_run(_config(), num_devices=8)
    assert every.adapters_per_round == t and every.probe_adapter_chunk == t + 1
    assert every.stage("single_task").steps == every.config.single_task.steps


def test_cli_dry_run_plans_for_devices_given(capsys, monkeypatch):
    called = []
    monkeypatch.setattr(taskpgm_jax.distributed, "maybe_initialize", lambda: called.append(1))
    assert main(["run", LLAMA, "--dry-run", "--devices", "16"]) == 0
    out = capsys.readouterr().out
    assert "mesh     data 1 x fsdp 16 x tensor 1 = 16 devices" in out
    assert "fit: every stage fits in 32.00 GiB per device" in out
    assert not called  # --devices: no cluster to look for
    # All at once on the same slice: exit 3, and the printed overrides, pasted, fit.
    assert main(["run", LLAMA, "--dry-run", "--devices", "16", "single_task.adapters_per_round=null",
                 "probe.adapter_chunk=null"]) == 3
    out = capsys.readouterr().out
    fixes = re.findall(r"; set (\S+=\d+) \(", out)
    assert sorted(k.split("=")[0] for k in fixes) == ["probe.adapter_chunk",
                                                       "single_task.adapters_per_round"]
    assert main(["run", LLAMA, "--dry-run", "--devices", "16", *fixes]) == 0
    capsys.readouterr()
    # Without --devices: the cluster first (a slice sees every chip), then jax.device_count().
    assert main(["run", LLAMA, "--dry-run", "mesh.fsdp=-1", "mesh.device_memory_gb=null"]) == 0
    assert called == [1]
    assert f"= {jax.device_count()} devices" in capsys.readouterr().out


def test_cli_devices_needs_dry_run(capsys):
    assert main(["run", LLAMA, "--devices", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--devices" in err and "--dry-run" in err
    assert main(["run", LLAMA, "--dry-run", "--devices", "0"]) == 2
    assert "--devices" in capsys.readouterr().err


def test_bad_mesh_names_mesh():
    with pytest.raises(ConfigError, match=r"'mesh'.*2 x .*3.*8"):
        dry_run(_config(mesh={"data": 2, "fsdp": 3, "tensor": 1}), num_devices=8)
    with pytest.raises(ConfigError, match="'mesh'.*multiple of 3"):
        dry_run(_config(mesh={"data": 3, "fsdp": -1, "tensor": 1}), num_devices=8)
    report = dry_run(_config(mesh={"data": 2, "fsdp": -1, "tensor": 1}), num_devices=8)
    assert report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    assert resolve_mesh(_config(mesh={"data": 2, "fsdp": -1, "tensor": 2}), 16) == \
        {"data": 2, "fsdp": 4, "tensor": 2}


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "no_such_dir"
    cfg = config_from_dict({"model": {"source": "hf", "checkpoint": str(missing)},
                            "tokenizer": {"kind": "pretrained"}, "mesh": {"fsdp": 8}})
    with pytest.raises(ConfigError, match=r"model\.checkpoint.*no_such_dir.*config\.json"):
        dry_run(cfg, num_devices=8)
    cfg = config_from_dict({"model": {"source": "hf", "checkpoint": str(missing),
                                      "preset": "mistral_7b"},
                            "tokenizer": {"kind": "pretrained"}, "mesh": {"fsdp": 8}})
    report = dry_run(cfg, num_devices=8)
    assert f"checkpoint directory {missing} not found: sizes from preset mistral_7b" \
        in format_dry_run(report)


def test_task_counts(tmp_path):
    def tasks(data):
        report = dry_run(_config(data=data), num_devices=8)
        return report.num_tasks, report.tasks_known

    assert tasks({"synthetic": {"cluster_sizes": [3, 2], "n_unique": 1, "n_noise": 4}}) == (10, True)
    assert tasks({"source": "bigbench", "bigbench": {"tasks": ["navigate", "snarks"]}}) == (2, True)
    assert tasks({"source": "bigbench", "bigbench": {"max_tasks": 7}}) == (7, True)
    assert tasks({"source": "bigbench"}) == (PLANNING_TASKS, False)
    hub = [{"path": "a/b"}, {"path": "c/d", "name": "x"}, {"path": "e/f"}]
    held = [{"path": "g/h"}]  # source hub needs held-out data (the plan does not count it)
    assert tasks({"source": "hub", "hub": {"train": hub, "heldout": held}}) == (3, True)
    assert tasks({"source": "hub", "hub": {"train": [{"path": "a/b", "task_column": "task"}],
                                           "heldout": held}}) == (PLANNING_TASKS, False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = '{"prompt": "p", "target": "t"}\n'
    (tmp_path / "a.jsonl").write_text(row)
    (tmp_path / "c.jsonl").write_text(row * 2)
    pq.write_table(pa.table({"prompt": ["p"], "target": ["t"]}), tmp_path / "b.parquet")
    (tmp_path / "README.md").write_text("not a task file")
    held = str(tmp_path / "bbh")
    files = {"source": "files", "files": {"path": str(tmp_path), "heldout_path": held}}
    assert tasks(files) == (3, True)  # no file has a task column: one task per file
    # A FLAN-style shard with a task column holds any number of tasks: unknown until read.
    pq.write_table(pa.table({"prompt": ["p"], "target": ["t"], "task": ["x"]}),
                   tmp_path / "d.parquet")
    assert tasks(files) == (max(PLANNING_TASKS, 4), False)
    (tmp_path / "d.parquet").unlink()
    (tmp_path / "e.jsonl").write_text('{"prompt": "p", "target": "t", "task": "y"}\n')
    assert tasks(files) == (max(PLANNING_TASKS, 4), False)
    report = dry_run(_config(data={"source": "files", "files": {"path": str(tmp_path / "x"),
                                                                "heldout_path": held}}),
                     num_devices=8)
    assert f"planning with T = {PLANNING_TASKS}" in format_dry_run(report)


def test_unknown_memory_means_no_fit_check_and_full_rounds():
    cfg = _config()
    report = dry_run(cfg, num_devices=8)
    if report.device_memory is None:  # CPU devices do not report a limit
        assert report.fits and "fit: not checked" in format_dry_run(report)
        assert report.max_adapters_per_round == report.num_tasks
        assert report.max_probe_adapter_chunk == report.num_tasks + 1


def test_steps_and_finetune_counts():
    cfg = _config(seeds=[0, 1, 2], mixture={"methods": ["uniform", "taskpgm_jsd"]},
                  single_task={"steps": 40}, finetune={"steps": 30})
    report = dry_run(cfg, num_devices=8)
    assert report.single_task_finetunes == report.num_tasks
    assert report.mixture_finetunes == 6
    assert report.stage("single_task").steps == 40
    assert report.stage("mixture_finetune").steps == 6 * 30
    rounds = dry_run(_config(single_task={"steps": 40, "adapters_per_round": 5}), num_devices=8)
    assert rounds.stage("single_task").steps == 40 * -(-rounds.num_tasks // 5)
    text = format_dry_run(report)
    assert "6 mixture fine-tunes (2 methods x 3 seeds)" in text


def test_bfloat16_master_weights_are_flagged():
    report = dry_run(_hf_7b("qwen2_7b", model={"source": "preset", "preset": "qwen2_7b",
                                               "param_dtype": "bfloat16"}), num_devices=8)
    assert any("float32 master weights" in n for n in report.notes)
    np.testing.assert_equal(report.base_params, PUBLISHED_PARAM_COUNTS["qwen2_7b"])


def test_cudnn_attention_drops_the_score_matrices_from_the_plan():
    # Llama-2-7B at seq 1024 with remat: the recomputed layer and its gradient (2 layers) hold
    # the S x S scores and probabilities of all 32 heads; flash attention holds a bias row and
    # the log-sum-exp instead.
    dot = _hf_7b("llama2_7b", memory_gb=16)
    flash = _hf_7b("llama2_7b", memory_gb=16, attention_impl="cudnn")
    a, b = dry_run(dot, num_devices=8), dry_run(flash, num_devices=8)
    n, s, c = 32, 1024, 2  # heads, seq_len, bf16
    rows = dot.finetune.batch_size // dot.finetune.grad_accum // 8  # batch over fsdp = 8
    saved = 2 * rows * s * ((8 + c) * n * s - (c * s + 4 * n))
    act_a = a.stage("mixture_finetune").part("activations").per_device
    act_b = b.stage("mixture_finetune").part("activations").per_device
    assert act_a - act_b == pytest.approx(saved, rel=1e-6)
    assert "attention cudnn" in format_dry_run(b) and "attention dot" in format_dry_run(a)
    # The probe does not fit in 16 GiB, its activations (the scores) the largest part: the
    # advice names the switch, unless it is already on.
    probe_a = next(o for o in a.over if o.startswith("probe:"))
    assert "model.attention_impl=cudnn" in probe_a and "or chunked elsewhere" in probe_a
    assert not any("attention_impl" in o for o in b.over)
    # Chunked, 512 keys a step (two steps at seq 1024): one step's scores, two running outputs.
    chunked = dry_run(_hf_7b("llama2_7b", memory_gb=16, attention_impl="chunked"), num_devices=8)
    act_c = chunked.stage("mixture_finetune").part("activations").per_device
    h = 128
    assert act_a - act_c == pytest.approx(
        2 * rows * s * ((8 + c) * n * s - ((8 + c) * n * 512 + 4 * n * h * 2)), rel=1e-6)


def test_loss_chunk_plans_one_chunk_of_training_logits():
    # Qwen2-7B (V = 152064) at seq 1024: the training logits are the largest part; chunked, a
    # step holds 128 positions of each row's logits, and the forward-only stages all of them.
    full = dry_run(_hf_7b("qwen2_7b", memory_gb=16), num_devices=8)
    chunked = dry_run(_hf_7b("qwen2_7b", memory_gb=16, loss_chunk=128), num_devices=8)
    rows = full.config.finetune.batch_size // full.config.finetune.grad_accum // 8
    v = 152064
    train_full = full.stage("mixture_finetune").part("logits")
    train_chunked = chunked.stage("mixture_finetune").part("logits")
    assert train_full.per_device == rows * 1024 * 3 * 4 * v
    assert train_chunked.per_device == rows * 128 * 3 * 4 * v
    assert "128-position chunks" in train_chunked.name
    assert chunked.stage("probe").part("logits") == full.stage("probe").part("logits")
    assert "loss_chunk 128" in format_dry_run(chunked)
    # One adapter of 4 rows per device in 6 GiB: the training logits are the largest part of a
    # stage that does not fit, and the advice names the setting (seq_len / 8).
    tight = dry_run(_hf_7b("qwen2_7b", memory_gb=6,
                           single_task={"adapters_per_round": 1, "batch_size": 32}), num_devices=8)
    single = next(o for o in tight.over if o.startswith("single_task:"))
    assert "model.loss_chunk=128" in single


def test_probe_plans_one_copy_of_the_raw_logits():
    # eval/score.py scores the raw logits (from_logits=True): no log-softmax copy is stored.
    report = dry_run(_config(probe={"adapter_chunk": 4, "batch_size": 8}), num_devices=8)
    t, probe = report.num_tasks, report.stage("probe")
    logits = (t + 1) * (8 // 4) * 32 * (384 // 2) * 4  # rows over data x fsdp, vocab over tensor
    held = [p for p in probe.parts if "logit" in p.name or "softmax" in p.name]
    assert [p.per_device for p in held] == [logits]
    assert [p.name.split(" (")[0] for p in probe.parts] == [
        "base params", f"{t} adapters", "logits", "activations: 4 model(s) x 2 row(s) x 32 tokens",
        "gathered weights"]  # this mesh has fsdp 2


@pytest.mark.parametrize("mesh, dtype, part", [
    ({"data": 8, "fsdp": 1, "tensor": 1}, "float32", None),
    ({"data": 8, "fsdp": 1, "tensor": 1}, "bfloat16", "cast weights"),
    ({"data": 4, "fsdp": 1, "tensor": 2}, "bfloat16", "cast weights"),
    ({"data": 4, "fsdp": 2, "tensor": 1}, "float32", "gathered weights"),
])
def test_gathered_weights_only_with_fsdp_and_cast_weights_only_across_dtypes(mesh, dtype, part):
    report = dry_run(_config(mesh=mesh, model={**SMALL["model"], "dtype": dtype}), num_devices=8)
    # One SMALL layer by hand: q, o 64 x 64; k, v 64 x 32; gate, up, down 64 x 96; two norms.
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64
    head, embed = 384 * 64, 384 * 64 * 4  # V x D; the float32 embedding table
    tensor, c = mesh["tensor"], 2 if dtype == "bfloat16" else 4
    expected = {"cast weights": (layer // tensor + head // tensor) * c,
                "gathered weights": 2 * layer * c // tensor + embed}
    # Every stage runs the model's forward: the probe and eval forwards gather / cast too.
    for name in ("pretrain", "single_task", "mixture_finetune", "probe", "eval"):
        stage = report.stage(name)
        found = [p for p in stage.parts if p.name.endswith("in compute dtype)")
                 or "weights (" in p.name]
        if part is None:
            assert not found, (name, [p.name for p in found])
        else:
            assert [(p.name.split(" (")[0], p.per_device) for p in found] == \
                [(part, expected[part])]


DEMO = str(Path(__file__).parents[2] / "experiments" / "configs" / "demo.yaml")


def test_impossible_synthetic_suites_are_refused_at_load_by_key(rng, capsys):
    """More clusters + unique tasks than the suite has skills (10), or fewer than two tasks:
    refused by the config (and so by --dry-run), naming the keys, not by the data stage."""
    n_clusters = int(rng.integers(1, 11))
    sizes = [int(s) for s in rng.integers(1, 5, size=n_clusters)]
    n_unique = 11 - n_clusters + int(rng.integers(0, 90))  # always one skill too many or more
    over = [f"data.synthetic.cluster_sizes={sizes}", f"data.synthetic.n_unique={n_unique}"]
    assert main(["run", DEMO, "--dry-run", "--devices", "1", *over]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'data.synthetic.n_unique'" in err
    assert "'data.synthetic.cluster_sizes'" in err
    assert f"need {n_clusters + n_unique} skills" in err
    for bad in (["data.synthetic.cluster_sizes=[4,4,4,4,4,4,4,4,4,4]"],
                ["data.synthetic.n_unique=100"]):
        with pytest.raises(ConfigError, match=r"'data\.synthetic\.n_unique'.*skills"):
            load_config(DEMO, bad)
    with pytest.raises(ConfigError, match=r"'data\.synthetic\.n_noise'.*1 task"):
        load_config(DEMO, ["data.synthetic={cluster_sizes: [1], n_unique: 0, n_noise: 0}"])
    # At the limit: ten skills and two tasks are a suite.
    k = int(rng.integers(1, 10))
    cfg = load_config(DEMO, [f"data.synthetic.cluster_sizes={[1] * k}",
                             f"data.synthetic.n_unique={10 - k}"])
    assert len(cfg.data.synthetic.cluster_sizes) + cfg.data.synthetic.n_unique == 10
    load_config(DEMO, ["data.synthetic={cluster_sizes: [1], n_unique: 0, n_noise: 1}"])
