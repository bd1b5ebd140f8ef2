"""Static-shape batches: padding one sequence per row, or packing several per row.

Both give the same `Batch`, the form the decoder takes
(`model(input_ids, attention_mask=None, *, segment_ids=..., positions=...)`):

* `segment_ids` [batch, seq] int32: 0 on padding, segments numbered 1, 2, ... within each row
  (a padded, unpacked row is segment 1). Attention must stay inside a segment:
  query i may see key j only when segment_ids[i] == segment_ids[j] != 0 and j <= i.
* `positions` [batch, seq] int32: restart at 0 at the start of every segment (0 on padding).
* `targets` [batch, seq] int32: the next token *of the same segment*, targets[t] = input_ids[t+1];
  0 at a segment's last token and on padding. Logits at t are scored against targets[t].
* `loss_mask` [batch, seq] float32: 1 where targets[t] is a target token (the answer or its EOS),
  so sum(loss_mask * -log p(targets)) is the target-only loss and, per segment, log p(y | x).
  Values lie in [0, 1]: a fraction weights its token's loss (`check_batch_values`).

Shapes never depend on the data, so nothing recompiles. Packing is greedy and in order: each
sequence goes into the current row if it fits, else it opens a new row. In-order packing makes
every batch a function of where in the stream it starts, which the iterator needs to resume exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import numpy as np

from taskpgm_jax.data.tasks import check_int
from taskpgm_jax.data.tokenize import Encoded

if TYPE_CHECKING:  # jax is imported where batches are placed on devices, not with the data package
    import jax

# A batch field: a host array as built here, or a `jax.Array` once placed (`global_batch`, the
# trainers' `place_batch`, `eval`), the same pytree either way.
BatchArray: TypeAlias = "np.ndarray | jax.Array"

__all__ = ["Batch", "check_batch_values", "pack_batches", "pack_rows", "pad_batch",
           "rows_to_batch"]


class Batch(NamedTuple):
    """One static-shape batch (see the module docstring): a pytree of NumPy arrays as built
    here, of `jax.Array`s once placed on devices (`global_batch`, the trainers' `place_batch`).

    Attributes:
      input_ids: int32 [batch, seq].
      targets: int32 [batch, seq], next token within the segment.
      loss_mask: float32 [batch, seq], 1 where `targets` is a target token.
      segment_ids: int32 [batch, seq], 0 = padding, 1.. = segment within the row.
      positions: int32 [batch, seq], restarting at 0 per segment.
    """

    input_ids: BatchArray
    targets: BatchArray
    loss_mask: BatchArray
    segment_ids: BatchArray
    positions: BatchArray

    @property
    def attention_mask(self) -> BatchArray:
        """int32 [batch, seq]: 1 on real tokens (for models that take only a padding mask)."""
        return (self.segment_ids > 0).astype(np.int32)


def _check_fits(seq: Encoded, seq_len: int) -> None:
    if len(seq) > seq_len:
        raise ValueError(f"sequence of example {seq.example} has {len(seq)} tokens > seq_len "
                         f"{seq_len}; encode with max_length <= seq_len")
    if len(seq) == 0:
        raise ValueError(f"example {seq.example} encodes to an empty sequence")


def pack_rows(seqs: Sequence[Encoded], seq_len: int) -> list[list[Encoded]]:
    """Groups sequences into rows of at most `seq_len` tokens, greedily and in order.

    Returns:
      A list of rows, each a list of the sequences it holds.
    """
    seq_len = check_int(seq_len, "seq_len", 1)
    rows: list[list[Encoded]] = []
    used = seq_len + 1  # forces a new row for the first sequence
    for s in seqs:
        _check_fits(s, seq_len)
        if used + len(s) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += len(s)
    return rows


def rows_to_batch(rows: Sequence[Sequence[Encoded]], seq_len: int,
                  batch_size: int | None = None) -> Batch:
    """Lays rows of sequences out into one `Batch`; missing rows are all padding.

    Args:
      rows: each row a list of sequences whose lengths sum to at most `seq_len`.
      seq_len: the static row length.
      batch_size: the static number of rows (default: len(rows)).

    Returns:
      A `Batch` of shape [batch_size, seq_len].
    """
    seq_len = check_int(seq_len, "seq_len", 1)
    batch_size = len(rows) if batch_size is None else check_int(batch_size, "batch_size", 1)
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit in batch_size {batch_size}")
    shape = (batch_size, seq_len)
    ids = np.zeros(shape, np.int32)
    tgt = np.zeros(shape, np.int32)
    mask = np.zeros(shape, np.float32)
    seg = np.zeros(shape, np.int32)
    pos = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row, start=1):
            n = len(s)
            end = start + n
            if end > seq_len:
                raise ValueError(f"row {r} holds {end} tokens > seq_len {seq_len}")
            ids[r, start:end] = s.input_ids
            seg[r, start:end] = k
            pos[r, start:end] = np.arange(n)
            # Position t predicts token t+1 of the same sequence; the last one predicts nothing.
            tgt[r, start:end - 1] = s.input_ids[1:]
            mask[r, start:end - 1] = s.target_mask[1:]
            start = end
    return Batch(ids, tgt, mask, seg, pos)


def pad_batch(seqs: Sequence[Encoded], seq_len: int, batch_size: int | None = None) -> Batch:
    """One sequence per row, right-padded to `seq_len` (segment 1, padding segment 0).

    Example:
      >>> batch = pad_batch(encode_task(tok, pool.probe(name), max_length=64), seq_len=64)
    """
    seq_len = check_int(seq_len, "seq_len", 1)
    for s in seqs:
        _check_fits(s, seq_len)
    return rows_to_batch([[s] for s in seqs], seq_len, batch_size)


def pack_batches(seqs: Sequence[Encoded], seq_len: int, batch_size: int,
                 drop_remainder: bool = False) -> list[Batch]:
    """Packs sequences in order into rows, and rows into batches of `batch_size`.

    Args:
      seqs: encoded sequences, each at most `seq_len` tokens.
      seq_len, batch_size: the static batch shape.
      drop_remainder: drop a last, partly filled batch instead of padding it with empty rows.

    Returns:
      A list of `Batch`.
    """
    batch_size = check_int(batch_size, "batch_size", 1)
    rows = pack_rows(seqs, seq_len)
    batches = [rows_to_batch(rows[i:i + batch_size], seq_len, batch_size)
               for i in range(0, len(rows), batch_size)]
    if drop_remainder and rows and len(rows) % batch_size:
        batches.pop()
    return batches


def check_batch_values(batch: Batch, vocab_size: int | None = None, name: str = "batch") -> None:
    """Checks a host batch's values before a jitted step (inside, nothing can be checked: an
    out-of-range input id is clipped and an out-of-range target gathers NaN).

    Args:
      batch: a `Batch`-like object of host arrays.
      vocab_size: the model's vocabulary: `input_ids` (padding included: pad with a valid id)
        and the `targets` under a non-zero `loss_mask` must lie in [0, vocab_size); targets
        under padding may be anything (HF-style -100 included). None skips the id checks.
      name: how the error names the batch.

    Raises:
      ValueError: ids that are not ints or outside the vocabulary, or a `loss_mask` value
        outside [0, 1] (1 on target tokens, 0 elsewhere; a fraction weights a token's loss).
    """
    mask = np.asarray(batch.loss_mask)
    bad = mask[~((mask >= 0) & (mask <= 1))]  # NaN fails both comparisons
    if bad.size:
        raise ValueError(f"{name}.loss_mask must lie in [0, 1] (1 on target tokens, 0 elsewhere; "
                         f"a fraction weights a token's loss), got {bad.flat[0]}")
    if vocab_size is None:
        return
    for field in ("input_ids", "targets"):
        x = np.asarray(getattr(batch, field))
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{name}.{field} must be an int array, got {x.dtype}")
        if field == "targets":
            x = x[mask > 0]
        # NumPy, not a device op: that would wait for the step still running (no running ahead).
        if x.size and (x.min() < 0 or x.max() >= vocab_size):
            value = x.min() if x.min() < 0 else x.max()
            raise ValueError(
                f"{name}.{field}: ids must lie in [0, vocab_size={vocab_size}), got {value}"
                f"{' under loss_mask > 0' if field == 'targets' else ''}; the tokenizer and the "
                "model must share a vocabulary (pad with a valid id, e.g. the tokenizer's pad or "
                "eos id)")
