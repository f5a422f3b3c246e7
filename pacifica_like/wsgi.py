"""uWSGI entry point: ``uwsgi --module pacifica_like.wsgi``.

Settings come from PAI_* variables and ``PAI_CONFIG``. Under uWSGI they are
validated when the master imports this module, so a bad setting stops the
server at start naming the file and key; the backend itself is built lazily in
each worker after the fork, so no descriptor or connection is shared between
processes.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from pacifica_like.config import Settings, load_settings


class LazyApplication:
    """A WSGI callable that builds the real app on its first request in each process."""

    def __init__(self, settings_factory: Callable[[], Settings] = load_settings) -> None:
        self._settings_factory = settings_factory
        self._app: Callable[..., Iterable[bytes]] | None = None
        self._lock = threading.Lock()

    def load(self) -> Callable[..., Iterable[bytes]]:
        """Build (once) and return the CherryPy application."""
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from backends import factory
                    from pacifica_like.app import build_app

                    settings = self._settings_factory()
                    self._app = build_app(settings, factory.create(settings))
        return self._app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Serve one request."""
        return (self._app or self.load())(environ, start_response)


def _under_uwsgi() -> bool:
    return "uwsgi" in sys.modules


application = LazyApplication()

if _under_uwsgi():  # pragma: no cover - exercised by the uWSGI live tests
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import cherrypy

    # uWSGI logs each request itself; CherryPy's access log would double it.
    cherrypy.config.update({"log.screen": False, "engine.autoreload.on": False, "checker.on": False})
    logging.getLogger("cherrypy.access").propagate = False
    from backends import factory

    factory.check(load_settings())
