"""Tasks and task pools: fixed example columns, validation, and seeded-hash splits.

Every source (local files, the Hugging Face hub, BIG-bench, the synthetic suite) produces `Task`
objects whose examples are a `datasets.Dataset` with the same columns (`EXAMPLE_FEATURES`), so the
tokenizer, the samplers and the materialiser never care where a task came from.

Splits are decided by a seeded hash of content, not by index: they never overlap, and they do
not move when examples are reordered or other tasks are added. Rows are split by prompt: every
row of one prompt (exact duplicates, or one prompt listed with several acceptable answers) lands
in the same split, so no evaluation prompt is trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeGuard

import datasets
import numpy as np

__all__ = [
    "DataError", "EXAMPLE_FEATURES", "SPLITS", "SplitSpec", "Task", "TaskPool", "make_task",
    "split_of",
]

Kind = Literal["generate", "multiple_choice"]
KINDS = ("generate", "multiple_choice")
SPLITS = ("train", "probe", "eval")

# The fixed example schema. `answer` is -1 and `choices` empty for generative tasks; for
# multiple-choice tasks `target` is the correct choice text, so the training text is the same
# whatever the kind. `references` holds every acceptable answer for exact-match scoring.
# `choice_scores` is the credit of each choice (BIG-bench's target_scores: several choices may
# be correct, or partly): multiple_choice_grade credits the chosen one's score; by default 1 for
# the answer and 0 for the others. Empty for generative tasks.
EXAMPLE_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "prompt": datasets.Value("string"),
    "target": datasets.Value("string"),
    "choices": datasets.Sequence(datasets.Value("string")),
    "answer": datasets.Value("int32"),
    "references": datasets.Sequence(datasets.Value("string")),
    "choice_scores": datasets.Sequence(datasets.Value("float64")),
})


class DataError(ValueError):
    """Bad task data. The message names the file, task, field and line where they are known."""


def _at(line: int | str) -> str:
    # A string is a ready label for sources without lines, e.g. "example 3" for BIG-bench.
    return line if isinstance(line, str) else f"line {line}"


def _where(task: str | None = None, source: str | None = None, line: int | str | None = None,
           field: str | None = None) -> str:
    parts = []
    if source:
        parts.append(f"{source}" + (f" {_at(line)}" if line is not None else ""))
    elif line is not None:
        parts.append(_at(line))
    if task:
        parts.append(f"task {task!r}")
    if field:
        parts.append(f"field {field!r}")
    return ", ".join(parts)


def data_error(message: str, *, task: str | None = None, source: str | None = None,
               line: int | str | None = None, field: str | None = None) -> DataError:
    """Builds a `DataError` whose message starts with where the problem is.

    `line` is a 1-based line or row number, or a label such as "example 3" where the source has
    no lines."""
    where = _where(task, source, line, field)
    return DataError(f"{where}: {message}" if where else message)


def check_int(value: Any, name: str, low: int = 0, high: int | None = None,
              why: str = "") -> int:
    """`value` as a Python int in [low, high) (NumPy integers too, never bool), or a `DataError`
    (a ValueError) naming the argument `name`, with `why` appended. Shared by `train`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else \
            f"in [{low}, {'2**32' if high == 2**32 else high})"
        raise DataError(f"{name} must be {bound}, got {value}" + (f" ({why})" if why else ""))
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed as a Python int in [0, 2**32) (what NumPy and the configs accept)."""
    return check_int(value, name, 0, 2**32)


def check_names(value: Any, name: str, *, nonempty: bool = False) -> tuple[str, ...]:
    """A collection of strings (names, stop strings, references) as a tuple; one string is
    refused rather than read as its characters, and with `nonempty` so is an empty string.
    Shared by `eval`."""
    what = "non-empty strings" if nonempty else "strings"
    if isinstance(value, str):
        raise DataError(f"{name} must be a list of {what}, not one string; pass [{value!r}]")
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise DataError(f"{name} must be a list of {what}, got {type(value).__name__}")
    names = tuple(value)
    bad = [v for v in names if not isinstance(v, str) or (nonempty and not v)]
    if bad:
        raise DataError(f"{name} must be a list of {what}; not: {bad[:5]!r}")
    return names


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """How each task's examples are split by hash.

    Attributes:
      probe: fraction of examples in the probe split (used for the affinities).
      eval: fraction of examples in the evaluation split.
      seed: the hash seed; changing it reshuffles every split.
      min_probe: each task must have at least this many probe examples (0: no check).
    """

    probe: float = 0.1
    eval: float = 0.1
    seed: int = 0
    min_probe: int = 0

    def __post_init__(self):
        for name in ("probe", "eval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise DataError(f"SplitSpec.{name} must be a fraction in [0, 1], got {value!r}")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "seed", check_int(self.seed, "SplitSpec.seed"))
        object.__setattr__(self, "min_probe", check_int(self.min_probe, "SplitSpec.min_probe"))
        if not (0.0 <= self.probe and 0.0 <= self.eval and self.probe + self.eval <= 1.0):
            raise ValueError(
                f"split fractions must be >= 0 and sum to at most 1 (train keeps the rest); got "
                f"probe={self.probe}, eval={self.eval}")


def _example_key(example: Mapping[str, Any]) -> bytes:
    # Content only (never the row index or the id, which sources may number by position), with
    # separators that cannot occur inside the fields' repr.
    return repr((example["prompt"], example["target"], tuple(example["choices"]),
                 int(example["answer"]))).encode("utf-8")


def _hash_unit(seed: int, task: str, key: bytes) -> float:
    digest = hashlib.blake2b(f"{seed}\0{task}\0".encode() + key, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _split_label(u: float, spec: SplitSpec) -> str:
    if u < spec.eval:
        return "eval"
    if u < spec.eval + spec.probe:
        return "probe"
    return "train"


def split_of(example: Mapping[str, Any], task: str, spec: SplitSpec) -> str:
    """The split ("train", "probe" or "eval") of one example of `task` under `spec`, taken alone.

    A `TaskPool` splits by prompt: rows sharing a non-empty prompt all take the split of the one
    among them with the smallest content key (so a prompt with one row, or with exact copies of
    one row, gets this function's split).

    Args:
      example: a mapping with the `EXAMPLE_FEATURES` columns.
      task: the task name (part of the hash, so two tasks sharing an example split it
        independently).
      spec: fractions and seed.

    Returns:
      The split name.
    """
    return _split_label(_hash_unit(spec.seed, task, _example_key(example)), spec)


def _split_keys(examples: Mapping[str, Sequence[Any]]) -> list[bytes]:
    """The key each row is split by, from the columns `prompt`, `target`, `choices`, `answer`.

    A row's key is the smallest content key (`_example_key`, compared as bytes) among the rows
    sharing its prompt: the group's split then depends on its content only (not on row order),
    and a prompt with a single distinct row keeps the split of its own content. Rows with an
    empty prompt are not grouped (the target is then the whole example)."""
    keys = [_example_key({"prompt": p, "target": t, "choices": c, "answer": a})
            for p, t, c, a in zip(examples["prompt"], examples["target"], examples["choices"],
                                  examples["answer"], strict=True)]
    least: dict[str, bytes] = {}
    for prompt, key in zip(examples["prompt"], keys, strict=True):
        if prompt and (prompt not in least or key < least[prompt]):
            least[prompt] = key
    return [least[p] if p else k for p, k in zip(examples["prompt"], keys, strict=True)]


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One task: a name, a kind, a metric and its examples.

    Attributes:
      name: unique name in its pool (BIG-bench sub-tasks are "parent/sub").
      kind: "generate" (a target string) or "multiple_choice" (choices and the correct index).
      metric: how it is scored ("exact_match" or "multiple_choice_grade" by default).
      examples: a `datasets.Dataset` with the `EXAMPLE_FEATURES` columns.
      source: where it came from (a path, "hub:...", "bigbench:1.0.0/<task>", "synthetic").
      description: free text.
      keywords: tags, e.g. BIG-bench keywords.
      canary: a benchmark's canary string, carried into every manifest that holds its examples.
    """

    name: str
    kind: Kind
    metric: str
    examples: datasets.Dataset
    source: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()
    canary: str = ""

    def __len__(self) -> int:
        return self.examples.num_rows


def _check_example(ex: Mapping[str, Any], kind: str, task: str, source: str,
                   line: int | str | None) -> None:
    def fail(msg, field):
        raise data_error(msg, task=task, source=source, line=line, field=field)

    for field in ("prompt", "target"):
        if not isinstance(ex[field], str):
            fail(f"expected a string, got {type(ex[field]).__name__}", field)
    if kind == "multiple_choice":
        choices = ex["choices"]
        if len(choices) < 2:
            fail(f"a multiple-choice example needs at least 2 choices, got {len(choices)}",
                 "choices")
        # An empty choice scores log-likelihood 0 (no target tokens), the highest possible, so
        # it would win every example; a repeated one makes the answer ambiguous.
        if "" in choices:
            fail(f"choice {list(choices).index('')} is empty: it has no tokens to score, so it "
                 f"would always win; remove it or give it text", "choices")
        first: dict[str, int] = {}
        for j, c in enumerate(choices):
            if c in first:
                fail(f"choices {first[c]} and {j} are both {c!r}: the answer is ambiguous; "
                     f"make the choices distinct", "choices")
            first[c] = j
        answer = ex["answer"]
        if not 0 <= answer < len(choices):
            # One past the last choice is what a 1-based label column gives for the last one.
            hint = (" (answers are 0-based indices: subtract 1 from a 1-based label column)"
                    if answer == len(choices) else "")
            fail(f"answer index {answer} is not among the {len(choices)} choices{hint}",
                 "answer")
        if ex["target"] != choices[answer]:
            fail(_target_mismatch(ex["target"], choices, answer), "target")
        problem = choice_scores_problem(ex["choice_scores"], len(choices), answer)
        if problem:
            fail(problem, "choice_scores")
    if ex["target"] == "":
        fail("empty target: an example needs text to learn and score", "target")


def choice_scores_problem(scores: Any, n_choices: int, answer: int) -> str | None:
    """Why a multiple-choice row's `choice_scores` cannot be scored (None when they can): they
    must be one finite number per choice (not bools), the answer among the highest, and not all
    equal. Shared by `eval`."""
    if isinstance(scores, (str, bytes, Mapping)) or not isinstance(scores, Iterable):
        return f"expected a list of numbers, one per choice, got {type(scores).__name__}"
    scores = list(scores)
    bad = [v for v in scores if isinstance(v, bool) or not isinstance(v, numbers.Real)
           or not math.isfinite(v)]
    if bad:
        return f"expected finite numbers, got {bad[:3]!r}"
    if len(scores) != n_choices:
        return f"{len(scores)} scores for {n_choices} choices; give one per choice"
    if max(scores) == min(scores):
        return f"every choice scores {scores[0]}: no choice is better than another"
    if scores[answer] != max(scores):
        return (f"the answer (choice {answer}) scores {scores[answer]}, below the best "
                f"{max(scores)} (choice {scores.index(max(scores))}); the answer must be a "
                f"highest-scored choice")
    return None


def _target_mismatch(target: str, choices: Sequence[str], answer: int) -> str:
    """Why a multiple-choice row's own target is refused, with the likely cause."""
    msg = (f"target {target!r} differs from choices[answer] = choices[{answer}] = "
           f"{choices[answer]!r}")
    if answer >= 1 and choices[answer - 1] == target:
        return (msg + f" but is choices[{answer - 1}]: the answer looks 1-based (answers are "
                "0-based indices); subtract 1 from the answer column, or give the answer as the "
                "choice text")
    return (msg + "; fix the answer (a 0-based index: a 1-based label column is the usual "
            "cause) or the target, or leave the target out (it defaults to choices[answer])")


def _is_kind(kind: str) -> TypeGuard[Kind]:
    return kind in KINDS


def make_task(name: str, kind: str, rows: Sequence[Mapping[str, Any]], *, metric: str | None = None,
              source: str = "", description: str = "", keywords: Iterable[str] = (),
              canary: str = "", lines: Sequence[int | str] | None = None) -> Task:
    """Validates rows and builds a `Task` with the fixed columns.

    Args:
      name: task name.
      kind: "generate" or "multiple_choice".
      rows: dicts with `prompt` and `target` (generate), or `prompt`, `choices` and `answer`
        (a 0-based index, or the correct choice's text) and optionally `target` (which must
        then be choices[answer]) and `choice_scores` (the credit of each choice, the answer's
        among the highest: several correct choices; default 1 for the answer, 0 otherwise);
        optional `id` and `references`.
      metric: defaults to "exact_match" / "multiple_choice_grade" by kind.
      source, description, keywords, canary: provenance, see `Task`.
      lines: for error messages, the source line (or row) number of each row, or a label per
        row such as "example 3" (default: 1-based row numbers).

    Returns:
      The validated `Task`.

    Raises:
      DataError: no name, empty task, unknown kind, a missing field, a target that is not a
        string, an empty target or choice, repeated choices, an answer not among the choices,
        a multiple-choice target that is not choices[answer], choice_scores that are not one
        finite number per choice with the answer among the highest (or on a generative row),
        references that are not strings or are empty or blank (a generative target used as the
        reference too), an id that is not a string or an integer, a source, description or
        canary that is not a string, a repeated id, keywords given as one string, or not one
        entry of `lines` per row; the message names the source, task, field and line.
    """
    if not isinstance(name, str) or not name:
        raise data_error(f"name must be a non-empty string, got {name!r}", source=source)
    if not _is_kind(kind):
        raise data_error(f"unknown kind {kind!r}; expected one of {KINDS}", task=name,
                         source=source, field="kind")
    if isinstance(rows, (str, bytes, Mapping)):
        raise data_error(f"rows must be a list of dicts, got one {type(rows).__name__}",
                         task=name, source=source)
    if not rows:
        raise data_error("the task has no examples", task=name, source=source)
    if lines is not None and len(lines) != len(rows):
        raise data_error(f"lines has {len(lines)} entries for {len(rows)} rows; give one per row",
                         task=name, source=source)
    for field, value in (("source", source), ("description", description), ("canary", canary)):
        if not isinstance(value, str):
            raise data_error(f"{field} must be a string, got {type(value).__name__} {value!r}; "
                             f"pass \"\" for none", task=name,
                             source=source if isinstance(source, str) else None)
    try:
        keywords = check_names(keywords, "keywords")
    except DataError as e:
        raise data_error(str(e), task=name, source=source) from None
    cols: dict[str, list] = {k: [] for k in EXAMPLE_FEATURES}
    # Our own content fingerprint: `datasets` would otherwise pickle-hash the whole table,
    # which costs more than building it.
    fingerprint = hashlib.sha256(f"{name}\0{kind}".encode())
    id_lines: dict[str, int | str] = {}
    for i, row in enumerate(rows):
        line = lines[i] if lines is not None else i + 1
        ex = _normalise_row(row, kind, name, source, line)
        _check_example(ex, kind, name, source, line)
        ex["id"] = _row_id(row.get("id"), name, i, source, line)
        if ex["id"] in id_lines:  # results and manifests are keyed by id
            raise data_error(f"duplicate id {ex['id']!r}, first used at {_at(id_lines[ex['id']])}; "
                             f"give every example its own id (or none)", task=name,
                             source=source, line=line, field="id")
        id_lines[ex["id"]] = line
        for k in cols:
            cols[k].append(ex[k])
        fingerprint.update(repr([ex[k] for k in cols]).encode("utf-8"))
    import pyarrow as pa

    try:
        table = pa.table(cols, schema=EXAMPLE_FEATURES.arrow_schema)
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\ud800" escape
        _raise_unencodable(cols, name, source, lines)
        raise
    examples = datasets.Dataset(table, info=datasets.DatasetInfo(features=EXAMPLE_FEATURES),
                                fingerprint=fingerprint.hexdigest()[:32])
    metric = metric or ("multiple_choice_grade" if kind == "multiple_choice" else "exact_match")
    return Task(name=name, kind=kind, metric=metric, examples=examples, source=source,
                description=description, keywords=keywords, canary=canary)


def _row_id(value: Any, task: str, i: int, source: str, line: int | str) -> str:
    """A row's id as text: a string, an integer (NumPy's too) written in decimal, or
    "<task>:<row>" when there is none; anything else (a dict, a list, a bool, a float) would be
    written as its repr and is refused."""
    if value is None:
        return f"{task}:{i}"
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    raise data_error(f"an id must be a string or an integer, got {type(value).__name__} "
                     f"{value!r:.60}; give each example a text or integer id (or none)",
                     task=task, source=source, line=line, field="id")


def _raise_unencodable(cols: Mapping[str, list], task: str, source: str,
                       lines: Sequence[int | str] | None) -> None:
    """Raises a `DataError` at the first string that is not valid Unicode (found only on failure,
    so valid data pays nothing for the check)."""
    for field, values in cols.items():
        for i, value in enumerate(values):
            for text in ([value] if isinstance(value, str) else
                         value if isinstance(value, list) else []):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    line = lines[i] if lines is not None else i + 1
                    raise data_error(
                        f"undecodable text: character {e.start} is a lone surrogate "
                        f"({text[e.start]!r}), not valid Unicode", task=task, source=source,
                        line=line, field=field) from None


def _normalise_row(row: Mapping[str, Any], kind: str, task: str, source: str,
                   line: int | str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise data_error(f"expected a dict per row, got {type(row).__name__}", task=task,
                         source=source, line=line)

    def need(field):
        if field not in row or row[field] is None:
            raise data_error("missing required field", task=task, source=source, line=line,
                             field=field)
        return row[field]

    prompt = need("prompt")
    if kind == "generate":
        target = need("target")
        if not isinstance(target, str):  # checked here: it is also the default reference
            raise data_error(f"expected a string, got {type(target).__name__} {target!r}; "
                             f"convert it to a string (\"{target}\")", task=task,
                             source=source, line=line, field="target")
        refs = row.get("references") or [target]
        if isinstance(refs, str):  # one reference, not a sequence of characters
            refs = [refs]
        if not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) for r in refs):
            raise data_error(f"references must be a string or a list of strings, got {refs!r}",
                             task=task, source=source, line=line, field="references")
        blank = [r for r in refs if not r.strip()]
        field = "references" if row.get("references") else "target"
        if blank and target != "":  # an empty target gets its own error (_check_example)
            # Exact match compares stripped text: an empty prediction would score as correct.
            raise data_error(f"{blank[0]!r} is empty or blank: it would match an empty "
                             f"prediction, so a model that outputs nothing would score; remove "
                             f"it or give the answer text", task=task, source=source, line=line,
                             field=field)
        if not _absent(row.get("choice_scores")):
            raise data_error("choice_scores apply to multiple-choice examples only (a generative "
                             "example is scored by exact match against its references); drop "
                             "them or make the task multiple_choice", task=task, source=source,
                             line=line, field="choice_scores")
        return {"prompt": prompt, "target": target, "choices": [], "answer": -1,
                "references": list(refs), "choice_scores": []}
    choices = need("choices")
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise data_error("choices must be a list of strings", task=task, source=source,
                         line=line, field="choices")
    answer = need("answer")
    if isinstance(answer, str):
        if answer not in choices:
            raise data_error(f"answer {answer!r} is not among the choices {list(choices)}",
                             task=task, source=source, line=line, field="answer")
        answer = list(choices).index(answer)
    elif isinstance(answer, (bool, float)) or not isinstance(answer, (int, np.integer)):
        raise data_error(f"answer must be an index or a choice text, got {answer!r}",
                         task=task, source=source, line=line, field="answer")
    answer = int(answer)
    # A target given with the row is kept, so that `_check_example` can refuse one that is not
    # choices[answer] (typically a 1-based label) rather than have it silently replaced.
    target = row.get("target")
    if target is None:
        target = choices[answer] if 0 <= answer < len(choices) else ""
    scores = row.get("choice_scores")
    if _absent(scores):  # the answer is the one correct choice
        scores = [float(j == answer) for j in range(len(choices))]
    elif not isinstance(scores, (str, bytes, Mapping)) and isinstance(scores, Iterable):
        scores = list(scores)  # checked in _check_example
    return {"prompt": prompt, "target": target, "choices": list(choices), "answer": answer,
            "references": [target], "choice_scores": scores}


