"""Deterministic file content, so every byte a server returns can be checked without a copy.

Small files are derived from their id (the wrk Lua script builds the same bytes);
the large file is a pseudo-random stream derived from a seed, produced chunk by
chunk so a 1 GiB transfer never sits in memory.
"""

from __future__ import annotations

import random
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


def large_chunks(size: int, seed: int, chunk_size: int = CHUNK_SIZE, pool: int = 8) -> Iterator[bytes]:
    """Yield ``size`` pseudo-random bytes in chunks, the same for the same seed.

    ``random.randbytes`` alone runs at ~450 MiB/s, no faster than the disk, so
    it only fills a small pool of blocks; each chunk is a seeded rotation of a
    seeded pick from the pool, which costs one copy and never repeats a chunk
    in practice.
    """
    rng = random.Random(seed)
    blocks = [rng.randbytes(chunk_size) for _ in range(pool)]
    remaining = size
    while remaining > 0:
        block = blocks[rng.randrange(pool)]
        offset = rng.randrange(chunk_size)
        chunk = block[offset:] + block[:offset]
        if remaining < chunk_size:
            chunk = chunk[:remaining]
        remaining -= len(chunk)
        yield chunk
