"""Load a Hugging Face safetensors checkpoint straight into a (sharded) NNX model.

The model is first built abstractly (`nnx.eval_shape`: no memory), each parameter gets its
`NamedSharding` from its logical axes, then each array is created with
`jax.make_array_from_callback`: the callback reads only the block a device owns from
`safe_open(...).get_slice`, so no device (and, on many hosts, no process) ever holds the full model.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from jax.typing import DTypeLike
from safetensors import safe_open

from taskpgm_jax.hf.config import config_from_hf
from taskpgm_jax.hf.keymap import IGNORABLE_SUFFIXES, TensorMap, hf_shape, to_hf
from taskpgm_jax.models.config import AttentionImpl
from taskpgm_jax.models.decoder import CausalLM
from taskpgm_jax.sharding import Rules, named_sharding

if TYPE_CHECKING:  # transformers is imported where a tokenizer is loaded, never with this module
    from transformers import PreTrainedTokenizerBase

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _safe_open(file: str):
    """`safe_open` with errors that name the file and say what to do."""
    try:
        return safe_open(file, framework="numpy")
    except FileNotFoundError:
        raise ValueError(f"{file}: the checkpoint lists this file but it is missing; copy the "
                         "whole checkpoint directory again") from None
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error type for bad headers)
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         "download or save the checkpoint again") from None


def _refuse_a_file(path: str | os.PathLike, where: str) -> None:
    """A file of the checkpoint (its config.json, a safetensors) is refused, as transformers'
    from_pretrained refuses it, with the directory to pass instead."""
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
        path = os.fspath(path)
        raise ValueError(f"{where}: {path} is a file, not a checkpoint directory; pass its "
                         f"directory, {os.path.dirname(os.path.abspath(path))}")


def checkpoint_files(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> safetensors file for a checkpoint directory (single file or sharded index).

    Args:
      path: the checkpoint directory.

    Returns:
      {tensor name: absolute file path}.
    """
    _refuse_a_file(path, "checkpoint_files")
    path = os.fspath(path)
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{index} is not valid JSON: {e}") from None
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor name -> safetensors file; "
                             "save the checkpoint again (save_pretrained writes one)")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.exists(single):
        if any(os.path.exists(os.path.join(path, f))
               for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            # Older checkpoints (Vicuna, many fine-tunes) hold pickled PyTorch weights only.
            raise ValueError(
                f"{path} holds PyTorch .bin weights only, no {SINGLE_FILE} or {INDEX_FILE}: "
                "convert them once with transformers, AutoModelForCausalLM.from_pretrained(path)"
                ".save_pretrained(out_dir) (safetensors by default), and load out_dir")
        raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}: a checkpoint directory "
                         "holds its weights as safetensors (save_pretrained writes them)")
    with _safe_open(single) as f:
        return {k: single for k in f.keys()}


def _read_block(handles, tmap: TensorMap, index: tuple, dtype) -> np.ndarray:
    """The block `index` (into our array) of a parameter, read from its HF tensor(s); a NaN or
    inf is a ValueError naming the tensor (it would spread to every logit)."""

    def one(name, inner):
        sl = handles[name].get_slice(name)
        raw = np.asarray(sl[tuple(inner[::-1])] if tmap.transpose else sl[tuple(inner)])
        raw = raw.T if tmap.transpose else raw
        with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
            block = raw.astype(dtype)
        # A sum is one fast pass (NaN / inf make it non-finite); only then is each value
        # checked, since finite values can overflow a sum.
        if block.size and not np.isfinite(block.sum(dtype=np.float32)) \
                and not np.isfinite(block).all():
            if not np.isfinite(raw).all():
                raise ValueError(f"checkpoint tensor {name} holds NaN or inf values; the "
                                 "checkpoint is damaged (download or save it again)")
            # Finite in the file: the cast to a narrower param_dtype (float16) overflowed.
            name_ = np.dtype(dtype).name
            wider = "jnp.bfloat16 or jnp.float32" if name_ == "float16" else "jnp.float32"
            raise ValueError(
                f"checkpoint tensor {name} holds values up to "
                f"{float(np.abs(raw.astype(np.float64)).max()):.4g} that overflow {name_} "
                f"(largest {float(jnp.finfo(dtype).max):.4g}); load it with param_dtype={wider}")
        return block

    if not tmap.stacked:
        return one(tmap.hf_names[0], index)
    layers = range(*index[0].indices(len(tmap.hf_names)))
    return np.stack([one(tmap.hf_names[i], index[1:]) for i in layers])


_LM_HEAD, _EMBED = "lm_head.weight", "model.embed_tokens.weight"


