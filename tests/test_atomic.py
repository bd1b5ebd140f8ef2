"""Whole-or-nothing file writes (`taskpgm_jax._atomic`), used by the cache, report, CLI and data."""

import os

import numpy as np
import pytest

from taskpgm_jax._atomic import write_atomic, write_text_atomic
from taskpgm_jax.pipeline.cache import write_npy


def test_text_written_with_the_mode_of_a_plain_open(tmp_path, rng):
    text = "".join(chr(c) for c in rng.integers(0x20, 0x3000, size=200))  # non-ASCII too
    path = tmp_path / "out.txt"
    write_text_atomic(path, text)
    assert path.read_text(encoding="utf-8") == text
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert os.stat(path).st_mode == os.stat(plain).st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "plain.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "report.md"
    path.write_text("old")

    def write(fh):
        fh.write(b"half of the new conte")
        raise error

    with pytest.raises(type(error)):
        write_atomic(path, write)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_npy_round_trip_under_the_exact_name(tmp_path, rng):
    array = rng.normal(size=(3, 5)).astype(np.float32)
    path = tmp_path / "jsd"  # np.save(filename) would append .npy; the cache keeps the name given
    write_npy(path, array)
    np.testing.assert_array_equal(np.load(path), array)
    assert [p.name for p in tmp_path.iterdir()] == ["jsd"]
