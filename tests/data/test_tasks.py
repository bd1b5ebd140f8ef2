"""Tasks, pools and seeded-hash splits."""

import hashlib

import numpy as np
import pytest

from taskpgm_jax.data import DataError, SplitSpec, TaskPool, make_task, split_of


def _random_rows(rng, n, prefix="q"):
    return [{"prompt": f"{prefix} {rng.integers(1 << 40)} {i}", "target": str(rng.integers(100))}
            for i in range(n)]


def _mc_rows(rng, n):
    rows = []
    for _ in range(n):
        k = int(rng.integers(2, 5))
        choices = [f"c{rng.integers(1 << 30)}_{j}" for j in range(k)]
        rows.append({"prompt": f"pick {rng.integers(1 << 30)}", "choices": choices,
                     "answer": int(rng.integers(k))})
    return rows


def test_splits_are_disjoint_cover_and_follow_fractions(rng):
    spec = SplitSpec(probe=0.15, eval=0.2, seed=int(rng.integers(1 << 30)))
    n = 4000
    pool = TaskPool([make_task("a", "generate", _random_rows(rng, n))], spec)
    parts = {s: set(pool.indices("a", s).tolist()) for s in ("train", "probe", "eval")}
    assert not (parts["train"] & parts["probe"]) and not (parts["train"] & parts["eval"])
    assert not (parts["probe"] & parts["eval"])
    assert parts["train"] | parts["probe"] | parts["eval"] == set(range(n))
    # Binomial: 5 standard deviations.
    for s, frac in (("probe", 0.15), ("eval", 0.2)):
        assert abs(len(parts[s]) - frac * n) < 5 * np.sqrt(n * frac * (1 - frac))
    assert pool.split_sizes("probe")["a"] == len(parts["probe"])
    assert pool.probe("a").num_rows == len(parts["probe"])


def test_split_matches_an_independent_hash(rng):
    # Recompute the rule from its definition: blake2b over seed, task and the example content.
    spec = SplitSpec(probe=0.3, eval=0.3, seed=7)
    task = make_task("t", "generate", _random_rows(rng, 200))
    for ex in task.examples:
        key = repr((ex["prompt"], ex["target"], (), -1)).encode()
        u = int.from_bytes(hashlib.blake2b(b"7\0t\0" + key, digest_size=8).digest(),
                           "little") / 2.0**64
        want = "eval" if u < 0.3 else "probe" if u < 0.6 else "train"
        assert split_of(ex, "t", spec) == want


def test_pool_split_accessors_return_the_hashed_rows(rng):
    # train / probe / eval return exactly the rows the hash rule assigns, in file order.
    spec = SplitSpec(probe=0.2, eval=0.25, seed=int(rng.integers(1 << 30)))
    rows = _random_rows(rng, 300)
    pool = TaskPool([make_task("a", "generate", rows)], spec)
    want = {"train": [], "probe": [], "eval": []}
    for r in rows:
        key = repr((r["prompt"], r["target"], (), -1)).encode()
        digest = hashlib.blake2b(f"{spec.seed}\0a\0".encode() + key, digest_size=8).digest()
        u = int.from_bytes(digest, "little") / 2.0**64
        want["eval" if u < 0.25 else "probe" if u < 0.45 else "train"].append(
            (r["prompt"], r["target"]))
    for split, got in (("train", pool.train("a")), ("probe", pool.probe("a")),
                       ("eval", pool.eval("a"))):
        assert list(zip(got["prompt"], got["target"], strict=True)) == want[split]
    k = len(want["probe"]) // 2
    assert pool.probe("a", size=k)["prompt"] == [p for p, _ in want["probe"][:k]]
    with pytest.raises(DataError, match=r"task 'a'.*probe split too small"):
        pool.probe("a", size=len(want["probe"]) + 1)


