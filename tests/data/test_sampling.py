"""Mixture weights -> counts -> examples; baselines; streaming interleave; materialisation."""

import collections
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskpgm_jax.data import (
    DataError, SplitSpec, TaskPool, baseline_weights, interleave_mixture, load_materialized,
    make_task, materialize_mixture, mixture_counts, sample_mixture,
)
from taskpgm_jax.mrf import Mixture, random_mixture


def _pool(rng, sizes, canary=""):
    tasks = [make_task(f"t{i}", "generate",
                       [{"prompt": f"t{i} q{j} {rng.integers(1 << 40)}", "target": f"a{j}"}
                        for j in range(n)], canary=canary if i == 0 else "")
             for i, n in enumerate(sizes)]
    return TaskPool(tasks, SplitSpec(probe=0.1, eval=0.1, seed=int(rng.integers(1000))))


@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=12).filter(lambda w: sum(w) > 1e-3),
       st.integers(0, 5000))
def test_counts_sum_to_budget_and_follow_weights(weights, budget):
    counts = mixture_counts(np.array(weights), budget)
    expected = np.array(weights) / sum(weights) * budget
    assert counts.sum() == budget and counts.dtype.kind == "i"
    # Largest remainder: every count is the floor or the ceiling of its expectation ...
    assert np.all(counts >= np.floor(expected)) and np.all(counts <= np.floor(expected) + 1)
    # ... and the extra units went to the largest fractional parts.
    frac = expected - np.floor(expected)
    got_extra = counts > np.floor(expected)
    if got_extra.any() and (~got_extra).any():
        assert frac[got_extra].min() >= frac[~got_extra].max() - 1e-9


def test_counts_keep_names_and_reject_bad_weights(rng):
    assert mixture_counts({"a": 0.5, "b": 0.3, "c": 0.2}, 7) == {"a": 4, "b": 2, "c": 1}
    # The weights as given, not renormalised in floating point: 7 and 2 tie at budget 2.
    assert mixture_counts({"w": 0, "x": 1, "y": 7, "z": 2}, 2) == {"w": 0, "x": 0, "y": 2, "z": 0}
    mix = random_mixture([f"t{i}" for i in range(9)], seed=int(rng.integers(1 << 30)))
    assert mixture_counts(mix, 1001) == mix.to_counts(1001)  # accepts an mrf.Mixture
    tokens = Mixture(mix.names, mix.weights, unit="tokens")
    with pytest.raises(DataError, match="shares of tokens"):
        mixture_counts(tokens, 10)
    for bad in ([0.0, 0.0], [1.0, -0.1], [np.nan, 1.0]):
        with pytest.raises(DataError, match="weights"):
            mixture_counts(bad, 10)


def test_baselines(rng):
    sizes = {f"t{i}": int(n) for i, n in enumerate(rng.integers(1, 1000, size=6))}
    n = np.array(list(sizes.values()), float)
    np.testing.assert_allclose(list(baseline_weights(sizes, "uniform").values()), 1 / 6)
    np.testing.assert_allclose(list(baseline_weights(sizes, "size").values()), n / n.sum())
    tau = float(rng.uniform(1.5, 4))
    np.testing.assert_allclose(list(baseline_weights(sizes, "temperature", temperature=tau)
                                    .values()), n ** (1 / tau) / (n ** (1 / tau)).sum())
    r1 = baseline_weights(sizes, "random", seed=3)
    assert r1 == baseline_weights(sizes, "random", seed=3) != baseline_weights(sizes, "random")
    assert abs(sum(r1.values()) - 1) < 1e-12 and min(r1.values()) >= 0
    capped = baseline_weights(sizes, "size", cap=100)
    m = np.minimum(n, 100)
    np.testing.assert_allclose(list(capped.values()), m / m.sum())


