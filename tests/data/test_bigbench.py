"""The BIG-bench reader on a fixture archive in the sdist's layout (and the real one if cached)."""

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading

import pytest

from taskpgm_jax.data import BBH_MISSING, BBH_SOURCES, DataError, fetch_bigbench, load_bigbench
from taskpgm_jax.data.sources import bigbench as bb

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
CANARY = "FIXTURE CANARY 0000"


def _gen_task(rng, name, n, **fmt):
    ex = [{"input": f"{name} in {rng.integers(1 << 30)}",
           "target": [f"out{rng.integers(100)}", "alt"] if i % 2 else f"out{rng.integers(100)}"}
          for i in range(n)]
    return {"canary": CANARY, "name": name, "description": f"d {name}", "keywords": ["kw_gen"],
            "metrics": ["exact_str_match"], "preferred_score": "exact_str_match",
            "examples": ex, **fmt}


def _mc_task(rng, name, n, **fmt):
    ex = []
    for _ in range(n):
        k = int(rng.integers(2, 5))
        scores = {f"opt{j}_{rng.integers(1000)}": 0 for j in range(k)}
        scores[list(scores)[int(rng.integers(k))]] = 1
        ex.append({"input": f"{name} mc {rng.integers(1 << 30)}", "target_scores": scores})
    return {"canary": CANARY, "name": name, "keywords": ["kw_mc", "logic"],
            "metrics": ["multiple_choice_grade"], "preferred_score": "multiple_choice_grade",
            "examples": ex, **fmt}


def _fixture_tasks(rng):
    tasks = {
        "word_sorting": _gen_task(rng, "word_sorting", 40, task_prefix="Sort:",
                                  example_input_prefix="\nList: ",
                                  example_output_prefix="\nSorted: "),
        "navigate": _mc_task(rng, "navigate", 30, task_prefix="Go?", append_choices_to_input=False),
        "causal_judgment": _mc_task(rng, "causal_judgment", 25),  # default prefixes, choices shown
        "logical_deduction": {"canary": CANARY, "name": "logical_deduction", "keywords": ["logic"]},
        "logical_deduction/three_objects": _mc_task(rng, "three_objects", 20, choice_prefix="",
                                                    example_input_prefix="",
                                                    example_output_prefix=" ",
                                                    append_choices_to_input=False),
        "logical_deduction/five_objects": _mc_task(rng, "five_objects", 20),
    }
    return tasks


def _build_archive(path, tasks, extra=()):
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("bigbench-1.0.0/setup.py", b"# fixture\n")
        for p, d in tasks.items():
            add(f"{ROOT}{p}/task.json", json.dumps(d).encode())
        add(f"{ROOT}web_of_lies/task.py", b"# programmatic\n")
        for name, data in extra:
            add(name, data)
    return path


def _check_fixture(pool, tasks, canary=CANARY):
    for name in pool.names:
        src = tasks[name]
        task = pool[name]
        assert task.canary == canary and task.source == f"bigbench:1.0.0/{name}"
        ex = task.examples
        assert ex.num_rows == len(src["examples"])
        fmt = (src.get("task_prefix", ""), src.get("example_input_prefix", "\nQ: "),
               src.get("example_output_prefix", "\nA: "), src.get("choice_prefix", "\n  choice: "))
        for row, e in zip(ex, src["examples"], strict=True):
            if "target_scores" in e:
                choices = list(e["target_scores"])
                shown = ""
                if src.get("append_choices_to_input", True):
                    shown = "".join(fmt[3] + c for c in choices)
                assert row["prompt"] == fmt[0] + fmt[1] + e["input"] + shown + fmt[2]
                assert row["choices"] == choices
                assert e["target_scores"][row["target"]] == max(e["target_scores"].values())
                assert row["choice_scores"] == list(e["target_scores"].values())
            else:
                targets = e["target"] if isinstance(e["target"], list) else [e["target"]]
                assert row["prompt"] == fmt[0] + fmt[1] + e["input"] + fmt[2]
                assert row["target"] == targets[0] and row["references"] == targets


