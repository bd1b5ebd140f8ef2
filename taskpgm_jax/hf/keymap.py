"""Names of our parameters <-> Hugging Face tensor names.

Our module tree mirrors `*ForCausalLM`, so the map is: same path, the leaf renamed, kernels
transposed (HF stores Linear weights as [out, in], we store [in, out]), and, for scanned layers,
one stacked array [L, ...] <-> L tensors `model.layers.{i}. ...`.
"""

from __future__ import annotations

import dataclasses

# Our leaf name -> (HF leaf name, transpose the last two dims).
_LEAF_RULES = {
    "kernel": ("weight", True),
    "embedding": ("weight", False),
    "weight": ("weight", False),  # RMSNorm scale
    "bias": ("bias", False),
}

# Tensors some checkpoints carry that are not parameters (buffers) or are implied by tying.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """Where one of our parameters lives in an HF checkpoint.

    Attributes:
      path: our parameter path (tuple of names / layer indices).
      hf_names: one HF tensor name, or L names (one per layer) for a stacked parameter.
      transpose: whether HF stores it transposed ([out, in]).
      stacked: whether our array has a leading layer axis that `hf_names` enumerates.
    """

    path: tuple
    hf_names: tuple[str, ...]
    transpose: bool
    stacked: bool


def to_hf(path: tuple, num_layers: int) -> TensorMap:
    """Maps our parameter path to its HF tensor name(s).

    Args:
      path: e.g. ("model", "layers", "self_attn", "q_proj", "kernel") for scanned layers or
        ("model", "layers", 3, "self_attn", "q_proj", "kernel") for a list of layers.
      num_layers: L, to enumerate a stacked parameter.

    Returns:
      The `TensorMap`.

    Raises:
      ValueError: the leaf name has no HF counterpart.
    """
    *parents, leaf = (str(p) if not isinstance(p, int) else p for p in path)
    if leaf not in _LEAF_RULES:
        raise ValueError(f"parameter {'.'.join(map(str, path))} has no Hugging Face counterpart")
    hf_leaf, transpose = _LEAF_RULES[leaf]
    stacked = (len(parents) >= 2 and parents[0] == "model" and parents[1] == "layers"
               and (len(parents) == 2 or not isinstance(parents[2], int)))
    if stacked:
        rest = ".".join(map(str, parents[2:] + [hf_leaf]))
        names = tuple(f"model.layers.{i}.{rest}" for i in range(num_layers))
    else:
        names = (".".join(map(str, parents + [hf_leaf])),)
    return TensorMap(tuple(path), names, transpose, stacked)


def hf_shape(shape: tuple[int, ...], tmap: TensorMap) -> tuple[int, ...]:
    """The shape one HF tensor of `tmap` must have, given our array's shape."""
    inner = tuple(shape[1:] if tmap.stacked else shape)
    return inner[::-1] if tmap.transpose else inner
