"""The checksums an archive keeps for each file: sha-256, and the grid's adler32 and md5.

sha-256 is ours (ETag, ``Repr-Digest``, the tape copies' check). Grid
clients (gfal2, davix, FTS, Rucio) compare adler32, and some md5, after
every transfer; recomputing those by reading a file back from tape is not
an option, so every upload computes all three in the one pass that writes
it, and they are stored with the file. Names are hashlib's (``sha256``,
``md5``) plus ``adler32``; raw digests are bytes (adler32: 4 bytes, big-endian,
as its usual 8-hex-digit form reads).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Iterable, Mapping
from typing import Protocol

#: What every upload computes; sha-256 first (the one recorded on its own since the first release).
KEPT = ("sha256", "adler32", "md5")
#: The grid's checksums, stored beside the sha-256.
GRID = ("adler32", "md5")
#: Raw digest length per algorithm we can compute and verify.
SIZES = {"sha256": 32, "sha512": 64, "md5": 16, "adler32": 4}


class Hasher(Protocol):
    """The part of hashlib's interface the upload path uses."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class Adler32:
    """adler32 with hashlib's update/digest interface (zlib's running value underneath)."""

    name = "adler32"
    digest_size = 4

    def __init__(self) -> None:
        self._value = 1

    def update(self, data: bytes, /) -> None:
        """Fold ``data`` into the running checksum."""
        self._value = zlib.adler32(data, self._value)

    def digest(self) -> bytes:
        """Return the checksum as 4 big-endian bytes."""
        return self._value.to_bytes(4, "big")


def new(algorithm: str) -> Hasher:
    """Return a fresh hasher for one of :data:`SIZES`' algorithms."""
    if algorithm == "adler32":
        return Adler32()
    if algorithm not in SIZES:
        raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
    return hashlib.new(algorithm)


class SideHasher:
    """Hash chunks on a thread of its own, in the order given.

    hashlib releases the GIL while it hashes a large buffer, so md5 (the
    slowest of the three, ~720 MiB/s without hardware help) runs on another
    core while the request thread hashes sha-256 and writes. The queue is
    bounded (:data:`SIDE_QUEUE` chunks), so a slow hasher slows the upload
    rather than holding its bytes in memory. :meth:`finish` or :meth:`close`
    must be called: the thread waits for them.
    """

    def __init__(self, hashers: list[Hasher]) -> None:
        self._hashers = hashers
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=SIDE_QUEUE)
        self._thread = threading.Thread(target=self._run, name="upload-digests", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            for hasher in self._hashers:
                hasher.update(chunk)

    def update(self, chunk: bytes) -> None:
        """Queue ``chunk`` (bytes are immutable: the caller may go on at once)."""
        self._queue.put(chunk if type(chunk) is bytes else bytes(chunk))

    def finish(self) -> None:
        """Wait until every queued chunk is hashed."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    close = finish


#: Chunks queued for a SideHasher at most (of CHUNK_SIZE each: 1 MiB).
SIDE_QUEUE = 8


def compute(chunks: Iterable[bytes], algorithms: Iterable[str] = KEPT) -> dict[str, bytes]:
    """Return the digests of the bytes ``chunks`` yields, every algorithm in one pass."""
    hashers = {name: new(name) for name in algorithms}
    for chunk in chunks:
        for hasher in hashers.values():
            hasher.update(chunk)
    return {name: hasher.digest() for name, hasher in hashers.items()}


def encode_grid(checksums: Mapping[str, bytes]) -> bytes:
    """Return the grid checksums as stored with a file: ``adler32=<hex> md5=<hex>`` (ASCII)."""
    return " ".join(f"{name}={checksums[name].hex()}" for name in GRID if name in checksums).encode("ascii")


def decode_grid(raw: bytes) -> dict[str, bytes]:
    """Read what :func:`encode_grid` stored; malformed members are skipped, never trusted."""
    found: dict[str, bytes] = {}
    for member in raw.decode("ascii", "replace").split():
        name, _, value = member.partition("=")
        try:
            digest = bytes.fromhex(value)
        except ValueError:
            continue
        if name in GRID and len(digest) == SIZES[name]:
            found[name] = digest
    return found
