"""Guards of the loop and the adapter helpers: a checkpoint on another base model or other initial
weights, one iterator where a list is due, a run past the schedule, bad arguments named."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taskpgm_jax.models import LoRAParam, lora_state
from taskpgm_jax.train import (
    AdapterTrainer,
    Checkpointer,
    StackedIterator,
    TrainConfig,
    Trainer,
    finetune,
    init_adapters,
    loop,
    sequential_finetune,
)
from tests.train.conftest import LORA, iterator, random_model
from tests.train.test_adapters import CFG as LORA_CFG

KW = {"log_every": 2, "checkpoint_every": 2, "progress": False}
FULL_CFG = TrainConfig(learning_rate=1e-2, total_steps=40, warmup_steps=3, weight_decay=0.01,
                       max_grad_norm=1.0)


def _perturbed_adapters(model, rng):
    """The same base, other initial adapter values."""
    other = nnx.clone(model)
    nnx.update(other, jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), lora_state(model)))
    return other


def test_resume_refuses_another_base_or_other_initial_weights(tmp_path, rng):
    seed = int(rng.integers(1 << 16))
    model = random_model(seed=seed, lora=LORA)
    ckpt = str(tmp_path / "lora")
    finetune(Trainer(model, LORA_CFG), iterator(0), num_steps=4, checkpoint_dir=ckpt, **KW)
    another_base = r"holds a run on another base model \(frozen weights\)"
    with pytest.raises(ValueError, match=another_base + ".*another \\(or an emptied\\) "
                                         "checkpoint_dir"):
        finetune(Trainer(random_model(seed=seed + 1, lora=LORA), LORA_CFG), iterator(0),
                 num_steps=6, checkpoint_dir=ckpt, **KW)
    with pytest.raises(ValueError, match=r"holds a run on other initial trainable weights"):
        finetune(Trainer(_perturbed_adapters(model, rng), LORA_CFG), iterator(0), num_steps=6,
                 checkpoint_dir=ckpt, **KW)
    assert Checkpointer(ckpt, every=2).all_steps() == [2, 4]  # nothing written by the refusals
    # The same base and start resume (a rebuilt, equal model too).
    again = finetune(Trainer(random_model(seed=seed, lora=LORA), LORA_CFG), iterator(0),
                     num_steps=6, checkpoint_dir=ckpt, **KW)
    assert again.resumed_from == 4 and int(again.state.step) == 6

    # Full fine-tuning: other initial weights would be silently replaced by the checkpoint's.
    full = str(tmp_path / "full")
    finetune(Trainer(random_model(seed=seed), FULL_CFG), iterator(0), num_steps=2,
             checkpoint_dir=full, **KW)
    with pytest.raises(ValueError, match="holds a run on other initial trainable weights"):
        finetune(Trainer(random_model(seed=seed + 1), FULL_CFG), iterator(0), num_steps=4,
                 checkpoint_dir=full, **KW)


def test_adapter_runs_refuse_other_initial_adapters(tmp_path, rng):
    model = random_model(seed=int(rng.integers(1 << 16)), lora=LORA)
    seed = int(rng.integers(1 << 16))

    def data():
        return StackedIterator([iterator(t, offset=t + 1) for t in range(2)])

    ckpt = str(tmp_path / "ckpt")
    finetune(AdapterTrainer(model, LORA_CFG, init_adapters(model, 2, seed=seed)), data(),
             num_steps=2, checkpoint_dir=ckpt, **KW)
    with pytest.raises(ValueError, match="other initial trainable weights"):
        finetune(AdapterTrainer(model, LORA_CFG, init_adapters(model, 2, seed=seed + 1)), data(),
                 num_steps=4, checkpoint_dir=ckpt, **KW)


def test_checkpoint_without_fingerprint_resumes_with_a_warning(tmp_path, rng):
    """Checkpoints written before the fingerprints were stored: still resumed, with a warning."""
    model = random_model(seed=int(rng.integers(1 << 16)), lora=LORA)
    trainer = Trainer(model, LORA_CFG)
    settings = loop._run_settings(trainer, 3)
    assert {"fingerprint base", "fingerprint initial"} <= settings.keys()
    old = {k: v for k, v in settings.items() if not k.startswith("fingerprint")}
    manager = Checkpointer(tmp_path, every=1)
    manager.save(0, trainer.init(seed=3), data_state=iterator(0).state(),
                 meta={"run": old, "history": [], "window": []})
    manager.close()
    with pytest.warns(UserWarning, match="does not record a fingerprint of its base model"):
        result = finetune(Trainer(random_model(seed=1, lora=LORA), LORA_CFG), iterator(0),
                          seed=3, num_steps=1, progress=False, checkpoint_dir=str(tmp_path))
    assert result.resumed_from == 0 and int(result.state.step) == 1


def test_fingerprint_reads_only_samples_and_ignores_the_layout(rng, cpu_mesh_devices):
    """The same values on a mesh or on one device fingerprint alike (a run may resume on another
    mesh); one changed sampled value changes it."""
    from taskpgm_jax.sharding import make_mesh

    model = random_model(seed=int(rng.integers(1 << 16)))
    params = nnx.state(model, nnx.Param)
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=cpu_mesh_devices)
    plain = Trainer(model, FULL_CFG)
    sharded = Trainer(model, FULL_CFG, mesh=mesh)
    one = loop._fingerprint(params, plain._default_sharding())
    assert loop._fingerprint(sharded._place(params), sharded._default_sharding()) == one
    leaf = params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    index = loop._sample_index(leaf.shape)
    assert len(index[0]) <= loop._SAMPLES < leaf.size  # a sample, not the whole array
    changed = jax.tree.map(lambda x: x, params)
    pos = tuple(int(i[len(i) // 2]) for i in index)
    changed["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...] = leaf[...].at[pos].add(1.0)
    assert loop._fingerprint(changed, plain._default_sharding()) != one


def test_run_past_the_schedule_is_refused(tmp_path):
    trainer = Trainer(random_model(seed=0, lora=LORA), LORA_CFG.replace(total_steps=10))
    with pytest.raises(ValueError, match=re.escape(
            "num_steps=30 > TrainConfig.total_steps=10: the schedule ends at 10; raise "
            "total_steps")):
        finetune(trainer, iterator(0), num_steps=30, progress=False,
                 checkpoint_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_one_iterator_where_a_list_of_task_iterators_is_due():
    """Used to hang: list() of an endless iterator never returns."""
    model = random_model(seed=0)
    for call, name in ((lambda d: StackedIterator(d), "iterators"),
                       (lambda d: sequential_finetune(model, FULL_CFG, d, num_steps=1,
                                                      progress=False), "data")):
        with pytest.raises(ValueError, match=rf"{name} must be a list of per-task iterators, got "
                                             r"one HostIterator"):
            call(iterator(0))
        batch = next(iterator(0))
        with pytest.raises(ValueError, match=rf"{name}\[1\] must be an iterator of Batch .*got "
                                             r"list: wrap a list of batches in iter\(\.\.\.\)"):
            call([iterator(0), [batch]])
        with pytest.raises(ValueError, match=rf"{name} is empty"):
            call([])
        # A plain generator of batches is one task's stream too (seen at its first element).
        with pytest.raises(ValueError, match=rf"{name} must be a list of per-task iterators, "
                                             r"got one generator of batches"):
            call(b for b in iterator(0))
    # A generator of per-task iterators is a list of tasks, as before (it used to go through
    # list()): the same batches as the list.
    stacked = StackedIterator(iterator(t) for t in range(2))
    want = StackedIterator([iterator(t) for t in range(2)])
    for _ in range(2):
        for got, ref in zip(next(stacked), next(want), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_argument_errors_named(tmp_path, rng):
    model = random_model(seed=0, lora=LORA)
    # init_adapters std: NaN gave NaN adapters, a string or None a TypeError from inside.
    for std in (float("nan"), float("inf"), -0.1, "0.02", None, True):
        with pytest.raises(ValueError, match=r"std must be a finite number >= 0, got"):
            init_adapters(model, 2, std=std)
    std = float(rng.uniform(0.5, 2.0))
    for given in (np.float32(std), jnp.float32(std)):  # 0-d NumPy and JAX numbers are numbers
        a = np.asarray(jax.tree.leaves(init_adapters(model, 4, std=given))[0])
        assert abs(a.std() / std - 1) < 0.25
    # Unstacked adapters: said so, not a per-leaf shape mismatch.
    with pytest.raises(ValueError, match=r"adapters must be stacked \[T, \.\.\.\].*"
                                         r"init_adapters\(model, T\) or stack_adapters"):
        AdapterTrainer(model, LORA_CFG, lora_state(model))
    trainer = AdapterTrainer(model, LORA_CFG, init_adapters(model, 2))
    state = trainer.init()
    for index in (1.0, True, np.bool_(True), "1", -1, 2):
        with pytest.raises(ValueError, match=r"index must be an int adapter index in \[0, 2\)"):
            trainer.model(state, index)
    picked = trainer.model(state, np.int64(1))
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(nnx.state(picked, LoRAParam))[0]),
        np.asarray(jax.tree.leaves(state.params)[0])[1])
    # A State where the model is due: refused by name, not inside the first step.
    with pytest.raises(ValueError, match="model must be an nnx.Module .* got State"):
        Trainer(nnx.state(model), LORA_CFG)
    plain = Trainer(model, LORA_CFG)
    with pytest.raises(ValueError, match="resume must be True or False, got 'no'"):
        finetune(plain, iterator(0), num_steps=1, progress=False, resume="no")
    # A checkpoint_dir that is a file: refused before training (orbax failed at the first save).
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"checkpoint_dir=.*afile' is an existing file"):
        finetune(plain, iterator(0), num_steps=2, progress=False, checkpoint_dir=str(afile))
    # Data that runs out without a checkpoint_dir: the message says nothing was saved.
    with pytest.raises(ValueError, match=r"data ran out at step 2 of 2; nothing was saved \(no "
                                         r"checkpoint_dir\)"):
        finetune(plain, iter([next(iterator(0))]), num_steps=2, progress=False)


def test_sequential_finetune_checks_every_task_before_training_any(tmp_path):
    """A task iterator that cannot be resumed (checkpoint_root, resume=True) was refused only
    when its turn came, after every task before it had trained; checkpoint arguments are named
    as sequential_finetune takes them (checkpoint_root), not as finetune does."""
    model = random_model(seed=0)
    root = tmp_path / "root"
    batch = next(iterator(1))
    with pytest.raises(ValueError, match=r"data\[1\] \(list_iterator\) has no state\(\)/restore\(\)"
                                         r".*or resume=False"):
        sequential_finetune(model, FULL_CFG, [iterator(0), iter([batch] * 2)], num_steps=2,
                            progress=False, checkpoint_root=str(root))
    assert not root.exists()  # nothing trained or written
    with pytest.raises(ValueError, match="checkpoint_every is set but checkpoint_root is None"):
        sequential_finetune(model, FULL_CFG, [iterator(0)], num_steps=1, progress=False,
                            checkpoint_every=1)
    with pytest.raises(ValueError, match=r"takes checkpoint_root .*task_<t>.*not checkpoint_dir"):
        sequential_finetune(model, FULL_CFG, [iterator(0)], num_steps=1, progress=False,
                            checkpoint_dir=str(root))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"checkpoint_root=.*afile' is an existing file"):
        sequential_finetune(model, FULL_CFG, [iterator(0)], num_steps=1, progress=False,
                            checkpoint_root=str(afile))
