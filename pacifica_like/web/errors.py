"""Turn every failure into an HTTP answer: the one place that knows statuses and error bodies.

Our errors (``pacifica_like.core.errors``) carry their status and headers
(``Retry-After``, ``Allow``, ``Content-Range``) as data; anything else is a
500 whose traceback goes to the error log, never to the client. The body's
shape is chosen by mount: ``{"status", "message"}`` JSON on the file API and
the operators' paths, ``application/problem+json`` (RFC 9457) on the
bulk-staging API (``/api``, ``/.well-known``).

Three callers: the WSGI file API (:func:`error_response`), and CherryPy's two
hooks for the CherryPy-served paths (the file resource, probes, bulk API),
configured per mount by :func:`cherrypy_config`: ``request.error_response``
for exceptions raised by handlers, ``error_page.default`` for CherryPy's own
errors (unknown path, wrong verb), which CherryPy may pad with spaces.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import cherrypy

from pacifica_like.core.errors import ArchiveError
from pacifica_like.web import logs

log = logging.getLogger(logs.ERROR_LOGGER)

#: The two error bodies.
JSON = "json"
PROBLEM = "problem"
PROBLEM_TYPE = "application/problem+json"
#: First path segments of the bulk-staging API, whose errors are problem+json.
PROBLEM_MOUNTS = frozenset((".well-known", "api"))
#: What a client learns of a bug: the log has the rest.
INTERNAL_MESSAGE = "internal server error; the server log has the details"
#: environ key: the exception a request failed with (for metrics: why an upload was rejected).
ERROR_KEY = "pacifica_like.error"

Headers = list[tuple[str, str]]
PHRASES = {status.value: status.phrase for status in HTTPStatus}


def shape_for(path: str) -> str:
    """Return the error shape of the mount serving ``path`` (a WSGI PATH_INFO)."""
    return PROBLEM if path[1:].partition("/")[0] in PROBLEM_MOUNTS else JSON


def classify(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """Return (status, message, extra headers) for ``exc``; log server-side failures.

    5xx of ours are logged with their cause; anything not an ArchiveError is a
    bug, logged with its traceback and answered with a message that has none.
    """
    if isinstance(exc, ArchiveError):
        if exc.http_status >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc)
        return exc.http_status, exc.message, dict(exc.headers)
    log.error("unhandled error while serving a request", exc_info=exc)
    return 500, INTERNAL_MESSAGE, {}


def render(shape: str, status: int, message: str) -> tuple[Headers, bytes]:
    """Return the content headers and the body of an error in ``shape``."""
    if shape == PROBLEM:
        document = {
            "type": "about:blank",
            "title": PHRASES.get(status, "Error"),
            "status": status,
            "detail": message,
        }
        content = [("Content-Type", PROBLEM_TYPE), ("Cache-Control", "no-store")]
    else:
        document = {"status": status, "message": message}
        content = [("Content-Type", "application/json")]
    return content, json.dumps(document).encode("utf-8")


def error_response(exc: BaseException, shape: str = JSON) -> tuple[int, Headers, list[bytes]]:
    """Return the (status, headers, body) answer to ``exc`` for a WSGI application."""
    status, message, extra = classify(exc)
    content, body = render(shape, status, message)
    return status, [*content, ("Content-Length", str(len(body))), *extra.items()], [body]


def answer_error(
    environ: dict[str, Any], start_response: Callable[..., Any], exc: BaseException, shape: str
) -> list[bytes]:
    """Answer ``exc`` as a WSGI application's whole response (no body for HEAD), noted for the access log."""
    environ[ERROR_KEY] = exc
    status, headers, body = error_response(exc, shape)
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [] if environ["REQUEST_METHOD"] == "HEAD" else body


# -- CherryPy ---------------------------------------------------------------------------


def _answer_current_error(shape: str) -> None:
    """Set the current CherryPy response to the error being handled (``sys.exc_info``).

    The headers are replaced, not added to: what a handler or the dispatcher
    set for the answer it meant to give (``Allow``, ``Location``) is not true of this one.
    """
    exc = sys.exc_info()[1]
    if exc is None:  # called outside an except block: nothing to describe
        exc = RuntimeError("error_response called with no error")
    request, response = cherrypy.serving.request, cherrypy.serving.response
    environ = getattr(request, "wsgi_environ", None)
    if environ is not None:
        environ[ERROR_KEY] = exc
    status, message, extra = classify(exc)
    content, body = render(shape, status, message)
    response.status = status
    response.headers.clear()
    for name, value in (*content, ("Content-Length", str(len(body))), *extra.items()):
        response.headers[name] = value
    response.body = body


def _page(shape: str, status: str, message: str) -> bytes:
    """Render CherryPy's own error (``status`` is "404 Not Found") in ``shape``."""
    content, body = render(shape, int(status.split()[0]), message)
    headers = cherrypy.serving.response.headers
    for name, value in content:
        headers[name] = value
    return body


def json_error_response() -> None:
    """``request.error_response`` hook: answer the handler's exception as JSON."""
    _answer_current_error(JSON)


def problem_error_response() -> None:
    """``request.error_response`` hook: answer the handler's exception as problem+json."""
    _answer_current_error(PROBLEM)


def json_error_page(status: str, message: str, traceback: str, version: str) -> bytes:
    """``error_page.default``: CherryPy's own errors as JSON."""
    return _page(JSON, status, message)


def problem_error_page(status: str, message: str, traceback: str, version: str) -> bytes:
    """``error_page.default``: CherryPy's own errors as problem+json."""
    return _page(PROBLEM, status, message)


def cherrypy_config(shape: str) -> dict[str, Any]:
    """Return the CherryPy config that renders every error under a mount in ``shape``."""
    response: Callable[[], None] = problem_error_response if shape == PROBLEM else json_error_response
    page: Callable[..., bytes] = problem_error_page if shape == PROBLEM else json_error_page
    return {
        "request.error_response": response,
        "error_page.default": page,
        "request.show_tracebacks": False,
        "tools.log_tracebacks.on": False,
    }
