"""Deterministic file content, so every byte a server returns can be checked without a copy.

Small files are derived from their id (the wrk Lua script builds the same bytes);
the large file is a pseudo-random stream derived from a seed, produced chunk by
chunk so a 1 GiB transfer never sits in memory.
"""

from __future__ import annotations

import hashlib
import queue
import random
import threading
from collections.abc import Iterator

#: Size of a small file, as the wrk cells send and expect it.
SMALL_SIZE = 4096
#: Chunk size of the large-file stream (and of the read buffer on GET).
CHUNK_SIZE = 1 << 20
#: The mtime every PUT carries; both servers require the header.
LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"


def small_content(file_id: int, size: int = SMALL_SIZE) -> bytes:
    """Return small file ``file_id``: ``"<id>.0;<id>.1;..."`` cut to ``size`` bytes.

    The counter makes the content non-periodic, so a shifted or repeated span is
    caught; bench/lua/smallfile.lua must build exactly the same bytes.
    """
    parts: list[str] = []
    length = 0
    k = 0
    while length < size:
        unit = f"{file_id}.{k};"
        parts.append(unit)
        length += len(unit)
        k += 1
    return "".join(parts).encode("ascii")[:size]


def large_chunks(size: int, seed: int, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield ``size`` pseudo-random bytes in chunks, the same for the same seed.

    ``random.randbytes`` alone runs at ~450 MiB/s, close to the disk; each chunk
    is instead a seeded rotation and byte substitution of one random block, which
    is ~3x faster and still differs from chunk to chunk.
    """
    block = random.Random(seed).randbytes(chunk_size)
    remaining = size
    index = 0
    while remaining > 0:
        rng = random.Random((seed << 32) + index)
        table = bytes(rng.sample(range(256), 256))
        offset = rng.randrange(chunk_size)
        chunk = (block[offset:] + block[:offset]).translate(table)
        if remaining < chunk_size:
            chunk = chunk[:remaining]
        remaining -= len(chunk)
        index += 1
        yield chunk


class HashedStream:
    """Generate and sha-256 the large stream in a helper thread, ahead of the sender.

    Hashing releases the GIL and so does sending, so producing the next chunk
    overlaps sending the last one; the client is then not what limits a PUT.
    """

    def __init__(self, size: int, seed: int, depth: int = 8) -> None:
        self.sha256 = hashlib.sha256()
        self._chunks = large_chunks(size, seed)
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="large-stream", daemon=True)

    def _produce(self) -> None:
        item: bytes | BaseException | None
        try:
            for chunk in self._chunks:
                self.sha256.update(chunk)
                if not self._put(chunk):
                    return
            item = None
        except BaseException as exc:  # handed to the consumer, which re-raises it
            item = exc
        self._put(item)

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[bytes]:
        """Yield the chunks in order; the digest is complete once iteration ends."""
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()
            self._thread.join(timeout=5)
