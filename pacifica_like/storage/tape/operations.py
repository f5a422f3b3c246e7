"""Bulk tape work the maintenance CLI runs: migrate, release, recall and fixity verification.

Each operation has a *plan* step that reads the disk cache and the catalog and
changes nothing (what ``--dry-run`` prints), and a *run* step that carries the
plan out file by file. One file's failure is recorded in the report and the
run goes on; the caller decides the exit status from the report.

Recalls and verification read each volume's files in position order, with one
worker per drive, so volumes are worked on in parallel and each volume is
mounted once.

The functions take any :class:`~pacifica_like.storage.contract.TapeManaged`
backend (the tape backend, the emulated sideband HSM): they use its
``library``, ``catalog``, ``tape`` settings and ``events``, typed here as the
:class:`~pacifica_like.storage.hsm.TapeHsm` both are or hold.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pacifica_like.core.errors import ArchiveError, FileNotInArchive
from pacifica_like.storage.contract import CopyBad, FileStatus, Migrated
from pacifica_like.storage.hsm import (
    DUAL,
    OFFLINE,
    REGULAR,
    UNMIGRATING,
    RecallInProgress,
    TapeHsm,
    copy_matches,
)
from pacifica_like.storage.tape.catalog import CopyInfo, to_info
from pacifica_like.storage.tape.library import CopyDamaged, MountedDrive, VolumeFull
from pacifica_like.storage.tape.stager import HEADER_SIZE

#: Called with the bytes just processed, for progress bars.
Progress = Callable[[int], None]


def _no_progress(nbytes: int) -> None:
    """Ignore progress."""


@dataclass(frozen=True)
class Step:
    """One file's part in a plan: what would happen (``action``) or why not (``reason``)."""

    file_id: int
    action: str  # migrate | release | recall | skip | refuse
    size: int = 0
    vsn: str | None = None
    offset: int | None = None
    reason: str = ""


@dataclass
class Outcome:
    """What a run did: per-file results and the library counters it moved."""

    done: list[Step] = field(default_factory=list)
    skipped: list[Step] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """Bytes moved by the files that succeeded."""
        return sum(step.size for step in self.done)

    def summary(self) -> dict[str, object]:
        """Return the machine-readable summary."""
        rate = self.bytes / self.seconds / (1 << 20) if self.seconds > 0 else 0.0
        return {
            "files": len(self.done),
            "bytes": self.bytes,
            "skipped": len(self.skipped),
            "failed": [{"file": file_id, "error": error} for file_id, error in self.failed],
            "seconds": round(self.seconds, 3),
            "mib_per_second": round(rate, 1),
            "counters": self.counters,
        }


class _Run:
    """Times a run and records the counter deltas into its Outcome."""

    def __init__(self, backend: TapeHsm) -> None:
        self.backend = backend
        self.outcome = Outcome()
        self._lock = threading.Lock()

    def __enter__(self) -> _Run:
        self._start = time.monotonic()
        self._before = self.backend.library.counters()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.outcome.seconds = time.monotonic() - self._start
        after = self.backend.library.counters()
        self.outcome.counters = {key: after[key] - self._before[key] for key in after}

    def take(self, steps: list[Step], action: str) -> list[Step]:
        """Record a plan's skips and refusals (refusals fail); return the steps doing ``action``."""
        self.outcome.skipped.extend(s for s in steps if s.action == "skip")
        for step in steps:
            if step.action == "refuse":
                self.fail(step.file_id, step.reason)
        return [s for s in steps if s.action == action]

    def attempt(self, step: Step, action: Callable[[], object], progress: Progress) -> None:
        """Run one file's ``action``: done (with progress) if it returns, failed if it raises ArchiveError."""
        try:
            action()
        except ArchiveError as exc:
            self.fail(step.file_id, str(exc))
            return
        self.ok(step)
        progress(step.size)

    def ok(self, step: Step) -> None:
        with self._lock:
            self.outcome.done.append(step)

    def fail(self, file_id: int, error: str) -> None:
        with self._lock:
            self.outcome.failed.append((file_id, error))