def test_splits_stable_under_added_tasks_and_reordering(rng):
    rows_a = _random_rows(rng, 300, "a")
    rows_b = _random_rows(rng, 200, "b")
    spec = SplitSpec(seed=3)
    alone = TaskPool([make_task("a", "generate", rows_a)], spec)
    perm = rng.permutation(len(rows_a))
    more = TaskPool([make_task("b", "generate", rows_b),
                     make_task("a", "generate", [rows_a[i] for i in perm])], spec)
    for split in ("train", "probe", "eval"):
        got = sorted(more.split("a", split)["prompt"])
        assert got == sorted(alone.split("a", split)["prompt"])
    # A different seed moves examples.
    other = TaskPool([make_task("a", "generate", rows_a)], SplitSpec(seed=4))
    assert sorted(other.train("a")["prompt"]) != sorted(alone.train("a")["prompt"])


def test_duplicates_share_a_split(rng):
    rows = _random_rows(rng, 50)
    pool = TaskPool([make_task("d", "generate", rows + rows)], SplitSpec(probe=0.3, eval=0.3))
    label = {}
    for split in ("train", "probe", "eval"):
        for p in pool.split("d", split)["prompt"]:
            assert label.setdefault(p, split) == split


def test_multiple_choice_rows(rng):
    rows = _mc_rows(rng, 30)
    rows[0] = {**rows[0], "answer": rows[0]["choices"][1]}  # answer given as the choice text
    task = make_task("mc", "multiple_choice", rows)
    assert task.kind == "multiple_choice" and task.metric == "multiple_choice_grade"
    ex = task.examples
    assert ex[0]["answer"] == 1
    for i, row in enumerate(rows[1:], start=1):
        assert ex[i]["target"] == row["choices"][row["answer"]]
        assert ex[i]["choices"] == row["choices"]


def test_pool_api(rng):
    tasks = [make_task(f"t{i}", "generate", _random_rows(rng, 20 + i)) for i in range(4)]
    pool = TaskPool(tasks, cluster_labels={f"t{i}": str(i % 2) for i in range(4)})
    assert pool.names == ("t0", "t1", "t2", "t3")
    assert pool.sizes == {f"t{i}": 20 + i for i in range(4)}
    sub = pool.select(["t3", "t1"])
    assert sub.names == ("t3", "t1") and sub.cluster_labels == {"t3": "1", "t1": "1"}
    assert (pool.select(["t0"]) | pool.select(["t2"])).names == ("t0", "t2")
    with pytest.raises(KeyError, match="t9"):
        pool["t9"]


def test_errors_name_task_and_field(rng):
    with pytest.raises(DataError, match="task 'x': duplicate task name"):
        TaskPool([make_task("x", "generate", _random_rows(rng, 3)),
                  make_task("x", "generate", _random_rows(rng, 3))])
    with pytest.raises(DataError, match="'empty'.*no examples"):
        make_task("empty", "generate", [])
    rows = _mc_rows(rng, 5)
    rows[3] = {**rows[3], "answer": "not a choice"}
    with pytest.raises(DataError, match=r"line 4, task 'm', field 'answer'.*not among"):
        make_task("m", "multiple_choice", rows)
    rows[3] = {**rows[3], "answer": 9}
    with pytest.raises(DataError, match=r"line 4.*'answer'.*not among"):
        make_task("m", "multiple_choice", rows)
    with pytest.raises(DataError, match=r"line 2, task 'g', field 'target'.*missing"):
        make_task("g", "generate", [{"prompt": "a", "target": "b"}, {"prompt": "a"}])
    small = make_task("s", "generate", _random_rows(rng, 20))
    with pytest.raises(DataError, match=r"task 's'.*probe split too small"):
        TaskPool([small], SplitSpec(probe=0.1, min_probe=50))
    with pytest.raises(ValueError, match="sum to at most 1"):
        SplitSpec(probe=0.6, eval=0.5)


