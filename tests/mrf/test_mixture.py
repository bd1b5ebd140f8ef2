"""Mixture counts, JSON and exporter round trips, baselines."""

import fractions
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskpgm_jax.mrf import (Mixture, potentials, random_mixture, size_proportional_mixture,
                             solve, temperature_mixture, uniform_mixture)
from taskpgm_jax.mrf.mixture import largest_remainder

weights = st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40).filter(lambda w: sum(w) > 0)


def _mix(w):
    w = np.asarray(w) / np.sum(w)
    return Mixture(tuple(f"task_{i}" for i in range(len(w))), tuple(w))


@given(weights, st.integers(0, 10**7))
def test_counts_sum_exactly_and_stay_within_one(w, budget):
    mix = _mix(w)
    counts = mix.to_counts(budget)
    c = np.array(list(counts.values()))
    assert c.sum() == budget and np.all(c >= 0)
    assert np.all(np.abs(c - np.asarray(mix.weights) * budget) < 1.0 + 1e-9)


def test_largest_remainder_example():
    assert Mixture(("a", "b", "c"), (0.5, 0.3, 0.2)).to_counts(7) == {"a": 4, "b": 2, "c": 1}


def _exact_counts(weights, budget):
    """The documented rule in exact rationals: floors, then the largest remainders, ties to the
    earlier task."""
    f = [fractions.Fraction(float(w)) for w in weights]
    quota = [x / sum(f) * budget for x in f]
    counts = [int(q) for q in quota]
    order = sorted(range(len(f)), key=lambda i: (counts[i] - quota[i], i))
    for i in order[:budget - sum(counts)]:
        counts[i] += 1
    return counts


def test_ties_go_to_the_earlier_task_exactly(rng):
    # Float noise used to decide this one: 7/10 * 2 and 2/10 * 2 have the same remainder 0.4.
    assert largest_remainder([0, 1, 7, 2, 0], 2).tolist() == [0, 0, 2, 0, 0]
    for trial in range(1500):
        n = int(rng.integers(1, 8))
        if trial % 3 == 0:  # small integers: many exact ties
            w = rng.integers(0, 6, size=n).astype(float)
        elif trial % 3 == 1:  # repeated values in any order: ties among equal weights
            w = rng.choice(rng.uniform(0, 3, size=2), size=n)
        else:
            w = rng.uniform(0, 1, size=n) ** 3
        if w.sum() == 0:
            continue
        budget = int(rng.integers(0, 50)) if trial % 2 else int(rng.integers(0, 10**7))
        assert largest_remainder(w, budget).tolist() == _exact_counts(w, budget), (w, budget)
        mix = Mixture.from_counts({f"t{i}": x for i, x in enumerate(w)})
        assert list(mix.to_counts(budget).values()) == _exact_counts(mix.weights, budget)


@given(weights)
def test_exporters_round_trip(w):
    mix = _mix(w)
    assert Mixture.from_json(mix.to_json()) == mix  # JSON keeps every bit
    for back in (Mixture.from_json(mix.to_json()), Mixture.from_seqio(mix.to_seqio()),
                 Mixture.from_levanter(mix.to_levanter())):
        assert back.names == mix.names
        np.testing.assert_allclose(back.weights, mix.weights, rtol=1e-12, atol=1e-15)
    paths = {n: f"gs://bucket/{n}/*.arrayrecord" for n in mix.names}
    back, back_paths = Mixture.from_maxtext(mix.to_maxtext(paths))
    assert back_paths == paths
    np.testing.assert_allclose(back.weights, mix.weights, rtol=1e-12)
    assert json.loads(mix.to_json())["unit"] == "examples"


def test_from_solution_keeps_provenance(rng):
    S = rng.normal(size=(5, 5))
    pot = potentials(S + S.T, beta=1.0, lam=5.0)
    mix = Mixture.from_solution([f"t{i}" for i in range(5)], solve(pot), ratio=0.2)
    assert mix.provenance["method"] == "exact" and mix.provenance["ratio"] == 0.2
    assert Mixture.from_json(mix.to_json()) == mix


