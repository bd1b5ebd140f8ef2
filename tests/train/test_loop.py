"""The host loop: kill-and-resume equals an uninterrupted run; non-finite loss or parameters keep
the last good checkpoint; a checkpoint directory belongs to one run; adapters and sequential full
fine-tuning through the same loop."""

import dataclasses
import re
import types
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from taskpgm_jax.train import (
    AdapterTrainer,
    Checkpointer,
    NonFiniteLossError,
    StackedIterator,
    TrainConfig,
    Trainer,
    finetune,
    init_adapters,
    sequential_finetune,
)
from tests.train.conftest import BATCH, LORA, iterator, random_model, tree_copy, tree_max_diff
from tests.train.test_adapters import CFG as LORA_CFG
from tests.train.test_step import embedding_loss

STEPS = 8


class Killed(Exception):
    pass


class DiesAt:
    """Wraps an iterator; raises Killed when batch `at` is requested (a crash mid-run)."""

    def __init__(self, it, at):
        self.it, self.at, self.n = it, at, 0

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            raise Killed
        return next(self.it)

    def state(self):
        return self.it.state()

    def restore(self, state):
        self.it.restore(state)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    model = random_model(seed=8, lora=LORA)
    trainer = Trainer(model, LORA_CFG)
    kw = {"num_steps": STEPS, "seed": 3, "log_every": 2, "progress": False}
    full = finetune(trainer, iterator(0), **kw)
    assert [h["step"] for h in full.history] == [2, 4, 6, 8]

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):  # dies fetching step 7's batch, after the step-6 checkpoint
        finetune(Trainer(model, LORA_CFG), DiesAt(iterator(0), 7), checkpoint_dir=str(ckpt),
                 checkpoint_every=3, **kw)
    assert Checkpointer(ckpt, every=3).all_steps() == [3, 6]
    resumed = finetune(Trainer(model, LORA_CFG), iterator(0), checkpoint_dir=str(ckpt),
                       checkpoint_every=3, **kw)
    assert resumed.resumed_from == 6
    assert tree_max_diff(tree_copy(full.state.params), tree_copy(resumed.state.params)) <= 1e-6
    assert tree_max_diff(tree_copy(full.state.opt_state),
                         tree_copy(resumed.state.opt_state)) <= 1e-6
    assert int(resumed.state.step) == STEPS
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["step"] == b["step"]
        np.testing.assert_allclose([a["loss"], a["lr"], a["grad_norm"]],
                                   [b["loss"], b["lr"], b["grad_norm"]], rtol=1e-6)


class Poisoned:
    """Batch `at` gets an infinite loss weight on its target tokens: loss and gradient are inf/NaN.
    The trainer refuses such a loss_mask on the host, so it goes to an `UncheckedTrainer`."""

    def __init__(self, it, at):
        self.it, self.at, self.n = it, at, 0

    def __next__(self):
        self.n += 1
        batch = next(self.it)
        if self.n == self.at:
            batch = batch._replace(loss_mask=np.where(batch.loss_mask > 0, np.inf, 0.0)
                                   .astype(batch.loss_mask.dtype))
        return batch

    def state(self):
        return self.it.state()

    def restore(self, state):
        self.it.restore(state)


class UncheckedTrainer(Trainer):
    """Skips the host checks of batch values (shapes still checked); shares Trainer's compiled
    step, so a poisoned batch costs no compile."""

    def _check_batch(self, batch, lead, *, values):
        super()._check_batch(batch, lead, values=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = random_model(seed=9, lora=LORA)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(NonFiniteLossError, match="step 5.*step 4") as err:
        finetune(UncheckedTrainer(model, LORA_CFG), Poisoned(iterator(1), 5), num_steps=STEPS,
                 checkpoint_dir=str(ckpt), checkpoint_every=2, log_every=4, progress=False)
    assert err.value.step == 5 and err.value.last_checkpoint == 4
    assert err.value.adapters is None and err.value.adapter_steps is None  # a single model
    manager = Checkpointer(ckpt, every=2)
    assert manager.all_steps() == [2, 4]
    state, _, _ = manager.restore(Trainer(model, LORA_CFG).abstract_state())
    assert all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(state))


