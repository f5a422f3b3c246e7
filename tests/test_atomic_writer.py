"""AtomicFileWriter details that the contract suite does not see."""

from __future__ import annotations

import ctypes
import errno
import sys
from pathlib import Path

import pytest

from pacifica_like.storage import contract as base


def test_large_uploads_start_write_out_as_they_arrive(tmp_path: Path, monkeypatch):
    """Dirty data is handed to the kernel every WRITEBACK_STEP, so commit's fsync finds little left."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(base, "start_writeback", lambda fd, offset, length: calls.append((offset, length)))
    chunk = b"z" * (1 << 20)
    steps = 3
    with base.AtomicFileWriter(str(tmp_path / "big"), 0.0) as writer:
        for _ in range(steps * base.WRITEBACK_STEP // len(chunk) + 1):
            writer.write(chunk)
        writer.commit()
    step = base.WRITEBACK_STEP
    assert calls == [(n * step, step) for n in range(steps)]
    assert (tmp_path / "big").stat().st_size == steps * step + len(chunk)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range(2) is Linux's")
def test_the_real_sync_file_range_binding_accepts_a_file(tmp_path: Path):
    """The ctypes binding reaches the system call: success on a file, EBADF on a closed descriptor."""
    target = tmp_path / "f"
    target.write_bytes(b"x" * 4096)
    with open(target, "rb+") as handle:
        ctypes.set_errno(0)
        base.start_writeback(handle.fileno(), 0, 4096)
        assert ctypes.get_errno() == 0
        closed = handle.fileno()
    # A no-op fallback or a binding that never calls the kernel would leave errno at 0.
    ctypes.set_errno(0)
    base.start_writeback(closed, 0, 4096)
    assert ctypes.get_errno() == errno.EBADF


def test_temp_files_are_hidden_beside_the_target(tmp_path: Path):
    writer = base.AtomicFileWriter(str(tmp_path / "sub" / "name"), 0.0)
    with writer:
        writer.write(b"x")
        (temp,) = (tmp_path / "sub").iterdir()
        assert temp.name.startswith(".name.")
        assert temp.name.endswith(".part")
    assert list((tmp_path / "sub").iterdir()) == []
