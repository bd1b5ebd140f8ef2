"""RunDir publishing: a kill while a stage's scratch is deleted never leaves a half-deleted
checkpoint where a resume would read it (found with real SIGKILLs during `shutil.rmtree`)."""

import shutil

import pytest

from taskpgm_jax.pipeline import cache
from taskpgm_jax.pipeline.cache import RunDir
from taskpgm_jax.pipeline.inputs import file_digest


def _fill_scratch(work):
    for scratch, leaf in (("checkpoints", "40/state/data"), ("rounds", "00000-00004/a/data")):
        path = work / scratch / leaf
        path.parent.mkdir(parents=True)
        path.write_text("x")
        (work / scratch / f"{leaf.split('/')[0]}.json").write_text("{}")
    (work / "adapters.npy").write_text("artifact")


def test_finish_publishes_the_artifacts_and_drops_the_scratch(tmp_path):
    run = RunDir(tmp_path)
    _fill_scratch(run.begin("single_task", "k1"))
    final = run.finish("single_task", "k1")
    assert run.done("single_task", "k1")
    assert sorted(p.name for p in final.iterdir()) == ["adapters.npy"]


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way catches it."""


def test_a_kill_while_the_scratch_is_deleted_leaves_a_finished_stage(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    _fill_scratch(run.begin("finetune", "k2"))
    real_rmtree = shutil.rmtree

    def rmtree_killed_halfway(path, *args, **kwargs):
        # Delete one file of the tree, as the first unlinks of a real rmtree would, then die.
        next(p for p in sorted(path.rglob("*")) if p.is_file()).unlink()
        raise _Killed

    monkeypatch.setattr(cache.shutil, "rmtree", rmtree_killed_halfway)
    with pytest.raises(_Killed):
        run.finish("finetune", "k2")
    monkeypatch.setattr(cache.shutil, "rmtree", real_rmtree)

    # The stage is published: a rerun does not resume inside it, so nothing reads the
    # half-deleted tree; the next start sweeps it away.
    assert run.done("finetune", "k2")
    assert not (tmp_path / "stages" / "finetune-k2.partial").exists()
    final = run.path("finetune", "k2")
    assert not (final / "checkpoints").exists()  # renamed away before any file was deleted
    RunDir(tmp_path)
    assert sorted(p.name for p in final.iterdir()) == ["adapters.npy"]


def test_a_partial_stage_keeps_its_checkpoints_across_restarts(tmp_path):
    run = RunDir(tmp_path)
    work = run.begin("base", "k3")
    _fill_scratch(work)
    RunDir(tmp_path)  # a restart of the run must not sweep a stage still in progress
    assert (work / "checkpoints" / "40" / "state" / "data").read_text() == "x"
    assert (work / "rounds" / "00000-00004.json").exists()


def test_unused_partials_are_the_unfinished_stages_this_run_does_not_record(tmp_path, rng):
    run = RunDir(tmp_path)
    keys = [f"{int(k):08x}" for k in rng.choice(1 << 30, size=4, replace=False)]
    for name, key in (("probe", keys[0]), ("probe", keys[1]), ("finetune", keys[2])):
        _fill_scratch(run.begin(name, key))
    run.begin("eval", keys[3])
    run.finish("eval", keys[3])  # finished: never a partial
    run.record("probe", "probe", keys[1])
    run.record("eval/x", "eval", keys[3])
    assert [p.name for p in run.unused_partials()] == sorted(
        [f"probe-{keys[0]}.partial", f"finetune-{keys[2]}.partial"])
    # Two scratch folders of a 1-byte file and a 2-byte json each, and an 8-byte artifact.
    assert cache.tree_bytes(run.stages / f"probe-{keys[0]}.partial") == 2 * (1 + 2) + 8


def test_file_digest_sees_a_replaced_weight_file_of_the_same_size(tmp_path, rng):
    """Weight files above 64 MiB are hashed by size and three samples, not read whole: another
    fine-tune of the same architecture (same size, same header) must still change the digest,
    and an untouched copy must not. The files are sparse: only the written bytes take space."""
    size = (64 << 20) + int(rng.integers(1 << 20, 8 << 20))
    header = rng.bytes(4096)

    def weights(name, middle):
        path = tmp_path / name / "model.safetensors"
        path.parent.mkdir()
        with open(path, "wb") as f:
            f.write(header)
            f.seek(size // 2)
            f.write(middle)
            f.truncate(size)
        return path

    first = rng.bytes(64)
    a, same, other = weights("a", first), weights("b", first), weights("c", rng.bytes(64))
    assert file_digest([a]) == file_digest([same])
    assert file_digest([a]) != file_digest([other])
    small = tmp_path / "config.json"
    small.write_bytes(header)  # small files are read whole: one changed byte changes the digest
    before = file_digest([small])
    small.write_bytes(header[:-1] + bytes([header[-1] ^ 1]))
    assert file_digest([small]) != before


@pytest.mark.parametrize("process_0_sees_done", [False, True])
def test_stage_log_runs_a_stage_as_process_0_sees_it(tmp_path, monkeypatch, rng,
                                                     process_0_sees_done):
    """Seen from process 1 of 2 with a lagging view of a shared filesystem: whether a stage is
    done must be process 0's answer, not its own (a process skipping a stage whose collectives
    the others enter hangs them; one entering a stage the others skip hangs too).
    `broadcast_one_to_all` stands for process 0's view, `sync_global_devices` for the others
    arriving at the stage's barriers."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from taskpgm_jax.pipeline.run import StageLog

    run = RunDir(tmp_path)
    key = f"{int(rng.integers(1 << 30)):08x}"
    if not process_0_sees_done:
        # Process 1's stale view: the stage directory of an earlier run, deleted since.
        (run.path("probe", key)).mkdir()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    fill = np.ones_like if process_0_sees_done else np.zeros_like
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                        lambda x, is_source=None: jax.tree.map(fill, x))
    # Both processes computed the same key (the stage keys must agree: test below).
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, x]))
    computed = []
    StageLog(echo=lambda line: None).run(run, "probe", "probe", key,
                                         lambda work: computed.append(work) or {})
    assert len(computed) == (0 if process_0_sees_done else 1)


@pytest.mark.parametrize("same", [True, False])
def test_stage_keys_must_agree_on_every_process(tmp_path, monkeypatch, rng, same):
    """Keys hash each process's own files: hosts that see different task files or checkpoints
    must stop, every process alike, before any runs or skips a stage under process 0's decision.
    `process_allgather` stands for the other process's key (an independent blake2b here)."""
    import hashlib

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from taskpgm_jax.pipeline.run import StageLog

    key = f"{int(rng.integers(1 << 62)):016x}"
    other = key if same else f"{int(rng.integers(1 << 62)) | 1:016x}"
    words = [np.frombuffer(hashlib.blake2b(k.encode(), digest_size=8).digest(), np.int32)
             for k in (other, key)]  # process 0 saw `other`, this process (1) `key`
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                        lambda x, is_source=None: jax.tree.map(np.zeros_like, x))
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack(words))
    computed = []
    log = StageLog(echo=lambda line: None)
    run = RunDir(tmp_path)
    if same:
        log.run(run, "probe", "probe", key, lambda work: computed.append(work) or {})
        assert len(computed) == 1
    else:
        with pytest.raises(RuntimeError, match=r"stage 'probe': processes \[1\] computed another key"):
            log.run(run, "probe", "probe", key, lambda work: computed.append(work) or {})
        assert computed == [] and not run.path("probe", key).exists()
