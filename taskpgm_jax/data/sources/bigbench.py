"""BIG-bench tasks, read straight from the `bigbench` source distribution on PyPI.

The JSON tasks ship inside `bigbench-1.0.0.tar.gz` (about 360 MB). `fetch_bigbench` downloads it
once into a cache directory (verifying its SHA-256) and writes a small index of the archive:
where each `benchmark_tasks/**/task.json` starts in the uncompressed stream, plus its name,
keywords and description. Loading then reads only the requested members, in one forward pass
through the gzip stream, and never unpacks the archive. The package itself is not installed
(its dependencies are heavy; `pip download` even fails while preparing its metadata), which is
why the file comes from the package index directly.

Prompt format, as BIG-bench's JSON tasks define it (zero-shot):
`task_prefix + example_input_prefix + input [+ choice_prefix + choice_prefix.join(choices)]
+ example_output_prefix`, with defaults "\\nQ: ", "\\nA: ", "\\n  choice: ", the choices of any
example with `target_scores` appended (generative tasks' too, as BIG-bench formats them) unless
`append_choices_to_input` is false. BIG-bench lists the appended choices in a seeded
permutation; here they keep the file's order. A multiple-choice example's answer is its first
highest-scored choice, which is also the target of a generative example without a `target`;
its `choice_scores` keep every choice's score, which multiple_choice_grade credits as BIG-bench
does (the chosen choice's score: several choices may be correct).

Canary: every BIG-bench task carries a canary string. It is kept on each `Task` and written into
every manifest of data drawn from it; never copy BIG-bench examples outside a run directory.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import sys
import tarfile
import urllib.request
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from taskpgm_jax._atomic import write_text_atomic
from taskpgm_jax.data.tasks import (
    DataError,
    SplitSpec,
    Task,
    TaskPool,
    check_names,
    data_error,
    make_task,
)

__all__ = [
    "BBH_MISSING", "BBH_SOURCES", "BIGBENCH_SHA256", "BIGBENCH_VERSION", "TaskSelectionError",
    "archive_index", "bbh_names", "convert_task", "default_cache_dir", "fetch_bigbench",
    "load_bigbench", "main",
]

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_TASKS_DIR = "bigbench/benchmark_tasks/"
_INDEX_FORMAT = 1
_SUITE = "bbh"
# What a damaged .tar.gz raises while it is read: a cut-off stream (EOFError), bytes that are not
# gzip (tarfile.ReadError), a bad CRC or length (BadGzipFile), corrupt deflate data (zlib.error).
_DAMAGED = (EOFError, tarfile.TarError, gzip.BadGzipFile, zlib.error)


class TaskSelectionError(DataError):
    """Task names or keywords that select no task or the wrong ones (not a malformed task file):
    `load_pools` re-raises it as a `ConfigError` naming the config key."""


def _damaged(archive: Path, e: BaseException) -> DataError:
    return DataError(f"{archive}: not a complete gzip archive ({type(e).__name__}: {e}); delete "
                     "it and run `taskpgm data fetch bigbench` (or fetch_bigbench())")

# BIG-Bench Hard task -> its BIG-bench source task.
BBH_SOURCES: dict[str, str] = {
    "boolean_expressions": "boolean_expressions",
    "causal_judgement": "causal_judgment",
    "date_understanding": "date_understanding",
    "disambiguation_qa": "disambiguation_qa",
    "dyck_languages": "dyck_languages",
    "formal_fallacies": "formal_fallacies_syllogisms_negation",
    "geometric_shapes": "geometric_shapes",
    "hyperbaton": "hyperbaton",
    "logical_deduction_five_objects": "logical_deduction/five_objects",
    "logical_deduction_seven_objects": "logical_deduction/seven_objects",
    "logical_deduction_three_objects": "logical_deduction/three_objects",
    "movie_recommendation": "movie_recommendation",
    "multistep_arithmetic_two": "multistep_arithmetic",
    "navigate": "navigate",
    "object_counting": "object_counting",
    "penguins_in_a_table": "penguins_in_a_table",
    "reasoning_about_colored_objects": "reasoning_about_colored_objects",
    "ruin_names": "ruin_names",
    "salient_translation_error_detection": "salient_translation_error_detection",
    "snarks": "snarks",
    "sports_understanding": "sports_understanding",
    "temporal_sequences": "temporal_sequences",
    "tracking_shuffled_objects_five_objects": "tracking_shuffled_objects/five_objects",
    "tracking_shuffled_objects_seven_objects": "tracking_shuffled_objects/seven_objects",
    "tracking_shuffled_objects_three_objects": "tracking_shuffled_objects/three_objects",
    "web_of_lies": "web_of_lies",
    "word_sorting": "word_sorting",
}
# BBH tasks whose BIG-bench source is a programmatic task (task.py generates the examples), so
# bigbench 1.0.0 has no JSON for them. `bbh_names` recomputes this from the archive.
BBH_MISSING: tuple[str, ...] = ("boolean_expressions", "multistep_arithmetic_two", "web_of_lies")


def default_cache_dir() -> Path:
    """`$TASKPGM_CACHE_DIR/bigbench`, else `~/.cache/taskpgm_jax/bigbench`."""
    root = os.environ.get("TASKPGM_CACHE_DIR") or Path.home() / ".cache" / "taskpgm_jax"
    return Path(root) / "bigbench"


def _archive_name(version: str) -> str:
    return f"bigbench-{version}.tar.gz"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _index_file_url(index_url: str, filename: str) -> tuple[str, str | None]:
    """The download URL and SHA-256 of a file, from a PEP 691 (JSON) simple index."""
    req = urllib.request.Request(f"{index_url.rstrip('/')}/bigbench/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        listing = json.load(resp)
    for f in listing.get("files", []):
        if f.get("filename") == filename:
            return f["url"], f.get("hashes", {}).get("sha256")
    raise FileNotFoundError(f"{filename} is not listed by {index_url}")


def fetch_bigbench(cache_dir: str | os.PathLike | None = None, *, version: str = BIGBENCH_VERSION,
                   index_url: str | None = None, force: bool = False) -> Path:
    """Downloads the BIG-bench source archive once into `cache_dir` and indexes it.

    Args:
      cache_dir: where the archive lives (default `default_cache_dir()`).
      version: the `bigbench` release (only 1.0.0 is verified against a pinned SHA-256).
      index_url: a PEP 691 package index (default `$PIP_INDEX_URL` or https://pypi.org/simple).
      force: download again even when a verified archive is present.

    Returns:
      The archive's path.

    Raises:
      OSError / urllib errors: no network; the message says where to put the file by hand.
      ValueError: the download does not match its SHA-256.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / _archive_name(version)
    pinned = BIGBENCH_SHA256 if version == BIGBENCH_VERSION else None
    if target.exists() and not force and (
            pinned is None or target.stat().st_size and _sha256(target) == pinned):
        try:
            archive_index(target)
            return target
        except DataError:  # no pinned hash to check it by and it does not read: fetch again
            if pinned is not None:
                raise
    index_url = index_url or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    tmp = target.with_suffix(".part")
    try:
        url, listed = _index_file_url(index_url, target.name)
        with urllib.request.urlopen(url, timeout=120) as resp, open(tmp, "wb") as out:
            for block in iter(lambda: resp.read(1 << 22), b""):
                out.write(block)
    except (OSError, ValueError) as e:  # ValueError: an index that does not speak PEP 691 JSON
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not download {target.name} from {index_url} ({e}). On a machine "
                      f"with network, download it from https://pypi.org/project/bigbench/"
                      f"{version}/#files (the sdist; `pip download` fails while building its "
                      f"metadata) and place it at {target}") from e
    got = _sha256(tmp)
    for want in {listed, pinned} - {None}:
        if got != want:
            tmp.unlink()
            raise ValueError(f"{target.name}: SHA-256 {got} does not match the expected {want}")
    os.replace(tmp, target)
    archive_index(target)
    return target


