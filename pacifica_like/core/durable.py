"""Durable file writes: temp beside the target -> write -> fsync -> rename -> fsync of the directory.

Every writer that replaces a file whole goes through here, so each does the
steps in the same order, and cleans up the same way when one fails:

1. the temp file lives in the target's directory: same filesystem, so the
   rename is atomic (a reader sees the old file or the new one, never half);
2. its bytes and metadata are flushed (fsync) *before* any name points at
   them, so a crash never leaves a name on an empty or torn file;
3. the rename (or, refusing an existing name, link + unlink) gives it its name;
4. the directory is flushed, so the new name survives a crash too; when the
   file came from another directory, that one is flushed as well (its entry
   is gone);
5. on any failure before the rename, the temp file is removed.

Uploads keep their own streaming writer (``pacifica_like.storage.contract.
AtomicFileWriter``: hashing, early write-back) and publish through
:func:`publish_over` (which also says whether a file was replaced) or, when
write-once, :func:`publish`. Client downloads use :func:`atomic_write`
(``new_file``, ``mtime``). Stdlib only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO


def fsync_dir(path: str) -> None:
    """Flush a directory's entries so a rename, link or unlink in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str) -> list[str]:
    """Create ``path`` and its missing parents (0777 under the umask); return those made, top first.

    A new directory's name lives in its parent: the caller flushes each made
    directory's parent (:func:`fsync_parents`) before it calls a file in it
    durable. Directories that appear meanwhile (another writer) are not ours.
    """
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    made = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        made.append(directory)
    return made


def fsync_parents(made: list[str]) -> None:
    """Flush the parents of the directories :func:`make_dirs` made, so their names survive a crash.

    After the file's own directory was flushed: on a journaling filesystem that
    flush committed the mkdirs already, and these cost little.
    """
    for parent in dict.fromkeys(os.path.dirname(d) or "." for d in reversed(made)):
        fsync_dir(parent)


def publish(source: str, target: str, replace: bool = True) -> None:
    """Give the durable file ``source`` the name ``target``, then make the change durable.

    ``replace``: rename() swaps the name atomically. Otherwise link() refuses an
    existing name (FileExistsError, ``source`` left in place), so two racing
    writers cannot both win. Both directories are flushed when they differ.
    """
    if replace:
        os.rename(source, target)
    else:
        os.link(source, target)
        os.unlink(source)
    _flush_names(source, target)


def _flush_names(source: str, target: str) -> None:
    """Flush the directories a rename from ``source`` to ``target`` changed."""
    # The new entry lives in the target's directory: flush it so the name survives a crash.
    target_dir = os.path.dirname(target) or "."
    fsync_dir(target_dir)
    source_dir = os.path.dirname(source) or "."
    if source_dir != target_dir and not os.path.samefile(source_dir, target_dir):
        # The old entry is gone from the source's directory: flush that removal too.
        fsync_dir(source_dir)


def publish_over(source: str, target: str) -> bool:
    """Publish as :func:`publish` with ``replace``, and return True when a file had the name before.

    link() first: it succeeds only when no name was there at that instant (the
    temp is then unlinked), else rename() replaces the file. So two racing
    writers of a new name see one "new" and one "replaced" answer, at the same
    number of calls as a check beside the rename. A filesystem without hard
    links falls back to that check (then two racing writers may both say new).
    """
    try:
        os.link(source, target)
    except FileExistsError:
        replaced = True
        os.rename(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        replaced = os.path.lexists(target)
        os.rename(source, target)
    else:
        replaced = False
        os.unlink(source)
    _flush_names(source, target)
    return replaced


@contextlib.contextmanager
def atomic_write(
    target: str,
    binary: bool = True,
    replace: bool = True,
    mode: int | None = None,
    mtime: float | None = None,
    new_file: bool = False,
) -> Iterator[IO]:
    """Open a temp file beside ``target``; on leaving the block, make it durable and name it ``target``.

    An exception in the block (or in any step) removes the temp file and leaves
    ``target`` as it was, so a writer that checks what it wrote (a digest) in
    the block publishes nothing that failed the check. ``replace=False``
    refuses an existing target (FileExistsError). ``mode``: the file's
    permission bits (default: mkstemp's 0600); ``new_file``: instead, 0666
    under the process umask, as any file a user's program creates (downloads).
    ``mtime``: the file's access and modification times, set before it is named.
    """
    directory, name = os.path.split(target)
    if new_file:
        fd, temp = _create_beside(directory or ".", name)
    else:
        fd, temp = tempfile.mkstemp(dir=directory or ".", prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as handle:
            yield handle
            handle.flush()
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            if mtime is not None:
                os.utime(handle.fileno(), (mtime, mtime))
            os.fsync(handle.fileno())
        publish(temp, target, replace=replace)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _create_beside(directory: str, name: str) -> tuple[int, str]:
    """Create a new temp file for ``name`` in ``directory`` 0666 under the umask (O_EXCL: never reused)."""
    while True:
        temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp
        except FileExistsError:
            continue


def write_file(target: str, data: bytes | str, mode: int | None = None) -> None:
    """Replace ``target`` with ``data`` durably (see :func:`atomic_write`)."""
    with atomic_write(target, binary=isinstance(data, bytes), mode=mode) as handle:
        handle.write(data)


def copy_file(source: str, target: str, replace: bool = False) -> None:
    """Copy ``source`` to ``target`` durably: bytes, times, mode and extended attributes."""
    directory, name = os.path.split(target)
    fd, temp = tempfile.mkstemp(dir=directory or ".", prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copy2(source, temp)  # bytes, times, mode and the xattrs (the recorded digest)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        publish(temp, target, replace=replace)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def move_file(source: str, target: str, replace: bool = False) -> None:
    """Move ``source`` to ``target`` durably; across filesystems, copy durably and then remove it.

    ``replace=False`` refuses an existing target (FileExistsError; ``source`` stays).
    """
    try:
        publish(source, target, replace=replace)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    copy_file(source, target, replace=replace)
    os.unlink(source)
    fsync_dir(os.path.dirname(source) or ".")
