"""The demo pipeline, shrunk: every artifact, resume after kills, reruns of dependants only, and
the clear errors. One uninterrupted run is shared by the tests (module fixture); the others
reuse its compiled shapes."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from taskpgm_jax import config as config_mod
from taskpgm_jax.cli import main
from taskpgm_jax.config import ConfigError, load_config
from taskpgm_jax.data import TaskPool
from taskpgm_jax.mrf import potentials
from taskpgm_jax.pipeline import inputs, run_pipeline, stages
from taskpgm_jax.pipeline.inputs import load_pools
from taskpgm_jax.pipeline.run import hf_base
from taskpgm_jax.train import AdapterTrainer
from tests.mrf.reference import active_set_simplex_qp, energy64

# The shrunk fine-tunes train on 4 rows, which the 8 emulated devices replicate: the trainers say
# so once per shape (a UserWarning meant for real runs, expected here).
pytestmark = pytest.mark.filterwarnings("ignore:a batch of 4 rows does not divide:UserWarning")

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "demo.yaml"
TINY = [
    "seeds=[0, 1]",
    "data.synthetic.cluster_sizes=[2, 2]", "data.synthetic.n_unique=1",
    "data.synthetic.n_noise=1", "data.synthetic.examples=[50, 70]",
    "data.synthetic.heldout_examples=8", "data.probe_fraction=0.15",
    "tokenizer.vocab_size=300",
    ("model.size={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1, head_dim: 16}"),
    "model.seq_len=40", "model.pretrain.steps=8", "model.pretrain.batch_size=8",
    "single_task.steps=6", "single_task.batch_size=4", "single_task.checkpoint_every=2",
    "probe.batch_size=16", "probe.max_examples_per_task=6",
    "mixture.budget=64", "finetune.steps=4", "finetune.batch_size=4",
    "finetune.checkpoint_every=2", "eval.batch_size=8", "eval.max_new_tokens=3",
]
METHODS = ("taskpgm_jsd", "taskpgm_pmi", "greedy", "uniform", "size_proportional", "temperature")


def _tiny(*extra):
    return load_config(DEMO, [*TINY, *extra])


class Lines(list):
    def __call__(self, line):
        self.append(line)

    def ran(self):
        return {ln.split("]")[0][1:] for ln in self if "] done in" in ln}

    def cached(self):
        return {ln.split("]")[0][1:] for ln in self if "] cached" in ln}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "demo"
    lines = Lines()
    results = run_pipeline(_tiny(), run_dir, progress=False, echo=lines)
    return run_dir, results, lines


def _stage_dir(run_dir, label):
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return run_dir / manifest[label]


def test_run_writes_every_artifact_and_consistent_results(finished):
    run_dir, _results, lines = finished
    assert not lines.cached()
    for name in ("results.json", "report.md", "manifest.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    for fig in ("results", "affinity_jsd", "affinity_pmi", "task_graph", "weights", "solver",
                "greedy", "clusters"):
        assert (run_dir / "figures" / f"{fig}.png").stat().st_size > 1000, fig
        assert f"figures/{fig}.png" in report
    assert not list(run_dir.glob("stages/*.partial")), "a finished run leaves no partial stage"
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0 and (run_dir / "report.md").read_text() == report
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["methods"].keys() == set(METHODS) and on_disk["seeds"] == [0, 1]
    # The table is recomputed here from each evaluation's own metrics.json.
    for method in METHODS:
        per_seed = []
        for seed in (0, 1):
            metrics = json.loads((_stage_dir(run_dir, f"eval/{method}/seed{seed}")
                                  / "metrics.json").read_text())
            values = [m["value"] for m in metrics["per_task"].values()]
            assert metrics["aggregate"] == pytest.approx(np.mean(values))
            assert set(metrics["per_task"]) == set(on_disk["eval_tasks"])
            per_seed.append(metrics["aggregate"])
        entry = on_disk["methods"][method]
        assert entry["seeds"] == pytest.approx(per_seed)
        assert entry["mean"] == pytest.approx(np.mean(per_seed))
        assert entry["std"] == pytest.approx(np.std(per_seed, ddof=1))
        if method != "uniform":
            diff = np.subtract(per_seed, on_disk["methods"]["uniform"]["seeds"])
            assert entry["delta_vs_uniform"]["mean"] == pytest.approx(diff.mean())
    ari = on_disk["synthetic"]["ari"]
    assert set(ari) == {"jsd", "pmi"} and all(-1 <= v <= 1 for v in ari.values())
    for shares in on_disk["synthetic"]["budget_per_cluster"].values():
        assert sum(shares.values()) == pytest.approx(1.0)


def test_mixtures_are_the_optima_of_the_measured_affinities(finished):
    run_dir, _, _ = finished
    probe = _stage_dir(run_dir, "probe")
    mix = _stage_dir(run_dir, "mixtures")
    names = json.loads((probe / "names.json").read_text())
    D = np.load(probe / "divergence.npy")
    T = len(names)
    assert D.shape == (T, T) and np.allclose(D, D.T, atol=1e-6)
    assert np.all(D >= -1e-7) and np.all(D <= np.log(2) + 1e-6)
    L = np.load(probe / "crosslik.npy")
    # The affinities are the DESIGN.md formulas of the stored measurements (float64 here).
    np.testing.assert_allclose(np.load(mix / "affinity_jsd.npy"), 1 - D / np.log(2), atol=1e-6)
    pmi = 0.5 * ((L - np.diag(L)[None, :]) + (L.T - np.diag(L)[:, None]))
    np.fill_diagonal(pmi, 0.0)
    np.testing.assert_allclose(np.load(mix / "affinity_pmi.npy"), pmi, rtol=1e-5, atol=1e-4)
    mixtures = json.loads((mix / "mixtures.json").read_text())
    for kind in ("jsd", "pmi"):
        pot = potentials(np.load(mix / f"affinity_{kind}.npy"), beta=1.0, lam=2.0 * T)
        Q = np.asarray(pot.matrix, np.float64) * pot.lam
        c = pot.beta * np.asarray(pot.unary, np.float64)
        w_ref, _ = active_set_simplex_qp(Q, c)
        w = np.asarray(mixtures[f"taskpgm_{kind}"]["weights"])
        scale = abs(c @ w_ref) + 0.5 * abs(w_ref @ Q @ w_ref)
        assert energy64(w, Q, c) - energy64(w_ref, Q, c) <= 1e-5 * scale
    np.testing.assert_allclose(mixtures["uniform"]["weights"], np.full(T, 1 / T))
    sizes = np.asarray([load_pools(_tiny().data).train.split_sizes("train")[n] for n in names])
    np.testing.assert_allclose(mixtures["size_proportional"]["weights"], sizes / sizes.sum())
    tempered = sizes ** (1 / 2.0)
    np.testing.assert_allclose(mixtures["temperature"]["weights"], tempered / tempered.sum())
    greedy = json.loads((mix / "greedy.json").read_text())
    # The greedy chain, recomputed in float64: F(A) = beta sum_A u - lam/2 sum_{i!=j in A} S~
    # with the selection's default lam = beta, k = T // 2, stopping at a non-positive gain.
    pot = potentials(np.load(mix / "affinity_jsd.npy"), beta=1.0, lam=1.0)
    St, u = np.asarray(pot.matrix, np.float64), np.asarray(pot.unary, np.float64)
    off = St - np.diag(np.diag(St))
    chain = []
    while len(chain) < T // 2:
        gains = [u[e] - off[e, chain].sum() if e not in chain else -np.inf for e in range(T)]
        if max(gains) <= 0:
            break
        chain.append(int(np.argmax(gains)))
    assert greedy["order"] == [names[i] for i in chain]
    chosen = set(greedy["order"])
    np.testing.assert_allclose(mixtures["greedy"]["weights"],
                               [1 / len(chosen) if n in chosen else 0.0 for n in names])


def test_resume_after_kills_inside_and_between_stages(finished, tmp_path, monkeypatch):
    ref_dir, ref_results, _ = finished
    run_dir = tmp_path / "killed"
    real_finetune = stages.finetune

    def killed_at_step(k):
        def finetune(trainer, data, **kw):
            chunks.add(trainer.cfg.loss_chunk)
            if not isinstance(trainer, AdapterTrainer):  # the base pretraining runs through
                return real_finetune(trainer, data, **kw)

            def on_log(entry):
                if entry["step"] >= k:
                    raise KeyboardInterrupt
            return real_finetune(trainer, data, **{**kw, "log_every": 1, "on_log": on_log})
        return finetune

    # This run trains the adapters in rounds of 4, probes 3 models per pass, runs attention
    # through jax.nn.dot_product_attention and every training loss 16 positions at a time:
    # settings of memory and speed only, so it must end
    # where the all-at-once, einsum-attention reference run ended.
    chunked = ("single_task.adapters_per_round=4", "probe.adapter_chunk=3",
               "model.attention_impl=xla", "model.loss_chunk=16")
    chunks = set()
    # 1. Killed inside the single-task stage, after its checkpoint at step 2 of the first round.
    monkeypatch.setattr(stages, "finetune", killed_at_step(3))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_tiny(*chunked), run_dir, progress=False, echo=Lines())
    assert chunks == {16}  # the base pretraining and the single-task rounds
    partial = list(run_dir.glob("stages/single_task-*.partial"))
    assert len(partial) == 1 and list((partial[0] / "checkpoints" / "00000-00004").iterdir())
    assert not list(run_dir.glob("stages/single_task-*[0-9a-f]"))
    # 2. Killed between stages: the probe never starts its work.
    monkeypatch.setattr(stages, "finetune", real_finetune)

    def no_probe(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "run_probe", no_probe)
    lines = Lines()
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_tiny(*chunked), run_dir, progress=False, echo=lines)
    assert "single_task" in lines.ran() and {"tokenizer", "base"} <= lines.cached()
    monkeypatch.undo()
    # 3. Started again: finishes with the uninterrupted run's results.
    chunks.clear()
    monkeypatch.setattr(stages, "finetune", killed_at_step(10 ** 9))  # records, never kills
    lines = Lines()
    results = run_pipeline(_tiny(*chunked), run_dir, progress=False, echo=lines, report=False)
    assert {"tokenizer", "base", "single_task"} <= lines.cached() and "probe" in lines.ran()
    assert chunks == {16}  # the mixture fine-tunes
    for name in ("divergence", "crosslik", "base_loglik"):
        np.testing.assert_allclose(np.load(_stage_dir(run_dir, "probe") / f"{name}.npy"),
                                   np.load(_stage_dir(ref_dir, "probe") / f"{name}.npy"),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
    for method in METHODS:
        assert results["methods"][method]["seeds"] == pytest.approx(
            ref_results["methods"][method]["seeds"])


def _tree(path):
    with ocp.StandardCheckpointer() as ckptr:
        return jax.tree.map(np.asarray, ckptr.restore(path.absolute()))


def test_kill_after_a_save_and_changed_rounds_resume_to_the_same_artifacts(finished, tmp_path,
                                                                          monkeypatch):
    """A kill right after an orbax save (a round, the stacked adapters, a fine-tune's params),
    before the stage is published, with a round of another adapters_per_round left in the work
    directory: the run still completes, with the uninterrupted run's artifacts. The killed stages
    are deleted from a copy of the finished run, so only they run again."""
    ref_dir, ref_results, _ = finished
    run_dir = tmp_path / "saves"
    shutil.copytree(ref_dir, run_dir)
    single = _stage_dir(run_dir, "single_task")
    ref_adapters = _tree(single / "adapters")
    for label in ("single_task", "finetune/uniform/seed0"):
        shutil.rmtree(_stage_dir(run_dir, label))
    # What a run with rounds of 2 leaves after its first round (its adapters 0 and 1, but not
    # as this run trains them): it must not be taken for a round of this run's size.
    rounds = single.with_name(single.name + ".partial") / "rounds"
    stages._save_tree(rounds / "00000-00002", jax.tree.map(lambda x: x[:2] + 1, ref_adapters))
    (rounds / "00000-00002.json").write_text('{"a": 0.0, "b": 0.0}')
    real_save = stages._save_tree

    def kill_after(name):
        def save(path, tree):
            real_save(path, tree)
            if path.name == name:
                raise KeyboardInterrupt
        monkeypatch.setattr(stages, "_save_tree", save)

    def run():
        return run_pipeline(_tiny(), run_dir, progress=False, echo=Lines(), report=False)

    # 1. Killed after the round is saved, before its losses are written; 2. after the stacked
    # adapters are saved; 3. after the fine-tune's params are saved. Each time the stage is
    # not published, and its leftover must not block the next attempt.
    for name, left in (("00000-00006", ["00000-00002", "00000-00002.json", "00000-00006"]),
                       ("adapters", None), ("params", None)):
        kill_after(name)
        with pytest.raises(KeyboardInterrupt):
            run()
        if left:
            assert sorted(p.name for p in rounds.iterdir()) == left
    monkeypatch.undo()
    # A stage left unfinished by a run of other settings: kept (it resumes if they come back)
    # and reported with its size once the run is done.
    stale = run_dir / "stages" / "probe-0123abcd.partial" / "checkpoints"
    stale.mkdir(parents=True)
    (stale / "state.bin").write_bytes(bytes(3 * 2**20))
    lines = Lines()
    results = run_pipeline(_tiny(), run_dir, progress=False, echo=lines, report=False)
    assert [p.name for p in run_dir.glob("stages/*.partial")] == ["probe-0123abcd.partial"]
    assert lines[-1] == (f"[note] kept 1 unfinished stage folder(s) of other settings (3.0 MiB) "
                         f"in {run_dir.absolute() / 'stages'}: probe-0123abcd.partial; they "
                         "resume if those settings come back, else delete them to free the space")
    for label, name in (("single_task", "adapters"), ("finetune/uniform/seed0", "params")):
        got = _tree(_stage_dir(run_dir, label) / name)
        want = _tree(_stage_dir(ref_dir, label) / name)
        assert jax.tree.structure(got) == jax.tree.structure(want), label
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=label)
    assert results["methods"]["uniform"]["seeds"] == ref_results["methods"]["uniform"]["seeds"]
    # Cached stages report the seconds they took when they ran, not nothing.
    assert results["stage_seconds"].keys() == ref_results["stage_seconds"].keys()
    assert results["stage_seconds"]["probe"] == ref_results["stage_seconds"]["probe"]


def test_restore_refuses_other_shapes(tmp_path):
    stages._save_tree(tmp_path / "tree", {"a": np.ones((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"stored \(2, 3\).*expected \(3, 3\)"):
        stages._restore_tree(tmp_path / "tree", {"a": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="expected parameters"):
        stages._restore_tree(tmp_path / "tree", {"b": np.zeros((2, 3), np.float32)})


def test_config_batch_sizes_are_global_over_the_processes(monkeypatch, rng, tmp_path):
    """The config's batch sizes are the rows of one step in all (the dry run plans them so): on
    P processes each `HostIterator` reads batch_size / P rows, so the global batch is the same
    as on one host (it was P x batch_size: 4x the planned memory on a 4-host v4-32). A size
    the processes cannot share is refused by key before anything runs."""
    from tests.train.conftest import SEQ, successor_seqs

    seqs = successor_seqs(rng, 40)
    monkeypatch.setattr(stages, "encode_task", lambda tok, rows, max_length: seqs)
    processes = int(rng.choice([2, 4]))  # divides the other batch sizes of TINY
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    rows = processes * int(rng.integers(1, 4))
    data = stages._task_iterator(None, None, SEQ, rows, 0)
    assert next(data).input_ids.shape == (rows // processes, SEQ)
    with pytest.raises(ConfigError, match=r"'finetune.batch_size'.*multiple of"):
        run_pipeline(_tiny(f"finetune.batch_size={rows + 1}"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"'single_task.batch_size'.*grad_accum"):
        stages.host_rows(rows, "single_task.batch_size", 2 * rows)


def test_bfloat16_master_weights_are_refused_by_key_before_anything_runs(tmp_path):
    """Every training stage needs float32 master weights: the config key is named at once, not
    as a `ModelConfig` error after the data, the tokenizer (or a 7B checkpoint) have loaded."""
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"'model.param_dtype'.*float32"):
        run_pipeline(_tiny("model.param_dtype=bfloat16"), run_dir, echo=print)
    assert not run_dir.exists()


def test_a_mesh_the_devices_do_not_fill_is_refused_by_key_before_anything_runs(tmp_path):
    """As `--dry-run` refuses it: naming `mesh` and the fix (was make_mesh's own message, after
    the run directory was written)."""
    run_dir = tmp_path / "run"
    n = jax.device_count()
    with pytest.raises(ConfigError, match=rf"config key 'mesh'.*multiply to {n} .*-1"):
        run_pipeline(_tiny(f"mesh.fsdp={n - 1}"), run_dir, echo=print)
    assert not run_dir.exists()


def test_data_key_covers_what_evaluation_reads(monkeypatch):
    cfg = _tiny().data
    key = load_pools(cfg).key
    real = inputs.synthetic_suite

    def edited(edit):
        def suite(*args, **kwargs):
            pool = real(*args, **kwargs)
            held = pool.heldout
            tasks = [edit(t) if i == 0 else t for i, t in enumerate(held.tasks)]
            return TaskPool(pool.tasks, pool.split_spec, cluster_labels=pool.cluster_labels,
                            heldout=TaskPool(tasks, held.split_spec))
        return suite

    def more_refs(task):
        examples = task.examples.map(lambda ex: {"references": [*ex["references"], "also"]})
        return dataclasses.replace(task, examples=examples)

    # Metrics the evaluation computes (another one is refused when the data loads).
    for edit in (more_refs, lambda t: dataclasses.replace(t, metric="exact_str_match"),
                 lambda t: dataclasses.replace(t, kind="multiple_choice",
                                               metric="multiple_choice_grade")):
        monkeypatch.setattr(inputs, "synthetic_suite", edited(edit))
        assert load_pools(cfg).key != key
    monkeypatch.setattr(inputs, "synthetic_suite", edited(lambda t: t))
    assert load_pools(cfg).key == key


def test_hf_base_key_covers_the_tokenizer(finished, tmp_path):
    """Only the keys: the checkpoint's weights are never read here."""
    ref_dir, _, _ = finished
    ckpt = tmp_path / "ckpt"
    shutil.copytree(next(ref_dir.glob("stages/tokenizer-*")) / "tokenizer", ckpt)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights")
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    settings = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 7}))

    def key(*extra):
        return hf_base(_tiny("model.source=hf", f"model.checkpoint={ckpt}",
                             "tokenizer.kind=pretrained", *extra))[2]

    base = key()
    assert key() == base
    assert key(f"tokenizer.path={other}") != base   # another tokenizer's files
    shutil.copy(other / "tokenizer_config.json", ckpt / "tokenizer_config.json")
    assert key() != base   # the checkpoint's own tokenizer, edited in place


