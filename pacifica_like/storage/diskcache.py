"""The disk cache: archive files on a local or shared filesystem, and the protocol that commits them.

:class:`DiskCache` owns one regular file per id under a prefix. The posix
backend serves it directly; the tape and sideband backends hold one as their
disk tier (composition: they call it, they do not subclass a backend).

The commit protocol every upload goes through (:class:`AtomicFileWriter`):
temp file in the target directory -> write and hash -> fsync -> rename ->
fsync of the directory; leaving without commit removes the temp file. Paths
come from ``id2filename`` (sharded, the default) or, with
``use_id2filename = false``, from the decimal id itself (flat, as Pacifica's
posix backend stores them). Reads hold the inode they opened, so an overwrite
during a GET never mixes versions.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import signal
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pacifica_like.core import checksums, durable
from pacifica_like.core.config import ArchiveSettings
from pacifica_like.core.durable import fsync_dir
from pacifica_like.core.errors import (
    ArchiveError,
    Conflict,
    FileNotInArchive,
    InvalidRequest,
    StorageUnavailable,
)
from pacifica_like.core.ids import filename2id, relative_path
from pacifica_like.storage import safeopen
from pacifica_like.storage.contract import (
    CHECKSUMS_XATTR,
    CHUNK_SIZE,
    SHA256_XATTR,
    TEMP_SUFFIX,
    AtomicFileWriter,
    Deleted,
    EventBus,
    ExpectedDigest,
    FileReader,
    FileStatus,
    ListingErrorHandler,
    Moved,
    Replaced,
    Stored,
    TempFileHandler,
    read_checksums,
    read_sha256,
    record_checksums,
    status_from_stat,
    temp_name_prefix,
    translate_os_errors,
)


class AnnouncingWriter(AtomicFileWriter):
    """An upload that is one storage change: begun when opened, announced once published.

    Opening asks the event guards (``EventBus.begin``: the inventory writes its
    marker; a refusal removes the temp file and raises). Commit announces
    Stored (no disk file was at the path) or Replaced, as the publish itself
    found (of two racing uploads of a new id, one is Stored and one Replaced);
    discard without commit abandons the change.
    """

    def __init__(self, events: EventBus, file_id: int, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._file_id = file_id
        try:
            self._change = events.begin(file_id, "PUT")
        except BaseException:
            AtomicFileWriter.discard(self)
            raise

    def commit(self) -> int:
        """Publish (see :meth:`publish`), then announce the change."""
        written = self.publish()
        self.announce(self.replaced)
        return written

    def publish(self) -> int:
        """Verify, make durable and publish the file, announcing nothing; return bytes stored."""
        return super().commit()

    def announce(self, replaced: bool) -> None:
        """End the change with Replaced when the commit replaced a file at the path, else Stored."""
        kind = Replaced if replaced else Stored
        self._change.done(kind(self._file_id, self.bytes_written, self._mtime, self.sha256))

    def discard(self) -> None:
        """Remove the temp file unless committed; a change that was not announced is abandoned."""
        try:
            super().discard()
        finally:
            self._change.abandon()


#: Builds the writer of an upload: (final path, mtime, expected digests, replace) -> writer.
WriterFactory = Callable[[str, float, Sequence[ExpectedDigest], bool], AtomicFileWriter]


class DiskCache:
    """Files under ``prefix``, one regular file per id; thread-safe (no per-request state).

    ``taken_elsewhere(file_id)``: under write-once, True when the id is taken
    somewhere else than this disk (on tape), so an upload is refused up front.
    """

    def __init__(
        self,
        prefix: str,
        sharded: bool = True,
        write_once: bool = False,
        patch_roots: Sequence[str] = (),
        taken_elsewhere: Callable[[int], bool] | None = None,
    ) -> None:
        self.prefix = prefix
        # The prefix with one trailing separator: path() is a concatenation, not os.path.join,
        # since a bulk request computes 100,000 paths at once.
        self._root = os.path.join(prefix, "")
        self.sharded = sharded
        self.write_once = write_once
        self.patch_roots = tuple(patch_roots)
        self._taken_elsewhere = taken_elsewhere
        with translate_os_errors(f"cannot create archive prefix {prefix}"):
            os.makedirs(prefix, exist_ok=True)

    @classmethod
    def for_archive(
        cls, archive: ArchiveSettings, taken_elsewhere: Callable[[int], bool] | None = None
    ) -> DiskCache:
        """Build the cache the ``[archive]`` settings describe."""
        return cls(
            archive.prefix, archive.use_id2filename, archive.write_once, archive.patch_roots, taken_elsewhere
        )

    def relpath(self, file_id: int) -> str:
        """Return where ``file_id`` lives, relative to the prefix."""
        return relative_path(file_id, self.sharded)

    def path(self, file_id: int) -> str:
        """Return the absolute path of ``file_id``."""
        return self._root + self.relpath(file_id)

    def id_of(self, relpath: str) -> int | None:
        """Return the id stored at ``relpath`` (relative to the prefix), or None if no id is."""
        try:
            if self.sharded:
                return filename2id("/" + relpath)
            file_id = int(relpath)
            return file_id if str(file_id) == relpath else None
        except ValueError:
            return None

    @staticmethod
    def missing(file_id: int) -> str:
        """Return the message of FileNotInArchive for ``file_id``."""
        return f"file {file_id} is not in the archive"

    def target(self, file_id: int, exclusive: bool = False) -> str:
        """Return where an upload of ``file_id`` goes; Conflict now if it may not replace a file there.

        The early check spares streaming a body only to refuse it; publish()'s
        link() still decides races.
        """
        path = self.path(file_id)
        if self.write_once or exclusive:
            if self._taken_elsewhere is not None and self._taken_elsewhere(file_id):
                raise Conflict(f"file {file_id} already exists (on tape) and the archive is write-once")
            if os.path.lexists(path):
                raise Conflict(f"file {file_id} already exists and the archive is write-once")
        return path

    def open_reader(self, file_id: int) -> FileReader:
        """Open the stored file; the status describes exactly the inode opened."""
        with translate_os_errors(f"cannot read file {file_id}", missing=self.missing(file_id)):
            fd = os.open(self.path(file_id), os.O_RDONLY)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise FileNotInArchive(self.missing(file_id))
                status = status_from_stat(st, self.relpath(file_id), read_sha256(fd))
            except BaseException:
                os.close(fd)
                raise
        return FileReader(fd, status)

    def open_writer(
        self,
        file_id: int,
        mtime: float,
        expect: Sequence[ExpectedDigest] = (),
        make: WriterFactory | None = None,
        exclusive: bool = False,
    ) -> AtomicFileWriter:
        """Start an atomic upload; Conflict now if write-once (or ``exclusive``) and taken.

        ``make`` builds the writer (a subclass of AtomicFileWriter that does more on commit).
        """
        path = self.target(file_id, exclusive)
        replace = not (self.write_once or exclusive)
        if make is None:
            return AtomicFileWriter(path, mtime, expect, replace=replace)
        return make(path, mtime, expect, replace)

    def status(self, file_id: int) -> FileStatus:
        """Stat the file and read its recorded digest, both from one open inode.

        Two lookups by path could straddle a concurrent overwrite and pair one
        version's size with the other's digest.
        """
        with self.open_reader(file_id) as reader:
            return reader.status

    def checksums(self, file_id: int) -> dict[str, bytes]:
        """Return the digests recorded with the file, read from the inode a reader opens."""
        with self.open_reader(file_id) as reader:
            return read_checksums(reader.fileno())

    def checksums_or_none(self, file_id: int) -> dict[str, bytes] | None:
        """Return the file's recorded digests, or None when it is not on disk."""
        try:
            return self.checksums(file_id)
        except FileNotInArchive:
            return None

    def status_or_none(self, file_id: int) -> FileStatus | None:
        """Return the file's status, or None when it is not on disk."""
        try:
            return self.status(file_id)
        except FileNotInArchive:
            return None

    def moved_in(self, file_id: int, size: int) -> Moved:
        """Return the Moved event of a file just adopted: its size, and the mtime and digest it now has."""
        try:
            stored = self.status_or_none(file_id)
        except ArchiveError:  # the move is done; subscribers read storage again if they need to
            stored = None
        mtime, digest = (stored.mtime, stored.sha256) if stored is not None else (0.0, None)
        return Moved(file_id, size, mtime, digest)

    def adopt(self, file_id: int, source_path: str) -> int:
        """Move a server-side file in, committing it like an upload; return the bytes stored.

        The source is opened once, following no symlink (:mod:`pacifica_like.storage.safeopen`),
        and only that open file is hashed, stamped and moved. The inode itself is
        renamed in only when that is provably safe (:func:`_claim`): same
        filesystem, no writer anywhere, owned by this process. Otherwise its bytes
        are copied from the open descriptor through AtomicFileWriter, which hashes
        what it writes, so the archived bytes always match their digest; the
        source name is then removed only if it still names the inode copied.
        """
        with safeopen.open_adopt_source(source_path, self.patch_roots) as source:
            target = self.target(file_id)
            target_dir = os.path.dirname(target)
            with translate_os_errors(f"cannot move {source.path} to file {file_id}"):
                made = durable.make_dirs(target_dir)
                target_dir_fd = os.open(target_dir, safeopen.DIRECTORY_FLAGS)
                try:
                    same_fs = source.stat.st_dev == os.fstat(target_dir_fd).st_dev
                    renamed = same_fs and self._rename_in(source, target_dir_fd, target)
                finally:
                    os.close(target_dir_fd)
                size = source.stat.st_size if renamed else self._copy_in(source, target)
                durable.fsync_parents(made)  # a new shard directory's name, flushed with the file's
                return size

    def _rename_in(self, source: safeopen.AdoptSource, target_dir_fd: int, target: str) -> bool:
        """Hash, stamp and rename the open source inode to ``target``; False: copy instead.

        Raises (changing nothing) when the name no longer leads to that inode or
        write-once refuses the id.
        """
        claim = _claim(source.fd)
        if claim is None:
            return False
        final_name = os.path.basename(target)
        published = False
        try:
            before = os.fstat(source.fd)
            digests = _hash_fd(source.fd)
            after = os.fstat(source.fd)
            # No writer could open it under the lease; the stat comparison double-checks that, and a
            # second name made since the checks would outlive the move: copy in either case.
            if not _unchanged(before, after) or after.st_nlink != 1 or not _still_leased(source.fd):
                claim.undo(source.fd)
                return False
            record_checksums(source.fd, digests)
            # Digests, mode and data are durable before any archive name points at them.
            os.fsync(source.fd)
            temp = temp_name_prefix(final_name) + secrets.token_hex(8) + TEMP_SUFFIX
            # First to a hidden name beside the target (an upload's temp name, so a sweep after a
            # crash here knows whose it is): the move is checked there before it is visible.
            try:
                os.rename(source.name, temp, src_dir_fd=source.dir_fd, dst_dir_fd=target_dir_fd)
            except FileNotFoundError:
                raise InvalidRequest(
                    f"PATCH source {source.path} was removed while it was being moved; nothing was archived"
                ) from None
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # One filesystem seen through two mounts (a bind mount): rename cannot cross; copy.
                claim.undo(source.fd)
                return False
            if not source.same_inode(os.stat(temp, dir_fd=target_dir_fd, follow_symlinks=False)):
                # Someone swapped the name after it was opened: give their entry back, archive nothing.
                _move_back(target_dir_fd, temp, source.dir_fd, source.name)
                raise InvalidRequest(
                    f"PATCH source {source.path} was replaced while it was being moved; nothing was archived"
                )
            try:
                _publish_at(target_dir_fd, temp, final_name, replace=not self.write_once)
            except BaseException:
                _move_back(target_dir_fd, temp, source.dir_fd, source.name)
                raise
            published = True
            # Both directories changed: make the move durable in each.
            os.fsync(target_dir_fd)
            os.fsync(source.dir_fd)
            if not _still_leased(source.fd):
                # A writer is waiting to open the inode just published. It cannot write
                # until the lease is released, so the bytes are still the hashed ones:
                # publish a private copy in its place and let the writer have the orphan.
                _copy_from_fd(source, target, replace=True)
            return True
        except BaseException:
            if not published:
                claim.undo(source.fd)
            raise
        finally:
            _release(source.fd)

    def _copy_in(self, source: safeopen.AdoptSource, target: str) -> int:
        """Copy the open source into the archive, then drop its name if it still names that inode."""
        size = _copy_from_fd(source, target, replace=not self.write_once)
        # Only now is the copy durable in the archive; the source may go, but only
        # the inode that was copied (a name swapped meanwhile is someone else's file).
        source.remove_if_unchanged()
        return size

    def delete(self, file_id: int) -> None:
        """Unlink the file and flush its directory."""
        path = self.path(file_id)
        with translate_os_errors(f"cannot delete file {file_id}", missing=self.missing(file_id)):
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise FileNotInArchive(self.missing(file_id))
            os.unlink(path)
            fsync_dir(os.path.dirname(path))

    # What a backend serving this cache directly does, announced on its event bus: one place,
    # so every such backend tells subscribers the same thing at the same moment.

    def open_announced_writer(
        self,
        events: EventBus,
        file_id: int,
        mtime: float,
        expect: Sequence[ExpectedDigest] = (),
        exclusive: bool = False,
    ) -> AtomicFileWriter:
        """Start an upload that announces Stored or Replaced on ``events`` once it is durable."""
        return self.open_writer(
            file_id,
            mtime,
            expect,
            lambda path, mtime, expect, replace: AnnouncingWriter(
                events, file_id, path, mtime, expect, replace=replace
            ),
            exclusive=exclusive,
        )

    def adopt_announced(self, events: EventBus, file_id: int, source_path: str) -> int:
        """Adopt (PATCH) under the bus's guards and announce Moved; return the bytes stored."""
        with events.begin(file_id, "PATCH") as change:
            size = self.adopt(file_id, source_path)
            change.done(self.moved_in(file_id, size))
        return size

    def delete_announced(self, events: EventBus, file_id: int) -> None:
        """Delete under the bus's guards and announce Deleted."""
        with events.begin(file_id, "DELETE") as change:
            self.delete(file_id)
            change.done(Deleted(file_id))

    def list_ids(
        self, on_error: ListingErrorHandler | None = None, on_temp: TempFileHandler | None = None
    ) -> Iterator[int]:
        """Walk the prefix, yielding ids of archive files; hidden names skipped (temp files: ``on_temp``).

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
                    if on_temp is not None and entry.name.endswith(TEMP_SUFFIX):
                        on_temp(entry.path)
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if self.sharded:
                        stack.append((entry.path, relative + entry.name + "/"))
                    continue
                file_id = self.id_of(relative + entry.name)
                if file_id is not None:
                    yield file_id

    def check_ready(self) -> None:
        """Raise StorageUnavailable unless the prefix is a directory this process may write."""
        prefix = self.prefix
        try:
            st = os.stat(prefix)
        except OSError as exc:
            raise StorageUnavailable(f"archive prefix {prefix}: {exc.strerror or exc}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise StorageUnavailable(f"archive prefix {prefix} is not a directory")
        if not os.access(prefix, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"archive prefix {prefix} is not writable by this process")


#: fcntl(2) F_SETSIG (Linux; Python's fcntl module does not name it).
_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)


@dataclass(frozen=True)
class _Claim:
    """What :func:`_claim` changed on the source, so a refusal can put it back."""

    uid: int
    mode: int
    #: The digest attributes the source had: name -> raw value, None where it had none.
    recorded: dict[str, bytes | None]

    def undo(self, fd: int) -> None:
        """Restore owner, mode and recorded digests (best effort: the refusal matters more)."""
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_uid != self.uid:
                os.fchown(fd, self.uid, -1)
            os.fchmod(fd, self.mode)
            for name, value in self.recorded.items():
                with contextlib.suppress(OSError):
                    if value is None:
                        os.removexattr(fd, name)
                    else:
                        os.setxattr(fd, name, value)


def _claim(fd: int) -> _Claim | None:
    """Make renaming the open inode into the archive safe, or return None (then it is copied).

    Safe means no one can change its bytes after they are hashed:
    - a read lease (F_SETLEASE F_RDLCK) is refused with EAGAIN while any process
      has the file open for writing, and while we hold it a new open for writing
      (or a truncate) waits and breaks it, which :func:`_still_leased` then sees;
    - the file becomes this process's (fchown, where it may) and 0444, so its
      former owner cannot chmod it back or reopen it for writing once it is archived.
    The lease break is signalled to the lease holder: we redirect that signal to
    SIGPIPE, which Python ignores, and take no lease where it is not ignored
    (the default SIGIO would kill the worker).
    """
    if signal.getsignal(signal.SIGPIPE) != signal.SIG_IGN:
        return None
    st = os.fstat(fd)
    try:
        fcntl.fcntl(fd, _F_SETSIG, signal.SIGPIPE)
        # EAGAIN: a writer exists; EACCES: not ours and no CAP_LEASE; EINVAL: no leases on this filesystem.
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return None
    claim = _Claim(st.st_uid, stat.S_IMODE(st.st_mode), _recorded_attributes(fd))
    try:
        if st.st_uid != os.geteuid():
            os.fchown(fd, os.geteuid(), -1)
        os.fchmod(fd, 0o444)
    except OSError:
        claim.undo(fd)
        _release(fd)
        return None
    return claim


def _recorded_attributes(fd: int) -> dict[str, bytes | None]:
    """Return the source's own digest attributes, so a refused move can put them back."""
    recorded: dict[str, bytes | None] = {}
    for name in (SHA256_XATTR, CHECKSUMS_XATTR):
        try:
            recorded[name] = os.getxattr(fd, name)
        except OSError:
            recorded[name] = None
    return recorded


