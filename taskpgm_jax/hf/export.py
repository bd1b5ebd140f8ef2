"""Write a model back as a Hugging Face checkpoint (config.json + safetensors, sharded with an index)."""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike
from safetensors.numpy import save_file

from taskpgm_jax.hf.config import config_to_hf
from taskpgm_jax.hf.keymap import to_hf
from taskpgm_jax.hf.load import INDEX_FILE, SINGLE_FILE
from taskpgm_jax.models.config import float_dtype
from taskpgm_jax.models.decoder import CausalLM
from taskpgm_jax.models.lora import merged_kernels

_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Temporaries of an export in progress (or of one that was killed).
_INDEX_TEMP, _CONFIG_TEMP = ".index.json.tmp", ".config.json.tmp"
_TEMP_NAME = re.compile(r"\.shard-\d{5}\.tmp|\.index\.json\.tmp|\.config\.json\.tmp")
_FIRST_SHARD_TEMP = ".shard-00000.tmp"
# The old checkpoint's files while the new ones are moved in: ".old." + their name.
_OLD = ".old."
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
        if match is None or unit not in _UNITS:
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


def iter_hf_tensors(model: nnx.Module, dtype: DTypeLike | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields every parameter as (HF name, NumPy array), one parameter on the host at a time.

    Weights come out [out, in] and stacked layers one tensor per layer. LoRA adapters, if any, are
    merged into their kernels (the model is not changed).

    Args:
      model: a `CausalLM`.
      dtype: cast to this floating dtype (default: keep the parameter dtype).

    Yields:
      (HF tensor name, array).
    """
    model = _check_model(model, "iter_hf_tensors")
    dtype = _export_dtype(dtype)
    cfg = model.config
    # The cast runs on the device where JAX holds `dtype`; float64 without jax_enable_x64 is cast
    # on the host (JAX would give float32 files under a config.json that says float64).
    device_dtype = None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)
    merged = merged_kernels(model, device_dtype)  # rounded once, to the file dtype
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = merged.pop(tuple(path), None)
        value = var[...] if value is None else value
        arr = _host(value if dtype is None else value.astype(device_dtype))
        arr = arr if dtype is None else arr.astype(dtype, copy=False)
        tmap = to_hf(tuple(path), cfg.num_hidden_layers)
        blocks = list(arr) if tmap.stacked else [arr]
        for name, block in zip(tmap.hf_names, blocks, strict=True):
            yield name, np.ascontiguousarray(block.T if tmap.transpose else block)


def hf_tensors(model: nnx.Module, dtype: DTypeLike | None = None) -> dict[str, np.ndarray]:
    """All of `iter_hf_tensors` as a dict {HF tensor name: array} (holds the whole model on the host)."""
    return dict(iter_hf_tensors(model, _export_dtype(dtype)))


def _check_model(model: nnx.Module, where: str) -> CausalLM:
    if not isinstance(model, CausalLM):
        raise ValueError(f"{where}: model must be a CausalLM (e.g. from load_hf_checkpoint or "
                         f"init_model), got {type(model).__name__}; to export a state, "
                         "nnx.update a model with it first")
    return model


def save_hf_checkpoint(model: CausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                       *, dtype: DTypeLike | None = None) -> list[str]:
    """Writes `model` as a Hugging Face checkpoint loadable by `AutoModelForCausalLM`.

    Tensors are streamed: at most one shard (plus one parameter) is held on the host at a time.

    Args:
      model: a `CausalLM` (adapters are merged into the written weights).
      path: output directory (created). This is the export's own target: a checkpoint already
        there (config.json, model.safetensors, the index and its model-*-of-*.safetensors
        shards) is replaced, so no old file is left beside the new ones; other files are kept.
        Every new file is first written under a temporary name, and the old checkpoint is
        replaced only once all of them are complete, by renames (its files go aside as
        .old.<name> until the new ones are in): an export that fails or is interrupted, while
        writing or renaming, leaves the old checkpoint as it was (and removes its temporaries).
        One killed outright while renaming leaves the old files aside; the next export to
        `path` puts them back before it starts.
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
    model = _check_model(model, "save_hf_checkpoint")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"save_hf_checkpoint: path must be a directory (str or os.PathLike), "
                         f"got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save_hf_checkpoint: path {path} is an existing file, not a directory; "
                         "pass a directory to write the checkpoint into")
    limit = parse_size(max_shard_size)
    dtype = _export_dtype(dtype)
    hf_cfg = config_to_hf(model.config)
    if dtype is not None:
        hf_cfg["dtype"] = jnp.dtype(dtype).name
    writer = jax.process_index() == 0
    os.makedirs(path, exist_ok=True)
    if writer:
        # An export killed while swapping files (no cleanup ran) left the old checkpoint aside:
        # it is put back, then the temporaries are ours to remove.
        _restore_old_checkpoint(path)
        for name in os.listdir(path):
            if _TEMP_NAME.fullmatch(name):
                os.remove(os.path.join(path, name))
    temps: list[str] = []  # every temporary written so far, removed if the export fails
    try:
        names = _write_temporaries(model, path, limit, dtype, hf_cfg, writer, temps)
        if writer:
            _replace_checkpoint(path, names, temps)
    except BaseException:
        # Ctrl-C included: the old checkpoint is back in place, only our temporaries go (one that
        # cannot be removed is left for the next export, rather than hide the error).
        if writer:
            for temp in temps:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(path, temp))
        raise
    return names