def test_reader_on_fixture_archive(tmp_path, rng):
    tasks = _fixture_tasks(rng)
    archive = _build_archive(tmp_path / "bigbench-1.0.0.tar.gz", tasks)
    pool = load_bigbench(["navigate", "word_sorting", "logical_deduction/three_objects"],
                         archive=archive)
    assert pool.names == ("navigate", "word_sorting", "logical_deduction/three_objects")
    assert [pool[n].kind for n in pool.names] == ["multiple_choice", "generate",
                                                  "multiple_choice"]
    _check_fixture(pool, tasks)
    # A container name means its sub-tasks; keywords filter.
    assert load_bigbench("logical_deduction", archive=archive).names == (
        "logical_deduction/five_objects", "logical_deduction/three_objects")
    assert set(load_bigbench(None, archive=archive, keywords=["kw_mc"]).names) == {
        "navigate", "causal_judgment", "logical_deduction/three_objects",
        "logical_deduction/five_objects"}
    # The bbh suite holds the BBH sources present in the archive.
    bbh = load_bigbench("bbh", cache_dir=tmp_path)
    assert set(bbh.names) == {"navigate", "word_sorting", "causal_judgment",
                              "logical_deduction/three_objects", "logical_deduction/five_objects"}
    _check_fixture(bbh, tasks)


def test_an_archive_replaced_by_one_of_the_same_size_and_mtime_is_reindexed(tmp_path, rng):
    """The index beside the archive is keyed by more than size and mtime: an archive rewritten in
    place (same size, an mtime within the clock's resolution) with other task.json sizes once
    read its members at the old sizes (a random-seed sweep hit it in 2 of 200 runs)."""
    import gzip
    import os

    first = _fixture_tasks(rng)
    # The same tasks with one navigate example fewer: navigate's task.json shrinks.
    second = {**first, "navigate": {**first["navigate"],
                                    "examples": first["navigate"]["examples"][:-1]}}
    tars = [gzip.decompress(_build_archive(tmp_path / f"{k}.tar.gz", t).read_bytes())
            for k, t in (("a", first), ("b", second))]
    size = max(map(len, tars))
    archive = tmp_path / "bigbench-1.0.0.tar.gz"

    def write(tar):  # zero blocks past the end are still a valid tar, stored gzip blocks keep
        # the archive's size equal to the first one's
        archive.write_bytes(gzip.compress(tar.ljust(size, b"\0"), compresslevel=0, mtime=0))

    write(tars[0])
    assert load_bigbench(["navigate"], archive=archive)["navigate"].examples.num_rows == 30
    stat = archive.stat()
    write(tars[1])
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert archive.stat().st_size == stat.st_size
    _check_fixture(load_bigbench(["navigate"], archive=archive), second)


REAL = bb.default_cache_dir() / "bigbench-1.0.0.tar.gz"


@pytest.mark.skipif(not REAL.exists(), reason=f"no real BIG-bench archive at {REAL} (fetch it "
                    "with `taskpgm data fetch bigbench`)")
