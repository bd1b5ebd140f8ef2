"""T adapters side by side equal T separate runs; the stacked iterator; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taskpgm_jax.data import Batch, HostIterator
from taskpgm_jax.models import LoRAParam, lora_state, stack_adapters
from taskpgm_jax.train import AdapterTrainer, StackedIterator, TrainConfig, Trainer
from tests.train.conftest import (
    LORA,
    batches,
    iterator,
    random_model,
    successor_seqs,
    tree_copy,
    tree_max_diff,
)

T = 3
CFG = TrainConfig(learning_rate=1e-2, total_steps=40, warmup_steps=3, weight_decay=0.01,
                  max_grad_norm=1.0, trainable="lora")


def random_adapters(model, rng):
    return [jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                         lora_state(model)) for _ in range(T)]


def test_side_by_side_equals_separate_runs(rng):
    model = random_model(seed=7, lora=LORA)
    adapters = random_adapters(model, rng)
    # Each adapter its own task (a different successor offset) and its own batches.
    data = [batches(rng, 3, offset=t + 1) for t in range(T)]
    base = tree_copy(nnx.state(model, nnx.Param))

    trainer = AdapterTrainer(model, CFG, stack_adapters(adapters))
    state = trainer.init(seed=10)
    joint_losses = []
    for s in range(3):
        stacked = Batch(*(np.stack(xs) for xs in zip(*[data[t][s] for t in range(T)], strict=True)))
        state, metrics = trainer.step(state, trainer.place_batch(stacked))
        assert metrics["loss"].shape == (T,)
        joint_losses.append(np.asarray(metrics["loss"]))
    joint = tree_copy(trainer.adapters(state))

    for t in range(T):
        nnx.update(model, adapters[t])
        single = Trainer(model, CFG)
        st = single.init(seed=10 + t)
        for s in range(3):
            st, m = single.step(st, single.place_batch(data[t][s]))
            np.testing.assert_allclose(float(m["loss"]), joint_losses[s][t], rtol=1e-5)
        alone = tree_copy(st.params)
        assert tree_max_diff(jax.tree.map(lambda x, t=t: x[t], joint), alone) < 1e-5
        assert tree_max_diff(alone, tree_copy(adapters[t])) > 1e-3  # it trained
    # The shared base was never written.
    assert tree_max_diff(nnx.state(trainer.model(state, 0), nnx.Param), base) == 0.0
    with pytest.raises(ValueError, match="index"):
        trainer.model(state, T)


def test_stacked_iterator_resumes_every_task():
    its = StackedIterator([iterator(t, offset=t + 1, batch=4) for t in range(2)])
    next(its)
    saved = its.state()
    want = next(its)
    again = StackedIterator([iterator(t, offset=t + 1, batch=4) for t in range(2)])
    again.restore(saved)
    got = next(again)
    assert got.input_ids.shape == (2, 4, 16)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_stacked_iterator_stops_without_losing_batches():
    """When the shorter task runs out, the longer one is not left a batch ahead."""
    def finite(seed, n):
        return HostIterator(successor_seqs(np.random.default_rng(seed), n), batch_size=2,
                            seq_len=16, seed=seed, pack=False, num_epochs=1)

    short, long_ = finite(1, 6), finite(2, 10)  # 3 and 5 batches
    its = StackedIterator([long_, short])  # the long one is drawn first
    assert len(list(its)) == 3
    assert [s["step"] for s in its.state()["tasks"]] == [3, 3]
    # The long task's next batch is its 4th: nothing was consumed by the failed draw.
    ref = finite(2, 10)
    for _ in range(3):
        next(ref)
    for a, b in zip(next(long_), next(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_adapter_trainer_errors():
    model = random_model(seed=0, lora=LORA)
    adapters = stack_adapters([lora_state(model)] * 2)
    with pytest.raises(ValueError, match="trainable"):
        AdapterTrainer(model, CFG.replace(trainable="full"), adapters)
    with pytest.raises(ValueError, match="structure"):
        AdapterTrainer(model, CFG, nnx.State({"x": jnp.zeros((2, 3))}))
    trainer = AdapterTrainer(model, CFG, adapters)
    b = batches(np.random.default_rng(0), 1)[0]
    with pytest.raises(ValueError, match=r"state must be a dict \{'tasks': \[\.\.\.\]\}"):
        StackedIterator([iterator(0)]).restore(None)
    # A plain task iterator has no position: named, not an AttributeError from inside.
    plain = StackedIterator([iterator(0), iter([b])])
    assert not plain.resumable
    for method, args in (("state", ()), ("restore", ({"tasks": [{}, {}]},))):
        with pytest.raises(ValueError, match=rf"StackedIterator\.{method}\(\): task iterators \[1\] "
                                             r"have no state\(\)/restore\(\)"):
            getattr(plain, method)(*args)
    with pytest.raises(ValueError, match="num_adapters=2"):
        trainer.place_batch(Batch(*(np.stack([x] * 3) for x in b)))
    assert not any(isinstance(v, LoRAParam) for v in jax.tree.leaves(
        trainer.frozen, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    # The trainer starts from the adapters as they were when it was built: an in-place edit of
    # the caller's State afterwards does not reach it (the arrays are shared, not copied).
    given = [np.asarray(x) for x in jax.tree.leaves(adapters)]
    for var in jax.tree.leaves(adapters, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        var[...] = var[...] + 1.0
    kept = jax.tree.leaves(trainer._trainable())
    assert all(np.array_equal(np.asarray(k), g) for k, g in zip(kept, given, strict=True))


def test_init_adapters_in_rounds_equals_all_at_once(rng):
    """Adapters first .. first + n - 1 made alone equal those rows of the whole set; B is zero
    and A has the requested spread."""
    from taskpgm_jax.train import init_adapters

    model = random_model(seed=int(rng.integers(1000)), lora=LORA)
    seed = int(rng.integers(1 << 20))
    whole = init_adapters(model, 6, seed=seed, std=0.5)
    part = init_adapters(model, np.int64(2), seed=np.int64(seed), std=0.5, first=np.int32(3))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(whole), jax.tree.leaves(part), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[3:5], np.asarray(b))
        if "lora_b" in jax.tree_util.keystr(path):
            assert not np.any(np.asarray(a))
        else:
            assert 0.3 < np.std(np.asarray(a)) < 0.7
    for kwargs, match in (({"first": -1}, "first must be >= 0, got -1"),
                          ({"seed": -1}, r"seed must be in \[0, 2\*\*32\), got -1"),
                          ({"num_adapters": True}, "num_adapters must be an int, got True")):
        with pytest.raises(ValueError, match=match):
            init_adapters(model, **{"num_adapters": 2, **kwargs})


def test_adapter_trainer_names_bad_adapters_and_batches_of_another_t():
    """Adapters that are neither a stacked State nor a list of States, and a NumPy batch given
    straight to step() with another number of task rows, are refused by name (were a TypeError
    from inside jnp.asarray / list(), and vmap's "inconsistent sizes")."""
    model = random_model(seed=0, lora=LORA)
    for bad, what in ((5, "int"), ({"q": 1}, "dict"), (["x"], r"a list holding str")):
        with pytest.raises(ValueError, match=rf"adapters must be a stacked nnx\.State .*{what}"):
            AdapterTrainer(model, CFG, bad)
    trainer = AdapterTrainer(model, CFG, stack_adapters([lora_state(model)] * 2))
    b = batches(np.random.default_rng(0), 1)[0]
    with pytest.raises(ValueError, match="batch has 3 task rows on axis 0, expected "
                                         "num_adapters=2"):
        trainer.step(None, Batch(*(np.stack([x] * 3) for x in b)))