def _write_temporaries(model, path, limit, dtype, hf_cfg, writer, temps) -> list[str]:
    """Writes the shards, the index (if sharded) and config.json under temporary names (appended
    to `temps` in final-name order: shards, then index, then config). Returns the shard names."""
    # Shards are written under temporary names; the final "-of-N" names need the count N.
    shard_temps: list[str] = []
    weight_map: dict[str, int] = {}  # tensor name -> shard number
    total = 0
    shard: dict[str, np.ndarray] = {}
    size = 0

    def flush():
        name = f".shard-{len(shard_temps):05d}.tmp"
        temps.append(name)  # before writing: a half-written file is removed too
        if writer:
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        shard_temps.append(name)

    for name, arr in iter_hf_tensors(model, dtype):
        if shard and size + arr.nbytes > limit:
            flush()
            shard, size = {}, 0
        shard[name] = arr
        weight_map[name] = len(shard_temps)
        size += arr.nbytes
        total += arr.nbytes
    flush()
    n = len(shard_temps)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if writer:
        if n > 1:
            index = {"metadata": {"total_size": int(total)},
                     "weight_map": {t: names[i] for t, i in weight_map.items()}}
            temps.append(_INDEX_TEMP)
            with open(os.path.join(path, _INDEX_TEMP), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        temps.append(_CONFIG_TEMP)
        with open(os.path.join(path, _CONFIG_TEMP), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
    return names


def _is_checkpoint_file(name: str) -> bool:
    return name in ("config.json", INDEX_FILE, SINGLE_FILE) or bool(_SHARD_NAME.fullmatch(name))


def _replace_checkpoint(path: str, names: list[str], temps: list[str]) -> None:
    """Moves the complete temporaries over the old checkpoint, whose files (old shards, an index
    or single file the new checkpoint does not have included) are first renamed aside and
    removed last.

    Renames only (no writing that could fail for space). config.json goes aside first and comes
    in last, so a directory caught in between never loads as an old config beside new weights,
    nor as new weights beside a stale index or single file. If a rename fails (or Ctrl-C), the
    old checkpoint is put back, as `_restore_old_checkpoint` does for an export killed here.
    """
    old = sorted((f for f in os.listdir(path) if _is_checkpoint_file(f)),
                 key=lambda f: f != "config.json")
    finals = names + ([INDEX_FILE] if len(names) > 1 else []) + ["config.json"]
    try:
        for f in old:
            os.replace(os.path.join(path, f), os.path.join(path, _OLD + f))
        for temp, final in zip(temps, finals, strict=True):
            os.replace(os.path.join(path, temp), os.path.join(path, final))
    except BaseException as e:
        try:
            _restore_old_checkpoint(path)
        except BaseException:
            e.add_note(f"save_hf_checkpoint: the old checkpoint could not be put back; its files "
                       f"are in {path} as {_OLD}<name>: the next save_hf_checkpoint to {path} "
                       "puts them back first, or rename them yourself")
            raise e from None
        raise
    for f in old:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, _OLD + f))


def _restore_old_checkpoint(path: str) -> None:
    """Puts back the old checkpoint that `_replace_checkpoint` had moved aside (".old." names),
    when it stopped before config.json was in place; after that the new checkpoint is complete,
    and the old files are only removed."""
    listing = os.listdir(path)
    aside = [f for f in listing if f.startswith(_OLD) and _is_checkpoint_file(f[len(_OLD):])]
    if not aside:
        return
    if "config.json" not in listing:
        if _FIRST_SHARD_TEMP not in listing:
            # New files were being moved in (the first shard goes first): every old file is
            # aside, so each checkpoint file in place is new, and goes.
            for f in listing:
                if _is_checkpoint_file(f):
                    os.remove(os.path.join(path, f))
        for f in aside:
            os.replace(os.path.join(path, f), os.path.join(path, f[len(_OLD):]))
    else:
        for f in aside:
            os.remove(os.path.join(path, f))
