"""The HSM machinery: a disk cache under the prefix, with the emulated tape library behind it.

Shared by two backends, so it lives beside them rather than in either:
:class:`TapeHsm` is what the tape backend serves directly
(:mod:`pacifica_like.storage.tape.backend`) and what the emulated sideband HSM
composes (:mod:`pacifica_like.storage.sideband.backend`). It holds a
:class:`~pacifica_like.storage.diskcache.DiskCache` (the disk tier) and a
:class:`~pacifica_like.storage.tape.library.TapeLibrary`, and announces
every change on its event bus (stored, replaced, moved, deleted,
recalled, released, copy found bad; :mod:`pacifica_like.storage.tape.operations`
announces migrated).

A file's state (DMF's names) is derived on every call from the disk cache and
the catalog, so every process sees a change the moment another makes it:

* REGULAR: on disk, no tape copy of this version;
* DUAL: on disk and on tape (a current copy whose sha-256 equals the disk file's);
* OFFLINE: only on tape;
* UNMIGRATING: only on tape, and a live process is recalling it.

Comparing digests, not flags, is what keeps releases safe: whatever order a
crash interrupts a PUT in, a disk file that differs from its tape copy is
REGULAR and release refuses to drop it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

import peewee

from pacifica_like.core.config import Settings, TapeSettings
from pacifica_like.core.durable import fsync_dir
from pacifica_like.core.errors import Conflict, FileNotInArchive, OfflineOnTape, StorageUnavailable
from pacifica_like.core.slots import SlotPool
from pacifica_like.storage.contract import (
    Backend,
    CopyBad,
    Deleted,
    EventBus,
    ExpectedDigest,
    FileStatus,
    ListingErrorHandler,
    MetricSample,
    Reader,
    Recalled,
    Released,
    TapePosition,
    TempFileHandler,
    VolumeSession,
    Writer,
    hash_file,
    publish,
    read_sha256,
    record_checksums,
    translate_os_errors,
)
from pacifica_like.storage.diskcache import AnnouncingWriter, DiskCache
from pacifica_like.storage.tape.catalog import CopyInfo, to_info, translate_db_errors
from pacifica_like.storage.tape.library import CopyDamaged, MountedDrive, TapeLibrary, owner_alive

REGULAR, DUAL, OFFLINE, UNMIGRATING = "REGULAR", "DUAL", "OFFLINE", "UNMIGRATING"
_Result = TypeVar("_Result")


class _NoUpkeep:
    """No sideband database is kept (see :func:`pacifica_like.storage.sideband.updater.keep_sideband`)."""

    updater = None


_NO_UPKEEP = _NoUpkeep()


class RecallInProgress(StorageUnavailable):
    """Another process is recalling the file; a caller holding a drive must not wait for it."""


def _catalog_errors(method: Callable[..., _Result]) -> Callable[..., _Result]:
    """Report catalog failures of a contract method as StorageUnavailable (503), not as a 500."""

    @functools.wraps(method)
    def translated(self: object, file_id: int, *args: object, **kwargs: object) -> _Result:
        with translate_db_errors(f"file {file_id}"):
            return method(self, file_id, *args, **kwargs)

    return translated


def copy_matches(copy: CopyInfo, size: int, sha256: bytes | None) -> bool:
    """True when ``copy`` is a current, undamaged tape copy of exactly these bytes."""
    return not copy.stale and not copy.bad and copy.size == size and copy.sha256 == sha256


class TapeWriter(AnnouncingWriter):
    """An upload that, once published, marks the file's older tape copies stale."""

    def __init__(self, backend: TapeHsm, file_id: int, *args: object, **kwargs: object) -> None:
        super().__init__(backend.events, file_id, *args, **kwargs)
        self._backend = backend

    def commit(self) -> int:
        """Publish the new version, then retire the tape copies of the old one, then announce it.

        In this order a crash between the two steps leaves a disk file whose
        digest differs from the copies: REGULAR, so nothing trusts them.
        """
        written = self.publish()
        with translate_db_errors(f"file {self._file_id} was stored, but retiring its old tape copies failed"):
            self._backend.catalog.mark_stale(self._file_id)
        self.announce(self.replaced)
        return written