class UncheckedAdapterTrainer(AdapterTrainer):
    """`UncheckedTrainer` for adapters: shares AdapterTrainer's compiled step."""

    def _check_batch(self, batch, lead, *, values):
        super()._check_batch(batch, lead, values=False)


def test_non_finite_adapters_report_the_first_bad_step_and_which_adapter():
    """Adapter 1 goes bad at step 2, adapter 0 at step 3, adapter 2 never: the error is at step 2
    and names adapter 1 (fine adapters hold -1, so a max over adapters said step 3)."""
    model = random_model(seed=10, lora=LORA)
    trainer = UncheckedAdapterTrainer(model, LORA_CFG, init_adapters(model, 3, seed=0))
    poisoned_at = (3, 2, STEPS + 1)
    data = StackedIterator([Poisoned(iterator(t, offset=t + 1), at)
                            for t, at in enumerate(poisoned_at)])
    with pytest.raises(NonFiniteLossError,
                       match=r"at step 2 \(adapter 1; later adapter 0 at step 3\); training") as err:
        finetune(trainer, data, num_steps=4, log_every=4, progress=False)
    assert err.value.step == 2 and err.value.last_checkpoint is None
    assert err.value.adapters == (1,) and err.value.adapter_steps == {0: 3, 1: 2}


def test_update_that_overflows_is_never_checkpointed(tmp_path):
    """Loss and gradient finite, the updated parameters not: step 1 runs at lr 0 (warmup), step 2
    at 3e38, whose decay term overflows float32. Step 2 must be the error, never a checkpoint."""
    model = random_model(seed=9)
    cfg = TrainConfig(learning_rate=3e38, total_steps=10, warmup_steps=1, weight_decay=10.0,
                      max_grad_norm=None)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(NonFiniteLossError, match="step 2.*step 1") as err:
        finetune(Trainer(model, cfg, loss_fn=embedding_loss), iterator(1), num_steps=4,
                 checkpoint_dir=str(ckpt), checkpoint_every=1, progress=False)
    assert err.value.step == 2 and err.value.last_checkpoint == 1
    manager = Checkpointer(ckpt, every=1)
    assert manager.all_steps() == [1]
    state, _, _ = manager.restore(Trainer(model, cfg).abstract_state())
    # lr 0 at step 1: the checkpoint holds the initial weights.
    assert tree_max_diff(tree_copy(state.params), tree_copy(nnx.state(model, nnx.Param))) == 0.0


