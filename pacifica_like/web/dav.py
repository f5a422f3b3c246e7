"""The ``/webdav/`` door: a plain WebDAV namespace of the archive's ids, for the grid.

``/webdav/`` is the collection of every id and ``/webdav/<id>`` a file,
answering GET, HEAD (200 with ``Content-Length``, not Pacifica's 204), PUT
(201 when new, 204 when it replaced a file; ``Last-Modified`` optional),
DELETE (where ``allow_delete``), PROPFIND and OPTIONS, for clients that expect
HTTP's usual HEAD and PUT rather than Pacifica's. The same handlers serve it
as serve ``/<id>`` (``pacifica_like.web.filehandlers``), so the commit rules,
digests and ranges are the same; properties come from
``pacifica_like.web.davprops``. Errors are the file API's JSON.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pacifica_like.core.errors import FileNotInArchive, MethodDisabled
from pacifica_like.web import errors
from pacifica_like.web.davprops import Propfinder, depth_of, options_response
from pacifica_like.web.filehandlers import STATUS_LINES, FileHandlers, Response, close_body

DOOR = "webdav"
DOOR_VERBS = "DELETE, GET, HEAD, OPTIONS, PROPFIND, PUT"


class WebDavDoor:
    """The ``/webdav/`` namespace as a WSGI application over the file API's handlers."""

    def __init__(self, handlers: FileHandlers) -> None:
        self.handlers = handlers
        self.propfinder = Propfinder(handlers.backend)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """Answer one request below ``/webdav``; the caller checked the target and framing."""
        method = environ["REQUEST_METHOD"]
        try:
            code, headers, body = self.answer(method, environ.get("PATH_INFO") or "/", environ)
        except Exception as exc:  # every failure an error document, never a traceback
            environ[errors.ERROR_KEY] = exc
            code, headers, body = errors.error_response(exc, errors.JSON)
        start_response(STATUS_LINES[code], headers)
        if method == "HEAD":
            close_body(body)
            return []
        return body

    def answer(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        """Route ``/webdav``, ``/webdav/`` (the collection) and ``/webdav/<id>``."""
        mount = (environ.get("SCRIPT_NAME") or "") + f"/{DOOR}/"
        rest = path[len(DOOR) + 2 :]
        namespace = self.handlers.settings.server.namespace[1:]
        if namespace and (rest == namespace or rest.startswith(namespace + "/")):
            # /webdav/<namespace>/<id>: the same files, named as the site publishes them.
            mount, rest = mount + namespace + "/", rest[len(namespace) + 1 :]
        if not rest:
            return self._collection(method, mount, environ)
        file_id = self.handlers.file_id("/" + rest)
        if method in ("GET", "HEAD"):
            return self.handlers.get(file_id, environ)
        if method == "PUT":
            return self._put(file_id, environ)
        if method == "DELETE":
            self.handlers.delete(file_id, environ)
            return 204, [("Content-Length", "0")], []
        if method == "PROPFIND":
            depth_of(environ)
            return self.propfinder.file(mount + rest, file_id, self.handlers.propfind_request(environ))
        if method == "OPTIONS":
            return options_response(DOOR_VERBS)
        raise MethodDisabled(f"{method} is not supported on /{DOOR}/<id>", allow=DOOR_VERBS)

    def _collection(self, method: str, mount: str, environ: dict[str, Any]) -> Response:
        if method == "PROPFIND":
            depth = depth_of(environ)
            return self.propfinder.collection(mount, depth, self.handlers.propfind_request(environ))
        if method == "OPTIONS":
            return options_response("OPTIONS, PROPFIND")
        if method in ("GET", "HEAD"):
            raise MethodDisabled(
                f"/{DOOR}/ is a collection: PROPFIND it (Depth: 1) to list the files",
                allow="OPTIONS, PROPFIND",
            )
        raise MethodDisabled(f"{method} is not supported on /{DOOR}/", allow="OPTIONS, PROPFIND")

    def _put(self, file_id: int, environ: dict[str, Any]) -> Response:
        """Store the body: 201 when the id was new, 204 when it replaced a file (RFC 9110 9.3.4)."""
        try:
            self.handlers.backend.status(file_id)
            existed = True
        except FileNotInArchive:
            existed = False
        self.handlers.store(file_id, environ, require_date=False)
        return (204 if existed else 201), [("Content-Length", "0")], []