class _TapeVolumeSession(VolumeSession):
    """Recalls from the volume mounted in a drive this process holds."""

    def __init__(self, backend: TapeHsm, drive: MountedDrive) -> None:
        self.backend = backend
        self.drive = drive

    def recall(self, file_id: int) -> bool | None:
        """Recall the file from its newest undamaged copy on this volume (True), or see it on disk (False).

        None when another process is recalling it. StorageUnavailable when this
        volume holds no usable copy of it (a newer version, or the copy turned bad).
        """
        with translate_db_errors(f"file {file_id}"):
            copies = self.backend.catalog.current_copies(file_id)
        copy = next((c for c in copies if c.vsn == self.drive.vsn and not c.bad), None)
        if copy is None:
            if os.path.lexists(self.backend.path(file_id)):
                return False
            if not copies:
                raise FileNotInArchive(f"file {file_id} has no copy on disk or on tape")
            raise StorageUnavailable(f"volume {self.drive.vsn} holds no undamaged copy of file {file_id}")
        try:
            with translate_db_errors(f"file {file_id}"):
                return self.backend.recall(file_id, copy, self.drive)
        except RecallInProgress:
            return None


def stage_waits(tape: TapeSettings) -> SlotPool:
    """The ``stage_waiters`` slots a POST takes to wait for a recall, direct or scheduled.

    In the library directory: every process sharing the library on this host sees it.
    """
    return SlotPool(os.path.join(tape.library, "slots"), "stage", tape.stage_waiters)


