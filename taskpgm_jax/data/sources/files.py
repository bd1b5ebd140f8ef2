"""Tasks from local files: a directory of JSONL / Parquet files (one per task, or shards with a
task column), or one file (one task, or many in a task column).

JSON Lines are decoded here line by line rather than by `datasets`' JSON builder, because the
builder reports a bad byte or a broken line without its line number, and a user with a 100k-line
file needs the number. Parquet is read with pyarrow (the format `datasets` itself stores).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from taskpgm_jax.data.tasks import (
    KINDS,
    SplitSpec,
    Task,
    TaskPool,
    _at,
    check_names,
    data_error,
    make_task,
)

__all__ = ["DEFAULT_COLUMNS", "load_task_files", "read_records"]

# Our field -> the column names tried, in order, when the user maps nothing. FLAN-style files use
# inputs/targets; many MC datasets use label for the answer index.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "input", "inputs", "question"),
    "target": ("target", "targets", "output", "completion"),
    "choices": ("choices", "options"),
    "answer": ("answer", "label"),
    "id": ("id",),
    "references": ("references",),
    "choice_scores": ("choice_scores",),
}
SUFFIXES = (".jsonl", ".json", ".parquet")


def read_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int | str]]:
    """Reads a JSON Lines or Parquet file into records and their line (row) numbers.

    Args:
      path: a `.jsonl` / `.json` (JSON Lines, or a `.json` holding one array of objects) or a
        `.parquet` file. UTF-8 text, with or without a byte-order mark.

    Returns:
      (records, lines): one dict per non-blank line / row, and its 1-based line or row number
        (for a JSON array, a label "element N": an element's position is not its line).

    Raises:
      DataError: text that is not UTF-8, a line that is not a JSON object (with its number).
    """
    path = Path(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix not in (".jsonl", ".json"):
        raise data_error(f"unsupported file type {path.suffix!r}; expected one of {SUFFIXES}",
                         source=str(path))
    if path.suffix == ".json" and _starts_with_array(path):
        return _read_json_array(path)
    records: list[dict[str, Any]] = []
    lines: list[int | str] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise data_error(f"undecodable text: byte {e.start} is not valid UTF-8",
                                 source=str(path), line=line_no) from None
            if line_no == 1:  # a byte-order mark, as Windows tools write (datasets reads it)
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise data_error(f"not valid JSON ({e.msg} at column {e.colno})",
                                 source=str(path), line=line_no) from None
            if not isinstance(record, dict):
                raise data_error(f"expected a JSON object per line, got {type(record).__name__}",
                                 source=str(path), line=line_no)
            records.append(record)
            lines.append(line_no)
    return records, lines


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _read_json_array(path: Path) -> tuple[list[dict[str, Any]], list[int | str]]:
    """A `.json` file holding one array of objects, labelled "element N" (1-based): an
    element spans several lines, so a line number would point at the wrong place."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise data_error(f"undecodable text: byte {e.start} is not valid UTF-8",
                         source=str(path), line=line) from None
    try:
        records = json.loads(text.removeprefix("\ufeff"))  # a byte-order mark is not JSON
    except json.JSONDecodeError as e:
        raise data_error(f"not valid JSON ({e.msg} at column {e.colno})", source=str(path),
                         line=e.lineno) from None
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, dict):
            raise data_error(f"array element {i} is a {type(rec).__name__}, not an object",
                             source=str(path))
    return records, [f"element {i}" for i in range(1, len(records) + 1)]


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[int | str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:  # truncated, empty, or not Parquet at all
        raise data_error(f"not a readable Parquet file ({e}); rewrite it, or remove it",
                         source=str(path)) from None
    for row, rec in enumerate(records, start=1):
        for key, value in rec.items():
            # Binary columns arrive as bytes; text must decode, and the error names the row.
            if isinstance(value, bytes):
                try:
                    rec[key] = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise data_error(f"undecodable text: byte {e.start} is not valid UTF-8",
                                     source=str(path), line=row, field=key) from None
    return records, list(range(1, len(records) + 1))


def _check_columns(columns: Any, source: str | None = None) -> dict[str, str]:
    """The user's column mapping as a dict, or a `DataError` naming `columns`."""
    if columns is None:
        return {}
    example = "e.g. {'prompt': 'inputs', 'target': 'targets'}"
    if not isinstance(columns, Mapping):
        raise data_error(f"columns must be a mapping {{field: column}}, {example}; got "
                         f"{type(columns).__name__} {columns!r}", source=source)
    bad = {f: c for f, c in columns.items() if not isinstance(c, str) or not c}
    if bad or not all(isinstance(f, str) for f in columns):
        raise data_error(f"columns must map field names to column names (non-empty strings), "
                         f"{example}; not: {bad or dict(columns)!r}", source=source)
    return dict(columns)


def _check_kind(kind: Any, source: str | None = None) -> None:
    if kind is not None and kind not in KINDS:
        raise data_error(f"unknown kind {kind!r}; expected {' or '.join(KINDS)} (or None: "
                         f"multiple choice when a choices column exists)", source=source)


def _resolve_columns(present: set[str], columns: Mapping[str, str] | None, source: str,
                     kind: str | None, file_columns: set[str] | None = None) -> dict[str, str]:
    """Our field -> the file's column, from the user's mapping or the defaults. `present`: the
    task's columns; `file_columns`: the whole file's (default `present`), which every column
    the user maps must be among."""
    # Arguments first: a typo in `kind` would otherwise surface as a missing column.
    _check_kind(kind, source)
    columns = _check_columns(columns, source)
    unknown = set(columns) - set(DEFAULT_COLUMNS)
    if unknown:
        raise data_error(f"unknown field(s) in the column mapping: {sorted(unknown)}; mappable "
                         f"fields are {sorted(DEFAULT_COLUMNS)}", source=source)
    resolved = {}
    for field, aliases in DEFAULT_COLUMNS.items():
        if field in columns:
            resolved[field] = columns[field]
        else:
            found = [a for a in aliases if a in present]
            if found:
                resolved[field] = found[0]
    kind = kind or ("multiple_choice" if "choices" in resolved else "generate")
    required = (("prompt", "choices", "answer") if kind == "multiple_choice"
                else ("prompt", "target"))
    for field in required:
        col = resolved.get(field)
        if col is None or col not in present:
            tried = [col] if col else list(DEFAULT_COLUMNS[field])
            raise data_error(
                f"missing column for {kind} field {field!r} (looked for {tried}); columns present: "
                f"{sorted(present)}. Map it with columns={{{field!r}: '<column>'}}",
                source=source, field=field)
    # A mapped column that is absent would otherwise leave an optional field (id, references)
    # at its default without a word: most likely a typo in the mapping.
    file_columns = present if file_columns is None else file_columns
    for field, col in columns.items():
        if col not in file_columns:
            raise data_error(
                f"the column mapping {{{field!r}: {col!r}}} names a column that is not there; "
                f"columns present: {sorted(file_columns)}. Fix the column name, or drop "
                f"{field!r} from the mapping", source=source, field=field)
    resolved["_kind"] = kind
    return resolved


def _task_rows(records: list[dict], source: str, columns: Mapping[str, str] | None,
               kind: str | None, file_columns: set[str] | None) -> tuple[str, list[dict]]:
    """(kind, rows with our field names) of one task's records from one source."""
    present = set().union(*(r.keys() for r in records))
    cols = _resolve_columns(present, columns, source, kind, file_columns)
    kind = cols.pop("_kind")
    return kind, [{field: rec.get(col) for field, col in cols.items()} for rec in records]


def task_from_records(name: str, records: list[dict], lines: Sequence[int | str], source: str,
                       columns: Mapping[str, str] | None, kind: str | None,
                       metric: str | None, file_columns: set[str] | None = None) -> Task:
    """One task from its records; `file_columns`: the columns of the whole source when it
    holds several tasks (a file with a task column, a directory of files): a mapped column
    need only be in some of them."""
    if not records:
        raise data_error("the task has no examples", task=name, source=source)
    kind, rows = _task_rows(records, source, columns, kind, file_columns)
    return make_task(name, kind, rows, metric=metric, source=source, lines=lines)


def task_name(record: Mapping[str, Any], column: str, source: str, line: int | str) -> str:
    """The task name in a record's task column; an error naming the line if it has none.
    Integer labels (e.g. a Hugging Face ClassLabel column) name their task by the number."""
    name = record.get(column)
    if isinstance(name, numbers.Integral) and not isinstance(name, bool):
        return str(name)
    if name is None or name == "":
        raise data_error(f"missing or empty task name (got {name!r}); with a task column, every "
                         f"row needs a task name string there", source=source, line=line,
                         field=column)
    if not isinstance(name, str):
        raise data_error(f"a task name must be a string or an integer label, got "
                         f"{type(name).__name__} {name!r}", source=source, line=line,
                         field=column)
    return name


def _group_by_task(records: list[dict], lines: Sequence[int | str], column: str | None,
                   source: str, name_types: dict[str, tuple[bool, str]]
                   ) -> dict[str, tuple[list, list]] | None:
    """One source's records grouped by their task column, in order of first appearance; None
    when no row has the column (the source is one task).

    `name_types` (name -> (written as an integer, where first seen)) is shared by every file of
    a directory: the integer 1 and the string "1" would both name task "1", so a column that
    writes one name both ways is refused rather than merged.
    """
    # Any row with a task column makes the file multi-task (not just the first row's), so rows
    # without one are errors rather than silently merged into one task.
    if column is None or not any(column in rec for rec in records):
        return None
    groups: dict[str, tuple[list, list]] = {}
    for rec, line in zip(records, lines, strict=True):
        name = task_name(rec, column, source, line)
        as_int = not isinstance(rec[column], str)
        first = name_types.get(name)
        if first is None:
            name_types[name] = (as_int, f"{source} {_at(line)}")
        elif first[0] != as_int:
            this, other = ("an integer", "a string") if as_int else ("a string", "an integer")
            raise data_error(
                f"task name {name!r} is written as {this} here but as {other} at "
                f"{first[1]}; both would name task {name!r}. Write each task name one way (all "
                f"strings, or all integer labels)", source=source, line=line, field=column)
        groups.setdefault(name, ([], []))
        groups[name][0].append(rec)
        groups[name][1].append(line)
    return groups


def _files_in(path: Path) -> list[Path]:
    """The task files of a directory, by name. Anything else (another suffix, a compressed
    file, a sub-directory) is refused rather than skipped: a task left out without a word
    changes the pool. Hidden entries (.DS_Store, .cache/, editor files) are skipped; the
    library writes nothing else into a task directory."""
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and p.suffix in SUFFIXES]
    other = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in files]
    if other:
        more = f" and {len(other) - 10} more" if len(other) > 10 else ""
        raise data_error(
            f"not task files: {other[:10]}{more}; a task directory holds only "
            f"{', '.join(SUFFIXES)} files (suffixes in lower case; decompress .gz files, and "
            f"convert CSV to JSON Lines or Parquet). Move the others out of the directory, or "
            f"rename them", source=str(path))
    if not files:
        raise data_error(f"no task files ({', '.join(SUFFIXES)}) in the directory",
                         source=str(path))
    return files