def test_checkpoint_dir_belongs_to_one_run(tmp_path):
    model = random_model(seed=8, lora=LORA)
    ckpt = str(tmp_path / "ckpt")
    kw = {"num_steps": 2, "seed": 3, "log_every": 2, "progress": False, "checkpoint_dir": ckpt}
    # Data without state()/restore() cannot be resumed: refused before anything runs.
    with pytest.raises(ValueError, match=r"data \(list_iterator\) has no state\(\)/restore\(\)"):
        finetune(Trainer(model, LORA_CFG), iter([]), **kw)
    finetune(Trainer(model, LORA_CFG), iterator(0), **kw)
    manager = Checkpointer(ckpt, every=2)
    assert manager.all_steps() == [2]
    with pytest.raises(ValueError, match="resume=False but checkpoint_dir .* holds checkpoints"):
        finetune(Trainer(model, LORA_CFG), iterator(0), **kw, resume=False)
    # The optimiser's settings may change on resume (with a warning), the micro-batching not:
    # only that is named.
    with pytest.raises(ValueError, match=r"another run \(checkpoint vs this run: "
                                         r"TrainConfig\.grad_accum: 1 vs 2\)"):
        finetune(Trainer(model, LORA_CFG.replace(learning_rate=0.05, grad_accum=2)), iterator(0),
                 **{**kw, "num_steps": 4})
    with pytest.raises(ValueError, match=r"another run .*seed: 3 vs 4\)"):
        finetune(Trainer(model, LORA_CFG), iterator(0), **{**kw, "seed": 4, "num_steps": 4})
    # Another LoRA rank or target list: named by parameter, before orbax sees the state.
    q_a = "param model/layers/0/self_attn/q_proj/lora_a"
    for lora, change in ((dataclasses.replace(LORA, rank=4), f"{q_a}: 'float32[16, 2]' vs "
                          "'float32[16, 4]'"),
                         (dataclasses.replace(LORA, targets=("q_proj", "v_proj")),
                          "param model/layers/0/mlp/up_proj/lora_a: 'float32[16, 2]' vs "
                          "'<absent>'")):
        with pytest.raises(ValueError, match=r"another run .*" + re.escape(change)):
            finetune(Trainer(random_model(seed=8, lora=lora), LORA_CFG), iterator(0),
                     **{**kw, "num_steps": 4})
    assert manager.all_steps() == [2]  # nothing deleted or written
    # resume=False may checkpoint plain data (never resumed); resuming it is refused.
    plain = str(tmp_path / "plain")
    finetune(Trainer(model, LORA_CFG), iter([next(iterator(0))] * 2),
             **{**kw, "checkpoint_dir": plain}, resume=False)
    with pytest.raises(ValueError, match="holds no data position"):
        finetune(Trainer(model, LORA_CFG), iterator(0), **{**kw, "checkpoint_dir": plain})


def _plain(it):
    """A generator over `it`: no state()/restore()."""
    while True:
        yield next(it)


def test_stacked_plain_iterators_are_not_resumable(tmp_path):
    """A StackedIterator has state()/restore() of its own, but its position exists only if every
    task iterator has one: with plain ones resume=True is refused up front (it used to train
    until the first save, then fail on the generator), and resume=False checkpoints without a
    position."""
    model = random_model(seed=10, lora=LORA)
    trainer = AdapterTrainer(model, LORA_CFG, init_adapters(model, 3, seed=0))

    def data(plain):
        its = [iterator(t, offset=t + 1) for t in range(3)]
        return StackedIterator([_plain(it) for it in its] if plain else its)

    assert data(plain=False).resumable and not data(plain=True).resumable
    ckpt = tmp_path / "ckpt"
    kw = {"num_steps": 2, "log_every": 2, "progress": False, "checkpoint_dir": str(ckpt)}
    with pytest.raises(ValueError, match=r"data \(StackedIterator\) has state\(\)/restore\(\) but "
                                         r"resumable=False .* or resume=False"):
        finetune(trainer, data(plain=True), **kw)
    assert not ckpt.exists()  # refused before anything ran or was written
    result = finetune(trainer, data(plain=True), **kw, resume=False)
    assert result.state.step.tolist() == [2, 2, 2]
    assert Checkpointer(ckpt, every=2).all_steps() == [2]
    with pytest.raises(ValueError, match="holds no data position"):
        finetune(trainer, data(plain=False), **{**kw, "num_steps": 4})


