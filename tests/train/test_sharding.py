"""Training on 8 emulated devices (data x fsdp x tensor = 2 x 2 x 2) equals one device."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from taskpgm_jax.sharding import make_mesh
from taskpgm_jax.train import Trainer
from tests.train.conftest import batches, random_model, tree_copy, tree_max_diff
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
