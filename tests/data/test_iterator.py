"""The host iterator: determinism, exact resume, multi-host shares, global arrays."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from taskpgm_jax.data import (
    DataError, Encoded, HostIterator, LazyEncoded, encode_task, global_batch, pack_batches,
    pad_batch, rows_to_batch,
)


def _seqs(rng, n, max_len=20):
    out = []
    for i in range(n):
        length = int(rng.integers(2, max_len + 1))
        # Token ids encode the sequence index, so a batch says which sequences it holds.
        ids = np.full(length, 1000 + i, np.int32)
        out.append(Encoded(ids, np.arange(length) >= length // 2, example=i))
    return out


def _ids_in(batch):
    """The sequence index of every segment in the batch (a sequence may appear twice)."""
    starts = (batch.segment_ids > 0) & (batch.positions == 0)
    return sorted(int(x) - 1000 for x in batch.input_ids[starts])


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("pack", [True, False])
def test_resume_reproduces_batches(rng, pack):
    seqs = _seqs(rng, 57)
    kw = dict(batch_size=3, seq_len=32, seed=int(rng.integers(1 << 30)), pack=pack)
    ref = HostIterator(seqs, **kw)
    stream = [next(ref) for _ in range(25)]  # several epochs
    it = HostIterator(seqs, **kw)
    cut = int(rng.integers(1, 20))
    for _ in range(cut):
        next(it)
    state = json.loads(json.dumps(it.state()))  # survives a checkpoint file
    resumed = HostIterator(seqs, **kw)
    resumed.restore(state)
    for k in range(cut, 25):
        assert _same(next(resumed), stream[k])
    # Same seed: same stream; another seed: another.
    again = HostIterator(seqs, **kw)
    assert all(_same(next(again), b) for b in stream[:5])
    other = HostIterator(seqs, **{**kw, "seed": kw["seed"] + 1})
    assert not all(_same(next(other), b) for b in stream[:5])
    with pytest.raises(ValueError, match="does not match"):
        HostIterator(seqs, **{**kw, "seq_len": 40}).restore(state)
    # Other data of the same length (one sequence edited) is refused too: it once resumed.
    edited = list(seqs)
    edited[0] = Encoded(seqs[0].input_ids + 1, seqs[0].target_mask, example=0)
    with pytest.raises(ValueError, match="does not match.*fingerprint"):
        HostIterator(edited, **kw).restore(state)
    # A state saved before states carried a fingerprint still resumes.
    legacy = {k: v for k, v in state.items() if k != "fingerprint"}
    older = HostIterator(seqs, **kw)
    older.restore(legacy)
    assert _same(next(older), stream[cut])


def test_epochs_cover_every_sequence_once(rng):
    seqs = _seqs(rng, 40)
    it = HostIterator(seqs, batch_size=4, seq_len=20, seed=0, pack=False, num_epochs=2)
    seen = [i for b in it for i in _ids_in(b)]
    assert sorted(seen) == sorted(list(range(40)) * 2)
    assert it.state()["epoch"] == 2


class _Recording(list):
    """A list that remembers which indices were read."""

    def __init__(self, items):
        super().__init__(items)
        self.touched = set()

    def __getitem__(self, i):
        self.touched.add(int(i))
        return super().__getitem__(i)


@pytest.mark.parametrize("shuffle", [True, False])
def test_hosts_read_disjoint_shares(rng, shuffle):
    n, hosts, epochs, batch = 83, 4, 6, 4
    per_epoch = n // hosts  # 20 per host, 3 sequences left out of each epoch
    seqs = _seqs(rng, n)
    reads = []  # reads[p][e]: the sequences host p read in epoch e
    for p in range(hosts):
        rec = _Recording(seqs)
        it = HostIterator(rec, batch_size=batch, seq_len=24, seed=11, num_epochs=epochs,
                          pack=False, shuffle=shuffle, process_index=p, process_count=hosts)
        ids = [i for b in it for i in _ids_in(b)]  # unpacked: batches align with epochs
        assert len(ids) == epochs * per_epoch
        reads.append([ids[e * per_epoch:(e + 1) * per_epoch] for e in range(epochs)])
        assert rec.touched == set(ids)  # a host touches only what it reads
    left_out = []
    for e in range(epochs):
        shares = [set(reads[p][e]) for p in range(hosts)]
        # Within an epoch: no sequence twice on a host, no sequence on two hosts.
        assert all(len(s) == per_epoch for s in shares)
        assert len(set().union(*shares)) == hosts * per_epoch
        left_out.append(frozenset(range(n)) - set().union(*shares))
    # The left-out tail moves between epochs, so every sequence is read.
    assert len(set(left_out)) > 1
    assert set().union(*(set(r) for host in reads for r in host)) == set(range(n))
    with pytest.raises(ValueError, match="process_index"):
        HostIterator(seqs, batch_size=2, seq_len=24, process_index=4, process_count=4)


def test_lazy_encoding(tokenizer, rng):
    rows = [{"prompt": f"q{rng.integers(1000)} = ", "target": f"{rng.integers(1000)}"}
            for _ in range(30)]
    lazy = LazyEncoded(tokenizer, rows, max_length=16)
    eager = encode_task(tokenizer, rows, max_length=16)
    assert len(lazy) == 30
    for i in rng.integers(0, 30, size=10):
        assert lazy[i].input_ids.tolist() == eager[i].input_ids.tolist()
        assert lazy[i].target_mask.tolist() == eager[i].target_mask.tolist()
    a = HostIterator(lazy, batch_size=2, seq_len=32, seed=1, process_index=0, process_count=1)
    b = HostIterator(eager, batch_size=2, seq_len=32, seed=1, process_index=0, process_count=1)
    assert all(_same(next(a), next(b)) for _ in range(20))


def test_global_batch_on_the_mesh(rng, cpu_mesh_devices):
    seqs = _seqs(rng, 64, max_len=8)
    it = HostIterator(seqs, batch_size=8, seq_len=16, seed=0)  # one process: the whole batch
    local = next(it)
    mesh = Mesh(np.array(cpu_mesh_devices), ("data",))
    g = global_batch(local, NamedSharding(mesh, P("data", None)))
    assert g.input_ids.shape == (8, 16) and len(g.segment_ids.addressable_shards) == 8
    np.testing.assert_array_equal(jax.device_get(g.positions), local.positions)


@pytest.mark.parametrize("kw, match", [
    ({"batch_size": None}, r"batch_size must be an int, got None"),  # used to loop forever
    ({"batch_size": 0}, r"batch_size must be >= 1, got 0"),  # used to stop at once
    ({"batch_size": 2.0}, r"batch_size must be an int"),
    ({"seq_len": 0}, r"seq_len must be >= 1"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*32\)"),
    ({"num_epochs": 0}, r"num_epochs must be >= 1"),
    ({"shuffle": "yes"}, r"shuffle must be True or False"),
])
def test_bad_iterator_arguments_are_named(rng, kw, match):
    seqs = _seqs(rng, 4)
    with pytest.raises(DataError, match=match):
        HostIterator(seqs, **{"batch_size": 2, "seq_len": 24, **kw})


def test_numpy_settings_give_a_json_state(rng):
    seqs = _seqs(rng, 6)
    it = HostIterator(seqs, batch_size=np.int64(2), seq_len=np.int32(24), seed=np.int64(3),
                      shuffle=np.bool_(True), process_index=np.int64(0), process_count=1)
    next(it)
    state = json.loads(json.dumps(it.state()))  # raised on NumPy ints before
    again = HostIterator(seqs, batch_size=2, seq_len=24, seed=3)
    again.restore(state)
    assert _same(next(again), next(it))
    for bad, match in [(None, r"state must be a dict"), ({**state, "cursor": 99},
                                                          r"state\['cursor'\] must be in")]:
        with pytest.raises(DataError, match=match):
            again.restore(bad)


@pytest.mark.parametrize("call, match", [
    (lambda s: pack_batches(s, 24, -1), r"batch_size must be >= 1, got -1"),  # returned []
    (lambda s: pack_batches(s, 24, 0), r"batch_size must be >= 1, got 0"),
    (lambda s: pad_batch(s, 24, -1), r"batch_size must be >= 1"),
    (lambda s: rows_to_batch([], -1, 2), r"seq_len must be >= 1, got -1"),
])
def test_bad_batch_shapes_are_named(rng, call, match):
    with pytest.raises(DataError, match=match):
        call(_seqs(rng, 3))