def test_checkpoint_without_run_settings_resumes_with_a_warning(tmp_path):
    """Checkpoints written before the run settings were stored (meta holds only the seed)."""
    model = random_model(seed=8, lora=LORA)
    trainer = Trainer(model, LORA_CFG)
    manager = Checkpointer(tmp_path, every=np.int64(1))
    # NumPy scalars are stored as numbers (orbax's JSON writer thread would fail on them)...
    position = {k: np.int64(v) if isinstance(v, int) else v for k, v in iterator(0).state().items()}
    manager.save(0, trainer.init(seed=3), data_state=position, meta={"seed": np.int64(3)})
    # ...anything else not JSON is refused, by name, before anything is written.
    with pytest.raises(ValueError, match=r"meta is not JSON-serialisable \(set"):
        manager.save(1, None, meta={"seen": {1, 2}})
    manager.wait()
    assert manager.all_steps() == [0] and manager.read_meta() == {"seed": 3}
    manager.close()
    kw = {"num_steps": 1, "progress": False, "checkpoint_dir": str(tmp_path)}
    with pytest.raises(ValueError, match="seed: 3 vs 4"), pytest.warns(UserWarning):
        finetune(trainer, iterator(0), seed=4, **kw)
    with pytest.warns(UserWarning, match="does not record its TrainConfig"):
        result = finetune(trainer, iterator(0), seed=3, **kw)
    assert result.resumed_from == 0 and int(result.state.step) == 1


def test_adapters_and_sequential_full_through_the_loop(tmp_path):
    model = random_model(seed=10, lora=LORA)
    adapters = init_adapters(model, 3, seed=0)
    trainer = AdapterTrainer(model, LORA_CFG, adapters)
    data = StackedIterator([iterator(t, offset=t + 1) for t in range(3)])
    result = finetune(trainer, data, num_steps=4, log_every=2, progress=False,
                      checkpoint_dir=str(tmp_path / "adapters"))
    assert len(result.history[-1]["loss_per_adapter"]) == 3
    assert result.state.step.shape == (3,)
    b0 = np.asarray(nnx.state(trainer.model(result.state, 1), nnx.Param)
                    ["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...])
    np.testing.assert_array_equal(
        b0, np.asarray(model.model.layers[0].self_attn.q_proj.kernel[...]))

    full_cfg = TrainConfig(learning_rate=1e-2, total_steps=40, warmup_steps=3, weight_decay=0.01,
                           max_grad_norm=1.0)
    plain = random_model(seed=11)
    states = sequential_finetune(plain, full_cfg, [iterator(t, offset=t + 1) for t in range(2)],
                                 num_steps=2, log_every=2, progress=False)
    assert len(states) == 2 and tree_max_diff(tree_copy(states[0]), tree_copy(states[1])) > 0
    # Each task equals its own `finetune` from the same start, seed `seed + t` and the given loss.
    states = sequential_finetune(plain, full_cfg, [iterator(t, offset=t + 1) for t in range(2)],
                                 num_steps=2, seed=5, loss_fn=embedding_loss, progress=False)
    for t in range(2):
        alone = finetune(Trainer(plain, full_cfg, loss_fn=embedding_loss),
                         iterator(t, offset=t + 1), num_steps=2, seed=5 + t, progress=False)
        assert tree_max_diff(tree_copy(states[t]), tree_copy(alone.state.params)) == 0
    default = finetune(Trainer(plain, full_cfg), iterator(1, offset=2), num_steps=2, seed=6,
                       progress=False)
    assert tree_max_diff(tree_copy(states[1]), tree_copy(default.state.params)) > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"num_steps": 0}, "num_steps must be >= 1, got 0"),
    ({"num_steps": 2.0}, "num_steps must be an int"), ({"log_every": True}, "log_every must be"),
    ({"checkpoint_every": 2}, "checkpoint_every is set but checkpoint_dir is None"),
    ({"checkpoint_every": 0, "checkpoint_dir": "x"}, "checkpoint_every must be >= 1, got 0"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*32\), got -1"),
    ({"seed": 2**32}, r"seed must be in \[0, 2\*\*32\)"),
    # Checked at entry, not after log_every steps of training.
    ({"on_log": "print", "checkpoint_dir": "x"},
     r"on_log must be a callable taking each history entry \(a dict\) or None, got str"),
])
def test_loop_argument_errors(tmp_path, kwargs, match):
    trainer = Trainer(random_model(seed=0, lora=LORA), LORA_CFG)
    if "checkpoint_dir" in kwargs:
        kwargs = {**kwargs, "checkpoint_dir": str(tmp_path / kwargs["checkpoint_dir"])}
    with pytest.raises(ValueError, match=match):
        finetune(trainer, iterator(0), progress=False, **kwargs)
    assert not (tmp_path / "x").exists()  # refused before a checkpoint directory is made


