"""The dry run's memory model: the bytes per device of each stage, part by part.

* Parameters, gradients and Adam moments are counted exactly: every variable of the abstract
  model, with its dtype, divided by the number of devices its `logical_axes` are split over under
  `DEFAULT_RULES` on the planned mesh (the same `logical_to_spec` call the real sharding makes,
  so a dimension the mesh does not divide stays replicated). AdamW keeps two moments in the
  dtype of the parameter; gradient accumulation (`grad_accum > 1`) adds one accumulator.
* Activations are an estimate, good to within a factor of about 2. Per token and layer, with
  c the bytes of the compute dtype and p the tensor-parallel split of heads / MLP / vocabulary:

      layer = c * 4D + 8D                     (norm inputs and outputs, residual; f32 norms)
            + c * (2 N H + 2 K H + 3 F) / p   (q, attention output, k, v, gate, up, product)
            + (8 + c) * N * S / p             (attention scores and probabilities, f32 + c:
                                               the attention is materialised, S x S per head)

  With `model.attention_impl: cudnn` (flash attention) the last term becomes c * S + 4 N / p:
  the mask as one additive bias row shared by the heads, and the softmax's log-sum-exp. With
  `chunked` (C = `ModelConfig.attention_chunk` keys a step) it becomes (8 + c) N min(C, S) / p
  + 4 N H ceil(S / C) / p: one step's scores, and the running output each step keeps for the
  backward pass.

  Training keeps `layer` for every layer plus one for the backward pass (L + 1 layers); with
  `model.remat` it keeps each layer's input (c * D per layer) and one recomputed layer with its
  gradient (2 x layer). Logits add 4 * V / p bytes per token per copy: three copies in training
  (logits, log-softmax, gradient), two in a forward pass; with `model.loss_chunk` C, training
  holds those three copies for C positions of each row only (the chunked loss). A forward
  pass (probe, eval) holds one layer at a time. Tokens per device are the rows a device holds
  (the batch is split over data x fsdp only when that product divides it, as the real sharding
  does) times the sequence.
  FSDP (mesh fsdp > 1) gathers each layer's weights at use: two layers in the compute dtype and
  the embedding table are counted as "gathered weights". Without FSDP nothing is gathered; when
  the compute dtype differs from `param_dtype` the layers cast each kernel at use
  (models/layers.py), counted as "cast weights": one layer and the output head in the compute
  dtype. With equal dtypes the cast is a no-op and neither part appears. Every stage counts
  these, the forward-only probe and eval included.
* The single-task stage also counts the round's initial adapters, whole (unsplit) on the
  default device beside the trainer's copy; finished rounds wait on the host
  (`StageMemory.single_task`).

`largest_fitting` finds the largest adapter round / probe chunk whose stage fits in
`PLAN_FRACTION` of the device memory (`MemorySetting`). `pipeline/dryrun.py` resolves the config,
builds the stages from these parts and reports.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from taskpgm_jax.models import LoraConfig, LoRAParam, ModelConfig, add_lora
from taskpgm_jax.models.decoder import CausalLM
from taskpgm_jax.sharding import logical_to_spec

# The largest adapter rounds and probe chunks are sized to this share of the device memory: room
# for XLA's temporaries and for the activation estimate's error.
PLAN_FRACTION = 0.8
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class MemoryPart:
    """One part of a stage's memory: `logical` bytes (one unsharded copy), `per_device` bytes."""

    name: str
    logical: int
    per_device: int


def total(parts: Iterable[MemoryPart]) -> int:
    """Bytes per device of `parts` together."""
    return sum(p.per_device for p in parts)


def gib(n: int, *, mib: bool = True) -> str:
    """`n` bytes in GiB; in MiB below 0.01 GiB unless `mib` is False."""
    return f"{n / 2 ** 20:.2f} MiB" if mib and n < 0.01 * GIB else f"{n / GIB:.2f} GiB"


# -- sharding -------------------------------------------------------------------------------------

