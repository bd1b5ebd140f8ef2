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
    (tmp_path / "notes.txt").write_text("ignored")
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
