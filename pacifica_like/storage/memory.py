"""The memory backend: files live in this process's memory, nothing touches the disk.

It serves tests of the upper layers (fast, no directory to clean up) and
shows that the contract in :mod:`pacifica_like.storage.contract` is all the gateway needs.
It is a test double, not storage:

- the data is per process and lost when it exits: fine for tests and a
  single-process ``pacifica-like serve``; under uWSGI every worker would hold
  its own archive, so :meth:`MemoryBackend.preflight` refuses more than one process;
- a writer buffers the whole upload in memory until commit, the one place
  memory grows with the file size.

Backends built in one process with the same ``[archive] prefix`` share one
archive (the prefix only names it; no directory is created), as two posix
backends on one directory would.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pacifica_like.core.config import ConfigError, Settings
from pacifica_like.core.errors import Conflict, FileNotInArchive
from pacifica_like.core.ids import relative_path
from pacifica_like.storage import safeopen
from pacifica_like.storage.contract import (
    CHUNK_SIZE,
    Backend,
    Deleted,
    EventBus,
    ExpectedDigest,
    FileStatus,
    ListingErrorHandler,
    Moved,
    Reader,
    Replaced,
    Stored,
    TempFileHandler,
    UploadDigests,
    Writer,
    translate_os_errors,
)


@dataclass(frozen=True)
class _Stored:
    """One committed version; readers keep a reference, so a replacement never changes their bytes."""

    data: bytes
    status: FileStatus
    checksums: dict[str, bytes]


class _Archive:
    """The files of one archive: id -> current version, every change under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[int, _Stored] = {}


#: Archives of this process by prefix, so every backend built on one prefix sees the same files.
_ARCHIVES: dict[str, _Archive] = {}
_ARCHIVES_LOCK = threading.Lock()


def _archive_for(prefix: str) -> _Archive:
    with _ARCHIVES_LOCK:
        return _ARCHIVES.setdefault(prefix, _Archive())


class MemoryReader(Reader):
    """A view of one committed version (a later commit publishes a new object)."""

    def __init__(self, stored: _Stored) -> None:
        self._data = stored.data
        self._offset = 0
        self.status = stored.status

    def read(self, size: int = CHUNK_SIZE) -> bytes:
        """Return up to ``size`` bytes from the current offset."""
        chunk = self._data[self._offset : self._offset + size]
        self._offset += len(chunk)
        return chunk

    def seek(self, offset: int) -> None:
        """Move to ``offset``."""
        self._offset = offset

    def close(self) -> None:
        """Nothing to release; the version's bytes go when no reader holds them."""


class MemoryWriter(Writer):
    """Buffer an upload (the whole file, in memory) and publish it in one step on commit."""

    def __init__(
        self,
        backend: MemoryBackend,
        file_id: int,
        mtime: float,
        expect: Sequence[ExpectedDigest],
        moved: bool = False,
        exclusive: bool = False,
    ) -> None:
        self._backend = backend
        self._moved = moved
        self._exclusive = exclusive
        self._change = backend.events.begin(file_id, "PATCH" if moved else "PUT")
        self._file_id = file_id
        self._mtime = mtime
        self._digests = UploadDigests(expect)
        self._buffer: bytearray | None = bytearray()

    def write(self, chunk: bytes) -> None:
        """Append and hash ``chunk``."""
        if self._buffer is None:
            raise ValueError("write to a committed or discarded upload")
        self._buffer += chunk
        self._digests.update(chunk)

    def commit(self) -> int:
        """Verify digests, then publish; Conflict if write-once and another commit won."""
        if self._buffer is None:
            raise ValueError("commit of a committed or discarded upload")
        size = len(self._buffer)
        digest = self._digests.verify(size)
        kept = self._digests.checksums
        existed = self._backend._publish(
            self._file_id, bytes(self._buffer), self._mtime, kept, self._exclusive
        )
        self._buffer = None
        self.sha256 = digest
        self.checksums = kept
        kind = Moved if self._moved else Replaced if existed else Stored
        self._change.done(kind(self._file_id, size, self._mtime, digest))
        return size

    def discard(self) -> None:
        """Drop the buffer unless committed (abandoning the change); safe to call twice."""
        self._digests.close()
        self._buffer = None
        self._change.abandon()


