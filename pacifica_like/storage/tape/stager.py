"""The ctypes binding of the tape stager, ``libstager.so`` (built from ``stager.c``).

The C library moves records between ordinary files and tape volume files,
hashing with OpenSSL and pacing to a drive's rate. A record is a
:data:`HEADER_SIZE`-byte header then the data; see ``stager.c`` for the layout.

Public API: :func:`load` returns the process's :class:`Stager` for a library
path; :class:`StagerLoadError` says why a library cannot be used. Failures of
the stager's calls are :class:`OSError` with the C errno, so ``ENOENT`` arrives
as :class:`FileNotFoundError` and so on; the errnos with a meaning of our own
are :data:`CHECKSUM_MISMATCH`, :data:`SHORT_READ` and :data:`BAD_RECORD`.

ctypes releases the GIL for each call, so transfers in different threads (two
drives) overlap in time. Nothing is loaded at import: uWSGI forks after import.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable
from typing import Any

#: The C API version this module speaks (``STG_ABI_VERSION`` in stager.c).
STAGER_ABI = 1
#: Bytes of header in front of each record's data.
HEADER_SIZE = 64
SHA256_SIZE = 32
#: The library an install builds, beside this module.
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libstager.so")

#: The data does not hash to the expected sha-256.
CHECKSUM_MISMATCH = errno.EBADMSG
#: The volume ends before the record does.
SHORT_READ = errno.ENODATA
#: The header is not the expected record (magic, file id, size or sha-256 differ).
BAD_RECORD = errno.EILSEQ

_REBUILD = "rebuild it with `pip install -e .` (or reinstall the package)"

_int, _u64 = ctypes.c_int, ctypes.c_uint64
_path = _bytes = ctypes.c_char_p  # file names (os.fsencode) and raw digests
#: Every C function bound, name -> (restype, argtypes); each returns 0 or -1 with errno.
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "stg_abi_version": (_int, []),
    # volume, offset, capacity, source, file_id, rate_bps, size_out, sha256_out[32]
    "stg_append": (_int, [_path, _u64, _u64, _path, _u64, _u64, ctypes.POINTER(_u64), _bytes]),
    # volume, offset, file_id, size, expected_sha256[32], dest, rate_bps
    "stg_copy_out": (_int, [_path, _u64, _u64, _u64, _bytes, _path, _u64]),
    # volume, offset, file_id, size, expected_sha256[32], rate_bps
    "stg_verify": (_int, [_path, _u64, _u64, _u64, _bytes, _u64]),
}
#: What our own errnos mean here, for messages (strerror's words are about other things).
_MEANINGS = {
    CHECKSUM_MISMATCH: "the data does not match its sha-256",
    SHORT_READ: "the volume ends too soon",
    BAD_RECORD: "the record header is not the one expected",
}
#: For the error message: the argument naming the other file, and how to name it.
_OTHER_FILE = {"stg_append": ("from", 3), "stg_copy_out": ("into", 5)}

StrPath = str | os.PathLike[str]


class StagerLoadError(Exception):
    """The stager library is missing, not loadable, incomplete or of another ABI."""


def _raise_on_failure(result: int, function: Any, arguments: tuple[Any, ...]) -> int:
    """ctypes errcheck: turn a -1 return into OSError(errno) naming the call and volume."""
    if result != -1:
        return result
    code = ctypes.get_errno()
    name = function.__name__
    context = name
    if len(arguments) >= 2:
        context += f" on volume {os.fsdecode(arguments[0])!r} at offset {arguments[1]}"
    if name in _OTHER_FILE:
        word, index = _OTHER_FILE[name]
        context += f" {word} {os.fsdecode(arguments[index])!r}"
    meaning = f": {_MEANINGS[code]}" if code in _MEANINGS else ""
    raise OSError(code, f"{os.strerror(code)}{meaning} ({context})")


def _unsigned(**values: int) -> None:
    """Refuse negative numbers, which ctypes would silently wrap to huge uint64s."""
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")


def _digest(sha256: bytes) -> bytes:
    """Return ``sha256`` if it is a raw sha-256 (the C side reads exactly 32 bytes)."""
    if len(sha256) != SHA256_SIZE:
        raise ValueError(f"sha256 must be {SHA256_SIZE} raw bytes, got {len(sha256)}")
    return bytes(sha256)


class Stager:
    """The stager library at one path, its functions bound; safe to share between threads.

    Raises StagerLoadError when the library cannot be used.
    """

    def __init__(self, path: StrPath) -> None:
        # An absolute path, so dlopen never searches the system for a same-named library.
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.exists(self.path):
            raise StagerLoadError(f"tape stager library {self.path} does not exist; {_REBUILD}")
        try:
            library = ctypes.CDLL(self.path, use_errno=True)
        except OSError as exc:
            raise StagerLoadError(f"cannot load tape stager library {self.path} ({exc}); {_REBUILD}") from exc
        functions: dict[str, Callable[..., int]] = {}
        # The version first: a library of another ABI may lack or redefine the others.
        for name, (restype, argtypes) in _PROTOTYPES.items():
            try:
                function = getattr(library, name)
            except AttributeError as exc:
                raise StagerLoadError(
                    f"{self.path} lacks {name}(): it is not the tape stager or is a stale build; {_REBUILD}"
                ) from exc
            function.restype = restype
            function.argtypes = argtypes
            function.errcheck = _raise_on_failure
            functions[name] = function
            if name == "stg_abi_version" and (version := function()) != STAGER_ABI:
                raise StagerLoadError(
                    f"{self.path} has stager ABI version {version}, but this module needs version "
                    f"{STAGER_ABI}; {_REBUILD}"
                )
        self._append = functions["stg_append"]
        self._copy_out = functions["stg_copy_out"]
        self._verify = functions["stg_verify"]

    def __repr__(self) -> str:
        return f"Stager({self.path!r})"

    def append(
        self, volume: StrPath, offset: int, capacity: int, source: StrPath, file_id: int, rate: int = 0
    ) -> tuple[int, bytes]:
        """Write ``source`` as a record at ``offset`` (the volume's end of data); return (size, sha256).

        ``capacity`` is the volume's size in bytes; ``rate`` caps bytes per second
        (0: unpaced). Anything on the volume past ``offset`` is truncated first;
        on any failure the volume is left exactly ``offset`` bytes long. The
        volume is created only when ``offset`` is 0. The record is synced to
        disk before this returns. Raises OSError: ENOSPC when the record would
        pass ``capacity`` (nothing written), FileNotFoundError for a missing
        source or volume, ``SHORT_READ`` when the volume is shorter than
        ``offset`` (left untouched).
        """
        _unsigned(offset=offset, capacity=capacity, file_id=file_id, rate=rate)
        size = _u64()
        sha256 = ctypes.create_string_buffer(SHA256_SIZE)
        volume, source = os.fsencode(volume), os.fsencode(source)
        self._append(volume, offset, capacity, source, file_id, rate, ctypes.byref(size), sha256)
        return size.value, sha256.raw

    def copy_out(
        self,
        volume: StrPath,
        offset: int,
        file_id: int,
        size: int,
        sha256: bytes,
        dest: StrPath,
        rate: int = 0,
    ) -> None:
        """Copy the data of the record at ``offset`` into a new file ``dest`` (mode 0600), checked.

        ``sha256`` is the raw digest the catalog recorded; ``rate`` caps bytes per
        second (0: unpaced). ``dest`` is synced before this returns and exists
        afterwards only if this returns. Raises OSError: ``BAD_RECORD`` when the
        header differs from (file_id, size, sha256), ``SHORT_READ`` when the
        volume ends early, ``CHECKSUM_MISMATCH`` when the data does not hash to
        ``sha256``, FileExistsError when ``dest`` exists (it is left alone).
        """
        _unsigned(offset=offset, file_id=file_id, size=size, rate=rate)
        self._copy_out(os.fsencode(volume), offset, file_id, size, _digest(sha256), os.fsencode(dest), rate)

    def verify(
        self, volume: StrPath, offset: int, file_id: int, size: int, sha256: bytes, rate: int = 0
    ) -> None:
        """Read the record at ``offset`` and check it as :meth:`copy_out` does, writing nothing."""
        _unsigned(offset=offset, file_id=file_id, size=size, rate=rate)
        self._verify(os.fsencode(volume), offset, file_id, size, _digest(sha256), rate)


@functools.cache
def _load_absolute(path: str) -> Stager:
    return Stager(path)


def load(path: StrPath | None = None) -> Stager:
    """Return the stager at ``path`` (default :data:`DEFAULT_PATH`), loaded once per process.

    Raises StagerLoadError naming the path; a failed load is retried on the next call.
    """
    return _load_absolute(os.path.abspath(os.fspath(path if path is not None else DEFAULT_PATH)))
