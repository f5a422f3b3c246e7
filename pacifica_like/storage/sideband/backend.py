"""The sideband backend: files under ``sam_qfs_prefix``, HEAD answered from the sideband database.

Two variants, chosen by ``[sideband] hsm`` (:meth:`SidebandBackend.for_settings`):

* ``emulator`` (:class:`SidebandBackend`): our tape library plays the HSM. It
  composes the tape machinery (:class:`~pacifica_like.storage.hsm.TapeHsm`)
  with ``sam_qfs_prefix`` as its disk cache, and subscribes the sideband
  updater to its events, so every change (store, migrate, release, recall,
  delete) refreshes the file's rows (``pacifica_like.storage.sideband.updater``),
  as Oracle HSM's updater does;
* ``external`` (:class:`ExternalSidebandBackend`): a real HSM owns the
  filesystem and keeps the database. The gateway reads and writes files
  through a :class:`~pacifica_like.storage.diskcache.DiskCache` on its
  filesystem and never writes the tables.

In both, HEAD (``status``) reads the database only (one query joining path,
inode and archive copies on ``(ino, gen)``) plus one ``lstat`` of the name to
catch a database that is out of step with the filesystem; no file data is
touched, so HEAD never triggers a recall. GET reads the disk and works
while the database is down (the emulator's state is in its own tape catalog;
the external variant then serves only data that is resident).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import peewee

from pacifica_like.core.config import Settings
from pacifica_like.core.errors import (
    ArchiveError,
    FileNotInArchive,
    OfflineOnTape,
    StatusMismatch,
    StorageUnavailable,
)
from pacifica_like.storage.contract import (
    ArchiveCopy,
    Backend,
    EventBus,
    ExpectedDigest,
    FileStatus,
    ListingErrorHandler,
    MetricSample,
    Reader,
    TapePosition,
    TempFileHandler,
    VolumeSession,
    Writer,
)
from pacifica_like.storage.diskcache import DiskCache
from pacifica_like.storage.hsm import DUAL, OFFLINE, REGULAR, TapeHsm
from pacifica_like.storage.sideband import models
from pacifica_like.storage.sideband.updater import Statements, keep_sideband, open_sideband

#: Paths per query when looking up tape positions (below SQLite's bound-parameter limit).
POSITION_BATCH = 500
_T = TypeVar("_T")


def _on_cache(settings: Settings) -> Settings:
    """Return settings whose archive prefix is ``sam_qfs_prefix``: the disk the backend serves."""
    return dataclasses.replace(
        settings, archive=dataclasses.replace(settings.archive, prefix=settings.sam_qfs_prefix)
    )


class SidebandIndex:
    """The read side of the sideband database: status, tape positions, readiness, metrics.

    Safe to share between threads: each thread takes a connection from the
    process's pool on its first query and keeps it for the next ones (no
    check-in per query); one whose server went away is discarded and the query
    tried once more on a fresh connection, so a restarted database costs no
    failed request and a dead one a prompt 503.
    """

    def __init__(self, db: peewee.Database, offline_on_disk: bool) -> None:
        self.db = db
        self.sql = Statements(db)
        #: True (external HSM): an offline file keeps its inode and name on disk, as on SAM-QFS.
        #: False (emulator): a released file has no disk file at all.
        self.offline_on_disk = offline_on_disk
        self.display_url: str = db.display_url  # type: ignore[attr-defined]
        self.prepare: Callable[[], None] = lambda: None
        #: The pid whose ``prepare()`` succeeded (tables checked once per process, after any fork).
        self._prepared_in: int | None = None

    def query(self, what: str, run: Callable[[], _T]) -> _T:
        """Run ``run()`` on a pooled connection, retrying once on a fresh one; StorageUnavailable if down.

        Only a connection kept from an earlier request that failed at once is
        retried (the server restarted and dropped it). A fresh connection that
        failed, or one that timed out, is not: the second try would only fail
        the same way and double the time the request waits.

        Not :func:`pacifica_like.db.retry.retry`: that one retries a rolled-back
        transaction on Contention with jittered pauses. This one retries a
        read once, at once, on a *different* connection (the second try opens a
        fresh one), and only when the first failure was a dropped connection.
        """
        started = time.monotonic()
        reused = not self.db.is_closed()
        try:
            if self._prepared_in != os.getpid():
                with models.translate_errors(self.db, what):
                    self.prepare()
                self._prepared_in = os.getpid()
            if reused:
                # The common case, kept free of context managers: a HEAD's query costs ~10 µs on SQLite.
                try:
                    return run()
                except (peewee.PeeweeException, OSError):
                    with models.translate_errors(self.db, what):
                        raise
            with models.translate_errors(self.db, what), models.connected(self.db):
                return run()
        except StorageUnavailable as first:
            quick = time.monotonic() - started < self.db.connect_timeout / 2  # type: ignore[attr-defined]
            broken = isinstance(first.__cause__, peewee.InterfaceError | peewee.OperationalError)
            if not (reused and quick and broken):
                raise
        with models.translate_errors(self.db, what), models.connected(self.db):
            return run()

    def rows(self, relpath: str) -> list[tuple]:
        """Return the status rows of the file at ``relpath`` (one per live archive copy, at least one)."""
        return self.query(
            f"cannot look up {relpath}", lambda: self.db.execute_sql(self.sql.status, (relpath,)).fetchall()
        )

    def status(self, file_id: int, relpath: str, path: str) -> FileStatus:
        """Return the file's status from its rows; FileNotInArchive or StatusMismatch as the checks find."""
        return self.status_of(file_id, relpath, path, self.rows(relpath))

    def rows_of(self, relpaths: Sequence[str]) -> dict[str, list[tuple]]:
        """Return the status rows of many files by relpath, in batches (archiveinfo asks about 100,000)."""
        left, right = self.db.quote[0], self.db.quote[-1]

        def q(identifier: str) -> str:
            return f"{left}{identifier}{right}"

        # HEAD's query (``Statements.status``: the same columns in the same order) for a list of
        # paths, with the path added last to tell the files apart.
        head = (
            f"SELECT i.{q('ino')}, i.{q('gen')}, i.{q('size')}, i.{q('online')}, i.{q('csum')}, "
            f"i.{q('create_time')}, i.{q('modify_time')}, a.{q('copy')}, a.{q('vsn')}, a.{q('position')}, "
            f"a.{q('media_type')}, p.{q('path')} "
            f"FROM {q('sam_path')} p JOIN {q('sam_inode')} i ON i.{q('ino')} = p.{q('ino')} "
            f"AND i.{q('gen')} = p.{q('gen')} "
            f"LEFT JOIN {q('sam_archive')} a ON a.{q('ino')} = i.{q('ino')} AND a.{q('gen')} = i.{q('gen')} "
            f"AND a.{q('stale')} = 0 WHERE p.{q('path')} IN "
        )
        found: dict[str, list[tuple]] = {}
        for start in range(0, len(relpaths), POSITION_BATCH):
            batch = list(relpaths[start : start + POSITION_BATCH])
            sql = f"{head}({', '.join([self.db.param] * len(batch))}) ORDER BY a.{q('copy')}"
            for row in self.query("cannot look up files", _fetch(self.db, sql, batch)):
                found.setdefault(row[-1], []).append(row[:-1])
        return found

    def status_of(self, file_id: int, relpath: str, path: str, rows: list[tuple]) -> FileStatus:
        """Return the file's status from ``rows`` (its status rows) and its name on disk."""
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            if exc.errno != errno.ENOTDIR:
                raise StorageUnavailable(f"cannot look at {relpath}: {exc.strerror}") from exc
            st = None
        on_disk = st is not None and stat.S_ISREG(st.st_mode)
        if not rows:
            if on_disk:
                raise StatusMismatch(
                    f"file {file_id} is on disk ({relpath}) but not in the sideband database "
                    f"{self.display_url}: the HSM's database has not recorded it; it catches up by itself "
                    "if its updater is running behind, else `pacifica-like sideband load` rebuilds the rows"
                )
            raise FileNotInArchive(f"file {file_id} is not in the archive")
        ino, gen, size, online, csum, create_time, modify_time = rows[0][:7]
        where = f"file {file_id} ({relpath}, inode {ino} generation {gen})"
        if not on_disk and (online or self.offline_on_disk):
            raise StatusMismatch(
                f"the sideband database {self.display_url} lists {where} as "
                f"{'online' if online else 'offline'}, but it is not on disk: the database is behind "
                "the filesystem (the file was removed or the updater missed it); "
                "`pacifica-like sideband load` rebuilds the rows"
            )
        if on_disk and st is not None and (st.st_ino != ino or not (online or self.offline_on_disk)):
            raise StatusMismatch(
                f"{where} in the sideband database {self.display_url} is not the file on disk "
                f"(inode {st.st_ino}{'' if online or self.offline_on_disk else ', not released'}): "
                "the database is behind the filesystem; `pacifica-like sideband load` rebuilds the rows"
            )
        copies = tuple(ArchiveCopy(int(r[7]), r[8], int(r[9])) for r in rows if r[7] is not None)
        size = int(size)
        if online:
            state, level, media = (DUAL if copies else REGULAR), (size, size if copies else 0), "disk"
        else:
            state, level, media = OFFLINE, (0, size), "tape"
        return FileStatus(
            size=size,
            mtime=float(modify_time),
            ctime=float(create_time),
            bytes_per_level=level,
            media=media,
            relpath=relpath,
            sha256=bytes.fromhex(csum) if csum else None,
            state=state,
            copies=copies,
        )

    def online(self, relpath: str) -> bool | None:
        """Return the file's online flag (None: no row)."""
        rows = self.rows(relpath)
        return bool(rows[0][3]) if rows else None

    def tape_positions(self, paths: dict[str, int]) -> dict[int, TapePosition]:
        """Return where each offline file of ``paths`` (relpath -> id) would be recalled from.

        The newest live copy (the highest copy number), as the tape backend
        recalls the newest undamaged copy.
        """
        found: dict[int, TapePosition] = {}
        names = list(paths)
        q = self.db.quote[0], self.db.quote[-1]

        def name(identifier: str) -> str:
            return f"{q[0]}{identifier}{q[1]}"

        for start in range(0, len(names), POSITION_BATCH):
            batch = names[start : start + POSITION_BATCH]
            marks = ", ".join([self.db.param] * len(batch))
            sql = (
                f"SELECT p.{name('path')}, a.{name('vsn')}, a.{name('position')}, a.{name('size')} "
                f"FROM {name('sam_path')} p JOIN {name('sam_inode')} i ON i.{name('ino')} = p.{name('ino')} "
                f"AND i.{name('gen')} = p.{name('gen')} JOIN {name('sam_archive')} a "
                f"ON a.{name('ino')} = i.{name('ino')} AND a.{name('gen')} = i.{name('gen')} "
                f"WHERE p.{name('path')} IN ({marks}) AND i.{name('online')} = 0 AND a.{name('stale')} = 0 "
                f"ORDER BY a.{name('copy')}"
            )
            rows = self.query("cannot look up tape positions", _fetch(self.db, sql, batch))
            for relpath, vsn, position, size in rows:
                file_id = paths[relpath]
                found[file_id] = TapePosition(vsn, int(position), file_id, int(size))  # last = newest
        return found

    def check_ready(self) -> None:
        """Raise StorageUnavailable unless the database answers and holds the sideband tables."""
        self.query("readiness check", lambda: self.db.execute_sql(self.sql.ready).fetchall())

    def metrics(self) -> list[MetricSample]:
        """Count files by online flag and live archive copies (read from the database at each scrape)."""

        def count() -> tuple[list[tuple], int]:
            by_online = self.db.execute_sql(
                "SELECT online, COUNT(*) FROM sam_inode GROUP BY online"
            ).fetchall()
            copies = self.db.execute_sql("SELECT COUNT(*) FROM sam_archive WHERE stale = 0").fetchone()[0]
            return by_online, int(copies)

        by_online, copies = self.query("metrics", count)
        counts = {"online": 0, "offline": 0}
        for online, number in by_online:
            counts["online" if online else "offline"] += int(number)
        help_files = "Files in the sideband database, by whether their data is on disk."
        samples = [
            MetricSample(
                "sideband_files", counts[key], help_files, labels=(("online", str(key == "online").lower()),)
            )
            for key in ("online", "offline")
        ]
        samples.append(MetricSample("sideband_archive_copies", copies, "Live archive copies in sam_archive."))
        return samples


