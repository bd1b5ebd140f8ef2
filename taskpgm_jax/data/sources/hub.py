"""Tasks from Hugging Face datasets (hub names, or any `datasets.load_dataset` builder).

A collection (FLAN-style) can hold many tasks in one dataset with a task-name column; a single
dataset can also be one task. Columns are mapped to the task fields as for local files. Offline
(tests, air-gapped clusters) a hub name that is not in the local cache fails with a message that
says how to point at local files instead.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from taskpgm_jax.data.sources.files import task_from_records, task_name
from taskpgm_jax.data.tasks import DataError, SplitSpec, Task, TaskPool, data_error

__all__ = ["HubSpec", "HubUnavailableError", "load_hub_tasks"]


class HubUnavailableError(DataError):
    """A hub dataset could not be loaded (offline, or no network, or no such dataset)."""


@dataclasses.dataclass(frozen=True)
class HubSpec:
    """One hub dataset to turn into one or more tasks.

    Attributes:
      path: the dataset name ("org/name") or a builder ("json", "parquet").
      name: the dataset config (e.g. a BBH task).
      split: which split of the dataset holds the examples.
      task: the task name when the dataset is one task (default: `name`, else the last part
        of `path`).
      task_column: the column naming the task when the dataset is a collection of tasks.
      columns: our field -> the dataset's column (see `load_task_files`).
      kind: "generate" / "multiple_choice" (default inferred from the columns).
      revision, data_files, cache_dir: passed to `datasets.load_dataset`.
    """

    path: str
    name: str | None = None
    split: str = "train"
    task: str | None = None
    task_column: str | None = None
    columns: Mapping[str, str] | None = None
    kind: str | None = None
    revision: str | None = None
    data_files: Any = None
    cache_dir: str | None = None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load(spec: HubSpec):
    import datasets

    try:
        return datasets.load_dataset(spec.path, spec.name, split=spec.split,
                                     revision=spec.revision, data_files=spec.data_files,
                                     cache_dir=spec.cache_dir)
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        where = f"{spec.path!r}" + (f" (config {spec.name!r})" if spec.name else "")
        mode = ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the dataset is not "
                "in the local cache" if _offline() else "the hub could not be reached or has no "
                "such dataset")
        raise HubUnavailableError(
            f"hub dataset {where}, split {spec.split!r}: {mode} ({type(e).__name__}: {e}). Either "
            f"load it once with network access (it is then cached), or export it to JSONL / "
            f"Parquet (one file per task, or one file with a task column) and use "
            f"taskpgm_jax.data.load_task_files(path, columns=...)") from e


def _spec_tasks(spec: HubSpec) -> list[Task]:
    ds = _load(spec)
    source = f"hub:{spec.path}" + (f"/{spec.name}" if spec.name else "") + f":{spec.split}"
    records = ds.to_list()
    if spec.task_column is None:
        name = spec.task or spec.name or spec.path.rstrip("/").split("/")[-1]
        return [task_from_records(name, records, list(range(1, len(records) + 1)), source,
                                  spec.columns, spec.kind, None)]
    if spec.task_column not in ds.column_names:
        raise data_error(f"no task column {spec.task_column!r}; columns: {ds.column_names}",
                         source=source, field=spec.task_column)
    groups: dict[str, tuple[list, list]] = {}
    for row, rec in enumerate(records, start=1):
        # Checked as in local files: a null would otherwise become a task named "None".
        name = task_name(rec, spec.task_column, source, row)
        groups.setdefault(name, ([], []))
        groups[name][0].append(rec)
        groups[name][1].append(row)
    return [task_from_records(n, recs, rows, source, spec.columns, spec.kind, None)
            for n, (recs, rows) in groups.items()]


def load_hub_tasks(specs: HubSpec | Mapping[str, Any] | Sequence[HubSpec | Mapping[str, Any]],
                   *, split: SplitSpec = SplitSpec()) -> TaskPool:
    """Loads tasks from Hugging Face datasets.

    Args:
      specs: one or more `HubSpec` (or dicts with its fields).
      split: split fractions and seed for the pool (the hub split chosen in each spec is the
        pool of examples; train / probe / eval are then made by hash as for every source).

    Returns:
      A `TaskPool`, tasks in spec order.

    Raises:
      HubUnavailableError: offline or unreachable, with how to use local files instead.
      DataError: missing columns, empty or duplicate tasks, bad answers (naming the row); a
        spec that is not a HubSpec or a dict of its fields (e.g. a bare dataset name), or a
        dict with an unknown field or no `path` (naming `specs[i]`), before anything is loaded.

    Example:
      >>> load_hub_tasks([HubSpec("lukaemon/bbh", "navigate", split="test",
      ...                         columns={"prompt": "input", "target": "target"})])
    """
    if isinstance(specs, (HubSpec, Mapping)):
        specs = [specs]
    if isinstance(specs, str) or not isinstance(specs, Iterable):
        raise DataError(f"specs must be a HubSpec, a dict of its fields, or a list of them; got "
                        f"{type(specs).__name__} {specs!r:.80}" + _spec_hint(specs))
    checked = [_as_spec(s, f"specs[{i}]") for i, s in enumerate(specs)]
    tasks: list[Task] = []
    for spec in checked:
        tasks.extend(_spec_tasks(spec))
    return TaskPool(tasks, split)


def _spec_hint(value: Any) -> str:
    return (f"; a dataset name goes in HubSpec({value!r}, ...) (or {{'path': {value!r}}})"
            if isinstance(value, str) else "")


def _as_spec(value: Any, name: str) -> HubSpec:
    """A `HubSpec`, or one built from a dict of its fields; a `DataError` naming `name` for
    anything else (a bare dataset name, an unknown field)."""
    if isinstance(value, HubSpec):
        return value
    if not isinstance(value, Mapping):
        raise DataError(f"{name} must be a HubSpec or a dict of its fields, got "
                        f"{type(value).__name__} {value!r:.80}" + _spec_hint(value))
    fields = [f.name for f in dataclasses.fields(HubSpec)]
    unknown = [k for k in value if k not in fields]
    if unknown or "path" not in value:
        what = f"unknown field(s) {unknown}" if unknown else "no 'path'"
        raise DataError(f"{name}: {what}; HubSpec fields are {fields} ('path' required)")
    return HubSpec(**value)
