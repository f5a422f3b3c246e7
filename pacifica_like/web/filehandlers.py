"""The file API's handlers: ``/`` (health) and ``/<id>`` with GET, HEAD, PUT, POST, PATCH, DELETE.

Both front doors call these, so neither holds logic of its own: the plain
WSGI adapter (``pacifica_like.web.fileapi``, what uWSGI serves) and the
CherryPy MethodDispatcher resource (``pacifica_like.web.fileresource``). A
handler validates the request, calls the backend contract and shapes the
answer as (status, headers, body iterable); it reads the request from its
WSGI environ, which both adapters have, and raises ``pacifica_like.core.errors``
types, which ``pacifica_like.web.errors`` turns into answers. Bodies stream both
ways: uploads are copied in chunks from ``wsgi.input``, downloads are a
:class:`ReaderBody` that closes its reader when the server closes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

from pacifica_like.core import httpfields
from pacifica_like.core.config import Settings
from pacifica_like.core.errors import (
    FileNotInArchive,
    IncompleteUpload,
    InvalidRequest,
    LengthRequired,
    MethodDisabled,
    UnsupportedMediaType,
)
from pacifica_like.core.ids import parse_id
from pacifica_like.storage.contract import CHUNK_SIZE, ArchiveCopy, Backend, FileStatus, Reader
from pacifica_like.web import davprops

HEALTH_MESSAGE = "Pacifica Archive Interface Up and Running"
#: The largest PATCH body we read; it only carries a path.
MAX_JSON_BODY = 64 * 1024
#: HTTP versions served; anything else in the request line is refused before routing.
PROTOCOLS = frozenset(("HTTP/1.0", "HTTP/1.1"))
#: A Content-Length longer than this cannot describe a body any filesystem holds.
MAX_LENGTH_DIGITS = 18
FILE_VERBS = "DELETE, GET, HEAD, PATCH, POST, PUT"
VERBS_WITHOUT_DELETE = "GET, HEAD, PATCH, POST, PUT"

Headers = list[tuple[str, str]]
Response = tuple[int, Headers, Iterable[bytes]]
Handler = Callable[[int, dict[str, Any]], Response]

#: The peer's HEAD answer for a missing id: every status header present, each saying so.
#: Pacifica's cart service reads them all unconditionally; without them it fails on the 404.
NOT_FOUND_VALUE = "File Not Found"
NOT_FOUND_HEADERS = {
    "X-Pacifica-Messsage": "File Not found",  # sic, both spellings are the peer's
    "X-Pacifica-File": NOT_FOUND_VALUE,
    "X-Content-Length": NOT_FOUND_VALUE,
    "Last-Modified": NOT_FOUND_VALUE,
    "X-Pacifica-Ctime": NOT_FOUND_VALUE,
    "X-Pacifica-Bytes-Per-Level": NOT_FOUND_VALUE,
    # Not the peer's "File Not Found": cartd HEADs a file whose media is not "disk" again at once,
    # forever (30-40 a second). With "disk" it reads the size, fails, and ends the cart in error.
    "X-Pacifica-File-Storage-Media": "disk",
}

STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}
#: environ key: request body bytes read so far (for metrics and the access log).
BYTES_IN_KEY = "pacifica_like.bytes_in"
#: environ key set by the access guard (``pacifica_like.web.authz``): the caller may only create.
CREATE_ONLY_KEY = "pacifica_like.create_only"


def json_response(code: int, payload: dict[str, Any], headers: Headers | None = None) -> Response:
    """Return a JSON response triple."""
    body = json.dumps(payload).encode("utf-8")
    return (
        code,
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *(headers or [])],
        [body],
    )


class RequestHeaders:
    """Case-insensitive read access to a WSGI environ's request headers."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self._environ = environ

    def get(self, name: str, default: str | None = None) -> str | None:
        """Return the header's value, or ``default``."""
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        return self._environ.get(key, default)


