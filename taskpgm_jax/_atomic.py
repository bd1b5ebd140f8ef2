"""Files written whole or not at all, for every layer that writes host-side files.

Each write goes to a uniquely named hidden temporary in the target's directory and is renamed
over the target (`os.replace`, atomic on POSIX): an interrupted or failed write leaves the old
file or none, never half of one, and removes its temporary. Two processes writing the same path
never share a temporary. The new file gets the mode an ordinary `open(path, "w")` would give it
(0o666 less the umask), not `mkstemp`'s private 0o600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["write_atomic", "write_text_atomic"]


def _file_mode() -> int:
    # The umask can only be read by setting it; read once, at import, and put straight back.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_MODE = _file_mode()


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Calls `write(binary_file)` on a temporary sibling of `path`, then renames it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`Path(path).write_text(text)` (UTF-8), whole or not at all."""
    data = text.encode("utf-8")
    write_atomic(path, lambda fh: fh.write(data))