def test_rows_that_would_score_wrongly_are_rejected():
    ok = {"prompt": "q ", "choices": ["no", "yes"], "answer": 1}
    # An empty choice (answer or not) has no tokens: log-likelihood 0, it would always win.
    for bad in ({**ok, "choices": ["", "yes"]}, {**ok, "choices": ["", "yes"], "answer": 0}):
        with pytest.raises(DataError,
                           match=r"line 2, task 'm', field 'choices': choice 0 is empty"):
            make_task("m", "multiple_choice", [ok, bad])
    with pytest.raises(DataError, match=r"line 2, task 'm', field 'choices': choices 0 and 2 are "
                                        r"both 'yes'"):
        make_task("m", "multiple_choice", [ok, {**ok, "choices": ["yes", "no", "yes"]}])
    with pytest.raises(DataError, match=r"line 1, task 'g', field 'target': empty target"):
        make_task("g", "generate", [{"prompt": "q", "target": ""}])
    # Ids key results: a repeat names both lines.
    rows = [{"id": "a", "prompt": "p", "target": "1"}, {"id": "b", "prompt": "p", "target": "2"},
            {"id": "a", "prompt": "r", "target": "3"}]
    with pytest.raises(DataError, match=r"line 3, task 'g', field 'id': duplicate id 'a', first "
                                        r"used at line 1"):
        make_task("g", "generate", rows)
    with pytest.raises(DataError, match=r"f.jsonl line 9, task 'g', field 'id'.*at line 7"):
        make_task("g", "generate", rows, source="f.jsonl", lines=[7, 8, 9])


def test_references_are_a_string_or_a_list_of_strings():
    rows = [{"prompt": "a", "target": "42", "references": "42"},  # one reference, not "4", "2"
            {"prompt": "b", "target": "7", "references": ["7", "seven"]},
            {"prompt": "c", "target": "8"}]
    task = make_task("g", "generate", rows)
    assert task.examples["references"] == [["42"], ["7", "seven"], ["8"]]
    for refs in ([4], 4, ["4", None], {"a": "b"}):
        with pytest.raises(DataError, match=r"line 2, task 'g', field 'references'"):
            make_task("g", "generate", [rows[0], {**rows[1], "references": refs}])


_ROW = {"prompt": "q", "target": "a"}


