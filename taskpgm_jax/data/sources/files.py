"""Tasks from local files: a directory of JSONL / Parquet files (one per task), or one file with a
task column.

JSON Lines are decoded here line by line rather than by `datasets`' JSON builder, because the
builder reports a bad byte or a broken line without its line number, and a user with a 100k-line
file needs the number. Parquet is read with pyarrow (the format `datasets` itself stores).
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from taskpgm_jax.data.tasks import SplitSpec, Task, TaskPool, check_names, data_error, make_task

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
}
SUFFIXES = (".jsonl", ".json", ".parquet")


def read_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int | str]]:
    """Reads a JSON Lines or Parquet file into records and their line (row) numbers.

    Args:
      path: a `.jsonl` / `.json` (JSON Lines, or a `.json` holding one array of objects) or a
        `.parquet` file.

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
    records, lines = [], []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise data_error(f"undecodable text: byte {e.start} is not valid UTF-8",
                                 source=str(path), line=line_no) from None
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


def _read_json_array(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
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
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise data_error(f"not valid JSON ({e.msg} at column {e.colno})", source=str(path),
                         line=e.lineno) from None
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, dict):
            raise data_error(f"array element {i} is a {type(rec).__name__}, not an object",
                             source=str(path))
    return records, [f"element {i}" for i in range(1, len(records) + 1)]


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    import pyarrow.parquet as pq

    records = pq.read_table(path).to_pylist()
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


def _resolve_columns(present: set[str], columns: Mapping[str, str] | None, source: str,
                     kind: str | None, file_columns: set[str] | None = None) -> dict[str, str]:
    """Our field -> the file's column, from the user's mapping or the defaults. `present`: the
    task's columns; `file_columns`: the whole file's (default `present`), which every column
    the user maps must be among."""
    columns = dict(columns or {})
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


def task_from_records(name: str, records: list[dict], lines: Sequence[int | str], source: str,
                       columns: Mapping[str, str] | None, kind: str | None,
                       metric: str | None, file_columns: set[str] | None = None) -> Task:
    """One task from its records; `file_columns`: the columns of the whole source when it
    holds several tasks (a file with a task column, a directory of files): a mapped column
    need only be in some of them."""
    if not records:
        raise data_error("the task has no examples", task=name, source=source)
    present = set().union(*(r.keys() for r in records))
    cols = _resolve_columns(present, columns, source, kind, file_columns)
    kind = cols.pop("_kind")
    rows = [{field: rec.get(col) for field, col in cols.items()} for rec in records]
    return make_task(name, kind, rows, metric=metric, source=source, lines=lines)


def task_name(record: Mapping[str, Any], column: str, source: str, line: int | str) -> str:
    """The task name in a record's task column; an error naming the line if it has none.
    Integer labels (e.g. a Hugging Face ClassLabel column) name their task by the number."""
    name = record.get(column)
    if isinstance(name, numbers.Integral) and not isinstance(name, bool):
        return str(name)
    if not isinstance(name, str) or not name:
        raise data_error(f"missing or empty task name (got {name!r}); with a task column, every "
                         f"row needs a task name string there", source=source, line=line,
                         field=column)
    return name


def _files_in(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise data_error(f"no task files ({', '.join(SUFFIXES)}) in the directory",
                         source=str(path))
    return files


def load_task_files(path: str | os.PathLike, *, columns: Mapping[str, str] | None = None,
                    kind: str | None = None, task_column: str = "task",
                    split: SplitSpec = SplitSpec(), metric: str | None = None,
                    tasks: Sequence[str] | None = None) -> TaskPool:
    """Loads a task pool from local JSON Lines / Parquet files.

    A directory holds one file per task and the file name (without suffix) is the task name; a
    single file either has a `task_column` (rows grouped by it, tasks in order of first
    appearance) or is one task named after the file.

    Args:
      path: a directory or a single file.
      columns: our field -> the file's column, e.g. `{"prompt": "inputs", "target": "targets"}`.
        Fields: prompt, target, choices, answer (index or choice text), id, references. Unmapped
        fields fall back to `DEFAULT_COLUMNS`.
      kind: "generate" or "multiple_choice" for every task; default: multiple choice when a
        choices column exists.
      task_column: the column naming the task in a single file.
      split: the split fractions and seed.
      metric: the metric of every task (default by kind).
      tasks: keep only these task names (in this order); a list, even for one task.

    Returns:
      A `TaskPool`.

    Raises:
      DataError: missing columns, empty tasks, duplicate task names, answers not among the
        choices, undecodable text; the message names the file, task, field and line.

    Example:
      >>> pool = load_task_files("data/tasks/", columns={"prompt": "inputs", "target": "targets"})
      >>> pool.train("my_task")[0]["prompt"]
    """
    if tasks is not None:
        tasks = check_names(tasks, "tasks")
    path = Path(path)
    if not path.exists():
        raise data_error("no such file or directory", source=str(path))
    built: list[Task] = []
    if path.is_dir():
        loaded = [(file, *read_records(file)) for file in _files_in(path)]
        # A mapped column need only be in some of the files (an optional field such as `id`).
        dir_columns = set().union(*(r.keys() for _, records, _ in loaded for r in records))
        for file, records, lines in loaded:
            built.append(task_from_records(file.stem, records, lines, str(file), columns, kind,
                                            metric, dir_columns))
    else:
        records, lines = read_records(path)
        # Any row with a task column makes the file multi-task (not just the first row's),
        # so rows without one are errors rather than silently merged into one task.
        if any(task_column in rec for rec in records):
            file_columns = set().union(*(r.keys() for r in records))
            groups: dict[str, tuple[list, list]] = {}
            for rec, line in zip(records, lines, strict=True):
                name = task_name(rec, task_column, str(path), line)
                groups.setdefault(name, ([], []))
                groups[name][0].append(rec)
                groups[name][1].append(line)
            for name, (recs, lns) in groups.items():
                built.append(task_from_records(name, recs, lns, str(path), columns, kind, metric,
                                               file_columns))
        else:
            built.append(task_from_records(path.stem, records, lines, str(path), columns, kind,
                                            metric))
    pool = TaskPool(built, split)
    if tasks is not None:
        missing = [n for n in tasks if n not in pool]
        if missing:
            raise data_error(f"tasks not found: {missing}; available: {list(pool.names)}",
                             source=str(path))
        pool = pool.select(tasks)
    return pool