def _distinct_lm_head(handles, files, held, rows: int = 8192) -> bool:
    """Whether the checkpoint holds an lm_head.weight unequal to model.embed_tokens.weight
    (compared `rows` rows at a time, so a large vocabulary is never on the host twice)."""
    if any(n not in files or n not in held[files[n]] for n in (_LM_HEAD, _EMBED)):
        return False  # nothing to keep, or reported as missing / misplaced later
    head, embed = (handles[n].get_slice(n) for n in (_LM_HEAD, _EMBED))
    if tuple(head.get_shape()) != tuple(embed.get_shape()):
        return True
    n = head.get_shape()[0]
    for start in range(0, n, rows):
        end = min(start + rows, n)  # safetensors refuses a slice past the end
        if not np.array_equal(np.asarray(head[start:end]), np.asarray(embed[start:end])):
            return True
    return False


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a checkpoint: `taskpgm_jax.data.load_tokenizer` (local files only,
    a missing pad token set to EOS, named errors for a path without tokenizer files),
    re-exported here for users who load models and tokenizers together.

    Args:
      path: the checkpoint directory.

    Returns:
      A `transformers` tokenizer.
    """
    # Imported at call time: the data package pulls in `datasets` (~1 s), which loading weights
    # does not need.
    from taskpgm_jax.data.tokenize import load_tokenizer as load

    return load(path)


def load_hf_checkpoint(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: DTypeLike = jnp.bfloat16,
    *,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = True,
    remat: bool = False,
    attention_impl: AttentionImpl = "dot",
    attention_chunk: int = 512,
) -> CausalLM:
    """Loads a Llama / Qwen2 / Mistral checkpoint directory as a `CausalLM`.

    Args:
      path: directory with config.json and model.safetensors or a sharded
        model.safetensors.index.json.
      mesh: place every parameter on this mesh by its logical axes (default: one device).
      rules: logical -> mesh axis rules (default `taskpgm_jax.sharding.DEFAULT_RULES`).
      dtype: compute dtype (logits, softmax and norms stay float32).
      param_dtype: storage dtype of the parameters (cast while reading).
      scan_layers: stack layers for `lax.scan`.
      remat: recompute layer activations in the backward pass.
      attention_impl: "dot", "chunked", "xla" or "cudnn" (flash attention on NVIDIA GPUs,
        bf16 / fp16 compute): see `ModelConfig.attention_impl`.
      attention_chunk: keys per step of "chunked" attention.

    Returns:
      The model; `model(input_ids, attention_mask)` gives float32 logits [B, S, V].

    Raises:
      ValueError: unsupported config attribute, or (all listed at once) tensors missing from the
        checkpoint, tensors absent from the file the index names for them, tensors the model
        does not use, and tensors of the wrong shape.

    Example:
      >>> mesh = make_mesh(data=1, fsdp=4, tensor=2)
      >>> model = load_hf_checkpoint("/ckpt/Llama-2-7b-hf", mesh=mesh)
    """
    _refuse_a_file(path, "load_hf_checkpoint")
    cfg = config_from_hf(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                         remat=remat, attention_impl=attention_impl,
                         attention_chunk=attention_chunk)
    files = checkpoint_files(path)

    with contextlib.ExitStack() as stack:
        # One handle per file, opened once: every parameter (and every layer of a stacked one) reads
        # its slices through these while make_array_from_callback builds the arrays below.
        opened = {f: stack.enter_context(_safe_open(f))
                  for f in sorted(set(files.values()))}
        handles = {name: opened[f] for name, f in files.items()}
        # An index may name a file that lacks the tensor; get_slice would then fail with a bare
        # SafetensorError, so membership is checked and reported with the other problems.
        held = {f: set(h.keys()) for f, h in opened.items()}
        if cfg.tie_word_embeddings and _distinct_lm_head(handles, files, held):
            # As transformers: a checkpoint whose lm_head differs from the embeddings is loaded
            # untied (tying would silently replace the trained head).
            warnings.warn(
                f"{os.fspath(path)}: config.json says tie_word_embeddings=true, but "
                f"{os.path.basename(files[_LM_HEAD])} holds an {_LM_HEAD} that differs from "
                f"{_EMBED}; loaded untied with the file's {_LM_HEAD} (as transformers does). Set "
                "tie_word_embeddings to false in config.json to silence this warning",
                stacklevel=2)
            cfg = cfg.replace(tie_word_embeddings=False)
        abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), rules=rules))
        graphdef, state = nnx.split(abstract)
        flat = nnx.to_flat_state(state)
        missing, misplaced, misshaped, used = [], [], [], set()
        plan = []
        for path_, var in flat:
            tmap = to_hf(path_, cfg.num_hidden_layers)
            want = hf_shape(var.shape, tmap)
            for name in tmap.hf_names:
                if name not in handles:
                    missing.append(name)
                    continue
                used.add(name)
                if name not in held[files[name]]:
                    misplaced.append(f"{name} (the index names {os.path.basename(files[name])})")
                    continue
                got = tuple(handles[name].get_slice(name).get_shape())
                if got != want:
                    misshaped.append(f"{name}: checkpoint {list(got)}, model expects {list(want)}")
            plan.append((path_, var, tmap))
        ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        unexpected = sorted(n for n in files if n not in used and n not in ignorable
                            and not n.endswith(IGNORABLE_SUFFIXES))
        if missing or misplaced or unexpected or misshaped:
            parts = []
            if missing:
                parts.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
            if misplaced:
                parts.append(f"tensors not in the file {INDEX_FILE} names ({len(misplaced)}): "
                             f"{', '.join(misplaced)}; fix the index or save the checkpoint again")
            if unexpected:
                parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
            if misshaped:
                parts.append(f"wrong shapes ({len(misshaped)}): {'; '.join(misshaped)}")
            raise ValueError(f"checkpoint {os.fspath(path)} does not match the model:\n  "
                             + "\n  ".join(parts))

        for _, var, tmap in plan:
            sharding: jax.sharding.Sharding
            if mesh is not None:
                axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
                sharding = named_sharding(mesh, axes, var.shape, rules)
            else:
                sharding = SingleDeviceSharding(jax.devices()[0])
            dtype_ = var.dtype

            def callback(index, tmap=tmap, dtype_=dtype_):
                return _read_block(handles, tmap, index, dtype_)

            var.set_value(jax.make_array_from_callback(tuple(var.shape), sharding, callback))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
