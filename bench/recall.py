"""The recall section: one bulk request through the scheduler, against the same files in request order.

Files are spread at random over the volumes (each volume also holds files
nobody asks for, so reading the wanted ones means skipping over others), the
request lists them in random order, and they are recalled twice from the same
released state:

* **bulk**: one ``POST /api/v1/stage`` through the real app, recalled by the
  real scheduler (every drive of the library);
* **FIFO**: ``TapeBackend.recall`` per file in request order, one at a time,
  as a client posting one file after another gets it.

Counts come from the emulator's counters (``time_scale`` 0, so nothing
sleeps); simulated seconds are computed from those counters and the default
LTO-9 class cost model. The locate minimum is, per volume, one pass from the
beginning of tape over the requested files in position order.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import webtest

from pacifica_like.bulk.scheduler import Scheduler
from pacifica_like.core.config import Settings, TapeSettings, load_settings
from pacifica_like.storage import registry
from pacifica_like.storage.tape import operations
from pacifica_like.storage.tape.backend import TapeBackend
from pacifica_like.storage.tape.library import DriveInfo
from pacifica_like.storage.tape.stager import HEADER_SIZE
from pacifica_like.web.app import build_app

MTIME = 784111777.0
#: Bulk must mount at least this many times fewer cartridges than FIFO.
MOUNT_RATIO_TARGET = 10.0
#: Bulk locate distance at most this multiple of the per-volume one-pass minimum.
LOCATE_RATIO_TARGET = 2.0
#: The cost model the simulated seconds use (the library's defaults: an LTO-9 class drive).
COST = TapeSettings()


@dataclass(frozen=True)
class RecallWorkload:
    """How many files are asked for, over how many volumes, and how many others sit between them."""

    files: int
    volumes: int
    #: Files stored but not requested, per requested file (they make the locates real).
    filler: float = 0.5
    min_kib: int = 16
    max_kib: int = 256
    drives: int = 2
    seed: int = 20241108


FULL = RecallWorkload(files=10_000, volumes=50)
QUICK = RecallWorkload(files=1_000, volumes=10)


def _settings(workdir: Path, workload: RecallWorkload, capacity: int) -> Settings:
    return load_settings(
        flags={
            "archive": {"backend": "tape", "prefix": str(workdir / "archive")},
            "tape": {
                "library": str(workdir / "library"),
                "volumes": workload.volumes,
                "drives": workload.drives,
                "volume_capacity": capacity,
                "time_scale": 0.0,
                # Set-up only: copies are marked verified below instead of read back.
                "verify_after_write": False,
            },
            "bulk": {"mount_min_files": 1, "max_wait_seconds": 0.0, "poll_seconds": 0.05},
            "server": {"access_log": "off"},
        },
        env={},
    )


def _populate(
    backend: TapeBackend, workload: RecallWorkload, rng: random.Random
) -> tuple[list[int], dict[int, int]]:
    """Store, migrate (each file to a random volume) and release every file; return (request order, sizes)."""
    total = workload.files + int(workload.files * workload.filler)
    sizes = {
        file_id: rng.randint(workload.min_kib, workload.max_kib) << 10 for file_id in range(1, total + 1)
    }
    for file_id, size in sizes.items():
        with backend.open_writer(file_id, MTIME) as writer:
            writer.write(rng.randbytes(size))
            writer.commit()
    vsns = [row.vsn for row in backend.catalog.Volume.select().order_by(backend.catalog.Volume.vsn)]
    groups: dict[str, list[int]] = {vsn: [] for vsn in vsns}
    for file_id in sizes:
        groups[rng.choice(vsns)].append(file_id)
    volume = backend.catalog.Volume
    for vsn, ids in groups.items():
        # Send the group to its volume: every other volume is marked full while it migrates.
        with backend.catalog.db.atomic():
            volume.update(full=True).where(volume.vsn != vsn).execute()
            volume.update(full=False).where(volume.vsn == vsn).execute()
        outcome = operations.run_migrate(backend, operations.plan_migrate(backend, ids))
        if outcome.failed:
            raise RuntimeError(f"migration to {vsn} failed: {outcome.failed[:3]}")
    copy = backend.catalog.TapeCopy
    with backend.catalog.db.atomic():
        copy.update(verified_at=time.time(), verify_result="ok").execute()
    _release(backend, list(sizes))
    wanted = rng.sample(sorted(sizes), workload.files)  # random subset, in random order
    return wanted, sizes


def _release(backend: TapeBackend, ids: list[int]) -> None:
    outcome = operations.run_release(backend, operations.plan_release(backend, ids))
    if outcome.failed:
        raise RuntimeError(f"release failed: {outcome.failed[:3]}")
    backend.library.unload_idle()


def _drive_deltas(before: list[DriveInfo], after: list[DriveInfo]) -> list[dict[str, int]]:
    keys = ("mounts", "unmounts", "bytes_located", "bytes_read")
    old = {d.name: d for d in before}
    return [{key: getattr(d, key) - getattr(old[d.name], key) for key in keys} for d in after]


def simulated_seconds(drive: dict[str, int], capacity: int) -> float:
    """Model seconds one drive spent: mounts, unmounts, locates (by head travel) and reads."""
    return (
        drive["mounts"] * COST.mount_seconds
        + drive["unmounts"] * COST.unmount_seconds
        + drive["bytes_located"] / capacity * COST.locate_seconds
        + drive["bytes_read"] / (COST.read_mib_s * (1 << 20))
    )


def _phase(backend: TapeBackend, capacity: int, parallel: bool, work: Callable[[], None]) -> dict[str, Any]:
    """Run ``work`` and report the counters it moved and their simulated time."""
    before = backend.library.drives()
    started = time.monotonic()
    work()
    wall = time.monotonic() - started
    drives = _drive_deltas(before, backend.library.drives())
    totals = {key: sum(d[key] for d in drives) for key in drives[0]}
    per_drive = [simulated_seconds(d, capacity) for d in drives]
    return {
        **totals,
        "drive_seconds": round(sum(per_drive), 1),
        # Bulk drives work in parallel; FIFO waits for each recall before asking for the next.
        "simulated_seconds": round(max(per_drive) if parallel else sum(per_drive), 1),
        "wall_seconds": round(wall, 1),
        "per_drive": drives,
    }


def locate_minimum(backend: TapeBackend, ids: list[int]) -> int:
    """Bytes a head travels reading ``ids`` from each volume in one pass from the beginning of tape."""
    positions = backend.tape_positions(ids)
    by_volume: dict[str, list[tuple[int, int]]] = {}
    for position in positions.values():
        by_volume.setdefault(position.vsn, []).append((position.position, position.size))
    travel = 0
    for extents in by_volume.values():
        head = 0
        for offset, size in sorted(extents):
            travel += abs(offset - head)
            head = offset + HEADER_SIZE + size
    return travel


def run_recall(workdir: Path, workload: RecallWorkload, log: Callable[[str], None]) -> dict[str, Any]:
    """Populate the library, recall the request both ways, and return the counts."""
    rng = random.Random(workload.seed)
    filler = int(workload.files * workload.filler)
    mean = (workload.min_kib + workload.max_kib) / 2 * 1024
    # Room for an even share of every record, plus slack for the random spread.
    capacity = int((workload.files + filler) * (mean + HEADER_SIZE) / workload.volumes * 1.6) + (1 << 20)
    settings = _settings(workdir, workload, capacity)
    from pacifica_like.bulk.store import BulkStore
    from pacifica_like.storage.tape.library import TapeLibrary

    library = TapeLibrary(settings.tape, require_stager=False)
    library.initialise()
    library.catalog.close()
    backend = registry.create(settings)
    assert isinstance(backend, TapeBackend)
    try:
        started = time.monotonic()
        log(f"recall: storing and migrating {workload.files + filler} files over {workload.volumes} volumes")
        wanted, sizes = _populate(backend, workload, rng)
        setup = time.monotonic() - started
        minimum = locate_minimum(backend, wanted)
        volumes = len({p.vsn for p in backend.tape_positions(wanted).values()})

        app = webtest.TestApp(build_app(settings, backend))

        def bulk() -> None:
            answer = app.post_json("/api/v1/stage", {"files": [{"path": f"/{i}"} for i in wanted]})
            Scheduler.from_settings(settings, backend).run_until_idle()
            summary = app.get(f"/api/v1/stage/{answer.json['requestId']}?limit=1").json["summary"]
            if summary["states"]["COMPLETED"] != len(wanted):
                raise RuntimeError(f"bulk recall incomplete: {summary['states']}")

        log(f"recall: bulk request of {len(wanted)} files")
        bulk_result = _phase(backend, capacity, True, bulk)
        _release(backend, wanted)

        def fifo() -> None:
            for file_id in wanted:
                backend.recall(file_id)

        log(f"recall: the same {len(wanted)} files one at a time in request order (FIFO)")
        fifo_result = _phase(backend, capacity, False, fifo)
        BulkStore.open(settings.archive.catalog).close()
    finally:
        backend.close()
    return {
        "workload": asdict(workload),
        "volume_capacity": capacity,
        "volumes_touched": volumes,
        "bytes_requested": sum(sizes[i] for i in wanted),
        "locate_minimum": minimum,
        "setup_seconds": round(setup, 1),
        "bulk": bulk_result,
        "fifo": fifo_result,
        "posts": run_posts(workdir / "posts", log),
    }


#: POST /<id> for this many files, alternating over two volumes, with one drive.
POST_FILES = 40
#: Mounts the POSTs through the scheduler may cost (one per volume).
POST_MOUNTS_TARGET = 2


def run_posts(workdir: Path, log: Callable[[str], None], files: int = POST_FILES) -> dict[str, Any]:
    """POST /<id> for ``files`` offline files alternating over 2 volumes on 1 drive: direct, then scheduled.

    Direct: no scheduler runs, so each POST recalls its file itself (the
    backend's thread pool), as plain uWSGI without a worker does. Scheduled: a
    scheduler runs, so each POST queues a job and the scheduler reads each
    volume once. POSTs do not wait (``stage_waiters`` 0); mounts are the
    library's counters.
    """
    settings = load_settings(
        flags={
            "archive": {"backend": "tape", "prefix": str(workdir / "archive")},
            "tape": {
                "library": str(workdir / "library"),
                "volumes": 2,
                "drives": 1,
                "time_scale": 0.0,
                "stage_waiters": 0,
            },
            "bulk": {"mount_min_files": 1, "max_wait_seconds": 0.0, "poll_seconds": 0.05},
            "server": {"access_log": "off"},
        },
        env={},
    )
    from pacifica_like.storage.tape.library import TapeLibrary

    library = TapeLibrary(settings.tape, require_stager=False)
    library.initialise()
    library.catalog.close()
    backend = registry.create(settings)
    assert isinstance(backend, TapeBackend)
    results: dict[str, Any] = {"files": files, "volumes": 2, "drives": 1}
    try:
        ids = list(range(1, files + 1))
        for file_id in ids:
            with backend.open_writer(file_id, MTIME) as writer:
                writer.write(b"%d" % file_id * 100)
                writer.commit()
        volume = backend.catalog.Volume
        vsns = [row.vsn for row in volume.select().order_by(volume.vsn)]
        for vsn, group in zip(vsns, (ids[0::2], ids[1::2]), strict=True):  # odd ids on one, even on the other
            with backend.catalog.db.atomic():
                volume.update(full=True).where(volume.vsn != vsn).execute()
                volume.update(full=False).where(volume.vsn == vsn).execute()
            operations.run_migrate(backend, operations.plan_migrate(backend, group))
        app = webtest.TestApp(build_app(settings, backend))
        for mode in ("direct", "scheduled"):
            _release(backend, ids)
            running = Scheduler.from_settings(settings, backend)
            if mode == "scheduled":
                running.run_pass()  # it runs: POSTs queue for it
            before = backend.library.counters()
            started = time.monotonic()
            for file_id in ids:
                app.post(f"/{file_id}", status=(200, 202))
            if mode == "scheduled":
                running.run_until_idle(timeout=600)
                running.stop()
            deadline = time.monotonic() + 600
            while any(backend.tape_positions(ids).get(i) is not None for i in ids):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{mode} POSTs: files still offline after 600 s")
                time.sleep(0.05)
            after = backend.library.counters()
            results[mode] = {
                "mounts": after["mounts"] - before["mounts"],
                "bytes_read": after["bytes_read"] - before["bytes_read"],
                "wall_seconds": round(time.monotonic() - started, 2),
            }
            log(f"recall: {files} POSTs {mode}: {results[mode]['mounts']} mounts")
    finally:
        backend.close()
    return results


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def table(results: dict[str, Any]) -> str:
    """Return the recall section's table."""
    w = results["workload"]
    lines = [
        f"recall: {w['files']:,} files at random over {w['volumes']} volumes "
        f"({results['volumes_touched']} hold requested files), {w['drives']} drives, "
        f"{results['bytes_requested'] / (1 << 20):,.0f} MiB; counts from the emulator, "
        "seconds simulated from them (LTO-9 class cost model)",
        f"{'':<6} | {'mounts':>7} | {'bytes located':>15} | {'bytes read':>13} | {'sim. s':>9} | "
        f"{'drive s':>9} | {'wall s':>7}",
        "-" * 84,
    ]
    for name in ("bulk", "fifo"):
        r = results[name]
        lines.append(
            f"{name:<6} | {r['mounts']:>7,} | {r['bytes_located']:>15,} | {r['bytes_read']:>13,} | "
            f"{r['simulated_seconds']:>9,.0f} | {r['drive_seconds']:>9,.0f} | {r['wall_seconds']:>7.1f}"
        )
    lines.append(f"one-pass locate minimum: {results['locate_minimum']:,} bytes")
    posts = results.get("posts")
    if posts is not None:
        direct, scheduled = posts["direct"]["mounts"], posts["scheduled"]["mounts"]
        lines.append(
            f"{posts['files']} POST /<id> alternating over {posts['volumes']} volumes on "
            f"{posts['drives']} drive: {direct} mounts recalled directly, {scheduled} through the scheduler"
        )
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Check the targets: mounts against FIFO, locate distance against the one-pass minimum."""
    bulk, fifo = results["bulk"], results["fifo"]
    mounts = _ratio(fifo["mounts"], bulk["mounts"])
    locate = _ratio(bulk["bytes_located"], results["locate_minimum"])
    found = []
    posts = results.get("posts")
    if posts is not None:
        scheduled = posts["scheduled"]["mounts"]
        found.append(
            (
                f"{posts['files']} POSTs over 2 volumes on 1 drive: mounts <= {POST_MOUNTS_TARGET}",
                scheduled <= POST_MOUNTS_TARGET,
                f"{scheduled} (direct: {posts['direct']['mounts']})",
            )
        )
    return [
        *found,
        (
            f"bulk recall mounts >= {MOUNT_RATIO_TARGET:g}x fewer than FIFO",
            mounts is not None and mounts >= MOUNT_RATIO_TARGET,
            f"{mounts:.1f}x" if mounts is not None else "no mounts",
        ),
        (
            f"bulk locate distance <= {LOCATE_RATIO_TARGET:g}x the one-pass minimum",
            locate is not None and locate <= LOCATE_RATIO_TARGET,
            f"{locate:.2f}x" if locate is not None else "n/a",
        ),
    ]


def error_count(results: dict[str, Any]) -> int:
    """Return 1 when the section did not complete."""
    return 1 if "error" in results else 0