def _still_leased(fd: int) -> bool:
    """Say whether our read lease is intact (no writer has tried to open the file since)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        return False


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def _unchanged(before: os.stat_result, after: os.stat_result) -> bool:
    """Say whether nothing wrote to the file between two fstat calls."""
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )


def _hash_fd(fd: int) -> dict[str, bytes]:
    """Return the kept digests of an open file's bytes, read from offset 0 (the offset is not moved)."""

    def chunks() -> Iterator[bytes]:
        offset = 0
        while chunk := os.pread(fd, CHUNK_SIZE, offset):
            yield chunk
            offset += len(chunk)

    return checksums.compute(chunks())


def _copy_from_fd(source: safeopen.AdoptSource, target: str, replace: bool) -> int:
    """Commit the open source's bytes as a new file at ``target``; return the bytes stored.

    AtomicFileWriter hashes what it writes, so even if a writer elsewhere
    changes the source meanwhile, the stored bytes match the stored digest.
    """
    with AtomicFileWriter(target, source.stat.st_mtime, replace=replace) as writer:
        offset = 0
        while chunk := os.pread(source.fd, CHUNK_SIZE, offset):
            writer.write(chunk)
            offset += len(chunk)
        return writer.commit()


def _publish_at(dir_fd: int, temp: str, final_name: str, replace: bool) -> None:
    """Give the checked temp entry its archive name (as ``publish``, relative to ``dir_fd``).

    rename() replaces atomically; under write-once, link() refuses an existing name (Conflict).
    """
    if replace:
        os.rename(temp, final_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    try:
        os.link(temp, final_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise Conflict(f"{final_name} already exists and the archive is write-once") from None
    os.unlink(temp, dir_fd=dir_fd)


def _move_back(from_dir_fd: int, temp: str, to_dir_fd: int, name: str) -> None:
    """Return an entry to its source directory without replacing anything there.

    link() refuses an existing name; a name taken meanwhile (or a directory,
    which cannot be linked) gets a fresh ``.patch-returned-*`` name instead.
    """
    try:
        os.link(temp, name, src_dir_fd=from_dir_fd, dst_dir_fd=to_dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        # The source directory itself was removed meanwhile: the entry has no home; drop it
        # rather than leave someone else's object in the archive.
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=from_dir_fd)
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.EPERM, errno.EISDIR):
            raise
        spare = f"{name}.patch-returned-{secrets.token_hex(4)}"
        os.rename(temp, spare, src_dir_fd=from_dir_fd, dst_dir_fd=to_dir_fd)
        return
    os.unlink(temp, dir_fd=from_dir_fd)


def _scan(directory: str) -> list[os.DirEntry[str]]:
    """Return a directory's entries; none if it vanished, ArchiveError if it cannot be read."""
    with translate_os_errors(f"cannot list {directory}"):
        try:
            return list(os.scandir(directory))
        except FileNotFoundError:
            return []
