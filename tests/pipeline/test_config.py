"""Config values: every impossible one is refused at load time, naming its dotted key, so a run
and `--dry-run` stop before any work; numbers in the forms people write them are accepted."""

import dataclasses
import re

import pytest
import yaml

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
    # A zero eval fraction was reported as 'data.probe_fraction'.
    ("data.eval_fraction=0", "data.eval_fraction"),
    ("data.probe_fraction=-0.1", "data.probe_fraction"),
]


@pytest.mark.parametrize("override, key, allowed", [
    ("mrf.solver=newton", "mrf.solver", "'exact', 'closed_form', 'softmax'"),
    ("mrf.unary=degree", "mrf.unary", "'centrality', 'utility'"),
    ("mrf.jsd_affinity=1", "mrf.jsd_affinity", "'linear', 'rbf'"),  # YAML reads 1 as an int
    ("model.attention_impl=Dot", "model.attention_impl", "'dot', 'chunked', 'xla', 'cudnn'"),
])
def test_a_string_option_outside_its_choices_lists_them(override, key, allowed, tmp_path):
    msg = f"config key '{re.escape(key)}': must be one of {re.escape(allowed)}, got"
    with pytest.raises(ConfigError, match=msg):
        load_config(DEMO, [override])
    # The same in a file, and for a config built in Python (no YAML conversion: the validator).
    section, field = key.split(".")
    value = override.split("=")[1]
    doc = yaml.safe_load(DEMO.read_text())
    doc.setdefault(section, {})[field] = yaml.safe_load(value)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=msg):
        load_config(path)
    cfg = load_config(DEMO)
    bad = dataclasses.replace(getattr(cfg, section), **{field: value})
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}'"):
        dataclasses.replace(cfg, **{section: bad})


def test_the_config_types_its_string_options_as_the_library_does():
    import typing

    from taskpgm_jax import config
    from taskpgm_jax.models.config import AttentionImpl
    from taskpgm_jax.mrf.affinity import AffinityKind
    from taskpgm_jax.mrf.energy import UnaryKind
    from taskpgm_jax.mrf.solve import SolveMethod

    for ours, theirs in ((config.AttentionImpl, AttentionImpl), (config.SolveMethod, SolveMethod),
                         (config.UnaryKind, UnaryKind), (config.AffinityKind, AffinityKind)):
        assert typing.get_args(ours) == typing.get_args(theirs)


def test_an_empty_bigbench_task_list_is_refused():
    # It once meant every task (an empty list is falsy), the opposite of what it says.
    with pytest.raises(ConfigError, match="config key 'data.bigbench.tasks': an empty list"):
        load_config(DEMO, ["data.source=bigbench", "data.bigbench.tasks=[]"])
    cfg = load_config(DEMO, ["data.source=bigbench", "data.bigbench.tasks=[navigate]"])
    assert cfg.data.bigbench.tasks == ("navigate",)

# Sources without held-out data once failed only when the run loaded its data (after --dry-run
# had accepted them).
NO_HELDOUT = [(["data.source=files", "data.files.path=/x"], "data.files.heldout_path"),
              (["data.source=hub", "data.hub.train=[{path: x}]"], "data.hub.heldout")]


@pytest.mark.parametrize("override, key", BAD, ids=[b[0] for b in BAD])
def test_impossible_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}'"):
        load_config(DEMO, [override])


@pytest.mark.parametrize("overrides, key", NO_HELDOUT, ids=[k for _, k in NO_HELDOUT])
def test_a_source_without_heldout_data_is_refused_at_load_time(overrides, key, capsys):
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}': source"):
        load_config(DEMO, overrides)
    assert main(["run", str(DEMO), "--dry-run", *overrides]) == 2
    assert key in capsys.readouterr().err


def test_fractions_summing_to_one_name_both_keys():
    with pytest.raises(ConfigError, match=r"'data.probe_fraction' and 'data.eval_fraction': must "
                                          r"sum to less than 1.*0.5 \+ 0.5"):
        load_config(DEMO, ["data.probe_fraction=0.5", "data.eval_fraction=0.5"])