def test_loop_refuses_a_list_of_batches_up_front(tmp_path):
    trainer = Trainer(random_model(seed=0, lora=LORA), LORA_CFG)
    with pytest.raises(ValueError, match=r"data must be an iterator of Batch \(with __next__\), "
                                         r"got list: wrap a list of batches in iter\(\.\.\.\)"):
        finetune(trainer, [next(iterator(0))], num_steps=1, progress=False, resume=False,
                 checkpoint_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_loop_accepts_numpy_ints():
    trainer = Trainer(random_model(seed=0, lora=LORA), LORA_CFG)
    with pytest.raises(ValueError, match="data ran out at step 1 of 1"):  # got past the checks
        finetune(trainer, iter([]), num_steps=np.int64(1), log_every=np.int32(1), progress=False)


def test_logged_loss_is_the_mean_over_target_tokens_not_over_steps():
    """A history entry's loss covers every target token since the last log: steps with more
    target tokens weigh more (the mean of per-step means is not the window's loss). Reference:
    the per-step losses of the same run logged every step, weighted by each batch's target
    tokens counted on the host. Likewise per adapter, and pooled over adapters."""
    model = random_model(seed=8, lora=LORA)
    kw = {"num_steps": 4, "seed": 3, "progress": False}
    every = finetune(Trainer(model, LORA_CFG), iterator(0), log_every=1, **kw).history
    window = finetune(Trainer(model, LORA_CFG), iterator(0), log_every=4, **kw).history
    data = iterator(0)
    tokens = np.asarray([next(data).loss_mask.sum() for _ in range(4)], np.float64)
    assert len(set(tokens.tolist())) > 1  # unequal steps: the two means differ
    losses = np.asarray([h["loss"] for h in every], np.float64)
    want = np.sum(losses * tokens) / np.sum(tokens)
    assert abs(want - losses.mean()) > 1e-4
    np.testing.assert_allclose(window[-1]["loss"], want, rtol=1e-6)

    trainer = AdapterTrainer(model, LORA_CFG, init_adapters(model, 3, seed=0))

    def stacked():
        return StackedIterator([iterator(t, offset=t + 1) for t in range(3)])

    every = finetune(trainer, stacked(), log_every=1, **kw).history
    window = finetune(trainer, stacked(), log_every=4, **kw).history
    data = stacked()
    tokens = np.asarray([next(data).loss_mask.sum(axis=(1, 2)) for _ in range(4)], np.float64)
    losses = np.asarray([h["loss_per_adapter"] for h in every], np.float64)  # [steps, T]
    np.testing.assert_allclose(window[-1]["loss_per_adapter"],
                               np.sum(losses * tokens, 0) / np.sum(tokens, 0), rtol=1e-6)
    np.testing.assert_allclose(window[-1]["loss"], np.sum(losses * tokens) / np.sum(tokens),
                               rtol=1e-6)


def test_checkpointer_steps_are_ints_named_when_not(tmp_path):
    """A step given as a string failed with "not all arguments converted during string
    formatting"; a negative or float step was written as checkpoint "-2" / "2.0". A 0-d integer
    array (`int(state.step)` not called) is a step like its int."""
    trainer = Trainer(random_model(seed=8, lora=LORA), LORA_CFG)
    state = trainer.init(seed=0)
    manager = Checkpointer(tmp_path, every=2)
    for step, why in (("2", "must be an int, got '2'"), (2.0, "must be an int, got 2.0"),
                      (-2, "must be >= 0, got -2"), (np.zeros(2, np.int32), "must be an int")):
        with pytest.raises(ValueError, match=rf"step {why}"):
            manager.save(step, state)
    assert manager.save(state.step, state)  # int32 [] array: step 0
    manager.wait()
    assert manager.all_steps() == [0]
    for step in ("0", -1):
        with pytest.raises(ValueError, match="step must be"):
            manager.restore(trainer.abstract_state(), step=step)
    assert int(manager.restore(trainer.abstract_state(), step=np.int64(0))[0].step) == 0
    manager.close()


def test_checkpointer_directory_is_checked_by_name(tmp_path):
    """`Checkpointer(None)` failed with os.fspath's TypeError naming no argument, and a directory
    that is an existing file was accepted, to fail only at the first save in orbax's thread."""
    for bad in (None, 3):
        with pytest.raises(ValueError, match=rf"directory must be a path .*got {type(bad).__name__}"):
            Checkpointer(bad, every=1)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=r"directory=.*afile' is an existing file"):
        Checkpointer(afile, every=1)
    assert afile.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_checkpointer_close_releases_the_manager_when_a_save_failed(tmp_path):
    """A failed background save is raised by orbax's wait (once, as its finalize thread does):
    close() then skipped the manager's release, leaving its threads and files open."""
    manager = Checkpointer(tmp_path, every=1)
    real_wait, released = manager.manager.wait_until_finished, []
    failures = [OSError("[Errno 28] No space left on device (background checkpoint write)")]

    def wait_once_failing():
        if failures:
            raise failures.pop()
        real_wait()

    real_release = manager.manager.close
    manager.manager.wait_until_finished = wait_once_failing
    manager.manager.close = lambda: (released.append(True), real_release())[1]
    with pytest.raises(OSError, match="No space left on device"):
        manager.close()
    assert released == [True]


