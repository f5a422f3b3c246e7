"""The tape section: migrate, release, recall and verify files through the emulated library.

The library keeps its default cost model (an LTO-9 class drive: 30 s mount,
20 s unmount, 60 s to locate across a whole tape, 381 MiB/s) and only
``time_scale`` shrinks every delay, so a run takes a minute or two. The
library's counters (mounts, unmounts, bytes located, read and written) are
exact whatever the scale; the seconds are scaled model time plus whatever
the real disk and CPU add.

Volumes are made small enough that the files spread over several of them,
since what the section measures is how the work is scheduled across volumes
and drives: verification with every drive must beat one drive by a margin.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.content import CHUNK_SIZE, large_chunks
from pacifica_like.core.config import Settings, load_settings
from pacifica_like.core.errors import ArchiveError
from pacifica_like.storage import registry
from pacifica_like.storage.tape import operations
from pacifica_like.storage.tape.backend import TapeBackend
from pacifica_like.storage.tape.library import TapeLibrary
from pacifica_like.storage.tape.stager import HEADER_SIZE

MIB = 1 << 20
#: Verification with every drive must take at most this share of the one-drive time.
VERIFY_SPEEDUP_TARGET = 0.6
#: Migration writing with every drive (one volume each) must take at most this share of one drive's time.
MIGRATE_SPEEDUP_TARGET = 0.6
#: The mtime every stored file carries.
MTIME = 784111777.0
SEED = 20241107


@dataclass(frozen=True)
class Workload:
    """What the section stores and how fast the library runs.

    ``time_scale`` 0.05 (0.02 with --quick) is picked so the modelled time
    dominates. Transfers are paced at 381 MiB/s / scale, about 7.4 GiB/s,
    faster than the stager can hash (OpenSSL sha-256, ~1.6 GiB/s), so data
    moves at CPU speed: ~0.07 s per volume of ~100 MiB, against 2.5 s of
    scaled mount and unmount per volume. Mounts and unmounts are what two
    drives overlap, so the speed-up of the second drive shows; at a scale of
    0.001 they would shrink to the same order as the hashing, and the CPUs,
    not the drives, would set the pace.
    """

    files: int
    min_mib: int
    max_mib: int
    volumes: int
    time_scale: float
    seed: int = SEED

    def sizes(self) -> list[int]:
        """Return each file's size in bytes (seeded: the same every run)."""
        rng = random.Random(self.seed)
        return [rng.randint(self.min_mib * MIB, self.max_mib * MIB) for _ in range(self.files)]

    def volume_capacity(self, sizes: list[int]) -> int:
        """Return a capacity that spreads ``sizes`` over ``volumes`` volumes.

        Capacity = an even share of the records plus room for the largest
        one. Migration fills volumes first fit, so every volume but the last
        used is filled past the share: the files need at most ``volumes``
        volumes, and exactly that many when records are small beside a share.
        """
        records = [HEADER_SIZE + size for size in sizes]
        return math.ceil(sum(records) / self.volumes) + max(records)


FULL = Workload(files=64, min_mib=4, max_mib=16, volumes=6, time_scale=0.05)
QUICK = Workload(files=24, min_mib=1, max_mib=4, volumes=4, time_scale=0.02)


@dataclass
class Phase:
    """One tape operation's figures: wall time, bytes, and the library counters it moved."""

    kind: str
    label: str
    drives: int | None
    files: int
    bytes: int
    seconds: float
    counters: dict[str, int]
    failed: list[tuple[int, str]] = field(default_factory=list)

    @property
    def mib_per_s(self) -> float:
        """Bytes of the files handled per wall second, in MiB/s."""
        return self.bytes / MIB / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy."""
        return {**asdict(self), "mib_per_s": self.mib_per_s}


def _phase(
    kind: str, label: str, drives: int | None, outcome: operations.Outcome, nbytes: int | None = None
) -> Phase:
    return Phase(
        kind=kind,
        label=label,
        drives=drives,
        files=len(outcome.done),
        bytes=outcome.bytes if nbytes is None else nbytes,
        seconds=outcome.seconds,
        counters=dict(outcome.counters),
        failed=list(outcome.failed),
    )


def _store(backend: TapeBackend, sizes: list[int], seed: int) -> dict[int, bytes]:
    """Write file ids 1..len(sizes) with pseudo-random bytes; return each one's sha-256."""
    digests = {}
    for file_id, size in enumerate(sizes, start=1):
        digest = hashlib.sha256()
        with backend.open_writer(file_id, MTIME) as writer:
            for chunk in large_chunks(size, seed + file_id):
                digest.update(chunk)
                writer.write(chunk)
            writer.commit()
        digests[file_id] = digest.digest()
    return digests