def test_reader_on_real_archive():
    names = ["navigate", "word_sorting", "logical_deduction/three_objects"]
    rpool = load_bigbench(names, archive=REAL)
    assert rpool.names == tuple(names)
    # The same task.json files read independently: plain tarfile extraction by member name, no
    # index or offsets; the prompts, choices and targets must follow from them exactly.
    raw = {}
    with tarfile.open(REAL, "r:gz") as tar:
        for m in tar:
            path = m.name.partition("/")[2].removeprefix("bigbench/benchmark_tasks/")
            if path.removesuffix("/task.json") in names and path.endswith("/task.json"):
                raw[path.removesuffix("/task.json")] = json.load(tar.extractfile(m))
                if len(raw) == len(names):
                    break
    assert set(raw) == set(names)
    _check_fixture(rpool, raw, canary=raw["navigate"]["canary"])
    assert rpool["navigate"].kind == "multiple_choice" and len(rpool["navigate"]) == 1000
    assert rpool["word_sorting"].kind == "generate" and len(rpool["word_sorting"]) == 1900
    three = rpool["logical_deduction/three_objects"]
    assert three.kind == "multiple_choice" and len(three) == 300
    assert all(len(c) == 3 for c in three.examples["choices"])
    assert all(t.canary.startswith("BENCHMARK DATA SHOULD NEVER APPEAR") for t in rpool.tasks)
    ws = rpool["word_sorting"].examples[0]
    words = ws["prompt"].split("\nList: ")[1].split("\nSorted: ")[0].split()
    assert ws["target"] == " ".join(sorted(words))
    nav = rpool["navigate"].examples
    assert all(p.startswith("If you follow these instructions") for p in nav["prompt"])
    assert set(nav["target"]) == {"True", "False"}
    idx = bb.archive_index(REAL)
    assert bb.bbh_names(idx)[1] == list(BBH_MISSING)
    # The missing BBH tasks' sources are there, as code only (a task.py, no task.json).
    assert {BBH_SOURCES[b] for b in BBH_MISSING} <= set(idx["programmatic"])


def test_bbh_missing_and_errors(tmp_path, rng):
    tasks = _fixture_tasks(rng)
    archive = _build_archive(tmp_path / "bigbench-1.0.0.tar.gz", tasks)
    index = bb.archive_index(archive)
    present, missing = bb.bbh_names(index)
    assert set(missing) == set(BBH_SOURCES) - {"navigate", "word_sorting", "causal_judgement",
                                               "logical_deduction_three_objects",
                                               "logical_deduction_five_objects"}
    assert set(BBH_MISSING) <= set(missing)
    assert index["programmatic"] == ["web_of_lies"]
    with pytest.raises(DataError, match="'web_of_lies'.*programmatic"):
        load_bigbench("web_of_lies", archive=archive)
    with pytest.raises(DataError, match="'no_such_task'.*no such BIG-bench"):
        load_bigbench(["navigate", "no_such_task"], archive=archive)
    with pytest.raises(FileNotFoundError, match="fetch bigbench"):
        load_bigbench("bbh", cache_dir=tmp_path / "empty")

    bad = _mc_task(rng, "bad", 3)
    bad["examples"][2]["target_scores"] = {"a": 0, "b": 0}
    (tmp_path / "bad").mkdir()
    with pytest.raises(DataError,
                       match=r"example 2, task 'bad', field 'target_scores'.*no correct"):
        load_bigbench("bad", archive=_build_archive(tmp_path / "bad" / "bigbench-1.0.0.tar.gz",
                                                    {"bad": bad}))
    gen = _gen_task(rng, "gen", 3)
    del gen["examples"][1]["target"]
    (tmp_path / "gen").mkdir()
    with pytest.raises(DataError, match=r"example 1, task 'gen', field 'target'"):
        load_bigbench("gen", archive=_build_archive(tmp_path / "gen" / "bigbench-1.0.0.tar.gz",
                                                    {"gen": gen}))