def _warmup_cosine(cfg, step):
    """The learning rate of 0-based `step` under `cfg`, by the formula (NumPy float64)."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps)
    end = cfg.learning_rate * cfg.end_lr_ratio
    return end + (cfg.learning_rate - end) * 0.5 * (1 + np.cos(np.pi * t))


def test_a_run_that_went_non_finite_resumes_its_last_checkpoint_with_a_lower_learning_rate(
        tmp_path):
    """The error advises a lower learning rate; the kept checkpoint must accept it (a resume used
    to refuse any TrainConfig change): optimiser settings may change on resume, with a warning
    naming them, and the run goes on from the checkpoint under the new schedule. What shapes the
    state (max_grad_norm None <-> a number) is still refused (grad_accum: see
    test_checkpoint_dir_belongs_to_one_run)."""
    model = random_model(seed=9)
    cfg = TrainConfig(learning_rate=3e38, total_steps=10, warmup_steps=1, weight_decay=10.0,
                      max_grad_norm=None)
    ckpt = str(tmp_path / "ckpt")
    kw = {"num_steps": 4, "checkpoint_dir": ckpt, "checkpoint_every": 1, "log_every": 1,
          "progress": False}
    with pytest.raises(NonFiniteLossError, match=r"resume .*lower TrainConfig\.learning_rate"):
        finetune(Trainer(model, cfg, loss_fn=embedding_loss), iterator(1), **kw)
    lower = cfg.replace(learning_rate=1e-2, warmup_steps=2)
    # Clipping turned on changes the optimiser state's structure: refused, by name.
    with pytest.raises(ValueError, match=r"another run .*TrainConfig\.max_grad_norm: None vs 1\.0"):
        finetune(Trainer(model, lower.replace(max_grad_norm=1.0), loss_fn=embedding_loss),
                 iterator(1), **kw)
    # Reference: the checkpoint's state (the initial weights: lr 0 at step 1) stepped by hand
    # over batches 2..4 under the new settings.
    trainer = Trainer(model, lower, loss_fn=embedding_loss)
    manager = Checkpointer(ckpt, every=1)
    state, _, _ = manager.restore(trainer.abstract_state())
    manager.close()
    assert int(state.step) == 1
    data = iterator(1)
    next(data)
    for _ in range(3):
        state, _ = trainer.step(state, trainer.place_batch(next(data)))
    with pytest.warns(UserWarning, match=r"TrainConfig\.learning_rate: 3e\+38 -> 0\.01; "
                                         r"TrainConfig\.warmup_steps: 1 -> 2"):
        result = finetune(Trainer(model, lower, loss_fn=embedding_loss), iterator(1),
                          **{**kw, "checkpoint_every": 4})
    assert result.resumed_from == 1 and int(result.state.step) == 4
    # Steps 2..4 ran at the new schedule's rates (0-based steps 1..3).
    np.testing.assert_allclose([h["lr"] for h in result.history[-3:]],
                               [_warmup_cosine(lower, s) for s in (1, 2, 3)], rtol=1e-6)
    assert tree_max_diff(tree_copy(state.params), tree_copy(result.state.params)) <= 1e-6
    # The checkpoints written since record the new settings: resuming them again is silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = finetune(Trainer(model, lower, loss_fn=embedding_loss), iterator(1),
                         **{**kw, "num_steps": 5, "checkpoint_every": 4})
    assert again.resumed_from == 4


def test_a_failed_background_save_does_not_hide_the_error_that_stopped_the_run(
        tmp_path, monkeypatch):
    """When training stops with an error and closing the checkpointer then fails too (an async
    save that could not be written), the user gets the training error, the close failure as a
    note on it; with no training error the close failure itself is raised."""
    trainer = Trainer(random_model(seed=8, lora=LORA), LORA_CFG)

    real_close = Checkpointer.close

    def failing_close(self):  # waits for the pending saves, then reports one that failed
        real_close(self)
        raise OSError("[Errno 28] No space left on device (background checkpoint write)")

    monkeypatch.setattr(Checkpointer, "close", failing_close)
    kw = {"num_steps": 4, "checkpoint_every": 2, "progress": False, "seed": 3}
    with pytest.raises(Killed) as err:
        finetune(trainer, DiesAt(iterator(0), 3), checkpoint_dir=str(tmp_path / "a"), **kw)
    assert any("No space left on device" in note for note in getattr(err.value, "__notes__", []))
    with pytest.raises(OSError, match="No space left on device"):
        finetune(trainer, iterator(0), checkpoint_dir=str(tmp_path / "b"), **kw)



def test_tokens_per_s_counts_the_global_batch_of_every_process(monkeypatch):
    """With several processes each feeds its own rows and `place_batch` makes the global batch
    the step trains on: the throughput counts all of it, not this process's rows only. Two
    processes are simulated by a `place_batch` that appends the other process's rows; the clock
    ticks one second per step."""
    from taskpgm_jax.data import Batch
    from taskpgm_jax.train import loop

    theirs, mine = iterator(5, batch=BATCH // 2), iterator(6, batch=BATCH // 2)
    seen = []

    class ProcessZeroOfTwo(Trainer):
        def place_batch(self, batch):
            other = next(theirs)
            seen.append(int((batch.segment_ids > 0).sum() + (other.segment_ids > 0).sum()))
            return super().place_batch(Batch(*(np.concatenate(xs)
                                               for xs in zip(batch, other, strict=True))))

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: len(seen)))
    trainer = ProcessZeroOfTwo(random_model(seed=8, lora=LORA), LORA_CFG)
    result = finetune(trainer, mine, num_steps=4, log_every=2, progress=False)
    assert len(seen) == 4 and seen[0] != seen[1]
    np.testing.assert_allclose([h["tokens_per_s"] for h in result.history],
                               [(seen[0] + seen[1]) / 2, (seen[2] + seen[3]) / 2])