def test_baselines():
    names = ["a", "b", "c"]
    sizes = [100, 300, 600]
    np.testing.assert_allclose(uniform_mixture(names).weights, [1 / 3] * 3)
    np.testing.assert_allclose(size_proportional_mixture(names, sizes).weights, [0.1, 0.3, 0.6])
    np.testing.assert_allclose(temperature_mixture(names, sizes, 1.0).weights, [0.1, 0.3, 0.6])
    t2 = np.sqrt(sizes) / np.sqrt(sizes).sum()
    np.testing.assert_allclose(temperature_mixture(names, sizes, 2.0).weights, t2)
    r = random_mixture(names, seed=3)
    assert r == random_mixture(names, seed=3) and abs(sum(r.weights) - 1) < 1e-12


@pytest.mark.parametrize("kwargs, match", [
    (dict(names=("a", "b"), weights=(0.5,)), "weights"),
    (dict(names=("a", "a"), weights=(0.5, 0.5)), "duplicate"),
    (dict(names=("a", "b"), weights=(0.7, 0.7)), "sum to 1"),
    (dict(names=("a", "b"), weights=(1.5, -0.5)), ">= 0"),
    (dict(names=("a",), weights=(1.0,), unit="bytes"), "unit"),
])
def test_bad_mixtures_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mixture(**kwargs)


def test_bad_baseline_inputs_raise():
    with pytest.raises(ValueError, match="sizes"):
        size_proportional_mixture(["a", "b"], [1, 0])
    with pytest.raises(ValueError, match="tau"):
        temperature_mixture(["a"], [1], 0.0)
    with pytest.raises(ValueError, match="budget"):
        uniform_mixture(["a"]).to_counts(-1)
    with pytest.raises(ValueError, match="paths"):
        uniform_mixture(["a"]).to_maxtext({})
    with pytest.raises(ValueError, match="names: a mixture needs at least one task"):
        uniform_mixture([])
    with pytest.raises(ValueError, match=r"rates: duplicate task names \['a'\]"):
        Mixture.from_seqio([("a", 0.5), ("b", 0.25), ("a", 0.25)])
    with pytest.raises(ValueError, match="provenance: 'obj'"):
        uniform_mixture(["a"]).from_counts({"a": 1}, obj=object())


def test_numpy_scalars_are_accepted_and_serialised():
    """tau and provenance values often arrive as NumPy scalars (from a sweep or a solver)."""
    names, sizes = ["a", "b"], [100, 400]
    ref = np.sqrt(sizes) / np.sqrt(sizes).sum()
    for tau in (np.float32(2.0), np.int64(2)):
        np.testing.assert_allclose(temperature_mixture(names, sizes, tau).weights, ref)
    mix = Mixture.from_counts({"a": 1, "b": 3}, beta=np.float32(0.5), sizes=np.arange(2))
    back = json.loads(mix.to_json())["provenance"]
    assert back == {"beta": 0.5, "sizes": [0, 1]}


class _Solution:  # what from_solution reads of a `solve` result
    weights, method, energy, kkt_residual, iterations = np.ones(3) / 3, "exact", 0.0, 0.0, 1


@pytest.mark.parametrize("call, match", [
    # A string for names once split into one task per character.
    (lambda: uniform_mixture("arith"), r"names: .*the string 'arith'"),
    (lambda: Mixture("ab", (0.5, 0.5)), r"names: .*the string 'ab'"),
    (lambda: Mixture.from_solution("abc", _Solution()), r"names: .*the string 'abc'"),
    (lambda: size_proportional_mixture("ab", [1, 2]), r"names: .*the string 'ab'"),
    (lambda: random_mixture("ab", 0), r"names: .*the string 'ab'"),
    (lambda: random_mixture(["a", "b"], -1),
     r"random_mixture: seed must be an int in \[0, 2\*\*32\)"),
    (lambda: random_mixture(["a", "b"], 1.5), r"random_mixture: seed must be an int"),
    (lambda: Mixture(None, (1.0,)), "names: expected a list"),
    # Importers: missing keys and wrong shapes, named instead of KeyError / unpacking errors.
    (lambda: Mixture.from_json('{"weights": [1.0]}'), r"text: missing \['names'\]"),
    (lambda: Mixture.from_json("[1]"), "text: expected a JSON object"),
    (lambda: Mixture.from_json("{"), "text: not valid JSON"),
    (lambda: Mixture.from_levanter({"weights": {"a": 1}}), r"config: missing \['train_weights'\]"),
    (lambda: Mixture.from_maxtext('{"a": {"path": "x"}}'), r"text\['a'\]: missing \['weight'\]"),
    (lambda: Mixture.from_maxtext('{"a": 1}'), r"text\['a'\]: missing"),
    (lambda: Mixture.from_seqio({"a": 1, "b": 2}), "rates: expected a non-empty list"),
    (lambda: Mixture.from_seqio([("a", 1, 2)]), "rates: expected a non-empty list"),
    (lambda: Mixture.from_counts([("a", 1)]), "counts: expected a mapping"),
])
def test_bad_names_and_imports_raise_named_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _open_instruct_examples(mixer, sizes):
    """How open-instruct's dataset_mixer reads each value (open_instruct/utils.py,
    combine_dataset): `int(v) if v > 1.0 else int(v * len(dataset))` examples."""
    return {k: int(v) if v > 1.0 else int(v * sizes[k]) for k, v in mixer.items()}


