"""Map integer file ids to sharded relative paths and back.

The mapping is Pacifica's: write the id in lowercase hex, peel off its lowest
byte pairs as directories (lowest byte outermost) and name the file by the
whole hex id; ids below 256 have no directory and are named ``file.<hex>``.
It is a bijection, so an audit can turn any stored path back into its id:

    >>> id2filename(12345)
    '/39/3039'
    >>> id2filename(1234)
    '/d2/4d2'
    >>> id2filename(0x123456)
    '/56/34/123456'
    >>> id2filename(255)
    '/file.ff'
    >>> filename2id('/39/3039')
    12345
    >>> filename2id('/file.ff')
    255
    >>> all(filename2id(id2filename(i)) == i for i in (0, 1, 255, 256, 65535, 2**63 - 1))
    True

Paths that no id maps to are rejected rather than guessed at:

    >>> filename2id('/39/3040')
    Traceback (most recent call last):
    ...
    ValueError: not an archive path: '/39/3040'

Stdlib only.
"""

from __future__ import annotations

import re

MAX_ID = 2**63 - 1
_ID_SEGMENT = re.compile(r"(?:0|[1-9][0-9]{0,18})")


def parse_id(segment: str) -> int:
    """Return the file id a URL path segment names, or raise ValueError.

    Only canonical decimal (``^(0|[1-9][0-9]*)$``) up to 2**63-1 is accepted,
    so every id has exactly one spelling and no segment can carry a path.

    >>> parse_id('12345')
    12345
    >>> parse_id('012')
    Traceback (most recent call last):
    ...
    ValueError: file ids are decimal integers from 0 to 9223372036854775807 without leading zeros: '012'
    """
    if _ID_SEGMENT.fullmatch(segment):
        value = int(segment)
        if value <= MAX_ID:
            return value
    raise ValueError(f"file ids are decimal integers from 0 to {MAX_ID} without leading zeros: {segment!r}")


def id2filename(file_id: int) -> str:
    """Return the sharded path (with a leading ``/``) that stores ``file_id``."""
    if file_id < 0:
        raise ValueError(f"file ids are not negative: {file_id}")
    hexid = format(file_id, "x")
    if len(hexid) <= 2:
        return f"/file.{hexid}"
    dirs = [hexid[i - 2 : i] for i in range(len(hexid), 2, -2)]
    return "/" + "/".join(dirs) + "/" + hexid


def filename2id(path: str) -> int:
    """Return the id whose sharded path is ``path``; raise ValueError otherwise."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith("file."):
        name = name[5:]
    try:
        file_id = int(name, 16)
    except ValueError:
        raise ValueError(f"not an archive path: {path!r}") from None
    if id2filename(file_id) != "/" + path.lstrip("/"):
        raise ValueError(f"not an archive path: {path!r}")
    return file_id


def relative_path(file_id: int, sharded: bool) -> str:
    """Return where ``file_id`` lives under the archive prefix: sharded, or the flat decimal name."""
    return id2filename(file_id)[1:] if sharded else str(file_id)