def test_bad_examples_name_the_example_and_field():
    def convert(examples):
        data = {"examples": examples, "preferred_score": "multiple_choice_grade"}
        return bb.convert_task(data, "x/y", "bigbench:1.0.0/x/y")

    good = {"input": "q", "target_scores": {"a": 1, "b": 0}}
    for scores in ({"a": "high", "b": 0}, {"a": None, "b": 0}, {"a": float("nan"), "b": 0}):
        with pytest.raises(DataError, match=r"^bigbench:1.0.0/x/y example 1, task 'x/y', field "
                                            r"'target_scores': scores must be"):
            convert([good, {"input": "r", "target_scores": scores}])
    # Errors found by make_task count examples from 0 too, not "line 1".
    with pytest.raises(DataError, match=r"example 1, task 'x/y', field 'choices': choice 0 is "
                                        r"empty"):
        convert([good, {"input": "r", "target_scores": {"": 1, "b": 0}}])
    with pytest.raises(DataError, match=r"example 0, task 'x/y', field 'target': empty target"):
        bb.convert_task({"examples": [{"input": "q", "target": ["", "yes"]}]}, "x/y",
                        "bigbench:1.0.0/x/y")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_fetch_from_a_package_index(tmp_path, rng, capsys):
    # A local PEP 691 index serving a fixture archive under a version with no pinned hash.
    served = tmp_path / "served"
    (served / "simple" / "bigbench").mkdir(parents=True)
    name = "bigbench-9.9.9.tar.gz"
    _build_archive(served / name, _fixture_tasks(rng))
    digest = hashlib.sha256((served / name).read_bytes()).hexdigest()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    listing = {"files": [{"filename": name, "url": f"{url}/{name}", "hashes": {"sha256": digest}}]}
    (served / "simple" / "bigbench" / "index.html").write_text(json.dumps(listing))
    try:
        cache = tmp_path / "cache"
        got = fetch_bigbench(cache, version="9.9.9", index_url=f"{url}/simple")
        assert got == cache / name and got.read_bytes() == (served / name).read_bytes()
        assert (cache / (name + ".index.json")).exists()
        assert load_bigbench("navigate", archive=got).names == ("navigate",)
        # A corrupted download is refused and leaves nothing behind.
        listing["files"][0]["hashes"]["sha256"] = "0" * 64
        (served / "simple" / "bigbench" / "index.html").write_text(json.dumps(listing))
        with pytest.raises(ValueError, match="does not match"):
            fetch_bigbench(tmp_path / "cache2", version="9.9.9", index_url=f"{url}/simple")
        assert not any((tmp_path / "cache2").iterdir())
        # No index reachable: the error says where to put the file by hand.
        with pytest.raises(OSError, match="place it at"):
            fetch_bigbench(tmp_path / "cache3", version="9.9.9", index_url="http://127.0.0.1:9/x")
        # The command-line entry finds the cached archive and does not download it again (the
        # index now lists a wrong hash, so a download would fail).
        assert bb.main(["--cache-dir", str(cache), "--index-url", f"{url}/simple",
                        "--version", "9.9.9"]) == 0
        assert "missing (generated in code)" in capsys.readouterr().out
        # The same through the `taskpgm` command; an unknown dataset is a one-line error.
        from taskpgm_jax import cli

        assert cli.main(["data", "fetch", "bigbench", "--cache-dir", str(cache),
                         "--index-url", f"{url}/simple", "--version", "9.9.9"]) == 0
        assert "missing (generated in code)" in capsys.readouterr().out
        assert cli.main(["data", "fetch", "glue"]) == 2
        assert "unknown dataset 'glue'" in capsys.readouterr().err
    finally:
        server.shutdown()


def test_keywords_filter_a_suite_and_never_drop_a_named_task(tmp_path, rng):
    """Keywords once dropped a task the caller named (["navigate", "word_sorting"] with "logic"
    gave navigate alone): they filter "bbh" or every task; a named task without them is refused."""
    tasks = _fixture_tasks(rng)
    archive = _build_archive(tmp_path / "bigbench-1.0.0.tar.gz", tasks)
    leaves = [p for p, d in tasks.items() if d.get("examples")]
    kw = str(rng.choice(["logic", "kw_mc", "kw_gen"]))
    having = sorted(p for p in leaves if kw in tasks[p]["keywords"])
    lacking = sorted(set(leaves) - set(having))
    assert set(load_bigbench(None, archive=archive, keywords=[kw]).names) == set(having)
    assert set(load_bigbench("bbh", archive=archive, keywords=[kw]).names) == set(having)
    named = [str(p) for p in rng.permutation(having)]
    assert load_bigbench(named, archive=archive, keywords=[kw]).names == tuple(named)
    bad = str(rng.choice(lacking))
    mixed = [str(p) for p in rng.permutation([*having[:1], bad])]
    with pytest.raises(bb.TaskSelectionError,
                       match=rf"named explicitly lack keywords \['{kw}'\]: {bad} .*drop these"):
        load_bigbench(mixed, archive=archive, keywords=[kw])