def test_sample_follows_counts_without_needless_replacement(rng):
    pool = _pool(rng, [300, 40, 200, 5])
    weights = {"t0": 0.4, "t1": 0.3, "t2": 0.2, "t3": 0.1}
    budget = 400
    s = sample_mixture(pool, weights, budget, seed=int(rng.integers(1 << 30)))
    assert s.counts == mixture_counts(weights, budget)
    available = pool.split_sizes("train")
    for name, idx in s.indices.items():
        assert len(idx) == s.counts[name] and (idx < available[name]).all()
        if s.counts[name] <= available[name]:
            assert len(set(idx.tolist())) == len(idx)  # no repeats when not needed
        else:  # balanced repetition: every example floor or ceil(count / available) times
            reps = np.bincount(idx, minlength=available[name])
            q = s.counts[name] // available[name]
            assert reps.min() >= q and reps.max() <= q + 1
    assert s.repeated == {n: (s.counts[n], available[n]) for n in pool.names
                          if s.counts[n] > available[n]}
    assert set(s.repeated) >= {"t1", "t3"} and "t0" not in s.repeated
    # order lists every drawn example exactly once.
    per_task = collections.Counter(int(t) for t, _ in s.order)
    drawn = {n: c for n, c in s.counts.items() if c}
    assert {pool.names[t]: c for t, c in per_task.items()} == drawn
    assert len({(int(t), int(k)) for t, k in s.order}) == budget
    # Rows are the train rows the indices name.
    rows = list(s.rows(pool))
    train_prompts = {n: pool.train(n)["prompt"] for n in pool.names}
    for (t, k), row in zip(s.order[:50], rows[:50], strict=True):
        name = pool.names[t]
        assert row["task"] == name
        assert row["prompt"] == train_prompts[name][s.indices[name][k]]


def test_sampling_is_seeded(rng):
    pool = _pool(rng, [100, 100, 100])
    w = rng.dirichlet(np.ones(3))
    a = sample_mixture(pool, w, 150, seed=1)
    b = sample_mixture(pool, w, 150, seed=1)
    c = sample_mixture(pool, w, 150, seed=2)
    assert all(np.array_equal(a.indices[n], b.indices[n]) for n in pool.names)
    assert np.array_equal(a.order, b.order) and not np.array_equal(a.order, c.order)
    iid = sample_mixture(pool, [1, 0, 0], 500, seed=3, repeat="iid")
    assert iid.repeated == {"t0": (500, pool.split_sizes()["t0"])}
    with pytest.raises(DataError, match="not in the pool"):
        sample_mixture(pool, {"zzz": 1.0}, 10)


def test_interleave_follows_probabilities(rng):
    pool = _pool(rng, [400, 400, 400])
    w = {"t0": 0.6, "t1": 0.3, "t2": 0.1}
    ds = interleave_mixture(pool, w, seed=int(rng.integers(1000)),
                            stopping_strategy="first_exhausted")
    first = collections.Counter(ds.select(range(300))["task"])
    for name, p in w.items():
        assert abs(first[name] / 300 - p) < 5 * np.sqrt(p * (1 - p) / 300)
    stream = interleave_mixture(pool, {"t0": 1.0, "t1": 1.0}, seed=0, streaming=True)
    got = [row["task"] for _, row in zip(range(20), stream, strict=False)]
    assert set(got) <= {"t0", "t1"} and len(got) == 20


