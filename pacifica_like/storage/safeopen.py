"""Open a PATCH source once, following no symbolic link at any level.

PATCH moves a file that a client placed under a ``patch_roots`` directory into
the archive. Whoever may write there may also swap names while the gateway
works, so a path that is checked and later reopened by name can lead anywhere:
a symlink to a file outside the roots, a FIFO that blocks a thread forever, a
device whose open has side effects. Here the path is decided once, and only
descriptors are used afterwards:

1. textually, against the configured roots (real paths, resolved at load), so
   nothing outside them is touched and ``.``/``..``/empty components are refused;
2. the parent directory is opened relative to a descriptor of the root, with
   openat2(2) and RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS where the kernel has it,
   else by a walk of O_NOFOLLOW|O_DIRECTORY descriptors, one per component;
3. the last component is checked with a no-follow fstatat *before* it is opened,
   so a FIFO, socket, device or directory is refused without being opened;
4. it is opened O_NONBLOCK|O_NOFOLLOW|O_NOCTTY and checked again with fstat:
   a regular file, the inode step 3 saw, one link (another name elsewhere could
   still change the archived bytes).

The caller hashes, stamps and moves that open file (see the posix backend's
``adopt``); :data:`after_source_checks` is the seam where tests swap names at
exactly the moment an attacker would. Python has no openat2 wrapper: it is
bound here with ctypes, once, errors raised as OSError.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import platform
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pacifica_like.core.errors import FileNotInArchive, Forbidden, InvalidRequest

# openat2(2): linux/openat2.h. RESOLVE_NO_MAGICLINKS also refuses /proc-style links.
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: The syscall number per machine (one number on every architecture with the unified table).
_SYS_OPENAT2 = {
    machine: 437
    for machine in ("x86_64", "aarch64", "arm64", "riscv64", "ppc64le", "ppc64", "s390x", "i686", "armv7l")
}
#: Flags for every directory on the way: no symlink, never a controlling tty.
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
#: Flags for the source itself: non-blocking, so even a FIFO swapped in at the last moment cannot hang us.
SOURCE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _raise_on_minus_one(result: int, function: object, arguments: tuple) -> int:
    """ctypes errcheck: a -1 return becomes OSError(errno), so callers never see raw codes."""
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


#: The C functions bound here: name -> (restype, argtypes). Declared once, in one table.
_PROTOTYPES: dict[str, tuple[type, list[type]]] = {
    # syscall(SYS_openat2, dirfd, pathname, struct open_how *, sizeof(struct open_how))
    "syscall": (
        ctypes.c_long,
        [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_OpenHow), ctypes.c_size_t],
    ),
}


@functools.lru_cache(maxsize=1)
def _libc() -> dict[str, Callable[..., int]]:
    """Load libc once (lazily: nothing happens at import) and declare the prototypes."""
    name = ctypes.util.find_library("c")
    if name is None:
        return {}
    library = ctypes.CDLL(name, use_errno=True)
    bound = {}
    for symbol, (restype, argtypes) in _PROTOTYPES.items():
        function = getattr(library, symbol, None)
        if function is None:
            continue
        function.restype = restype
        function.argtypes = argtypes
        function.errcheck = _raise_on_minus_one
        bound[symbol] = function
    return bound


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """Open ``path`` relative to ``dir_fd`` with openat2(2); return the new descriptor.

    Raises OSError (ENOSYS where the kernel or libc lacks it; ELOOP for a
    symlink under RESOLVE_NO_SYMLINKS; EXDEV for an escape under RESOLVE_BENEATH).
    """
    number = _SYS_OPENAT2.get(platform.machine())
    syscall = _libc().get("syscall")
    if number is None or syscall is None:
        raise OSError(errno.ENOSYS, "openat2 is not available on this platform")
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=0, resolve=resolve)
    return int(syscall(number, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)))


@functools.lru_cache(maxsize=1)
def openat2_supported() -> bool:
    """Say whether openat2 works here (kernel >= 5.6, not filtered by seccomp); asked once."""
    try:
        fd = openat2(-100, "/", os.O_RDONLY | os.O_DIRECTORY, RESOLVE_NO_SYMLINKS)  # -100: AT_FDCWD
    except OSError:
        return False
    os.close(fd)
    return True


def open_directory_beneath(root_fd: int, parts: list[str]) -> int:
    """Return a new descriptor of the directory ``parts`` below ``root_fd``, no symlink followed.

    openat2 resolves the whole path in the kernel where it can; otherwise each
    component is opened O_NOFOLLOW|O_DIRECTORY from the previous one, so a
    component swapped for a symlink fails (ELOOP or ENOTDIR) instead of leading out.
    """
    if parts and openat2_supported():
        resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
        # Without O_NOFOLLOW: RESOLVE_NO_SYMLINKS then reports a trailing symlink as ELOOP, not ENOTDIR.
        return openat2(root_fd, "/".join(parts), DIRECTORY_FLAGS & ~os.O_NOFOLLOW, resolve)
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                child = os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
            except NotADirectoryError:
                # O_NOFOLLOW|O_DIRECTORY reports a symlink as "not a directory": say what it is.
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class AdoptSource:
    """A PATCH source opened and checked: use only these descriptors from now on.

    ``fd`` is the open file (read-only, non-blocking), ``dir_fd`` its directory,
    ``name`` its entry there, ``stat`` the fstat taken right after opening.
    ``path`` is what the client sent (for messages only, never reopened).
    Closing it closes both descriptors.
    """

    path: str
    fd: int
    dir_fd: int
    name: str
    stat: os.stat_result

    def same_inode(self, other: os.stat_result) -> bool:
        """Say whether ``other`` describes the inode that was opened."""
        return (other.st_dev, other.st_ino) == (self.stat.st_dev, self.stat.st_ino)

    def remove_if_unchanged(self) -> None:
        """Drop the source's name once its bytes are safely archived, if it still names the inode opened.

        A name swapped meanwhile is someone else's file and stays; a name already gone is fine.
        """
        with contextlib.suppress(FileNotFoundError):
            if self.same_inode(os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)):
                os.unlink(self.name, dir_fd=self.dir_fd)
                os.fsync(self.dir_fd)

    def close(self) -> None:
        """Close the file and its directory."""
        for fd in (self.fd, self.dir_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> AdoptSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _no_hook(source: AdoptSource) -> None:
    return None


#: Called with every source after all checks passed, before it is hashed or moved.
#: A no-op; tests replace it (monkeypatch) to swap names between check and use.
after_source_checks: Callable[[AdoptSource], None] = _no_hook


def split_source_path(source_path: object, roots: Iterable[str]) -> tuple[str, list[str]]:
    """Return (root, components below it) for a PATCH path, deciding textually.

    Raises InvalidRequest for a malformed path (not a non-empty absolute
    string, NUL, not encodable for the filesystem) and Forbidden when it is
    not strictly below one of ``roots`` (real paths) or has ``.``, ``..`` or
    empty components. Nothing on disk is touched.
    """
    if not isinstance(source_path, str) or not source_path or "\x00" in source_path:
        raise InvalidRequest('"path" must be a non-empty string')
    if not source_path.startswith("/"):
        raise InvalidRequest(f'"path" must be absolute, got {source_path!r}')
    try:
        os.fsencode(source_path)
    except UnicodeError:
        raise InvalidRequest('"path" is not a valid file name on this server') from None
    roots = list(roots)
    if not roots:
        raise Forbidden("PATCH is disabled: no patch_roots are configured")
    for root in roots:
        base = root.rstrip("/") + "/"
        if source_path.startswith(base):
            parts = source_path[len(base) :].split("/")
            if any(part in ("", ".", "..") for part in parts):
                raise Forbidden(
                    f"{source_path}: PATCH takes a plain path below a patch root "
                    "(no '.', '..' or empty components)"
                )
            return root, parts
    raise Forbidden(f"{source_path} is outside the directories PATCH may move files from")


@contextlib.contextmanager
def _refusals(source_path: str) -> Iterator[None]:
    """Turn every OSError of opening the source into a 4xx that says why."""
    try:
        yield
    except OSError as exc:
        code = exc.errno
        if code in (errno.ENOENT, errno.ENOTDIR):
            raise FileNotInArchive(f"PATCH source {source_path} does not exist") from exc
        if code in (errno.ELOOP, errno.EXDEV):
            raise Forbidden(f"{source_path}: a symbolic link on its path; PATCH follows none") from exc
        if code in (errno.EACCES, errno.EPERM):
            raise Forbidden(f"{source_path}: permission denied") from exc
        raise InvalidRequest(f"cannot open PATCH source {source_path}: {exc.strerror or exc}") from exc


def open_adopt_source(source_path: object, roots: Iterable[str]) -> AdoptSource:
    """Open and check a PATCH source below one of ``roots``; the caller closes the result.

    Raises InvalidRequest (400) for a malformed path, a source that is not a
    regular file, has more than one link or changed while being opened;
    Forbidden (403) outside every root or with a symlink on the way;
    FileNotInArchive (404) when it does not exist. Never raises OSError.
    """
    root, parts = split_source_path(source_path, roots)
    source_path = str(source_path)
    *directories, name = parts
    with _refusals(source_path):
        root_fd = os.open(root, DIRECTORY_FLAGS)
        try:
            dir_fd = open_directory_beneath(root_fd, directories)
        finally:
            os.close(root_fd)
    try:
        with _refusals(source_path):
            seen = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            _check_kind(source_path, seen)
            fd = os.open(name, SOURCE_FLAGS, dir_fd=dir_fd)
    except BaseException:
        os.close(dir_fd)
        raise
    source = AdoptSource(source_path, fd, dir_fd, name, os.fstat(fd))
    try:
        if not stat.S_ISREG(source.stat.st_mode) or not source.same_inode(seen):
            raise InvalidRequest(f"PATCH source {source_path} changed while it was opened; nothing was moved")
        if source.stat.st_nlink != 1:
            raise InvalidRequest(
                f"PATCH source {source_path} has {source.stat.st_nlink} links; PATCH takes only a file "
                "with a single name (another name could still change the archived bytes)"
            )
        after_source_checks(source)
    except BaseException:
        source.close()
        raise
    return source


def _check_kind(source_path: str, seen: os.stat_result) -> None:
    """Refuse anything but a regular file before it is opened (a device open can act)."""
    if stat.S_ISLNK(seen.st_mode):
        raise Forbidden(f"{source_path} is a symbolic link; PATCH follows none")
    if not stat.S_ISREG(seen.st_mode):
        raise InvalidRequest(f"PATCH source {source_path} is not a regular file")
