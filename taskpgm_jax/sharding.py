"""Mesh construction, logical-axis rules and the one activation-sharding helper.

Mesh axes (always these three, in this order):
  - "data":   pure data parallelism; the batch is split, parameters are replicated.
  - "fsdp":   data parallelism that also splits parameters (ZeRO-3 style); the batch is split too.
  - "tensor": tensor (model) parallelism; heads and the MLP hidden dimension are split.

Logical axes name what a dimension *is* (embed, mlp, heads, ...); the rules below say which mesh
axis (if any) it is split over. Models annotate every parameter with its logical axes (a
`logical_axes` metadata entry on the NNX variable) and constrain activations with `shard()`, so
changing the parallelism strategy means changing this table only.

Dimension letters used in shapes across the models: B batch, S sequence, D hidden, N query heads,
K kv heads, H head dim, F MLP hidden, V vocabulary, L layers, T adapters (tasks), R LoRA rank.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (str), several mesh axes (tuple) or None (replicated).
# Default: FSDP over the embedding axis of every weight plus tensor parallelism over heads/MLP/vocab;
# activations are split over the batch on both data axes.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("adapters", None),
    ("seq", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    # The embedding table is not split over the vocabulary: a gather from a vocab-split table
    # forces XLA to rematerialise the whole table on every device.
    ("embed_vocab", None),
    ("layers", None),
    ("lora_rank", None),
    ("norm", None),
)


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a ("data", "fsdp", "tensor") mesh with Auto axis types.

    The axis types are stated on purpose: `jax.make_mesh` defaults to Explicit in current JAX,
    under which every op must agree on shardings; the models here rely on GSPMD propagation
    (Auto) with `shard()` hints.

    Args:
      data: size of the "data" axis.
      fsdp: size of the "fsdp" axis; -1 takes all devices left over.
      tensor: size of the "tensor" axis.
      devices: devices to use (default: all of `jax.devices()`).

    Returns:
      A `jax.sharding.Mesh`.

    Example:
      >>> mesh = make_mesh(data=2, fsdp=2, tensor=2)   # 8 devices
    """
    if devices is not None and (isinstance(devices, (str, bytes, jax.Device))
                                or not hasattr(devices, "__iter__")):
        raise ValueError(f"make_mesh: devices must be a sequence of jax.Device (e.g. "
                         f"jax.devices()[:4]), got {type(devices).__name__}; for one device "
                         "write devices=[device]")
    devices = list(jax.devices() if devices is None else np.ravel(np.asarray(devices, object)))
    if not all(isinstance(d, jax.Device) for d in devices):
        bad = next(d for d in devices if not isinstance(d, jax.Device))
        raise ValueError(f"make_mesh: devices must hold jax.Device objects, got a "
                         f"{type(bad).__name__}")
    if not devices:
        raise ValueError("make_mesh: devices is empty; pass at least one device (default: all "
                         "of jax.devices()).")
    if len(set(devices)) != len(devices):
        raise ValueError("make_mesh: devices lists a device more than once; each device can "
                         "hold one mesh position.")
    sizes = [_axis_size(v, name) for v, name in zip((data, fsdp, tensor), MESH_AXES, strict=True)]
    if sizes.count(-1) > 1:
        raise ValueError("make_mesh: at most one of data/fsdp/tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"make_mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _axis_size(value, name: str) -> int:
    """A mesh axis size: a positive int (NumPy ints too) or -1."""
    try:
        if isinstance(value, bool):
            raise TypeError
        size = operator.index(value)
    except TypeError:
        size = None
    if size is None or not (size > 0 or size == -1):
        raise ValueError(f"make_mesh: {name} must be a positive integer or -1 (the devices left "
                         f"over), got {value!r}")
    return size


def _mesh_axis_size(mesh_shape: Mapping[str, int], axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return int(np.prod([mesh_shape.get(n, 1) for n in names]))


# Arrays at least this large (as float32) warn when a mesh axis that should split them cannot.
_WARN_REPLICATED_BYTES = 64 * 2**20


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules | None = None,
    *,
    mesh_shape: Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Translates logical axis names into a `PartitionSpec`.

    A mesh axis is used at most once per array (first logical axis wins), and, when `shape` and
    `mesh_shape` are given, a dimension that the mesh axes do not divide is replicated instead
    (tiny test models have e.g. one kv head).

    Args:
      logical_axes: one name (or None) per array dimension.
      rules: logical -> mesh axis table (default `DEFAULT_RULES`).
      mesh_shape: mesh axis sizes, e.g. `dict(mesh.shape)`.
      shape: the array shape, for the divisibility check.

    Returns:
      The `PartitionSpec`.

    Raises:
      ValueError: an unknown logical axis, malformed `rules`, custom rules naming an axis the mesh
        lacks, or the default rules on a mesh with axes (of size > 1) other than
        ("data", "fsdp", "tensor"), which they would leave unused (everything replicated).
    """
    if isinstance(logical_axes, (str, bytes)) or not isinstance(logical_axes, Sequence):
        if not isinstance(logical_axes, (str, bytes)):
            raise ValueError(f"logical_axes: expected a tuple of names (or None) with one entry "
                             f"per dimension, got {type(logical_axes).__name__}")
        raise ValueError(f"logical_axes: expected one name per dimension, got the string "
                         f"{logical_axes!r}; write ({logical_axes!r},)")
    if shape is not None and len(logical_axes) > len(shape):
        raise ValueError(f"logical_axes: {len(logical_axes)} names {tuple(logical_axes)} for an "
                         f"array of rank {len(shape)} (shape {tuple(shape)}); give one per "
                         "dimension")
    if rules is None:
        table = dict(DEFAULT_RULES)
    else:
        table = _rules_table(rules)
        _check_rules(table, mesh_shape)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axis = None if name is None else table[name]
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        if rules is None and names and mesh_shape is not None:
            # Only where a default rule would split: all-None axes are fine on any mesh.
            _check_default_mesh(mesh_shape)
        if mesh_shape is not None:
            names = tuple(n for n in names if n in mesh_shape and mesh_shape[n] > 1)
        names = tuple(n for n in names if n not in used)
        if shape is not None and mesh_shape is not None and names:
            if shape[i] % _mesh_axis_size(mesh_shape, names):
                # Replicated instead; fine for the tiny test models (one kv head), an OOM at
                # scale, so say so when the array is large.
                size_bytes = 4 * int(np.prod(shape))
                if size_bytes >= _WARN_REPLICATED_BYTES:
                    warnings.warn(
                        f"logical axis {name!r} (size {shape[i]}) is not divisible by mesh axes "
                        f"{names} (size {_mesh_axis_size(mesh_shape, names)}): this "
                        f"{size_bytes / 2**20:.0f} MiB array is replicated along them; choose "
                        "a mesh whose axis sizes divide the model's dimensions", stacklevel=2)
                names = ()
        used.update(names)
        spec.append(None if not names else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*spec)


def _rules_table(rules) -> dict:
    """`rules` as a dict, each entry checked: `dict()` of a malformed entry raises a message that
    names neither the argument nor the entry."""
    if isinstance(rules, Mapping):
        rules = tuple(rules.items())
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise ValueError(f"rules: expected a tuple of (logical axis, mesh axis) pairs, got "
                         f"{type(rules).__name__}")
    table = {}
    for entry in rules:
        ok = (isinstance(entry, Sequence) and not isinstance(entry, (str, bytes))
              and len(entry) == 2 and isinstance(entry[0], str))
        axis = entry[1] if ok else None
        ok = ok and (axis is None or isinstance(axis, str) or (
            isinstance(axis, (tuple, list)) and all(isinstance(a, str) for a in axis)))
        if not ok:
            raise ValueError(f"rules: each entry must be a pair (logical axis name, mesh axis "
                             f"name, tuple of names or None), got {entry!r}")
        table[entry[0]] = axis
    return table


def _check_default_mesh(mesh_shape: Mapping[str, int]) -> None:
    """`DEFAULT_RULES` name the (data, fsdp, tensor) axes: a mesh with other names would match
    none of them and every array would be silently replicated."""
    # Axes of size 1 split nothing (a one-device mesh replicates rightly, whatever its names).
    if any(n not in MESH_AXES and size > 1 for n, size in dict(mesh_shape).items()):
        raise ValueError(f"mesh axes {tuple(mesh_shape)} are not the {MESH_AXES} axes "
                         "DEFAULT_RULES uses; build the mesh with make_mesh or pass rules= "
                         "naming your axes")


def _check_rules(table: dict, mesh_shape: Mapping[str, int] | None) -> None:
    """Custom rules may only name axes of the mesh: a typo would silently replicate."""
    known = tuple(mesh_shape) if mesh_shape is not None else MESH_AXES
    for logical, axis in table.items():
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"rules: logical axis {logical!r} maps to mesh axis {bad[0]!r}, "
                             f"which the mesh does not have; mesh axes: {list(known)}")


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int], rules: Rules | None = None
) -> NamedSharding:
    """The `NamedSharding` of an array with `shape` and `logical_axes` on `mesh`.

    Args:
      mesh: the mesh.
      logical_axes: one logical name (or None) per dimension.
      shape: the array shape.
      rules: logical -> mesh table (default `DEFAULT_RULES`).

    Returns:
      A `NamedSharding`.
    """
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh: expected a jax.sharding.Mesh (e.g. from make_mesh), got "
                         f"{type(mesh).__name__}")
    spec = logical_to_spec(logical_axes, rules, mesh_shape=dict(mesh.shape), shape=shape)
    return NamedSharding(mesh, spec)


def shard(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """Constrains an activation to the sharding its logical axes imply.

    A no-op when no mesh is set (`jax.set_mesh`), so models run unchanged on one device. This is
    the single place to switch to `jax.sharding.reshard` for Explicit-mode meshes later.

    Args:
      x: the activation.
      logical_axes: one logical name (or None) per dimension of `x`.
      rules: logical -> mesh table (default `DEFAULT_RULES`).

    Returns:
      `x`, with a sharding constraint when a mesh is active.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, rules, mesh_shape=dict(mesh.shape), shape=x.shape)
    return jax.lax.with_sharding_constraint(x, spec)
