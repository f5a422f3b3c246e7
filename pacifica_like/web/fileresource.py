"""The file API as a CherryPy resource: one method per verb, dispatched by ``MethodDispatcher``.

The archive as its users describe it, and as the peer was mounted: ``/`` and
``/<id>`` answer GET, HEAD, PUT, POST, PATCH and DELETE. ``pacifica-like
serve`` mounts it; a site can mount it as the root of an application in its
own CherryPy tree::

    cherrypy.tree.mount(FileResource(backend, settings), "/archive", DISPATCH_CONFIG)

Every verb calls the shared handlers (``pacifica_like.web.filehandlers``), as
the WSGI adapter does, so the wire is the same through both. The resource
carries its own CherryPy config (``_cp_config``): errors as JSON through
``pacifica_like.web.errors``, the request target and framing checked before
any handler (``check_request``), the body left unread for the handler to
stream, and GET bodies streamed (``response.stream``) from the reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import cherrypy

from pacifica_like.core.config import Settings
from pacifica_like.gateway import leftovers
from pacifica_like.storage.contract import Backend
from pacifica_like.web import errors
from pacifica_like.web.filehandlers import (
    STATUS_LINES,
    FileHandlers,
    check_request,
    close_body,
    unsupported_method,
)

#: The application config a mount needs: the dispatcher is chosen before the resource is
#: found, so it cannot travel in the resource's own ``_cp_config``.
DISPATCH_CONFIG: dict[str, dict[str, Any]] = {"/": {"request.dispatch": cherrypy.dispatch.MethodDispatcher()}}


def _check_request() -> None:
    """``on_start_resource`` hook: refuse an odd target or ambiguous framing before the handler runs."""
    check_request(cherrypy.serving.request.wsgi_environ)


def _method_not_allowed(status: str, message: str, traceback: str, version: str) -> bytes:
    """``error_page.405``: the dispatcher's 405 for a verb the resource lacks, in the file API's words."""
    request, headers = cherrypy.serving.request, cherrypy.serving.response.headers
    refusal = unsupported_method(request.method, request.path_info)
    headers.pop("Server", None)  # CherryPy's default; the file API's answers name no framework
    for name, value in refusal.headers.items():
        headers[name] = value
    return errors.json_error_page(status, refusal.message, traceback, version)


def _chunks(body: Iterable[bytes]) -> Iterator[bytes]:
    """Yield ``body``'s chunks; close it however the response ends (CherryPy closes this generator)."""
    try:
        yield from body
    finally:
        close_body(body)


class FileResource:
    """``/`` and ``/<id>`` of one archive, a method per verb.

    Mount it as an application's root with :data:`DISPATCH_CONFIG`. The ids
    come from the checked request path, not from CherryPy's virtual path
    (which drops empty segments: ``//1`` must be a 400, not file 1); query
    parameters arrive as keywords and are ignored (handlers read the query they
    use), and ``self`` is positional-only so ``?self=1`` cannot collide with it.
    """

    _cp_config: dict[str, Any] = {
        **errors.cherrypy_config(errors.JSON),
        "error_page.405": _method_not_allowed,
        "hooks.on_start_resource": _check_request,
        "request.process_request_body": False,
        # Latin-1 decodes any query string, so a stray %ff reaches the handler, as in the WSGI adapter.
        "request.query_string_encoding": "latin-1",
        "tools.encode.on": False,
        "tools.trailing_slash.on": False,
        "tools.log_headers.on": False,
    }

    def __init__(
        self, backend: Backend, settings: Settings, stage: Callable[[int], bool] | None = None
    ) -> None:
        # Mounted alone, the resource still keeps the catalog's inventory (build_app's is reused).
        leftovers.keep_inventory(backend, settings.archive.catalog)
        self.handlers = FileHandlers(backend, settings, stage)
        # Exposed per instance, not per class: a class attribute would expose the class itself
        # at /__class__, where the dispatcher would call a verb without an instance.
        self.exposed = True

    def GET(self, /, *segments: str, **query: str) -> Iterable[bytes]:  # noqa: N802 (the verb's name)
        """Stream a file (``/<id>``), or answer the liveness check (``/``)."""
        return self._answer("GET")

    def HEAD(self, /, *segments: str, **query: str) -> Iterable[bytes]:  # noqa: N802 (the verb's name)
        """Report a file's status in Pacifica's headers."""
        return self._answer("HEAD")

    def PUT(self, /, *segments: str, **query: str) -> Iterable[bytes]:  # noqa: N802 (the verb's name)
        """Store the request body under the id, atomically."""
        return self._answer("PUT")

    def POST(self, /, *segments: str, **query: str) -> Iterable[bytes]:  # noqa: N802 (the verb's name)
        """Stage the file to disk."""
        return self._answer("POST")

    def PATCH(self, /, *segments: str, **query: str) -> Iterable[bytes]:  # noqa: N802 (the verb's name)
        """Move a server-side file into the archive."""
        return self._answer("PATCH")

    def DELETE(self, /, *segments: str, **query: str) -> Iterable[bytes]:  # noqa: N802 (the verb's name)
        """Remove the file, where the deployment allows it."""
        return self._answer("DELETE")

    def PROPFIND(self, /, *segments: str, **query: str) -> Iterable[bytes]:  # noqa: N802 (the verb's name)
        """List a file's WebDAV properties (``/<id>``), or the collection of every id (``/``)."""
        return self._answer("PROPFIND")

    def OPTIONS(self, /, *segments: str, **query: str) -> Iterable[bytes]:  # noqa: N802 (the verb's name)
        """Name the verbs ``/`` or ``/<id>`` takes, and WebDAV class 1."""
        return self._answer("OPTIONS")

    def _answer(self, verb: str) -> Iterable[bytes]:
        """Run the shared handler for ``verb`` and hand its answer to CherryPy as it is."""
        request = cherrypy.serving.request
        environ = request.wsgi_environ
        path = environ.get("PATH_INFO") or "/"
        if request.method != verb:  # the dispatcher upper-cases the verb; HTTP methods are case-sensitive
            raise unsupported_method(request.method, path)
        code, headers, body = self.handlers.answer(verb, path, environ)
        response = cherrypy.serving.response
        response.status = STATUS_LINES[code]
        # Exactly the handler's headers: not CherryPy's defaults (text/html, its Server) nor the
        # dispatcher's Allow.
        response.headers.clear()
        for name, value in headers:
            response.headers[name] = value
        if isinstance(body, list):
            return body
        response.stream = True
        return _chunks(body)