def _by_volume(steps: Iterable[Step]) -> dict[str, list[Step]]:
    """Group steps by volume in first-seen order, each group in tape position order."""
    groups: dict[str, list[Step]] = {}
    for step in steps:
        assert step.vsn is not None
        groups.setdefault(step.vsn, []).append(step)
    for group in groups.values():
        group.sort(key=lambda step: step.offset or 0)
    return groups


def _parallel(vsns: list[str], workers: int, work: Callable[[str], None]) -> None:
    """Run ``work(vsn)`` for every volume, ``workers`` volumes at a time."""
    pending: queue.Queue[str] = queue.Queue()
    for vsn in vsns:
        pending.put(vsn)
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            try:
                vsn = pending.get_nowait()
            except queue.Empty:
                return
            try:
                work(vsn)
            except BaseException as exc:  # surfaced below, after the other workers finish
                errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(workers, len(vsns))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _status_or_note(backend: TapeHsm, file_id: int, steps: list[Step], action: str) -> FileStatus | None:
    """Return the file's status; for an id not in the archive, add an ``action`` step and return None."""
    try:
        return backend.status(file_id)
    except FileNotInArchive:
        steps.append(Step(file_id, action, reason="not in the archive"))
        return None


# -- migrate ---------------------------------------------------------------------


def plan_migrate(backend: TapeHsm, file_ids: Iterable[int], drives: int = 1) -> list[Step]:
    """Decide which volume and offset each REGULAR file would be written to.

    With one drive, volumes fill in VSN order: a file goes to the first volume
    with room for it (first fit), the way a fresh cartridge is taken when one
    fills. With ``drives`` > 1, the first ``drives`` volumes with room are
    written at once, one per drive: each file goes to the one with the fewest
    bytes planned so far that has room (first fit when none of them has).
    """
    volume = backend.catalog.Volume
    room = [[v.vsn, v.fill, v.capacity] for v in volume.select().where(~volume.full).order_by(volume.vsn)]
    lanes = room[: max(1, drives)]
    planned = {v[0]: 0 for v in lanes}
    steps = []
    for file_id in file_ids:
        status = _status_or_note(backend, file_id, steps, "skip")
        if status is None:
            continue
        if status.state != REGULAR:
            reason = "already on tape (DUAL)" if status.state == DUAL else f"not on disk ({status.state})"
            steps.append(Step(file_id, "skip", status.size, reason=reason))
            continue
        fits = [v for v in lanes if v[1] + HEADER_SIZE + status.size <= v[2]]
        if len(lanes) > 1 and fits:
            target = min(fits, key=lambda v: planned[v[0]])
        else:
            target = next((v for v in room if v[1] + HEADER_SIZE + status.size <= v[2]), None)
        if target is None:
            steps.append(Step(file_id, "refuse", status.size, reason="no volume has room for it"))
            continue
        steps.append(Step(file_id, "migrate", status.size, target[0], target[1]))
        target[1] += HEADER_SIZE + status.size
        if target[0] in planned:
            planned[target[0]] += HEADER_SIZE + status.size
    return steps


def migration_drives(backend: TapeHsm, wanted: int | None = None) -> int:
    """Drives a migration may use: ``wanted``, else ``[tape] migration_drives`` (0: all but one, >= 1)."""
    drives = backend.tape.drives
    chosen = wanted if wanted is not None else backend.tape.migration_drives or drives - 1
    return max(1, min(chosen, drives))


def run_migrate(
    backend: TapeHsm, steps: list[Step], progress: Progress = _no_progress, drives: int = 1
) -> Outcome:
    """Write the planned files to tape, then read each new copy back when configured to.

    Volumes are written ``drives`` at a time, one writer per drive. A file
    that no longer fits where planned (another migration got there first) is
    planned again against the catalog as it is now.
    """
    with _Run(backend) as run:
        todo = run.take(steps, "migrate")
        for _ in range(len(todo) + 1):
            if not todo:
                break
            retry: list[int] = []  # appended to by the writers' threads (list.append is atomic)
            groups = _by_volume(todo)

            def write(vsn: str, groups: dict[str, list[Step]] = groups, retry: list[int] = retry) -> None:
                _migrate_volume(backend, run, vsn, groups[vsn], retry, progress)

            _parallel(list(groups), drives, write)
            replanned = [s for s in plan_migrate(backend, sorted(retry), drives) if s.action != "skip"]
            todo = run.take(replanned, "migrate")
    return run.outcome