def _read_back(backend: TapeBackend, digests: dict[int, bytes]) -> dict[str, int]:
    """Hash every recalled file from the disk cache; count ok, missing (still offline) and bad."""
    counts = {"ok": 0, "missing": 0, "bad": 0}
    for file_id, expected in digests.items():
        digest = hashlib.sha256()
        try:
            with backend.open_reader(file_id) as reader:
                while chunk := reader.read(CHUNK_SIZE):
                    digest.update(chunk)
        except ArchiveError:
            counts["missing"] += 1
            continue
        counts["ok" if digest.digest() == expected else "bad"] += 1
    return counts


def _verify(backend: TapeBackend, drives: int) -> Phase:
    """Verify every copy (fraction 1.0) with ``drives`` workers."""
    plan = operations.plan_verify(backend, 1.0, seed="bench", max_age_days=365.0)
    checks, outcome = operations.run_verify(backend, plan, drives)
    # run_verify reports per volume, not per file: take files, bytes and failures from its checks.
    label = f"verify all, {drives} drive{'s' if drives > 1 else ''}"
    phase = _phase("verify", label, drives, outcome, sum(c.bytes for c in checks))
    phase.files = sum(c.files for c in checks)
    phase.failed = [(file_id, "mismatch") for c in checks for file_id in c.mismatches]
    phase.failed += [(file_id, c.error or "unreadable") for c in checks for file_id in c.unreadable]
    return phase


def _migrate_with(workdir: Path, workload: Workload, capacity: int, sizes: list[int], drives: int) -> Phase:
    """Store the files in a fresh library under ``workdir``; migrate them, ``drives`` volumes at once."""
    settings = _initialised(workdir, workload, capacity)
    backend = registry.create(settings)
    assert isinstance(backend, TapeBackend)
    try:
        ids = list(_store(backend, sizes, workload.seed))
        steps = operations.plan_migrate(backend, ids, drives)
        outcome = operations.run_migrate(backend, steps, drives=drives)
    finally:
        backend.close()
    label = f"migrate, {drives} drive{'s' if drives > 1 else ''}"
    return _phase("migrate-drives", label, drives, outcome)


def migrate_ratio(results: dict[str, Any]) -> float | None:
    """Return the all-drives migration time over the one-drive time (None if not measured)."""
    by_drives = {p.drives: p for p in results["phases"] if p.kind == "migrate-drives"}
    one, many = by_drives.get(1), by_drives.get(results["settings"]["drives"])
    if one is None or many is None or one.seconds <= 0:
        return None
    return many.seconds / one.seconds


def _initialised(workdir: Path, workload: Workload, capacity: int) -> Settings:
    """Return the settings of a fresh library in ``workdir``, made as ``tape init`` makes it."""
    settings = _settings(workdir, workload, capacity)
    library = TapeLibrary(settings.tape)
    try:
        library.initialise()
    finally:
        library.catalog.close()
    return settings


def _settings(workdir: Path, workload: Workload, capacity: int) -> Settings:
    """Return settings for a fresh library in ``workdir``: default cost model, scaled."""
    return load_settings(
        flags={
            "archive": {"backend": "tape", "prefix": str(workdir / "archive")},
            "tape": {
                "library": str(workdir / "library"),
                "volumes": max(8, workload.volumes),
                "volume_capacity": capacity,
                "time_scale": workload.time_scale,
            },
        },
        env={},  # PAI_TAPE_* from the caller's environment must not change what is measured
    )


