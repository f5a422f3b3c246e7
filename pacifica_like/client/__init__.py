"""A Python client for the archive: files on ``/<id>`` and bulk staging on ``/api/v1``.

Public surface:

- :class:`ArchiveClient`: synchronous calls over one ``requests.Session`` whose
  connection pool holds ``max_in_flight`` connections, so threads may share it.
- :class:`AsyncArchiveClient`: the same calls as ``concurrent.futures.Future``\\ s,
  run by ``max_in_flight`` threads over one ``ArchiveClient``; never more than
  ``max_in_flight`` requests are on the wire, however many are submitted.
- Results: :class:`FileInfo` (HEAD), :class:`Upload`, :class:`Download`,
  :class:`Locality`, :class:`TapeRestInfo`, :class:`StagePage` with
  :class:`StagedFile` and :class:`StageSummary`, :class:`StageProgress`.
- Errors: an answer of 400 or more raises the server's own class from
  :mod:`pacifica_like.core.errors` (404 :class:`~pacifica_like.core.errors.FileNotInArchive`,
  503 with ``Retry-After`` :class:`~pacifica_like.core.errors.OfflineOnTape`, ...;
  the bulk API's own: :class:`RequestTooLarge` (413), :class:`TooManyRequests`
  (429) and :class:`UnknownRequest` (404 for a request id), re-exported here).
  ``str(error)`` is the server's message; ``status``, ``method``, ``url``,
  ``request_id``, ``retry_after`` and ``document`` (the parsed body) say more.
  Not reaching the server, a timeout or an answer cut short raises
  :class:`TransportError`.

Bodies stream both ways in 1 MiB chunks: memory does not grow with file size.
A download to a path goes to a hidden temp file beside it and is renamed into
place only once every byte has arrived and matched the server's ``Repr-Digest``,
so an interrupted or corrupt download leaves nothing (and the previous file).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote, urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pacifica_like import __version__
from pacifica_like.core import httpfields
from pacifica_like.core.errors import (
    ArchiveError,
    Conflict,
    DigestMismatch,
    FileNotInArchive,
    Forbidden,
    IncompleteUpload,
    InsufficientStorage,
    InvalidRequest,
    MethodDisabled,
    OfflineOnTape,
    RangeNotSatisfiable,
    RequestTooLarge,
    StorageUnavailable,
    TooManyRequests,
    UnknownRequest,
    UnsupportedMediaType,
)

__all__ = [
    "TERMINAL_STATES",
    "ArchiveClient",
    "AsyncArchiveClient",
    "Download",
    "FileInfo",
    "Locality",
    "RequestTooLarge",
    "StagePage",
    "StageProgress",
    "StageSummary",
    "StagedFile",
    "TapeRestInfo",
    "TooManyRequests",
    "TransportError",
    "UnknownRequest",
    "Upload",
    "error_from_response",
]

#: Bytes per read and write when streaming a body.
CHUNK_SIZE = 1 << 20
#: Seconds to wait for a TCP connection (the read timeout is the client's ``timeout``).
CONNECT_TIMEOUT = 10.0
#: Files per page when listing a bulk request's files.
PAGE_SIZE = 10_000
#: Times in a row a page refused with 429 (the server busy with heavy requests) is asked for again.
PAGE_RETRIES = 30
#: A bulk request's file states; the last three are final.
FILE_STATES = ("SUBMITTED", "STARTED", "COMPLETED", "FAILED", "CANCELLED")
TERMINAL_STATES = frozenset(("COMPLETED", "FAILED", "CANCELLED"))
#: The most of an error body we read and keep.
MAX_ERROR_BODY = 64 * 1024

FileId = int | str
Progress = Callable[[int], Any]
BodySource = str | os.PathLike[str] | bytes | BinaryIO | Iterable[bytes]
T = TypeVar("T")


# -- errors -------------------------------------------------------------------------------------------


class TransportError(OSError):
    """The server could not be reached, or the exchange broke off (timeout, reset, short body)."""


#: Status -> the error raised for it; 503 with Retry-After is OfflineOnTape, anything else ArchiveError.
ERRORS_BY_STATUS: dict[int, type[ArchiveError]] = {
    400: InvalidRequest,
    403: Forbidden,
    404: FileNotInArchive,
    405: MethodDisabled,
    409: Conflict,
    413: RequestTooLarge,
    415: UnsupportedMediaType,
    416: RangeNotSatisfiable,
    422: DigestMismatch,
    429: TooManyRequests,
    503: StorageUnavailable,
    507: InsufficientStorage,
}


def _retry_after(raw: str | None) -> float | None:
    """Return Retry-After in seconds (delta-seconds or an HTTP date), or None."""
    if not raw:
        return None
    if raw.strip().isdigit():
        return float(raw.strip())
    try:
        return max(0.0, httpfields.parse_http_date(raw) - time.time())
    except InvalidRequest:
        return None


def _error_message(response: requests.Response, method: str, document: Any) -> str:
    if isinstance(document, dict):
        for key in ("message", "detail", "title"):
            if isinstance(document.get(key), str) and document[key]:
                return document[key]
    text = response.text.strip() if response.content else ""
    path = requests.utils.urlparse(response.url).path or "/"
    return text[:500] if text else f"{response.status_code} {response.reason} for {method} {path}"


def error_from_response(
    response: requests.Response, method: str, overrides: Mapping[int, type[ArchiveError]] | None = None
) -> ArchiveError:
    """Return the error an answer of 400 or more stands for, carrying the server's message.

    ``overrides`` replaces the class for some statuses (the bulk API's 404 is an unknown request).
    """
    status = response.status_code
    try:
        document = json.loads(response.content) if response.content else None
    except ValueError:
        document = None
    message = _error_message(response, method, document)
    retry_after = _retry_after(response.headers.get("Retry-After"))
    cls = (overrides or {}).get(status) or ERRORS_BY_STATUS.get(status, ArchiveError)
    error: ArchiveError
    if cls is StorageUnavailable and retry_after is not None:
        error = OfflineOnTape(message, retry_after=round(retry_after))
    elif cls is MethodDisabled:
        error = MethodDisabled(message, allow=response.headers.get("Allow", ""))
    elif cls is RangeNotSatisfiable:
        size = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
        error = RangeNotSatisfiable(message, size=int(size.group(1)) if size else -1)
    else:
        error = cls(message)
    error.status = status  # type: ignore[attr-defined]
    error.method = method  # type: ignore[attr-defined]
    error.url = response.url  # type: ignore[attr-defined]
    error.request_id = response.headers.get("X-Request-Id")  # type: ignore[attr-defined]
    error.retry_after = retry_after  # type: ignore[attr-defined]
    error.document = document  # type: ignore[attr-defined]
    return error


@contextlib.contextmanager
def _transport_errors(what: str) -> Iterator[None]:
    """Translate requests' and urllib3's failures into TransportError, in this one place."""
    try:
        yield
    except requests.RequestException as exc:
        raise TransportError(f"{what}: {_root_cause(exc)}") from exc


def _root_cause(exc: BaseException) -> str:
    """Return the innermost reason urllib3 wrapped (its retry wrapper's text hides it)."""
    reason: Any = exc.args[0] if exc.args else exc
    while getattr(reason, "reason", None) is not None:
        reason = reason.reason
    text = str(reason)
    # NewConnectionError reads "HTTPConnection(host=..., port=...): Failed to establish ...".
    return text.split("): ", 1)[-1] if text.startswith("HTTPConnection") else text


# -- results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """A file's status as HEAD reports it. Times are epoch seconds."""

    file_id: str
    size: int
    mtime: float
    ctime: float
    relpath: str
    bytes_on_disk: int
    bytes_on_tape: int
    media: str
    state: str | None = None
    etag: str | None = None
    sha256: str | None = None

    @property
    def on_disk(self) -> bool:
        """Whether a GET streams at once (no recall from tape needed)."""
        return self.media == "disk"


@dataclass(frozen=True)
class Upload:
    """What a PUT stored: the bytes the server counted and the sha-256 it checked, if any."""

    file_id: str
    total_bytes: int
    sha256: str | None


@dataclass(frozen=True)
class Download:
    """What a GET delivered: bytes written, the sha-256 computed, whether it matched the server's."""

    file_id: str
    size: int
    mtime: float | None
    sha256: str | None
    verified: bool
    path: str | None = None


@dataclass(frozen=True)
class Locality:
    """Where ``archiveinfo`` puts a file (DISK, TAPE, DISK_AND_TAPE, LOST, NONE, UNAVAILABLE), or why not."""

    path: str
    locality: str | None
    error: str | None = None


@dataclass(frozen=True)
class TapeRestInfo:
    """The bulk API's discovery document: where it lives and the limits clients must respect."""

    sitename: str
    description: str
    endpoint: str
    version: str
    max_files_per_request: int
    max_in_flight_per_client: int
    min_poll_seconds: float


@dataclass(frozen=True)
class StagedFile:
    """One file of a bulk request: its state, whether it is on disk, why it failed. Times epoch seconds."""

    path: str
    state: str
    on_disk: bool | None = None
    error: str | None = None
    started_at: int | None = None
    finished_at: int | None = None

    @property
    def done(self) -> bool:
        """Whether the file reached a final state."""
        return self.state in TERMINAL_STATES

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> StagedFile:
        """Build from one entry of the request's ``files``."""
        return cls(
            path=entry["path"],
            state=entry["state"],
            on_disk=entry.get("onDisk"),
            error=entry.get("error"),
            started_at=entry.get("startedAt"),
            finished_at=entry.get("finishedAt"),
        )


@dataclass(frozen=True)
class StageSummary:
    """A bulk request's progress: files by state, bytes and volumes done, the server's ETA."""

    files: int
    states: Mapping[str, int]
    bytes_total: int = 0
    bytes_done: int = 0
    volumes_total: int = 0
    volumes_done: int = 0
    eta_seconds: float | None = None

    @property
    def pending(self) -> int:
        """Files not yet in a final state."""
        return self.files - sum(self.states.get(state, 0) for state in TERMINAL_STATES)

    @classmethod
    def from_json(cls, summary: Mapping[str, Any]) -> StageSummary:
        """Build from the request's ``summary`` object."""
        return cls(
            files=summary["files"],
            states=dict(summary.get("states") or {}),
            bytes_total=summary.get("bytesTotal") or 0,
            bytes_done=summary.get("bytesDone") or 0,
            volumes_total=summary.get("volumesTotal") or 0,
            volumes_done=summary.get("volumesDone") or 0,
            eta_seconds=summary.get("etaSeconds"),
        )


@dataclass(frozen=True)
class StagePage:
    """One page of a bulk request: its times, a page of its files, its summary, the next page's cursor."""

    request_id: str
    created_at: int | None
    started_at: int | None
    completed_at: int | None
    files: list[StagedFile]
    summary: StageSummary
    next_cursor: str | None

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> StagePage:
        """Build from ``GET /api/v1/stage/<id>``'s answer."""
        cursor = document.get("nextCursor")
        return cls(
            request_id=str(document["id"]),
            created_at=document.get("createdAt"),
            started_at=document.get("startedAt"),
            completed_at=document.get("completedAt"),
            files=[StagedFile.from_json(entry) for entry in document.get("files") or ()],
            summary=StageSummary.from_json(document["summary"]),
            next_cursor=None if cursor in (None, "") else str(cursor),
        )


@dataclass(frozen=True)
class StageProgress:
    """What ``stage_many`` hands its progress callback after every poll: totals over its requests."""

    files: int
    states: Mapping[str, int]
    bytes_total: int
    bytes_done: int
    eta_seconds: float | None
    request_ids: tuple[str, ...]
    #: Files not yet submitted because of the server's in-flight limit.
    waiting: int = 0

    @property
    def done(self) -> int:
        """Files in a final state."""
        return sum(self.states.get(state, 0) for state in TERMINAL_STATES)


# -- helpers ------------------------------------------------------------------------------------------


def file_path(file_id: FileId) -> str:
    """Return the bulk API's path for an id: ``5`` -> ``"/5"``; a string starting with ``/`` stays as is."""
    text = str(file_id)
    return text if text.startswith("/") else "/" + text


class _CountingBody:
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


def _read_chunks(handle: BinaryIO) -> Iterator[bytes]:
    while chunk := handle.read(CHUNK_SIZE):
        yield chunk


def _sha256_of(handle: BinaryIO) -> str:
    """Hash a seekable file from where it stands, then put it back there."""
    start = handle.tell()
    hasher = hashlib.sha256()
    for chunk in _read_chunks(handle):
        hasher.update(chunk)
    handle.seek(start)
    return hasher.hexdigest()


def _repr_digest_sha256(headers: Mapping[str, str]) -> str | None:
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


def _parse_levels(raw: str | None) -> tuple[int, int]:
    numbers = [*(int(n) for n in re.findall(r"\d+", raw or "")), 0, 0]
    return numbers[0], numbers[1]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the client -----------------------------------------------------------------------------------------


class ArchiveClient:
    """Synchronous client of one archive server; thread-safe (one pooled ``requests.Session``).

    ``url`` is the server's base (``http://host:8080``); ``timeout`` the seconds
    a request may wait for the server's next byte (connecting gets at most
    10 s); ``max_in_flight`` the connections kept, which should cover the
    threads sharing the client; ``client_id`` goes out as ``X-Client-Id`` (the
    bulk API counts its in-flight limit per client). Close it, or use it as a
    context manager.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        max_in_flight: int = 8,
        client_id: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.session = session or requests.Session()
        # Retry only failures to connect: nothing was sent, so any verb is safe to resend.
        # A Retry-After answer (503 offline, 429) is the caller's to act on, not urllib3's.
        retries = Retry(
            total=2,
            connect=2,
            read=0,
            status=0,
            other=0,
            redirect=0,
            backoff_factor=0.1,
            respect_retry_after_header=False,
            raise_on_status=False,
        )
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max_in_flight, max_retries=retries)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = f"pacifica-like-client/{__version__}"
        if client_id:
            self.session.headers["X-Client-Id"] = client_id
        self._tape_rest: TapeRestInfo | None = None

    def __enter__(self) -> ArchiveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    # -- plumbing

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.url + path

    def _file_url(self, file_id: FileId) -> str:
        # Quoted whole, so an id like "../x" reaches the server as one (rejected) segment.
        return f"{self.url}/{quote(str(file_id), safe='')}"

    def request(
        self,
        method: str,
        path: str,
        *,
        expect: Sequence[int] = (200,),
        stream: bool = False,
        errors: Mapping[int, type[ArchiveError]] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """Send one request; return the answer if its status is in ``expect``, else raise its error.

        ``path`` is relative to the base URL (or absolute). With ``stream`` the
        caller reads (and closes) the body.
        """
        url = self._url(path)
        with _transport_errors(f"{method} {url}"):
            response = self.session.request(
                method,
                url,
                timeout=(min(CONNECT_TIMEOUT, self.timeout), self.timeout),
                stream=stream,
                **kwargs,
            )
        if response.status_code in expect:
            return response
        try:
            with _transport_errors(f"{method} {url}"):
                if stream:
                    response._content = response.raw.read(MAX_ERROR_BODY, decode_content=True)
            if response.status_code >= 400:
                raise error_from_response(response, method, errors)
            raise ArchiveError(
                f"{method} {url}: unexpected answer {response.status_code} {response.reason}"
                f" (expected {', '.join(map(str, expect))})"
            )
        finally:
            response.close()

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise TransportError(
                f"{method} {self._url(path)}: the answer is not JSON: {response.text[:200]!r}"
            ) from None

    # -- the file API

    def health(self) -> str:
        """Return the server's liveness message (``GET /``)."""
        return self._json("GET", "/")["message"]

    def put(
        self,
        file_id: FileId,
        source: BodySource,
        *,
        mtime: float | None = None,
        sha256: str | bool | None = None,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> Upload:
        """Upload ``source`` under ``file_id``, streamed; return what the server stored.

        ``source`` is a path, bytes, a binary file object (read from where it
        stands) or an iterable of byte chunks (sent chunked unless ``size`` is
        given). ``mtime`` (epoch seconds) becomes the file's Last-Modified; by
        default a path's mtime, else now. ``sha256``: a hex digest to claim;
        ``True`` to hash the source first (a second read); ``False`` to claim
        none; ``None`` (default) hashes when the source can be read twice (a
        path, bytes, a seekable file). With a claim the server stores nothing
        unless the bytes match (DigestMismatch). ``progress(n)`` is called per
        chunk sent. Raises DigestMismatch, Conflict, InsufficientStorage...,
        TransportError; IncompleteUpload if the server counted other than sent.
        """
        with contextlib.ExitStack() as stack:
            handle: BinaryIO | None = None
            if isinstance(source, str | os.PathLike):
                handle = stack.enter_context(open(source, "rb"))  # closed by the stack
                stat = os.fstat(handle.fileno())
                size = stat.st_size if size is None else size
                mtime = stat.st_mtime if mtime is None else mtime
            elif isinstance(source, bytes | bytearray | memoryview):
                handle = io.BytesIO(source)
                size = len(source) if size is None else size
            elif hasattr(source, "read"):
                handle = source  # type: ignore[assignment]
            claim = sha256 if isinstance(sha256, str) else None
            if sha256 is True or (sha256 is None and handle is not None and _seekable(handle)):
                if handle is None or not _seekable(handle):
                    raise ValueError(
                        "sha256=True needs a source that can be read twice: a path or seekable file"
                    )
                claim = _sha256_of(handle)
            if handle is not None and size is None and _seekable(handle):
                start = handle.tell()
                size = handle.seek(0, os.SEEK_END) - start
                handle.seek(start)
            chunks: Iterable[bytes] = _read_chunks(handle) if handle is not None else source  # type: ignore[assignment]
            body = _CountingBody(chunks, size, progress)
            headers = {
                "Last-Modified": httpfields.format_http_date(time.time() if mtime is None else mtime),
                "Content-Type": "application/octet-stream",
            }
            if claim is not None:
                headers["Repr-Digest"] = httpfields.format_repr_digest(bytes.fromhex(claim))
            # Without a length requests sends chunked: exactly what an unsized iterable needs.
            data: Any = body if size is not None else iter(body)
            answer = self._json("PUT", self._file_url(file_id), data=data, headers=headers, expect=(201,))
        total = answer.get("total_bytes")
        if total != body.sent:
            raise IncompleteUpload(f"sent {body.sent} bytes of file {file_id} but the server stored {total}")
        return Upload(str(file_id), total, claim or body.hasher.hexdigest())

    def get(
        self,
        file_id: FileId,
        dest: str | os.PathLike[str] | BinaryIO,
        *,
        byte_range: tuple[int, int] | None = None,
        verify: bool = True,
        stage: bool = False,
        progress: Progress | None = None,
    ) -> Download:
        """Download a file to ``dest`` (a path, or a binary file object written from where it stands).

        A path is written through a hidden temp file in its directory, fsynced,
        given the file's mtime and renamed over ``dest`` only when complete and
        verified: on any failure nothing is left and an existing ``dest`` is
        untouched. A file object receives bytes as they come (the caller owns
        cleanup). ``byte_range`` is half-open ``(start, end)``. ``verify``
        checks the whole file against the server's Repr-Digest (DigestMismatch).
        ``stage`` recalls a file that is offline on tape first (otherwise
        OfflineOnTape). ``progress(n)`` is called per chunk written.
        """
        headers = {}
        expect: tuple[int, ...] = (200,)
        if byte_range is not None:
            start, end = byte_range
            if not 0 <= start < end:
                raise ValueError(f"byte_range must be (start, end) with 0 <= start < end, not {byte_range}")
            headers["Range"] = f"bytes={start}-{end - 1}"
            expect = (200, 206)
        try:
            response = self.request(
                "GET", self._file_url(file_id), stream=True, headers=headers, expect=expect
            )
        except OfflineOnTape:
            if not stage:
                raise
            self.stage(file_id, wait=True)
            response = self.request(
                "GET", self._file_url(file_id), stream=True, headers=headers, expect=expect
            )
        with response:
            mtime = None
            if response.headers.get("Last-Modified"):
                with contextlib.suppress(InvalidRequest):
                    mtime = httpfields.parse_http_date(response.headers["Last-Modified"])
            expected = (
                _repr_digest_sha256(response.headers) if verify and response.status_code == 200 else None
            )
            if isinstance(dest, str | os.PathLike):
                size, digest = self._download_to_path(response, Path(dest), expected, mtime, progress)
                where: str | None = os.fspath(dest)
            else:
                size, digest = self._copy_body(response, dest, expected, progress)
                where = None
        return Download(str(file_id), size, mtime, digest, expected is not None, where)

    def _copy_body(
        self, response: requests.Response, out: BinaryIO, expected: str | None, progress: Progress | None
    ) -> tuple[int, str | None]:
        """Write the body to ``out``; return bytes and sha-256; raise if short or not matching."""
        hasher = hashlib.sha256()
        received = 0
        with _transport_errors(f"GET {response.url}"):
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

    def _download_to_path(
        self,
        response: requests.Response,
        dest: Path,
        expected: str | None,
        mtime: float | None,
        progress: Progress | None,
    ) -> tuple[int, str | None]:
        directory = dest.parent if str(dest.parent) else Path(".")
        temp = directory / f".{dest.name}.{secrets.token_hex(4)}.part"
        # 0o666 under the umask, as any new file; O_EXCL so no other file is ever reused.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as out:
                result = self._copy_body(response, out, expected, progress)
                out.flush()
                os.fsync(out.fileno())  # the bytes are durable before the name points at them
            if mtime is not None:
                os.utime(temp, (mtime, mtime))
            os.replace(temp, dest)  # readers see the old file or the whole new one
            _fsync_directory(directory)  # and the new name survives a crash
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return result

    def stat(self, file_id: FileId) -> FileInfo:
        """Return the file's status from HEAD. Raises FileNotInArchive."""
        response = self.request("HEAD", self._file_url(file_id), expect=(200, 204))
        headers = response.headers
        on_disk, on_tape = _parse_levels(headers.get("X-Pacifica-Bytes-Per-Level"))
        return FileInfo(
            file_id=str(file_id),
            size=int(headers.get("X-Content-Length") or 0),
            mtime=float(headers.get("Last-Modified") or 0),
            ctime=float(headers.get("X-Pacifica-Ctime") or 0),
            relpath=headers.get("X-Pacifica-File", ""),
            bytes_on_disk=on_disk,
            bytes_on_tape=on_tape,
            media=headers.get("X-Pacifica-File-Storage-Media", ""),
            state=headers.get("X-Pacifica-File-State"),
            etag=headers.get("ETag"),
            sha256=_repr_digest_sha256(headers),
        )

    def stage(self, file_id: FileId, *, wait: bool = False, wait_timeout: float = 3600.0) -> bool:
        """Recall a file to disk (POST); return True once it is there.

        The server answers 200 when the file is on disk, or 202 while a recall
        goes on. With ``wait`` a 202 is followed by HEAD (backing off up to
        10 s) until the file is on disk; if the recall ended without putting it
        there, POST is sent again so its failure is raised. Returns False when
        ``wait`` is off (or ``wait_timeout`` passed) and the recall still runs.
        """
        deadline = time.monotonic() + wait_timeout
        delay = 0.05
        for _attempt in range(3):
            response = self.request("POST", self._file_url(file_id), expect=(200, 202))
            response.close()
            if response.status_code == 200:
                return True
            if not wait:
                return False
            while time.monotonic() < deadline:
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 10.0)
                info = self.stat(file_id)
                if info.on_disk:
                    return True
                if info.state != "UNMIGRATING":
                    break  # the recall ended and the file is not on disk: POST again to learn why
            else:
                return False
        return self.stat(file_id).on_disk

    def move(self, file_id: FileId, path: str | os.PathLike[str]) -> None:
        """Move a file on the server's side (PATCH) into the archive under ``file_id``.

        The server takes it only from inside its ``patch_roots`` (Forbidden otherwise).
        """
        self._json("PATCH", self._file_url(file_id), json={"path": os.fspath(path)})

    def delete(self, file_id: FileId) -> None:
        """Delete a file, where the server allows it (MethodDisabled otherwise)."""
        self._json("DELETE", self._file_url(file_id))

    # -- the bulk API

    def tape_rest_info(self, refresh: bool = False) -> TapeRestInfo:
        """Return the bulk API's discovery document (cached after the first call)."""
        if self._tape_rest is None or refresh:
            document = self._json("GET", "/.well-known/wlcg-tape-rest-api")
            endpoints = [e for e in document.get("endpoints") or () if e.get("version") == "v1"]
            if not endpoints:
                raise ArchiveError(f"{self.url} offers no v1 endpoint of the tape REST API: {document}")
            endpoint, limits = endpoints[0], endpoints[0].get("metadata") or {}
            self._tape_rest = TapeRestInfo(
                sitename=document.get("sitename", ""),
                description=document.get("description", ""),
                endpoint=urljoin(self.url + "/", endpoint["uri"]).rstrip("/"),
                version=endpoint["version"],
                max_files_per_request=int(limits.get("maxFilesPerRequest") or 100_000),
                max_in_flight_per_client=int(limits.get("maxInFlightPerClient") or 1 << 62),
                min_poll_seconds=float(limits.get("minPollSeconds") or 0.0),
            )
        return self._tape_rest

    def _api(self, path: str) -> str:
        return self.tape_rest_info().endpoint + path

    def _bulk_json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._json(method, self._api(path), errors={404: UnknownRequest}, **kwargs)

    def stage_request(self, ids: Iterable[FileId], disk_lifetime: str | float | None = None) -> str:
        """Submit one bulk stage request; return its id once the server has stored it.

        ``ids`` are file ids (or ``"/<id>"`` paths); ``disk_lifetime`` an ISO 8601
        duration (``"PT1H"``) or seconds: how long the files stay pinned on disk.
        Raises InvalidRequest (empty, duplicate or malformed), RequestTooLarge, TooManyRequests.
        """
        lifetime = _iso_duration(disk_lifetime)
        files = [{"path": file_path(i)} for i in ids]
        if lifetime is not None:
            for entry in files:
                entry["diskLifetime"] = lifetime
        return str(self._json("POST", self._api("/stage"), json={"files": files}, expect=(201,))["requestId"])

    def poll(
        self,
        request_id: str,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        state: str | None = None,
    ) -> StagePage:
        """Return one page of a bulk request: its files (``state`` filters), summary and next cursor.

        Raises UnknownRequest.
        """
        params = {"limit": limit, "cursor": cursor, "state": state}
        document = self._bulk_json(
            "GET",
            f"/stage/{quote(request_id, safe='')}",
            params={k: v for k, v in params.items() if v is not None},
        )
        return StagePage.from_json(document)

    def files(
        self, request_id: str, *, state: str | None = None, page_size: int = PAGE_SIZE
    ) -> Iterator[StagedFile]:
        """Yield every file of a bulk request (in ``state``), page by page.

        A page of many files is a heavy request: a busy server answers 429
        with Retry-After, which is waited out and the page asked for again
        (up to PAGE_RETRIES times in a row; then the 429 is raised).
        """
        cursor = None
        refused = 0
        while True:
            try:
                page = self.poll(request_id, limit=page_size, cursor=cursor, state=state)
            except TooManyRequests as exc:
                refused += 1
                if refused > PAGE_RETRIES:
                    raise
                time.sleep(max(0.05, exc.retry_after or 1))  # type: ignore[attr-defined]
                continue
            refused = 0
            yield from page.files
            if page.next_cursor is None or not page.files:
                return
            cursor = page.next_cursor

    def cancel(self, request_id: str, ids: Iterable[FileId]) -> None:
        """Cancel some files of a bulk request (all or nothing: InvalidRequest names foreign ones)."""
        self._bulk_json("POST", f"/stage/{quote(request_id, safe='')}/cancel", json={"paths": _paths(ids)})

    def delete_request(self, request_id: str) -> None:
        """Delete a bulk request, cancelling what it still waits for. Raises UnknownRequest."""
        response = self.request(
            "DELETE",
            self._api(f"/stage/{quote(request_id, safe='')}"),
            expect=(200, 204),
            errors={404: UnknownRequest},
        )
        response.close()

    def release(self, request_id: str, ids: Iterable[FileId]) -> None:
        """Drop this request's pins on the files, so the disk copies may be released."""
        self._bulk_json("POST", f"/release/{quote(request_id, safe='')}", json={"paths": _paths(ids)})

    def archiveinfo(self, ids: Iterable[FileId]) -> list[Locality]:
        """Return where each file is: DISK, TAPE, DISK_AND_TAPE, LOST, NONE or UNAVAILABLE, or an error."""
        answer = self._json("POST", self._api("/archiveinfo"), json={"paths": _paths(ids)})
        return [Locality(e["path"], e.get("locality"), e.get("error")) for e in answer]

    def queues(self) -> Any:
        """Return the recall queues per volume, as the server reports them."""
        return self._json("GET", self._api("/queues"))

    def stage_many(
        self,
        ids: Iterable[FileId],
        progress: Callable[[StageProgress], Any] | None = None,
        disk_lifetime: str | float | None = None,
        poll_interval: float | None = None,
        timeout: float | None = None,
    ) -> dict[FileId, StagedFile]:
        """Stage many files through the bulk API and follow them until every one is final.

        Duplicates are sent once. The ids are split into requests of at most
        the server's ``maxFilesPerRequest``, submitted while the client's files
        in flight stay within ``maxInFlightPerClient`` (the rest wait, and a
        429 is waited out). Each poll fetches only a request's summary (one
        small page); the per-file results are listed once, by final state, when
        the request is done. Polls are at least ``minPollSeconds`` apart.
        ``progress(StageProgress)`` is called after every round of polls.
        Returns each given id's final :class:`StagedFile`, in the order given.
        Raises TimeoutError after ``timeout`` seconds (the requests go on; their
        ids are in the message), and the errors of the calls it makes.
        """
        keys: dict[str, FileId] = {}
        for file_id in ids:
            keys.setdefault(file_path(file_id), file_id)
        paths = list(keys)
        info = self.tape_rest_info()
        interval = max(poll_interval if poll_interval is not None else 0.0, info.min_poll_seconds, 0.05)
        chunk = max(1, min(info.max_files_per_request, info.max_in_flight_per_client))
        waiting = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
        waiting.reverse()  # popped from the end: submitted in the order given
        summaries: dict[str, StageSummary] = {}
        sizes: dict[str, int] = {}
        results: dict[str, StagedFile] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiting or len(results) < len(paths):
            active = [rid for rid in summaries if rid not in sizes or summaries[rid].pending]
            in_flight = sum(summaries[rid].pending for rid in active)
            while waiting and (not active or in_flight + len(waiting[-1]) <= info.max_in_flight_per_client):
                try:
                    rid = self.stage_request(waiting[-1], disk_lifetime)
                except TooManyRequests as exc:
                    if active:
                        break  # files will finish; try again after the next poll
                    time.sleep(max(interval, exc.retry_after or 0))  # type: ignore[attr-defined]
                    continue
                batch = waiting.pop()
                sizes[rid] = len(batch)
                summaries[rid] = StageSummary(files=len(batch), states={"SUBMITTED": len(batch)})
                active.append(rid)
                in_flight += len(batch)
            for rid in active:
                summaries[rid] = self.poll(rid, limit=1).summary
                if summaries[rid].pending == 0:
                    for state in sorted(TERMINAL_STATES):
                        if summaries[rid].states.get(state):
                            results.update((f.path, f) for f in self.files(rid, state=state))
            if progress is not None:
                progress(_progress_of(summaries, len(paths), sum(len(b) for b in waiting)))
            if len(results) >= len(paths) and not waiting:
                break
            if all(summaries[rid].pending == 0 for rid in summaries) and not waiting:
                missing = [p for p in paths if p not in results][:5]
                raise ArchiveError(f"the server finished the requests but did not report files {missing}")
            if deadline is not None and time.monotonic() + interval > deadline:
                raise TimeoutError(
                    f"stage_many: files still pending after {timeout} s; requests {list(summaries)} go on"
                )
            time.sleep(interval)
        return {keys[path]: results[path] for path in paths}


def _progress_of(summaries: Mapping[str, StageSummary], files: int, waiting: int) -> StageProgress:
    states: dict[str, int] = dict.fromkeys(FILE_STATES, 0)
    for summary in summaries.values():
        for state, count in summary.states.items():
            states[state] = states.get(state, 0) + count
    states["SUBMITTED"] += waiting
    etas = [s.eta_seconds for s in summaries.values() if s.eta_seconds is not None and s.pending]
    return StageProgress(
        files=files,
        states=states,
        bytes_total=sum(s.bytes_total for s in summaries.values()),
        bytes_done=sum(s.bytes_done for s in summaries.values()),
        eta_seconds=max(etas) if etas else None,
        request_ids=tuple(summaries),
        waiting=waiting,
    )


def _paths(ids: Iterable[FileId]) -> list[str]:
    return [file_path(i) for i in ids]


def _seekable(handle: Any) -> bool:
    try:
        return bool(handle.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _iso_duration(lifetime: str | float | None) -> str | None:
    """Return a pin lifetime as an ISO 8601 duration.

    >>> _iso_duration(3600), _iso_duration("PT30M"), _iso_duration(None)
    ('PT3600S', 'PT30M', None)
    """
    if lifetime is None or isinstance(lifetime, str):
        return lifetime
    if lifetime < 0:
        raise ValueError(f"disk_lifetime must not be negative, not {lifetime}")
    return f"PT{int(lifetime)}S"


# -- futures --------------------------------------------------------------------------------------------


class AsyncArchiveClient:
    """The client's calls as futures: ``max_in_flight`` threads over one ArchiveClient (one session).

    Every method submits the synchronous call and returns its Future at once;
    at most ``max_in_flight`` run (and so hold a connection) at a time, the rest
    wait their turn in submission order. ``client`` is the synchronous client
    underneath, for calls that should not wait in the queue. Closing waits for
    submitted calls, then closes the session::

        with AsyncArchiveClient("http://archive:8080", max_in_flight=8) as archive:
            futures = [archive.put(i, path) for i, path in enumerate(paths)]
            for future in concurrent.futures.as_completed(futures):
                future.result()  # raises the call's error
    """

    def __init__(
        self, url: str, timeout: float = 120.0, max_in_flight: int = 8, client_id: str | None = None
    ) -> None:
        self.client = ArchiveClient(url, timeout=timeout, max_in_flight=max_in_flight, client_id=client_id)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_in_flight, thread_name_prefix="archive-client"
        )

    def __enter__(self) -> AsyncArchiveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, cancel_pending: bool = False) -> None:
        """Wait for running calls (dropping queued ones with ``cancel_pending``), then close the session."""
        self._pool.shutdown(wait=True, cancel_futures=cancel_pending)
        self.client.close()

    def submit(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Run any callable (e.g. a method of ``self.client``) on the bounded pool."""
        return self._pool.submit(call, *args, **kwargs)

    def put(self, file_id: FileId, source: BodySource, **kwargs: Any) -> concurrent.futures.Future[Upload]:
        """:meth:`ArchiveClient.put` as a future."""
        return self.submit(self.client.put, file_id, source, **kwargs)

    def get(
        self, file_id: FileId, dest: str | os.PathLike[str] | BinaryIO, **kwargs: Any
    ) -> concurrent.futures.Future[Download]:
        """:meth:`ArchiveClient.get` as a future."""
        return self.submit(self.client.get, file_id, dest, **kwargs)

    def stat(self, file_id: FileId) -> concurrent.futures.Future[FileInfo]:
        """:meth:`ArchiveClient.stat` as a future."""
        return self.submit(self.client.stat, file_id)

    def stage(self, file_id: FileId, **kwargs: Any) -> concurrent.futures.Future[bool]:
        """:meth:`ArchiveClient.stage` as a future."""
        return self.submit(self.client.stage, file_id, **kwargs)

    def move(self, file_id: FileId, path: str | os.PathLike[str]) -> concurrent.futures.Future[None]:
        """:meth:`ArchiveClient.move` as a future."""
        return self.submit(self.client.move, file_id, path)

    def delete(self, file_id: FileId) -> concurrent.futures.Future[None]:
        """:meth:`ArchiveClient.delete` as a future."""
        return self.submit(self.client.delete, file_id)

    def archiveinfo(self, ids: Iterable[FileId]) -> concurrent.futures.Future[list[Locality]]:
        """:meth:`ArchiveClient.archiveinfo` as a future."""
        return self.submit(self.client.archiveinfo, list(ids))

    def stage_many(
        self, ids: Iterable[FileId], **kwargs: Any
    ) -> concurrent.futures.Future[dict[FileId, StagedFile]]:
        """:meth:`ArchiveClient.stage_many` as a future (it holds one worker while it follows)."""
        return self.submit(self.client.stage_many, list(ids), **kwargs)
