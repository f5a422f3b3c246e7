"""What this disk allows for small durable writes, with no HTTP: the ceiling a 4 KiB PUT is judged against.

N processes (the servers' worker count) each loop, for the cell's duration:
create a hidden temp file in one of 256 shard directories, write 4 KiB, fsync
it, rename it to its final name, fsync the directory. That is the durable part
of a PUT (ours also records a digest attribute and an inventory row), so
"PUT c=16 / probe" says how much of the disk's own limit the gateway reaches.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any

SHARDS = 256
#: Ids of one process never meet another's.
ID_BLOCK = 1_000_000_000


def _loop(directory: str, index: int, duration: float, size: int, go: Any, counts: Any) -> None:
    data = b"x" * size
    shard_fds = [
        os.open(os.path.join(directory, f"{s:02x}"), os.O_RDONLY | os.O_DIRECTORY) for s in range(SHARDS)
    ]
    done, file_id = 0, index * ID_BLOCK
    go.wait()
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        file_id += 1
        shard = file_id % SHARDS
        folder = os.path.join(directory, f"{shard:02x}")
        temp, final = os.path.join(folder, f".{file_id}.part"), os.path.join(folder, str(file_id))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final)
        os.fsync(shard_fds[shard])
        done += 1
    for fd in shard_fds:
        os.close(fd)
    counts.put(done)


def fsync_probe(workdir: Path, processes: int, duration: float, size: int = 4096) -> dict[str, Any]:
    """Run the probe in ``workdir`` (removed after); return files per second over all processes."""
    directory = workdir / "fsync-probe"
    for shard in range(SHARDS):
        (directory / f"{shard:02x}").mkdir(parents=True)
    context = multiprocessing.get_context("fork")
    go, counts = context.Event(), context.Queue()
    workers = [
        context.Process(target=_loop, args=(str(directory), index, duration, size, go, counts))
        for index in range(processes)
    ]
    try:
        for worker in workers:
            worker.start()
        os.sync()
        started = time.monotonic()
        go.set()
        total = sum(counts.get(timeout=duration + 120) for _ in workers)
        elapsed = time.monotonic() - started
        for worker in workers:
            worker.join(timeout=30)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        shutil.rmtree(directory, ignore_errors=True)
    return {"processes": processes, "size": size, "files": total, "seconds": elapsed,
            "ops_per_s": total / max(elapsed, 1e-9)}  # fmt: skip
