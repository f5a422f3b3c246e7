"""uWSGI entry point: ``uwsgi --module pacifica_like.wsgi``.

Settings come from PAI_* variables and ``PAI_CONFIG``. Under uWSGI they are
validated when the master imports this module, so a bad setting stops the
server at start naming the file and key; the backend itself is built lazily in
each worker after the fork, so no descriptor or connection is shared between
processes.

The master also chooses the directory where workers keep their Prometheus
counters (``[server] metrics_dir`` or ``PROMETHEUS_MULTIPROC_DIR``, else a new
private temp directory), empties it, and exports it as ``PROMETHEUS_MULTIPROC_DIR``
before anything imports prometheus_client, which reads it once at import.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any

from pacifica_like.core.config import ConfigError, Settings, load_settings

#: Name prefix of the directories the uWSGI master makes when no metrics_dir is configured.
METRICS_TEMP_PREFIX = "pacifica-like-metrics-"


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
                    from pacifica_like.storage import registry
                    from pacifica_like.web.app import build_app

                    settings = self._settings_factory()
                    # The measured fast adapter, whatever [server] file_api says (a serve setting).
                    self._app = build_app(settings, registry.create(settings), file_api="wsgi")
        return self._app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Serve one request."""
        return (self._app or self.load())(environ, start_response)


def _under_uwsgi() -> bool:
    return "uwsgi" in sys.modules


def prepare_metrics_dir(settings: Settings, in_master: bool, processes: int) -> str:
    """Choose, prepare and export the directory uWSGI workers share for Prometheus counters.

    ``in_master``: this import runs in the uWSGI master, before it forks the
    workers (without ``--lazy-apps``); only then is the directory emptied of a
    previous run's files, and only then may it be a fresh temp directory, since
    every worker inherits the choice.
    """
    directory = settings.server.metrics_dir
    if directory is None:
        if not in_master and processes > 1:
            raise ConfigError(
                "under uWSGI --lazy-apps every worker imports the app itself: set [server] metrics_dir "
                "(or PROMETHEUS_MULTIPROC_DIR) to a directory they share, or /metrics would count one worker"
            )
        directory = make_metrics_dir()
    else:
        os.makedirs(directory, exist_ok=True)
        if in_master:
            clear_metrics_dir(directory)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def clear_metrics_dir(directory: str) -> int:
    """Delete the per-process files a previous server left in ``directory``; return how many.

    Counters restart at zero with the server, as Prometheus expects of a restarted target.
    """
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(directory), "*.db")):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def make_metrics_dir(parent: str | None = None) -> str:
    """Create a private directory for this server's metrics files; sweep dead servers' ones.

    Named ``pacifica-like-metrics-<pid>-<random>`` after the master: the uWSGI
    master runs no exit hooks, so a directory whose pid no longer runs is a
    leftover, removed by the next server that starts.
    """
    parent = parent or tempfile.gettempdir()
    for leftover in glob.glob(os.path.join(glob.escape(parent), METRICS_TEMP_PREFIX + "*")):
        pid = os.path.basename(leftover)[len(METRICS_TEMP_PREFIX) :].split("-")[0]
        try:
            mine = os.lstat(leftover).st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{METRICS_TEMP_PREFIX}{os.getpid()}-", dir=parent)


def uwsgi_addresses(options: dict[str, Any]) -> list[str]:
    """Return the TCP addresses uWSGI listens on (http, https, socket, http-socket), unix sockets left out."""
    found = []
    for name in ("http", "https", "socket", "http-socket", "uwsgi-socket", "shared-socket"):
        values = options.get(name)
        for value in values if isinstance(values, list) else [values]:
            if value is None:
                continue
            text = value.decode() if isinstance(value, bytes) else str(value)
            address = text.split(",")[0]
            if address.startswith(("/", "@", "unix:")) or ":" not in address:
                continue
            found.append(address)
    return found


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


application = LazyApplication()

if _under_uwsgi():  # pragma: no cover - exercised by the uWSGI live tests
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uwsgi

    _settings = load_settings()
    # Before anything imports prometheus_client: it picks its mode from this variable at import.
    prepare_metrics_dir(_settings, in_master=uwsgi.worker_id() == 0, processes=uwsgi.numproc)
    from pacifica_like.web import metrics

    metrics.identify_processes_by(uwsgi.worker_id)
    import cherrypy

    # Our access log (pacifica_like.web.logs) has every request; CherryPy's would double the probes'.
    cherrypy.config.update({"log.screen": False, "engine.autoreload.on": False, "checker.on": False})
    logging.getLogger("cherrypy.access").propagate = False
    from pacifica_like.identity.access import check_exposure
    from pacifica_like.storage import registry

    # Without identity, anyone reaching a TCP address could change the archive: loopback only.
    # A unix socket's exposure is its front end's (nginx) to configure.
    check_exposure(_settings, uwsgi_addresses(uwsgi.opt))
    registry.check(_settings)
