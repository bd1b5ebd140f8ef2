"""The code checks `make lint` runs (settings in pyproject.toml), kept green by the suite: ruff over
the repository and mypy over the package, which ships `py.typed`, so its annotations are part of
what users' type checkers read, and over `tests/typing/usage.py`, which states (`assert_type`)
what those checkers must see of the public API."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_ruff_finds_nothing():
    got = _run("ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert got.returncode == 0, got.stdout + got.stderr


def test_mypy_finds_nothing_in_the_package():
    got = _run("mypy")  # files, strictness and the untyped dependencies: pyproject's [tool.mypy]
    assert got.returncode == 0, got.stdout + got.stderr
    assert (ROOT / "taskpgm_jax" / "py.typed").is_file()
