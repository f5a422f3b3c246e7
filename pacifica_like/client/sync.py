"""The synchronous client: :class:`ArchiveClient`, one pooled ``requests.Session`` shared by threads.

The file API (``/<id>``: put, get, stat, stage, move, delete) and the bulk
API (``/api/v1``: stage requests, polls, cancel, release, archiveinfo, and
``stage_many`` that follows many files to the end).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pacifica_like import __version__
from pacifica_like.client.errors import TransportError, error_from_response, transport_errors
from pacifica_like.client.models import (
    TERMINAL_STATES,
    Download,
    FileId,
    FileInfo,
    Locality,
    StagedFile,
    StagePage,
    StageProgress,
    StageSummary,
    TapeRestInfo,
    Upload,
    file_path,
    progress_of,
)
from pacifica_like.client.transfer import (
    BodySource,
    CountingBody,
    Progress,
    copy_body,
    download_to_path,
    read_chunks,
    repr_digest_sha256,
    seekable,
    sha256_of,
)
from pacifica_like.core import httpfields
from pacifica_like.core.errors import (
    ArchiveError,
    IncompleteUpload,
    InvalidRequest,
    OfflineOnTape,
    TooManyRequests,
    UnknownRequest,
)

#: Seconds to wait for a TCP connection (the read timeout is the client's ``timeout``).
CONNECT_TIMEOUT = 10.0
#: Files per page when listing a bulk request's files.
PAGE_SIZE = 10_000
#: Times in a row a page refused with 429 (the server busy with heavy requests) is asked for again.
PAGE_RETRIES = 30
#: The most of an error body we read and keep.
MAX_ERROR_BODY = 64 * 1024


def discover_token(environ: Mapping[str, str] | None = None) -> str | None:
    """Find a bearer token as the WLCG Bearer Token Discovery document says (gfal2 does the same).

    ``BEARER_TOKEN``; else the file ``BEARER_TOKEN_FILE`` names; else
    ``$XDG_RUNTIME_DIR/bt_u<uid>``; else ``/tmp/bt_u<uid>``. None when there is none.
    """
    environ = os.environ if environ is None else environ
    if environ.get("BEARER_TOKEN", "").strip():
        return environ["BEARER_TOKEN"].strip()
    uid = os.geteuid()
    candidates = [environ.get("BEARER_TOKEN_FILE")]
    if environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(environ["XDG_RUNTIME_DIR"], f"bt_u{uid}"))
    candidates.append(f"/tmp/bt_u{uid}")
    for path in candidates:
        if not path:
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError:
            continue
        if token:
            return token
    return None


class ArchiveClient:
    """Synchronous client of one archive server; thread-safe (one pooled ``requests.Session``).

    ``url`` is the server's base (``http://host:8080``); ``timeout`` the seconds
    a request may wait for the server's next byte (connecting gets at most
    10 s); ``max_in_flight`` the connections kept, which should cover the
    threads sharing the client; ``client_id`` goes out as ``X-Client-Id`` (the
    bulk API counts its in-flight limit per client where no token names the
    client). ``token`` is the bearer token sent with every request; None finds
    one as gfal2 and the WLCG tools do (:func:`discover_token`), ``""`` sends none.
    Close it, or use it as a context manager.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        max_in_flight: int = 8,
        client_id: str | None = None,
        session: requests.Session | None = None,
        token: str | None = None,
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
        token = discover_token() if token is None else token
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
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
        with transport_errors(f"{method} {url}"):
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
            body = None
            with transport_errors(f"{method} {url}"):
                if stream:  # read no more than MAX_ERROR_BODY of an error streamed at us
                    body = response.raw.read(MAX_ERROR_BODY, decode_content=True)
            if response.status_code >= 400:
                raise error_from_response(response, method, errors, body)
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
            if sha256 is True or (sha256 is None and handle is not None and seekable(handle)):
                if handle is None or not seekable(handle):
                    raise ValueError(
                        "sha256=True needs a source that can be read twice: a path or seekable file"
                    )
                claim = sha256_of(handle)
            if handle is not None and size is None and seekable(handle):
                start = handle.tell()
                size = handle.seek(0, os.SEEK_END) - start
                handle.seek(start)
            chunks: Iterable[bytes] = read_chunks(handle) if handle is not None else source  # type: ignore[assignment]
            body = CountingBody(chunks, size, progress)
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
                repr_digest_sha256(response.headers) if verify and response.status_code == 200 else None
            )
            if isinstance(dest, str | os.PathLike):
                size, digest = download_to_path(response, Path(dest), expected, mtime, progress)
                where: str | None = os.fspath(dest)
            else:
                size, digest = copy_body(response, dest, expected, progress)
                where = None
        return Download(str(file_id), size, mtime, digest, expected is not None, where)

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
            sha256=repr_digest_sha256(headers),
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
                progress(progress_of(summaries, len(paths), sum(len(b) for b in waiting)))
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


def _parse_levels(raw: str | None) -> tuple[int, int]:
    numbers = [*(int(n) for n in re.findall(r"\d+", raw or "")), 0, 0]
    return numbers[0], numbers[1]


def _paths(ids: Iterable[FileId]) -> list[str]:
    return [file_path(i) for i in ids]


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