def _migrate_volume(
    backend: TapeHsm, run: _Run, vsn: str, group: list[Step], retry: list[int], progress: Progress
) -> None:
    written: list[tuple[Step, CopyInfo]] = []
    try:
        with backend.library.drive(vsn) as drive:
            for index, step in enumerate(group):
                try:
                    copy = _migrate_one(backend, drive, step)
                except VolumeFull:
                    retry.extend(s.file_id for s in group[index:])
                    break
                except ArchiveError as exc:
                    run.fail(step.file_id, str(exc))
                    continue
                if copy is not None:
                    written.append((Step(step.file_id, "migrate", copy.size, vsn, copy.offset), copy))
                    progress(copy.size)
            for step, copy in written:
                if backend.tape.verify_after_write:
                    try:
                        drive.verify(copy)
                    except CopyDamaged as exc:
                        run.fail(step.file_id, f"read-back after writing failed: {exc}")
                        continue
                    backend.catalog.record_verification(copy.id, "ok")
                run.ok(step)
    except ArchiveError as exc:  # the volume itself failed (missing, no drive)
        done = {step.file_id for step, _ in written}
        for step in group:
            if step.file_id not in done and step.file_id not in retry:
                run.fail(step.file_id, str(exc))


def _migrate_one(backend: TapeHsm, drive: MountedDrive, step: Step) -> CopyInfo | None:
    source = backend.migration_source(step.file_id)
    if source is None:
        return None  # migrated meanwhile by someone else
    fd, st, digest = source
    try:
        # The stager reads the inode we opened and checked, even if an upload renames over the name.
        copy = drive.append(f"/proc/self/fd/{fd}", step.file_id, st.st_mtime, st.st_ctime)
        if copy.sha256 != digest:
            backend.catalog.mark_stale(step.file_id)
            raise ArchiveError(
                f"file {step.file_id} on disk no longer matches the sha-256 recorded at ingest; "
                "its tape copy was retired and the disk file left alone for an operator to inspect"
            )
        # A PUT or DELETE that ran before the copy was recorded could not retire it.
        # Checked after recording, with the fd still open (so its inode number is not reused).
        if not _still_at(backend.path(step.file_id), st):
            backend.catalog.retire(copy.id)
            raise ArchiveError(
                f"file {step.file_id} was replaced or deleted while being migrated; its new copy was retired"
            )
    finally:
        os.close(fd)
    backend.events.emit(Migrated(step.file_id, copy.vsn, copy.offset))
    return copy


