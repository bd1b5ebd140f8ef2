"""The planted synthetic suite: determinism, planted labels, correct targets."""

import collections
import re

import numpy as np
import pytest

from taskpgm_jax.data import DataError, synthetic_suite
from taskpgm_jax.data.sources.synthetic import SKILLS


def _oracle(skill, x):
    """Each skill re-derived from its description, independently of the generator."""
    if skill == "add":
        a, b = x.split("+")
        return str(int(a) + int(b))
    if skill == "reverse":
        return "".join(reversed(x))
    if skill == "sort":
        return "".join(sorted(x, key=int))
    if skill == "boolean":  # left to right, no precedence
        toks = x.split()
        val = toks[0] == "T"
        for op, lit in zip(toks[1::2], toks[2::2], strict=True):
            b = lit == "T"
            val = {"and": val & b, "or": val | b, "xor": val ^ b}[op]
        return "T" if val else "F"
    if skill == "brackets":
        s = x
        while "()" in s:
            s = s.replace("()", "")
        return "yes" if s == "" else "no"
    if skill == "count":
        c, _, s = x.split(" ")
        return str(collections.Counter(s)[c])
    if skill == "lookup":
        table, key = x.split(" ; ")
        return dict(kv.split("=") for kv in table.split())[key]
    if skill == "upper":
        return x.upper()
    if skill == "maximum":
        return str(max(int(c) for c in x))
    if skill == "length":
        return str(len(x))
    raise AssertionError(skill)


def _split_prompt(prompt):
    m = re.fullmatch(r"(\S+) (.*?)( = | -> | : | \? | => |: )", prompt)
    assert m, prompt
    return m.group(1), m.group(2)


def _all_examples(pool):
    return {n: list(zip(pool[n].examples["prompt"], pool[n].examples["target"], strict=True))
            for n in pool.names}


def test_deterministic_by_seed(rng):
    seed = int(rng.integers(1 << 20))
    small = dict(examples=(40, 80), heldout_examples=20)
    a, b = synthetic_suite(seed, **small), synthetic_suite(seed, **small)
    assert a.names == b.names and a.cluster_labels == b.cluster_labels
    assert _all_examples(a) == _all_examples(b)
    assert a.split_sizes("probe") == b.split_sizes("probe")
    c = synthetic_suite(seed + 1, **small)
    assert _all_examples(c) != _all_examples(a)


def test_planted_structure(rng):
    sizes = (4, 3, 2)
    pool = synthetic_suite(int(rng.integers(1 << 20)), cluster_sizes=sizes, n_unique=2,
                           n_noise=3, examples=(60, 90))
    labels = pool.cluster_labels
    assert set(labels) == set(pool.names) and len(pool) == sum(sizes) + 2 + 3
    groups = collections.Counter(labels.values())
    assert sorted(groups.values(), reverse=True) == [4, 3, 2, 1, 1, 1, 1, 1]
    noise = [n for n in pool.names if n.startswith("noise_")]
    assert len(noise) == 3 and all(groups[labels[n]] == 1 for n in noise)
    assert all(60 <= s <= 90 for s in pool.sizes.values())
    skills_used = {labels[n] for n in pool.names if not n.startswith("noise_")}
    assert skills_used <= set(SKILLS) and len(skills_used) == 5

    train_forms = set()
    for name in pool.names:
        for prompt, target in zip(pool[name].examples["prompt"], pool[name].examples["target"], strict=True):
            word, x = _split_prompt(prompt)
            train_forms.add((word, prompt[len(word) + 1 + len(x):]))
            if name.startswith("noise_"):
                continue
            assert target == _oracle(labels[name], x), (name, prompt, target)
    # Noise targets are random: they rarely match what the underlying skill would answer.
    for name in noise:
        desc_skill = pool[name].keywords[0]
        ex = pool[name].examples
        hits = np.mean([t == _oracle(desc_skill, _split_prompt(p)[1])
                        for p, t in zip(ex["prompt"], ex["target"], strict=True)])
        assert hits < 0.3
    # Near-duplicates: same skill, different prompt forms.
    for skill in skills_used:
        forms = {_split_prompt(pool[n].examples["prompt"][0])[0]
                 for n in pool.names if labels[n] == skill}
        assert len(forms) == groups[skill]
    # Held-out tasks: one per skill, a known instruction word in an unseen prompt form, correct
    # targets, eval split only.
    held = pool.heldout
    assert {held.cluster_labels[n] for n in held.names} == skills_used
    train_words = {w for w, _ in train_forms}
    for name in held.names:
        assert held.split_sizes("train")[name] == 0
        for prompt, target in zip(held[name].examples["prompt"], held[name].examples["target"], strict=True):
            word, x = _split_prompt(prompt)
            assert word in train_words
            assert (word, prompt[len(word) + 1 + len(x):]) not in train_forms
            assert target == _oracle(held.cluster_labels[name], x)
    # The hash split gives each example its split independently, so a 60-example task can
    # legitimately have an empty 10% split (p ~ 0.2%). What must hold is the pooled fraction: each
    # split's share of all examples lies within 5 binomial standard deviations of the spec.
    total = sum(pool.sizes.values())
    for split, frac in (("probe", 0.1), ("eval", 0.1)):
        count = sum(pool.split_sizes(split).values())
        assert abs(count - frac * total) <= 5 * np.sqrt(total * frac * (1 - frac)), (split, count)


