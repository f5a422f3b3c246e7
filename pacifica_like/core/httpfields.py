"""Parse and format the HTTP header values the archive speaks.

Dates (``Last-Modified``), integrity headers (RFC 9530 ``Repr-Digest`` and
``Content-Digest`` with ``Want-Repr-Digest``, RFC 3230 ``Digest`` with
``Want-Digest``, ``Content-MD5``) and byte ranges
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
from urllib.parse import parse_qs

from pacifica_like.core.errors import InvalidRequest, RangeNotSatisfiable

# RFC 9530 / RFC 3230 (IANA) names -> hashlib names; the digests we can verify on ingest.
# RFC 3230's registry says ADLER32, RFC 9530's says adler; the grid sends the first.
_DIGEST_ALGORITHMS = {
    "sha-256": "sha256",
    "sha-512": "sha512",
    "md5": "md5",
    "adler32": "adler32",
    "adler": "adler32",
}
#: hashlib name -> the name an answer uses (RFC 3230 Digest; RFC 9530 uses "adler" for adler32).
_DIGEST_NAMES = {"sha256": "sha-256", "sha512": "sha-512", "md5": "md5", "adler32": "adler32"}
_REPR_DIGEST_NAMES = {**_DIGEST_NAMES, "adler32": "adler"}
_DIGEST_SIZES = {"sha256": 32, "sha512": 64, "md5": 16, "adler32": 4}
_QVALUE = re.compile(r"\s*q\s*=\s*([01](?:\.[0-9]{0,3})?)\s*", re.IGNORECASE)
_SF_INTEGER = re.compile(r"\s*([A-Za-z0-9-]+)\s*=\s*([0-9]{1,2})\s*")
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
    if header == "Digest" and algorithm == "adler32":
        # RFC 3230's adler32 is 8 hex digits (what gfal2, davix, dCache and StoRM send), not base64.
        try:
            value = bytes.fromhex(b64value) if len(b64value) == 8 else b""
        except ValueError:
            value = b""
        if not value:
            raise InvalidRequest(f"{header}: adler32 value is not 8 hex digits: {b64value!r}")
        return [ExpectedDigest(algorithm, value, header)]
    try:
        value = base64.b64decode(b64value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{header}: {name} value is not base64: {b64value!r}") from None
    expected_len = _DIGEST_SIZES[algorithm]
    if len(value) != expected_len:
        raise InvalidRequest(f"{header}: {name} value has {len(value)} bytes, not {expected_len}")
    return [ExpectedDigest(algorithm, value, header)]


def parse_want_digest(value: str) -> list[str]:
    """Return the algorithms an RFC 3230 ``Want-Digest`` asks for (hashlib names), most wanted first.

    ``adler32, MD5;q=0.5, UNIXsum;q=0`` -> ``["adler32", "md5"]``: names are
    case-insensitive, ``q=0`` declines, and algorithms we do not keep are left
    out (the answer then carries no digest for them, as RFC 3230 allows).
    """
    wanted: list[tuple[float, int, str]] = []
    for index, member in enumerate(value.split(",")):
        name, _, params = member.partition(";")
        algorithm = _DIGEST_ALGORITHMS.get(name.strip().lower())
        quality = 1.0
        for param in params.split(";") if params else ():
            match = _QVALUE.fullmatch(param)
            if match is not None:
                quality = float(match.group(1))
        if algorithm is not None and quality > 0:
            wanted.append((-quality, index, algorithm))
    return list(dict.fromkeys(algorithm for _, _, algorithm in sorted(wanted)))


def parse_want_repr_digest(value: str) -> list[str]:
    """Return what an RFC 9530 ``Want-Repr-Digest`` asks for (hashlib names), most preferred first.

    ``sha-256=10, adler=3, md5=0`` -> ``["sha256", "adler32"]``; a member that is
    not ``name=0..10`` is skipped rather than refused, as a receiver may.
    """
    wanted: list[tuple[int, int, str]] = []
    for index, member in enumerate(value.split(",")):
        match = _SF_INTEGER.fullmatch(member)
        if match is None:
            continue
        algorithm = _DIGEST_ALGORITHMS.get(match.group(1).lower())
        preference = int(match.group(2))
        if algorithm is not None and 0 < preference <= 10:
            wanted.append((-preference, index, algorithm))
    return list(dict.fromkeys(algorithm for _, _, algorithm in sorted(wanted)))


def format_digest(digests: list[tuple[str, bytes]]) -> str:
    """Return an RFC 3230 ``Digest`` value: adler32 in 8 hex digits, the others in base64."""
    return ",".join(
        f"{_DIGEST_NAMES[name]}={raw.hex() if name == 'adler32' else base64.b64encode(raw).decode('ascii')}"
        for name, raw in digests
    )


def format_repr_digests(digests: list[tuple[str, bytes]]) -> str:
    """Return an RFC 9530 ``Repr-Digest`` value (a dictionary of byte sequences) for several digests."""
    return ", ".join(
        f"{_REPR_DIGEST_NAMES[name]}=:{base64.b64encode(raw).decode('ascii')}:" for name, raw in digests
    )


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


#: ``?dryRun=`` values, case-insensitive.
_DRY_RUN_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_dry_run(query: str | None) -> bool:
    """Return whether a query string asks for a dry run (``dryRun=true``); InvalidRequest for a bad value.

    >>> parse_dry_run("dryRun=true"), parse_dry_run("x=1"), parse_dry_run(None)
    (True, False, False)
    """
    if not query or "dryRun" not in query:  # most requests: no parsing at all
        return False
    values = parse_qs(query, keep_blank_values=True).get("dryRun")
    if not values:
        return False
    found = values[-1]
    try:
        return _DRY_RUN_VALUES[found.strip().lower()]
    except KeyError:
        raise InvalidRequest(f"dryRun={found[:20]!r}: expected true or false") from None
