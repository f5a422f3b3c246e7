"""The file API as a plain WSGI application: the fast adapter uWSGI serves.

It answers ``/`` and ``/<id>`` itself through the shared handlers
(``pacifica_like.web.filehandlers``) except paths whose first segment is in
``fallback_names``, which go to the CherryPy application given as
``fallback`` (probes, bulk API). Why not a CherryPy handler here: the
framework's per-request pipeline costs more than the whole GET of a small
file (docs/decisions/0010-file-api-plain-wsgi.md has the measurements); the CherryPy resource
(``pacifica_like.web.fileresource``) serves the same handlers for sites that
mount it in their own tree. Errors are rendered by ``pacifica_like.web.errors``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pacifica_like.web import errors
from pacifica_like.web.filehandlers import STATUS_LINES, FileHandlers, check_request, close_body

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class FileAPI:
    """WSGI application serving the archive's files through ``handlers``; other mounts to ``fallback``."""

    def __init__(self, handlers: FileHandlers, fallback: WSGIApp, fallback_names: Iterable[str] = ()) -> None:
        self.handlers = handlers
        self.fallback = fallback
        self.fallback_names = frozenset(fallback_names)

    @property
    def backend(self) -> Any:
        """The storage backend the handlers serve (tools and tests reach it through the app)."""
        return self.handlers.backend

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Route one request: ``/`` and ``/<segment>`` here, the rest to the fallback."""
        method = environ["REQUEST_METHOD"]
        try:
            path = check_request(environ)
            if path[1:].partition("/")[0] in self.fallback_names:
                return self.fallback(environ, start_response)
            code, headers, body = self.handlers.answer(method, path, environ)
        except Exception as exc:  # every failure becomes an error document, never a traceback
            environ[errors.ERROR_KEY] = exc
            code, headers, body = errors.error_response(
                exc, errors.shape_for(environ.get("PATH_INFO") or "/")
            )
        start_response(STATUS_LINES[code], headers)
        if method == "HEAD":
            close_body(body)
            return []
        return body


class Namespace:
    """Serve the file API below a path prefix too: ``<namespace>/<id>`` is ``/<id>`` (``[server] namespace``).

    The prefix moves from PATH_INFO to SCRIPT_NAME, as a mount below a prefix
    would have it, so the handlers see ``/<id>``, the target check compares the
    whole path, and PROPFIND's hrefs keep the prefix. Other paths pass as they are.
    """

    def __init__(self, app: WSGIApp, namespace: str) -> None:
        self.app = app
        self.namespace = namespace

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Strip the namespace from a path below it, then serve."""
        path = environ.get("PATH_INFO") or "/"
        namespace = self.namespace
        if path.startswith(namespace) and path[len(namespace) : len(namespace) + 1] in ("", "/"):
            environ["SCRIPT_NAME"] = (environ.get("SCRIPT_NAME") or "") + namespace
            environ["PATH_INFO"] = path[len(namespace) :] or "/"
        return self.app(environ, start_response)


class MountSplit:
    """WSGI application sending the ``fallback_names`` mounts to ``fallback``, the rest to ``files``.

    What :class:`FileAPI` does for its own handlers, for a file API that is
    an application of its own (the CherryPy resource): the request target and
    framing are checked here for the fallback's paths; the file application
    checks its own.
    """

    def __init__(self, files: WSGIApp, fallback: WSGIApp, fallback_names: Iterable[str]) -> None:
        self.files = files
        self.fallback = fallback
        self.fallback_names = frozenset(fallback_names)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Route one request by its first path segment."""
        raw = environ.get("PATH_INFO") or "/"
        if raw[1:].partition("/")[0] not in self.fallback_names:
            return self.files(environ, start_response)
        try:
            check_request(environ)
        except Exception as exc:
            return errors.answer_error(environ, start_response, exc, errors.shape_for(raw))
        return self.fallback(environ, start_response)
