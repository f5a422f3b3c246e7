"""The operators' endpoints, mounted on the CherryPy application: ``/metrics`` and ``/ready``.

``GET /`` stays the cheap liveness check (the process answers). ``GET /ready``
is the readiness check: it asks the backend whether its storage and catalog
can be reached now (``Backend.check_ready()``, plus any other check the app
registers) and answers 200, or 503 naming what failed. ``GET /metrics`` is the
Prometheus scrape (``pacifica_like.web.metrics``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

import cherrypy

from pacifica_like.web.authz import is_admin
from pacifica_like.web.metrics import Metrics

log = logging.getLogger("pacifica_like.error")

ReadyCheck = Callable[[], None]


class ProbesRoot:
    """CherryPy root: plain handler methods; every other path under it is a JSON 404."""

    def __init__(
        self, metrics: Metrics, ready_checks: Sequence[tuple[str, ReadyCheck]], backend: str
    ) -> None:
        self._metrics = metrics
        self._ready_checks = list(ready_checks)
        self._backend = backend

    @cherrypy.expose
    @cherrypy.tools.allow(methods=["GET", "HEAD"])
    def metrics(self) -> bytes:
        """Answer a Prometheus scrape (text format, or OpenMetrics when the scraper asks for it)."""
        body, content_type = self._metrics.exposition(cherrypy.request.headers.get("Accept"))
        cherrypy.response.headers["Content-Type"] = content_type
        cherrypy.response.headers["Cache-Control"] = "no-store"
        return body

    @cherrypy.expose
    @cherrypy.tools.allow(methods=["GET", "HEAD"])
    def ready(self) -> bytes:
        """Run every readiness check: 200 ``{"status": "ready"}``, or 503 with each failure's reason."""
        checks: dict[str, str] = {}
        for name, check in self._ready_checks:
            try:
                check()
            except Exception as exc:  # any failure means not ready; its message is the reason
                checks[name] = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                log.warning("not ready: %s: %s", name, checks[name])
            else:
                checks[name] = "ok"
        failed = [f"{name}: {reason}" for name, reason in checks.items() if reason != "ok"]
        document: dict[str, object] = {"status": "not ready" if failed else "ready"}
        if failed:
            cherrypy.response.status = 503
        # The checks describe the installation: for admins only; anyone may learn ready or not.
        if is_admin(cherrypy.request.wsgi_environ):
            document["backend"] = self._backend
            if failed:
                document["reason"] = "; ".join(failed)
            document["checks"] = checks
        cherrypy.response.headers["Content-Type"] = "application/json"
        cherrypy.response.headers["Cache-Control"] = "no-store"
        return json.dumps(document).encode("utf-8")