class MemoryBackend(Backend):
    """Files in a process-local dict; see the module docstring for what that implies."""

    name = "memory"

    def __init__(self, settings: Settings, events: EventBus | None = None) -> None:
        super().__init__(settings, events)
        archive = settings.archive
        self.sharded = archive.use_id2filename
        self.write_once = archive.write_once
        self.patch_roots = archive.patch_roots
        self._archive = _archive_for(archive.prefix)

    @classmethod
    def preflight(cls, settings: Settings) -> None:
        """Refuse uWSGI with several processes: each would serve a different, private archive."""
        uwsgi = sys.modules.get("uwsgi")
        processes = getattr(uwsgi, "numproc", 1) if uwsgi is not None else 1
        if processes > 1:
            raise ConfigError(
                f"backend 'memory' keeps files in one process's memory, but uWSGI runs {processes} "
                "processes (each would have its own archive): use processes = 1 or a disk backend"
            )

    def check_ready(self) -> None:
        """Always ready: the archive is this process's memory, with no directory or service to lose."""

    def relpath(self, file_id: int) -> str:
        """Where ``file_id`` would live under the prefix, as posix names it (HEAD reports it)."""
        return relative_path(file_id, self.sharded)

    def _get(self, file_id: int) -> _Stored:
        stored = self._archive.files.get(file_id)  # one dict lookup: atomic, no lock needed
        if stored is None:
            raise FileNotInArchive(f"file {file_id} is not in the archive")
        return stored

    def _publish(
        self, file_id: int, data: bytes, mtime: float, kept: dict[str, bytes], exclusive: bool = False
    ) -> bool:
        """Make ``data`` the current version of ``file_id``; return whether it replaced one.

        Conflict if write-once (or ``exclusive``) and taken.
        """
        with self._archive.lock:
            existed = file_id in self._archive.files
            if (self.write_once or exclusive) and existed:
                raise Conflict(f"file {file_id} already exists and the archive is write-once")
            size = len(data)
            status = FileStatus(
                size=size,
                mtime=mtime,
                ctime=time.time(),
                bytes_per_level=(size, 0),
                media="disk",
                relpath=self.relpath(file_id),
                sha256=kept["sha256"],
            )
            self._archive.files[file_id] = _Stored(data, status, kept)
        return existed

    def open_reader(self, file_id: int) -> Reader:
        """Open the current version; later commits do not change what this reader returns."""
        return MemoryReader(self._get(file_id))

    def open_writer(
        self, file_id: int, mtime: float, expect: Sequence[ExpectedDigest] = (), exclusive: bool = False
    ) -> Writer:
        """Start a buffered upload; Conflict now if it may not replace a file there (commit decides races)."""
        return self._writer(file_id, mtime, expect, exclusive=exclusive)

    def _writer(
        self,
        file_id: int,
        mtime: float,
        expect: Sequence[ExpectedDigest] = (),
        moved: bool = False,
        exclusive: bool = False,
    ) -> MemoryWriter:
        if (self.write_once or exclusive) and file_id in self._archive.files:
            raise Conflict(f"file {file_id} already exists and the archive is write-once")
        return MemoryWriter(self, file_id, mtime, expect, moved, exclusive)

    def status(self, file_id: int) -> FileStatus:
        """Return the status recorded at commit."""
        return self._get(file_id).status

    def checksums(self, file_id: int) -> dict[str, bytes]:
        """Return the digests computed at commit."""
        return dict(self._get(file_id).checksums)

    def stage(self, file_id: int) -> bool:
        """Memory is the fastest level there is: only check that the file exists."""
        self._get(file_id)
        return True

    def adopt(self, file_id: int, source_path: str) -> int:
        """Copy a server-side file in from the descriptor opened safely, then drop its name.

        The name goes only if it still leads to the inode copied (a name
        swapped meanwhile is someone else's file).
        """
        with (
            safeopen.open_adopt_source(source_path, self.patch_roots) as source,
            translate_os_errors(f"cannot copy {source.path} to file {file_id}"),
        ):
            with self._writer(file_id, source.stat.st_mtime, moved=True) as writer:
                offset = 0
                while chunk := os.pread(source.fd, CHUNK_SIZE, offset):
                    writer.write(chunk)
                    offset += len(chunk)
                size = writer.commit()
            source.remove_if_unchanged()
        return size

    def delete(self, file_id: int) -> None:
        """Forget the file; readers already open keep its bytes."""
        with self.events.begin(file_id, "DELETE") as change:
            with self._archive.lock:
                if self._archive.files.pop(file_id, None) is None:
                    raise FileNotInArchive(f"file {file_id} is not in the archive")
            change.done(Deleted(file_id))

    def list_ids(
        self, on_error: ListingErrorHandler | None = None, on_temp: TempFileHandler | None = None
    ) -> Iterator[int]:
        """Yield the ids stored when the listing starts (nothing can fail to list; no temp files)."""
        with self._archive.lock:
            ids = list(self._archive.files)
        yield from ids