def _fetch(db: peewee.Database, sql: str, params: Sequence[object]) -> Callable[[], list[tuple]]:
    return lambda: db.execute_sql(sql, params).fetchall()


class SidebandBackend(Backend):
    """The emulated HSM: the tape machinery on ``sam_qfs_prefix``, HEAD answered from the sideband database.

    It holds a :class:`TapeHsm` (sharing this backend's event bus) for data,
    migrate, release and recall, and a :class:`SidebandIndex` for status and
    tape positions; the updater that keeps the index true is subscribed to
    the events at construction.
    """

    name = "sideband"

    @classmethod
    def for_settings(cls, settings: Settings) -> type[Backend]:
        """Pick the variant ``[sideband] hsm`` names."""
        return ExternalSidebandBackend if settings.sideband.hsm == "external" else SidebandBackend

    @classmethod
    def preflight(cls, settings: Settings) -> None:
        """Check the tape library, as the tape backend does (the database is checked per request)."""
        TapeHsm.preflight(_on_cache(settings))

    def __init__(self, settings: Settings, events: EventBus | None = None) -> None:
        super().__init__(_on_cache(settings), events)
        self.hsm = TapeHsm(self.settings, self.events)
        try:
            upkeep = keep_sideband(self.hsm, settings, settings.sideband_url())
        except BaseException:
            self.hsm.close()
            raise
        self.index = SidebandIndex(upkeep.updater.db, offline_on_disk=False)
        self.index.prepare = upkeep.updater.prepare
        self.prefix = self.hsm.prefix

    # -- what the composed tape machinery holds ---------------------------------------

    @property
    def library(self) -> Any:
        """The emulated tape library."""
        return self.hsm.library

    @property
    def catalog(self) -> Any:
        """The tape library's catalog."""
        return self.hsm.catalog

    @property
    def tape(self) -> Any:
        """The ``[tape]`` settings."""
        return self.hsm.tape

    @property
    def cache(self) -> DiskCache:
        """The disk cache on ``sam_qfs_prefix``."""
        return self.hsm.cache

    @property
    def sideband_upkeep(self) -> Any:
        """The subscriber keeping the sideband database."""
        return self.hsm.sideband_upkeep

    def sideband_updater(self) -> Any:
        """Return the updater of the sideband database (what ``sideband load`` drives)."""
        return self.hsm.sideband_updater()

    def relpath(self, file_id: int) -> str:
        """Return where ``file_id`` lives, relative to ``sam_qfs_prefix``."""
        return self.hsm.relpath(file_id)

    def path(self, file_id: int) -> str:
        """Return the disk path of ``file_id``."""
        return self.hsm.path(file_id)

    # -- the contract -----------------------------------------------------------------

    def status(self, file_id: int) -> FileStatus:
        """Answer from the sideband database (see :meth:`SidebandIndex.status`)."""
        return self.index.status(file_id, self.relpath(file_id), self.path(file_id))

    def checksums(self, file_id: int) -> dict[str, bytes]:
        """Return the recorded digests (see TapeHsm.checksums)."""
        return self.hsm.checksums(file_id)

    def state(self, file_id: int) -> str:
        """Return the file's HSM state as the sideband database reports it."""
        state = self.status(file_id).state
        assert state is not None
        return state

    def open_reader(self, file_id: int) -> Reader:
        """Open the disk copy (see TapeHsm.open_reader)."""
        return self.hsm.open_reader(file_id)

    def open_writer(
        self, file_id: int, mtime: float, expect: Sequence[ExpectedDigest] = (), exclusive: bool = False
    ) -> Writer:
        """Start an upload (see TapeHsm.open_writer)."""
        return self.hsm.open_writer(file_id, mtime, expect, exclusive)

    def stage(self, file_id: int) -> bool:
        """Recall an offline file (see TapeHsm.stage)."""
        return self.hsm.stage(file_id)

    def adopt(self, file_id: int, source_path: str) -> int:
        """Move a server-side file in (see TapeHsm.adopt)."""
        return self.hsm.adopt(file_id, source_path)

    def delete(self, file_id: int) -> None:
        """Delete the file (see TapeHsm.delete)."""
        self.hsm.delete(file_id)

    def list_ids(
        self, on_error: ListingErrorHandler | None = None, on_temp: TempFileHandler | None = None
    ) -> Iterator[int]:
        """List disk and tape (see TapeHsm.list_ids)."""
        return self.hsm.list_ids(on_error, on_temp)

    def localities(self, file_ids: Iterable[int]) -> dict[int, str]:
        """Answer from the disk cache and the tape catalog (see TapeHsm.localities)."""
        return self.hsm.localities(file_ids)

    def open_volume(self, vsn: str) -> contextlib.AbstractContextManager[VolumeSession]:
        """Hold a drive with ``vsn`` mounted (see TapeHsm.open_volume)."""
        return self.hsm.open_volume(vsn)

    def tape_positions(self, file_ids: Iterable[int]) -> dict[int, TapePosition]:
        """Answer from ``sam_archive``: the newest live copy of each offline file."""
        return self.index.tape_positions({self.relpath(file_id): file_id for file_id in file_ids})

    # -- the tape capability (TapeManaged) --------------------------------------------

    def recall(self, file_id: int, copy: Any = None, drive: Any = None) -> bool:
        """Copy an offline file back to disk (see TapeHsm.recall)."""
        return self.hsm.recall(file_id, copy, drive)

    def release(self, file_id: int) -> Any:
        """Drop the disk copy of a file with a verified tape copy (see TapeHsm.release)."""
        return self.hsm.release(file_id)

    def migration_source(self, file_id: int) -> tuple[int, os.stat_result, bytes] | None:
        """Open a REGULAR file for migration (see TapeHsm.migration_source)."""
        return self.hsm.migration_source(file_id)

    def recall_in_flight(self, file_id: int) -> bool:
        """True when a live process is recalling ``file_id`` right now."""
        return self.hsm.recall_in_flight(file_id)

    def check_ready(self) -> None:
        """The tape machinery's checks, then a query of the sideband database."""
        self.hsm.check_ready()
        self.index.check_ready()

    def metrics_snapshot(self) -> list[MetricSample]:
        """The tape library's metrics plus the sideband database's counts."""
        return [*self.hsm.metrics_snapshot(), *self.index.metrics()]

    def close(self) -> None:
        """Close the tape machinery, then the pool's connections."""
        self.hsm.close()
        with contextlib.suppress(Exception):
            self.index.db.close_all()