@pytest.mark.parametrize("overrides, setting", [
    (["tokenizer.path=/x"], "tokenizer.kind is 'bpe'"),
    (["model.checkpoint=/x"], "model.source is 'scratch'"),
    (["model.preset=llama2_7b"], "model.source is 'scratch'"),
    (["mrf.jsd_tau=0.1"], "mrf.jsd_affinity is 'linear'"),
    # The sections of the sources not chosen (the demo's is synthetic).
    (["data.files.path=/x"], "data.source is 'synthetic'"),
    (["data.files.task_column=name"], "data.source is 'synthetic'"),
    (["data.bigbench.max_tasks=3"], "data.source is 'synthetic'"),
    (["data.hub.heldout=[{path: x}]"], "data.source is 'synthetic'"),
    (["data.source=bigbench", "data.hub.train=[{path: x}]"], "data.source is 'bigbench'"),
    (["data.source=hub", "data.hub.train=[{path: x}]", "data.hub.heldout=[{path: y}]",
      "data.bigbench.heldout=[navigate]"], "data.source is 'hub'"),
])
def test_keys_the_chosen_variant_ignores_are_refused(overrides, setting):
    key = overrides[-1].split("=")[0]  # the last override is the unused key
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}': unused because "
                                          f"{re.escape(setting)}"):
        load_config(DEMO, overrides)


def test_finetune_adapters_per_round_is_refused():
    # Only single_task trains adapters side by side; the mixture fine-tunes never read it.
    with pytest.raises(ConfigError, match=r"config key 'finetune.adapters_per_round': unused.*"
                                          r"remove finetune.adapters_per_round"):
        load_config(DEMO, ["finetune.adapters_per_round=2"])
    assert load_config(DEMO, ["single_task.adapters_per_round=2"]).single_task \
        .adapters_per_round == 2


def test_the_same_keys_are_accepted_where_they_are_used():
    cfg = load_config(DEMO, ["mrf.jsd_affinity=rbf", "mrf.jsd_tau=0.1", "seeds=[0, 4294967295]",
                             "single_task.warmup_steps=150", "data.source=hub",
                             "data.hub.train=[{path: x, name: y, split: test}]",
                             "data.hub.heldout=[{path: z}]"])
    assert cfg.mrf.jsd_tau == 0.1 and cfg.seeds == (0, 2**32 - 1)
    assert cfg.single_task.warmup_steps == cfg.single_task.steps
    files = load_config(DEMO, ["data.source=files", "data.files.path=/x",
                               "data.files.heldout_path=/y", "data.files.task_column=name"])
    assert files.data.files.task_column == "name"
    assert load_config(DEMO, ["data.source=bigbench", "data.bigbench.max_tasks=3"]) \
        .data.bigbench.max_tasks == 3


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
    # fields existed, and the same for every attention_impl and loss_chunk (the demo leaves
    # remat at its default, which the view keeps).
    assert not cfg.model.remat
    others = {f.name: to_dict(getattr(cfg.model, f.name)) for f in dataclasses.fields(cfg.model)
              if f.name not in ("attention_impl", "loss_chunk")}
    assert config_hash(results_view(cfg.model)) == config_hash(others)
    assert config_hash(results_view(load_config(DEMO).model)) == config_hash(others)
    assert config_hash(results_view(load_config(DEMO, ["model.seq_len=72"]).model)) \
        != config_hash(others)
    cudnn = load_config(DEMO, ["model.dtype=bfloat16", "model.attention_impl=cudnn"])
    assert cudnn.model.attention_impl == "cudnn"


