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
from typing import Any

import numpy as np

from taskpgm_jax.data.sampling import MixtureSample
from taskpgm_jax.data.tasks import TaskPool, _example_key, data_error

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


def materialize_mixture(pool: TaskPool, sample: MixtureSample, out_dir: str | os.PathLike, *,
                        extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes `mixture.jsonl` and `manifest.json` into `out_dir` (a run directory).

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
      DataError: tasks missing from the pool, a mixture already in `out_dir`, or an `extra`
        that is not JSON or reuses a manifest key; nothing is written then.

    Example:
      >>> s = sample_mixture(pool, weights, budget=25_000, seed=0)
      >>> materialize_mixture(pool, s, "runs/abc/mixture")
    """
    missing = [n for n in sample.names if n not in pool]
    if missing:
        raise data_error(f"the sample names tasks that are not in the pool: {missing}")
    extra = _check_extra(extra)
    out = Path(out_dir)
    data_path, manifest_path = out / "mixture.jsonl", out / "manifest.json"
    existing = [p.name for p in (data_path, manifest_path) if p.exists()]
    if existing and not overwrite:
        raise data_error(f"{', '.join(existing)} already there; pass overwrite=True to replace "
                         "that mixture, or choose another directory", source=str(out))
    out.mkdir(parents=True, exist_ok=True)
    tmp = data_path.with_suffix(".jsonl.tmp")
    digest = hashlib.sha256()
    n_rows = 0
    with open(tmp, "wb") as f:
        for row in sample.rows(pool):
            record = {"task": row["task"], **{k: row[k] for k in _FIELDS}}
            if pool[row["task"]].canary:
                record["canary"] = pool[row["task"]].canary
            line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
            f.write(line)
            digest.update(line)
            n_rows += 1
    os.replace(tmp, data_path)  # a reader never sees a half-written file

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
        "repeated": {n: {"count": c, "available": a} for n, (c, a) in sample.repeated.items()},
        "tasks": {n: {"source": pool[n].source, "kind": pool[n].kind, "metric": pool[n].metric,
                      "examples": len(pool[n]),
                      "available": int(len(pool.indices(n, sample.split))),
                      "content_sha256": task_fingerprint(pool, n)} for n in sample.names},
        "canaries": canaries,
        **extra,
    }
    manifest["created_by"] = f"taskpgm_jax {_version()}"
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False, default=_plain) + "\n")
    os.replace(tmp, manifest_path)
    return manifest_path


def load_materialized(out_dir: str | os.PathLike):
    """Reads a materialised mixture back, checking the file against its manifest.

    Returns:
      (dataset, manifest): a `datasets.Dataset` of the rows in order, and the manifest dict.
      Its `canary` column (when any task has one) is "" on the rows of tasks without one.

    Raises:
      DataError: the manifest is missing or the data file does not match its SHA-256.
    """
    import datasets

    from taskpgm_jax.data.sources.files import read_records

    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise data_error("no manifest.json: not a materialised mixture", source=str(out))
    manifest = json.loads(manifest_path.read_text())
    data_path = out / manifest["file"]
    h = hashlib.sha256(data_path.read_bytes()).hexdigest()
    if h != manifest["sha256"]:
        raise data_error(f"file content changed since it was written (sha256 {h[:12]}... != "
                         f"manifest {manifest['sha256'][:12]}...)", source=str(data_path))
    records, _ = read_records(data_path)
    # `from_list` takes its columns from the first row alone, and only rows of tasks with a
    # canary carry one: the columns are the union of every row's keys, "" where a row has none.
    keys = list(dict.fromkeys(k for r in records for k in r))
    columns = {k: [r.get(k, "") for r in records] for k in keys}
    return datasets.Dataset.from_dict(columns), manifest