def _members(archive: Path) -> Iterable[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            yield tar, m
        # The tar ends before the gzip stream does: reading the rest (padding, cheap) makes gzip
        # check its CRC-32 and length, so a cut-off or corrupted archive is never indexed.
        while tar.fileobj.read(1 << 20):
            pass


def _task_path(member_name: str) -> str | None:
    """'bigbench-1.0.0/bigbench/benchmark_tasks/a/b/task.json' -> 'a/b'."""
    _, _, rest = member_name.partition("/")
    if not rest.startswith(_TASKS_DIR) or not rest.endswith("/task.json"):
        return None
    return rest[len(_TASKS_DIR):-len("/task.json")]


def archive_index(archive: str | os.PathLike) -> dict[str, Any]:
    """The archive's task index, built by one pass over it and cached beside it as JSON.

    Returns:
      {"tasks": {path: {"offset", "size", "name", "keywords", "description", "examples"}},
       "programmatic": [paths with a task.py and no task.json]}. Paths are "navigate" or
      "logical_deduction/three_objects"; a container task (sub-tasks only) has examples 0.

    Raises:
      FileNotFoundError: no archive (the message says how to fetch it).
      DataError: a cut-off or corrupted archive (checked against gzip's CRC-32 while indexing;
        the message says to delete it and fetch again), or an unreadable task.json.
    """
    archive = Path(archive)
    if not archive.exists():
        raise FileNotFoundError(f"{archive}: no BIG-bench archive; run `taskpgm data fetch "
                                f"bigbench` (or fetch_bigbench()) first")
    side = archive.with_name(archive.name + ".index.json")
    stat = archive.stat()
    # Size and mtime alone miss an archive replaced by another of the same size within the
    # clock's resolution (then the old offsets and sizes read garbage); gzip's trailer, the
    # CRC-32 and length of the whole uncompressed tar, tells any two contents apart for 8 bytes.
    with open(archive, "rb") as f:
        f.seek(max(stat.st_size - 8, 0))
        trailer = f.read(8).hex()
    stamp = [_INDEX_FORMAT, stat.st_size, stat.st_mtime_ns, trailer]
    index = _read_index(side)
    if index is not None and index.get("stamp") == stamp:
        return index
    tasks, code, unreadable = {}, set(), None
    try:
        for tar, m in _members(archive):
            _, _, rest = m.name.partition("/")
            if rest.startswith(_TASKS_DIR) and rest.endswith("/task.py"):
                code.add(rest[len(_TASKS_DIR):-len("/task.py")])
            path = _task_path(m.name)
            if path is None or not m.isfile():
                continue
            try:
                member = tar.extractfile(m)
                assert member is not None  # a regular file (m.isfile() above)
                data = json.loads(member.read())
                if not isinstance(data, dict):
                    raise TypeError(f"a JSON {type(data).__name__}, not an object")
            except (ValueError, TypeError) as e:  # ValueError: JSON or UTF-8 decoding
                # Raised once the whole stream has passed gzip's check: a corrupted archive
                # then says so rather than blame one of its members.
                unreadable = unreadable or data_error(f"unreadable task.json ({e})", task=path,
                                                      source=f"{archive}:{m.name}")
                continue
            # Malformed metadata is indexed as absent; loading the task names the field.
            keywords, description = data.get("keywords"), data.get("description")
            examples = data.get("examples")
            tasks[path] = {"offset": m.offset_data, "size": m.size,
                           "name": data.get("name", path),
                           "keywords": list(keywords) if _is_names(keywords) else [],
                           "description": description if isinstance(description, str) else "",
                           # Not a list: counted so that loading it names the field.
                           "examples": (len(examples) if isinstance(examples, (list, dict))
                                        else int(examples is not None))}
    except _DAMAGED as e:
        raise _damaged(archive, e) from e
    if unreadable is not None:
        raise unreadable
    index = {"stamp": stamp, "tasks": tasks, "programmatic": sorted(code - set(tasks))}
    _write_index(side, index)
    return index


def _is_names(value: Any) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _read_index(side: Path) -> dict[str, Any] | None:
    """The cached index, or None when there is none or it does not read (written by a run that
    was killed before the atomic write existed, or edited by hand): it is then rebuilt."""
    try:
        index = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(index, dict) and isinstance(index.get("tasks"), dict) \
        and isinstance(index.get("programmatic"), list)
    return index if ok else None


def _write_index(side: Path, index: dict[str, Any]) -> None:
    # A temporary file renamed into place: a run killed mid-write leaves the old index or none,
    # never half of one.
    try:
        write_text_atomic(side, json.dumps(index))
    except OSError:  # a read-only cache still works, it just re-indexes next time
        pass


def _read_members(archive: Path, entries: dict[str, dict]) -> dict[str, bytes]:
    """Reads several members in one forward pass (gzip cannot seek backwards cheaply)."""
    out = {}
    try:
        with gzip.open(archive, "rb") as f:
            for path, e in sorted(entries.items(), key=lambda kv: kv[1]["offset"]):
                f.seek(e["offset"])
                out[path] = f.read(e["size"])
                if len(out[path]) != e["size"]:
                    raise EOFError(f"the stream ends inside {_TASKS_DIR}{path}/task.json")
    except _DAMAGED as e:
        raise _damaged(archive, e) from e
    return out


def _prompt(example: dict, fmt: dict, choices: Sequence[str] | None) -> str:
    text = example["input"]
    if choices is not None and fmt["append_choices"]:
        text = text + fmt["choice_prefix"] + fmt["choice_prefix"].join(choices)
    return fmt["task_prefix"] + fmt["input_prefix"] + text + fmt["output_prefix"]


# (key in the format, task.json field, BIG-bench's default)
_PREFIXES = (("task_prefix", "task_prefix", ""), ("input_prefix", "example_input_prefix", "\nQ: "),
             ("output_prefix", "example_output_prefix", "\nA: "),
             ("choice_prefix", "choice_prefix", "\n  choice: "))


def convert_task(data: dict, path: str, source: str) -> Task:
    """Turns one BIG-bench task.json (already parsed) into a `Task`.

    Args:
      data: the parsed JSON.
      path: the task's path ("navigate", "logical_deduction/three_objects"): its name.
      source: provenance for errors and manifests.

    Returns:
      A multiple-choice task when its preferred score is `multiple_choice_grade` (or it has only
      `target_scores`), else a generative one.

    Raises:
      DataError: no examples, an example without input/target/target_scores, no correct choice,
        a prefix field that is not a string, or a description or canary that is not a string
        (keywords: not a list of strings); null metadata reads as left out.
    """
    examples = data.get("examples") or []
    if not examples:
        raise data_error("no examples (a container of sub-tasks? name one, e.g. "
                         f"'{path}/<subtask>')", task=path, source=source, field="examples")
    if not isinstance(examples, list):
        raise data_error(f"expected a list of example objects, got {type(examples).__name__}",
                         task=path, source=source, field="examples")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise data_error(f"expected an object with input and target or target_scores, got "
                             f"{type(ex).__name__} {ex!r:.60}", task=path,
                             source=source, line=f"example {i}", field="examples")
    fmt = {"append_choices": data.get("append_choices_to_input", True)}
    for key, field, default in _PREFIXES:
        value = data.get(field, default)
        # BIG-bench itself fails on a null prefix (and prints "None" for a null task_prefix);
        # no task in 1.0.0 has a non-string one, so one here is an edited file.
        if not isinstance(value, str):
            raise data_error(f"must be a string, got {json.dumps(value)}; leave the field out "
                             f"for BIG-bench's default {default!r}", task=path, source=source,
                             field=field)
        fmt[key] = value
    preferred = data.get("preferred_score", "")
    all_scores = all("target_scores" in ex for ex in examples)
    all_targets = all("target" in ex for ex in examples)
    if preferred == "multiple_choice_grade" or (all_scores and not all_targets):
        kind = "multiple_choice"
    else:
        kind = "generate"
    rows = []
    for i, ex in enumerate(examples):
        def fail(msg, field, i=i):
            return data_error(msg, task=path, source=source, line=f"example {i}", field=field)

        if not isinstance(ex.get("input"), str):
            raise fail("missing or non-string input", "input")
        scores = ex.get("target_scores")
        if kind == "multiple_choice":
            if not isinstance(scores, dict) or len(scores) < 2:
                raise fail("a multiple-choice example needs target_scores with 2+ choices",
                           "target_scores")
            choices, best = list(scores), _best_choice(scores, fail)
            if best is None:
                raise fail("no correct choice (all target_scores equal)", "target_scores")
            # Every choice's score: multiple_choice_grade credits the chosen one's, as
            # BIG-bench does (several choices may be correct, or partly).
            rows.append({"prompt": _prompt(ex, fmt, choices), "choices": choices,
                         "answer": best, "choice_scores": [float(v) for v in scores.values()],
                         "id": f"{path}:{i}"})
        else:
            # As BIG-bench formats every example: its target_scores' choices are shown in the
            # prompt (unless append_choices_to_input is false) whatever the task's metric, and
            # without a target the highest-scored choice is the target.
            shown = list(scores) if isinstance(scores, dict) and scores else None
            target = ex.get("target")
            if target is None and shown is not None:
                best = _best_choice(scores, fail)
                target = shown[0 if best is None else best]
            if isinstance(target, str):
                refs = [target]
            elif isinstance(target, list) and target and all(isinstance(r, str) for r in target):
                refs = list(target)
            else:
                got = "none" if target is None else f"{type(target).__name__} {target!r}"
                raise fail(f"the target must be a string or a non-empty list of strings, got "
                           f"{got}", "target")
            rows.append({"prompt": _prompt(ex, fmt, shown), "target": refs[0],
                         "references": refs, "id": f"{path}:{i}"})
    meta: dict[str, Any] = {}
    defaults: tuple[tuple[str, Any], ...] = (("description", ""), ("canary", ""), ("keywords", []))
    for field, default in defaults:
        # null reads as the field left out (BIG-bench's schema wants a string, or a list of
        # strings for keywords; its reader passes any value through).
        value = data.get(field)
        if value is None:
            value = default
        elif not (_is_names(value) if field == "keywords" else isinstance(value, str)):
            want = "a list of strings" if field == "keywords" else "a string"
            raise data_error(f"must be {want}, got {json.dumps(value)}; fix it or leave the "
                             f"field out", task=path, source=source, field=field)
        meta[field] = value
    # Examples are numbered from 0, as in the file's "examples" list (there are no lines).
    return make_task(path, kind, rows, metric=preferred or None, source=source,
                     description=meta["description"], keywords=meta["keywords"],
                     canary=meta["canary"], lines=[f"example {i}" for i in range(len(rows))])


def _best_choice(scores: dict, fail) -> int | None:
    """The index of the first highest-scored choice (None when all scores are equal), or the
    `fail(message, field)` error for scores that are not finite numbers."""
    try:
        values = [float(v) for v in scores.values()]
    except (TypeError, ValueError):
        raise fail(f"scores must be numbers, got {list(scores.values())!r}",
                   "target_scores") from None
    if not all(math.isfinite(v) for v in values):
        raise fail(f"scores must be finite, got {values}", "target_scores")
    return values.index(max(values)) if max(values) > min(values) else None


def bbh_names(index: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The BIG-bench paths of the BBH suite present as JSON, and the BBH tasks that are not."""
    present = [BBH_SOURCES[b] for b in BBH_SOURCES if index["tasks"].get(BBH_SOURCES[b], {})
               .get("examples")]
    missing = [b for b in BBH_SOURCES if BBH_SOURCES[b] not in present]
    return present, missing


def _resolve(index: dict[str, Any], names: Sequence[str] | None, suite: bool,
             keywords: Sequence[str] | None, archive: Path) -> list[str]:
    """The task paths `names` select (None: every JSON task). Keywords filter a suite (`suite`
    or None); a task named explicitly, alone or as a container's sub-tasks, is never dropped by
    them: one that lacks a keyword is refused."""
    tasks = index["tasks"]
    leaves = [p for p, e in tasks.items() if e["examples"]]
    want = set(keywords or ())

    def lacking(p):
        return not want <= set(tasks[p]["keywords"])

    if names is None:
        return [p for p in sorted(leaves) if not lacking(p)]
    chosen = []
    for n in names:
        subs = sorted(p for p in leaves if p.startswith(n + "/"))
        if n in tasks and tasks[n]["examples"]:
            chosen.append(n)
        elif subs:  # a container: all of its sub-tasks
            chosen.extend(subs)
        elif n in index["programmatic"]:
            raise TaskSelectionError(_where_task(
                "a programmatic BIG-bench task (examples generated by task.py); it has no JSON "
                "to read", n, archive))
        elif n == _SUITE:
            raise TaskSelectionError(f"{n!r} names the whole suite and must stand alone; list "
                                     "the tasks by path to combine some of them with others")
        else:
            raise TaskSelectionError(_where_task("no such BIG-bench JSON task", n, archive))
    chosen = list(dict.fromkeys(chosen))
    if suite:
        return [p for p in chosen if not lacking(p)]
    bad = [p for p in chosen if lacking(p)]
    if bad:
        shown = ", ".join(f"{p} {tasks[p]['keywords']}" for p in bad[:5])
        raise TaskSelectionError(
            f"tasks named explicitly lack keywords {sorted(want)}: {shown}"
            f"{' ...' if len(bad) > 5 else ''}. Keywords filter only a suite ('{_SUITE}' or "
            "every task); drop these tasks or the keywords")
    return chosen


def _where_task(message: str, task: str | None, archive: Path) -> str:
    return str(data_error(message, task=task, source=str(archive)))


def load_bigbench(names_or_suite: str | Sequence[str] | None = "bbh",
                  cache_dir: str | os.PathLike | None = None, *,
                  keywords: Sequence[str] | None = None, archive: str | os.PathLike | None = None,
                  split: SplitSpec = SplitSpec()) -> TaskPool:
    """Loads BIG-bench JSON tasks from the cached source archive.

    Args:
      names_or_suite: "bbh" (the BIG-Bench Hard sources that exist as JSON; see `BBH_MISSING`),
        a task path ("navigate", "logical_deduction/three_objects"; a container such as
        "logical_deduction" means all its sub-tasks), a list of them, or None for every JSON task.
        "bbh" must stand alone (["bbh"] is the suite too).
      cache_dir: where `fetch_bigbench` put the archive (default `default_cache_dir()`).
      keywords: keep only tasks carrying all these BIG-bench keywords. They filter a suite
        ("bbh" or None); a task named explicitly that lacks one is refused, not dropped.
      archive: an explicit archive path (overrides `cache_dir`).
      split: split fractions and seed.

    Returns:
      A `TaskPool` named by task path, each task's `source` "bigbench:<version>/<path>".

    Raises:
      FileNotFoundError: the archive is not in the cache (the message says how to fetch it).
      TaskSelectionError (a DataError): an unknown or programmatic task, "bbh" among other
        names, an empty list, a named task without the keywords, or nothing left to load.
      DataError: a damaged archive (the message says to delete it and fetch again), or a
        malformed task file.

    Example:
      >>> pool = load_bigbench(["navigate", "logical_deduction/three_objects"])
    """
    if keywords is not None:
        keywords = check_names(keywords, "keywords")
    given: str | list[str] | None
    if names_or_suite is None or isinstance(names_or_suite, str):
        given = names_or_suite
    else:
        given = list(check_names(names_or_suite, "names_or_suite"))
        if not given:
            raise TaskSelectionError("names_or_suite is an empty list, which selects no task; "
                                     f"name tasks, '{_SUITE}', or None for every JSON task")
        if given == [_SUITE]:
            given = _SUITE
    archive = (Path(archive) if archive is not None
               else (Path(cache_dir) if cache_dir is not None else default_cache_dir())
               / _archive_name(BIGBENCH_VERSION))
    index = archive_index(archive)
    names: list[str] | None
    if given == _SUITE:
        names = bbh_names(index)[0]
    else:
        names = [given] if isinstance(given, str) else given
    paths = _resolve(index, names, given is None or given == _SUITE, keywords, archive)
    if not paths:
        raise TaskSelectionError(_where_task(
            f"no BIG-bench task matches names={names_or_suite!r}, keywords={keywords!r}", None,
            archive))
    raw = _read_members(archive, {p: index["tasks"][p] for p in paths})
    version = archive.name.removeprefix("bigbench-").removesuffix(".tar.gz")
    tasks = []
    for p in paths:
        where = f"{archive}:{_TASKS_DIR}{p}/task.json"
        try:
            data = json.loads(raw[p].decode("utf-8"))
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, not an object")
        except (ValueError, TypeError) as e:  # ValueError: JSON or UTF-8 decoding
            raise data_error(f"unreadable task.json ({e})", task=p, source=where) from None
        tasks.append(convert_task(data, p, f"bigbench:{version}/{p}"))
    return TaskPool(tasks, split)


def main(argv: Sequence[str] | None = None) -> int:
    """`taskpgm data fetch bigbench [--cache-dir DIR] [--index-url URL] [--force]`."""
    parser = argparse.ArgumentParser(prog="taskpgm data fetch bigbench",
                                     description="Download the BIG-bench source archive once "
                                                 "into a cache directory and index its tasks.")
    parser.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
    parser.add_argument("--index-url", default=None, help="PEP 691 package index")
    parser.add_argument("--version", default=BIGBENCH_VERSION, help="bigbench release")
    parser.add_argument("--force", action="store_true", help="download even if cached")
    args = parser.parse_args(argv)
    path = fetch_bigbench(args.cache_dir, version=args.version, index_url=args.index_url,
                          force=args.force)
    index = archive_index(path)
    present, missing = bbh_names(index)
    n_json = sum(1 for e in index["tasks"].values() if e["examples"])
    print(f"{path}\n{n_json} JSON tasks; bbh suite: {len(present)} tasks present, missing "
          f"(generated in code): {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
