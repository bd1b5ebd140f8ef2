"""Write a sampled mixture to JSON Lines with a manifest, so any trainer can consume it.

`mixture.jsonl` holds one example per line in training order (task, id, prompt, target, choices,
answer, and the task's benchmark canary string where it has one); `manifest.json` records
what produced it: weights, counts, the seed, the split spec, repeated tasks, each task's source
and a hash of its content, the file's SHA-256, and every canary of the tasks inside. Benchmark
data (BIG-bench) must stay inside a run directory: the canary travels with every line of it, so
that crawlers and contamination filters find it even in a copied fragment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from taskpgm_jax.data.sampling import MixtureSample
from taskpgm_jax.data.tasks import DataError, TaskPool, _example_key, data_error

if TYPE_CHECKING:  # datasets is imported where a mixture is read back
    import datasets

__all__ = ["FORMAT", "load_materialized", "materialize_mixture", "task_fingerprint"]

FORMAT = "taskpgm-mixture/1"
_FIELDS = ("id", "prompt", "target", "choices", "answer")


def _version() -> str:
    # The installed distribution's version; a source checkout that is not installed has none.
    from importlib import metadata

    try:
        return metadata.version("taskpgm-jax")
    except metadata.PackageNotFoundError:
        return "unknown"


def task_fingerprint(pool: TaskPool, name: str) -> str:
    """SHA-256 over a task's example contents in order: changes iff the data changes."""
    h = hashlib.sha256()
    cols = pool[name].examples[:]
    for values in zip(*(cols[k] for k in ("prompt", "target", "choices", "answer")), strict=True):
        h.update(_example_key(dict(zip(("prompt", "target", "choices", "answer"), values, strict=True))))
        h.update(b"\n")
    return h.hexdigest()


# The manifest's own entries, which `extra` may not replace.
_RESERVED = ("format", "file", "sha256", "rows", "seed", "split", "split_spec", "budget",
             "weights", "counts", "repeated", "tasks", "canaries", "created_by")


def _plain(value: Any) -> Any:
    """`json.dumps` fallback: NumPy scalars and arrays as Python numbers and lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"type {type(value).__name__} is not JSON-serialisable")


def _check_extra(extra: Any) -> dict[str, Any]:
    """`extra` as plain JSON values, checked before anything is written."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise data_error(f"extra must be a dict of manifest entries, got {type(extra).__name__}")
    out = {}
    for key, value in extra.items():
        if not isinstance(key, str):
            raise data_error(f"extra keys must be strings, got {key!r}")
        if key in _RESERVED:
            raise data_error(f"extra[{key!r}] would replace the manifest's own {key!r} entry; "
                             f"use another key (reserved: {', '.join(_RESERVED)})")
        try:
            out[key] = json.loads(json.dumps(value, default=_plain))
        except (TypeError, ValueError) as e:
            raise data_error(f"extra[{key!r}] cannot be written to JSON ({e}); pass numbers, "
                             f"strings, lists and dicts") from None
    return out


def _check_sample(pool: TaskPool, sample: MixtureSample) -> None:
    """The sample's rows exist in this pool's split: a sample drawn from another pool (another
    split seed, other data) would otherwise fail mid-write or write other examples."""
    missing = [n for n in sample.names if n not in pool]
    if missing:
        raise data_error(f"the sample names tasks that are not in the pool: {missing}")
    for name in sample.names:
        count = int(sample.counts.get(name, 0))
        rows = np.asarray(sample.indices.get(name, ()))
        if len(rows) != count:
            raise data_error(f"the sample counts {count} examples but holds {len(rows)} row "
                             "indices; pass a sample from `sample_mixture`", task=name)
        if not count:
            continue
        available = len(pool.indices(name, sample.split))
        drawn_from = sample.repeated.get(name, (count, available))[1]
        if int(rows.max()) >= available or int(rows.min()) < 0 or drawn_from != available:
            seen = f"; it was drawn from {drawn_from}" if drawn_from != available else ""
            raise data_error(
                f"the sample draws rows up to index {int(rows.max())} of its {sample.split!r} "
                f"split, which has {available} rows in this pool{seen}: the sample comes from "
                "another pool (another split seed or other data); sample it from this pool",
                task=name)


