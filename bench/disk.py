"""The disk's own limit, measured with dd on the filesystem that holds the data dirs.

``dd conv=fsync`` writes through the page cache and flushes before it reports,
which is the same work a durable PUT does; the large-file PUT is judged
against it. The read back is reported twice: through the page cache (what a
GET right after a PUT sees) and with O_DIRECT (the device itself).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20
_SUMMARY = re.compile(r"^(\d+) bytes .* copied, ([0-9.]+) s", re.MULTILINE)


@dataclass
class DdResult:
    """One dd run: what it did and how fast."""

    what: str
    command: list[str]
    bytes: int
    seconds: float
    mib_per_s: float
    wall_seconds: float

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy."""
        return asdict(self)


def run_dd(what: str, args: list[str], timeout: float) -> DdResult:
    """Run ``dd ARGS``, returning its own byte count and time (C locale output)."""
    command = ["dd", *args]
    started = time.monotonic()
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    wall = time.monotonic() - started
    match = _SUMMARY.search(done.stderr)
    if match is None:
        raise RuntimeError(f"cannot parse dd output: {done.stderr!r}")
    size, seconds = int(match.group(1)), float(match.group(2))
    return DdResult(what, command, size, seconds, size / MIB / max(seconds, 1e-9), wall)


def measure_disk(workdir: Path, size_mib: int, timeout: float = 900.0) -> dict[str, DdResult]:
    """Write ``size_mib`` MiB with conv=fsync, read it back twice, delete it."""
    path = workdir / "dd-probe.bin"
    os.sync()
    try:
        write = run_dd(
            "write conv=fsync",
            ["if=/dev/zero", f"of={path}", "bs=1M", f"count={size_mib}", "conv=fsync"],
            timeout,
        )
        cached = run_dd("read (page cache)", [f"if={path}", "of=/dev/null", "bs=1M"], timeout)
        direct = run_dd("read iflag=direct", [f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"], timeout)
    finally:
        path.unlink(missing_ok=True)
    return {"write": write, "read": cached, "read_direct": direct}