def test_task_lists_are_checked_before_they_are_read(tmp_path, rng):
    """"bbh" inside a list was reported as an unknown task, an empty list as "no task matches
    names=[]", and a non-string name as a TypeError from str.startswith."""
    tasks = _fixture_tasks(rng)
    archive = _build_archive(tmp_path / "bigbench-1.0.0.tar.gz", tasks)
    other = str(rng.choice(["navigate", "word_sorting", "causal_judgment"]))
    with pytest.raises(bb.TaskSelectionError, match="'bbh' names the whole suite and must stand "
                                                    "alone"):
        load_bigbench([other, "bbh"][::int(rng.choice([1, -1]))], archive=archive)
    with pytest.raises(bb.TaskSelectionError, match="names_or_suite is an empty list"):
        load_bigbench([], archive=archive)
    with pytest.raises(DataError, match=r"names_or_suite must be a list of strings; not: \[7\]"):
        load_bigbench([other, 7], archive=archive)
    # ["bbh"] alone is the suite, as "bbh" is.
    assert load_bigbench(["bbh"], archive=archive).names == load_bigbench("bbh",
                                                                          archive=archive).names


@pytest.mark.parametrize("field", ["task_prefix", "example_input_prefix", "example_output_prefix",
                                   "choice_prefix"])
def test_a_null_prefix_names_the_task_and_field(rng, field):
    """BIG-bench itself fails on a null prefix (str + None) and turns a null task_prefix into
    the text "None"; here each names the task and field instead."""
    task = _mc_task(rng, "t", int(rng.integers(2, 6)))
    task[field] = None
    with pytest.raises(DataError, match=rf"task 'x/y', field '{field}': must be a string, got "
                                        r"null; leave the field out"):
        bb.convert_task(task, "x/y", "bigbench:1.0.0/x/y")


def test_damaged_archives_name_the_archive(tmp_path, rng):
    """A cut-off archive raised a bare EOFError and a non-gzip one tarfile's "not a gzip file",
    neither naming the archive nor a ValueError (which the CLI reports in one line)."""
    tasks = _fixture_tasks(rng)
    good = _build_archive(tmp_path / "good.tar.gz", tasks).read_bytes()
    damaged = {"cut": good[:int(rng.integers(0, len(good) - 32))],
               "noise": rng.bytes(int(rng.integers(1, 4096)))}
    # Corrupt one byte of the compressed data: gzip's CRC-32 catches it while indexing. (Not the
    # header's file name, ending in a NUL, nor the deflate stream's last byte: its padding bits.)
    flipped = bytearray(good)
    pos = int(rng.integers(good.index(b"\0", 10) + 1, len(good) - 9))
    flipped[pos] ^= int(rng.integers(1, 256))
    damaged["flip"] = bytes(flipped)
    for kind, data in damaged.items():
        (tmp_path / kind).mkdir()
        archive = tmp_path / kind / "bigbench-1.0.0.tar.gz"
        archive.write_bytes(data)
        with pytest.raises(DataError) as err:
            load_bigbench(None, archive=archive)
        msg = str(err.value)
        assert msg.startswith(f"{archive}: not a complete gzip archive"), (kind, pos, msg)
        assert msg.endswith("delete it and run `taskpgm data fetch bigbench` "
                            "(or fetch_bigbench())"), (kind, msg)
        assert not (tmp_path / kind / "bigbench-1.0.0.tar.gz.index.json").exists()
    # An archive that was indexed whole and then cut short is found out too.
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    archive.write_bytes(good)
    assert load_bigbench("navigate", archive=archive).names == ("navigate",)
    archive.write_bytes(good[:int(rng.integers(0, len(good) - 32))])
    with pytest.raises(DataError, match="not a complete gzip archive"):
        load_bigbench("navigate", archive=archive)