def _recover(out: Path) -> None:
    """Finishes or discards an overwrite that an interrupt cut short (see `materialize_mixture`):
    a `manifest.json.new` whose data file is in place is the new mixture, one whose data file
    is not is the start of a write that never replaced anything."""
    data_path, manifest_path = out / "mixture.jsonl", out / "manifest.json"
    pending = out / _PENDING
    if pending.exists():
        if _matches(pending, data_path):
            os.replace(pending, manifest_path)
        else:  # interrupted before the data file moved: the old pair is intact
            pending.unlink()
    for tmp in (out / "mixture.jsonl.tmp", out / "manifest.json.tmp"):
        tmp.unlink(missing_ok=True)


def _matches(manifest_path: Path, data_path: Path, data_sha: str | None = None) -> bool:
    """Whether `manifest_path` is a readable manifest recording `data_path`'s SHA-256."""
    try:
        manifest = json.loads(manifest_path.read_text())
        if data_sha is None:
            data_sha = hashlib.sha256(data_path.read_bytes()).hexdigest()
        return isinstance(manifest, dict) and manifest.get("sha256") == data_sha
    except (OSError, ValueError):
        return False


# The new manifest, complete, before the data file replaces the old one. Readers take it when
# the data file matches it (an interrupt came between the last two renames).
_PENDING = "manifest.json.new"