def test_hub_entries_reach_the_loader_as_written(tmp_path, rng):
    """Nested mappings in a hub entry (data_files, columns) reach `datasets` as the dicts the
    user wrote, not as frozen pairs (which crashed `load_dataset`). 200 rows per task: with 40,
    a task's hashed probe split (10%) came out empty for ~3% of random seeds."""
    import json

    import yaml

    from taskpgm_jax.config import config_from_dict, dump_config, hub_specs
    from taskpgm_jax.pipeline.inputs import load_pools

    rows = {}
    for part in ("pool", "held"):
        names = [f"{part}{i}" for i in range(int(rng.integers(2, 4)))]
        rows[part] = [{"name": names[i % len(names)], "q": f"q{i} {rng.integers(1 << 30)}",
                       "a": f"a{rng.integers(9)}"} for i in range(200 * len(names))]
        with open(tmp_path / f"{part}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[part])

    def entry(part):
        return {"path": "json", "data_files": {"train": [str(tmp_path / f"{part}.jsonl")]},
                "task_column": "name", "columns": {"prompt": "q", "target": "a"},
                "cache_dir": str(tmp_path / "hf")}

    cfg = config_from_dict({"data": {"source": "hub", "hub": {"train": [entry("pool")],
                                                              "heldout": [entry("held")]}}})
    assert hub_specs(cfg.data.hub.train) == [entry("pool")]
    # The run directory's config.yaml keeps the nested ones as mappings: reloaded, the same
    # config (they once came back as lists of pairs).
    reloaded = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert hub_specs(reloaded.data.hub.train) == [entry("pool")] and reloaded == cfg
    pools = load_pools(cfg.data)
    for pool, part in ((pools.train, "pool"), (pools.heldout, "held")):
        want = {}
        for r in rows[part]:
            want.setdefault(r["name"], []).append(r["q"])
        assert {n: pool[n].examples["prompt"] for n in pool.names} == want


def test_memory_only_settings_stay_out_of_the_stage_keys(rng):
    """remat, checkpoint_every and adapters_per_round decide memory and when to save, never what
    is trained: the base, single_task and finetune keys ignore them, and still follow a setting
    that changes results."""
    import dataclasses

    from taskpgm_jax.config import config_hash, finetune_view, results_view, to_dict
    from taskpgm_jax.pipeline.run import finetune_key, single_task_key

    tok, data = f"tok{rng.integers(1 << 30)}", f"data{rng.integers(1 << 30)}"
    weights = {"a": float(rng.random()), "b": float(rng.random())}
    seed = int(rng.integers(100))

    def keys(overrides):
        cfg = load_config(DEMO, overrides)
        base = config_hash(results_view(cfg.model), tok, data)  # as run_pipeline hashes it
        return (base, single_task_key(cfg, base, data),
                finetune_key(cfg, weights, seed, base, data))

    ref = keys([])
    # A config that leaves these settings at their defaults keeps the keys of the versions that
    # hashed them (the formulas run_pipeline used before), so its run directory resumes.
    cfg = load_config(DEMO)
    old_base = config_hash({f.name: to_dict(getattr(cfg.model, f.name)) for f in dataclasses.fields(
        cfg.model) if f.name not in ("attention_impl", "loss_chunk")}, tok, data)
    old_single = config_hash(dataclasses.replace(cfg.single_task, adapters_per_round=None),
                             cfg.lora, old_base, data, cfg.model.seq_len)
    old_ft = config_hash(cfg.finetune, cfg.lora if cfg.finetune.trainable == "lora" else None,
                         sorted(weights.items()), cfg.mixture.budget, seed, old_base, data,
                         cfg.model.seq_len)
    assert ref == (old_base, old_single, old_ft)
    every = int(rng.integers(1, 1000))
    for same in (["model.remat=true"], [f"single_task.checkpoint_every={every}"],
                 [f"finetune.checkpoint_every={every}"],
                 [f"single_task.adapters_per_round={int(rng.integers(1, 9))}"]):
        assert keys(same) == ref, same
    base, single, ft = keys(["model.seq_len=72"])
    assert base != ref[0] and single != ref[1] and ft != ref[2]
    lr = f"{float(rng.uniform(1e-4, 1e-2))!r}"
    st = keys([f"single_task.learning_rate={lr}"])
    assert st[0] == ref[0] and st[1] != ref[1] and st[2] == ref[2]
    fl = keys([f"finetune.learning_rate={lr}"])
    assert fl[:2] == ref[:2] and fl[2] != ref[2]
    # finetune.adapters_per_round is refused at load; the key would ignore it all the same.
    ft = load_config(DEMO).finetune
    assert finetune_view(dataclasses.replace(ft, adapters_per_round=4)) == finetune_view(ft)


def test_heldout_files_take_their_own_column_mapping(tmp_path, rng):
    """A pool whose files carry an `idx` column and a held-out suite without it: one mapping
    for both is refused by name (the held-out files lack the column); heldout_columns maps
    the held-out files on their own."""
    import json

    from taskpgm_jax.config import config_from_dict
    from taskpgm_jax.data import DataError
    from taskpgm_jax.pipeline.inputs import load_pools

    for part, extra in (("pool", True), ("held", False)):
        (tmp_path / part).mkdir()
        for t in range(2):
            with open(tmp_path / part / f"{part}{t}.jsonl", "w") as f:
                # 200 rows: with 40, a task's 10% hashed probe split was empty for ~1% of seeds.
                for i in range(200):
                    row = {"q": f"q{t} {i} {rng.integers(1 << 30)}", "a": f"a{rng.integers(9)}"}
                    f.write(json.dumps({**row, "idx": f"{part}{t}-{i}"} if extra else row) + "\n")
    files = {"path": str(tmp_path / "pool"), "heldout_path": str(tmp_path / "held"),
             "columns": {"prompt": "q", "target": "a", "id": "idx"}}
    cfg = config_from_dict({"data": {"source": "files", "files": files}})
    with pytest.raises(DataError, match=r"held0.jsonl.*names a column that is not there"):
        load_pools(cfg.data)
    cfg = config_from_dict({"data": {"source": "files", "files": {
        **files, "heldout_columns": {"prompt": "q", "target": "a"}}}})
    pools = load_pools(cfg.data)
    assert sorted(pools.heldout.names) == ["held0", "held1"]
    ids = [i for name in pools.train.names for split in ("train", "probe", "eval")
           for i in getattr(pools.train, split)(name)["id"]]
    assert sorted(ids) == sorted(f"pool{t}-{i}" for t in range(2) for i in range(200))


def test_load_pools_checks_a_data_config_built_in_code(tmp_path):
    """`load_pools` takes a DataConfig that never went through a config file: the same check."""
    from taskpgm_jax.config import DataConfig, FilesData
    from taskpgm_jax.pipeline.inputs import load_pools

    with pytest.raises(ConfigError, match="config key 'data.files.heldout_path': source 'files'"):
        load_pools(DataConfig(source="files", files=FilesData(path=str(tmp_path))))


def _bigbench_config_archive(tmp_path, rng):
    """A fixture BIG-bench archive whose tasks are large enough for the default splits."""
    from tests.data.test_bigbench import _build_archive, _gen_task, _mc_task

    tasks = {n: _mc_task(rng, n, 60) for n in ("navigate", "snarks", "anachronisms",
                                              "logical_deduction/three_objects",
                                              "logical_deduction/five_objects")}
    tasks.update({n: _gen_task(rng, n, 60) for n in ("word_sorting", "tense")})
    tasks["logical_deduction"] = {"name": "logical_deduction", "keywords": ["logic"]}
    return _build_archive(tmp_path / "bigbench-1.0.0.tar.gz", tasks), tasks


def test_bigbench_a_task_named_in_both_lists_is_refused(tmp_path, rng):
    """A training task that was also held out was dropped from the pool without a word, so the
    overlap check never fired for BIG-bench. Named in both lists it is refused; a suite (tasks
    left out: every JSON task) still leaves out what is held out, as documented."""
    from taskpgm_jax.config import BigbenchData, DataConfig
    from taskpgm_jax.pipeline.inputs import load_pools

    archive, tasks = _bigbench_config_archive(tmp_path, rng)
    leaves = sorted(p for p, d in tasks.items() if d.get("examples"))
    plain = [p for p in leaves if "/" not in p]

    def pools(**kw):
        # 30% probe examples: at the default 10% a 60-example task's hashed probe split is
        # empty for 0.2% of seeds, and these pools hold up to 7 of them.
        return load_pools(DataConfig(source="bigbench", probe_fraction=0.3,
                                     bigbench=BigbenchData(archive=str(archive), **kw)))

    named = [str(p) for p in rng.choice(plain, size=int(rng.integers(3, len(plain) + 1)),
                                        replace=False)]
    both = str(rng.choice(named))
    rest = [p for p in plain if p not in named]
    held = [both, *rest[:int(rng.integers(0, len(rest) + 1))]]
    with pytest.raises(ConfigError, match=re.escape(
            f"config key 'data.bigbench.tasks': {both} is held out (data.bigbench.heldout); "
            "remove it from one of the two")):
        pools(tasks=tuple(named), heldout=tuple(held))
    # A container stands for all its sub-tasks: holding out one of them is an overlap too.
    sub = str(rng.choice(["logical_deduction/three_objects", "logical_deduction/five_objects"]))
    with pytest.raises(ConfigError, match=re.escape(
            f"'data.bigbench.tasks': logical_deduction (its sub-tasks {sub}) is held out")):
        pools(tasks=("logical_deduction", *rest[:1], named[0]), heldout=(sub,))
    with pytest.raises(ConfigError, match=re.escape("'data.bigbench.tasks': bbh is held out")):
        pools(tasks=("bbh",), heldout=("bbh",))
    # Every JSON task, less the held-out ones (sorted by name).
    got = pools(heldout=tuple(held))
    assert got.train.names == tuple(sorted(set(leaves) - set(held)))
    assert set(got.heldout.names) == set(held)
    # Disjoint lists load as given.
    disjoint = pools(tasks=tuple(n for n in named if n != both), heldout=(both,))
    assert set(disjoint.train.names) == set(named) - {both}


def test_bigbench_task_lists_name_their_config_key(tmp_path, rng):
    """An empty or mixed-with-bbh held-out list, an unknown name, or a named task without the
    configured keywords: each error names its config key (they used to name none, or say
    "task 'bbh': no such BIG-bench JSON task", or drop the task)."""
    from taskpgm_jax.config import BigbenchData, DataConfig
    from taskpgm_jax.pipeline.inputs import load_pools

    archive, _ = _bigbench_config_archive(tmp_path, rng)

    def pools(**kw):
        # 30% probe examples: at the default 10% a 60-example task's hashed probe split is
        # empty for 0.2% of seeds, and these pools hold up to 7 of them.
        return load_pools(DataConfig(source="bigbench", probe_fraction=0.3,
                                     bigbench=BigbenchData(archive=str(archive), **kw)))

    with pytest.raises(ConfigError, match=r"config key 'data.bigbench.heldout': an empty list "
                                          r"selects no task; leave it out for the default"):
        pools(heldout=())
    other = str(rng.choice(["word_sorting", "tense", "anachronisms"]))
    mixed = ["bbh", other][::int(rng.choice([1, -1]))]
    with pytest.raises(ConfigError, match=r"config key 'data.bigbench.heldout': 'bbh' names the "
                                          r"whole suite and must stand alone"):
        pools(heldout=tuple(mixed))
    with pytest.raises(ConfigError, match=r"config key 'data.bigbench.tasks': 'bbh' names the "
                                          r"whole suite"):
        pools(tasks=tuple(mixed), heldout=("snarks",))
    unknown = f"no_such_{rng.integers(1000)}"
    with pytest.raises(ConfigError, match=rf"config key 'data.bigbench.heldout': .*task "
                                          rf"'{unknown}': no such BIG-bench JSON task"):
        pools(heldout=(unknown,))
    gen = str(rng.choice(["word_sorting", "tense"]))  # no "kw_mc" keyword
    with pytest.raises(ConfigError, match=rf"config key 'data.bigbench.tasks' / "
                                          rf"'data.bigbench.keywords': .*lack keywords "
                                          rf"\['kw_mc'\]: {gen} "):
        pools(tasks=("navigate", gen, "anachronisms"), keywords=("kw_mc",), heldout=("snarks",))


def test_heldout_tasks_with_a_metric_evaluate_cannot_compute_are_refused_at_load(tmp_path, rng):
    """A held-out BIG-bench task preferring bleu (say) would only fail in the eval stage, after
    all the training: load_pools refuses it, naming the config key and the task."""
    from taskpgm_jax.config import BigbenchData, DataConfig
    from taskpgm_jax.pipeline.inputs import load_pools
    from tests.data.test_bigbench import _build_archive, _gen_task, _mc_task

    tasks = {n: _mc_task(rng, n, 60) for n in ("navigate", "snarks", "anachronisms")}
    metric = str(rng.choice(["bleu", "rouge", "log_likelihood"]))
    tasks["tense"] = _gen_task(rng, "tense", 60, preferred_score=metric)
    tasks["word_sorting"] = _gen_task(rng, "word_sorting", 60)  # exact_str_match: computed
    archive = _build_archive(tmp_path / "bigbench-1.0.0.tar.gz", tasks)

    def pools(heldout):
        # 20% probe examples: at the default 10%, 60 examples left a task's probe split empty for
        # about 1% of seeds (a DataError, not the one under test).
        return load_pools(DataConfig(source="bigbench", probe_fraction=0.2, bigbench=BigbenchData(
            archive=str(archive), tasks=("navigate", "snarks", "anachronisms"), heldout=heldout)))

    with pytest.raises(ConfigError, match=re.escape(
            f"config key 'data.bigbench.heldout': held-out task(s) with a metric the evaluation "
            f"does not compute: tense (generate, metric '{metric}')")):
        pools(("word_sorting", "tense"))
    assert pools(("word_sorting",)).heldout.names == ("word_sorting",)