def _directory_tasks(path: Path, columns: Mapping[str, str] | None, kind: str | None,
                     task_column: str | None, metric: str | None) -> list[Task]:
    """The tasks of a directory: a file without the task column is one task named after the
    file; the rows of files with one are grouped by it, and a task found in several files
    (FLAN-style shards) gets all their rows, in file then line order."""
    loaded = [(file, *read_records(file)) for file in _files_in(path)]
    # A mapped column need only be in some of the files (an optional field such as `id`).
    dir_columns = set().union(*(r.keys() for _, records, _ in loaded for r in records))
    name_types: dict[str, tuple[bool, str]] = {}
    # In pool order: ("file", file, records, lines) for a whole-file task, ("column", name)
    # for a task of the task column, whose parts (file, records, lines) are in `parts`.
    order: list[tuple] = []
    parts: dict[str, list[tuple[Path, list, list]]] = {}
    for file, records, lines in loaded:
        groups = _group_by_task(records, lines, task_column, str(file), name_types)
        if groups is None:
            order.append(("file", file, records, lines))
            continue
        for name, (recs, lns) in groups.items():
            if name not in parts:
                parts[name] = []
                order.append(("column", name))
            parts[name].append((file, recs, lns))
    # Merging a whole file into a task column's task of the same name would be a guess.
    for entry in order:
        if entry[0] == "file" and entry[1].stem in parts:
            file, other = entry[1], parts[entry[1].stem][0][0]
            raise data_error(
                f"task {file.stem!r} is both this whole file (it has no {task_column!r} column) "
                f"and rows of the {task_column!r} column of {other}; rename the file, or give it "
                f"the task column", source=str(file))
    built = []
    for entry in order:
        if entry[0] == "file":
            _, file, records, lines = entry
            built.append(task_from_records(file.stem, records, lines, str(file), columns, kind,
                                           metric, dir_columns))
        elif len(parts[entry[1]]) == 1:
            (file, recs, lns), = parts[entry[1]]
            built.append(task_from_records(entry[1], recs, lns, str(file), columns, kind,
                                           metric, dir_columns))
        else:
            built.append(_merged_task(entry[1], parts[entry[1]], path, columns, kind, metric,
                                      dir_columns))
    return built