def test_a_half_written_index_is_rebuilt(tmp_path, rng, monkeypatch):
    """The index beside the archive was written in place: a run killed mid-write left half a
    JSON file, and every later load failed with a bare JSONDecodeError."""
    tasks = _fixture_tasks(rng)
    archive = _build_archive(tmp_path / "bigbench-1.0.0.tar.gz", tasks)
    side = tmp_path / "bigbench-1.0.0.tar.gz.index.json"
    names = ["navigate", "word_sorting"]
    load_bigbench(names, archive=archive)
    whole = side.read_text()
    # Half a file from an older version, then the same loaded again: rebuilt, the same content.
    side.write_text(whole[:int(rng.integers(1, len(whole) - 1))])
    _check_fixture(load_bigbench(names, archive=archive), tasks)
    assert json.loads(side.read_text())["tasks"] == json.loads(whole)["tasks"]

    # A write interrupted half-way (Ctrl-C) leaves the previous index, not half of the new one.
    import taskpgm_jax._atomic as atomic

    real_fdopen = atomic.os.fdopen

    class HalfThenInterrupted:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[:len(data) // 2])
            raise KeyboardInterrupt

    side.write_text('{"stamp": "stale", "tasks": {}, "programmatic": []}')
    monkeypatch.setattr(atomic.os, "fdopen", lambda *a, **k: HalfThenInterrupted(real_fdopen(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        load_bigbench(names, archive=archive)
    monkeypatch.undo()
    assert json.loads(side.read_text())["stamp"] == "stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name, side.name]
    _check_fixture(load_bigbench(names, archive=archive), tasks)


def test_fetch_replaces_a_damaged_archive_of_an_unpinned_version(tmp_path, rng):
    """With no pinned hash to check a cached archive by, one that does not read is downloaded
    again (it used to raise EOFError from the cache check)."""
    served = tmp_path / "served"
    (served / "simple" / "bigbench").mkdir(parents=True)
    name = "bigbench-9.9.9.tar.gz"
    _build_archive(served / name, _fixture_tasks(rng))
    good = (served / name).read_bytes()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    listing = {"files": [{"filename": name, "url": f"{url}/{name}",
                          "hashes": {"sha256": hashlib.sha256(good).hexdigest()}}]}
    (served / "simple" / "bigbench" / "index.html").write_text(json.dumps(listing))
    try:
        cache = tmp_path / "cache"
        cache.mkdir()
        (cache / name).write_bytes(good[:int(rng.integers(0, len(good) - 32))])
        got = fetch_bigbench(cache, version="9.9.9", index_url=f"{url}/simple")
        assert got.read_bytes() == good
        assert load_bigbench("navigate", archive=got).names == ("navigate",)
    finally:
        server.shutdown()


def _bigbench_format(task, ex):
    """BIG-bench's own zero-shot formatting of one example (json_task.default_format_fn, with
    the appended choices unpermuted): choices are shown for any example with target_scores,
    whatever the task's metric, and the first highest-scored choice is the default target."""
    text = ex["input"]
    if "target_scores" in ex and task.get("append_choices_to_input", True):
        cp = task.get("choice_prefix", "\n  choice: ")
        text += cp + cp.join(ex["target_scores"])
    prompt = (task.get("task_prefix", "") + task.get("example_input_prefix", "\nQ: ") + text
              + task.get("example_output_prefix", "\nA: "))
    target = ex.get("target")
    if target is None:
        best = max(ex["target_scores"].values())
        target = [k for k, v in ex["target_scores"].items() if v == best][0]
    return prompt, target if isinstance(target, list) else [target]


@pytest.mark.parametrize("append", [True, False])
def test_generative_examples_with_target_scores_are_formatted_as_bigbench_does(rng, append):
    """A generative task (preferred exact_str_match) whose examples also carry target_scores
    lost their choices from the prompt, and one without a target was refused; BIG-bench shows
    the choices and takes the highest-scored choice as the target."""
    task = _gen_task(rng, "gen", 12, append_choices_to_input=append, choice_prefix="\n- ")
    for k, ex in enumerate(task["examples"]):
        if k % 3:
            scores = {f"c{j}_{rng.integers(1000)}": int(rng.integers(3)) for j in range(3)}
            scores[f"top{k}"] = 5
            ex["target_scores"] = dict(sorted(scores.items(), key=lambda _: rng.random()))
            if k % 3 == 2:
                del ex["target"]
    got = bb.convert_task(task, "gen", "bigbench:1.0.0/gen")
    assert got.kind == "generate"
    for row, ex in zip(got.examples, task["examples"], strict=True):
        prompt, refs = _bigbench_format(task, ex)
        assert (row["prompt"], row["references"], row["target"]) == (prompt, refs, refs[0])


def test_malformed_targets_and_examples_are_named():
    """A number or an object as the target raised TypeError ('int' object is not iterable) or
    was read as the object's keys; examples that are not objects raised AttributeError."""
    def convert(examples):
        return bb.convert_task({"examples": examples}, "x/y", "bigbench:1.0.0/x/y")

    good = {"input": "q", "target": "a"}
    for target, shown in [(5, "int 5"), ({"a": 1}, r"dict \{'a': 1\}"), ([], r"list \[\]"),
                          (["a", 3], r"list \['a', 3\]")]:
        with pytest.raises(DataError, match=r"^bigbench:1.0.0/x/y example 1, task 'x/y', field "
                                            r"'target': the target must be a string or a "
                                            rf"non-empty list of strings, got {shown}$"):
            convert([good, {"input": "r", "target": target}])
    with pytest.raises(DataError, match=r"example 1, task 'x/y', field 'examples': expected an "
                                        r"object with input and target or target_scores, got "
                                        r"str 'q'"):
        convert([good, "q"])
    with pytest.raises(DataError, match=r"task 'x/y', field 'examples': expected a list of "
                                        r"example objects, got dict"):
        convert({"0": good})


def test_null_metadata_is_read_as_absent_and_other_types_are_named(tmp_path, rng):
    """A null canary or description reached Task as None (annotated str) and null keywords
    failed indexing with a raw TypeError ('NoneType' object is not iterable); null now reads
    as the field left out, and a value of another type is a DataError naming the field."""
    task = _mc_task(rng, "navigate", int(rng.integers(2, 6)))
    task.update(canary=None, description=None, keywords=None)
    archive = _build_archive(tmp_path / "bigbench-1.0.0.tar.gz", {"navigate": task})
    loaded = load_bigbench("navigate", archive=archive)["navigate"]
    assert (loaded.canary, loaded.description, loaded.keywords) == ("", "", ())
    assert bb.archive_index(archive)["tasks"]["navigate"]["keywords"] == []
    for field, value, shown in (("canary", 7, "7"), ("description", ["d"], r'\["d"\]'),
                                ("keywords", "logic", '"logic"')):
        bad = {**_mc_task(rng, "t", 3), field: value}
        with pytest.raises(DataError, match=rf"task 'x/y', field '{field}': must be a "
                                            rf"{'list of strings' if field == 'keywords' else 'string'}"
                                            rf", got {shown}"):
            bb.convert_task(bad, "x/y", "bigbench:1.0.0/x/y")
