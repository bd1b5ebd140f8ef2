"""Argument checks shared by the benchmark scripts: bad input is refused by the parser, before
anything is timed, so a long run never fails at its end."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# The compute dtypes the models run in; anything else is refused by the parser.
DTYPES = ("float32", "bfloat16", "float16")


def check_json_path(parser: argparse.ArgumentParser, path: str | None) -> None:
    """--json is written after the whole run: refuse a path it could not be written to now, so
    the figures are never lost at the end."""
    if path is None:
        return
    target = Path(path)
    if path.endswith(os.sep) or target.is_dir():
        parser.error(f"--json: {path} is a directory; give a file path such as {path.rstrip(os.sep)}"
                     f"{os.sep}results.json")
    folder = target.parent
    if not folder.is_dir():
        parser.error(f"--json: the folder {folder} of {path} does not exist; create it "
                     f"(mkdir -p {folder}) or give another path")
    if not os.access(folder, os.W_OK):
        parser.error(f"--json: the folder {folder} of {path} is not writable; give another path")


def parse_sizes(parser: argparse.ArgumentParser, flag: str, text: str, example: str
                ) -> tuple[int, int, int]:
    """A TxNxV size: T >= 2 models (the divergences are between pairs), N >= 1 positions and
    V >= 1 vocabulary entries."""
    try:
        t, n, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        parser.error(f"{flag}: expected TxNxV such as {example}, got {text!r}")
    if t < 2 or n < 1 or v < 1:
        parser.error(f"{flag}: {text!r} needs T >= 2 (divergences are between pairs of models), "
                     f"N >= 1 and V >= 1, e.g. {example}")
    return t, n, v
