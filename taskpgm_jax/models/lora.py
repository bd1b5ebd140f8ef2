"""LoRA adapters: add, stack T of them, run them side by side over one base model, merge.

Adapters are `LoRAParam` variables (not `nnx.Param`), so
`nnx.Optimizer(model, tx, wrt=LoRAParam)` trains adapters only and `nnx.state(model, LoRAParam)`
is the adapter alone (what a per-task checkpoint stores).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from taskpgm_jax.models.config import LoraConfig, check_int, float_dtype
from taskpgm_jax.models.layers import Dense, LoRAParam
from taskpgm_jax.sharding import named_sharding

__all__ = ["LoRAParam", "add_lora", "check_adapters_like", "lora_state", "stack_adapters",
           "multi_adapter_forward",
           "merge_lora", "merged_kernels"]


def _targets(model: nnx.Module, names: Sequence[str]):
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Dense) and path and path[-1] in names:
            yield path, module


def _place(value: jax.Array, like: jax.Array, axes: tuple, rules) -> jax.Array:
    # New adapter arrays follow the mesh of the kernel they adapt (FSDP / tensor-parallel layouts).
    sharding = getattr(like, "sharding", None)
    # A concrete array's mesh is concrete (tracers have no `sharding`: getattr gives None).
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.Mesh):
        return jax.device_put(value, named_sharding(sharding.mesh, axes, value.shape, rules))
    return value


def add_lora(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs | int) -> nnx.Module:
    """Adds a LoRA adapter to every targeted projection of `model` (in place).

    A: [*lead, in, R] random normal(init_std); B: [*lead, R, out] zeros, so the model's output is
    unchanged until B is trained. Works for scanned (stacked) and unscanned layers. Both are
    stored in `cfg.param_dtype` (float32 by default), not the base kernel's dtype: a bfloat16 base
    gets float32 adapters the trainer can train; they compute in the model's compute dtype.

    Args:
      model: a `CausalLM` (or any module built from `Dense`).
      cfg: rank, alpha and target projection names.
      rngs: random streams for A (`nnx.Rngs`), or an int seed.

    Returns:
      `model`, for chaining.

    Raises:
      ValueError: no targeted projection, or a targeted projection already has an adapter
        (replacing it would discard its training; `merge_lora` first).

    Example:
      >>> model = add_lora(model, LoraConfig(rank=8, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(1))
      >>> opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=LoRAParam)
    """
    if not isinstance(cfg, LoraConfig):
        raise ValueError(f"add_lora: cfg must be a LoraConfig, got {type(cfg).__name__}")
    if not isinstance(rngs, nnx.Rngs):
        try:
            rngs = nnx.Rngs(check_int("rngs", rngs, minimum=0))
        except ValueError:
            raise ValueError(f"add_lora: rngs must be an nnx.Rngs or an int seed >= 0, "
                             f"got {rngs!r}") from None
    rules = getattr(model, "rules", None)
    targets = list(_targets(model, cfg.targets))
    if not targets:
        raise ValueError(f"add_lora: no projection named {cfg.targets} in the model")
    # Replacing an adapter would silently throw away what it learned (B becomes zero again).
    taken = [".".join(map(str, path)) for path, dense in targets if dense.lora_a is not None]
    if taken:
        raise ValueError(f"add_lora: the model already has adapters on {', '.join(taken[:3])}"
                         f"{' ...' if len(taken) > 3 else ''}; merge_lora(model) folds them in "
                         "first, or add adapters to a copy of the model without them")
    for _, dense in targets:
        kernel = dense.kernel[...]
        *lead, d_in, d_out = kernel.shape
        lead_axes = ("layers",) * len(lead)
        axes_a = lead_axes + (dense.axes[0], "lora_rank")
        axes_b = lead_axes + ("lora_rank", dense.axes[1])
        a = nnx.initializers.normal(cfg.init_std)(rngs.params(), (*lead, d_in, cfg.rank),
                                                  cfg.param_dtype)
        b = jnp.zeros((*lead, cfg.rank, d_out), cfg.param_dtype)
        dense.lora_a = LoRAParam(_place(a, kernel, axes_a, rules), logical_axes=axes_a)
        dense.lora_b = LoRAParam(_place(b, kernel, axes_b, rules), logical_axes=axes_b)
        dense.lora_scale = float(cfg.scale)
    return model


def lora_state(model: nnx.Module) -> nnx.State:
    """The adapter variables of `model` (an `nnx.State` of `LoRAParam`)."""
    return nnx.state(model, LoRAParam)


def stack_adapters(adapters: Sequence[nnx.State]) -> nnx.State:
    """Stacks T adapter states (same structure) along a new leading axis T.

    Args:
      adapters: T results of `lora_state`.

    Returns:
      One state whose arrays have a leading axis of size T.
    """
    if isinstance(adapters, nnx.State) or not isinstance(adapters, Sequence):
        raise ValueError("stack_adapters: adapters must be a list of lora_state results, got "
                         f"{type(adapters).__name__}")
    if not adapters:
        raise ValueError("stack_adapters: adapters is empty")
    for i, adapter in enumerate(adapters[1:], 1):
        check_adapters_like(adapter, adapters[0], f"stack_adapters: adapters[{i}]", "adapters[0]")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def check_adapters_like(state: nnx.State, reference: nnx.State, what: str, against: str,
                        leading: int = 0) -> None:
    """Same targets, shapes (less `leading` stacked axes) and dtypes as `reference`, or a
    ValueError naming the first leaf that differs: mixing ranks would run with the wrong
    alpha / rank scale, mixing dtypes would promote silently."""
    # jaxlib ships no stub for PyTreeDef, so mypy cannot compare two (ignore below).
    if jax.tree.structure(state) != jax.tree.structure(reference):  # type: ignore[operator]
        raise ValueError(f"{what} does not have the structure of {against} (same targets, "
                         "scanned or not)")
    got = jax.tree_util.tree_leaves_with_path(state)
    for (path, x), y in zip(got, jax.tree.leaves(reference), strict=True):
        if tuple(x.shape[leading:]) != tuple(y.shape) or x.dtype != y.dtype:
            raise ValueError(f"{what} differs from {against} at {jax.tree_util.keystr(path)}: "
                             f"{x.dtype}{list(x.shape[leading:])} vs {y.dtype}{list(y.shape)} "
                             "(rank, targets and dtype must match)")


def multi_adapter_forward(model: nnx.Module, adapters: nnx.State, input_ids: jax.Array,
                          attention_mask: jax.Array | None = None, *,
                          segment_ids: jax.Array | None = None,
                          positions: jax.Array | None = None,
                          adapter_chunk: int | None = None) -> jax.Array:
    """Runs T adapters over one base model in one call.

    The adapter axis is folded into the batch (adapter-major: T x B rows), so every base matmul,
    the attention and the LM head run once over T x B rows in the single-model layout with the
    base weights shared (never copied T times); only the rank-R LoRA products are grouped per
    adapter (`layers.lora_delta`). A `jax.vmap` over the adapter axis computes the same thing, but
    XLA then contracts attention in a transposed batched layout (on CPU those contractions ran 2x
    slower, the whole call ~5%). Wrap in `nnx.jit` (the model is an argument); in a loop over
    many batches bind the model once (`nnx.cached_partial`, or `jax.jit` on `nnx.split` state as
    `eval.adapter_probe_forward` does): `nnx.jit` walks the module graph on every call (3-6 ms,
    more than the whole call on a small model).

    Speed: one call pays where a single model's call is small (on this project's 2-core CPU, 8
    adapters over 32 probe tokens ran 1.6x faster than 8 sequential calls). Where one call is
    already large it does the same FLOPs as sequential calls and is no faster; on a CPU, activations
    of many thousand rows also fall out of cache, so pass `adapter_chunk` to keep
    chunk x B x S around a few thousand tokens.

    Args:
      model: the base model, with adapters added (their values are ignored).
      adapters: `stack_adapters(...)` state with leading axis T.
      input_ids: int [B, S] (the same batch for every adapter) or [T, B, S] (one per adapter).
      attention_mask, segment_ids, positions: as for `CausalLM.__call__`, shaped like input_ids.
      adapter_chunk: run the adapters this many at a time (a `lax.map` over groups of that size,
        plus one group for the remainder) to bound activation memory; None runs all T at once.

    Returns:
      float32 logits [T, B, S, V].
    """
    # nnx.split gives one State per filter; its annotation cannot count them (ignore below).
    graphdef, own, rest = nnx.split(model, LoRAParam, ...)  # type: ignore[misc]
    if not jax.tree.leaves(own):
        raise ValueError("multi_adapter_forward: the model has no LoRA adapters; call add_lora first")
    check_adapters_like(adapters, own, "multi_adapter_forward: adapters", "the model's adapters",
                leading=1)  # shapes and dtypes are static: checked under jit too
    sizes = {x.shape[0] for x in jax.tree.leaves(adapters)}
    if len(sizes) != 1:
        raise ValueError("multi_adapter_forward: adapters disagree on the adapter axis size: "
                         f"{sorted(sizes)}")
    (num_adapters,) = sizes
    if adapter_chunk is not None:
        adapter_chunk = check_int("multi_adapter_forward: adapter_chunk", adapter_chunk)
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim not in (2, 3):
        raise ValueError(f"input_ids must be [B, S] or [T, B, S], got shape {list(input_ids.shape)}")
    per_adapter = input_ids.ndim == 3
    if per_adapter and input_ids.shape[0] != num_adapters:
        raise ValueError(f"multi_adapter_forward: input_ids has {input_ids.shape[0]} rows on its "
                         f"adapter axis but there are {num_adapters} adapters")
    # Shared inputs are broadcast to [T, B, S] (ints: cheap), so every group folds the same way.
    lead = input_ids.shape if per_adapter else (num_adapters, *input_ids.shape)
    given: list[jax.Array | None] = [input_ids]
    for name, v in (("attention_mask", attention_mask), ("segment_ids", segment_ids),
                    ("positions", positions)):
        if v is not None:  # [B, S] (shared by the adapters) or [T, B, S]
            v = jnp.asarray(v)
            if v.shape not in (lead, lead[1:]):
                raise ValueError(f"multi_adapter_forward: {name} must have shape {list(lead[1:])}"
                                 f" or {list(lead)} like input_ids, got {list(v.shape)}")
        given.append(v)
    inputs = tuple(None if v is None else jnp.broadcast_to(v, lead) for v in given)

    def run_group(group, group_inputs):
        """Adapters [G, ...] over inputs [G, B, S]: logits [G, B, S, V]."""
        g = group_inputs[0].shape[0]
        # Each leaf is [G, *lead, in, R]; Dense wants the adapter axis just before (in, R), so the
        # layer axis of a scanned model stays in front for the scan to slice.
        grouped = jax.tree.map(lambda x: jnp.moveaxis(x, 0, -3), group)
        ids, mask, seg, pos = (None if v is None else v.reshape(-1, *v.shape[2:])
                               for v in group_inputs)
        logits = nnx.merge(graphdef, grouped, rest)(ids, mask, segment_ids=seg, positions=pos)
        return logits.reshape(g, -1, *logits.shape[1:])

    chunk = num_adapters if adapter_chunk is None else min(adapter_chunk, num_adapters)
    full, remainder = divmod(num_adapters, chunk)
    xs = (adapters, inputs)
    if full == 1 and not remainder:
        return run_group(*xs)
    body = full * chunk
    groups = jax.tree.map(lambda x: x[:body].reshape(full, chunk, *x.shape[1:]), xs)
    logits = jax.lax.map(lambda group: run_group(*group), groups)
    logits = logits.reshape(body, *logits.shape[2:])
    if remainder:
        rest_logits = run_group(*jax.tree.map(lambda x: x[body:], xs))
        logits = jnp.concatenate([logits, rest_logits])
    return logits


def merged_kernels(model: nnx.Module, dtype: DTypeLike | None = None) -> dict[tuple, jax.Array]:
    """Kernels with their adapter folded in, W + scale * A B, by module path (model unchanged).

    Args:
      model: a model with adapters.
      dtype: floating dtype of the merged kernels (default: each base kernel's dtype). The sum is
        rounded once, to this dtype: a float32 export of a bfloat16 base keeps its float32
        adapters' precision, which a bfloat16 merge cast up afterwards would lose.

    Returns:
      {path of the kernel variable: merged kernel} for every adapted projection.
    """
    if dtype is not None:
        dtype = float_dtype(dtype, "merged_kernels: dtype")
    out = {}
    for path, dense in nnx.iter_modules(model):
        if isinstance(dense, Dense) and dense.lora_a is not None:
            assert dense.lora_b is not None  # add_lora sets both factors, merge_lora clears both
            kernel = dense.kernel[...]
            # HIGHEST: a GPU's default float32 matmul rounds operands to TF32 (2e-4 off in the
            # exported logits on an H200); this one-off product costs nothing at full precision.
            delta = jnp.einsum("...ir,...ro->...io", dense.lora_a[...].astype(jnp.float32),
                               dense.lora_b[...].astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
            out[tuple(path) + ("kernel",)] = (kernel.astype(jnp.float32)
                                               + dense.lora_scale * delta).astype(
                                                   kernel.dtype if dtype is None else dtype)
    return out


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base kernel and removes the adapters (in place).

    Args:
      model: a model with adapters.

    Returns:
      `model`, now without `LoRAParam` variables and with the same outputs.
    """
    merged = merged_kernels(model)
    for path, dense in list(nnx.iter_modules(model)):
        key = tuple(path) + ("kernel",)
        if isinstance(dense, Dense) and key in merged:  # merged holds Dense paths only
            dense.kernel[...] = merged[key]
            dense.lora_a = None
            dense.lora_b = None
            dense.lora_scale = 0.0
    return model