def _still_at(path: str, st: os.stat_result) -> bool:
    """True when ``path`` still names the inode ``st`` describes."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


# -- release ---------------------------------------------------------------------


#: Returns, for the ids held on disk by a pin (bulk staging), when the last pin expires (epoch seconds).
PinLookup = Callable[[list[int]], dict[int, float]]


def _pinned_reason(until: float) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
    return f"pinned on disk by a bulk stage request until {when} (release the request's pins first)"


def plan_release(backend: TapeHsm, file_ids: Iterable[int], pinned: PinLookup | None = None) -> list[Step]:
    """Decide which files can drop their disk copy, naming the tape copy that keeps each safe.

    ``pinned`` looks up pins (bulk staging keeps files on disk while a pin holds
    them): a pinned file is skipped, with the pin's expiry as the reason.
    """
    file_ids = list(file_ids)
    pins = pinned(file_ids) if pinned is not None and file_ids else {}
    steps = []
    for file_id in file_ids:
        status = _status_or_note(backend, file_id, steps, "refuse")
        if status is None:
            continue
        if status.state in (OFFLINE, UNMIGRATING):
            steps.append(Step(file_id, "skip", status.size, reason=f"already released ({status.state})"))
            continue
        if file_id in pins:
            steps.append(Step(file_id, "skip", status.size, reason=_pinned_reason(pins[file_id])))
            continue
        copies = backend.catalog.current_copies(file_id)
        matching = [c for c in copies if copy_matches(c, status.size, status.sha256)]
        safe = next((c for c in matching if c.safe), None)
        if safe is not None:
            steps.append(Step(file_id, "release", status.size, safe.vsn, safe.offset))
        elif matching:
            steps.append(Step(file_id, "refuse", status.size, reason="tape copy not verified yet"))
        else:
            steps.append(
                Step(
                    file_id,
                    "refuse",
                    status.size,
                    reason="REGULAR: no tape copy of this version; migrate it first",
                )
            )
    return steps


def run_release(
    backend: TapeHsm,
    steps: list[Step],
    progress: Progress = _no_progress,
    pinned: PinLookup | None = None,
) -> Outcome:
    """Release the planned files; refusals from the plan count as failures.

    With ``pinned``, each file's pins are looked up again just before its
    release, so a stage request that pinned it after the plan keeps it on disk;
    and once more just after: a request that found the file on disk and pinned
    it while it was being released gets it recalled back before this returns.
    """
    with _Run(backend) as run:
        for step in run.take(steps, "release"):
            pins = pinned([step.file_id]) if pinned is not None else {}
            if step.file_id in pins:
                run.outcome.skipped.append(
                    Step(step.file_id, "skip", step.size, reason=_pinned_reason(pins[step.file_id]))
                )
                continue
            if pinned is None:
                run.attempt(step, functools.partial(backend.release, step.file_id), progress)
            else:
                _release_unless_pinned(backend, run, step, pinned, progress)
    return run.outcome


def _release_unless_pinned(
    backend: TapeHsm, run: _Run, step: Step, pinned: PinLookup, progress: Progress
) -> None:
    """Release one file; if a pin appeared meanwhile, recall it back and count it as skipped."""
    try:
        backend.release(step.file_id)
    except ArchiveError as exc:
        run.fail(step.file_id, str(exc))
        return
    pins = pinned([step.file_id])
    if step.file_id not in pins:
        run.ok(step)
        progress(step.size)
        return
    # The pin's request saw the file on disk (so it queued no recall): it must be there again.
    try:
        backend.recall(step.file_id)
    except ArchiveError as exc:
        run.fail(step.file_id, f"pinned while being released, and the recall back failed: {exc}")
        return
    reason = _pinned_reason(pins[step.file_id])
    run.outcome.skipped.append(Step(step.file_id, "skip", step.size, reason=reason))


# -- recall ----------------------------------------------------------------------


def plan_recall(backend: TapeHsm, file_ids: Iterable[int]) -> list[Step]:
    """Find the tape copy each offline file would be read from."""
    steps = []
    for file_id in file_ids:
        status = _status_or_note(backend, file_id, steps, "refuse")
        if status is None:
            continue
        if status.state not in (OFFLINE, UNMIGRATING):
            steps.append(Step(file_id, "skip", status.size, reason=f"already on disk ({status.state})"))
            continue
        usable = [c for c in backend.catalog.current_copies(file_id) if not c.bad]
        if not usable:
            steps.append(Step(file_id, "refuse", status.size, reason="its only tape copies are bad"))
            continue
        steps.append(Step(file_id, "recall", usable[0].size, usable[0].vsn, usable[0].offset))
    return steps


def run_recall(
    backend: TapeHsm, steps: list[Step], workers: int | None = None, progress: Progress = _no_progress
) -> Outcome:
    """Recall the planned files, one worker per drive, each volume read in position order."""
    with _Run(backend) as run:
        groups = _by_volume(run.take(steps, "recall"))

        def recall_volume(vsn: str) -> None:
            # Files another process is recalling: waited for once our drive is free, as it may need it.
            deferred: list[Step] = []
            try:
                with backend.library.drive(vsn) as drive:
                    for step in groups[vsn]:
                        try:
                            copies = backend.catalog.current_copies(step.file_id)
                            copy = next(c for c in copies if c.vsn == vsn and c.offset == step.offset)
                            backend.recall(step.file_id, copy, drive)
                        except RecallInProgress:
                            deferred.append(step)
                            continue
                        except (ArchiveError, StopIteration) as exc:
                            run.fail(step.file_id, str(exc) or "its tape copy was retired meanwhile")
                            continue
                        run.ok(step)
                        progress(step.size)
                for step in deferred:
                    run.attempt(step, functools.partial(backend.recall, step.file_id), progress)
            except ArchiveError as exc:
                for step in groups[vsn]:
                    if step not in run.outcome.done:
                        run.fail(step.file_id, str(exc))

        _parallel(list(groups), workers or backend.tape.drives, recall_volume)
    return run.outcome


# -- fixity verification --------------------------------------------------------


@dataclass
class VolumeCheck:
    """One volume's verification result."""

    vsn: str
    files: int = 0
    bytes: int = 0
    mismatches: list[int] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def report(self) -> dict[str, object]:
        """Return this volume's row of the JSON summary."""
        return {
            "vsn": self.vsn,
            "files": self.files,
            "bytes": self.bytes,
            "mismatches": self.mismatches,
            "unreadable": self.unreadable,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }


def plan_verify(
    backend: TapeHsm, fraction: float, seed: str | None, max_age_days: float, now: float | None = None
) -> dict[str, list[CopyInfo]]:
    """Pick each volume's sample, in position order: a random ``fraction`` plus every overdue copy.

    A copy is overdue when it was never verified or not within ``max_age_days``.
    With ``seed`` the sample is reproducible per volume, whatever else changes.
    """
    now = time.time() if now is None else now
    cutoff = now - max_age_days * 86400
    rows = backend.catalog.TapeCopy.select().where(backend.catalog.TapeCopy.stale == False)  # noqa: E712
    by_volume: dict[str, list[CopyInfo]] = {}
    for row in rows.order_by(backend.catalog.TapeCopy.vsn, backend.catalog.TapeCopy.offset):
        by_volume.setdefault(row.vsn, []).append(to_info(row))
    plan = {}
    for vsn, copies in by_volume.items():
        rng = random.Random(f"{seed}:{vsn}") if seed is not None else random.Random()
        count = min(len(copies), math.ceil(fraction * len(copies)))
        chosen = {c.id for c in rng.sample(copies, count)}
        chosen |= {c.id for c in copies if c.verified_at is None or c.verified_at < cutoff}
        plan[vsn] = [c for c in copies if c.id in chosen]
    return {vsn: sample for vsn, sample in plan.items() if sample}


def run_verify(
    backend: TapeHsm,
    plan: dict[str, list[CopyInfo]],
    workers: int | None = None,
    progress: Progress = _no_progress,
) -> tuple[list[VolumeCheck], Outcome]:
    """Verify every sampled copy through the stager; unload each volume when its check is done.

    Results are recorded per copy (a mismatch marks the copy bad; nothing is
    repaired). Returns one VolumeCheck per volume and the run's counters.
    """
    checks = {vsn: VolumeCheck(vsn) for vsn in plan}
    with _Run(backend) as run:

        def verify_volume(vsn: str) -> None:
            check = checks[vsn]
            start = time.monotonic()
            try:
                with backend.library.drive(vsn) as drive:
                    try:
                        for copy in plan[vsn]:
                            try:
                                drive.verify(copy)
                            except CopyDamaged:
                                damaged = backend.library.copy(copy.id)
                                target = check.mismatches if damaged.bad else check.unreadable
                                target.append(copy.file_id)
                                if damaged.bad:  # a bad copy leaves the file's archive rows
                                    backend.events.emit(CopyBad(copy.file_id, copy.vsn, copy.offset))
                            else:
                                backend.catalog.record_verification(copy.id, "ok")
                                run.ok(Step(copy.file_id, "verify", copy.size, vsn, copy.offset))
                            check.files += 1
                            check.bytes += copy.size
                            progress(copy.size)
                    finally:
                        with contextlib.suppress(ArchiveError):
                            drive.unload()
            except ArchiveError as exc:
                check.error = str(exc)
                checked = check.files
                for copy in plan[vsn][checked:]:
                    backend.catalog.record_verification(copy.id, "unreadable")
                    check.unreadable.append(copy.file_id)
            check.seconds = time.monotonic() - start

        _parallel(list(plan), workers or backend.tape.drives, verify_volume)
    return list(checks.values()), run.outcome