def _absent(value: Any) -> bool:
    """None, or an empty list / tuple / array (a column a row leaves empty)."""
    return value is None or (isinstance(value, (list, tuple, np.ndarray)) and len(value) == 0)


class TaskPool:
    """An ordered set of uniquely named tasks with deterministic train / probe / eval splits.

    Args:
      tasks: the tasks, in the order every per-task array (weights, sizes, affinities) follows.
      split: how examples are split (`SplitSpec`).
      cluster_labels: optional planted cluster of each task (the synthetic suite sets it).
      heldout: optional pool of evaluation-only tasks that no mixture draws from.

    Raises:
      DataError: an entry that is not a `Task`, a `split` that is not a `SplitSpec`, duplicate
        task names, or a probe split smaller than `split.min_probe`.

    Example:
      >>> pool = synthetic_suite(seed=0)
      >>> pool.names[:2], pool.sizes[pool.names[0]]
      >>> train = pool.train(pool.names[0])     # a datasets.Dataset
    """

    def __init__(self, tasks: Sequence[Task], split: SplitSpec = SplitSpec(), *,
                 cluster_labels: Mapping[str, str] | None = None,
                 heldout: TaskPool | None = None):
        if not isinstance(split, SplitSpec):
            raise DataError(f"split must be a SplitSpec, got {type(split).__name__}; e.g. "
                            f"SplitSpec(probe=0.1, eval=0.1)")
        if isinstance(tasks, (str, Task)) or not isinstance(tasks, Iterable):
            raise DataError(f"tasks must be a list of Task objects, got {type(tasks).__name__}")
        tasks = list(tasks)
        seen: dict[str, str] = {}
        for i, t in enumerate(tasks):
            if not isinstance(t, Task):
                raise DataError(f"tasks[{i}] is a {type(t).__name__}, not a Task; build tasks "
                                f"with make_task or a loader (load_task_files, ...)")
            if t.name in seen:
                also = f" (first from {seen[t.name]})" if seen[t.name] else ""
                raise data_error(f"duplicate task name{also}", task=t.name, source=t.source)
            seen[t.name] = t.source
        self._tasks = {t.name: t for t in tasks}
        self.split_spec = split
        self.cluster_labels = dict(cluster_labels) if cluster_labels is not None else None
        self.heldout = heldout
        self._split_index: dict[str, dict[str, np.ndarray]] = {}
        if split.min_probe:
            for name in self.names:
                self.probe(name, size=split.min_probe)

    @property
    def names(self) -> tuple[str, ...]:
        """Task names in pool order."""
        return tuple(self._tasks)

    @property
    def tasks(self) -> tuple[Task, ...]:
        """The `Task` objects in pool order."""
        return tuple(self._tasks.values())

    @property
    def sizes(self) -> dict[str, int]:
        """Number of examples of each task (all splits), in pool order."""
        return {n: len(t) for n, t in self._tasks.items()}

    def split_sizes(self, split: str = "train") -> dict[str, int]:
        """Number of examples of each task in one split, in pool order."""
        return {n: len(self.indices(n, split)) for n in self.names}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: str) -> bool:
        return name in self._tasks

    def __getitem__(self, name: str) -> Task:
        try:
            return self._tasks[name]
        except KeyError:
            raise KeyError(f"no task {name!r} in the pool; tasks: {list(self.names)}") from None

    def indices(self, name: str, split: str) -> np.ndarray:
        """Row indices (into the task's `examples`) of one split, ascending; cached. Rows sharing
        a prompt are in the same split (`_split_keys`)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if name not in self._split_index:
            task = self[name]
            # Column lists, not row iteration: a Dataset row access costs far more than a hash.
            spec = self.split_spec
            labels = np.array([_split_label(_hash_unit(spec.seed, name, key), spec)
                               for key in _split_keys(task.examples[:])])
            self._split_index[name] = {s: np.flatnonzero(labels == s) for s in SPLITS}
        return self._split_index[name][split]

    def split(self, name: str, split: str) -> datasets.Dataset:
        """The examples of one task in one split, as a `datasets.Dataset`."""
        return self[name].examples.select(self.indices(name, split))

    def train(self, name: str) -> datasets.Dataset:
        """The training split of a task (what mixtures draw from)."""
        return self.split(name, "train")

    def eval(self, name: str) -> datasets.Dataset:
        """The evaluation split of a task."""
        return self.split(name, "eval")

    def probe(self, name: str, size: int | None = None) -> datasets.Dataset:
        """The probe split of a task; with `size`, its first `size` examples.

        Raises:
          DataError: `size` is not a non-negative int, or the probe split holds fewer examples.
        """
        idx = self.indices(name, "probe")
        if size is not None:
            size = check_int(size, "size")
            if len(idx) < size:
                task = self[name]
                raise data_error(
                    f"probe split too small: {len(idx)} examples, {size} requested (the task has "
                    f"{len(task)} examples and probe fraction {self.split_spec.probe}); raise the "
                    f"probe fraction or request fewer", task=name, source=task.source)
            idx = idx[:size]
        return self[name].examples.select(idx)

    def select(self, names: Iterable[str]) -> TaskPool:
        """A sub-pool with the given tasks, in the given order (same splits)."""
        names = list(names)
        labels = ({n: self.cluster_labels[n] for n in names}
                  if self.cluster_labels is not None else None)
        sub = TaskPool([self[n] for n in names], self.split_spec, cluster_labels=labels,
                       heldout=self.heldout)
        sub._split_index = {n: self._split_index[n] for n in names if n in self._split_index}
        return sub

    def __or__(self, other: TaskPool) -> TaskPool:
        """Concatenates two pools (names must stay unique); keeps this pool's split spec."""
        labels = None
        if self.cluster_labels is not None or other.cluster_labels is not None:
            labels = {**(self.cluster_labels or {}), **(other.cluster_labels or {})}
        return TaskPool(self.tasks + other.tasks, self.split_spec, cluster_labels=labels,
                        heldout=self.heldout or other.heldout)

    def __repr__(self) -> str:
        more = ", ..." if len(self) > 6 else ""
        return f"TaskPool({len(self)} tasks: {', '.join(self.names[:6])}{more})"
