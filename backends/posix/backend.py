"""The posix backend: every file lives on disk under the archive prefix.

Paths come from ``id2filename`` (sharded, the default) or, with
``use_id2filename = false``, from the decimal id itself (flat, as Pacifica's
posix backend stores them). Uploads go through AtomicFileWriter; reads hold the
inode they opened, so an overwrite during a GET never mixes versions.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence

from backends.base import (
    CHUNK_SIZE,
    AtomicFileWriter,
    Backend,
    ExpectedDigest,
    FileReader,
    FileStatus,
    ListingErrorHandler,
    Reader,
    Writer,
    fsync_dir,
    hash_file,
    publish,
    read_sha256,
    record_sha256,
    resolve_adopt_source,
    status_from_stat,
    translate_os_errors,
)
from pacifica_like.config import Settings
from pacifica_like.errors import ArchiveError, Conflict, FileNotInArchive
from pacifica_like.id2filename import filename2id, id2filename


class PosixBackend(Backend):
    """Files on a local or shared filesystem, one regular file per id."""

    name = "posix"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        archive = settings.archive
        self.prefix = archive.prefix
        # The prefix with one trailing separator: path() is a concatenation, not os.path.join,
        # since a bulk request computes 100,000 paths at once.
        self._root = os.path.join(self.prefix, "")
        self.sharded = archive.use_id2filename
        self.write_once = archive.write_once
        self.patch_roots = archive.patch_roots
        with translate_os_errors(f"cannot create archive prefix {self.prefix}"):
            os.makedirs(self.prefix, exist_ok=True)

    def relpath(self, file_id: int) -> str:
        """Return where ``file_id`` lives, relative to the prefix."""
        return id2filename(file_id)[1:] if self.sharded else str(file_id)

    def path(self, file_id: int) -> str:
        """Return the absolute path of ``file_id``."""
        return self._root + self.relpath(file_id)

    def _target(self, file_id: int) -> str:
        """Return the path an upload of ``file_id`` will take; Conflict now if write-once and taken.

        The early check spares streaming a body only to refuse it; publish()'s
        link() still decides races.
        """
        path = self.path(file_id)
        if self.write_once and os.path.lexists(path):
            raise Conflict(f"file {file_id} already exists and the archive is write-once")
        return path

    def _missing(self, file_id: int) -> str:
        return f"file {file_id} is not in the archive"

    def open_reader(self, file_id: int) -> Reader:
        """Open the stored file; the status describes exactly the inode opened."""
        with translate_os_errors(f"cannot read file {file_id}", missing=self._missing(file_id)):
            fd = os.open(self.path(file_id), os.O_RDONLY)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise FileNotInArchive(self._missing(file_id))
                status = status_from_stat(st, self.relpath(file_id), read_sha256(fd))
            except BaseException:
                os.close(fd)
                raise
        return FileReader(fd, status)

    def open_writer(self, file_id: int, mtime: float, expect: Sequence[ExpectedDigest] = ()) -> Writer:
        """Start an atomic upload; Conflict now if write-once and taken."""
        path = self._target(file_id)
        return AtomicFileWriter(path, mtime, expect, replace=not self.write_once)

    def status(self, file_id: int) -> FileStatus:
        """Stat the file and read its recorded digest, both from one open inode.

        Two lookups by path could straddle a concurrent overwrite and pair one
        version's size with the other's digest.
        """
        with self.open_reader(file_id) as reader:
            return reader.status

    def stage(self, file_id: int) -> bool:
        """Posix data is always on disk: only check that the file exists."""
        self.status(file_id)
        return True

    def adopt(self, file_id: int, source_path: str) -> int:
        """Move a server-side file in, committing it like an upload.

        On the same filesystem the inode is renamed into place after its
        digest is recorded and flushed; across filesystems it is copied
        through AtomicFileWriter and the source removed only after commit.
        """
        source = resolve_adopt_source(source_path, self.patch_roots)
        target = self._target(file_id)
        what = f"cannot move {source_path} to file {file_id}"
        with translate_os_errors(what, missing=f"PATCH source {source_path} does not exist"):
            st = os.stat(source)
            target_dir = os.path.dirname(target)
            os.makedirs(target_dir, exist_ok=True)
            if st.st_dev == os.stat(target_dir).st_dev:
                self._rename_in(source, target, hash_file(source))
            else:
                self._copy_in(source, target, st.st_mtime)
            # The source's directory changed too: make its removal durable.
            fsync_dir(os.path.dirname(source))
        return st.st_size

    def _rename_in(self, source: str, target: str, digest: bytes) -> None:
        fd = os.open(source, os.O_RDONLY)
        try:
            record_sha256(fd, digest)
            os.fchmod(fd, 0o444)
            # Digest and data are durable before the archive name points at them.
            os.fsync(fd)
        finally:
            os.close(fd)
        publish(source, target, replace=not self.write_once)

    def _copy_in(self, source: str, target: str, mtime: float) -> None:
        with (
            open(source, "rb", buffering=0) as src,
            AtomicFileWriter(target, mtime, replace=not self.write_once) as writer,
        ):
            while chunk := src.read(CHUNK_SIZE):
                writer.write(chunk)
            writer.commit()
        # Only now is the copy durable in the archive; the source may go.
        os.unlink(source)

    def delete(self, file_id: int) -> None:
        """Unlink the file and flush its directory."""
        path = self.path(file_id)
        with translate_os_errors(f"cannot delete file {file_id}", missing=self._missing(file_id)):
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise FileNotInArchive(self._missing(file_id))
            os.unlink(path)
            fsync_dir(os.path.dirname(path))

    def list_ids(self, on_error: ListingErrorHandler | None = None) -> Iterator[int]:
        """Walk the prefix, yielding ids of archive files; hidden (temp) names are skipped.

        A directory that cannot be read goes to ``on_error`` (the walk goes on),
        or raises without one. One that vanished meanwhile (ENOENT) held nothing.
        """
        # (absolute path, path relative to the prefix): cheaper than os.path.relpath per file.
        stack = [(self.prefix, "")]
        while stack:
            directory, relative = stack.pop()
            try:
                entries = _scan(directory)
            except ArchiveError as exc:
                if on_error is None:
                    raise
                on_error(directory, exc)
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if self.sharded:
                        stack.append((entry.path, relative + entry.name + "/"))
                    continue
                file_id = self._id_of(relative + entry.name)
                if file_id is not None:
                    yield file_id

    def _id_of(self, relpath: str) -> int | None:
        try:
            if self.sharded:
                return filename2id("/" + relpath)
            file_id = int(relpath)
            return file_id if str(file_id) == relpath else None
        except ValueError:
            return None


def _scan(directory: str) -> list[os.DirEntry[str]]:
    """Return a directory's entries; none if it vanished, ArchiveError if it cannot be read."""
    with translate_os_errors(f"cannot list {directory}"):
        try:
            return list(os.scandir(directory))
        except FileNotFoundError:
            return []
