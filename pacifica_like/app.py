"""Build the WSGI application and render every error as JSON.

This is the one place that turns failures into HTTP: ``ArchiveError.http_status``
for our errors, 500 (logged with its traceback, never sent) for anything else,
and CherryPy's own errors (unknown paths) through the same JSON shape.

The application is the file API (``pacifica_like.rest.FileAPI``), which serves
``/`` and ``/<id>``, in front of a CherryPy application that receives every
other path (today only to answer 404; later the bulk and metrics APIs).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import cherrypy

from backends.base import Backend
from pacifica_like.config import Settings
from pacifica_like.errors import ArchiveError
from pacifica_like.rest import FileAPI, Response, json_response

log = logging.getLogger("pacifica_like")

#: CherryPy config for the mounted fallback app: data, not subclasses.
CHERRYPY_APP_CONFIG: dict[str, Any] = {
    "request.show_tracebacks": False,
    "request.process_request_body": False,
    "tools.encode.on": False,
    "tools.trailing_slash.on": False,
    "tools.log_tracebacks.on": False,
    "tools.log_headers.on": False,
}


def error_response(exc: BaseException) -> Response:
    """Return the JSON response for an exception raised while serving a request."""
    if isinstance(exc, ArchiveError):
        if exc.http_status >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc)
        return json_response(
            exc.http_status,
            {"status": exc.http_status, "message": exc.message},
            list(exc.headers.items()),
        )
    log.error("unhandled error while serving a request", exc_info=exc)
    return json_response(
        500, {"status": 500, "message": "internal server error; the server log has the details"}
    )


def render_http_error(status: str, message: str, traceback: str, version: str) -> str:
    """Render CherryPy's own errors (404 for unknown paths...) in our JSON shape."""
    cherrypy.serving.response.headers["Content-Type"] = "application/json"
    return json.dumps({"status": int(status.split()[0]), "message": message})


class _Nothing:
    """The CherryPy root: no handlers yet, so every path it receives is a JSON 404."""


def build_app(settings: Settings, backend: Backend) -> FileAPI:
    """Return the archive as a WSGI application over ``backend``."""
    config = dict(CHERRYPY_APP_CONFIG)
    config["error_page.default"] = render_http_error
    fallback = cherrypy.Application(_Nothing(), "", {"/": config})
    if settings.cpconfig_file:
        fallback.merge(settings.cpconfig_file)
    return FileAPI(backend, settings, fallback, error_response)