def test_hf_base_key_ignores_settings_an_hf_base_never_reads(finished, tmp_path, rng):
    """A checkpoint base neither trains a tokenizer (vocab_size) nor pretrains (model.pretrain,
    model.size): changing those must not rerun every stage of a 7B run; what an hf base does
    read still changes the key."""
    ref_dir, _, _ = finished
    ckpt = tmp_path / "ckpt"
    shutil.copytree(next(ref_dir.glob("stages/tokenizer-*")) / "tokenizer", ckpt)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(rng.bytes(64))

    def key(*extra):
        return hf_base(_tiny("model.source=hf", f"model.checkpoint={ckpt}",
                             "tokenizer.kind=pretrained", *extra))[2]

    base = key()
    unread = [f"tokenizer.vocab_size={int(rng.integers(300, 5000))}",
              f"model.pretrain.steps={int(rng.integers(9, 500))}",
              f"model.pretrain.learning_rate={float(rng.uniform(1e-4, 1e-2))!r}",
              f"model.size={{hidden_size: {16 * int(rng.integers(3, 9))}}}"]
    for extra in unread:
        assert key(extra) == base, extra
    assert key("model.seq_len=48") != base
    assert key("model.dtype=bfloat16") != base


def test_changed_setting_reruns_only_its_dependants(finished, tmp_path):
    ref_dir, _, _ = finished
    run_dir = tmp_path / "copy"
    shutil.copytree(ref_dir, run_dir)
    lines = Lines()
    run_pipeline(_tiny("mrf.beta=0.5"), run_dir, progress=False, echo=lines, report=False)
    ran, cached = lines.ran(), lines.cached()
    assert {"tokenizer", "base", "single_task", "probe"} <= cached
    assert "mixtures" in ran
    for seed in (0, 1):
        # Baselines keep their weights, hence their fine-tunes and evaluations.
        for method in ("uniform", "size_proportional", "temperature"):
            assert {f"finetune/{method}/seed{seed}", f"eval/{method}/seed{seed}"} <= cached
        assert f"finetune/taskpgm_jsd/seed{seed}" in ran
    # An evaluation setting reruns evaluations only.
    lines = Lines()
    run_pipeline(_tiny("mrf.beta=0.5", "eval.max_new_tokens=2"), run_dir, progress=False,
                 echo=lines, report=False)
    assert all(not label.startswith("finetune") for label in lines.ran())
    assert {f"eval/{m}/seed{s}" for m in METHODS for s in (0, 1)} <= lines.ran()


