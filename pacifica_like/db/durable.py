"""Commit a transaction that is on disk when the call returns, without holding the lock for the flush.

PostgreSQL and MySQL commit durably by themselves. A SQLite database that
several processes write is opened in WAL mode with ``synchronous=NORMAL`` (see
:data:`SQLITE_SHARED`): a commit then does not fsync, so the write lock is held
for microseconds; this helper fsyncs the WAL file *after* the lock is released,
which flushes this commit's frames and every earlier one, and the filesystem
merges concurrent writers' flushes of the same file. With ``synchronous=FULL``
the fsync ran under the lock, one process at a time, and halved PUT throughput
at 16 connections.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import peewee

#: Pragmas of a SQLite database many processes write: WAL (readers never block the writer),
#: commits without fsync (:class:`DurableCommits` flushes outside the lock), and no busy wait
#: of SQLite's own (its steps of 1, 2, 5 ... 100 ms are far longer than a lock is held here;
#: :mod:`pacifica_like.db.retry` retries sooner). Open with ``lock_type="IMMEDIATE"``: writers
#: take the lock at BEGIN, so no transaction fails on upgrading a read lock.
SQLITE_SHARED = {"journal_mode": "wal", "synchronous": "normal", "busy_timeout": 0}


class DurableCommits:
    """Durable transactions on one database; safe to share between threads."""

    def __init__(self, db: peewee.Database) -> None:
        self.db = db
        is_file = isinstance(db, peewee.SqliteDatabase) and db.database != ":memory:"
        self.wal = db.database + "-wal" if is_file else None
        self._synced_wal_inode: int | None = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block in one transaction, on disk when this returns."""
        with self.db.atomic():
            yield
        if self.wal is not None:
            self.sync_wal()

    def sync_wal(self) -> None:
        """Flush the SQLite WAL file (and, once per WAL file, its directory entry)."""
        assert self.wal is not None
        try:
            fd = os.open(self.wal, os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: the last connection checkpointed it into the synced database file
        try:
            # fdatasync: once a checkpoint has let SQLite rewind the WAL, commits overwrite it in
            # place, its size stays put, and flushing the data needs no journal commit.
            os.fdatasync(fd)
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        if inode != self._synced_wal_inode:
            # A new WAL file: its name must survive a power cut too.
            fd = os.open(os.path.dirname(self.wal) or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._synced_wal_inode = inode
