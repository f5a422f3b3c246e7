"""WSGI middleware that gives every request an id, a line in the access log and its metrics.

It wraps the whole application (file API and the CherryPy mounts), so every
answer, errors included, carries ``X-Request-Id`` and is counted exactly once:
when the server closes the response, i.e. after the last byte was handed over
(or the client went away). Per request: two clock reads (vDSO, no system
call), four or five metric updates (under uWSGI each a store into a memory-mapped
file named by worker id, so no getpid: docs/decisions/0019) and one write(2) of
the log line. docs/decisions/0021-observed-app-and-access-log.md has the measured cost.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter
from typing import Any

from pacifica_like.core import httpfields
from pacifica_like.core.errors import InvalidRequest
from pacifica_like.web import logs
from pacifica_like.web.authz import CLIENT_KEY, principal_of
from pacifica_like.web.errors import ERROR_KEY
from pacifica_like.web.fileapi import WSGIApp
from pacifica_like.web.filehandlers import BYTES_IN_KEY
from pacifica_like.web.metrics import Metrics

#: Methods counted under their own name; anything else is "other" (bounded label values).
KNOWN_METHODS = frozenset(("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "PROPFIND"))
#: Longest path written to the access log; ids are far shorter, junk is cut.
MAX_LOGGED_PATH = 256


def _audited(method: str, path: str) -> str | None:
    """Return the audit action of a request that changes something, else None.

    POST /<id> stages; POST archiveinfo changes nothing.
    """
    if method in ("PUT", "PATCH"):
        return method.lower()
    if method == "DELETE":
        return "bulk-delete" if path.startswith("/api/") else "delete"
    if method != "POST":
        return None
    if path.startswith("/api/v1/stage"):
        return "bulk-cancel" if path.endswith("/cancel") else "bulk-stage"
    if path.startswith("/api/v1/release"):
        return "bulk-release"
    return None if path.startswith("/api/") else "stage"


def _outcome(status: int, query: str | None) -> str:
    """The audit outcome: done, dry-run (``?dryRun=true``: nothing was changed), refused or failed."""
    if status in (401, 403):
        return "refused"
    if status >= 400:
        return "failed"
    return "dry-run" if _asks_dry_run(query) else "done"


def _asks_dry_run(query: str | None) -> bool:
    try:
        return httpfields.parse_dry_run(query)
    except InvalidRequest:
        return False


class ObservedApp:
    """Wrap ``app``: request ids, access log lines and metrics for every request.

    ``endpoints``: first path segments counted under their own name (the
    CherryPy mounts: ``metrics``, ``ready``); ``/`` is ``root``, the rest
    ``file``. Build it in the process that serves (uWSGI workers build theirs
    after the fork): request ids come from a generator seeded here.
    """

    def __init__(
        self, app: WSGIApp, metrics: Metrics | None, endpoints: Iterable[str] = (), access_log: bool = True
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = frozenset(endpoints)
        self.access_log = access_log
        self._ids = random.Random(os.urandom(16))

    def new_request_id(self) -> str:
        """Return a fresh request id: 16 hex digits, no system call."""
        return f"{self._ids.getrandbits(64):016x}"

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Serve one request through the wrapped app, observing it."""
        started = perf_counter()
        request_id = environ.get("HTTP_X_REQUEST_ID")
        if request_id is None or not logs.is_safe_request_id(request_id):
            request_id = self.new_request_id()
        logs.current_request_id.set(request_id)
        exchange = Exchange(self, environ, start_response, request_id, started)
        try:
            body = self.app(environ, exchange.start_response)
        except BaseException:
            exchange.status = 500
            exchange.finish()
            raise
        if type(body) is list:
            # Small answers (JSON, HEAD, errors): nothing left to stream, done now.
            exchange.sent = sum(map(len, body))
            exchange.finish()
            return body
        exchange.body = body
        return exchange


class Exchange:
    """One request in flight, and the body that streams its answer, counting the bytes.

    The server closes the body however the response ended (complete, client
    gone, error); that is when the request is counted and logged.
    """

    __slots__ = (
        "_start_response", "body", "done", "environ", "observer", "request_id", "sent", "started", "status",
    )  # fmt: skip

    def __init__(
        self,
        observer: ObservedApp,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
        request_id: str,
        started: float,
    ) -> None:
        self.observer = observer
        self.environ = environ
        self._start_response = start_response
        self.request_id = request_id
        self.started = started
        self.status = 0
        self.sent = 0
        self.body: Iterable[bytes] = ()
        self.done = False

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        """Note the status and add ``X-Request-Id`` to the answer's headers."""
        self.status = int(status[:3])
        return self._start_response(status, [*headers, ("X-Request-Id", self.request_id)], exc_info)

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.body:
            self.sent += len(chunk)
            yield chunk

    def close(self) -> None:
        """Close the wrapped body, then record the request (once)."""
        body, self.body = self.body, ()
        try:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        finally:
            if not self.done:
                self.finish()

    def finish(self) -> None:
        """Record the request in the metrics and the access log."""
        seconds = perf_counter() - self.started
        self.done = True
        environ = self.environ
        observer = self.observer
        path = environ.get("PATH_INFO") or "/"
        # Below a namespace (web.fileapi.Namespace) the path's prefix is in SCRIPT_NAME.
        mount = environ.get("SCRIPT_NAME") or ""
        segment = path[1:].partition("/")[0]
        endpoint = segment if segment in observer.endpoints else "root" if path == "/" else "file"
        method = environ.get("REQUEST_METHOD", "")
        received = environ.get(BYTES_IN_KEY, 0)
        if observer.metrics is not None:
            label = method if method in KNOWN_METHODS else "other"
            observer.metrics.record(
                endpoint, label, self.status, received, self.sent, seconds, environ.get(ERROR_KEY)
            )
        action = _audited(method, path)
        if action is not None:
            principal = principal_of(environ)
            logs.emit_audit(
                request_id=self.request_id,
                action=action,
                subject=principal.subject if principal is not None else None,
                issuer=principal.issuer if principal is not None else None,
                remote=environ.get(CLIENT_KEY, environ.get("REMOTE_ADDR")),
                path=(mount + path)[:MAX_LOGGED_PATH],
                status=self.status,
                outcome=_outcome(self.status, environ.get("QUERY_STRING")),
            )
        if observer.access_log:
            # /<digits>: the id asked for (valid or not); anything else has none.
            is_id = segment.isdigit() and segment.isascii() and len(path) == len(segment) + 1
            logs.emit_access(
                logs.AccessEntry(
                    self.request_id,
                    environ.get("REMOTE_ADDR"),
                    method[:16],
                    (mount + path)[:MAX_LOGGED_PATH],
                    segment if is_id else None,
                    self.status,
                    received,
                    self.sent,
                    round(seconds * 1000, 3),
                )
            )
        logs.current_request_id.set(None)
