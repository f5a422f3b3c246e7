"""A file's identity as the sideband database keys it: inode number and generation.

The generation comes from the filesystem (``FS_IOC_GETVERSION``: ext4, XFS,
btrfs keep one per inode and change it whenever the inode number is given to
a new file), which is what Oracle HSM's own filesystem does. Where the
filesystem has none (tmpfs, some network filesystems) :func:`generation`
returns None and the updater numbers generations itself: one past the highest
it has recorded for that inode number.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import zlib
from dataclasses import dataclass

from pacifica_like.storage.contract import read_sha256

#: _IOR('v', 1, long): read an inode's generation number.
FS_IOC_GETVERSION = 0x80087601
_LONG = struct.Struct("l")


def generation(fd: int) -> int | None:
    """Return the filesystem's generation number of the open inode, or None if it keeps none."""
    try:
        raw = fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * _LONG.size)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise
    return _LONG.unpack(raw)[0] & 0xFFFFFFFF


def name_hash(name: str) -> int:
    """Return the hash ``sam_file`` indexes names by (CRC-32 of the UTF-8 name)."""
    return zlib.crc32(name.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True)
class DiskFile:
    """What the filesystem says about one archive file (``gen`` None: the filesystem keeps none)."""

    ino: int
    gen: int | None
    size: int
    mtime: float
    ctime: float
    uid: int
    gid: int
    sha256: bytes | None
    parent: tuple[int, int | None]


class ParentCache:
    """Identities of directories, looked up once per run (a load walks thousands of files per directory)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[int, int | None]] = {}

    def identity(self, directory: str) -> tuple[int, int | None]:
        """Return ``(ino, gen)`` of ``directory``."""
        known = self._known.get(directory)
        if known is None:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                known = (os.fstat(fd).st_ino, generation(fd))
            finally:
                os.close(fd)
            if len(self._known) > 100_000:
                self._known.clear()
            self._known[directory] = known
        return known


def read_disk_file(path: str, parents: ParentCache | None = None) -> DiskFile | None:
    """Return the identity and metadata of the regular file at ``path``, or None if there is none.

    Opens the file (metadata only; no byte is read) so that inode, generation
    and digest all describe one inode even if an upload renames over the name.
    Raises OSError for anything but absence.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None  # a symlink is not an archive file
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        gen = generation(fd)
        digest = read_sha256(fd)
    finally:
        os.close(fd)
    parent = (parents or ParentCache()).identity(os.path.dirname(path))
    return DiskFile(
        st.st_ino, gen, st.st_size, st.st_mtime, st.st_ctime, st.st_uid, st.st_gid, digest, parent
    )