def _split(mesh: dict[str, int], axes, shape) -> int:
    """Number of devices an array with `axes` and `shape` is split over (the rest replicate)."""
    spec = logical_to_spec(tuple(axes), mesh_shape=mesh, shape=tuple(shape))
    names = [n for entry in spec if entry is not None
             for n in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(mesh[n] for n in names)


def _tensor_split(size: int, tensor: int) -> int:
    """The tensor axis splits a dimension (heads, MLP, vocabulary) only when it divides it."""
    return tensor if size % tensor == 0 else 1


def rows_per_device(rows: int, mesh) -> int:
    """The rows of a batch of `rows` one device holds."""
    return rows // _split(mesh, ("batch",), (rows,))


# -- sizes ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sizes:
    base: tuple[int, int]          # (logical, per-device) bytes of the base parameters
    adapter: tuple[int, int]       # ... of one adapter
    base_params: int
    adapter_params: int
    layer_params: int              # parameters of one decoder layer
    embed_bytes: int               # the embedding table in its storage dtype


def _state_bytes(state, mesh) -> tuple[int, int, int]:
    logical = per_device = count = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        n = int(np.prod(var.shape))
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        size = n * jnp.dtype(var.dtype).itemsize
        count += n
        logical += size
        per_device += size // _split(mesh, axes, var.shape)
    return logical, per_device, count


def model_sizes(model_cfg: ModelConfig, lora: LoraConfig | None, mesh) -> Sizes:
    """Counts and bytes of the abstract model (`nnx.eval_shape`: shapes only, no memory)."""
    def make():
        model = CausalLM(model_cfg, rngs=nnx.Rngs(0))
        return add_lora(model, lora, rngs=nnx.Rngs(1)) if lora is not None else model

    model = nnx.eval_shape(make)
    base = _state_bytes(nnx.state(model, nnx.Param), mesh)
    adapter = _state_bytes(nnx.state(model, LoRAParam), mesh)
    layers = _state_bytes(nnx.state(model.model.layers, nnx.Param), mesh)[2]
    emb = model.model.embed_tokens.embedding
    return Sizes(base[:2], adapter[:2], base[2], adapter[2], layers // model_cfg.num_hidden_layers,
                 int(np.prod(emb.shape)) * jnp.dtype(emb.dtype).itemsize)


def _layer_bytes_per_token(m: ModelConfig, seq_len: int, tensor: int) -> float:
    c = jnp.dtype(m.dtype).itemsize
    d, n, k, h, f = (m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim,
                     m.intermediate_size)

    def p(size):
        return _tensor_split(size, tensor)

    if m.attention_impl == "cudnn":
        attention = c * seq_len + 4 * n / p(n)  # no scores: the bias row and log-sum-exp
    elif m.attention_impl == "chunked":
        chunk = m.attention_chunk
        attention = ((8 + c) * n * min(chunk, seq_len) + 4 * n * h * -(-seq_len // chunk)) / p(n)
    else:
        attention = (8 + c) * n * seq_len / p(n)
    return (c * 4 * d + 8 * d
            + c * (2 * n * h / p(n) + 2 * k * h / p(k) + 3 * f / p(f))
            + attention)


def _optimizer_parts(what: str, state: tuple[int, int], copies: int, grad_accum: int):
    logical, dev = state
    grads = 2 if grad_accum > 1 else 1
    return [
        MemoryPart(f"{what} params", copies * logical, copies * dev),
        MemoryPart(f"{what} grads" + (" + accumulator" if grads > 1 else ""),
                   grads * copies * logical, grads * copies * dev),
        MemoryPart(f"{what} adam moments (mu, nu)", 2 * copies * logical, 2 * copies * dev),
    ]


# -- stages ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StageMemory:
    """The memory model of one run: its architecture, sizes and mesh; one method per stage kind.

    Attributes:
      model: the base `ModelConfig` (its compute dtype and `remat` are the run's).
      sizes: `model_sizes` of the model on `mesh`.
      mesh: {"data": ., "fsdp": ., "tensor": .} sizes.
      seq_len: `model.seq_len`.
      param_dtype: `model.param_dtype` (named in the parts).
      loss_chunk: `model.loss_chunk` (None: the training loss takes all positions at once).
    """

    model: ModelConfig
    sizes: Sizes
    mesh: dict[str, int]
    seq_len: int
    param_dtype: str
    loss_chunk: int | None = None

    def activations(self, rows: int, *, train: bool, label: str,
                    logits: bool = True) -> list[MemoryPart]:
        """Activations, logits (unless `logits=False`: a caller that counts them itself) and
        gathered or cast weights for `rows` x `seq_len` tokens on one device."""
        m, tensor, seq = self.model, self.mesh["tensor"], self.seq_len
        tokens = rows * seq
        c = jnp.dtype(m.dtype).itemsize
        layer = _layer_bytes_per_token(m, seq, tensor)
        if not train:
            act, how = tokens * layer, "one layer live"
        elif m.remat:
            act, how = tokens * (m.num_hidden_layers * c * m.hidden_size + 2 * layer), "remat"
        else:
            act, how = tokens * (m.num_hidden_layers + 1) * layer, "no remat"
        copies = 3 if train else 2
        # The positions per loss chunk when training chunks the loss, else None.
        chunk = (self.loss_chunk if train and self.loss_chunk is not None and self.loss_chunk < seq
                 else None)
        logit_tokens = rows * chunk if chunk is not None else tokens
        logit_bytes = (logit_tokens * copies * 4 * m.vocab_size
                       // _tensor_split(m.vocab_size, tensor))
        which = f", {chunk}-position chunks" if chunk is not None else ""
        parts = [MemoryPart(f"activations: {label} ({how})", int(act), int(act))]
        if logits:
            parts.append(MemoryPart(f"logits (float32 x {copies}: logits, log-softmax"
                                    + (", gradient" if train else "") + f"{which})",
                                    int(logit_bytes), int(logit_bytes)))
        if self.mesh["fsdp"] > 1:
            gathered = 2 * self.sizes.layer_params * c // tensor + self.sizes.embed_bytes
            parts.append(MemoryPart("gathered weights (two layers in compute dtype + embedding "
                                    "table)", gathered, gathered))
        elif jnp.dtype(m.dtype) != jnp.dtype(m.param_dtype):
            # models/layers.py casts each kernel to the compute dtype at use; with equal dtypes
            # the cast is a no-op and no copy exists.
            head = m.vocab_size * m.hidden_size // _tensor_split(m.vocab_size, tensor)
            cast = (self.sizes.layer_params // tensor + head) * c
            parts.append(MemoryPart("cast weights (one layer + output head in compute dtype)",
                                    cast, cast))
        return parts

    def training(self, batch_size: int, grad_accum: int = 1, adapters: int = 0) -> list[MemoryPart]:
        """One training step of `adapters` LoRA adapters side by side (0: the whole model, as in
        pretraining and a full fine-tune) on batches of `batch_size` rows."""
        rows = max(adapters, 1) * rows_per_device(batch_size // grad_accum, self.mesh)
        if adapters:
            parts = [MemoryPart(f"base params ({self.param_dtype}, frozen)", *self.sizes.base)]
            parts += _optimizer_parts(f"{adapters} adapter(s):", self.sizes.adapter, adapters,
                                      grad_accum)
            label = f"{adapters} adapter(s) x {rows // adapters} row(s) x {self.seq_len} tokens"
        else:
            parts = _optimizer_parts("model:", self.sizes.base, 1, grad_accum)
            label = f"{rows} row(s) x {self.seq_len} tokens"
        return parts + self.activations(rows, train=True, label=label)

    def single_task(self, batch_size: int, grad_accum: int, t: int, g: int) -> list[MemoryPart]:
        """The single-task stage in rounds of `g` of the `t` adapters, at its peak: the largest
        round's training step beside that round's initial adapters, which `pipeline/stages.py`
        makes whole on the default device (finished rounds wait on the host)."""
        n = min(g, t)
        one = self.sizes.adapter[0]  # whole on one device, not split over the mesh
        held = MemoryPart(f"{n} whole adapters on one device (the round's initial ones)",
                          n * one, n * one)
        return self.training(batch_size, grad_accum, n) + [held]

    def probe(self, batch_size: int, t: int, chunk: int) -> list[MemoryPart]:
        """The base and `t` adapters on a probe batch, `chunk` of the t + 1 models per forward;
        the raw logits of all t + 1 are kept (eval/score.py scores them with from_logits=True,
        normalising tile by tile, so no log-softmax copy is stored)."""
        rows = rows_per_device(batch_size, self.mesh)
        seq = self.seq_len
        vocab = self.model.vocab_size // _tensor_split(self.model.vocab_size, self.mesh["tensor"])
        logits = (t + 1) * rows * seq * vocab * 4
        logical, per_device = self.sizes.adapter
        return [
            MemoryPart(f"base params ({self.param_dtype})", *self.sizes.base),
            # The T trained adapters, each split over the mesh like the weights it adapts.
            MemoryPart(f"{t} adapters (split like the base)", t * logical, t * per_device),
            MemoryPart(f"logits ({t + 1} models x {rows} row(s) x {seq} x {vocab} float32)",
                       logits, logits),
            # The forward's activations and gathered / cast weights; its logits are the ones
            # counted above.
            *self.activations(chunk * rows, train=False, logits=False,
                              label=f"{chunk} model(s) x {rows} row(s) x {seq} tokens"),
        ]

    def eval(self, batch_size: int, max_new_tokens: int, lora: bool) -> list[MemoryPart]:
        """A fine-tuned model (the base plus an adapter with `lora`) generating greedily:
        parameters, the KV cache and the prefill."""
        m, rows, seq = self.model, rows_per_device(batch_size, self.mesh), self.seq_len
        positions = seq + max_new_tokens
        cache = (2 * m.num_hidden_layers * rows * positions * m.num_key_value_heads * m.head_dim
                 * jnp.dtype(m.dtype).itemsize
                 // _tensor_split(m.num_key_value_heads, self.mesh["tensor"]))
        parts = [MemoryPart(f"params ({self.param_dtype})", *self.sizes.base)]
        if lora:
            parts.append(MemoryPart("adapter", *self.sizes.adapter))
        parts.append(MemoryPart(f"KV cache ({rows} row(s) x {positions} positions)", cache, cache))
        # Activations, the prefill's logits and, as in training, gathered / cast weights.
        return parts + self.activations(rows, train=False,
                                        label=f"prefill of {rows} row(s) x {seq} tokens")


def largest_fitting(build: Callable[[int], list[MemoryPart]], upper: int,
                    limit: int | None) -> int:
    """The largest n in [1, upper] with total(build(n)) <= PLAN_FRACTION * limit (upper when the
    limit is unknown; 1 when nothing fits)."""
    if limit is not None:
        limit = int(PLAN_FRACTION * limit)
    if limit is None or total(build(upper)) <= limit:
        return upper
    if total(build(1)) > limit:
        return upper if upper == 1 else 1
    lo, hi = 1, upper  # build(lo) fits, build(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total(build(mid)) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


@dataclasses.dataclass(frozen=True)
class MemorySetting:
    """A setting that changes memory and never results (`single_task.adapters_per_round`: the
    adapters per round, `probe.adapter_chunk`: the models per probe forward), as planned.

    Attributes:
      key: the config key.
      setting: its configured value (None: all `upper` at once).
      upper: the most it can be (T adapters, T + 1 models).
      value: what the run uses: the setting, at most `upper`.
      best: the largest value whose stage fits in PLAN_FRACTION of `limit` (`largest_fitting`).
      build: the stage's memory parts for a value.
      limit: the device memory in bytes (None: unknown).
    """

    key: str
    setting: int | None
    upper: int
    value: int
    best: int
    build: Callable[[int], list[MemoryPart]]
    limit: int | None

    @classmethod
    def plan(cls, key: str, setting: int | None, upper: int,
             build: Callable[[int], list[MemoryPart]], limit: int | None) -> MemorySetting:
        return cls(key, setting, upper, min(setting or upper, upper),
                   largest_fitting(build, upper, limit), build, limit)

    @property
    def how(self) -> str:
        return "all at once" if self.setting is None else f"{self.key}={self.setting}"

    def note(self) -> str:
        """What the value leaves out, and the largest within PLAN_FRACTION as an override."""
        notes = []
        if self.value < self.upper:
            every = total(self.build(self.upper))
            notes.append(f"all {self.upper} at once would need {gib(every)}")
        if self.limit is not None and self.best != self.value:
            notes.append(f"largest within {PLAN_FRACTION:.0%} of the device memory: "
                         f"{self.key}={self.best}")
        return "; ".join(notes)
