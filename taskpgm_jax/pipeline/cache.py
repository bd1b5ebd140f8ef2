"""The run directory: stage artifacts keyed by a hash of their config and inputs.

    RUN_DIR/
      config.yaml                 the resolved config of the latest invocation
      manifest.json               stage label -> its artifact directory (for the report)
      stages/<name>-<key>/        a finished stage (its existence is the "done" flag)
      stages/<name>-<key>.partial/  a stage in progress: checkpoints live here, so a killed run
                                  resumes inside the stage; renamed to the final name at the end
      results.json, report.md, figures/

A finished stage directory only ever appears through one `os.replace` of its complete partial
directory, so a half-written artifact is never taken for a finished one. Files written outside
stages (results, manifest) go through a temporary name and a rename too. A stage's scratch
(training checkpoints, finished rounds) is removed only after the stage is published, and by
renaming it away first: a kill while it is being deleted can leave a stray folder in a finished
stage (swept on the next start) but never a half-deleted checkpoint that a resume would read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from taskpgm_jax._atomic import write_atomic, write_text_atomic


def is_writer() -> bool:
    """Only process 0 writes host-side files (every process writes its part of a checkpoint)."""
    import jax

    return jax.process_index() == 0


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write then rename: an interrupted write never leaves a truncated file behind."""
    write_text_atomic(path, text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_npy(path: str | os.PathLike, array) -> None:
    array = np.asarray(array)
    write_atomic(path, lambda fh: np.save(fh, array))


# Sub-directories of a stage's work directory that only serve to resume inside the stage.
SCRATCH = ("checkpoints", "rounds")
_TRASH_SUFFIX = ".trash"


def remove_tree(path: Path) -> None:
    """Deletes a directory tree so that an interruption never leaves it half there: it is
    renamed to a hidden `.trash` sibling (atomic) and the sibling deleted; leftovers of an
    interrupted delete are only ever trash, which `sweep_trash` removes."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}{_TRASH_SUFFIX}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


def tree_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_0_decides(flag: bool) -> bool:
    """Process 0's `flag` on every process (itself on one process). For a decision taken from
    files, such as whether a step is done: each process looking for itself can see a shared
    filesystem differently, and a process that skips work the others do (with collectives)
    hangs them."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(int(bool(flag)), np.int32)))


def check_same_key_everywhere(name: str, key: str) -> None:
    """Raises on every process when the processes computed different keys for stage `name`.

    Keys hash each process's own view of the inputs (data files, checkpoint, tokenizer): hosts
    that see different files would otherwise run, or skip, different stage directories under
    process 0's decision. Every process gathers every key, so all raise together (one raising
    alone would leave the others waiting in the next collective)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    mine = np.frombuffer(digest, np.int32)  # two int32 words: JAX's default ints are 32-bit
    seen = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
    differ = [p for p in range(len(seen)) if not np.array_equal(seen[p], seen[0])]
    if differ:
        raise RuntimeError(
            f"stage {name!r}: processes {differ} computed another key than process 0 ({key} here, "
            f"on process {jax.process_index()}): the hosts see different inputs (task files, "
            "checkpoint or tokenizer). Give every host the same files at the same paths, e.g. on "
            "the shared mount")


class RunDir:
    """Stage bookkeeping in one run directory.

    Example:
      >>> run = RunDir("runs/demo")
      >>> if not run.done("probe", key):
      ...     work = run.begin("probe", key)
      ...     write_npy(work / "divergence.npy", D)
      ...     run.finish("probe", key)
      >>> D = np.load(run.path("probe", key) / "divergence.npy")
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.stages = self.root / "stages"
        self.stages.mkdir(parents=True, exist_ok=True)
        self.manifest: dict[str, str] = {}
        if is_writer():
            self._sweep()

    def _sweep(self) -> None:
        """Removes what a kill during `finish` can leave: scratch folders in finished stages
        and trash anywhere one level down (a partial stage's own checkpoints are kept)."""
        for stage in self.stages.iterdir():
            if not stage.is_dir():
                continue
            for trash in stage.glob(f".*{_TRASH_SUFFIX}"):
                shutil.rmtree(trash, ignore_errors=True)
            if not stage.name.endswith(".partial"):
                for name in SCRATCH:
                    remove_tree(stage / name)

    def path(self, name: str, key: str) -> Path:
        return self.stages / f"{name}-{key}"

    def done(self, name: str, key: str) -> bool:
        return self.path(name, key).is_dir()

    def begin(self, name: str, key: str) -> Path:
        """The stage's work directory; kept from an interrupted attempt (it holds checkpoints)."""
        work = self.stages / f"{name}-{key}.partial"
        work.mkdir(parents=True, exist_ok=True)
        return work

    def finish(self, name: str, key: str) -> Path:
        """Publishes the work directory under the final name (atomically)."""
        final = self.path(name, key)
        # Every process's checkpoint writes must be complete before process 0 renames, and the
        # rename must be done before any process reads the final directory.
        _barrier(f"taskpgm written {name}-{key}")
        if is_writer():
            # Publish first, then drop the scratch (only needed to resume inside the stage): a
            # kill in between leaves a finished stage with stray scratch, swept on the next start.
            os.replace(self.stages / f"{name}-{key}.partial", final)
            for scratch in SCRATCH:
                remove_tree(final / scratch)
        _barrier(f"taskpgm finished {name}-{key}")
        return final

    def unused_partials(self) -> list[Path]:
        """Unfinished stage folders that no stage recorded in this invocation uses: left by a
        run of other settings, they resume only if those settings come back, so they are kept
        (a 7B checkpoint is not deleted behind the user's back) and reported instead."""
        used = {Path(p).name for p in self.manifest.values()}
        return sorted(p for p in self.stages.glob("*.partial")
                      if p.is_dir() and p.name[:-len(".partial")] not in used)

    def record(self, label: str, name: str, key: str) -> None:
        """Notes which artifact directory a stage label uses (written by `write_manifest`)."""
        self.manifest[label] = os.path.relpath(self.path(name, key), self.root)

    def write_manifest(self, extra: dict[str, Any] | None = None) -> None:
        if is_writer():
            write_json(self.root / "manifest.json", {"stages": self.manifest, **(extra or {})})
