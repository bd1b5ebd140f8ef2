"""Training on 8 emulated devices (data x fsdp x tensor = 2 x 2 x 2) equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from taskpgm_jax.models import LoRAParam, lora_state, stack_adapters
from taskpgm_jax.sharding import make_mesh
from taskpgm_jax.train import AdapterTrainer, StackedIterator, Trainer, finetune
from tests.train.conftest import (
    LORA,
    batches,
    iterator,
    random_model,
    tree_copy,
    tree_max_diff,
)
from tests.train.test_adapters import CFG as LORA_CFG
from tests.train.test_step import CFG


def test_sharded_training_equals_single_device(rng, cpu_mesh_devices):
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=cpu_mesh_devices)
    model = random_model(seed=12)
    cfg = CFG.replace(grad_accum=2)  # micro-batches are split over the mesh too
    data = batches(rng, 3)
    runs = {}
    for name, m in (("single", None), ("mesh", mesh)):
        trainer = Trainer(model, cfg, mesh=m)
        state = trainer.init(seed=0)
        losses = []
        for b in data:
            placed = trainer.place_batch(b)
            state, metrics = trainer.step(state, placed)
            losses.append(float(metrics["loss"]))
        runs[name] = (state, losses, placed)
    state, _, placed = runs["mesh"]
    # FSDP over the embedding axis, tensor parallelism over the MLP axis; Adam moments alike.
    up = state.params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
    assert up.sharding.spec == P("fsdp", "tensor")
    mu = state.opt_state[1][0].mu["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
    assert mu.sharding.spec == P("fsdp", "tensor")
    assert placed.input_ids.sharding.spec == P(("data", "fsdp"), None)
    assert len({d.id for d in up.sharding.device_set}) == 8
    np.testing.assert_allclose(runs["mesh"][1], runs["single"][1], rtol=1e-5)
    assert tree_max_diff(tree_copy(runs["mesh"][0].params), tree_copy(runs["single"][0].params)) < 1e-5
    assert tree_max_diff(tree_copy(state.params), tree_copy(nnx.state(model, nnx.Param))) > 1e-3


def test_sharded_adapters_resume_into_sharded_state(tmp_path, cpu_mesh_devices):
    """T adapters on the mesh, checkpointed, restored into the abstract sharded state and
    continued, equal an uninterrupted single-device side-by-side run."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=cpu_mesh_devices)
    model = random_model(seed=13, lora=LORA)
    adapters = stack_adapters([lora_state(model)] * 3)

    def data():
        return StackedIterator([iterator(t, offset=t + 1) for t in range(3)])

    single = finetune(AdapterTrainer(model, LORA_CFG, adapters), data(), num_steps=6, log_every=2,
                      progress=False)
    sharded = AdapterTrainer(model, LORA_CFG, adapters, mesh=mesh)
    kw = {"log_every": 2, "progress": False, "checkpoint_dir": str(tmp_path / "ckpt")}
    finetune(sharded, data(), num_steps=4, **kw)
    resumed = finetune(sharded, data(), num_steps=6, **kw)
    assert resumed.resumed_from == 4
    lora_a = resumed.state.params["model"]["layers"][0]["mlp"]["up_proj"]["lora_a"][...]
    assert lora_a.sharding.spec == P(None, "fsdp", None)  # [T, D, R]: adapters replicated, FSDP on D
    assert tree_max_diff(tree_copy(single.state.params), tree_copy(resumed.state.params)) < 1e-5
    np.testing.assert_allclose([h["loss"] for h in single.history],
                               [h["loss"] for h in resumed.history], rtol=1e-5)


@pytest.mark.parametrize("sharded", [False, True])
def test_trainer_keeps_the_base_as_it_was_when_built(sharded, cpu_mesh_devices):
    """Editing the model after building the Trainer changes neither path's frozen base (without
    a mesh it used to alias the model's variables, with one it was a snapshot); without a mesh
    the arrays themselves are shared, not copied (a large base is not duplicated)."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=cpu_mesh_devices) if sharded else None
    model = random_model(seed=12, lora=LORA)
    frozen = nnx.Not(LoRAParam)
    arrays = jax.tree.leaves(nnx.state(model, frozen))  # the arrays, not the (live) Variables
    before = tree_copy(nnx.state(model, frozen))
    trainer = Trainer(model, LORA_CFG, mesh=mesh)
    nnx.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.All(nnx.Param, frozen))))
    assert tree_max_diff(tree_copy(nnx.state(model, frozen)), before) > 0.1  # edited
    assert tree_max_diff(tree_copy(trainer.frozen), before) == 0.0
    if not sharded:
        assert all(a is b for a, b in zip(jax.tree.leaves(trainer.frozen), arrays, strict=True))


def test_a_batch_the_data_axes_do_not_divide_warns(cpu_mesh_devices):
    """data x fsdp = 4 devices share the rows; 6 rows cannot be split, so the batch is replicated
    (every device computes all of it) and the user is told, by name of the axes and the size."""
    import warnings

    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=cpu_mesh_devices)
    model = random_model(seed=12, lora=LORA)
    trainer = Trainer(model, LORA_CFG, mesh=mesh)
    with pytest.warns(UserWarning, match=r"a batch of 6 rows does not divide over the mesh's "
                                         r"data axes \('data', 'fsdp'\) \(size 4\).*multiple of 4"):
        assert trainer.batch_sharding((6, 16)).spec == P(None, None)
    adapters = AdapterTrainer(model, LORA_CFG, stack_adapters([lora_state(model)] * 2), mesh=mesh)
    with pytest.warns(UserWarning, match="a batch of 10 rows does not divide"):
        assert adapters.batch_sharding((2, 10, 16)).spec == P(None, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rows that divide: split, silently
        # place_batch asks every step: the same shape warns once per trainer, not every step.
        assert trainer.batch_sharding((6, 16)).spec == P(None, None)
        assert trainer.batch_sharding((8, 16)).spec == P(("data", "fsdp"), None)
        assert adapters.batch_sharding((2, 4, 16)).spec == P(None, ("data", "fsdp"), None)


def test_a_model_on_a_mesh_needs_the_mesh(cpu_mesh_devices):
    """A model placed on a mesh (init_model(..., mesh=mesh)) given to a trainer without mesh=:
    named when the trainer is built (was JAX's "Received incompatible devices for jitted
    computation" from inside init())."""
    from jax.sharding import NamedSharding

    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=cpu_mesh_devices)
    model = random_model(seed=12, lora=LORA)
    nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
    for build in (lambda: Trainer(model, LORA_CFG),
                  lambda: AdapterTrainer(model, LORA_CFG, stack_adapters([lora_state(model)] * 2))):
        with pytest.raises(ValueError, match=r"mesh=None but the model's arrays lie on 8 devices"
                                             r".*pass that mesh: mesh=mesh"):
            build()
