"""Write a model back as a Hugging Face checkpoint (config.json + safetensors, sharded with an index)."""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from taskpgm_jax.hf.config import config_to_hf
from taskpgm_jax.hf.keymap import to_hf
from taskpgm_jax.hf.load import INDEX_FILE, SINGLE_FILE
from taskpgm_jax.models.config import float_dtype
from taskpgm_jax.models.lora import merged_kernels

_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int (NumPy ints too), or a string like "5GB", "500MB", "2GiB"; at
    least one byte."""
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (numbers.Integral, str)):
        raise ValueError(f"max_shard_size must be an int of bytes or a string like '5GB', got "
                         f"{size!r}")
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = (match.group(2).upper() or "B") if match else None
        if unit not in _UNITS:
            raise ValueError(f"max_shard_size={size!r} is not a size like 5GB, 500MB or an int of "
                             "bytes")
        nbytes = int(float(match.group(1)) * _UNITS[unit])
    else:
        nbytes = int(size)
    if nbytes < 1:
        raise ValueError(f"max_shard_size must be at least one byte, got {size!r}")
    return nbytes


def _export_dtype(dtype):
    """None, or `dtype` as a floating `jnp.dtype`: an int cast would silently ruin the weights."""
    return None if dtype is None else float_dtype(dtype, "dtype")


def _host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:  # every process writes the same files from the gathered arrays
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def iter_hf_tensors(model: nnx.Module, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields every parameter as (HF name, NumPy array), one parameter on the host at a time.

    Weights come out [out, in] and stacked layers one tensor per layer. LoRA adapters, if any, are
    merged into their kernels (the model is not changed).

    Args:
      model: a `CausalLM`.
      dtype: cast to this floating dtype (default: keep the parameter dtype).

    Yields:
      (HF tensor name, array).
    """
    dtype = _export_dtype(dtype)
    cfg = model.config
    merged = merged_kernels(model)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = merged.pop(tuple(path), None)
        value = var[...] if value is None else value
        arr = _host(value if dtype is None else value.astype(dtype))
        tmap = to_hf(tuple(path), cfg.num_hidden_layers)
        blocks = list(arr) if tmap.stacked else [arr]
        for name, block in zip(tmap.hf_names, blocks, strict=True):
            yield name, np.ascontiguousarray(block.T if tmap.transpose else block)


def hf_tensors(model: nnx.Module, dtype=None) -> dict[str, np.ndarray]:
    """All of `iter_hf_tensors` as a dict {HF tensor name: array} (holds the whole model on the host)."""
    return dict(iter_hf_tensors(model, _export_dtype(dtype)))


def save_hf_checkpoint(model: nnx.Module, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                       *, dtype=None) -> list[str]:
    """Writes `model` as a Hugging Face checkpoint loadable by `AutoModelForCausalLM`.

    Tensors are streamed: at most one shard (plus one parameter) is held on the host at a time.

    Args:
      model: a `CausalLM` (adapters are merged into the written weights).
      path: output directory (created). This is the export's own target: a checkpoint already
        there (config.json, model.safetensors, the index and its model-*-of-*.safetensors
        shards) is removed first, so no old file is left beside the new ones; other files are
        kept.
      max_shard_size: largest safetensors file, bytes or a string like "5GB"; above it the
        tensors are split over model-0000i-of-0000n.safetensors with an index.
      dtype: floating tensor dtype in the files, e.g. jnp.bfloat16 or "bfloat16" (default: the
        parameter dtype).

    Returns:
      The written safetensors file names.

    Example:
      >>> save_hf_checkpoint(model, "/tmp/export", max_shard_size="2GB", dtype=jnp.bfloat16)
    """
    # Arguments and config are all checked before anything is written or removed.
    limit = parse_size(max_shard_size)
    dtype = _export_dtype(dtype)
    hf_cfg = config_to_hf(model.config)
    if dtype is not None:
        hf_cfg["dtype"] = jnp.dtype(dtype).name
    path = os.fspath(path)
    writer = jax.process_index() == 0
    os.makedirs(path, exist_ok=True)
    if writer:
        # Never leave an old checkpoint's files beside the new ones: an old config.json beside
        # new weights (should this export fail before writing its own) would load as a mix.
        for stale in os.listdir(path):
            if stale in ("config.json", INDEX_FILE, SINGLE_FILE) or _SHARD_NAME.fullmatch(stale):
                os.remove(os.path.join(path, stale))
    # Shards are written under temporary names; the final "-of-N" names need the count N.
    temp_names, weight_map, total = [], {}, 0
    shard: dict[str, np.ndarray] = {}
    size = 0

    def flush():
        name = f".shard-{len(temp_names):05d}.tmp"
        if writer:
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        temp_names.append(name)

    for name, arr in iter_hf_tensors(model, dtype):
        if shard and size + arr.nbytes > limit:
            flush()
            shard, size = {}, 0
        shard[name] = arr
        weight_map[name] = len(temp_names)
        size += arr.nbytes
        total += arr.nbytes
    flush()
    n = len(temp_names)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if writer:
        for temp, final in zip(temp_names, names, strict=True):
            os.replace(os.path.join(path, temp), os.path.join(path, final))
        if n > 1:
            index = {"metadata": {"total_size": int(total)},
                     "weight_map": {t: names[i] for t, i in weight_map.items()}}
            with open(os.path.join(path, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        # Written last: a directory with a config.json holds a complete checkpoint.
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
    return names