def test_tasks_do_not_depend_on_other_tasks(rng):
    seed = int(rng.integers(1 << 20))
    small = synthetic_suite(seed, n_noise=1, examples=(40, 80), heldout_examples=20)
    big = synthetic_suite(seed, n_noise=3, examples=(40, 80), heldout_examples=20)
    a, b = _all_examples(small), _all_examples(big)
    assert set(a) < set(b)
    assert all(a[n] == b[n] for n in a)
    with pytest.raises(ValueError, match="skills"):
        synthetic_suite(seed, cluster_sizes=(4, 4, 4, 4, 4, 4), n_unique=5)


@pytest.mark.parametrize("seed, match", [(-1, r"seed must be in \[0, 2\*\*32\), got -1"),
                                         (2**32, r"seed must be in \[0, 2\*\*32\)"),
                                         (None, r"seed must be an int, got None")])
def test_bad_seed_is_refused_before_generating(seed, match):
    with pytest.raises(DataError, match=match):
        synthetic_suite(seed)


@pytest.mark.parametrize("kwargs, match", [
    ({"examples": (10, 5)}, r"examples must be \(min, max\) with min <= max, got \(10, 5\)"),
    ({"examples": (0, 5)}, r"examples\[0\] \(min\) must be >= 1, got 0"),
    ({"examples": 5}, r"examples must be \(min, max\)"),
    ({"n_unique": -1}, r"n_unique must be >= 0, got -1"),
    ({"n_unique": 1.5}, r"n_unique must be an int, got 1.5"),
    ({"n_noise": -3}, r"n_noise must be >= 0, got -3"),
    ({"cluster_sizes": 3}, r"cluster_sizes must be a list of ints"),
    ({"cluster_sizes": "44"}, r"cluster_sizes must be a list of ints"),
    ({"cluster_sizes": (2, 0)}, r"cluster_sizes\[1\] must be >= 1, got 0"),
    ({"cluster_sizes": (5,)}, r"cluster_sizes: each cluster has at most 4 tasks"),
    ({"cluster_sizes": (), "n_unique": 0, "n_noise": 0}, r"no skill"),
    ({"cluster_sizes": (), "n_unique": 0, "n_noise": 3}, r"no skill"),
    ({"cluster_sizes": [4] * 10}, r"12 skills needed; there are 10"),
    ({"heldout_examples": 0}, r"heldout_examples must be >= 1, got 0"),
    ({"split": None}, r"split must be a SplitSpec"),
])
def test_bad_arguments_are_refused_by_name(rng, kwargs, match):
    with pytest.raises(DataError, match=match):
        synthetic_suite(int(rng.integers(1 << 20)), **kwargs)


def test_smallest_suites_hold_exactly_what_was_asked(rng):
    seed = int(rng.integers(1 << 20))
    lo = int(rng.integers(5, 20))
    # No skill at all is no suite (noise tasks draw their inputs from the skills used).
    with pytest.raises(DataError, match="no skill"):
        synthetic_suite(seed, cluster_sizes=(), n_unique=0, n_noise=int(rng.integers(0, 3)))
    pool = synthetic_suite(seed, cluster_sizes=(), n_unique=1, n_noise=0, examples=(lo, lo),
                           heldout_examples=7)
    assert len(pool) == 1 and len(pool.heldout) == 1 and pool.sizes == {pool.names[0]: lo}
    # NumPy integers are ints too.
    pool = synthetic_suite(seed, cluster_sizes=np.array([2]), n_unique=np.int64(0), n_noise=1,
                           examples=np.array([lo, lo]), heldout_examples=7)
    assert sorted(pool.cluster_labels.values()).count("noise_0") == 1 and len(pool) == 3


def test_config_knows_how_many_skills_there_are():
    from taskpgm_jax.config import SYNTHETIC_SKILLS

    assert SYNTHETIC_SKILLS == len(SKILLS)
