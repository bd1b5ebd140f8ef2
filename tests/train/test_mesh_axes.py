"""The default rules need the (data, fsdp, tensor) mesh axes: a mesh named otherwise is refused
rather than silently replicating every parameter; malformed arguments are named."""

import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from taskpgm_jax.models import init_model
from taskpgm_jax.sharding import logical_to_spec, make_mesh, named_sharding
from taskpgm_jax.train import Trainer
from tests.train.conftest import TINY, random_model
from tests.train.test_step import CFG

REFUSED = (r"mesh axes \('dp', 'model'\) are not the \('data', 'fsdp', 'tensor'\) axes "
           r"DEFAULT_RULES uses; build the mesh with make_mesh or pass rules= naming your axes")


def _custom_mesh(devices):
    return Mesh(np.asarray(devices[:4], object).reshape(2, 2), ("dp", "model"),
                axis_types=(AxisType.Auto,) * 2)


def test_default_rules_refuse_a_mesh_with_other_axes(cpu_mesh_devices):
    mesh = _custom_mesh(cpu_mesh_devices)
    with pytest.raises(ValueError, match=REFUSED):
        named_sharding(mesh, ("embed", "mlp"), (16, 32))
    with pytest.raises(ValueError, match=REFUSED):
        init_model(TINY, mesh=mesh)
    with pytest.raises(ValueError, match=REFUSED):
        Trainer(random_model(), CFG, mesh=mesh)
    # An extra axis of size > 1 next to the default ones would be left unused too.
    with pytest.raises(ValueError, match=r"mesh axes \('data', 'fsdp', 'tensor', 'pipe'\)"):
        logical_to_spec(("embed",), mesh_shape={"data": 1, "fsdp": 2, "tensor": 1, "pipe": 2})
    # Rules naming the mesh's axes work, and split as asked.
    rules = (("embed", "dp"), ("mlp", "model"))
    assert named_sharding(mesh, ("embed", "mlp"), (16, 32), rules).spec == P("dp", "model")
    # Replicated dimensions need no rule on any mesh; axes of size 1 split nothing.
    assert named_sharding(mesh, (None, None), (16, 32)).spec == P(None, None)
    assert logical_to_spec(("embed", "seq"), mesh_shape={"x": 1}, shape=(4, 4)) == P(None, None)


def test_make_mesh_meshes_unchanged(cpu_mesh_devices):
    """Sizes of 1 are dropped from the spec as before; the whole model shards as before."""
    mesh = make_mesh(data=1, fsdp=4, tensor=2, devices=cpu_mesh_devices)
    assert named_sharding(mesh, ("embed", "mlp"), (16, 32)).spec == P("fsdp", "tensor")
    assert named_sharding(mesh, ("batch", "seq"), (8, 16)).spec == P("fsdp", None)
    model = init_model(TINY, mesh=make_mesh(data=2, fsdp=2, tensor=2, devices=cpu_mesh_devices))
    kernel = model.model.layers[0].mlp.up_proj.kernel[...]
    assert kernel.sharding.spec == P("fsdp", "tensor")


def test_malformed_sharding_arguments_are_named(cpu_mesh_devices):
    with pytest.raises(ValueError, match="logical_axes: expected a tuple of names .* got NoneType"):
        logical_to_spec(None)
    with pytest.raises(ValueError, match=r"rules: each entry must be a pair .* got \('embed',\)"):
        logical_to_spec(("embed",), rules=(("embed",),))
    with pytest.raises(ValueError, match="rules: expected a tuple of .* got int"):
        logical_to_spec(("embed",), rules=3)
    with pytest.raises(ValueError, match=r"make_mesh: devices must be a sequence of jax.Device "
                                         r".*write devices=\[device\]"):
        make_mesh(devices=cpu_mesh_devices[0])
    with pytest.raises(ValueError, match="make_mesh: devices must hold jax.Device objects"):
        make_mesh(devices=["cpu:0"])
    # A device array (e.g. an existing mesh's) still works.
    grid = np.asarray(cpu_mesh_devices, object).reshape(2, 4)
    assert dict(make_mesh(fsdp=-1, devices=grid).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
