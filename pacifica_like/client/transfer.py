"""Bodies on the wire: uploads read and hashed chunk by chunk, downloads written and checked.

Nothing but one chunk (``CHUNK_SIZE``) is held at a time, so memory does not
grow with file size. A download to a path goes through a hidden temp file
beside it, renamed into place only once every byte has arrived and matched
the server's ``Repr-Digest``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import requests

from pacifica_like.client.errors import TransportError, transport_errors
from pacifica_like.core import durable, httpfields
from pacifica_like.core.errors import DigestMismatch, InvalidRequest

#: Bytes per read and write when streaming a body.
CHUNK_SIZE = 1 << 20

#: Called with the bytes of each chunk sent or received.
Progress = Callable[[int], Any]
#: What ``put`` uploads: a path, bytes, a binary file object or an iterable of byte chunks.
BodySource = str | os.PathLike[str] | bytes | BinaryIO | Iterable[bytes]


class CountingBody:
    """A request body with a length: requests then sends Content-Length, not chunked, and streams it.

    Iterating it reads the source in chunks, hashing and counting what it hands
    over and reporting progress; nothing but one chunk is held at a time.
    """

    def __init__(self, chunks: Iterable[bytes], length: int | None, progress: Progress | None) -> None:
        self._chunks = chunks
        self._length = length
        self._progress = progress
        self.sent = 0
        self.hasher = hashlib.sha256()

    def __len__(self) -> int:
        return self._length or 0

    def __bool__(self) -> bool:
        return True  # an empty file is still a body to send

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            if not chunk:
                continue
            self.hasher.update(chunk)
            self.sent += len(chunk)
            if self._progress is not None:
                self._progress(len(chunk))
            yield bytes(chunk)


def read_chunks(handle: BinaryIO) -> Iterator[bytes]:
    """Yield a file's bytes from where it stands, CHUNK_SIZE at a time."""
    while chunk := handle.read(CHUNK_SIZE):
        yield chunk


def seekable(handle: Any) -> bool:
    """Whether ``handle`` can be read twice (hashed first, then sent)."""
    try:
        return bool(handle.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def sha256_of(handle: BinaryIO) -> str:
    """Hash a seekable file from where it stands, then put it back there."""
    start = handle.tell()
    hasher = hashlib.sha256()
    for chunk in read_chunks(handle):
        hasher.update(chunk)
    handle.seek(start)
    return hasher.hexdigest()


def repr_digest_sha256(headers: Mapping[str, str]) -> str | None:
    """Return the hex sha-256 an answer's Repr-Digest names, or None when it names none."""
    raw = headers.get("Repr-Digest")
    if not raw:
        return None
    try:
        claims = httpfields.parse_digest_headers({"Repr-Digest": raw})
    except InvalidRequest:
        raise TransportError(f"the server sent a malformed Repr-Digest: {raw!r}") from None
    for claim in claims:
        if claim.algorithm == "sha256":
            return claim.value.hex()
    return None


def copy_body(
    response: requests.Response, out: BinaryIO, expected: str | None, progress: Progress | None
) -> tuple[int, str | None]:
    """Write the body to ``out``; return bytes and sha-256; raise if short or not matching."""
    hasher = hashlib.sha256()
    received = 0
    with transport_errors(f"GET {response.url}"):
        for chunk in response.iter_content(CHUNK_SIZE):
            hasher.update(chunk)
            out.write(chunk)
            received += len(chunk)
            if progress is not None:
                progress(len(chunk))
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and received != int(declared):
        raise TransportError(f"GET {response.url}: the answer ended after {received} of {declared} bytes")
    digest = hasher.hexdigest()
    if expected is not None and digest != expected:
        raise DigestMismatch(
            f"GET {response.url}: the bytes received hash to sha-256 {digest}, "
            f"the server's Repr-Digest says {expected}"
        )
    return received, digest


def download_to_path(
    response: requests.Response,
    dest: Path,
    expected: str | None,
    mtime: float | None,
    progress: Progress | None,
) -> tuple[int, str | None]:
    """Write the body to ``dest`` through a temp file renamed over it when complete and verified.

    The durable steps are :func:`pacifica_like.core.durable.atomic_write`'s: on
    any failure (a short or mismatching body included) the temp file is removed
    and an existing ``dest`` is untouched; the new file gets the usual
    permissions (0666 under the umask) and ``mtime``.
    """
    with durable.atomic_write(os.fspath(dest), mtime=mtime, new_file=True) as out:
        return copy_body(response, out, expected, progress)