class ExternalSidebandBackend(Backend):
    """A real HSM keeps the database; files are read and written through its filesystem.

    The gateway never writes the tables. A file the HSM has released keeps
    its name and inode (``online`` 0); GET of it answers 503 (POST to stage),
    and POST reads its first byte in the background, which is how a SAM-QFS
    filesystem is asked to stage a file.
    """

    name = "sideband"

    def __init__(self, settings: Settings, events: EventBus | None = None) -> None:
        super().__init__(_on_cache(settings), events)
        self.cache = DiskCache.for_archive(self.settings.archive)
        self.prefix = self.cache.prefix
        db = open_sideband(settings, settings.sideband_url())
        self.index = SidebandIndex(db, offline_on_disk=True)
        self.index.prepare = lambda: models.check_tables(db)
        self._stager = ThreadPoolExecutor(max_workers=4)
        self._staging: set[int] = set()
        self._staging_lock = threading.Lock()

    def relpath(self, file_id: int) -> str:
        """Return where ``file_id`` lives, relative to ``sam_qfs_prefix``."""
        return self.cache.relpath(file_id)

    def path(self, file_id: int) -> str:
        """Return the disk path of ``file_id``."""
        return self.cache.path(file_id)

    def status(self, file_id: int) -> FileStatus:
        """Answer from the sideband database (see :meth:`SidebandIndex.status`)."""
        return self.index.status(file_id, self.relpath(file_id), self.path(file_id))

    def checksums(self, file_id: int) -> dict[str, bytes]:
        """Return the digests recorded with the file's inode (kept while the HSM has it released)."""
        recorded = self.cache.checksums_or_none(file_id)
        return recorded if recorded else super().checksums(file_id)

    def open_reader(self, file_id: int) -> Reader:
        """Open a file whose data is online; an offline one is a 503 telling the client to POST.

        With the database down, the file's allocated blocks tell: data that
        is not resident would make the read wait for a recall, so it is refused.
        """
        try:
            online = self.index.online(self.relpath(file_id))
        except StatusMismatch:
            online = None
        except StorageUnavailable:
            online = None
            reader = self.cache.open_reader(file_id)
            st = os.fstat(reader.fileno())
            if st.st_size and st.st_blocks * 512 < st.st_size:
                reader.close()
                raise
            return reader
        if online is False:
            raise OfflineOnTape(
                f"file {file_id} is only on tape; POST /{file_id} to stage it, then GET it again"
            )
        return self.cache.open_reader(file_id)

    def stage(self, file_id: int) -> bool:
        """True when the data is online; otherwise ask the filesystem to stage it and return False."""
        online = self.index.online(self.relpath(file_id))
        if online is None:
            raise FileNotInArchive(f"file {file_id} is not in the archive")
        if online:
            return True
        with self._staging_lock:
            if file_id in self._staging:
                return False
            self._staging.add(file_id)
        self._stager.submit(self._read_first_byte, file_id)
        return False

    def _read_first_byte(self, file_id: int) -> None:
        try:
            with contextlib.suppress(OSError), open(self.path(file_id), "rb", buffering=0) as handle:
                handle.read(1)
        finally:
            with self._staging_lock:
                self._staging.discard(file_id)

    def tape_positions(self, file_ids: Iterable[int]) -> dict[int, TapePosition]:
        """Answer from ``sam_archive``: the newest live copy of each offline file."""
        return self.index.tape_positions({self.relpath(file_id): file_id for file_id in file_ids})

    def localities(self, file_ids: Iterable[int]) -> dict[int, str]:
        """Answer as :meth:`status` would per file, from batched reads of the database (one per 500 files)."""
        names = {file_id: self.relpath(file_id) for file_id in file_ids}
        try:
            rows = self.index.rows_of(list(names.values()))
        except StorageUnavailable:
            return dict.fromkeys(names, "UNAVAILABLE")
        found: dict[int, str] = {}
        for file_id, relpath in names.items():
            try:
                status = self.index.status_of(file_id, relpath, self.path(file_id), rows.get(relpath, []))
            except FileNotInArchive:
                found[file_id] = "NONE"
            except ArchiveError:  # the database is behind the filesystem for this file
                found[file_id] = "UNAVAILABLE"
            else:
                on_disk, on_tape = status.media == "disk", sum(status.bytes_per_level[1:]) > 0
                found[file_id] = "DISK_AND_TAPE" if on_disk and on_tape else "DISK" if on_disk else "TAPE"
        return found

    def open_writer(
        self, file_id: int, mtime: float, expect: Sequence[ExpectedDigest] = (), exclusive: bool = False
    ) -> Writer:
        """Write through the filesystem (the HSM's updater records the new file)."""
        return self.cache.open_announced_writer(self.events, file_id, mtime, expect, exclusive)

    def adopt(self, file_id: int, source_path: str) -> int:
        """Move a server-side file in through the filesystem (see DiskCache.adopt)."""
        return self.cache.adopt_announced(self.events, file_id, source_path)

    def delete(self, file_id: int) -> None:
        """Unlink the file through the filesystem."""
        self.cache.delete_announced(self.events, file_id)

    def list_ids(
        self, on_error: ListingErrorHandler | None = None, on_temp: TempFileHandler | None = None
    ) -> Iterator[int]:
        """Yield the ids of the files on the filesystem."""
        return self.cache.list_ids(on_error, on_temp)

    def check_ready(self) -> None:
        """The prefix is writable and the sideband database answers."""
        self.cache.check_ready()
        super().check_ready()
        self.index.check_ready()

    def metrics_snapshot(self) -> list[MetricSample]:
        """The sideband database's counts."""
        return self.index.metrics()

    def close(self) -> None:
        """Stop background stages, close the pool's connections and the event guards."""
        self._stager.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.index.db.close_all()
        super().close()
