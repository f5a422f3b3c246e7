"""Commit a transaction that is durable soon or at once, sharing flushes between concurrent commits.

PostgreSQL and MySQL commit durably by themselves, and group concurrent
commits into one log flush by themselves. A SQLite database that several
processes write is opened in WAL mode with ``synchronous=NORMAL`` (see
:data:`SQLITE_SHARED`): a commit then does not fsync, so the write lock is held
for microseconds, and this helper flushes the WAL *after* the lock is released,
by group commit across threads and processes:

* after its commit, a caller takes the ``<database>-sync`` file's lock (flock);
* that file holds when the last finished flush of the WAL *began* (monotonic
  nanoseconds, one clock for every process on the host): a flush that began
  after this caller's commit returned covered it, and the caller returns
  without flushing;
* otherwise the caller leads: it notes the time, fdatasyncs the WAL (which
  flushes every commit written before, its own and those of the callers
  queued behind the lock) and writes the time down.

With a ``flush_interval`` (the catalog's default, :data:`FLUSH_INTERVAL`) a
caller does not wait: it leads only when the last flush began longer ago than
the interval and no flush runs, else it leaves a timer that flushes this
process's commits when the interval has passed. A power cut can then take the
commits of the last interval, never more, and never a file: the gateway's
inventory rows are indexes of files that carry their own record (xattrs), and
the next audit records every file whose row was lost
(docs/decisions/0048-the-file-is-the-record.md). Tables that are their own
record (bulk requests, audit results) and deletions flush before they answer
(the default, ``lazy=False``); only the inventory rows of uploads are lazy.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator

import peewee

log = logging.getLogger("pacifica_like.db.durable")

#: Pragmas of a SQLite database many processes write: WAL (readers never block the writer),
#: commits without fsync (:class:`DurableCommits` flushes outside the lock), and no busy wait
#: of SQLite's own (its steps of 1, 2, 5 ... 100 ms are far longer than a lock is held here;
#: :mod:`pacifica_like.db.retry` retries sooner). Open with ``lock_type="IMMEDIATE"``: writers
#: take the lock at BEGIN, so no transaction fails on upgrading a read lock.
SQLITE_SHARED = {"journal_mode": "wal", "synchronous": "normal", "busy_timeout": 0}

#: Seconds a SQLite commit may stay unflushed (0: flushed before the call returns).
FLUSH_INTERVAL = 1.0

#: The sync file's record: when the last flush began (ns), the WAL inode whose directory entry
#: was flushed, and how many flushes ran (for tests and metrics).
_RECORD = struct.Struct("<QQQ")

#: Test seam: called by a leader with the WAL's path after each flush, holding the sync lock.
#: None in production; tests install a hook here to count or snapshot what reached the disk.
after_flush: Callable[[str], None] | None = None


class DurableCommits:
    """Durable transactions on one database; safe to share between threads and processes."""

    def __init__(self, db: peewee.Database, flush_interval: float = FLUSH_INTERVAL) -> None:
        self.db = db
        self.flush_interval_ns = int(flush_interval * 1e9)
        self._timer: tuple[int, threading.Timer] | None = None
        is_file = isinstance(db, peewee.SqliteDatabase) and db.database != ":memory:"
        self.wal = db.database + "-wal" if is_file else None
        self.sync_path = db.database + "-sync" if is_file else None
        self._sync_fd: tuple[int, int] | None = None  # (pid, fd): not shared across a fork
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def transaction(self, lazy: bool = False) -> Iterator[None]:
        """Run the block in one transaction, on disk when this returns (``lazy``: within the interval)."""
        with self.db.atomic():
            yield
        if self.wal is not None:
            self.sync_wal(lazy)

    def _sync_file(self) -> int:
        """Return this process's descriptor of the sync file (opened once per process)."""
        opened = self._sync_fd
        pid = os.getpid()
        if opened is not None and opened[0] == pid:
            return opened[1]
        with self._lock:
            if self._sync_fd is None or self._sync_fd[0] != pid:
                assert self.sync_path is not None
                fd = os.open(self.sync_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                self._sync_fd = (pid, fd)
            return self._sync_fd[1]

    def sync_wal(self, lazy: bool = False, committed: int | None = None) -> None:
        """Flush the WAL for this thread's commits: now (group commit), or within ``flush_interval``.

        ``lazy`` (with a flush interval set) returns at once when a flush began
        less than the interval ago or one runs now, and leaves a timer to flush
        this process's commits when the interval has passed. ``committed``: when
        the commits to flush had returned (monotonic ns; default: now).
        """
        assert self.wal is not None
        if committed is None:
            committed = time.monotonic_ns()
        fd = self._sync_file()
        lazy = lazy and self.flush_interval_ns > 0
        # flock locks belong to the open file description, which this process's threads share:
        # a thread lock orders them, the flock orders the processes.
        with self._lock:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if lazy else 0))
            except BlockingIOError:
                self._flush_later()  # a leader flushes now; our commit may have come after it began
                return
            try:
                record = os.pread(fd, _RECORD.size, 0)
                began, inode, flushes = _RECORD.unpack(record) if len(record) == _RECORD.size else (0, 0, 0)
                if began >= committed:
                    return  # a flush that began after our commit returned has finished
                if lazy and committed - began < self.flush_interval_ns:
                    self._flush_later()
                    return
                began = time.monotonic_ns()
                inode = self._flush(inode)
                os.pwrite(fd, _RECORD.pack(began, inode, flushes + 1), 0)
                if after_flush is not None:
                    after_flush(self.wal)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _flush_later(self) -> None:
        """Have a timer flush this process's commits when ``flush_interval`` has passed (one at a time)."""
        if self._timer is not None and self._timer[0] == os.getpid() and self._timer[1].is_alive():
            return
        timer = threading.Timer(self.flush_interval_ns / 1e9, self._flush_now)
        timer.daemon = True
        self._timer = (os.getpid(), timer)
        timer.start()

    def _flush_now(self) -> None:
        self._timer = None
        try:
            self.sync_wal(lazy=False)
        except OSError as exc:  # the next commit's flush or timer tries again
            log.warning("could not flush the catalog's write-ahead log %s: %s", self.wal, exc)

    def flushes(self) -> int:
        """Return how many group flushes ran on this database (all processes), 0 without a sync file."""
        if self.sync_path is None:
            return 0
        try:
            with open(self.sync_path, "rb") as handle:
                record = handle.read(_RECORD.size)
        except FileNotFoundError:
            return 0
        return _RECORD.unpack(record)[2] if len(record) == _RECORD.size else 0

    def _flush(self, synced_inode: int) -> int:
        """fdatasync the WAL (and its directory entry when it is a new file); return its inode."""
        assert self.wal is not None
        try:
            fd = os.open(self.wal, os.O_RDONLY)
        except FileNotFoundError:
            return synced_inode  # no WAL: the last connection checkpointed it into the synced database
        try:
            # fdatasync: once a checkpoint has let SQLite rewind the WAL, commits overwrite it in
            # place, its size stays put, and flushing the data needs no journal commit.
            os.fdatasync(fd)
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        if inode != synced_inode:
            # A new WAL file: its name must survive a power cut too.
            fd = os.open(os.path.dirname(self.wal) or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return inode
