"""Config values: every impossible one is refused at load time, naming its dotted key, so a run
and `--dry-run` stop before any work; numbers in the forms people write them are accepted."""

import re

import pytest

from taskpgm_jax.cli import main
from taskpgm_jax.config import ConfigError, load_config
from tests.pipeline.test_pipeline import DEMO

BAD = [
    ("lora.rank=0", "lora.rank"), ("lora.alpha=-1", "lora.alpha"),
    ("lora.targets=[]", "lora.targets"), ("lora.targets=[qproj]", "lora.targets"),
    ("probe.batch_size=0", "probe.batch_size"), ("eval.batch_size=0", "eval.batch_size"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("tokenizer.vocab_size=-5", "tokenizer.vocab_size"),
    ("model.size={hidden_size: 0}", "model.size.hidden_size"),
    ("model.pretrain.steps=0", "model.pretrain.steps"),
    ("model.pretrain.learning_rate=0", "model.pretrain.learning_rate"),
    ("model.pretrain.batch_size=-1", "model.pretrain.batch_size"),
    ("single_task.warmup_steps=-1", "single_task.warmup_steps"),
    ("finetune.weight_decay=-0.1", "finetune.weight_decay"),
    ("mrf.beta=0", "mrf.beta"), ("mrf.beta=.nan", "mrf.beta"), ("mrf.lam=.inf", "mrf.lam"),
    ("mrf.lam=0", "mrf.lam"), ("mrf.ridge=-1", "mrf.ridge"), ("mrf.jsd_tau=0", "mrf.jsd_tau"),
    ("mrf.select_tasks=0", "mrf.select_tasks"), ("mrf.select_lam=-1", "mrf.select_lam"),
    ("mixture.temperature_tau=0", "mixture.temperature_tau"),
    ("mixture.methods=[uniform, uniform]", "mixture.methods"),
    ("data.synthetic.examples=[300, 150]", "data.synthetic.examples"),
    ("data.synthetic.examples=[0, 10]", "data.synthetic.examples"),
    ("data.synthetic.cluster_sizes=[5]", "data.synthetic.cluster_sizes"),
    ("data.synthetic.n_noise=-1", "data.synthetic.n_noise"),
    ("data.synthetic.heldout_examples=0", "data.synthetic.heldout_examples"),
    ("data.max_examples_per_task=0", "data.max_examples_per_task"),
    ("probe.max_examples_per_task=0", "probe.max_examples_per_task"),
    ("eval.max_examples_per_task=-3", "eval.max_examples_per_task"),
    ("mesh.device_memory_gb=0", "mesh.device_memory_gb"),
    # Wrong types of optional keys (these once crashed with a TypeError).
    ("mrf.lam=abc", "mrf.lam"), ("data.bigbench.tasks=navigate", "data.bigbench.tasks"),
    ("single_task.steps=2.5", "single_task.steps"),
    # Seeds outside NumPy's range once failed only when a stage drew with them.
    ("seeds=[-1]", "seeds"), ("seeds=[4294967296]", "seeds"),
    ("data.synthetic.seed=-1", "data.synthetic.seed"),
    ("data.split_seed=-1", "data.split_seed"),
    # A warmup longer than the run was silently cut to the run's length (demo: 150 steps).
    ("single_task.warmup_steps=151", "single_task.warmup_steps"),
    ("finetune.warmup_steps=1000", "finetune.warmup_steps"),
    # Unknown or missing hub dataset fields once passed the checks and crashed the run.
    ("data.hub.train=[{path: x, foo: 1}]", "data.hub.train[0].foo"),
    ("data.hub.heldout=[{name: x}]", "data.hub.heldout[0].path"),
    ("model.attention_impl=flash", "model.attention_impl"),
    ("model.loss_chunk=0", "model.loss_chunk"),
    ("model.attention_impl=cudnn", "model.attention_impl"),  # the demo computes in float32
]


@pytest.mark.parametrize("override, key", BAD, ids=[b[0] for b in BAD])
def test_impossible_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}'"):
        load_config(DEMO, [override])


@pytest.mark.parametrize("overrides, setting", [
    (["tokenizer.path=/x"], "tokenizer.kind is 'bpe'"),
    (["model.checkpoint=/x"], "model.source is 'scratch'"),
    (["model.preset=llama2_7b"], "model.source is 'scratch'"),
    (["mrf.jsd_tau=0.1"], "mrf.jsd_affinity is 'linear'"),
])
def test_keys_the_chosen_variant_ignores_are_refused(overrides, setting):
    key = overrides[-1].split("=")[0]  # the last override is the unused key
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}': unused because "
                                          f"{re.escape(setting)}"):
        load_config(DEMO, overrides)


def test_the_same_keys_are_accepted_where_they_are_used():
    cfg = load_config(DEMO, ["mrf.jsd_affinity=rbf", "mrf.jsd_tau=0.1", "seeds=[0, 4294967295]",
                             "single_task.warmup_steps=150",
                             "data.hub.train=[{path: x, name: y, split: test}]"])
    assert cfg.mrf.jsd_tau == 0.1 and cfg.seeds == (0, 2**32 - 1)
    assert cfg.single_task.warmup_steps == cfg.single_task.steps


def test_dry_run_refuses_at_load_time(capsys):
    assert main(["run", str(DEMO), "--dry-run", "probe.batch_size=0"]) == 2
    assert "probe.batch_size" in capsys.readouterr().err


def test_numbers_as_written(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string; whole numbers in float form are fine for ints.
    cfg = load_config(DEMO, ["finetune.learning_rate=1e-3", "single_task.steps=1e2",
                             "mrf.lam=2e1", "probe.max_examples_per_task=6.0"])
    assert cfg.finetune.learning_rate == 1e-3 and cfg.single_task.steps == 100
    assert cfg.mrf.lam == 20.0 and cfg.probe.max_examples_per_task == 6
    assert type(cfg.single_task.steps) is int
    path = tmp_path / "c.yaml"
    path.write_text(DEMO.read_text().replace("temperature_tau: 2.0", "temperature_tau: 5e-1"))
    assert load_config(path).mixture.temperature_tau == 0.5


def test_attention_and_loss_chunk_reach_the_model_and_stay_out_of_the_stage_keys():
    import dataclasses

    from taskpgm_jax.config import ATTENTION_IMPLS, config_hash, results_view, to_dict
    from taskpgm_jax.models.config import ATTENTION_IMPLS as MODEL_IMPLS
    from taskpgm_jax.pipeline.inputs import scratch_config

    assert ATTENTION_IMPLS == MODEL_IMPLS
    cfg = load_config(DEMO, ["model.attention_impl=xla", "model.loss_chunk=16"])
    assert scratch_config(cfg.model, 300).attention_impl == "xla"
    assert cfg.model.loss_chunk == 16
    # The key of the model section is the hash of every other field: what it was before these
    # fields existed, and the same for every attention_impl and loss_chunk.
    others = {f.name: to_dict(getattr(cfg.model, f.name)) for f in dataclasses.fields(cfg.model)
              if f.name not in ("attention_impl", "loss_chunk")}
    assert config_hash(results_view(cfg.model)) == config_hash(others)
    assert config_hash(results_view(load_config(DEMO).model)) == config_hash(others)
    assert config_hash(results_view(load_config(DEMO, ["model.seq_len=72"]).model)) \
        != config_hash(others)
    cudnn = load_config(DEMO, ["model.dtype=bfloat16", "model.attention_impl=cudnn"])
    assert cudnn.model.attention_impl == "cudnn"