class TapeHsm(Backend):
    """Disk cache plus emulated tape library, sharing one catalog with every process."""

    name = "tape"
    #: The subscriber keeping a sideband database, once one is attached
    #: (:func:`pacifica_like.storage.sideband.updater.keep_sideband`).
    sideband_upkeep: object = _NO_UPKEEP

    @classmethod
    def preflight(cls, settings: Settings) -> None:
        """Load the stager and check the library was initialised (ConfigError naming the path)."""
        library = TapeLibrary(settings.tape)
        try:
            library.check_ready()
        finally:
            library.catalog.close()

    def __init__(self, settings: Settings, events: EventBus | None = None) -> None:
        super().__init__(settings, events)
        self.tape = settings.tape
        self.library = TapeLibrary(settings.tape)
        self.library.check_ready()
        self.catalog = self.library.catalog
        self.cache = DiskCache.for_archive(settings.archive, taken_elsewhere=self._on_tape_write_once)
        self.prefix = self.cache.prefix
        self._recalls: dict[int, Future[bool]] = {}
        self._recalls_lock = threading.Lock()
        # Background recalls for POST: bounded, since each one holds a drive while it runs.
        self._executor = ThreadPoolExecutor(max_workers=max(2, 2 * settings.tape.drives))
        self._stage_waits = stage_waits(self.tape)

    def sideband_updater(self) -> object:
        """Return the updater of the sideband database kept for this archive, or None."""
        return self.sideband_upkeep.updater  # type: ignore[attr-defined]

    def relpath(self, file_id: int) -> str:
        """Return where ``file_id`` lives in the disk cache, relative to the prefix."""
        return self.cache.relpath(file_id)

    def path(self, file_id: int) -> str:
        """Return the disk cache path of ``file_id``."""
        return self.cache.path(file_id)

    def _missing(self, file_id: int) -> str:
        return self.cache.missing(file_id)

    def _on_tape_write_once(self, file_id: int) -> bool:
        """Under write-once, a file kept only on tape also counts as taken."""
        return bool(self.catalog.current_copies(file_id))

    # -- state -------------------------------------------------------------------

    def _disk_status(self, file_id: int) -> FileStatus | None:
        return self.cache.status_or_none(file_id)

    def copies_by_file(self) -> dict[int, list[CopyInfo]]:
        """Return every current tape copy, by file id, newest first (as ``current_copies`` orders them)."""
        table = self.catalog.TapeCopy
        query = (
            table.select()
            .where(table.stale == False)  # noqa: E712 - peewee turns == into SQL
            .order_by(table.file_id, table.written_at.desc(), table.id.desc())
        )
        copies: dict[int, list[CopyInfo]] = {}
        with translate_db_errors("cannot read the tape catalog"):
            for row in query:
                copies.setdefault(row.file_id, []).append(to_info(row))
        return copies

    def recall_in_flight(self, file_id: int) -> bool:
        """True when a live process is recalling ``file_id`` right now."""
        row = self.catalog.Recall.get_or_none(self.catalog.Recall.file_id == file_id)
        return row is not None and owner_alive(row.owner)

    def _combine(self, file_id: int, disk: FileStatus | None, copies: list[CopyInfo]) -> FileStatus:
        """Merge the disk cache's view and the catalog's into one status."""
        if disk is not None:
            match = next((c for c in copies if copy_matches(c, disk.size, disk.sha256)), None)
            tape_bytes = match.size if match else 0
            state = DUAL if match else REGULAR
            return dataclasses.replace(disk, bytes_per_level=(disk.size, tape_bytes), state=state)
        if not copies:
            raise FileNotInArchive(self._missing(file_id))
        newest = copies[0]
        return FileStatus(
            size=newest.size,
            mtime=newest.mtime,
            ctime=newest.ctime,
            bytes_per_level=(0, newest.size),
            media="tape",
            relpath=self.relpath(file_id),
            sha256=newest.sha256,
            state=UNMIGRATING if self.recall_in_flight(file_id) else OFFLINE,
        )

    @_catalog_errors
    def status(self, file_id: int) -> FileStatus:
        """Report disk and tape bytes and the DMF state, answering from the catalog when offline."""
        disk = self._disk_status(file_id)
        return self._combine(file_id, disk, self.catalog.current_copies(file_id))

    @_catalog_errors
    def checksums(self, file_id: int) -> dict[str, bytes]:
        """Return the disk copy's recorded digests, else those the newest tape copy keeps."""
        on_disk = self.cache.checksums_or_none(file_id)
        if on_disk is not None:
            return on_disk
        copies = self.catalog.current_copies(file_id)
        if not copies:
            raise FileNotInArchive(self._missing(file_id))
        return {"sha256": copies[0].sha256, **dict(copies[0].checksums)}

    def state(self, file_id: int) -> str:
        """Return the file's DMF state; FileNotInArchive if it has neither disk nor tape copy."""
        state = self.status(file_id).state
        assert state is not None
        return state

    # -- the contract ------------------------------------------------------------

    @_catalog_errors
    def open_reader(self, file_id: int) -> Reader:
        """Open the disk copy; an offline file is recalled first only with ``auto_stage``."""
        try:
            reader = self.cache.open_reader(file_id)
        except FileNotInArchive:
            status = self.status(file_id)  # FileNotInArchive when there is no tape copy either
            if not self.tape.auto_stage:
                verb = "is being staged" if status.state == UNMIGRATING else "is only on tape"
                raise OfflineOnTape(
                    f"file {file_id} {verb}; POST /{file_id} to stage it to disk, then GET it again",
                    retry_after=self.library.estimate_recall_seconds(),
                ) from None
            self.recall(file_id)
            reader = self.cache.open_reader(file_id)
        try:
            reader.status = self._combine(file_id, reader.status, self.catalog.current_copies(file_id))
        except BaseException:
            reader.close()
            raise
        return reader

    @_catalog_errors
    def open_writer(
        self, file_id: int, mtime: float, expect: Sequence[ExpectedDigest] = (), exclusive: bool = False
    ) -> Writer:
        """Start an atomic upload whose commit makes older tape copies stale."""
        return self.cache.open_writer(
            file_id,
            mtime,
            expect,
            lambda path, mtime, expect, replace: TapeWriter(
                self, file_id, path, mtime, expect, replace=replace
            ),
            exclusive=exclusive,
        )

    @_catalog_errors
    def adopt(self, file_id: int, source_path: str) -> int:
        """Move a server-side file in; older tape copies become stale."""
        with self.events.begin(file_id, "PATCH") as change:
            size = self.cache.adopt(file_id, source_path)
            self.catalog.mark_stale(file_id)
            change.done(self.cache.moved_in(file_id, size))
        return size

    @_catalog_errors
    def delete(self, file_id: int) -> None:
        """Remove the disk copy and retire the tape copies (tape space is reclaimed by repacking)."""
        with self.events.begin(file_id, "DELETE") as change:
            copies = self.catalog.current_copies(file_id)
            # Retire the copies before and again after the unlink: a recall publishing
            # in between sees them retired and takes its file back, and a migration
            # recording a copy meanwhile finds its file gone and retires that copy.
            self.catalog.mark_stale(file_id)
            try:
                self.cache.delete(file_id)
            except FileNotInArchive:
                if not copies:
                    raise
            self.catalog.mark_stale(file_id)
            change.done(Deleted(file_id))

    def list_ids(
        self, on_error: ListingErrorHandler | None = None, on_temp: TempFileHandler | None = None
    ) -> Iterator[int]:
        """Yield every id on disk, then every id only on tape; unreadable directories go to ``on_error``."""
        seen = set()
        for file_id in self.cache.list_ids(on_error, on_temp):
            seen.add(file_id)
            yield file_id
        with translate_db_errors("cannot list the files on tape"):
            on_tape = self.catalog.tape_file_ids()
        for file_id in on_tape:
            if file_id not in seen:
                yield file_id

    @_catalog_errors
    def stage(self, file_id: int) -> bool:
        """Recall an offline file, waiting up to ``stage_timeout``; False if it is still running."""
        if self._disk_status(file_id) is not None:
            return True
        if not self.catalog.current_copies(file_id):
            raise FileNotInArchive(f"file {file_id} has no copy on disk or on tape")
        started = False
        with self._recalls_lock:
            future = self._recalls.get(file_id)
            if future is None:
                future = self._executor.submit(self.recall, file_id)
                self._recalls[file_id] = future
                started = True
        if started:
            # Outside the lock: on a recall that already finished, the callback runs right here.
            future.add_done_callback(lambda done: self._forget_recall(file_id, done))
        if future.done():
            future.result()  # the recall's error, if it failed
            return True
        # A waiting request holds a server thread (a whole uWSGI worker) for up to stage_timeout:
        # only stage_waiters of them, over every process of this host, wait; the others answer
        # at once, as on a timeout, and the recall goes on.
        with self._stage_waits.hold() as may_wait:
            if not may_wait:
                return False
            try:
                future.result(timeout=self.tape.stage_timeout)
            except FutureTimeout:
                return False
        return True

    def _forget_recall(self, file_id: int, future: Future[bool]) -> None:
        with self._recalls_lock:
            if self._recalls.get(file_id) is future:
                del self._recalls[file_id]

    def check_ready(self) -> None:
        """The disk cache's prefix is writable, then the library checks (see Backend.check_ready)."""
        self.cache.check_ready()
        super().check_ready()

    def close(self) -> None:
        """Let running recalls finish (they hold drives), then close the catalog and the event guards."""
        self._executor.shutdown(wait=True)
        try:
            self.catalog.close()
        finally:
            super().close()

    # -- recall ------------------------------------------------------------------

    def recall(self, file_id: int, copy: CopyInfo | None = None, drive: MountedDrive | None = None) -> bool:
        """Copy an offline file from tape into the disk cache; return False if it was on disk.

        Only one live process recalls a given file at a time; others wait for
        it. ``drive``: a drive the caller already holds with the copy's volume
        (bulk recalls in tape order). The bytes land in a hidden temp file, are verified by the stager,
        made durable, and only then get the file's name. A failure, or a
        killed process, leaves no visible file and the state OFFLINE.
        Raises RecallInProgress, rather than wait, when another process recalls
        the file and the caller holds a ``drive``: that process may need it.
        """
        path = self.path(file_id)
        while True:
            if os.path.lexists(path):
                return False
            copy = copy or self._recall_source(file_id)
            if self._begin_recall(file_id, copy.vsn):
                break
            if drive is not None:
                raise RecallInProgress(f"file {file_id} is being recalled by another process")
            time.sleep(0.05)  # another process is recalling it; its result is ours
        try:
            return self._recall_locked(file_id, copy, path, drive)
        finally:
            with self.catalog.db.atomic():
                self.catalog.Recall.delete().where(
                    (self.catalog.Recall.file_id == file_id)
                    & (self.catalog.Recall.owner == self.library.owner)
                ).execute()

    def _recall_source(self, file_id: int) -> CopyInfo:
        copies = self.catalog.current_copies(file_id)
        if not copies:
            raise FileNotInArchive(f"file {file_id} has no copy on disk or on tape")
        usable = [c for c in copies if not c.bad]
        if not usable:
            raise CopyDamaged(
                f"every tape copy of file {file_id} failed its checksum; it cannot be recalled "
                f"(bad copy on {copies[0].vsn} at byte {copies[0].offset})"
            )
        return usable[0]

    def _begin_recall(self, file_id: int, vsn: str) -> bool:
        """Record that this process recalls ``file_id``; False if a live process already does."""
        recall = self.catalog.Recall
        with self.catalog.db.atomic():
            row = recall.get_or_none(recall.file_id == file_id)
            if row is not None and owner_alive(row.owner):
                return False
            recall.replace(
                file_id=file_id, owner=self.library.owner, vsn=vsn, started_at=time.time()
            ).execute()
        return True

    def _recall_locked(self, file_id: int, copy: CopyInfo, path: str, drive: MountedDrive | None) -> bool:
        if os.path.lexists(path):
            return False  # the process we waited for finished it
        directory, name = os.path.split(path)
        with translate_os_errors(f"cannot recall file {file_id}"):
            os.makedirs(directory, exist_ok=True)
            # We hold the recall for this id, so any earlier recall temp file is a dead process's.
            for leftover in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.recall")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        temp = os.path.join(directory, f".{name}.{os.getpid()}-{time.monotonic_ns()}.recall")
        try:
            try:
                if drive is not None and drive.vsn == copy.vsn:
                    drive.read_to(copy, temp)
                else:
                    with self.library.drive(copy.vsn) as claimed:
                        claimed.read_to(copy, temp)
            except CopyDamaged:
                # A copy that failed its checksum is marked bad: it leaves the file's archive rows.
                self.events.emit(CopyBad(file_id, copy.vsn, copy.offset))
                raise
            with translate_os_errors(f"cannot store recalled file {file_id}"):
                fd = os.open(temp, os.O_RDONLY)
            # Open until the end: while it is, no other file can get this inode's number.
            try:
                with translate_os_errors(f"cannot store recalled file {file_id}"):
                    record_checksums(fd, {"sha256": copy.sha256, **dict(copy.checksums)})
                    os.fchmod(fd, 0o444)
                    os.utime(fd, (copy.mtime, copy.mtime))
                    # The stager flushed the data; this flush covers the digest and times.
                    os.fsync(fd)
                    try:
                        # link(), never rename: an upload that landed meanwhile is newer and wins.
                        publish(temp, path, replace=False)
                    except Conflict:
                        return False
                self._undo_if_retired(file_id, copy, path, os.fstat(fd))
            finally:
                os.close(fd)
            self.events.emit(Recalled(file_id))
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def _undo_if_retired(self, file_id: int, copy: CopyInfo, path: str, recalled: os.stat_result) -> None:
        """Drop a recalled file whose copy was retired (DELETE) while we were reading it.

        Only the very inode we published (``recalled``, held open by the
        caller) is dropped: an upload that replaced it, even with the same
        bytes, is the file's new version.
        """
        if any(c.id == copy.id for c in self.catalog.current_copies(file_id)):
            return
        with contextlib.suppress(OSError):
            now = os.stat(path)
            if (now.st_ino, now.st_dev) == (recalled.st_ino, recalled.st_dev):
                os.unlink(path)
                fsync_dir(os.path.dirname(path))

    def tape_positions(self, file_ids: Iterable[int]) -> dict[int, TapePosition]:
        """Return the volume and byte offset each offline file would be recalled from.

        The newest current, undamaged copy of each id (the one :meth:`recall`
        reads), looked up in batches; files with a disk copy are left out.
        """
        offline = [file_id for file_id in file_ids if not os.path.lexists(self.path(file_id))]
        found: dict[int, TapePosition] = {}
        with translate_db_errors("cannot look up tape positions"):
            rows = self.catalog.current_rows(offline, 'file_id, vsn, "offset", size', undamaged=True)
            for file_id, vsn, offset, size in rows:
                if file_id not in found:  # the newest undamaged copy, the one recall() reads
                    found[file_id] = TapePosition(vsn, offset, file_id, size)
        return found

    def localities(self, file_ids: Iterable[int]) -> dict[int, str]:
        """Return DISK, TAPE, DISK_AND_TAPE, LOST or NONE per id (disk cache, batched catalog reads).

        LOST: only on tape, and every current copy failed its checksum.
        UNAVAILABLE for every id when the catalog cannot be read.
        """
        ids = list(file_ids)
        on_disk = {file_id for file_id in ids if os.path.lexists(self.path(file_id))}
        good: set[int] = set()
        bad: set[int] = set()
        try:
            with translate_db_errors("cannot look up tape copies"):
                for file_id, damaged in self.catalog.current_rows(ids, "file_id, bad"):
                    (bad if damaged else good).add(file_id)
        except StorageUnavailable:
            return dict.fromkeys(ids, "UNAVAILABLE")
        found = {}
        for file_id in ids:
            if file_id in on_disk:
                found[file_id] = "DISK_AND_TAPE" if file_id in good else "DISK"
            elif file_id in good:
                found[file_id] = "TAPE"
            else:
                found[file_id] = "LOST" if file_id in bad else "NONE"
        return found

    @contextlib.contextmanager
    def open_volume(self, vsn: str) -> Iterator[VolumeSession]:
        """Claim a drive, mount ``vsn``, and recall from it in the caller's order until the block ends."""
        with translate_db_errors(f"cannot use volume {vsn}"), self.library.drive(vsn) as drive:
            yield _TapeVolumeSession(self, drive)

    # -- migrate and release (the maintenance CLI drives these) -------------------

    def disk_digest(self, fd: int) -> bytes:
        """Return the digest recorded with an open disk file, hashing it if none was recorded."""
        digest = read_sha256(fd)
        return digest if digest is not None else hash_file(f"/proc/self/fd/{fd}")

    def release(self, file_id: int) -> CopyInfo:
        """Drop the disk copy of a DUAL file whose tape copy is written and verified.

        Raises Conflict for a file without such a copy (REGULAR, or an unverified
        or damaged copy). The disk file is first renamed aside, then checked
        to be the very inode whose digest matched, so an upload racing the
        release is never the one dropped.
        """
        path = self.path(file_id)
        copies = self.catalog.current_copies(file_id)
        with translate_os_errors(f"cannot release file {file_id}", missing=self._missing(file_id)):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if copies:
                    raise Conflict(f"file {file_id} is already released (OFFLINE)") from None
                raise
            # Open until the end: while it is, no newer upload can get this inode's number.
            try:
                released = self._release_open(file_id, path, fd, copies)
            finally:
                os.close(fd)
        self.events.emit(Released(file_id, released.vsn, released.offset))
        return released

    def _release_open(self, file_id: int, path: str, fd: int, copies: list[CopyInfo]) -> CopyInfo:
        st = os.fstat(fd)
        digest = self.disk_digest(fd)
        safe = next((c for c in copies if copy_matches(c, st.st_size, digest) and c.safe), None)
        if safe is None:
            unverified = any(copy_matches(c, st.st_size, digest) for c in copies)
            reason = (
                "its tape copy is not verified yet (run pacifica-like verify)"
                if unverified
                else "it has no tape copy of this version (REGULAR); migrate it first"
            )
            raise Conflict(f"file {file_id} cannot be released: {reason}")
        # Read again: a verify run may have found the copy bad (or an upload retired it) while we hashed.
        if not self.library.copy(safe.id).safe:
            raise Conflict(f"file {file_id} cannot be released: its tape copy turned bad or stale meanwhile")
        directory, name = os.path.split(path)
        aside = os.path.join(directory, f".{name}.{os.getpid()}-{time.monotonic_ns()}.release")
        os.rename(path, aside)
        moved = os.stat(aside)
        if (moved.st_ino, moved.st_dev) != (st.st_ino, st.st_dev):
            # An upload replaced the file between our check and the rename: put it back.
            # FileExistsError: an even newer upload holds the name; ours is superseded anyway.
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            os.unlink(aside)
            fsync_dir(directory)
            raise Conflict(f"file {file_id} changed while being released; it was left on disk")
        os.unlink(aside)
        fsync_dir(directory)
        return safe

    def migration_source(self, file_id: int) -> tuple[int, os.stat_result, bytes] | None:
        """Open a REGULAR file for migration: (fd, stat, digest), or None if it needs no copy.

        The caller closes the fd. Raises FileNotInArchive when it is not on disk.
        """
        with translate_os_errors(f"cannot read file {file_id}", missing=self._missing(file_id)):
            fd = os.open(self.path(file_id), os.O_RDONLY)
        try:
            st = os.fstat(fd)
            digest = self.disk_digest(fd)
        except BaseException:
            os.close(fd)
            raise
        if any(copy_matches(c, st.st_size, digest) for c in self.catalog.current_copies(file_id)):
            os.close(fd)
            return None
        return fd, st, digest

    def metrics_snapshot(self) -> list[MetricSample]:
        """Report the library from its catalog: drive counters, volumes, recalls in flight, fixity.

        Returns MetricSample values. Read from the catalog every process shares,
        so whichever worker answers a scrape reports the whole library.
        """
        samples: list[MetricSample] = []

        def add(name: str, value: float, help: str, kind: str = "gauge", **labels: str) -> None:
            samples.append(MetricSample(name, value, help, kind, tuple(labels.items())))

        drives = self.library.drives()
        for key, what in (
            ("mounts", "Cartridges loaded into a drive"),
            ("unmounts", "Cartridges unloaded from a drive"),
            ("bytes_located", "Bytes of tape the head travelled over while locating"),
            ("bytes_read", "Bytes read from tape"),
            ("bytes_written", "Bytes written to tape"),
        ):
            per_drive = {drive.name: getattr(drive, key) for drive in drives}
            add(f"tape_{key}", sum(per_drive.values()), f"{what}, all drives.", "counter")
            for name, value in per_drive.items():
                add(f"tape_drive_{key}", value, f"{what}, per drive.", "counter", drive=name)
        for drive in drives:
            loaded = 1 if drive.vsn else 0
            in_use = 1 if drive.owner and owner_alive(drive.owner) else 0
            add("tape_drive_loaded", loaded, "1 while a cartridge is in the drive.", drive=drive.name)
            add("tape_drive_in_use", in_use, "1 while a live process holds the drive.", drive=drive.name)

        volume = self.catalog.Volume
        for row in volume.select().order_by(volume.vsn):
            add("tape_volume_used_bytes", row.fill, "End of data on the volume.", vsn=row.vsn)
            add("tape_volume_capacity_bytes", row.capacity, "Capacity of the volume.", vsn=row.vsn)

        recall = self.catalog.Recall
        in_flight: dict[str, int] = {}
        for row in recall.select(recall.vsn, recall.owner):
            if owner_alive(row.owner):
                in_flight[row.vsn] = in_flight.get(row.vsn, 0) + 1
        add("tape_recalls_in_flight", sum(in_flight.values()), "Recalls running now.")
        for vsn, count in sorted(in_flight.items()):
            add("tape_volume_recalls_in_flight", count, "Recalls running now, by volume.", vsn=vsn)

        copy = self.catalog.TapeCopy
        current = copy.stale == False  # noqa: E712 - peewee turns == into SQL
        by_result = dict.fromkeys(("ok", "mismatch", "unreadable", "never"), 0)
        query = copy.select(copy.verify_result, peewee.fn.COUNT(copy.id)).where(current)
        for result, count in query.group_by(copy.verify_result).tuples():
            by_result[result or "never"] = by_result.get(result or "never", 0) + count
        for result, count in by_result.items():
            add("tape_copies", count, "Current tape copies, by their last read-back.", verify_result=result)
        last = copy.select(peewee.fn.MAX(copy.verified_at)).where(current).scalar()
        if last is not None:
            add("tape_last_verify_timestamp_seconds", last, "When a tape copy was last read back.")
        return samples