def test_materialise_round_trip(tmp_path, rng):
    pool = _pool(rng, [60, 30, 80], canary="CANARY-TEST-1234")
    s = sample_mixture(pool, {"t0": 0.2, "t1": 0.5, "t2": 0.3}, 120, seed=5)
    manifest_path = materialize_mixture(pool, s, tmp_path / "mix", extra={"solver": "test"})
    manifest = json.loads(manifest_path.read_text())
    assert manifest["counts"] == s.counts and manifest["seed"] == 5 and manifest["rows"] == 120
    assert manifest["repeated"] == {"t1": {"count": 60, "available": s.repeated["t1"][1]}}
    assert manifest["canaries"] == ["CANARY-TEST-1234"] and manifest["solver"] == "test"
    data = (tmp_path / "mix" / "mixture.jsonl").read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert [r["prompt"] for r in lines] == [r["prompt"] for r in s.rows(pool)]
    assert collections.Counter(r["task"] for r in lines) == collections.Counter(
        {n: c for n, c in s.counts.items() if c})
    # The canary travels with every line of its task, and only there.
    assert all(r.get("canary") == ("CANARY-TEST-1234" if r["task"] == "t0" else None)
               for r in lines)
    # A second write into the same directory is refused unless asked for.
    with pytest.raises(DataError, match="overwrite=True"):
        materialize_mixture(pool, s, tmp_path / "mix")
    assert (tmp_path / "mix" / "mixture.jsonl").read_bytes() == data
    materialize_mixture(pool, s, tmp_path / "mix", extra={"solver": "test"}, overwrite=True)
    assert (tmp_path / "mix" / "mixture.jsonl").read_bytes() == data
    ds, m2 = load_materialized(tmp_path / "mix")
    assert ds.num_rows == 120 and m2 == manifest
    (tmp_path / "mix" / "mixture.jsonl").write_bytes(data[:-10] + b"tampered\n")
    with pytest.raises(DataError, match="changed since it was written"):
        load_materialized(tmp_path / "mix")


def test_canary_read_back_when_the_first_row_has_none(tmp_path, rng):
    """Only rows of a task with a canary carry one; reading back must keep it on those rows even
    when the first row belongs to a task without one."""
    canary = f"CANARY-{rng.integers(1 << 30)}"
    pool = _pool(rng, [int(rng.integers(20, 40)), int(rng.integers(20, 40))], canary=canary)
    s = sample_mixture(pool, {"t0": 0.5, "t1": 0.5}, 30, seed=int(rng.integers(1000)))
    # Put a row of t1 (no canary) first, whatever order the seed drew.
    first = int(np.flatnonzero(s.order[:, 0] == 1)[0])
    order = np.concatenate([s.order[first:first + 1], np.delete(s.order, first, axis=0)])
    s = dataclasses.replace(s, order=order)
    materialize_mixture(pool, s, tmp_path / "mix")
    ds, _ = load_materialized(tmp_path / "mix")
    want = [canary if r["task"] == "t0" else "" for r in s.rows(pool)]
    assert want[0] == "" and canary in want
    assert ds["canary"] == want
    assert ds["prompt"] == [r["prompt"] for r in s.rows(pool)]


@pytest.mark.parametrize("call, match", [
    (lambda p: sample_mixture(p, [1, 1], 10, seed=-1), r"seed must be in \[0, 2\*\*32\), got -1"),
    (lambda p: sample_mixture(p, [1, 1], 10, seed=2**32), r"seed must be in \[0, 2\*\*32\)"),
    (lambda p: sample_mixture(p, [1, 1], 10, seed=1.5), r"seed must be an int, got 1.5"),
    (lambda p: sample_mixture(p, [1, 1], True), r"budget must be an int, got True"),
    (lambda p: mixture_counts([1, 1], 10.5), r"budget must be an int, got 10.5"),
    (lambda p: mixture_counts([1, 1], -3), r"budget must be >= 0, got -3"),
    (lambda p: interleave_mixture(p, [1, 1], seed=-1), r"seed must be in \[0, 2\*\*32\)"),
    # The messages name this function's arguments, not those of the mrf helpers behind it.
    (lambda p: baseline_weights({"a": 1, "b": 2}, "temperature", temperature=0),
     r"temperature must be a finite number > 0, got 0"),
    (lambda p: baseline_weights({}), r"sizes must be a non-empty mapping"),
    (lambda p: baseline_weights([1, 2], "size"), r"sizes must be a non-empty mapping"),
    (lambda p: baseline_weights({"a": 1}, "size", cap=0), r"cap must be >= 1, got 0"),
    (lambda p: baseline_weights({"a": 1}, "random", seed=None), r"seed must be an int"),
])
def test_bad_seeds_and_baseline_arguments_are_named(rng, call, match):
    with pytest.raises(DataError, match=match):
        call(_pool(rng, [10, 10]))