def _describe(settings: Settings, workload: Workload, sizes: list[int], capacity: int) -> dict[str, Any]:
    tape = settings.tape
    return {
        "files": workload.files,
        "sizes_mib": [workload.min_mib, workload.max_mib],
        "bytes": sum(sizes),
        "seed": workload.seed,
        "drives": tape.drives,
        "volumes": tape.volumes,
        "volumes_wanted": workload.volumes,
        "volume_capacity": capacity,
        "mount_seconds": tape.mount_seconds,
        "unmount_seconds": tape.unmount_seconds,
        "locate_seconds": tape.locate_seconds,
        "read_mib_s": tape.read_mib_s,
        "write_mib_s": tape.write_mib_s,
        "time_scale": tape.time_scale,
        "verify_after_write": tape.verify_after_write,
        "library": tape.library,
    }


def run_tape(workdir: Path, workload: Workload, log: Callable[[str], None]) -> dict[str, Any]:
    """Store the files, then migrate, release, recall and verify them; return the results.

    Everything lives under ``workdir``, which the caller removes.
    """
    sizes = workload.sizes()
    capacity = workload.volume_capacity(sizes)
    settings = _initialised(workdir, workload, capacity)
    results: dict[str, Any] = {"settings": _describe(settings, workload, sizes, capacity), "phases": []}
    drives = settings.tape.drives

    def record(phase: Phase) -> None:
        results["phases"].append(phase)
        log(
            f"tape {phase.label:<22} {phase.seconds:7.2f} s {phase.mib_per_s:8.1f} MiB/s "
            f"mounts {phase.counters.get('mounts', 0)} failed {len(phase.failed)}"
        )

    backend = registry.create(settings)
    assert isinstance(backend, TapeBackend)
    try:
        log(
            f"tape: storing {len(sizes)} files ({sum(sizes) / MIB:.0f} MiB) in {workdir}, "
            f"time_scale {settings.tape.time_scale:g}"
        )
        started = time.monotonic()
        digests = _store(backend, sizes, workload.seed)
        results["store_seconds"] = time.monotonic() - started
        ids = list(digests)
        steps = operations.plan_migrate(backend, ids)
        results["volumes_used"] = len({s.vsn for s in steps if s.action == "migrate"})
        # run_migrate fills one volume after another in this thread: one drive at a time.
        record(_phase("migrate", "migrate + read-back", 1, operations.run_migrate(backend, steps)))
        release = operations.run_release(backend, operations.plan_release(backend, ids))
        record(_phase("release", "release (disk only)", None, release))
        # Each tape phase below starts with empty drives (unloaded untimed), so its counters are its own.
        backend.library.unload_idle()
        recall = operations.run_recall(backend, operations.plan_recall(backend, ids), drives)
        record(_phase("recall", f"recall all, {drives} drives", drives, recall))
        results["readback"] = _read_back(backend, digests)
        for workers in (1, drives):
            backend.library.unload_idle()
            record(_verify(backend, workers))
    finally:
        backend.close()
    # Migration with one writer per drive, each in a library of its own holding the same files.
    for workers in (1, drives):
        record(_migrate_with(workdir / f"migrate-{workers}", workload, capacity, sizes, workers))
    return results


def verify_ratio(results: dict[str, Any]) -> float | None:
    """Return the all-drives verify time over the one-drive verify time (None if not measured)."""
    by_drives = {p.drives: p for p in results["phases"] if p.kind == "verify"}
    drives = results["settings"]["drives"]
    one, many = by_drives.get(1), by_drives.get(drives)
    if one is None or many is None or one.seconds <= 0:
        return None
    return many.seconds / one.seconds


def error_count(results: dict[str, Any]) -> int:
    """Return every failure: failed files in any phase and recalled files with wrong bytes."""
    failed = sum(len(phase.failed) for phase in results["phases"])
    readback = results["readback"]
    unverified = sum(
        results["settings"]["files"] - phase.files for phase in results["phases"] if phase.kind == "verify"
    )
    return failed + readback["bad"] + readback["missing"] + unverified
