"""The run's inputs: the task pool and held-out suite, the tokenizer, and the base model config.

`load_pools` reads the data every time (it is cheap next to training) and keys it by content:
the fingerprint of every task's examples in pool order, with everything evaluation reads
(references, kind, metric, choice scores other than the default), so an edited file or a
reordered pool reruns what depends on it while an unchanged one does not. Splits follow from
the content and the split spec, by a rule that changed once (rows are now split by prompt, no
longer each on its own): a task where that change moved a row also hashes its split
assignment, so stages computed on its old splits are not reused; other tasks keep their keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from taskpgm_jax.config import (
    SCRATCH_SIZE,
    BaseModelConfig,
    BigbenchData,
    ConfigError,
    DataConfig,
    check_source_data,
    config_hash,
    hub_specs,
)
from taskpgm_jax.data import (
    DataError,
    SplitSpec,
    TaskPool,
    load_bigbench,
    load_hub_tasks,
    load_task_files,
    split_of,
    synthetic_suite,
)
from taskpgm_jax.data.materialize import task_fingerprint
from taskpgm_jax.data.sources.bigbench import TaskSelectionError
from taskpgm_jax.data.tasks import SPLITS
from taskpgm_jax.eval.evaluate import EVAL_METRICS, unscored_tasks
from taskpgm_jax.models import ModelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Pools(NamedTuple):
    """train: the task pool mixtures draw from; heldout: the evaluation suite (eval split only);
    clusters: planted cluster per training task (synthetic suite) or None; key: content hash."""

    train: TaskPool
    heldout: TaskPool
    clusters: dict[str, str] | None
    key: str


def cap_examples(pool: TaskPool, limit: int | None, heldout: TaskPool | None = None) -> TaskPool:
    """The pool with each task's first `limit` examples in source order (from a file sorted by
    difficulty, one end of it); the probe / eval / train splits then follow by hash."""
    if limit is None:
        return pool
    tasks = [dataclasses.replace(t, examples=t.examples.select(range(min(limit, len(t)))))
             for t in pool.tasks]
    return TaskPool(tasks, pool.split_spec, cluster_labels=pool.cluster_labels, heldout=heldout)


_HELDOUT_KEYS = {"synthetic": "data.synthetic", "bigbench": "data.bigbench.heldout",
                 "files": "data.files.heldout_path", "hub": "data.hub.heldout"}


def load_pools(cfg: DataConfig) -> Pools:
    """The training pool and the held-out suite described by `cfg`.

    Raises:
      ConfigError: an empty pool, fewer than two tasks, or a held-out suite that overlaps it
        (BIG-bench: a task named in both lists; task names or keywords that select nothing).
      DataError: from the sources (a bad file names the file and line).
    """
    check_source_data(cfg)
    split = SplitSpec(probe=cfg.probe_fraction, eval=cfg.eval_fraction, seed=cfg.split_seed)
    eval_only = SplitSpec(probe=0.0, eval=1.0, seed=cfg.split_seed)
    clusters = None
    if cfg.source == "synthetic":
        s = cfg.synthetic
        pool = synthetic_suite(s.seed, cluster_sizes=s.cluster_sizes, n_unique=s.n_unique,
                               n_noise=s.n_noise, examples=s.examples,
                               heldout_examples=s.heldout_examples, split=split)
        assert pool.heldout is not None and pool.cluster_labels is not None  # synthetic_suite sets both
        heldout, clusters = pool.heldout, dict(pool.cluster_labels)
    elif cfg.source == "bigbench":
        pool, heldout = _bigbench_pools(cfg.bigbench, split, eval_only)
    elif cfg.source == "files":
        f = cfg.files
        assert f.path is not None and f.heldout_path is not None  # check_source_data above
        kw: dict[str, Any] = {"columns": dict(f.columns) or None, "kind": f.kind,
                              "task_column": f.task_column}
        pool = load_task_files(f.path, split=split, **kw)
        if f.heldout_columns:
            kw["columns"] = dict(f.heldout_columns)
        heldout = load_task_files(f.heldout_path, split=eval_only, **kw)
    else:
        pool = load_hub_tasks(hub_specs(cfg.hub.train), split=split)
        heldout = load_hub_tasks(hub_specs(cfg.hub.heldout), split=eval_only)
    if len(pool) < 2:
        raise ConfigError(f"config key 'data.source' ({cfg.source}): the task pool has "
                          f"{len(pool)} task(s); TaskPGM needs at least two (check the task "
                          "list, keywords or paths)")
    if len(heldout) == 0:
        raise ConfigError(f"config key 'data.source' ({cfg.source}): the held-out suite is empty")
    # Checked here, not when the eval stage reaches them after all the training.
    unscored = [f"{t.name} ({t.kind}, metric {t.metric!r})" for t in unscored_tasks(heldout)]
    if unscored:
        raise ConfigError(
            f"config key {_HELDOUT_KEYS[cfg.source]!r}: held-out task(s) with a metric the "
            f"evaluation does not compute: {', '.join(unscored[:5])}"
            f"{' ...' if len(unscored) > 5 else ''}; it computes {dict(EVAL_METRICS)}: drop them "
            "from the held-out suite")
    overlap = sorted(set(pool.names) & set(heldout.names))
    if overlap:
        raise ConfigError(f"data: held-out tasks also in the training pool: {overlap[:5]}; "
                          "remove them from one of the two")
    heldout = cap_examples(heldout, cfg.max_examples_per_task)
    pool = cap_examples(pool, cfg.max_examples_per_task, heldout)
    for name in pool.names:
        for part in ("train", "probe"):
            if pool.split_sizes(part)[name] == 0:
                fix = ("raise data.probe_fraction" if part == "probe"
                       else "lower data.probe_fraction / data.eval_fraction")
                raise DataError(f"task {name!r} has no {part} examples ({pool.sizes[name]} in "
                                f"all): {fix}, or drop the task")
    prints = [(n, _task_print(pool, n)) for n in pool.names]
    held_prints = [(n, _task_print(heldout, n)) for n in heldout.names]
    parts: list[Any] = [prints, held_prints, dataclasses.asdict(split), clusters]
    # Only where splitting by prompt moved a row: one-row-per-prompt data keeps its key.
    regrouped = {n: d for n in pool.names if (d := _regrouped_split(pool, n)) is not None}
    if regrouped:
        parts.append({"split_by_prompt": regrouped})
    key = config_hash(*parts)
    return Pools(pool, heldout, clusters, key)


def _bigbench_pools(b: BigbenchData, split: SplitSpec, eval_only: SplitSpec) -> tuple[TaskPool, TaskPool]:
    """The BIG-bench training pool and held-out suite. A suite (tasks null: every JSON task, or
    [bbh]) loses its held-out tasks, as `data.bigbench.tasks` documents; a task named in both
    lists is refused, since one of the two lists is not what the user meant."""
    kw = {"cache_dir": b.cache_dir, "archive": b.archive}
    for key, names in (("data.bigbench.heldout", b.heldout), ("data.bigbench.tasks", b.tasks)):
        if names is not None and len(names) == 0:
            fix = ("leave it out for the default [bbh]" if key.endswith("heldout")
                   else "leave it out (null) for every JSON task not held out")
            raise ConfigError(f"config key {key!r}: an empty list selects no task; {fix}")
        if names is not None and "bbh" in names and len(names) > 1:
            raise ConfigError(f"config key {key!r}: 'bbh' names the whole suite and must stand "
                              f"alone, got {list(names)}; list the tasks by path to combine "
                              "some of them with others")
    try:
        heldout = load_bigbench(list(b.heldout), split=eval_only, **kw)
    except TaskSelectionError as e:
        raise ConfigError(f"config key 'data.bigbench.heldout': {e}") from None
    suite = b.tasks is None or tuple(b.tasks) == ("bbh",)
    try:
        pool = load_bigbench(None if b.tasks is None else list(b.tasks), keywords=b.keywords,
                             split=split, **kw)
    except TaskSelectionError as e:
        keys = "'data.bigbench.tasks'" + (" / 'data.bigbench.keywords'" if b.keywords else "")
        raise ConfigError(f"config key {keys}: {e}") from None
    held = set(heldout.names)
    if b.tasks is not None:
        clash = ["bbh"] if "bbh" in b.tasks and "bbh" in b.heldout else []
        for n in () if suite else b.tasks:  # a name, or a container standing for its sub-tasks
            subs = [p for p in pool.names if p in held and (p == n or p.startswith(n + "/"))]
            if subs:
                clash.append(n if subs == [n] else f"{n} (its sub-tasks {', '.join(subs)})")
        if clash:
            one = len(clash) == 1
            raise ConfigError(f"config key 'data.bigbench.tasks': {', '.join(clash)} "
                              f"{'is' if one else 'are'} held out (data.bigbench.heldout); "
                              f"remove {'it' if one else 'them'} from one of the two")
    keep = [n for n in sorted(pool.names) if n not in held]
    return pool.select(keep[:b.max_tasks] if b.max_tasks else keep), heldout


def _task_print(pool: TaskPool, name: str) -> str:
    """A task's content hash: `task_fingerprint` covers prompt, target, choices and answer only,
    and evaluation also reads the references, the kind, the metric and the choice scores. The
    scores count only where they differ from the default (1 for the answer, 0 for the other
    choices; empty means the default), so single-answer tasks keep the key they had before
    there were scores."""
    task = pool[name]
    cols = task.examples[:]
    refs = [list(r) for r in cols["references"]]
    scores = [(i, [float(v) for v in s]) for i, (s, choices, answer) in enumerate(zip(
        cols["choice_scores"], cols["choices"], cols["answer"], strict=True))
        if len(s) and list(s) != [float(j == answer) for j in range(len(choices))]]
    if scores:
        return config_hash(task_fingerprint(pool, name), task.kind, task.metric, refs, scores)
    return config_hash(task_fingerprint(pool, name), task.kind, task.metric, refs)


def _regrouped_split(pool: TaskPool, name: str) -> str | None:
    """A digest of the task's split assignment when splitting rows by prompt (`TaskPool`) puts a
    row in another split than its own content alone gives it (`split_of`, the rule before
    rows were grouped by prompt), else None: stages computed on the old splits must not be
    reused for such a task, and the others keep their keys."""
    cols = pool[name].examples[:]
    labels = np.empty(len(cols["prompt"]), dtype=object)
    for part in SPLITS:
        labels[pool.indices(name, part)] = part
    rows = zip(cols["prompt"], cols["target"], cols["choices"], cols["answer"], strict=True)
    alone = [split_of({"prompt": p, "target": t, "choices": c, "answer": a}, name, pool.split_spec)
             for p, t, c, a in rows]
    if list(labels) == alone:
        return None
    return hashlib.sha256("\n".join(labels).encode()).hexdigest()


def training_texts(pool: TaskPool):
    """Every prompt, target and choice of the training splits (the tokenizer's corpus)."""
    for name in pool.names:
        cols = pool.train(name)[:]
        for prompt, target, choices in zip(cols["prompt"], cols["target"], cols["choices"], strict=True):
            yield prompt
            yield target
            yield from choices


_WHOLE_FILE_MAX = 64 << 20
_SAMPLE = 1 << 20


def file_digest(paths) -> str:
    """Content hash of files: whole files up to 64 MiB (tokenizers, configs); for larger ones
    (weights) the size and three 1 MiB samples (start, middle, end). Reading GBs to hash them
    would take minutes; the size alone would take a checkpoint replaced by another fine-tune of
    the same architecture (same size, same safetensors header) for the old one, and reuse
    stale stages. The samples lie in the tensor data, which any two trainings differ in."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        size = p.stat().st_size
        if size <= _WHOLE_FILE_MAX:
            h.update(p.read_bytes())
            continue
        h.update(str(size).encode())
        with open(p, "rb") as f:
            for offset in (0, (size - _SAMPLE) // 2, size - _SAMPLE):
                f.seek(offset)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()[:16]


# What `AutoTokenizer.from_pretrained` reads besides the class's own vocabulary files.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja")


def tokenizer_digest(directory: Path, tokenizer) -> str:
    """Content hash of the files `tokenizer` was loaded from (`load_tokenizer(directory)`)."""
    names = {*_TOKENIZER_FILES, *getattr(tokenizer, "vocab_files_names", {}).values()}
    return file_digest([directory / n for n in sorted(names) if (directory / n).is_file()])


def checkpoint_dir(cfg: BaseModelConfig) -> Path:
    """The HF checkpoint directory of `model.source: hf`, checked to hold a config and weights."""
    if cfg.checkpoint is None:
        raise ConfigError("config key 'model.checkpoint': source 'hf' needs the local checkpoint "
                          "directory (config.json + *.safetensors)")
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_dir():
        raise ConfigError(f"config key 'model.checkpoint': directory {str(path)!r} does not "
                          "exist; point it at a Hugging Face checkpoint directory "
                          "(config.json + *.safetensors)")
    missing = [n for n in ("config.json",) if not (path / n).exists()]
    if missing or not list(path.glob("*.safetensors")):
        raise ConfigError(f"config key 'model.checkpoint': {str(path)!r} has no "
                          f"{'config.json' if missing else '*.safetensors weights'}; a Hugging "
                          "Face checkpoint directory holds both")
    return path


def scratch_config(cfg: BaseModelConfig, vocab_size: int) -> ModelConfig:
    """The from-scratch model: `SCRATCH_SIZE` with the config's sizes on top."""
    sizes: dict[str, Any] = {**SCRATCH_SIZE, **dict(cfg.size)}  # ModelConfig size fields (ints)
    if "intermediate_size" not in dict(cfg.size):
        sizes["intermediate_size"] = 2 * sizes["hidden_size"]
    return ModelConfig(vocab_size=vocab_size, dtype=_DTYPES[cfg.dtype],
                       param_dtype=_DTYPES[cfg.param_dtype], remat=cfg.remat,
                       attention_impl=cfg.attention_impl,
                       max_position_embeddings=max(cfg.seq_len, 128), **sizes)


def dtypes(cfg: BaseModelConfig):
    return _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