def _merged_task(name: str, parts: list[tuple[Path, list, list]], path: Path,
                 columns: Mapping[str, str] | None, kind: str | None, metric: str | None,
                 dir_columns: set[str]) -> Task:
    """One task from its rows in several files. Columns resolve per file (shards may name them
    differently); every row is labelled with its file, so errors point at the right one."""
    rows: list[dict] = []
    labels: list[str] = []
    task_kind: str | None = None
    first: Path | None = None
    for file, recs, lns in parts:
        part_kind, part_rows = _task_rows(recs, str(file), columns, kind, dir_columns)
        if task_kind is None:
            task_kind, first = part_kind, file
        elif part_kind != task_kind:
            raise data_error(
                f"the task is {part_kind} here but {task_kind} in {first}; give every file the "
                f"same columns for it, or pass kind=", task=name, source=str(file))
        rows.extend(part_rows)
        labels.extend(f"{file} {_at(line)}" for line in lns)
    # The labels carry the files; the task's source (provenance, manifests) is the directory.
    assert task_kind is not None  # parts holds two or more files (see _directory_tasks)
    task = make_task(name, task_kind, rows, metric=metric, lines=labels)
    return dataclasses.replace(task, source=f"{path} ({len(parts)} files)")


def load_task_files(path: str | os.PathLike, *, columns: Mapping[str, str] | None = None,
                    kind: str | None = None, task_column: str | None = "task",
                    split: SplitSpec = SplitSpec(), metric: str | None = None,
                    tasks: Sequence[str] | None = None) -> TaskPool:
    """Loads a task pool from local JSON Lines / Parquet files.

    A file with a `task_column` (on any row) holds several tasks: its rows are grouped by that
    column, tasks in order of first appearance. A file without one is one task named after the
    file (without suffix). A directory is read file by file (by name) under the same rule, and
    a task named in several files (e.g. FLAN-style shards) gets the rows of all of them, in file
    then line order.

    Args:
      path: a directory or a single file. A directory may hold only `.jsonl`, `.json` and
        `.parquet` files (hidden files are skipped; anything else is an error).
      columns: our field -> the file's column, e.g. `{"prompt": "inputs", "target": "targets"}`.
        Fields: prompt, target, choices, answer (0-based index or choice text), id, references.
        Unmapped fields fall back to `DEFAULT_COLUMNS`. A multiple-choice row's target, if
        given, must be choices[answer].
      kind: "generate" or "multiple_choice" for every task; default: multiple choice when a
        choices column exists.
      task_column: the column naming the task (None: every file is one task, whatever its
        columns). The integer 1 and the string "1" may not both name a task.
      split: the split fractions and seed.
      metric: the metric of every task (default by kind).
      tasks: keep only these task names (in this order); a list, even for one task.

    Returns:
      A `TaskPool`.

    Raises:
      DataError: bad arguments, files of another type in a directory, missing columns, empty
        tasks, duplicate task names, answers not among the choices, undecodable text; the
        message names the file, task, field and line.

    Example:
      >>> pool = load_task_files("data/tasks/", columns={"prompt": "inputs", "target": "targets"})
      >>> pool.train("my_task")[0]["prompt"]
    """
    # Arguments before any file is read, so that a typo is named as such.
    _check_kind(kind)
    columns = _check_columns(columns) or None
    if task_column is not None and (not isinstance(task_column, str) or not task_column):
        raise data_error(f"task_column must be a column name (a non-empty string) or None, got "
                         f"{task_column!r}")
    if tasks is not None:
        tasks = check_names(tasks, "tasks")
    path = Path(path)
    if not path.exists():
        raise data_error("no such file or directory", source=str(path))
    if path.is_dir():
        built = _directory_tasks(path, columns, kind, task_column, metric)
    else:
        records, lines = read_records(path)
        groups = _group_by_task(records, lines, task_column, str(path), {})
        if groups is None:
            built = [task_from_records(path.stem, records, lines, str(path), columns, kind,
                                       metric)]
        else:
            file_columns = set().union(*(r.keys() for r in records))
            built = [task_from_records(name, recs, lns, str(path), columns, kind, metric,
                                       file_columns) for name, (recs, lns) in groups.items()]
    pool = TaskPool(built, split)
    if tasks is not None:
        missing = [n for n in tasks if n not in pool]
        if missing:
            raise data_error(f"tasks not found: {missing}; available: {list(pool.names)}",
                             source=str(path))
        pool = pool.select(tasks)
    return pool