def unsupported_method(method: str, path: str) -> MethodDisabled:
    """Return the 405 for ``method`` on ``path`` (``/`` or ``/<id>``), naming the verbs it takes."""
    if not path[1:]:
        return MethodDisabled(f"{method} needs a file id: {method} /<id>", allow=davprops.ROOT_DAV_VERBS)
    return MethodDisabled(f"{method} is not supported on /<id>", allow=davprops.FILE_DAV_VERBS)


class FileHandlers:
    """The file API over one backend: route a checked path and verb to its handler, run it."""

    def __init__(
        self, backend: Backend, settings: Settings, stage: Callable[[int], bool] | None = None
    ) -> None:
        self.backend = backend
        self.settings = settings
        #: What POST /<id> calls: the backend's own recall, or the recall scheduler's queue
        #: (``pacifica_like.bulk.stager``, wired by build_app where one applies).
        self.stage = stage if stage is not None else backend.stage
        self.verbs: dict[str, Handler] = {
            "GET": self.get,
            "HEAD": self.head,
            "PUT": self.put,
            "POST": self.post,
            "PATCH": self.patch,
            "DELETE": self.delete,
            "PROPFIND": self.propfind,
            "OPTIONS": self.options,
        }
        self.propfinder = davprops.Propfinder(backend)

    def answer(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        """Answer ``method`` on ``path`` (checked by :func:`check_request`): ``/`` or ``/<id>``."""
        if not path[1:]:
            return self.root(method, environ)
        handler = self.verbs.get(method)
        if handler is None:
            raise unsupported_method(method, path)
        return handler(self.file_id(path), environ)

    @staticmethod
    def file_id(path: str) -> int:
        """Return the id a ``/<id>`` path names; InvalidRequest for anything else."""
        segment, slash, _ = path[1:].partition("/")
        if slash:
            # Includes %2F.. (decoded by the server before we see it).
            raise InvalidRequest(f"a file id is exactly one path segment, not {path!r}")
        try:
            return parse_id(segment)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    def root(self, method: str, environ: dict[str, Any]) -> Response:
        """Answer the liveness check on ``/``; PROPFIND lists it as the collection of every id."""
        if method == "PROPFIND":
            depth = davprops.depth_of(environ)
            mount = (environ.get("SCRIPT_NAME") or "") + "/"
            return self.propfinder.collection(mount, depth, self.propfind_request(environ))
        if method == "OPTIONS":
            return davprops.options_response(davprops.ROOT_DAV_VERBS)
        if method not in ("GET", "HEAD"):
            raise unsupported_method(method, "/")
        return json_response(200, {"message": HEALTH_MESSAGE})

    def get(self, file_id: int, environ: dict[str, Any]) -> Response:
        """Stream a file, whole or a byte range."""
        reader = self.backend.open_reader(file_id)
        try:
            code, headers, start, end = _plan_read(reader.status, environ)
            if "HTTP_WANT_DIGEST" in environ or "HTTP_WANT_REPR_DIGEST" in environ:
                headers = self.wanted_digests(file_id, reader.status.sha256, environ, headers)
            if start:
                reader.seek(start)
            return code, headers, ReaderBody(reader, end - start)
        except BaseException:
            reader.close()
            raise

    def head(self, file_id: int, environ: dict[str, Any]) -> Response:
        """Report a file's status in Pacifica's headers, answering 204 (404 with the peer's headers)."""
        try:
            status = self.backend.status(file_id)
        except FileNotInArchive as exc:
            exc.headers = {**exc.headers, **NOT_FOUND_HEADERS}
            raise
        headers = status_headers(status)
        if "HTTP_WANT_DIGEST" in environ or "HTTP_WANT_REPR_DIGEST" in environ:
            headers = self.wanted_digests(file_id, status.sha256, environ, headers)
        return 204, headers, []

    def wanted_digests(
        self, file_id: int, sha256: bytes | None, environ: dict[str, Any], headers: Headers
    ) -> Headers:
        """Add the digests ``Want-Digest`` (RFC 3230) and ``Want-Repr-Digest`` (RFC 9530) ask for.

        They are read from what was recorded at ingest, never computed here (a
        file may be on tape). Digests of another version than the one this
        answer describes (a replace raced the request) are left out.
        """
        recorded = self.backend.checksums(file_id)
        if sha256 is not None and recorded.get("sha256", sha256) != sha256:
            return headers
        want = environ.get("HTTP_WANT_DIGEST")
        if want:
            chosen = [
                (name, recorded[name]) for name in httpfields.parse_want_digest(want) if name in recorded
            ]
            if chosen:
                headers = [*headers, ("Digest", httpfields.format_digest(chosen))]
        want = environ.get("HTTP_WANT_REPR_DIGEST")
        if want:
            names = [name for name in httpfields.parse_want_repr_digest(want) if name in recorded]
            if "sha256" in recorded and "sha256" not in names:
                names.append("sha256")  # always there when known; the asked-for ones first
            if names:
                value = httpfields.format_repr_digests([(name, recorded[name]) for name in names])
                headers = [(k, v) for k, v in headers if k != "Repr-Digest"] + [("Repr-Digest", value)]
        return headers

    def put(self, file_id: int, environ: dict[str, Any]) -> Response:
        """Store the request body under the id, atomically; answer 201.

        ``Last-Modified`` becomes the file's mtime. Clients written against
        the peer never send it (the peer never reads it), so without one the
        upload's start is the mtime, unless ``require_last_modified`` is set.
        """
        total = self.store(file_id, environ, self.settings.archive.require_last_modified)
        return json_response(201, {"message": "File added to archive", "total_bytes": total})

    def store(self, file_id: int, environ: dict[str, Any], require_date: bool) -> int:
        """Commit the request body as the file's new version (digests checked); return bytes stored."""
        headers = RequestHeaders(environ)
        last_modified = headers.get("Last-Modified")
        if last_modified is not None:
            mtime = httpfields.parse_http_date(last_modified)
        elif require_date:
            raise InvalidRequest(
                "PUT needs a Last-Modified header (an HTTP date) for the file's mtime "
                "(require_last_modified = true)"
            )
        else:
            mtime = time.time()
        expect = httpfields.parse_digest_headers(headers)
        length = _content_length(headers)
        exclusive = bool(environ.get(CREATE_ONLY_KEY))
        with self.backend.open_writer(file_id, mtime, expect, exclusive=exclusive) as writer:
            received = copy_body(body_file(environ, length), length, writer.write)
            if length is not None and received < length:
                raise IncompleteUpload(f"upload ended after {received} of {length} bytes; nothing was stored")
            return writer.commit()

    def propfind(self, file_id: int, environ: dict[str, Any]) -> Response:
        """Answer PROPFIND of ``/<id>`` (gfal-stat, davix-ls): the file's WebDAV properties."""
        davprops.depth_of(environ)
        request = self.propfind_request(environ)
        href = (environ.get("SCRIPT_NAME") or "") + request_path(environ)
        return self.propfinder.file(href, file_id, request)

    def options(self, file_id: int, environ: dict[str, Any]) -> Response:
        """Answer OPTIONS of ``/<id>``: the verbs it takes, and WebDAV class 1."""
        return davprops.options_response(davprops.FILE_DAV_VERBS)

    @staticmethod
    def propfind_request(environ: dict[str, Any]) -> davprops.PropfindRequest:
        """Read a PROPFIND body (bounded) and parse what it asks for."""
        length = content_length(environ)
        raw = bytearray()
        copy_body(body_file(environ, length), length, raw.extend, limit=davprops.MAX_PROPFIND_BODY)
        return davprops.PropfindRequest.parse(bytes(raw))

    def post(self, file_id: int, environ: dict[str, Any]) -> Response:
        """Stage the file to disk: 200 once it is there, 202 while a recall is still running.

        The 202 points at HEAD /<id>, whose X-Pacifica-File-State turns from
        UNMIGRATING to DUAL when the recall is done.
        """
        if self.stage(file_id):
            return json_response(200, {"message": "File was staged", "file": str(file_id)})
        return json_response(
            202,
            {
                "message": "File is being staged from tape; HEAD the file to follow it",
                "file": str(file_id),
                "state": "UNMIGRATING",
                "progress": f"/{file_id}",
            },
            [("Location", f"/{file_id}")],
        )

    def patch(self, file_id: int, environ: dict[str, Any]) -> Response:
        """Move a server-side file (JSON ``{"path": ...}``) into the archive; ``?dryRun=true``: the plan."""
        dry_run = httpfields.parse_dry_run(environ.get("QUERY_STRING"))
        headers = RequestHeaders(environ)
        content_type = headers.get("Content-Type") or ""
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType(
                f'PATCH takes application/json {{"path": ...}}, not {content_type or "no content type"!r}'
            )
        length = _content_length(headers)
        if length is not None and length > MAX_JSON_BODY:
            raise InvalidRequest(f"PATCH body is over {MAX_JSON_BODY} bytes")
        raw = bytearray()
        copy_body(body_file(environ, length), length, raw.extend, limit=MAX_JSON_BODY)
        try:
            document = json.loads(raw)
        except RecursionError:
            raise InvalidRequest("PATCH body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"PATCH body is not valid JSON: {exc}") from None
        if not isinstance(document, dict) or "path" not in document:
            raise InvalidRequest('PATCH body must be a JSON object with a "path"')
        if dry_run:
            plan = self.backend.plan_adopt(file_id, document["path"])
            message = {
                "dryRun": True,
                "message": "File would be moved into the archive",
                "file": str(file_id),
            }
            return json_response(200, {**message, **plan})
        self.backend.adopt(file_id, document["path"])
        return json_response(200, {"message": "File Moved Successfully"})

    def delete(self, file_id: int, environ: dict[str, Any]) -> Response:
        """Remove the file, where the deployment allows it; ``?dryRun=true``: what would go."""
        dry_run = httpfields.parse_dry_run(environ.get("QUERY_STRING"))
        if not self.settings.archive.allow_delete:
            raise MethodDisabled(
                "DELETE is disabled on this archive (allow_delete = false)",
                allow=VERBS_WITHOUT_DELETE,
            )
        if dry_run:
            status = self.backend.status(file_id)  # 404 when there is nothing to delete
            plan: dict[str, Any] = {
                "dryRun": True,
                "message": "File would be deleted",
                "file": str(file_id),
                "size": status.size,
                "state": status.state,
                # Bytes on disk and on tape: tape copies become stale with the file.
                "bytesPerLevel": list(status.bytes_per_level),
            }
            if status.copies is not None:
                plan["copies"] = copy_names(status.copies)
            return json_response(200, plan)
        self.backend.delete(file_id)
        return json_response(200, {"message": "File Deleted", "file": str(file_id)})


def copy_names(copies: Iterable[ArchiveCopy]) -> list[str]:
    """Name each archive copy ``copy:vsn:position``, as HEAD and DELETE's dry run show them."""
    return [f"{c.copy}:{c.vsn}:{c.position}" for c in copies]


def status_headers(status: FileStatus) -> Headers:
    """Return Pacifica's HEAD headers for a file, plus ETag and Repr-Digest."""
    headers = [
        ("X-Pacifica-Messsage", "File was found"),  # sic: Pacifica clients read this spelling
        ("X-Pacifica-File", status.relpath),
        ("X-Content-Length", str(status.size)),
        ("Last-Modified", str(status.mtime)),  # epoch seconds, as Pacifica clients parse it
        ("X-Pacifica-Ctime", str(status.ctime)),
        ("X-Pacifica-Bytes-Per-Level", str(tuple(status.bytes_per_level))),
        ("X-Pacifica-File-Storage-Media", status.media),
        ("ETag", httpfields.etag_for(status.sha256, status.size, status.mtime)),
    ]
    if status.sha256 is not None:
        headers.append(("Repr-Digest", httpfields.format_repr_digest(status.sha256)))
    if status.state is not None:
        headers.append(("X-Pacifica-File-State", status.state))
    if status.copies is not None:
        # copy:vsn:position of each archive copy; empty when there is none (REGULAR).
        headers.append(("X-Pacifica-Archive-Copies", ", ".join(copy_names(status.copies))))
    return headers


def _plan_read(status: FileStatus, environ: dict[str, Any]) -> tuple[int, Headers, int, int]:
    """Decide status, headers and the half-open byte span a GET serves."""
    code, start, end = 200, 0, status.size
    etag = httpfields.etag_for(status.sha256, status.size, status.mtime)
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("Accept-Ranges", "bytes"),
        ("Last-Modified", httpfields.format_http_date(status.mtime)),
        ("ETag", etag),
    ]
    if status.sha256 is not None:
        headers.append(("Repr-Digest", httpfields.format_repr_digest(status.sha256)))
    query = environ.get("QUERY_STRING")
    byte_range = parse_qs(query).get("byte_range") if query else None
    wanted = environ.get("HTTP_RANGE")
    if byte_range:
        start, end = httpfields.parse_byte_range(byte_range[-1], status.size)
    elif wanted and environ.get("HTTP_IF_RANGE", etag) == etag:
        span = httpfields.parse_range_header(wanted, status.size)
        if span is not None:
            code, (start, end) = 206, span
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{status.size}"))
    headers.append(("Content-Length", str(end - start)))
    return code, headers, start, end


class ReaderBody:
    """WSGI response body streaming ``remaining`` bytes from a Reader, then closing it."""

    def __init__(self, reader: Reader, remaining: int) -> None:
        self._reader = reader
        self._remaining = remaining

    def __iter__(self) -> Iterator[bytes]:
        while self._remaining > 0:
            chunk = self._reader.read(min(CHUNK_SIZE, self._remaining))
            if not chunk:
                # Committed files never shrink; if one did, end short so the
                # client sees fewer bytes than Content-Length promised.
                raise OSError("file ended before its recorded size")
            self._remaining -= len(chunk)
            yield chunk

    def close(self) -> None:
        """Close the reader (the server calls this even if the client left early)."""
        self._reader.close()


def close_body(body: Iterable[bytes]) -> None:
    """Close a response body that will not be sent (a HEAD answer), releasing its reader."""
    close = getattr(body, "close", None)
    if close is not None:
        close()


def request_path(environ: dict[str, Any]) -> str:
    """Return the request's decoded path, refusing targets that could name something else.

    The id comes from PATH_INFO, which the server derives from the request
    target: a target that is not origin-form (``PUT 12345``, which uWSGI turns
    into the path ``12345``), a protocol we do not speak, or a PATH_INFO that
    is not exactly the target decoded (a front end that merged slashes or
    resolved ``..``) is a 400, so no request reaches a file it did not name.
    """
    protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    if protocol not in PROTOCOLS:
        raise InvalidRequest(
            f"unsupported protocol {protocol[:32]!r}: this server speaks HTTP/1.0 and HTTP/1.1"
        )
    info = environ.get("PATH_INFO") or ""
    path = info or "/"
    # Mounted below a prefix (a site's CherryPy tree), the target names SCRIPT_NAME + PATH_INFO.
    mount = environ.get("SCRIPT_NAME") or ""
    target = environ.get("REQUEST_URI")
    if target is not None:
        raw = target.partition("?")[0]
        scheme, sep, rest = raw.partition("://")
        if sep and scheme.lower() in ("http", "https"):
            # Absolute-form (RFC 9112 3.2.2): the path starts after the authority.
            raw = "/" + rest.partition("/")[2]
        if not raw.startswith("/"):
            raise InvalidRequest(f"the request target must be a path starting with '/', not {raw[:64]!r}")
        if unquote_to_bytes(raw).decode("latin-1") not in (mount + path, mount + info):
            raise InvalidRequest(f"the request target {raw[:64]!r} is not in normal form")
    elif not path.startswith("/"):
        raise InvalidRequest(f"the request target must be a path starting with '/', not {path[:64]!r}")
    return path


def check_request(environ: dict[str, Any]) -> str:
    """Return the request's path after refusing an odd target or ambiguous framing (both adapters)."""
    path = request_path(environ)
    check_framing(environ)
    return path


def check_framing(environ: dict[str, Any]) -> None:
    """Refuse a body whose length is ambiguous before anything reads it.

    waitress (serve) and nginx (in front of uWSGI) decode chunked bodies
    strictly and hand us a Content-Length; only a server that passes the
    framing through shows us Transfer-Encoding. Then a Content-Length beside
    it is a 400 (RFC 9112 6.3: the pair is how requests are smuggled), and a
    chunked body the server does not terminate for us is a 411: uWSGI's own
    HTTP socket reads ``zz`` or an over-long chunk as the end of the body, so
    storing what it returns could replace a good file with a truncated one.
    """
    coding = environ.get("HTTP_TRANSFER_ENCODING") or None
    length = environ.get("CONTENT_LENGTH") or None
    if length is not None and not (
        length.isascii() and length.isdigit() and len(length) <= MAX_LENGTH_DIGITS
    ):
        raise InvalidRequest(f"bad Content-Length: {length[:32]!r}")
    if coding is None:
        return
    if length is not None:
        raise InvalidRequest("a request may carry Content-Length or Transfer-Encoding, not both")
    if coding.strip().lower() != "chunked":
        raise InvalidRequest(
            f"unsupported Transfer-Encoding {coding[:32]!r}: send chunked or a Content-Length"
        )
    if not environ.get("wsgi.input_terminated"):
        raise LengthRequired(
            "this server cannot check chunked framing: send a Content-Length, "
            "or upload through the nginx front end (README, Production)"
        )


def content_length(environ: dict[str, Any]) -> int | None:
    """Return the request's declared body length, None for a chunked body (see check_framing)."""
    return _content_length(RequestHeaders(environ))


def _content_length(headers: RequestHeaders) -> int | None:
    """Return the declared body length (validated by check_framing), or None for a chunked body."""
    raw = headers.get("Content-Length")
    if raw is None or raw == "":
        chunked = bool(headers.get("Transfer-Encoding"))
        return None if chunked else 0
    return int(raw)


class CountedBody:
    """File-like view of a request body that adds every byte read to ``environ[BYTES_IN_KEY]``."""

    def __init__(self, raw: Any, environ: dict[str, Any]) -> None:
        self._raw = raw
        self._environ = environ
        environ.setdefault(BYTES_IN_KEY, 0)

    def read(self, size: int) -> bytes:
        """Return up to ``size`` bytes of the body, counting them."""
        chunk = self._raw.read(size)
        self._environ[BYTES_IN_KEY] += len(chunk)
        return chunk


def body_file(environ: dict[str, Any], length: int | None) -> CountedBody:
    """Return a file-like object with ``read(n)`` over the request body, counting what it reads.

    ``length`` None: a chunked body the server terminates itself (``wsgi.input_terminated``).
    """
    return CountedBody(environ["wsgi.input"], environ)


def copy_body(rfile: Any, length: int | None, sink: Callable[[bytes], Any], limit: int | None = None) -> int:
    """Feed the request body to ``sink`` in chunks; return bytes received.

    A client that disconnects makes the server's read fail or end early;
    either way the caller sees fewer bytes than declared and stores nothing.
    """
    received = 0
    while length is None or received < length:
        want = CHUNK_SIZE if length is None else min(CHUNK_SIZE, length - received)
        try:
            chunk = rfile.read(want)
        except (OSError, ValueError) as exc:
            raise IncompleteUpload(
                f"upload interrupted after {received} bytes ({exc}); nothing was stored"
            ) from exc
        if not chunk:
            break
        received += len(chunk)
        if limit is not None and received > limit:
            raise InvalidRequest(f"request body is over {limit} bytes")
        sink(chunk)
    return received