@pytest.mark.parametrize("call, match", [
    # A number as target names the target field and says to convert it (not 'references').
    (lambda: make_task("g", "generate", [_ROW, {"prompt": "2+3=", "target": 5}]),
     r"line 2, task 'g', field 'target': expected a string, got int 5; convert it"),
    (lambda: make_task("g", "generate", [_ROW], keywords="math"),
     r"keywords must be a list of strings, not one string; pass \['math'\]"),
    (lambda: make_task("g", "generate", [_ROW, _ROW], lines=[1]),
     r"task 'g': lines has 1 entries for 2 rows"),
    (lambda: make_task(None, "generate", [_ROW]), r"name must be a non-empty string, got None"),
    (lambda: make_task("g", "generate", _ROW), r"rows must be a list of dicts, got one dict"),
    (lambda: make_task("g", "generate", [_ROW, "q a"]), r"line 2, task 'g': expected a dict"),
    (lambda: TaskPool(["t"]), r"tasks\[0\] is a str, not a Task"),
    (lambda: TaskPool([], {"probe": 0.1}), r"split must be a SplitSpec, got dict"),
    (lambda: SplitSpec(probe="0.1"), r"SplitSpec\.probe must be a fraction in \[0, 1\], got '0\.1'"),
    (lambda: SplitSpec(eval=float("nan")), r"SplitSpec\.eval must be a fraction"),
    (lambda: SplitSpec(seed="0"), r"SplitSpec\.seed must be an int, got '0'"),
    (lambda: SplitSpec(min_probe=-1), r"SplitSpec\.min_probe must be >= 0, got -1"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(DataError, match=match):
        call()


@pytest.mark.parametrize("size, match", [(-1, r"size must be >= 0, got -1"),
                                         (2.5, r"size must be an int, got 2.5"),
                                         (True, r"size must be an int, got True")])
def test_probe_size_must_be_a_count(size, match):
    pool = TaskPool([make_task("t", "generate", [{"prompt": f"p{i}", "target": "a"}
                                                 for i in range(40)])], SplitSpec(probe=0.5))
    assert len(pool.probe("t", size=np.int64(3))) == 3
    with pytest.raises(DataError, match=match):
        pool.probe("t", size=size)


def test_a_multiple_choice_target_is_checked_not_replaced(rng):
    rows = _mc_rows(rng, int(rng.integers(3, 10)))
    rows = [{**r, "target": r["choices"][r["answer"]]} for r in rows]  # consistent: kept
    assert make_task("m", "multiple_choice", rows).examples["target"] == \
        [r["target"] for r in rows]
    bad = int(rng.integers(len(rows)))
    row = rows[bad]
    wrong = next(c for c in row["choices"] if c != row["target"])
    rows[bad] = {**row, "target": wrong}
    with pytest.raises(DataError, match=rf"line {bad + 1}, task 'm', field 'target': target "
                                        rf"'{wrong}' differs from choices\[answer\] = "
                                        rf"choices\[{row['answer']}\] = '{row['target']}'"):
        make_task("m", "multiple_choice", rows)
    # One past the last choice: what a 1-based label gives for the last one.
    rows[bad] = {k: v for k, v in row.items() if k != "target"}
    rows[bad]["answer"] = len(row["choices"])
    with pytest.raises(DataError, match=rf"line {bad + 1}, task 'm', field 'answer': answer "
                                        r"index \d+ is not among the \d+ choices \(answers are "
                                        r"0-based indices"):
        make_task("m", "multiple_choice", rows)


def test_rows_sharing_a_prompt_share_a_split(rng):
    # Generative data often lists a prompt's acceptable answers as separate rows: they must all
    # land in one split, or an evaluation prompt is trained on. Splits then follow the fractions
    # over prompts (a binomial draw per prompt, 5 standard deviations).
    spec = SplitSpec(probe=0.2, eval=0.25, seed=int(rng.integers(1 << 30)))
    n = 1500
    rows = []
    for i in range(n):
        prompt = f"q {rng.integers(1 << 40)} {i}"
        rows += [{"prompt": prompt, "target": f"a{j} {rng.integers(1 << 30)}"}
                 for j in range(int(rng.integers(1, 5)))]
    order = rng.permutation(len(rows))
    pool = TaskPool([make_task("g", "generate", [rows[i] for i in order])], spec)
    label: dict[str, str] = {}
    for split in ("train", "probe", "eval"):
        for p in pool.split("g", split)["prompt"]:
            assert label.setdefault(p, split) == split, f"prompt {p!r} in {label[p]} and {split}"
    assert len(label) == n
    for split, frac in (("probe", 0.2), ("eval", 0.25)):
        got = sum(s == split for s in label.values())
        assert abs(got - frac * n) < 5 * np.sqrt(n * frac * (1 - frac)), (split, got)
    # The rule, recomputed: a prompt's rows take the hashed split of their smallest content key
    # (so a prompt with one row keeps its own split); rows with an empty prompt are not grouped.
    least: dict[str, bytes] = {}
    for r in rows:
        key = repr((r["prompt"], r["target"], (), -1)).encode()
        least[r["prompt"]] = min(key, least.get(r["prompt"], key))
    for prompt, key in least.items():
        digest = hashlib.blake2b(f"{spec.seed}\0g\0".encode() + key, digest_size=8).digest()
        u = int.from_bytes(digest, "little") / 2.0**64
        assert label[prompt] == ("eval" if u < 0.25 else "probe" if u < 0.45 else "train")
    bare = [{"prompt": "", "target": f"text {rng.integers(1 << 40)} {i}"} for i in range(400)]
    pool = TaskPool([make_task("lm", "generate", bare)], spec)
    assert {s: len(pool.indices("lm", s)) > 0 for s in ("train", "probe", "eval")} == \
        {"train": True, "probe": True, "eval": True}
    for split in ("train", "probe", "eval"):
        for ex in pool.split("lm", split):
            assert split_of(ex, "lm", spec) == split


def test_empty_references_are_refused(rng):
    # Exact match compares stripped text, so an empty or blank reference is hit by an empty
    # prediction (a model that stops at once): every such example would score as correct.
    k = int(rng.integers(1, 4))
    rows = _random_rows(rng, 4)
    for refs, field in ((["x", ""], "references"), ([" \n"], "references"),
                        ("\t", "references"), (None, "target")):
        bad = ({**rows[k], "references": refs} if refs is not None
               else {"prompt": "p", "target": "  "})
        with pytest.raises(DataError, match=rf"line {k + 1}, task 'g', field '{field}': .*"
                                            r"(empty|blank).*would match an empty prediction"):
            make_task("g", "generate", rows[:k] + [bad] + rows[k + 1:])


def test_ids_and_provenance_must_be_text(rng):
    # A dict or list id was silently written as its repr ("{'a': 1}"), a bool as "True";
    # None as description or canary (a BIG-bench null) ended up on Task, annotated str.
    rows = _random_rows(rng, 3)
    k = int(rng.integers(3))
    good = int(rng.integers(1 << 30))
    task = make_task("g", "generate", rows[:k] + [{**rows[k], "id": good}] + rows[k + 1:])
    assert task.examples["id"][k] == str(good)
    for bad, shown in (({"a": 1}, "dict"), (["x"], "list"), (True, "bool"), (2.5, "float")):
        with pytest.raises(DataError, match=rf"line {k + 1}, task 'g', field 'id': .*string or "
                                            rf"an integer, got {shown}"):
            make_task("g", "generate", rows[:k] + [{**rows[k], "id": bad}] + rows[k + 1:])
    for field in ("description", "canary", "source"):
        for bad in (None, 3, ["x"]):
            with pytest.raises(DataError, match=rf"task 'g'.*{field} must be a string, got"):
                make_task("g", "generate", rows, **{field: bad})


def test_choice_scores_are_kept_and_checked(rng):
    # Several correct choices (BIG-bench target_scores): each choice's credit is kept; by default
    # the answer scores 1 and the others 0.
    rows = _mc_rows(rng, 6)
    k = int(rng.integers(6))
    n = 4
    rows[k] = {**rows[k], "choices": [f"c{j}" for j in range(n)], "answer": int(rng.integers(n))}
    scores = rng.choice([0.0, 0.5], size=n)
    scores[(rows[k]["answer"] + 2) % n] = 0.0
    scores[rows[k]["answer"]] = 1.0
    scores[(rows[k]["answer"] + 1) % n] = 1.0
    rows[k] = {**rows[k], "choice_scores": scores.tolist()}
    task = make_task("mc", "multiple_choice", rows)
    for i, row in enumerate(rows):
        want = (scores.tolist() if i == k else
                [float(j == row["answer"]) for j in range(len(row["choices"]))])
        assert task.examples[i]["choice_scores"] == want
    assert make_task("g", "generate", _random_rows(rng, 2)).examples["choice_scores"] == [[], []]
    worse = [1.0] * n
    worse[rows[k]["answer"]] = 0.0
    for bad, match in ((scores.tolist()[:-1], rf"{n - 1} scores for {n} choices"),
                       ([True] + [False] * (n - 1), "expected finite numbers"),
                       ([float("nan")] * n, "expected finite numbers"),
                       ("1 0", "expected a list of numbers"),
                       ([0.5] * n, "every choice scores 0.5: no choice is better"),
                       (worse, rf"the answer \(choice {rows[k]['answer']}\) scores 0.0, below")):
        with pytest.raises(DataError, match=rf"line {k + 1}, task 'mc', field 'choice_scores': "
                                            + match):
            make_task("mc", "multiple_choice", rows[:k] + [{**rows[k], "choice_scores": bad}]
                      + rows[k + 1:])
    with pytest.raises(DataError, match=r"line 1, task 'g', field 'choice_scores': choice_scores "
                                        r"apply to multiple-choice examples only"):
        make_task("g", "generate", [{"prompt": "p", "target": "t", "choice_scores": [1, 0]}])
