"""Parse and format the HTTP header values the archive speaks.

Dates (``Last-Modified``), integrity headers (RFC 9530 ``Repr-Digest`` and
``Content-Digest``, RFC 3230 ``Digest``, ``Content-MD5``) and byte ranges
(``Range`` and Pacifica's ``?byte_range=S-E``). Pure functions over strings,
raising :class:`~pacifica_like.core.errors.InvalidRequest` on malformed input, so the
web layer stays thin and every rule is unit-testable.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pacifica_like.core.errors import InvalidRequest, RangeNotSatisfiable

# RFC 9530 / IANA names -> hashlib names; the digests we can verify on ingest.
_DIGEST_ALGORITHMS = {"sha-256": "sha256", "sha-512": "sha512", "md5": "md5"}
_SF_BYTES = re.compile(r"\s*([A-Za-z0-9-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*")
_RANGE = re.compile(r"bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*")
_BYTE_RANGE = re.compile(r"([0-9]+)-([0-9]+)")
#: Offsets longer than this many digits lie past the end of any file (and past int()'s digit limit).
_MAX_OFFSET_DIGITS = 18


def _offset(digits: str) -> int:
    """Return a byte offset from ASCII digits, capped far beyond any file's size."""
    return int(digits) if len(digits) <= _MAX_OFFSET_DIGITS else 10**_MAX_OFFSET_DIGITS


def parse_http_date(value: str) -> float:
    """Return the epoch seconds an HTTP date names.

    Accepts RFC 1123, RFC 850 and asctime (taken as UTC, which is how
    Pacifica's ingest tool sends it); raises InvalidRequest otherwise.
    """
    parts = email.utils.parsedate_tz(value) if value else None
    if parts is None:
        raise InvalidRequest(f"unparseable HTTP date: {value[:64]!r}")
    try:
        moment = datetime(*parts[:6], tzinfo=UTC)
    except ValueError as exc:
        raise InvalidRequest(f"invalid HTTP date {value[:64]!r}: {exc}") from None
    moment -= timedelta(seconds=parts[9] or 0)
    return moment.timestamp()


def format_http_date(epoch: float) -> str:
    """Return ``epoch`` as an RFC 1123 HTTP date (seconds truncated)."""
    return email.utils.formatdate(int(epoch), usegmt=True)


@dataclass(frozen=True)
class ExpectedDigest:
    """A digest the client claims for the upload: hashlib name and raw bytes."""

    algorithm: str
    value: bytes
    header: str


def parse_digest_headers(headers: dict[str, str] | object) -> list[ExpectedDigest]:
    """Return the digests a request's integrity headers claim, strongest first.

    ``headers`` is any mapping with case-insensitive ``get``. Algorithms we do
    not implement are skipped (RFC 9530 lets a receiver ignore them); a
    header that names a known algorithm with a malformed value is a 400.
    """
    claims: list[ExpectedDigest] = []
    for header in ("Repr-Digest", "Content-Digest"):
        raw = headers.get(header)  # type: ignore[attr-defined]
        if raw:
            for member in raw.split(","):
                match = _SF_BYTES.fullmatch(member)
                if match is None:
                    raise InvalidRequest(f"malformed {header} header: {raw!r}")
                claims.extend(_claim(header, match.group(1), match.group(2)))
    raw = headers.get("Digest")  # type: ignore[attr-defined]
    if raw:
        for member in raw.split(","):
            name, sep, value = member.strip().partition("=")
            if not sep:
                raise InvalidRequest(f"malformed Digest header: {raw!r}")
            claims.extend(_claim("Digest", name.strip(), value.strip()))
    raw = headers.get("Content-MD5")  # type: ignore[attr-defined]
    if raw:
        claims.extend(_claim("Content-MD5", "md5", raw.strip()))
    return claims


def _claim(header: str, name: str, b64value: str) -> list[ExpectedDigest]:
    algorithm = _DIGEST_ALGORITHMS.get(name.lower())
    if algorithm is None:
        return []
    try:
        value = base64.b64decode(b64value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{header}: {name} value is not base64: {b64value!r}") from None
    expected_len = {"sha256": 32, "sha512": 64, "md5": 16}[algorithm]
    if len(value) != expected_len:
        raise InvalidRequest(f"{header}: {name} value has {len(value)} bytes, not {expected_len}")
    return [ExpectedDigest(algorithm, value, header)]


def format_repr_digest(sha256: bytes) -> str:
    """Return the RFC 9530 ``Repr-Digest`` value for a raw sha-256 digest."""
    return "sha-256=:" + base64.b64encode(sha256).decode("ascii") + ":"


def etag_for(sha256: bytes | None, size: int, mtime: float) -> str:
    """Return a strong ETag from the content digest, else a weak one from stat."""
    if sha256 is not None:
        return '"' + sha256.hex() + '"'
    return f'W/"{size:x}-{int(mtime):x}"'


def parse_range_header(value: str, size: int) -> tuple[int, int] | None:
    """Return the half-open ``(start, end)`` a single ``Range`` asks for.

    Returns None when the header should be ignored (multiple ranges or a unit
    we do not serve: RFC 9110 lets a server answer those with the whole file);
    raises RangeNotSatisfiable when no byte of the file is in range.
    """
    match = _RANGE.fullmatch(value)
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        suffix = _offset(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {value[:64]!r} selects no bytes", size)
        return max(0, size - suffix), size
    start = _offset(first)
    end = size if last == "" else min(_offset(last) + 1, size)
    if last != "" and _offset(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range {value[:64]!r} starts past the end ({size} bytes)", size)
    return start, end


def parse_byte_range(value: str, size: int) -> tuple[int, int]:
    """Return the half-open ``(start, end)`` of Pacifica's ``?byte_range=S-E``."""
    match = _BYTE_RANGE.fullmatch(value)
    if match is None:
        raise InvalidRequest(f"byte_range must be START-END in bytes (half-open), got {value[:64]!r}")
    start, end = _offset(match.group(1)), _offset(match.group(2))
    if end < start:
        raise InvalidRequest(f"byte_range end {end} is before its start {start}")
    return min(start, size), min(end, size)
