"""The HTTP server behind ``pacifica-like serve``: waitress, started and stopped by CherryPy's engine.

Why waitress rather than CherryPy's own cheroot (docs/decisions/0003-front-ends.md):
cheroot reads request lines, headers and bodies in its worker threads, so
sixteen slow or silent clients hold all sixteen threads and the service stops.
waitress reads every request on one event loop and hands a worker only a
*complete* request (the body buffered in memory, then in an unnamed temp file
under ``TMPDIR``), so slow clients cost a socket each, not a thread. Its parser
is strict where cheroot's is not: a chunk size of ``-5`` or ``zz``, a chunk
longer than its size, two different Content-Lengths or a non-digit one are 400
before the application sees anything.

CherryPy's engine still runs the process (signals, the in-process bulk
scheduler); :class:`WaitressServer` is the object its public
``cherrypy.process.servers.ServerAdapter`` starts and stops.
"""

from __future__ import annotations

import logging
import resource
import threading
from collections.abc import Callable, Iterable
from typing import Any

import waitress
from waitress import trigger as loop_trigger
from waitress import wasyncore

log = logging.getLogger("pacifica_like")

#: Connections served at once; past it waitress stops accepting until some close.
#: Each costs one file descriptor (two while its body spills to a temp file).
DEFAULT_CONNECTION_LIMIT = 4096
#: Seconds a connection may send nothing (between bytes of headers or body) before it is closed.
DEFAULT_IDLE_TIMEOUT = 60
#: Uploads stream into the archive after waitress has buffered them; no size is too large.
UNLIMITED_BODY = 1 << 62
#: Seconds stop() waits for requests that are running to finish.
STOP_GRACE = 10


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft open-file limit towards ``wanted`` (never above the hard limit).

    Every connection is a descriptor: a soft limit of 1,024 (the usual default)
    would refuse the thousandth client long before ``connection_limit``.
    Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class WaitressServer:
    """A waitress server with the start/stop/ready surface CherryPy's ServerAdapter drives.

    ``start()`` binds and runs the event loop in the calling thread (the
    adapter gives it its own) until ``stop()`` closes every socket of the loop
    from inside the loop, then lets running requests finish for up to STOP_GRACE.
    """

    def __init__(
        self,
        app: Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]],
        host: str,
        port: int,
        threads: int,
        connection_limit: int = DEFAULT_CONNECTION_LIMIT,
        idle_timeout: int = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.app = app
        self.adjustments: dict[str, Any] = {
            "host": host,
            "port": port,
            "threads": threads,
            "connection_limit": connection_limit,
            "channel_timeout": idle_timeout,
            # Close idle connections promptly rather than every 30 s.
            "cleanup_interval": max(1, min(30, idle_timeout // 2)),
            "max_request_body_size": UNLIMITED_BODY,
            # select() cannot watch descriptors above 1,023; poll() can.
            "asyncore_use_poll": True,
            "ident": "pacifica-like",
            # Our access log has every request; waitress's own "client disconnected" lines add nothing.
            "log_socket_errors": False,
        }
        self.ready = False
        self.socket = None  # ServerAdapter reads it for ephemeral ports; we always bind a fixed one
        self._map: dict[int, Any] = {}
        self._server: Any = None
        self._stopped = threading.Event()

    def start(self) -> None:
        """Bind, then serve until stop(); runs in the adapter's HTTP thread."""
        raise_open_file_limit(self.adjustments["connection_limit"] + 256)
        self._server = waitress.create_server(self.app, map=self._map, **self.adjustments)
        self.ready = True
        try:
            self._server.run()
        finally:
            self._stopped.set()

    def stop(self) -> None:
        """Close the listening socket and every connection, then wait for running requests."""
        self.ready = False
        server = self._server
        if server is None:
            return
        # The event loop owns its sockets: close them from inside it, via its trigger. In order:
        # stop accepting; let the requests that are running finish, their answers going out
        # through the loop (closing the trigger first made each one fail on it, a traceback
        # apiece); then close the connections and the trigger, which ends the loop.
        loop_triggers = [d for d in list(self._map.values()) if isinstance(d, loop_trigger.trigger)]
        if not loop_triggers:
            wasyncore.close_all(self._map)
            server.task_dispatcher.shutdown(timeout=STOP_GRACE)
            return
        # The listening socket alone: waitress's server.close() would close the trigger too.
        loop_triggers[0].pull_trigger(lambda: wasyncore.dispatcher.close(server))
        server.task_dispatcher.shutdown(timeout=STOP_GRACE)
        try:
            loop_triggers[0].pull_trigger(lambda: wasyncore.close_all(self._map))
        except OSError:  # the loop has ended already, and closed its trigger with it
            wasyncore.close_all(self._map)
        self._stopped.wait(STOP_GRACE)
