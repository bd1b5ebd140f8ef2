"""Mesh construction and logical -> mesh axis rules."""

import warnings

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from taskpgm_jax.models import init_model
from taskpgm_jax.sharding import logical_to_spec, make_mesh, named_sharding


def test_mesh_axes_and_types():
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(make_mesh(data=np.int64(2), fsdp=-1).shape)["fsdp"] == 4  # NumPy ints are fine
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=3, fsdp=1, tensor=1)


def test_rules_with_divisibility_and_reuse():
    shape = {"data": 2, "fsdp": 2, "tensor": 2}
    assert logical_to_spec(("embed", "mlp"), mesh_shape=shape, shape=(8, 8)) == P("fsdp", "tensor")
    # A dimension the mesh axis does not divide is replicated (one kv head of size 8 over 2 is fine,
    # a size of 3 is not).
    assert logical_to_spec(("embed", "kv_heads"), mesh_shape=shape, shape=(8, 3)) == P("fsdp", None)
    assert logical_to_spec(("batch", "seq"), mesh_shape=shape, shape=(4, 5)) == P(("data", "fsdp"), None)
    # One mesh axis is never used twice in one array.
    assert logical_to_spec(("mlp", "heads"), mesh_shape=shape, shape=(4, 4)) == P("tensor", None)
    with pytest.raises(ValueError, match="'nonsense'"):
        logical_to_spec(("nonsense",))
    assert len(jax.devices()) == 8


def test_large_arrays_the_mesh_cannot_split_warn():
    """Replicating a tiny kv-head axis is fine; replicating a 7B-size weight is an OOM: warn."""
    shape = {"data": 1, "fsdp": 6, "tensor": 1}
    with pytest.warns(UserWarning, match=r"'embed' \(size 4096\) is not divisible .*fsdp"):
        spec = logical_to_spec(("embed", "mlp"), mesh_shape=shape, shape=(4096, 11008))
    assert spec == P(None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert logical_to_spec(("embed", "kv_heads"), mesh_shape=shape, shape=(64, 3)) == P(None, None)


def test_init_model_creates_parameters_in_their_shardings():
    from tests.models.conftest import TINY

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = init_model(TINY.replace(num_hidden_layers=1, sliding_window_layers=(0,)), seed=0, mesh=mesh)
    gate = model.model.layers.mlp.gate_proj.kernel[...]  # [L, D, F]: FSDP on D, tensor on F
    assert gate.sharding.mesh == mesh and gate.sharding.spec == P(None, "fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape == (1, 16, 20)
    assert float(gate.std()) > 0  # really initialised, not zeros


@pytest.mark.parametrize("call, match", [
    (lambda: make_mesh(data=0), "make_mesh: data must be a positive integer or -1"),
    (lambda: make_mesh(data=-2, fsdp=2, tensor=2), "make_mesh: data must be"),
    (lambda: make_mesh(tensor=2.0), "make_mesh: tensor must be"),
    (lambda: make_mesh(data=True), "make_mesh: data must be"),
    (lambda: make_mesh(devices=[]), "make_mesh: devices is empty"),
    (lambda: make_mesh(devices=[jax.devices()[0]] * 4), "make_mesh: devices lists a device"),
    # A typo in a custom rule once replicated the axis silently.
    (lambda: logical_to_spec(("embed",), (("embed", "fdsp"),)), "rules: .*'embed' .*'fdsp'"),
    (lambda: named_sharding(make_mesh(data=2, fsdp=4), ("embed",), (8,), (("embed", "fdsp"),)),
     "rules: .*'fdsp'"),
    (lambda: logical_to_spec(("batch", "embed"), shape=(4,)), "logical_axes: 2 names"),
    (lambda: logical_to_spec("embed"), "logical_axes: .*the string 'embed'"),
    (lambda: named_sharding(None, ("batch",), (4,)), "mesh: expected a jax.sharding.Mesh"),
])
def test_bad_mesh_and_rules_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
