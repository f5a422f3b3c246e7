"""Build the WSGI application and render every error as JSON.

This is the one place that turns failures into HTTP: ``ArchiveError.http_status``
for our errors, 500 (logged with its traceback, never sent) for anything else,
and CherryPy's own errors (unknown paths) through the same JSON shape.

The application is the file API (``pacifica_like.web.fileapi.FileAPI``), which serves
``/`` and ``/<id>``, in front of a CherryPy application that receives the
operators' paths (``/metrics``, ``/ready``: ``pacifica_like.web.probes``) and the
bulk-staging API (``/.well-known``, ``/api``: ``pacifica_like.web.bulkapi``), all
wrapped by ``pacifica_like.web.observe`` (request ids, access log, metrics).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import cherrypy

from pacifica_like import __version__
from pacifica_like.core.config import Settings
from pacifica_like.core.errors import ArchiveError
from pacifica_like.gateway import leftovers
from pacifica_like.gateway.inventory import with_inventory
from pacifica_like.storage.contract import Backend
from pacifica_like.web import bulkapi as bulk_api
from pacifica_like.web import logs
from pacifica_like.web.fileapi import FileAPI, Response, json_response
from pacifica_like.web.metrics import Metrics
from pacifica_like.web.observe import ObservedApp
from pacifica_like.web.probes import ProbesRoot

log = logging.getLogger(logs.ERROR_LOGGER)
#: First path segments served by the CherryPy application (``ProbesRoot``'s handlers).
PROBE_PATHS = frozenset(("metrics", "ready"))

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


def build_app(settings: Settings, backend: Backend) -> ObservedApp:
    """Return the archive as a WSGI application over ``backend``.

    Also routes the access and error logs to stderr (``pacifica_like.web.logs``).
    Build it in the process that serves: uWSGI workers build theirs after the fork.
    """
    storage = backend
    # With the catalog on, every PUT, PATCH and DELETE is recorded in its inventory (for audits).
    backend = with_inventory(backend, settings.archive.catalog)
    # Probes ask the storage backend itself: the inventory wrapper only records changes.
    ready_checks = [("storage", storage.check_ready)]
    inventory = getattr(backend, "inventory", None)
    sources = [("backend", storage.metrics_snapshot)]
    if inventory is not None:
        ready_checks.append(("catalog", inventory.check_ready))
        sources.append(("catalog", backend.audit_metrics))
    info = {"version": __version__, "backend": storage.name}
    metrics = Metrics(sources, info)
    config = dict(CHERRYPY_APP_CONFIG)
    config["error_page.default"] = render_http_error
    root = ProbesRoot(metrics, ready_checks, storage.name)
    app_config: dict[str, dict[str, Any]] = {"/": config}
    # The bulk-staging API (its store is the catalog database); it resolves files on the storage itself.
    bulk_api.mount(root, app_config, settings, storage)
    fallback = cherrypy.Application(root, "", app_config)
    # Our access log has these requests too; CherryPy's own line would print them twice.
    fallback.log.access_log.propagate = False
    if settings.cpconfig_file:
        fallback.merge(settings.cpconfig_file)
    fallback_names = PROBE_PATHS | bulk_api.PATHS
    api = FileAPI(backend, settings, fallback, error_response, fallback_names=fallback_names)
    logs.install(settings.server.access_log)
    if inventory is not None:
        # Temp files and markers of uploads whose process died (a kill -9): removed, and logged.
        leftovers.sweep_at_start(storage, inventory)
    return ObservedApp(api, metrics, fallback_names, access_log=settings.server.access_log != "off")
