"""The posix backend: every file lives on disk under the archive prefix.

It serves a :class:`~pacifica_like.storage.diskcache.DiskCache` directly:
the cache owns the files and the commit protocol; this class adds the events
each change announces (:class:`~pacifica_like.storage.contract.EventBus`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pacifica_like.core.config import Settings
from pacifica_like.storage.contract import (
    Backend,
    EventBus,
    ExpectedDigest,
    FileStatus,
    ListingErrorHandler,
    Reader,
    TempFileHandler,
    Writer,
)
from pacifica_like.storage.diskcache import DiskCache


class PosixBackend(Backend):
    """Files on a local or shared filesystem, one regular file per id."""

    name = "posix"

    def __init__(self, settings: Settings, events: EventBus | None = None) -> None:
        super().__init__(settings, events)
        self.cache = DiskCache.for_archive(settings.archive)
        self.prefix = self.cache.prefix

    def relpath(self, file_id: int) -> str:
        """Return where ``file_id`` lives, relative to the prefix."""
        return self.cache.relpath(file_id)

    def path(self, file_id: int) -> str:
        """Return the absolute path of ``file_id``."""
        return self.cache.path(file_id)

    def open_reader(self, file_id: int) -> Reader:
        """Open the stored file; the status describes exactly the inode opened."""
        return self.cache.open_reader(file_id)

    def open_writer(
        self, file_id: int, mtime: float, expect: Sequence[ExpectedDigest] = (), exclusive: bool = False
    ) -> Writer:
        """Start an atomic upload; Conflict now if write-once (or exclusive) and taken."""
        return self.cache.open_announced_writer(self.events, file_id, mtime, expect, exclusive)

    def status(self, file_id: int) -> FileStatus:
        """Stat the file and read its recorded digest, both from one open inode."""
        return self.cache.status(file_id)

    def checksums(self, file_id: int) -> dict[str, bytes]:
        """Return the digests recorded with the file (sha-256, adler32, md5)."""
        return self.cache.checksums(file_id)

    def stage(self, file_id: int) -> bool:
        """Posix data is always on disk: only check that the file exists."""
        self.status(file_id)
        return True

    def adopt(self, file_id: int, source_path: str) -> int:
        """Move a server-side file in (see :meth:`DiskCache.adopt`); return the bytes stored."""
        return self.cache.adopt_announced(self.events, file_id, source_path)

    def delete(self, file_id: int) -> None:
        """Unlink the file and flush its directory."""
        self.cache.delete_announced(self.events, file_id)

    def list_ids(
        self, on_error: ListingErrorHandler | None = None, on_temp: TempFileHandler | None = None
    ) -> Iterator[int]:
        """Yield ids of archive files; hidden (temp) names are skipped."""
        return self.cache.list_ids(on_error, on_temp)

    def check_ready(self) -> None:
        """Raise StorageUnavailable unless the prefix is a directory this process may write."""
        self.cache.check_ready()
        super().check_ready()