def test_materialise_checks_extra_before_writing(tmp_path, rng):
    pool = _pool(rng, [20, 20])
    s = sample_mixture(pool, [1, 1], 10, seed=np.int64(3))
    assert type(s.seed) is int
    for extra, match in [({"seed": 123}, r"extra\['seed'\] would replace the manifest's own"),
                         ({"sha256": "abc"}, r"extra\['sha256'\] would replace"),
                         ({"x": object()}, r"extra\['x'\] cannot be written to JSON"),
                         ({1: "a"}, r"extra keys must be strings"),
                         (["solver"], r"extra must be a dict")]:
        with pytest.raises(DataError, match=match):
            materialize_mixture(pool, s, tmp_path / "mix", extra=extra)
        assert not (tmp_path / "mix").exists()  # nothing written, so a retry works
    # NumPy values become plain JSON numbers and lists.
    path = materialize_mixture(pool, s, tmp_path / "mix",
                               extra={"beta": np.float32(0.5), "w": np.array([1, 2])})
    manifest = json.loads(path.read_text())
    assert manifest["beta"] == 0.5 and manifest["w"] == [1, 2] and manifest["seed"] == 3


def _written(out):
    """The prompts of a materialised mixture in order, read without `load_materialized`."""
    lines = [json.loads(x) for x in (out / "mixture.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in lines]


def test_an_interrupted_overwrite_leaves_one_whole_mixture(tmp_path, rng, monkeypatch):
    """Ctrl-C at each rename of an overwrite: the directory reads back as the old mixture or the
    new one, never the new data against the old manifest; the next write finishes the job."""
    import taskpgm_jax.data.materialize as mat

    pool = _pool(rng, [int(rng.integers(20, 40)) for _ in range(3)])
    old = sample_mixture(pool, [1, 0, 0], int(rng.integers(5, 15)), seed=int(rng.integers(99)))
    new = sample_mixture(pool, [0, 1, 1], int(rng.integers(16, 30)), seed=int(rng.integers(99)))
    want = {"old": [r["prompt"] for r in old.rows(pool)],
            "new": [r["prompt"] for r in new.rows(pool)]}
    real = os.replace
    for cut in (1, 2, 3):
        out = tmp_path / f"mix{cut}"
        materialize_mixture(pool, old, out)
        assert _written(out) == want["old"]
        calls = []

        def replace(src, dst, calls=calls, cut=cut):
            calls.append(dst)
            if len(calls) == cut:
                raise KeyboardInterrupt
            real(src, dst)

        with monkeypatch.context() as m:
            m.setattr(mat.os, "replace", replace)
            with pytest.raises(KeyboardInterrupt):
                materialize_mixture(pool, new, out, overwrite=True)
        # The old data file stays until the new manifest is complete; once the new data file
        # is in place, the new manifest beside it is the one that is read.
        expect = "new" if cut == 3 else "old"
        ds, manifest = load_materialized(out)
        assert ds["prompt"] == want[expect], cut
        assert manifest["counts"] == (new if expect == "new" else old).counts
        # Not an overwrite: refused, whichever mixture is there.
        with pytest.raises(DataError, match="overwrite=True"):
            materialize_mixture(pool, new, out)
        assert load_materialized(out)[0]["prompt"] == want[expect]
        materialize_mixture(pool, new, out, overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "mixture.jsonl"]
        assert load_materialized(out)[0]["prompt"] == want["new"] == _written(out)


def test_a_sample_from_another_pool_is_refused_before_writing(tmp_path, rng):
    tasks = [make_task(f"t{i}", "generate",
                       [{"prompt": f"q{j} {rng.integers(1 << 40)}", "target": "a"}
                        for j in range(int(rng.integers(20, 60)))]) for i in range(3)]
    pool = TaskPool(tasks, SplitSpec(seed=0))
    # Another split seed: the same tasks, other train splits (find one of another size).
    for seed in range(1, 200):
        other = TaskPool(tasks, SplitSpec(seed=seed))
        sizes, other_sizes = pool.split_sizes("train"), other.split_sizes("train")
        differ = [n for n in pool.names if other_sizes[n] > sizes[n]]
        if differ:
            break
    name = differ[0]
    # Every row of that task's (larger) split: some index lies past this pool's split.
    s = sample_mixture(other, {name: 1.0}, other_sizes[name], seed=int(rng.integers(99)))
    out = tmp_path / "mix"
    with pytest.raises(DataError, match=rf"task '{name}'.*{sizes[name]} rows in this pool.*"
                                        "another pool"):
        materialize_mixture(pool, s, out)
    assert not out.exists()
    # Drawn with repetition from a split of another size: refused too, naming the task.
    s = sample_mixture(other, {name: 1.0}, 3 * other_sizes[name], seed=0)
    with pytest.raises(DataError, match=rf"task '{name}'.*drawn from {other_sizes[name]}"):
        materialize_mixture(pool, s, out)
    assert not out.exists()
    # Into a directory with a mixture: that one untouched, no temporary file left.
    good = sample_mixture(pool, {name: 1.0}, sizes[name], seed=1)
    materialize_mixture(pool, good, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="another pool"):
        materialize_mixture(pool, s, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_damaged_manifest_is_named(tmp_path, rng):
    pool = _pool(rng, [20, 30])
    out = tmp_path / "mix"
    materialize_mixture(pool, sample_mixture(pool, [1, 1], int(rng.integers(5, 40))), out)
    path = out / "manifest.json"
    text = path.read_text()
    path.write_text(text[:int(rng.integers(1, len(text) - 1))])  # truncated
    with pytest.raises(DataError, match=rf"{path}: not valid JSON.*overwrite=True"):
        load_materialized(out)
    manifest = json.loads(text)
    del manifest["sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"{path}: the manifest lacks \['sha256'\]"):
        load_materialized(out)
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match=rf"{path}: expected a JSON object"):
        load_materialized(out)
    path.write_text(text)
    (out / "mixture.jsonl").unlink()
    with pytest.raises(DataError, match=r"mixture\.jsonl: cannot read the data file"):
        load_materialized(out)


@pytest.mark.parametrize("streaming", [False, True])
def test_interleave_names_a_weighted_task_with_an_empty_split(rng, streaming):
    """`datasets` refused it as "datasets at indices [0] are empty", or (streaming) with
    "Unable to shard a dataset of size 0"; sample_mixture names the task, and so does this.
    The empty t0 weighs 0, so it is not named."""
    pool = _pool(rng, [40, 30])
    pool = TaskPool(pool.tasks, SplitSpec(probe=0.0, eval=1.0, seed=0))  # train splits empty
    with pytest.raises(DataError, match=r"task 't1': weight 2 on an empty train split"):
        interleave_mixture(pool, [0.0, 2.0], split="train", streaming=streaming)


def test_weights_that_are_not_numbers_are_named(rng):
    """A weight given as text or an object failed in NumPy ("could not convert string to float:
    'high'", "float() argument must be ..."), naming neither the weights nor the value; None
    became NaN."""
    pool = _pool(rng, [20, 20])
    for bad in ({"t0": "high", "t1": 1.0}, [1.0, None], {"t0": None}, [object(), 1.0],
                [[1.0, 2.0], [3.0]], None):
        with pytest.raises(DataError, match=r"^weights must be numbers \(a mapping task -> "
                                            r"weight, an array in pool order, or an "
                                            r"mrf\.Mixture\); got "):
            sample_mixture(pool, bad, 10)
    with pytest.raises(DataError, match=r"^weights must be numbers .* got \{'a': 'x'\}"):
        mixture_counts({"a": "x"}, 3)