def test_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("single_task:", "single_tsk:"))
    assert main(["run", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "single_tsk" in err and "single_task" in err and "\n" not in err
    with pytest.raises(ConfigError, match="model.checkpoint"):
        config_mod.config_from_dict({"model": {"source": "hf"}, "tokenizer": {"kind": "pretrained"}})
    assert main(["run", str(DEMO), "--run-dir", str(tmp_path / "r"), "model.source=hf",
                 "tokenizer.kind=pretrained", f"model.checkpoint={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "model.checkpoint" in err and "nowhere" in err and "config.json" in err
    empty = tmp_path / "tasks"
    empty.mkdir()
    assert main(["run", str(DEMO), "--run-dir", str(tmp_path / "r"), "data.source=files",
                 f"data.files.path={empty}", f"data.files.heldout_path={empty}"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no task files" in err
    assert main(["run", str(DEMO), "--run-dir", str(tmp_path / "r"), "seeds"]) == 2
    assert "dotted.key=value" in capsys.readouterr().err


def _write_tasks(root, tasks):
    """JSONL task files `root/<name>.jsonl`, one row per dict."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in tasks.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _files_config(tmp_path, **files):
    from taskpgm_jax.config import config_from_dict

    return config_from_dict({"data": {"source": "files", "files": {
        "path": str(tmp_path / "pool"), "heldout_path": str(tmp_path / "held"), **files}}}).data


def _data_key_before_prompt_splits(pools, cfg):
    """The data key as it was computed before rows were split by prompt and before choice
    scores: content, references, kind and metric, the split spec and the clusters."""
    import hashlib

    from taskpgm_jax.config import config_hash
    from taskpgm_jax.data import SplitSpec

    def prints(pool):
        out = []
        for n in pool.names:
            cols = pool[n].examples[:]
            h = hashlib.sha256()
            for row in zip(cols["prompt"], cols["target"], cols["choices"], cols["answer"],
                           strict=True):
                h.update(repr((row[0], row[1], tuple(row[2]), int(row[3]))).encode() + b"\n")
            refs = [list(r) for r in cols["references"]]
            out.append((n, config_hash(h.hexdigest(), pool[n].kind, pool[n].metric, refs)))
        return out

    split = SplitSpec(probe=cfg.probe_fraction, eval=cfg.eval_fraction, seed=cfg.split_seed)
    return config_hash(prints(pools.train), prints(pools.heldout), dataclasses.asdict(split),
                       None)


def test_data_key_changes_exactly_where_splitting_by_prompt_moved_a_row(tmp_path, rng):
    """Rows sharing a prompt now take one split: a task where that moved a row (compared with
    each row's own split, `split_of`) gets another data key, so an old run directory does not
    reuse stages computed on the old splits; one-row-per-prompt data keeps its old key."""
    from taskpgm_jax.data import SplitSpec, split_of

    cfg = _files_config(tmp_path)
    spec = SplitSpec(probe=cfg.probe_fraction, eval=cfg.eval_fraction, seed=cfg.split_seed)
    tasks = {f"pool{t}": [{"prompt": f"q{t} {i} {rng.integers(1 << 30)}",
                           "target": f"a{rng.integers(1 << 20)}"} for i in range(200)]
             for t in range(2)}
    _write_tasks(tmp_path / "held", {"held0": [{"prompt": f"h {i}", "target": "x"}
                                               for i in range(8)]})

    def alone(task, row):
        return split_of({**row, "choices": [], "answer": -1}, task, spec)

    def key_with_second_answer(moves):
        """The key with one prompt of pool0 given a second answer, which moves (or keeps)
        a row's split under splitting by prompt."""
        for row in tasks["pool0"]:
            for _ in range(200):
                extra = {"prompt": row["prompt"], "target": f"b{rng.integers(1 << 20)}"}
                if (alone("pool0", extra) != alone("pool0", row)) == moves:
                    _write_tasks(tmp_path / "pool", {**tasks, "pool0": [*tasks["pool0"], extra]})
                    pools = load_pools(cfg)
                    return pools, _data_key_before_prompt_splits(pools, cfg)
        raise AssertionError("no second answer found")

    _write_tasks(tmp_path / "pool", tasks)
    pools = load_pools(cfg)
    assert pools.key == _data_key_before_prompt_splits(pools, cfg)
    pools, old = key_with_second_answer(moves=True)
    assert pools.key != old
    pools, old = key_with_second_answer(moves=False)
    assert pools.key == old


def test_data_key_covers_choice_scores_other_than_the_default(tmp_path, rng):
    """Evaluation credits each choice's score (BIG-bench's target_scores): held-out scores with
    several correct choices change the data key (and so every evaluation key); scores equal to
    the default (1 for the answer, 0 elsewhere), given or not, keep the key they had before."""
    n = int(rng.integers(3, 6))
    rows = [{"prompt": f"q {i} {rng.integers(1 << 30)}", "choices": [f"c{j}" for j in range(n)],
             "answer": int(rng.integers(n))} for i in range(6)]
    pool = {f"pool{t}": [{"prompt": f"p{t} {i}", "target": f"t{i}"} for i in range(60)]
            for t in range(2)}
    _write_tasks(tmp_path / "pool", pool)
    cfg = _files_config(tmp_path)

    def key(scores):
        held = [dict(r, choice_scores=s) if s is not None else r
                for r, s in zip(rows, scores, strict=True)]
        _write_tasks(tmp_path / "held", {"held0": held})
        return load_pools(cfg)

    plain = key([None] * len(rows))
    assert plain.key == _data_key_before_prompt_splits(plain, cfg)
    default = [[float(j == r["answer"]) for j in range(n)] for r in rows]
    assert key(default).key == plain.key
    k = int(rng.integers(len(rows)))
    other = int((rows[k]["answer"] + rng.integers(1, n)) % n)
    credit = [*default[:k], [1.0 if j in (rows[k]["answer"], other) else 0.0 for j in range(n)],
              *default[k + 1:]]
    assert key(credit).key != plain.key


def test_single_task_rounds_are_decided_by_process_0_and_its_loss_files_awaited(
        monkeypatch, tmp_path, rng):
    """Only process 0 writes a round's loss file. Seen from process 1 of 2: it must not read
    the file before process 0 has written it (was a FileNotFoundError), nor decide on its own
    look at the rounds directory whether a round is done (a stale or lagging view of a shared
    filesystem: a process skipping a round the others train hangs them in its collectives).
    The training is stubbed; `sync_global_devices` stands for process 0 arriving with its loss
    files written and `broadcast_one_to_all` for process 0's view (no round done)."""
    from types import SimpleNamespace

    from flax import nnx
    from jax.experimental import multihost_utils

    T, per_round = 4, 2
    names = [f"task{i}" for i in range(T)]
    work = tmp_path / "single_task.partial"
    rounds = work / "rounds"
    trained, saved = {}, {}

    class Trainer:
        def __init__(self, model, cfg, chunk, mesh=None):
            self.chunk = chunk

        def adapters(self, state):
            return state

    def finetune(trainer, data, *, checkpoint_dir, **kw):
        n = len(trainer.chunk["A"])
        trained[Path(checkpoint_dir).name] = dict(zip(
            names[kw["seed"]:kw["seed"] + n], rng.random(n).tolist(), strict=True))
        return SimpleNamespace(state=trainer.chunk, history=[
            {"loss_per_adapter": list(trained[Path(checkpoint_dir).name].values())}])

    def process_0_at_barrier(name):
        for tag, losses in trained.items():
            (rounds / f"{tag}.json").write_text(json.dumps(losses))

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", process_0_at_barrier)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                        lambda x, is_source=None: jax.tree.map(np.zeros_like, x))
    monkeypatch.setattr(stages, "_lora", lambda base, lora, seed=0: None)
    monkeypatch.setattr(stages, "init_adapters", lambda model, n, seed=0, first=0: nnx.State(
        {"A": np.full((n, 2), first, np.float32)}))
    monkeypatch.setattr(stages, "AdapterTrainer", Trainer)
    monkeypatch.setattr(stages, "StackedIterator", lambda its: None)
    monkeypatch.setattr(stages, "_task_iterator", lambda *a, **k: None)
    monkeypatch.setattr(stages, "finetune", finetune)
    monkeypatch.setattr(stages, "_save_tree", lambda path, tree: saved.__setitem__(path, tree))
    monkeypatch.setattr(stages, "_restore_tree", lambda path, like: saved[path])
    # A stale view on process 1: round 0 looks done (its loss file and adapters are there).
    rounds.mkdir(parents=True)
    stale = {n: 9.0 for n in names[:per_round]}
    (rounds / f"00000-{per_round:05d}.json").write_text(json.dumps(stale))
    saved[rounds / f"00000-{per_round:05d}"] = {"A": np.zeros((per_round, 2), np.float32)}

    pool = type("Pool", (), {"names": names, "train": lambda self, n: None,
                             "__len__": lambda self: T})()
    ft = dataclasses.replace(_tiny().single_task, adapters_per_round=per_round)
    info = stages.train_single_task(None, None, pool, ft, _tiny().lora, 16, work, progress=False)
    assert sorted(trained) == [f"{s:05d}-{per_round:05d}" for s in range(0, T, per_round)]
    assert info["final_loss_per_task"] == {n: v for r in trained.values() for n, v in r.items()}