def test_open_instruct_values_take_examples_in_proportion_to_the_weights(rng):
    """A weight written as it is would read as a fraction of that dataset (a mix in proportion
    to w_i n_i), and a count of 1 as the whole dataset: neither is the mixture."""
    T = int(rng.integers(3, 9))
    names = [f"t{i}" for i in range(T)]
    w = rng.dirichlet(np.ones(T)) + 0.01  # every count below is >= 10 (a 1 is refused)
    w[rng.integers(T)] = 0.0
    mix = Mixture.from_counts(dict(zip(names, w, strict=True)))
    sizes = {n: int(rng.integers(10**4, 10**6)) for n in names}
    fractions_ = mix.to_open_instruct(sizes=sizes)
    taken = _open_instruct_examples(fractions_, sizes)
    total = sum(taken.values())
    np.testing.assert_allclose([taken[n] / total for n in names], mix.weights, atol=T / total)
    assert max(fractions_.values()) == 1.0  # as many examples as the datasets supply
    budget = int(rng.integers(10**4, 10**5))
    counts = mix.to_open_instruct(budget)
    assert counts == mix.to_counts(budget) and _open_instruct_examples(counts, sizes) == counts
    # Read back as open-instruct reads them.
    for mixer in (fractions_, counts):
        back = Mixture.from_open_instruct(mixer, sizes=sizes)
        np.testing.assert_allclose(back.weights, mix.weights, atol=1e-12 if mixer is fractions_
                                   else 1.0 / budget)
    with pytest.raises(ValueError, match=r"budget: 3 gives a count of 1 to \['a', 'b', 'c'\]"):
        uniform_mixture(["a", "b", "c"]).to_open_instruct(3)
    with pytest.raises(ValueError, match="budget / sizes: give exactly one"):
        mix.to_open_instruct()
    with pytest.raises(ValueError, match=r"sizes: no size for tasks \['t0'\]"):
        mix.to_open_instruct(sizes={n: 5 for n in names[1:]})
    with pytest.raises(ValueError, match=r"sizes: the values of \['a'\] are <= 1"):
        Mixture.from_open_instruct({"a": 0.5, "b": 300})
    # Only the fractions need sizes: 0.5 of 400 examples against 1000 given as a count.
    mixed = Mixture.from_open_instruct({"a": 0.5, "b": 1000}, sizes={"a": 400})
    assert mixed.weights == pytest.approx((200 / 1200, 1000 / 1200), rel=1e-12)
    with pytest.raises(ValueError, match="mixer: expected numbers"):
        Mixture.from_open_instruct({"a": "0.5"})


def test_provenance_round_trips_exactly_through_json():
    mix = Mixture.from_counts({"a": 1, "b": 3}, bounds=(0.0, 0.5), per_task={1: 2},
                              nested=[np.int64(3), (np.float32(0.5),)])
    assert mix.provenance == {"bounds": [0.0, 0.5], "per_task": {"1": 2}, "nested": [3, [0.5]]}
    assert Mixture.from_json(mix.to_json()) == mix
    with pytest.raises(ValueError, match="provenance: expected a mapping"):
        Mixture(("a",), (1.0,), provenance=[1])


def test_baselines_take_names_from_a_generator():
    sizes = [100, 300]
    mix = size_proportional_mixture((n for n in ["a", "b"]), sizes)
    assert mix.names == ("a", "b") and mix.weights == pytest.approx((0.25, 0.75))
    assert temperature_mixture((n for n in ["a", "b"]), sizes, 1.0).names == ("a", "b")
