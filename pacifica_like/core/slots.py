"""A host-wide count of holders: at most N at once among every process and thread that share a directory.

A per-process semaphore does not bound uWSGI, whose workers are processes
(often of one thread each): eight workers could each let one heavy request
in and nobody would be left to answer ``GET /``. Here a slot is an exclusive
``flock`` on one of N small files in a directory every process of the
archive on this host sees: :func:`directory_for` names one in the temp
directory after the archive prefix (the archive holds only archive data);
the tape backend keeps its own in the library directory.
Locks belong to open file descriptions, so two threads of one process
compete like two processes do, and the kernel drops the lock of a process
that dies, so a killed worker never leaks its slot. Stdlib only: the backends
import it (a leaf, like ``owners``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import stat
import tempfile
import threading
from collections.abc import Iterator

log = logging.getLogger("pacifica_like.error")


def directory_for(prefix: str) -> str:
    """Return the slot directory of the archive at ``prefix`` on this host (per user, per archive)."""
    digest = hashlib.sha256(os.path.realpath(prefix).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"pacifica_like-slots-{os.getuid()}-{digest}")


class SlotPool:
    """At most ``size`` holders at once of the slots named ``name`` in ``directory``.

    When the directory cannot be used (a read-only prefix), the pool falls
    back to a semaphore of the same size in this process, and says so once.
    """

    def __init__(self, directory: str, name: str, size: int) -> None:
        self.directory = directory
        self.name = name
        self.size = size
        self._fallback = threading.BoundedSemaphore(size)
        self._warned = False

    def _paths(self) -> list[str]:
        # Start at a random slot so holders do not all probe slot 0 first.
        first = random.randrange(self.size)
        order = [(first + i) % self.size for i in range(self.size)]
        return [os.path.join(self.directory, f"{self.name}.{i}") for i in order]

    def try_acquire(self) -> int | None:
        """Take a free slot without waiting: a handle for :meth:`release`, or None if all are held.

        -1 stands for a slot of the in-process fallback.
        """
        if self.size <= 0:
            return None
        try:
            self._check_directory()
            for path in self._paths():
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                except BaseException:
                    os.close(fd)
                    raise
                return fd
            return None
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.error(
                    "slots %s in %s unusable (%s): counting in this process only",
                    self.name,
                    self.directory,
                    exc,
                )
            return -1 if self._fallback.acquire(blocking=False) else None

    def _check_directory(self) -> None:
        """Create the directory, and refuse one that another user could have prepared (a shared /tmp)."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.directory, 0o700)
        st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"{self.directory} is not a private directory of this user")

    def release(self, fd: int) -> None:
        """Give back a slot :meth:`try_acquire` returned."""
        if fd == -1:
            self._fallback.release()
        else:
            os.close(fd)  # closing the last descriptor drops the lock

    @contextlib.contextmanager
    def hold(self) -> Iterator[bool]:
        """Hold a slot for the block if one is free: yields True, else False (the caller defers)."""
        fd = self.try_acquire()
        try:
            yield fd is not None
        finally:
            if fd is not None:
                self.release(fd)
