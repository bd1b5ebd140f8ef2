"""Local JSONL / Parquet task files and Hugging Face datasets (offline)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taskpgm_jax.data import (
    DataError, HubSpec, HubUnavailableError, SplitSpec, load_hub_tasks, load_task_files,
)


def _gen_rows(rng, n):
    return [{"inputs": f"x{rng.integers(1 << 30)} é", "targets": f"y{rng.integers(1000)}"}
            for _ in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def test_directory_of_jsonl_and_parquet(tmp_path, rng):
    a, b = _gen_rows(rng, 40), _gen_rows(rng, 25)
    mc = [{"question": f"q{i}", "options": ["no", "yes", "maybe"], "label": int(rng.integers(3))}
          for i in range(30)]
    _write_jsonl(tmp_path / "alpha.jsonl", a)
    pq.write_table(pa.Table.from_pylist(b), tmp_path / "beta.parquet")
    _write_jsonl(tmp_path / "gamma.jsonl", mc)
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")  # hidden: skipped
    pool = load_task_files(tmp_path, split=SplitSpec(probe=0.2, eval=0.2))
    assert pool.names == ("alpha", "beta", "gamma")
    assert pool.sizes == {"alpha": 40, "beta": 25, "gamma": 30}
    assert pool["alpha"].examples["prompt"] == [r["inputs"] for r in a]
    assert pool["beta"].examples["target"] == [r["targets"] for r in b]
    g = pool["gamma"]
    assert g.kind == "multiple_choice"
    assert g.examples["answer"] == [r["label"] for r in mc]
    assert g.examples["target"] == [r["options"][r["label"]] for r in mc]
    # A .json file holding one array is read too.
    arr = _gen_rows(rng, 7)
    (tmp_path / "delta.json").write_text(json.dumps(arr, indent=1), encoding="utf-8")
    pool = load_task_files(tmp_path)
    assert pool.names == ("alpha", "beta", "delta", "gamma")
    assert pool["delta"].examples["target"] == [r["targets"] for r in arr]
    # Only two of the tasks, in the requested order.
    assert load_task_files(tmp_path, tasks=["gamma", "alpha"]).names == ("gamma", "alpha")


def test_single_file_with_task_column_and_mapping(tmp_path, rng):
    rows = []
    for i in range(60):
        rows.append({"task": ["t1", "t2", "t3"][i % 3], "src": f"s{i}",
                     "dst": f"d{rng.integers(9)}"})
    _write_jsonl(tmp_path / "all.jsonl", rows)
    pool = load_task_files(tmp_path / "all.jsonl", columns={"prompt": "src", "target": "dst"})
    assert pool.names == ("t1", "t2", "t3")
    assert pool["t2"].examples["prompt"] == [r["src"] for r in rows if r["task"] == "t2"]
    # Without a task column the file is one task named after it.
    _write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "target": "t"}] * 3)
    assert load_task_files(tmp_path / "one.jsonl").names == ("one",)
    # A task column on any row (not just the first) makes the file multi-task: rows without a
    # task name are errors, not silently merged into one task.
    _write_jsonl(tmp_path / "late.jsonl", [{"prompt": "a", "target": "1"},
                                           {"task": "t1", "prompt": "b", "target": "2"}])
    with pytest.raises(DataError, match=r"late.jsonl line 1, field 'task': missing or empty "
                                        r"task name \(got None\)"):
        load_task_files(tmp_path / "late.jsonl")


def test_bad_files_name_file_line_and_field(tmp_path, rng):
    good = json.dumps({"prompt": "a", "target": "b"}).encode() + b"\n"
    bad = tmp_path / "bytes.jsonl"
    bad.write_bytes(good * 3 + b'{"prompt": "caf\xe9", "target": "x"}\n' + good)
    with pytest.raises(DataError, match=r"bytes.jsonl line 4: undecodable text"):
        load_task_files(bad)
    arr = tmp_path / "arr.json"
    arr.write_bytes(b'[\n {"prompt": "a", "target": "b"},\n {"prompt": "\xff", "target": "c"}\n]')
    with pytest.raises(DataError, match=r"arr.json line 3: undecodable text"):
        load_task_files(arr)
    # Valid UTF-8 bytes and valid JSON, but the escape is half a surrogate pair: not Unicode.
    sur = tmp_path / "sur.jsonl"
    sur.write_bytes(good * 2 + b'{"prompt": "a", "target": "x\\ud83d"}\n' + good)
    with pytest.raises(DataError,
                       match=r"sur.jsonl line 3, task 'sur', field 'target': undecodable"):
        load_task_files(sur)
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(good * 5 + b'{"prompt": "a", \n')
    with pytest.raises(DataError, match=r"broken.jsonl line 6: not valid JSON"):
        load_task_files(broken)
    nocol = tmp_path / "nocol.jsonl"
    _write_jsonl(nocol, [{"prompt": "a", "answer_text": "b"}] * 2)
    with pytest.raises(DataError,
                       match=r"nocol.jsonl, field 'target': missing column.*answer_text"):
        load_task_files(nocol)
    mc = tmp_path / "mc.jsonl"
    _write_jsonl(mc, [{"prompt": "a", "choices": ["x", "y"], "answer": "x"},
                      {"prompt": "b", "choices": ["x", "y"], "answer": "z"}])
    with pytest.raises(DataError, match=r"mc.jsonl line 2, task 'mc', field 'answer'.*not among"):
        load_task_files(mc)
    empty_dir = tmp_path / "e"
    empty_dir.mkdir()
    (empty_dir / "void.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"void.jsonl, task 'void': the task has no examples"):
        load_task_files(empty_dir)
    dup = tmp_path / "dup"
    dup.mkdir()
    _write_jsonl(dup / "same.jsonl", [{"prompt": "a", "target": "b"}])
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "target": "b"}]), dup / "same.parquet")
    with pytest.raises(DataError, match=r"same.parquet, task 'same': duplicate task name"):
        load_task_files(dup)
    badpq = tmp_path / "badpq.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"ok", b"\xff\xfe"], pa.binary()),
                             "target": ["a", "b"]}), badpq)
    with pytest.raises(DataError, match=r"badpq.parquet line 2, field 'prompt': undecodable"):
        load_task_files(badpq)


def test_hub_column_mapping_with_a_local_builder(tmp_path, rng):
    # The "json" builder runs the same code path as a hub name, without the network.
    rows = [{"name": ["n1", "n2"][i % 2], "inputs": f"i{i}", "targets": f"o{rng.integers(99)}"}
            for i in range(40)]
    _write_jsonl(tmp_path / "flan.jsonl", rows)
    spec = HubSpec("json", data_files=str(tmp_path / "flan.jsonl"), task_column="name",
                   columns={"prompt": "inputs", "target": "targets"},
                   cache_dir=str(tmp_path / "hf"))
    pool = load_hub_tasks([spec])
    assert pool.names == ("n1", "n2")
    assert pool["n1"].examples["target"] == [r["targets"] for r in rows if r["name"] == "n1"]
    single = load_hub_tasks({"path": "json", "data_files": str(tmp_path / "flan.jsonl"),
                             "task": "whole", "columns": {"prompt": "inputs", "target": "targets"},
                             "cache_dir": str(tmp_path / "hf")})
    assert single.sizes == {"whole": 40}
    numbered = [{**r, "name": i % 2} for i, r in enumerate(rows)]  # integer (ClassLabel) tasks
    _write_jsonl(tmp_path / "numbered.jsonl", numbered)
    assert load_hub_tasks([HubSpec("json", data_files=str(tmp_path / "numbered.jsonl"),
                                   task_column="name", columns=spec.columns,
                                   cache_dir=str(tmp_path / "hf"))]).names == ("0", "1")
    rows[2]["name"] = None  # a null task is an error naming its row, not a task named "None"
    _write_jsonl(tmp_path / "null.jsonl", rows)
    with pytest.raises(DataError, match=r"hub:json:train line 3, field 'name': missing or empty"):
        load_hub_tasks([HubSpec("json", data_files=str(tmp_path / "null.jsonl"),
                                task_column="name", columns=spec.columns,
                                cache_dir=str(tmp_path / "hf"))])


def test_hub_offline_error_explains_local_files():
    with pytest.raises(HubUnavailableError) as err:
        load_hub_tasks(HubSpec("nobody-here/no-such-dataset", "cfg"))
    msg = str(err.value)
    assert "offline" in msg and "no-such-dataset" in msg and "load_task_files" in msg


def test_task_names_are_a_list_and_targets_strings(tmp_path):
    _write_jsonl(tmp_path / "arith.jsonl", [{"prompt": "1+1=", "target": "2"}] * 3)
    with pytest.raises(DataError, match=r"tasks must be a list of strings, not one string; "
                                        r"pass \['arith'\]"):
        load_task_files(tmp_path, tasks="arith")
    assert load_task_files(tmp_path, tasks=("arith",)).names == ("arith",)
    _write_jsonl(tmp_path / "arith.jsonl", [{"prompt": "1+1=", "target": "2"},
                                            {"prompt": "2+3=", "target": 5}])
    with pytest.raises(DataError, match=r"arith.jsonl line 2, task 'arith', field 'target': "
                                        r"expected a string, got int 5"):
        load_task_files(tmp_path)


def test_a_mapped_column_that_is_absent_is_refused(tmp_path, rng):
    """A mapping for an optional field (references, id) naming a column the file lacks is an
    error naming the file, the field, the column and the columns there: not ignored."""
    rows = [{"q": f"q{i}", "a": f"a{rng.integers(99)}", "alts": [f"b{i}"], "key": f"k{i}"}
            for i in range(int(rng.integers(3, 9)))]
    _write_jsonl(tmp_path / "t.jsonl", rows)
    base = {"prompt": "q", "target": "a"}
    for field, col in (("references", "alt"), ("id", f"key{rng.integers(9)}")):
        with pytest.raises(DataError) as err:
            load_task_files(tmp_path / "t.jsonl", columns={**base, field: col})
        msg = str(err.value)
        assert f"t.jsonl, field '{field}'" in msg and repr(col) in msg
        assert str(sorted(rows[0])) in msg  # the columns present
    pool = load_task_files(tmp_path / "t.jsonl",
                           columns={**base, "references": "alts", "id": "key"})
    assert pool["t"].examples["references"] == [r["alts"] for r in rows]
    assert pool["t"].examples["id"] == [r["key"] for r in rows]
    # In a file of several tasks, a mapped column need only be in some of them: the others
    # keep the default (their target as the one reference).
    multi = [{"task": "t1", **rows[0]}, {"task": "t2", "q": "x", "a": "y"}]
    _write_jsonl(tmp_path / "multi.jsonl", multi)
    pool = load_task_files(tmp_path / "multi.jsonl", columns={**base, "references": "alts"})
    assert pool["t1"].examples["references"] == [rows[0]["alts"]]
    assert pool["t2"].examples["references"] == [["y"]]
    # The same in a directory of files, one task each.
    (tmp_path / "dir").mkdir()
    _write_jsonl(tmp_path / "dir" / "t1.jsonl", rows)
    _write_jsonl(tmp_path / "dir" / "t2.jsonl", [{"q": "x", "a": "y"}])
    pool = load_task_files(tmp_path / "dir", columns={**base, "references": "alts"})
    assert pool["t1"].examples["references"] == [r["alts"] for r in rows]
    assert pool["t2"].examples["references"] == [["y"]]
    with pytest.raises(DataError, match="names a column that is not there"):
        load_task_files(tmp_path / "dir", columns={**base, "references": "alt"})


def test_json_array_errors_name_the_element(tmp_path, rng):
    """An element of a .json array spans lines: errors name its position, not a line."""
    n = int(rng.integers(2, 8))
    bad = int(rng.integers(n))
    rows = [{"prompt": f"p{i}", "target": f"t{i}"} for i in range(n)]
    del rows[bad]["target"]
    (tmp_path / "arr.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=rf"arr.json element {bad + 1}, task 'arr', "
                                        r"field 'target': missing required field"):
        load_task_files(tmp_path / "arr.json")


def test_directory_shards_are_grouped_by_the_task_column(tmp_path, rng):
    """FLAN-style shards: files with a task column are grouped by it, a task named in several
    files gets their rows in file then line order, a file without the column is one task."""
    names = [f"task{j}" for j in range(int(rng.integers(2, 6)))]
    shards = []
    for s in range(int(rng.integers(2, 5))):
        rows = [{"task": str(rng.choice(names)), "inputs": f"s{s} q{i} {rng.integers(1 << 30)}",
                 "targets": f"a{rng.integers(99)}"} for i in range(int(rng.integers(5, 30)))]
        shards.append(rows)
        _write_jsonl(tmp_path / f"shard_{s}.jsonl", rows)
    whole = _gen_rows(rng, int(rng.integers(1, 9)))
    _write_jsonl(tmp_path / "zz_whole.jsonl", whole)  # sorts after the shards
    spec = SplitSpec(probe=0.3, eval=0.3, seed=int(rng.integers(1 << 30)))
    pool = load_task_files(tmp_path, columns={"prompt": "inputs", "target": "targets"},
                           split=spec)
    everything = [r for rows in shards for r in rows]
    want = list(dict.fromkeys(r["task"] for r in everything))
    assert pool.names == (*want, "zz_whole")
    for name in want:
        assert pool[name].examples["prompt"] == [r["inputs"] for r in everything
                                                 if r["task"] == name]
        files = [s for s, rows in enumerate(shards) if any(r["task"] == name for r in rows)]
        assert pool[name].source == (str(tmp_path / f"shard_{files[0]}.jsonl")
                                     if len(files) == 1 else f"{tmp_path} ({len(files)} files)")
    assert pool["zz_whole"].examples["target"] == [r["targets"] for r in whole]
    # The same rows as one file with a task column: the same tasks, examples and splits.
    _write_jsonl(tmp_path / "one.jsonl", everything)
    single = load_task_files(tmp_path / "one.jsonl", split=spec,
                             columns={"prompt": "inputs", "target": "targets"})
    assert single.names == tuple(want)
    for name in want:
        assert single[name].examples[:] == pool[name].examples[:]
        for split in ("train", "probe", "eval"):
            assert single.indices(name, split).tolist() == pool.indices(name, split).tolist()
    (tmp_path / "one.jsonl").unlink()
    # task_column=None: every file is one task, whatever its columns.
    flat = load_task_files(tmp_path, columns={"prompt": "inputs", "target": "targets"},
                           task_column=None)
    assert flat.names == (*(f"shard_{s}" for s in range(len(shards))), "zz_whole")
    assert flat.sizes["shard_0"] == len(shards[0])


def test_directory_shards_that_disagree_are_refused(tmp_path, rng):
    line = int(rng.integers(1, 6))
    rows = [{"task": "a", "prompt": f"p{i}", "target": "t"} for i in range(5)]
    _write_jsonl(tmp_path / "s0.jsonl", rows)
    # A task file whose name is also a task of the column: merging would be a guess.
    _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "target": "t"}])
    with pytest.raises(DataError, match=r"a.jsonl: task 'a' is both this whole file .* and rows "
                                        r"of the 'task' column of .*s0.jsonl"):
        load_task_files(tmp_path)
    (tmp_path / "a.jsonl").unlink()
    # The integer 1 and the string "1" would both name task "1", across files too.
    bad = [dict(r) for r in rows]
    bad[line - 1]["task"] = 1
    _write_jsonl(tmp_path / "s1.jsonl", bad)
    _write_jsonl(tmp_path / "s2.jsonl", [{"task": "1", "prompt": "q", "target": "t"}])
    with pytest.raises(DataError, match=rf"s2.jsonl line 1, field 'task': task name '1' is "
                                        rf"written as a string here but as an integer at "
                                        rf".*s1.jsonl line {line}"):
        load_task_files(tmp_path)
    (tmp_path / "s2.jsonl").unlink()
    # A shard's error names that shard and its line, not the first file of the task.
    bad[line - 1] = {"task": "a", "prompt": "q"}
    _write_jsonl(tmp_path / "s1.jsonl", bad)
    with pytest.raises(DataError, match=rf"s1.jsonl line {line}, task 'a', field 'target': "
                                        r"missing required field"):
        load_task_files(tmp_path)
    _write_jsonl(tmp_path / "s1.jsonl", [{"task": "a", "prompt": "q", "choices": ["x", "y"],
                                          "answer": 0}])
    with pytest.raises(DataError, match=r"s1.jsonl, task 'a': the task is multiple_choice here "
                                        r"but generate in .*s0.jsonl"):
        load_task_files(tmp_path)


def test_directory_refuses_files_it_would_not_read(tmp_path, rng):
    _write_jsonl(tmp_path / "t1.jsonl", _gen_rows(rng, 4))
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    others = ["t2.JSONL", "t3.csv", "t4.jsonl.txt", "t5.jsonl.gz", "README.md"]
    chosen = sorted(rng.choice(others, size=int(rng.integers(1, len(others) + 1)),
                               replace=False).tolist())
    for name in chosen:
        (tmp_path / name).write_text('{"prompt": "q", "target": "a"}\n')
    listed = sorted([*chosen, "sub/"]) if rng.integers(2) else chosen
    if "sub/" in listed:
        (tmp_path / "sub").mkdir()
    with pytest.raises(DataError) as err:
        load_task_files(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}: not task files: {listed}")
    assert ".jsonl, .json, .parquet" in msg
    for name in chosen:
        (tmp_path / name).unlink()
    if "sub/" in listed:
        (tmp_path / "sub").rmdir()
    assert load_task_files(tmp_path).names == ("t1",)


def test_multiple_choice_target_must_be_the_answer(tmp_path, rng):
    """A target column beside choices/answer is checked, not replaced by choices[answer]."""
    n = int(rng.integers(3, 12))
    rows = []
    for i in range(n):
        k = int(rng.integers(2, 5))
        choices = [f"c{i}_{j}_{rng.integers(1 << 20)}" for j in range(k)]
        a = int(rng.integers(k - 1))
        rows.append({"question": f"q{i}", "options": choices, "label": a, "target": choices[a]})
    _write_jsonl(tmp_path / "mc.jsonl", rows)
    pool = load_task_files(tmp_path / "mc.jsonl")
    assert pool["mc"].examples["target"] == [r["target"] for r in rows]
    bad = int(rng.integers(n))
    # A 1-based label: the target is the choice before the one the label points at.
    shifted = [dict(r) for r in rows]
    shifted[bad]["label"] += 1
    _write_jsonl(tmp_path / "mc.jsonl", shifted)
    with pytest.raises(DataError, match=rf"mc.jsonl line {bad + 1}, task 'mc', field 'target': "
                                        rf"target '{rows[bad]['target']}' differs from "
                                        rf"choices\[answer\] = choices\[{rows[bad]['label'] + 1}\]"
                                        r".*the answer looks 1-based"):
        load_task_files(tmp_path / "mc.jsonl")
    other = [dict(r) for r in rows]
    other[bad]["target"] = "none of them"
    _write_jsonl(tmp_path / "mc.jsonl", other)
    with pytest.raises(DataError, match=rf"mc.jsonl line {bad + 1}, task 'mc', field 'target'"
                                        r".*a 1-based label column is the usual cause"):
        load_task_files(tmp_path / "mc.jsonl")


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "multiple-choice"},
     r"^unknown kind 'multiple-choice'; expected generate or multiple_choice"),
    ({"columns": "prompt"}, r"^columns must be a mapping \{field: column\}.*got str 'prompt'"),
    ({"columns": [("prompt", "q")]}, r"^columns must be a mapping \{field: column\}"),
    ({"columns": {"prompt": 3}}, r"^columns must map field names to column names.*'prompt': 3"),
    ({"task_column": 0}, r"^task_column must be a column name .* or None, got 0"),
])
def test_bad_arguments_are_named_before_reading(tmp_path, kwargs, match):
    _write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "q", "choices": ["x", "y"], "answer": 0}])
    with pytest.raises(DataError, match=match):
        load_task_files(tmp_path / "mc.jsonl", **kwargs)


def test_task_names_are_written_one_way(tmp_path, rng):
    n = int(rng.integers(2, 9))
    first, second = sorted(rng.choice(n, size=2, replace=False).tolist())
    label = int(rng.integers(100))
    rows = [{"task": f"t{i}", "prompt": f"p{i}", "target": "x"} for i in range(n)]
    rows[first]["task"], rows[second]["task"] = str(label), label
    _write_jsonl(tmp_path / "mix.jsonl", rows)
    with pytest.raises(DataError, match=rf"mix.jsonl line {second + 1}, field 'task': task name "
                                        rf"'{label}' is written as an integer here but as a "
                                        rf"string at .*mix.jsonl line {first + 1}"):
        load_task_files(tmp_path / "mix.jsonl")
    rows[second]["task"] = float(label)
    _write_jsonl(tmp_path / "mix.jsonl", rows)
    with pytest.raises(DataError, match=rf"line {second + 1}, field 'task': a task name must be "
                                        r"a string or an integer label, got float"):
        load_task_files(tmp_path / "mix.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet file"):
        load_task_files(tmp_path / "bad.parquet")


def test_json_files_with_a_byte_order_mark_are_read(tmp_path, rng):
    """UTF-8 with a BOM (as Notepad and PowerShell write it; `datasets`' JSON builder reads it)
    failed with "not valid JSON (Unexpected UTF-8 BOM ...)" at line 1, both as JSON Lines and
    as a .json array."""
    rows = _gen_rows(rng, int(rng.integers(2, 9)))
    bom = b"\xef\xbb\xbf"
    (tmp_path / "lines.jsonl").write_bytes(
        bom + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    (tmp_path / "array.json").write_bytes(bom + json.dumps(rows, indent=1).encode())
    pool = load_task_files(tmp_path)
    for name in ("lines", "array"):
        assert pool[name].examples["prompt"] == [r["inputs"] for r in rows]
        assert pool[name].examples["target"] == [r["targets"] for r in rows]
    # Only a leading one: inside a line it is still an error with its line number.
    (tmp_path / "lines.jsonl").write_bytes(
        json.dumps(rows[0]).encode() + b"\n" + bom + json.dumps(rows[1]).encode() + b"\n")
    with pytest.raises(DataError, match=r"lines.jsonl line 2: not valid JSON"):
        load_task_files(tmp_path / "lines.jsonl")


@pytest.mark.parametrize("specs,match", [
    ("org/name", r"^specs must be a HubSpec, a dict of its fields, or a list of them; got str "
                 r"'org/name'; a dataset name goes in HubSpec\('org/name', \.\.\.\)"),
    (None, r"^specs must be a HubSpec, a dict of its fields, or a list of them; got NoneType"),
    ([HubSpec("nobody-here/x"), "org/name"], r"^specs\[1\] must be a HubSpec or a dict of its "
                                             r"fields, got str 'org/name'"),
    ([{"path": "json", "column": "a"}], r"^specs\[0\]: unknown field\(s\) \['column'\]; HubSpec "
                                        r"fields are \['path', 'name', "),
    ({"name": "navigate"}, r"^specs\[0\]: no 'path'; HubSpec fields are"),
])
def test_hub_specs_that_are_not_hub_specs_are_named(specs, match):
    """A bare dataset name raised "HubSpec() argument after ** must be a mapping, not str", a
    misspelt field "unexpected keyword argument"; every spec is checked before any is loaded
    (the valid-looking first spec here would fail offline)."""
    with pytest.raises(DataError, match=match):
        load_hub_tasks(specs)


def test_choice_scores_are_read_from_files(tmp_path, rng):
    """Per-choice scores (several correct choices) come from a `choice_scores` column, or one
    mapped with columns=; rows without them score 1 for the answer, 0 for the others."""
    rows = []
    for i in range(int(rng.integers(3, 7))):
        answer = int(rng.integers(3))
        scores = [0.0, 0.0, 0.0]
        scores[answer], scores[(answer + 1) % 3] = 1.0, float(rng.choice([0.5, 1.0]))
        rows.append({"question": f"q{i}", "options": ["x", "y", "z"], "label": answer,
                     "credit": scores})
    _write_jsonl(tmp_path / "t.jsonl", rows)
    pool = load_task_files(tmp_path / "t.jsonl", columns={"choice_scores": "credit"})
    assert pool["t"].examples["choice_scores"] == [r["credit"] for r in rows]
    renamed = [{"choice_scores" if k == "credit" else k: v for k, v in r.items()} for r in rows]
    _write_jsonl(tmp_path / "u.jsonl", renamed)
    assert load_task_files(tmp_path / "u.jsonl")["u"].examples["choice_scores"] == \
        [r["credit"] for r in rows]
