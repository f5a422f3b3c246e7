"""Build the WSGI application: the file API, the operators' paths and the bulk API, observed.

The file API (``/``, ``/<id>``) is served by one of two thin adapters over
the same handlers (``pacifica_like.web.filehandlers``): the plain WSGI
``FileAPI`` (what uWSGI runs) or the CherryPy ``FileResource`` under
``MethodDispatcher`` (``file_api="cherrypy"``, what ``pacifica-like serve``
mounts unless ``[server] file_api = wsgi``). The
other paths (``/metrics``, ``/ready``: ``pacifica_like.web.probes``; the
bulk-staging API ``/.well-known``, ``/api``: ``pacifica_like.web.bulkapi``)
are a CherryPy application beside it; the WebDAV door ``/webdav/``
(``pacifica_like.web.dav``) is a WSGI application in front of both. ``pacifica_like.web.errors`` renders
every error, JSON or problem+json by mount; ``pacifica_like.web.observe``
wraps it all (request ids, access log, metrics).
"""

from __future__ import annotations

from typing import Any

import cherrypy

from pacifica_like import __version__
from pacifica_like.bulk.stager import ScheduledStager
from pacifica_like.core.config import Settings
from pacifica_like.gateway import leftovers
from pacifica_like.gateway.inventory import attach_inventory
from pacifica_like.identity.access import Authenticator
from pacifica_like.storage.contract import Backend, LocatesOnTape
from pacifica_like.web import bulkapi as bulk_api
from pacifica_like.web import errors, logs
from pacifica_like.web.authz import Guard
from pacifica_like.web.dav import DOOR, WebDavDoor
from pacifica_like.web.fileapi import FileAPI, MountSplit, Namespace
from pacifica_like.web.filehandlers import FileHandlers
from pacifica_like.web.fileresource import DISPATCH_CONFIG, FileResource
from pacifica_like.web.metrics import Metrics
from pacifica_like.web.observe import ObservedApp
from pacifica_like.web.probes import ProbesRoot

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


#: The two adapters of the file API (``build_app(file_api=...)``).
FILE_APIS = ("wsgi", "cherrypy")


def build_app(settings: Settings, backend: Backend, file_api: str = "wsgi") -> ObservedApp:
    """Return the archive as a WSGI application over ``backend``.

    ``file_api``: ``"wsgi"`` serves the file API with the plain WSGI adapter,
    ``"cherrypy"`` with the MethodDispatcher resource (same handlers, same wire).
    ``pacifica-like serve`` passes ``[server] file_api``; uWSGI and in-process users get the fast one.
    Also routes the access and error logs to stderr (``pacifica_like.web.logs``).
    Build it in the process that serves: uWSGI workers build theirs after the fork.
    """
    storage = backend
    # With the catalog on, every PUT, PATCH and DELETE is recorded in its inventory (for audits):
    # a guard on the backend's storage events.
    inventory = attach_inventory(backend, settings.archive.catalog)
    ready_checks = [("storage", storage.check_ready)]
    sources = [("backend", storage.metrics_snapshot)]
    if inventory is not None:
        ready_checks.append(("catalog", inventory.check_ready))
        sources.append(("catalog", inventory.audit_metrics))
    info = {"version": __version__, "backend": storage.name}
    metrics = Metrics(sources, info)
    if file_api not in FILE_APIS:
        raise ValueError(f"file_api must be one of {', '.join(FILE_APIS)}, not {file_api!r}")
    config = {**CHERRYPY_APP_CONFIG, **errors.cherrypy_config(errors.JSON)}
    root = ProbesRoot(metrics, ready_checks, storage.name)
    app_config: dict[str, dict[str, Any]] = {"/": config}
    # The bulk-staging API (its store is the catalog database); it resolves files on the storage itself.
    bulk = bulk_api.mount(root, app_config, settings, storage)
    # POST /<id> queues its recall for the running scheduler (drive caps and tape order hold for it).
    on_tape = isinstance(storage, LocatesOnTape)
    stage = (
        ScheduledStager(storage, bulk.store, settings.tape) if settings.archive.catalog and on_tape else None
    )
    fallback = cherrypy.Application(root, "", app_config)
    # Our access log has these requests too; CherryPy's own line would print them twice.
    fallback.log.access_log.propagate = False
    if settings.cpconfig_file:
        fallback.merge(settings.cpconfig_file)
    fallback_names = PROBE_PATHS | bulk_api.PATHS
    api: FileAPI | MountSplit | Guard | Namespace
    if file_api == "cherrypy":
        files = cherrypy.Application(FileResource(backend, settings, stage), "", DISPATCH_CONFIG)
        files.log.access_log.propagate = False
        # ObservedApp logs every request; CherryPy would format its own line per request for nothing
        # (a fifth of the resource's cost on a 4 KiB GET).
        files.log.access = lambda: None
        # CherryPy's internal redirector copies the environ per request; without it the handlers'
        # notes (bytes received, the error) reach ObservedApp. The resource never redirects.
        pipeline = files.wsgiapp.pipeline
        files.wsgiapp.pipeline = [(name, part) for name, part in pipeline if name != "InternalRedirector"]
        api = MountSplit(files, fallback, fallback_names)
    else:
        api = FileAPI(FileHandlers(backend, settings, stage), fallback, fallback_names=fallback_names)
    # The grid's WebDAV door beside the file API, over the same handlers (pacifica_like.web.dav).
    api = MountSplit(api, WebDavDoor(FileHandlers(backend, settings, stage)), (DOOR,))
    # Who may do what (WLCG tokens, service tokens, anonymous), decided before any handler runs.
    api = Guard(
        api, Authenticator(settings), backend, settings.server.namespace, settings.server.trusted_proxies
    )
    if settings.server.namespace:
        api = Namespace(api, settings.server.namespace)
    logs.install(settings.server.access_log)
    if inventory is not None:
        # Temp files and markers of uploads whose process died (a kill -9): removed, and logged.
        leftovers.sweep_at_start(storage, inventory.catalog)
    return ObservedApp(api, metrics, fallback_names | {DOOR}, access_log=settings.server.access_log != "off")
