"""WebDAV properties for the grid (an RFC 4918 subset): PROPFIND and OPTIONS answers.

Grid clients (gfal2 and davix: ``gfal-stat``, ``gfal-ls``, ``davix-ls``,
``gfal-copy``'s checks) learn a file's size and date from PROPFIND, not from
HEAD. Two places answer it:

* the Pacifica door, ``/`` and ``/<id>`` (``pacifica_like.web.filehandlers``):
  PROPFIND and OPTIONS are verbs the peer never had, so adding them leaves
  Pacifica's GET and HEAD as they are;
* the ``/webdav/`` door (``pacifica_like.web.dav``).

This module reads no request body and knows no routes: callers hand it the
body's bytes and the href of what was asked.

Properties: the RFC 4918 live properties a file has (``resourcetype``,
``getcontentlength``, ``getlastmodified``, ``creationdate``, ``getetag``,
``getcontenttype``, ``displayname``), and two that cost a lookup and so come
only when named: ``Checksums`` in dCache's namespace (``adler32=...,md5=...``
as in ``Digest``) and ``locality`` in ours (the Tape REST API's DISK, TAPE,
DISK_AND_TAPE...). A collection listing (Depth 1 of ``/webdav/``) streams one
response element per stored id as the storage lists them, so memory does not
grow with the archive; Depth infinity is refused (``propfind-finite-depth``).
Why not WsgiDAV: docs/decisions/0045-webdav-door.md.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from pacifica_like.core import httpfields
from pacifica_like.core.errors import ArchiveError, FileNotInArchive, Forbidden, InvalidRequest
from pacifica_like.storage.contract import Backend, FileStatus

DAV = "DAV:"
#: dCache's WebDAV namespace; its ``Checksums`` property is what grid tools look for.
DCACHE = "http://www.dcache.org/2013/webdav"
#: Our namespace, for the file's locality.
OURS = "urn:pacifica-like:webdav"
PREFIXES = {DAV: "d", DCACHE: "dc", OURS: "pl"}
#: Properties computed from a file's status (allprop returns these).
STATUS_PROPS = (
    "resourcetype",
    "getcontentlength",
    "getlastmodified",
    "creationdate",
    "getetag",
    "getcontenttype",
    "displayname",
)
CHECKSUMS = (DCACHE, "Checksums")
LOCALITY = (OURS, "locality")
#: A PROPFIND body names a few properties; anything longer is not one.
MAX_PROPFIND_BODY = 64 * 1024
#: Ids whose status and locality a listing looks up together.
LISTING_BATCH = 256
#: OPTIONS on the Pacifica door: its verbs plus the two WebDAV ones.
FILE_DAV_VERBS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PROPFIND, PUT"
ROOT_DAV_VERBS = "GET, HEAD, OPTIONS, PROPFIND"

Name = tuple[str, str]
Headers = list[tuple[str, str]]
Response = tuple[int, Headers, Iterable[bytes]]


def options_response(allow: str) -> Response:
    """Answer OPTIONS: the verbs and WebDAV class 1 (no locks)."""
    return 200, [("DAV", "1"), ("Allow", allow), ("MS-Author-Via", "DAV"), ("Content-Length", "0")], []


class PropfindRequest:
    """What a PROPFIND asks for: every property (``allprop``, also an empty body) or named ones."""

    def __init__(self, names: tuple[Name, ...] | None, names_only: bool = False) -> None:
        #: None: allprop (plus any ``include``d names in ``extra``).
        self.names = names
        self.names_only = names_only
        self.extra: tuple[Name, ...] = ()

    @classmethod
    def parse(cls, raw: bytes) -> PropfindRequest:
        """Parse a request body (at most :data:`MAX_PROPFIND_BODY` bytes); a malformed one is a 400."""
        if not raw.strip():
            return cls(None)
        try:
            root = ElementTree.fromstring(raw)
        except ElementTree.ParseError as exc:
            raise InvalidRequest(f"PROPFIND body is not XML: {exc}") from None
        if root.tag != f"{{{DAV}}}propfind":
            raise InvalidRequest("PROPFIND body must be a DAV: propfind element")
        prop = root.find(f"{{{DAV}}}prop")
        if prop is not None:
            return cls(tuple(_split(child.tag) for child in prop))
        if root.find(f"{{{DAV}}}propname") is not None:
            return cls(None, names_only=True)
        request = cls(None)
        include = root.find(f"{{{DAV}}}include")
        if include is not None:
            request.extra = tuple(_split(child.tag) for child in include)
        return request

    def wants(self, name: Name) -> bool:
        """Say whether an expensive property was named (allprop leaves them out)."""
        return name in (self.names or ()) or name in self.extra


def _split(tag: str) -> Name:
    namespace, _, local = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
    return namespace, local


def depth_of(environ: dict[str, Any]) -> str:
    """Return the request's Depth: ``0``, ``1`` or ``infinity`` (RFC 4918's default when absent)."""
    depth = (environ.get("HTTP_DEPTH") or "infinity").strip().lower()
    if depth not in ("0", "1", "infinity"):
        raise InvalidRequest(f"Depth must be 0, 1 or infinity, not {depth[:16]!r}")
    return depth


class Propfinder:
    """Build multistatus answers for files and the flat collection of ids, from one backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def file(self, href: str, file_id: int, request: PropfindRequest) -> Response:
        """Answer PROPFIND of one file (any Depth: a file has no members)."""
        status = self.backend.status(file_id)
        extras = self._extras(request, [(file_id, status)])
        entry = self._file_entry(href, file_id, status, request, extras.get(file_id, {}))
        return _multistatus([entry])

    def collection(self, href: str, depth: str, request: PropfindRequest) -> Response:
        """Answer PROPFIND of the collection of every id, streaming its members at Depth 1."""
        if depth == "infinity":
            raise Forbidden(
                "PROPFIND with Depth: infinity is refused on a collection of every file (send Depth: 1); "
                "propfind-finite-depth"
            )
        entries = [self._collection_entry(href, request)]
        if depth == "0":
            return _multistatus(entries)
        return _multistatus(itertools.chain(entries, self._members(href, request)), stream=True)

    def _members(self, href: str, request: PropfindRequest) -> Iterator[bytes]:
        """Yield a response element per stored file, looked up a batch at a time."""
        ids = self.backend.list_ids()
        while batch := list(itertools.islice(ids, LISTING_BATCH)):
            found = []
            for file_id in batch:
                try:
                    found.append((file_id, self.backend.status(file_id)))
                except FileNotInArchive:
                    continue  # deleted since it was listed
            extras = self._extras(request, found)
            for file_id, status in found:
                yield self._file_entry(f"{href}{file_id}", file_id, status, request, extras.get(file_id, {}))

    def _extras(
        self, request: PropfindRequest, files: list[tuple[int, FileStatus]]
    ) -> dict[int, dict[Name, str]]:
        """Look up the properties that cost more than a status: checksums and locality."""
        extras: dict[int, dict[Name, str]] = {file_id: {} for file_id, _ in files}
        if request.wants(LOCALITY):
            for file_id, locality in self.backend.localities([f for f, _ in files]).items():
                extras.setdefault(file_id, {})[LOCALITY] = locality
        if request.wants(CHECKSUMS):
            for file_id, status in files:
                try:
                    recorded = self.backend.checksums(file_id)
                except ArchiveError:
                    continue
                if status.sha256 is None or recorded.get("sha256") == status.sha256:
                    kept = [
                        (name, recorded[name]) for name in ("adler32", "md5", "sha256") if name in recorded
                    ]
                    extras[file_id][CHECKSUMS] = httpfields.format_digest(kept)
        return extras

    def _file_entry(
        self, href: str, file_id: int, status: FileStatus, request: PropfindRequest, extras: dict[Name, str]
    ) -> bytes:
        values: dict[Name, str] = {
            (DAV, "resourcetype"): "",
            (DAV, "getcontentlength"): str(status.size),
            (DAV, "getlastmodified"): httpfields.format_http_date(status.mtime),
            (DAV, "creationdate"): datetime.fromtimestamp(int(status.ctime), UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            (DAV, "getetag"): escape(httpfields.etag_for(status.sha256, status.size, status.mtime)),
            (DAV, "getcontenttype"): "application/octet-stream",
            (DAV, "displayname"): str(file_id),
        }
        values.update((name, escape(value)) for name, value in extras.items())
        return _response(href, values, request)

    def _collection_entry(self, href: str, request: PropfindRequest) -> bytes:
        values: dict[Name, str] = {
            (DAV, "resourcetype"): "<d:collection/>",
            (DAV, "displayname"): escape(href.rstrip("/").rpartition("/")[2] or "/"),
            (DAV, "getlastmodified"): httpfields.format_http_date(time.time()),
        }
        return _response(href, values, request)


def _response(href: str, values: dict[Name, str], request: PropfindRequest) -> bytes:
    """One ``d:response``: found properties under 200, named but unknown ones under 404."""
    if request.names is None:
        shown = {name: value for name, value in values.items() if name[0] == DAV or name in request.extra}
        missing: list[Name] = []
    else:
        shown = {name: values[name] for name in request.names if name in values}
        missing = [name for name in request.names if name not in values]
    parts = [f"<d:response><d:href>{escape(href)}</d:href>"]
    if shown:
        props = "".join(_element(name, "" if request.names_only else value) for name, value in shown.items())
        parts.append(f"<d:propstat><d:prop>{props}</d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat>")
    if missing:
        props = "".join(_element(name, "") for name in missing)
        parts.append(
            f"<d:propstat><d:prop>{props}</d:prop><d:status>HTTP/1.1 404 Not Found</d:status></d:propstat>"
        )
    parts.append("</d:response>")
    return "".join(parts).encode("utf-8")


def _element(name: Name, value: str) -> str:
    namespace, local = name
    prefix = PREFIXES.get(namespace)
    if prefix is None:  # a property in a namespace we do not know: declared where it is used
        return f'<x:{local} xmlns:x="{escape(namespace)}"/>'
    return f"<{prefix}:{local}>{value}</{prefix}:{local}>" if value else f"<{prefix}:{local}/>"


_OPEN = (
    '<?xml version="1.0" encoding="utf-8"?>\n<d:multistatus '
    + " ".join(f'xmlns:{prefix}="{namespace}"' for namespace, prefix in PREFIXES.items())
    + ">"
).encode("utf-8")
_CLOSE = b"</d:multistatus>\n"


def _multistatus(entries: Iterable[bytes], stream: bool = False) -> Response:
    """Return a 207 with ``entries``; streamed (no Content-Length) for a listing."""
    headers: Headers = [("Content-Type", 'application/xml; charset="utf-8"')]
    if not stream:
        body = b"".join([_OPEN, *entries, _CLOSE])
        return 207, [*headers, ("Content-Length", str(len(body)))], [body]
    return 207, headers, itertools.chain([_OPEN], entries, [_CLOSE])