def materialize_mixture(pool: TaskPool, sample: MixtureSample, out_dir: str | os.PathLike, *,
                        extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes `mixture.jsonl` and `manifest.json` into `out_dir` (a run directory).

    An interrupted write (or overwrite) leaves either the previous mixture or the new one, never
    the new data beside the old manifest: the new manifest is written in full (as
    `manifest.json.new`) before the data file is replaced, and `load_materialized` and the next
    write complete such a cut-short swap.

    Args:
      pool: the pool the sample was drawn from.
      sample: from `sample_mixture`.
      out_dir: created if needed.
      extra: more JSON-serialisable entries for the manifest (e.g. the solver and its config);
        NumPy values become numbers and lists; the manifest's own keys are refused.
      overwrite: replace a mixture already written in `out_dir` (otherwise that raises).

    Returns:
      The path of `manifest.json`.

    Raises:
      DataError: tasks missing from the pool, a sample drawn from another pool (row indices
        its split does not have), a mixture already in `out_dir`, or an `extra` that is not
        JSON or reuses a manifest key; nothing is written then.

    Example:
      >>> s = sample_mixture(pool, weights, budget=25_000, seed=0)
      >>> materialize_mixture(pool, s, "runs/abc/mixture")
    """
    _check_sample(pool, sample)
    extra = _check_extra(extra)
    out = Path(out_dir)
    data_path, manifest_path = out / "mixture.jsonl", out / "manifest.json"
    if out.is_dir():
        _recover(out)
    existing = [p.name for p in (data_path, manifest_path) if p.exists()]
    if existing and not overwrite:
        raise data_error(f"{', '.join(existing)} already there; pass overwrite=True to replace "
                         "that mixture, or choose another directory", source=str(out))
    out.mkdir(parents=True, exist_ok=True)
    tmp = data_path.with_suffix(".jsonl.tmp")
    digest = hashlib.sha256()
    n_rows = 0
    try:
        with open(tmp, "wb") as f:
            for row in sample.rows(pool):
                record = {"task": row["task"], **{k: row[k] for k in _FIELDS}}
                if pool[row["task"]].canary:
                    record["canary"] = pool[row["task"]].canary
                line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
                f.write(line)
                digest.update(line)
                n_rows += 1

        drawn = [n for n in sample.names if sample.counts[n]]
        canaries = sorted({pool[n].canary for n in drawn if pool[n].canary})
        manifest = {
            "format": FORMAT,
            "file": data_path.name,
            "sha256": digest.hexdigest(),
            "rows": n_rows,
            "seed": sample.seed,
            "split": sample.split,
            "split_spec": dataclasses.asdict(pool.split_spec),
            "budget": sample.budget,
            "weights": dict(zip(sample.names, (float(w) for w in sample.weights), strict=True)),
            "counts": sample.counts,
            "repeated": {n: {"count": c, "available": a}
                         for n, (c, a) in sample.repeated.items()},
            "tasks": {n: {"source": pool[n].source, "kind": pool[n].kind,
                          "metric": pool[n].metric, "examples": len(pool[n]),
                          "available": int(len(pool.indices(n, sample.split))),
                          "content_sha256": task_fingerprint(pool, n)} for n in sample.names},
            "canaries": canaries,
            **extra,
        }
        manifest["created_by"] = f"taskpgm_jax {_version()}"
        manifest_tmp = manifest_path.with_suffix(".json.tmp")
        manifest_tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False,
                                           default=_plain) + "\n")
    except BaseException:
        # The previous mixture is untouched so far; leave no partial files beside it.
        for path in (tmp, manifest_path.with_suffix(".json.tmp")):
            path.unlink(missing_ok=True)
        raise
    # Three renames; whatever an interrupt leaves, `_pick_manifest` pairs the data file with
    # the manifest that records its hash, and the next write finishes or discards the rest.
    os.replace(manifest_tmp, out / _PENDING)
    os.replace(tmp, data_path)
    os.replace(out / _PENDING, manifest_path)
    return manifest_path


def _read_manifest(path: Path) -> dict[str, Any]:
    """A manifest's entries, or a DataError naming the file and what is wrong with it."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise data_error(f"cannot read it ({e.strerror})", source=str(path)) from None
    except ValueError as e:  # JSONDecodeError and bad UTF-8 alike
        raise data_error(f"not valid JSON ({e}): the manifest is damaged; write the mixture "
                         "again (materialize_mixture(..., overwrite=True))",
                         source=str(path)) from None
    if not isinstance(manifest, dict):
        raise data_error(f"expected a JSON object of manifest entries, got "
                         f"{type(manifest).__name__}", source=str(path))
    bad = [k for k in ("file", "sha256") if not isinstance(manifest.get(k), str)]
    if bad:
        raise data_error(f"the manifest lacks {bad} (or they are not strings): not a "
                         f"{FORMAT} manifest, or a damaged one; write the mixture again",
                         source=str(path))
    return manifest


def load_materialized(out_dir: str | os.PathLike) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Reads a materialised mixture back, checking the file against its manifest.

    Returns:
      (dataset, manifest): a `datasets.Dataset` of the rows in order, and the manifest dict.
      Its `canary` column (when any task has one) is "" on the rows of tasks without one.

    Raises:
      DataError: the manifest is missing or damaged (naming it), its data file is missing, or
        the data file does not match its SHA-256.
    """
    import datasets

    from taskpgm_jax.data.sources.files import read_records

    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    manifest = None
    pending = out / _PENDING
    if pending.exists():
        # A write interrupted between its last two renames: the new data file is in place and
        # this manifest records it (the old manifest.json would not match it).
        try:
            candidate = _read_manifest(pending)
        except DataError:
            candidate = None
        if candidate is not None and _matches(pending, out / candidate["file"]):
            manifest, manifest_path = candidate, pending
    if manifest is None:
        if not manifest_path.exists():
            raise data_error("no manifest.json: not a materialised mixture", source=str(out))
        manifest = _read_manifest(manifest_path)
    data_path = out / manifest["file"]
    try:
        content = data_path.read_bytes()
    except OSError as e:
        raise data_error(f"cannot read the data file that {manifest_path.name} names "
                         f"({e.strerror})", source=str(data_path)) from None
    h = hashlib.sha256(content).hexdigest()
    if h != manifest["sha256"]:
        raise data_error(f"file content changed since it was written (sha256 {h[:12]}... != "
                         f"manifest {manifest['sha256'][:12]}...)", source=str(data_path))
    records, _ = read_records(data_path)
    # `from_list` takes its columns from the first row alone, and only rows of tasks with a
    # canary carry one: the columns are the union of every row's keys, "" where a row has none.
    keys = list(dict.fromkeys(k for r in records for k in r))
    columns = {k: [r.get(k, "") for r in records] for k in keys}
    return datasets.Dataset.from_dict(columns), manifest
