"""Argument checks shared by the benchmark scripts: bad input is refused by the parser, before
anything is timed, so a long run never fails at its end."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# The compute dtypes the models run in; anything else is refused by the parser.
DTYPES = ("float32", "bfloat16", "float16")


def _writable_json_path(path: str) -> str:
    """--json is written after the whole run: a path it could not be written to is refused
    now (argparse reports it as a usage error), so the figures are never lost at the end."""
    target = Path(path)
    if path.endswith(os.sep) or target.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory; give a file path such as "
                                         f"{path.rstrip(os.sep)}{os.sep}results.json")
    folder = target.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {folder} of {path} does not exist; create "
                                         f"it (mkdir -p {folder}) or give another path")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder {folder} of {path} is not writable; give "
                                         "another path")
    return path


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    """The `--json PATH` option every benchmark has, its path checked as it is parsed."""
    parser.add_argument("--json", metavar="PATH", type=_writable_json_path,
                        help="write the figures here (the folder must exist)")


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
