"""A deterministic, resumable, multi-host data iterator over encoded sequences.

Each epoch, every host computes the same global order of the N sequences (a permutation seeded
by (seed, epoch); without shuffling, the given order continued cyclically from where the last
epoch stopped), keeps its first P * (N // P) entries so all hosts take the same number of
sequences, and host p of P reads entries p, p + P, p + 2P, ... of it. Hosts never share a
sequence within an epoch, and the N % P sequences left out change from epoch to epoch, so every
sequence is read. A host only ever touches its own share: pass a lazy sequence (`LazyEncoded`)
and each host tokenizes only its share, with no communication.

The state is (epoch, cursor): the next sequence to read in this host's shuffled shard. Batches are
built in order from that point (in-order packing, no shuffle buffer), so restoring the state
reproduces exactly the batches that would have come next. The stream is endless by default:
train for a number of steps, so every host takes the same number of batches even when packing
puts a different number of sequences in each host's rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from taskpgm_jax.data.batch import Batch, rows_to_batch
from taskpgm_jax.data.tasks import DataError, check_int, check_seed
from taskpgm_jax.data.tokenize import Encoded, encode_example

if TYPE_CHECKING:  # jax is imported where global arrays are made, not with the data package
    from jax.sharding import Sharding

FINGERPRINT_SAMPLES = 16

__all__ = ["HostIterator", "LazyEncoded", "global_batch"]


class LazyEncoded(Sequence):
    """Rows encoded on access, so a host tokenizes only the rows it reads.

    Args:
      tokenizer: a `transformers` tokenizer.
      rows: an indexable collection of rows with `prompt` and `target` (a `datasets.Dataset`,
        a list of dicts, a materialised mixture).
      max_length, add_eos, separator: as in `encode_example`.
    """

    def __init__(self, tokenizer, rows, *, max_length: int | None = None, add_eos: bool = True,
                 separator: str = ""):
        self._tok, self._rows = tokenizer, rows
        self._kw = {"max_length": max_length, "add_eos": add_eos, "separator": separator}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if not isinstance(i, (int, np.integer)):
            raise TypeError("LazyEncoded takes integer indices")
        row = self._rows[int(i)]
        return encode_example(self._tok, row["prompt"], row["target"], example=int(i), **self._kw)


class HostIterator:
    """Yields this host's `Batch`es of shape [batch_size, seq_len], forever or for `num_epochs`.

    Args:
      seqs: every encoded sequence, as any sequence (`len` and indexing); all hosts pass the
        same one and each reads only its shard. A `LazyEncoded` tokenizes on access.
      batch_size: rows per batch on this host (global batch = batch_size * process_count).
      seq_len: tokens per row.
      seed: the shuffle seed.
      pack: pack several sequences per row (else one per row, padded).
      shuffle: permute each epoch (else the given order, which continues cyclically across
        epochs, so the N % process_count sequences left out of an epoch differ every time).
      num_epochs: stop after this many passes (None: endless).
      process_index, process_count: this host and the number of hosts; default
        `jax.process_index()` and `jax.process_count()`.

    Raises:
      DataError (a ValueError): a size that is not a positive int, a seed outside [0, 2**32),
        pack / shuffle not a bool, or fewer sequences than hosts. The settings are kept as
        Python ints and bools, so `state()` is JSON.

    Example:
      >>> it = HostIterator(seqs, batch_size=8, seq_len=128, seed=0)
      >>> batch = next(it); state = it.state()          # save with the checkpoint
      >>> it2 = HostIterator(seqs, batch_size=8, seq_len=128, seed=0); it2.restore(state)
    """

    def __init__(self, seqs: Sequence[Encoded], *, batch_size: int, seq_len: int, seed: int = 0,
                 pack: bool = True, shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        process_count = check_int(process_count, "process_count", 1)
        process_index = check_int(process_index, "process_index", 0, process_count)
        batch_size = check_int(batch_size, "batch_size", 1)
        seq_len = check_int(seq_len, "seq_len", 1)
        seed = check_seed(seed)
        if num_epochs is not None:
            num_epochs = check_int(num_epochs, "num_epochs", 1)
        for name, flag in (("pack", pack), ("shuffle", shuffle)):
            if not isinstance(flag, (bool, np.bool_)):
                raise DataError(f"{name} must be True or False, got {flag!r}")
        pack, shuffle = bool(pack), bool(shuffle)
        if len(seqs) < process_count:
            raise DataError(f"{len(seqs)} sequences cannot be shared by {process_count} hosts")
        self._seqs = seqs
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.pack, self.shuffle, self.num_epochs = pack, shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self._per_epoch = len(seqs) // process_count
        self._epoch, self._cursor, self._step = 0, 0, 0
        self._share_cache: tuple[int, np.ndarray] | None = None
        self._fingerprint: str | None = None

    def _share(self, epoch: int) -> np.ndarray:
        """This host's sequence indices, in reading order, for one epoch."""
        if self._share_cache is None or self._share_cache[0] != epoch:
            n, taken = len(self._seqs), self._per_epoch * self.process_count
            # The same global order on every host (seeded by (seed, epoch) only), so the hosts'
            # shares are disjoint; the tail left out differs between epochs.
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(n)[:taken]
            else:
                order = (epoch * taken + np.arange(taken)) % n
            self._share_cache = (epoch, order[self.process_index::self.process_count])
        return self._share_cache[1]

    def _peek(self) -> Encoded | None:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            return None
        seq = self._seqs[int(self._share(self._epoch)[self._cursor])]
        if not 0 < len(seq) <= self.seq_len:
            raise ValueError(f"sequence of example {seq.example} has {len(seq)} tokens; need "
                             f"1..{self.seq_len} (encode with max_length <= seq_len)")
        return seq

    def _advance(self) -> None:
        self._cursor += 1
        if self._cursor == self._per_epoch:
            self._epoch, self._cursor = self._epoch + 1, 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        rows: list[list[Encoded]] = []
        used = self.seq_len + 1
        while True:
            seq = self._peek()
            if seq is None:
                break
            if not self.pack or used + len(seq) > self.seq_len:
                if len(rows) == self.batch_size:
                    break  # leave `seq` for the next batch: the cursor points at it
                rows.append([])
                used = 0
            rows[-1].append(seq)
            used += len(seq)
            self._advance()
        if not rows:
            raise StopIteration
        self._step += 1
        return rows_to_batch(rows, self.seq_len, self.batch_size)

    def _config(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_sequences": len(self._seqs), "batch_size": self.batch_size,
                "seq_len": self.seq_len, "pack": self.pack, "shuffle": self.shuffle,
                "process_index": self.process_index, "process_count": self.process_count,
                "fingerprint": self.fingerprint}

    @property
    def fingerprint(self) -> str:
        """A hash of FINGERPRINT_SAMPLES sequences spread over the data (token ids and target
        masks): a resume onto other data of the same length is refused instead of continuing
        silently. A sample, not all: a `LazyEncoded` of millions of rows would tokenize them
        all."""
        if self._fingerprint is None:
            n = len(self._seqs)
            h = hashlib.sha256()
            for i in sorted({int(i) for i in np.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLES))}):
                s = self._seqs[i]
                h.update(np.asarray(s.input_ids, np.int64).tobytes())
                h.update(np.asarray(s.target_mask, np.bool_).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable position: save it with the model checkpoint."""
        return {"epoch": self._epoch, "cursor": self._cursor, "step": self._step,
                **self._config()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from a saved `state()`; the next batch is the one that came next then.

        Raises:
          ValueError: the state was saved by an iterator with other data or settings, or is
            not a `state()` dict (DataError).
        """
        if not isinstance(state, Mapping):
            raise DataError(f"state must be a dict from state(), got {type(state).__name__}")
        mine = self._config()
        if "fingerprint" not in state:  # saved before states carried one: not compared
            del mine["fingerprint"]
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"iterator state does not match this iterator (saved, now): {diff}")
        try:
            self._epoch, self._cursor, self._step = (
                check_int(state.get("epoch"), "state['epoch']"),
                check_int(state.get("cursor"), "state['cursor']", 0, self._per_epoch),
                check_int(state.get("step"), "state['step']"))
        except DataError as e:
            raise DataError(f"{e}; pass a state saved by state()") from None


def global_batch(batch: Batch, sharding: Sharding) -> Batch:
    """Assembles each host's `Batch` into global `jax.Array`s sharded along the batch axis.

    Args:
      batch: this host's batch (its rows of the global batch).
      sharding: a `jax.sharding.NamedSharding` for [global_batch, seq] arrays, e.g.
        `NamedSharding(mesh, P("data", None))`.

    Returns:
      A `Batch` of global arrays of shape [batch_size * process_count, seq_len].
    """
    import jax

    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
