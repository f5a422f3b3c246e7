"""Access and error logs: one line per record on stderr, JSON by default, with the request id.

Two loggers, each with one handler that writes a whole line in one call
(lines from several uWSGI workers sharing stderr never interleave):

* ``pacifica_like.access``: one record per answered request (method, path,
  file id, status, bytes in and out, duration, request id, client address);
* ``pacifica_like.error``: failures while serving (the 500s, with their
  traceback), tagged with the id of the request being served;
* ``pacifica_like.audit``: one record per request that changes something
  (PUT, PATCH, DELETE, stage, cancel, release) and per token change: who
  (subject, issuer), from where, what, and the outcome. Never a token. Not
  silenced by ``access_log = off``.

Neither ever carries request or response bodies, header values (so no
``Authorization`` or ``Cookie``) or query strings. ``[server] access_log``
(``PAI_ACCESS_LOG``) picks ``json`` (default), ``text`` or ``off`` (access
lines only; errors are always logged). Both loggers stop propagating to the
root logger, so a line is never printed twice; an operator may still attach
handlers of their own or raise the level to silence them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, NamedTuple

ACCESS_LOGGER = "pacifica_like.access"
ERROR_LOGGER = "pacifica_like.error"
AUDIT_LOGGER = "pacifica_like.audit"

#: The id of the request this thread is serving, for error records.
current_request_id: ContextVar[str | None] = ContextVar("pacifica_like_request_id", default=None)

#: Incoming X-Request-Id values we adopt: short, and only characters safe in headers and logs.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:=+/-]{1,64}")
_access_logger = logging.getLogger(ACCESS_LOGGER)
_audit_logger = logging.getLogger(AUDIT_LOGGER)


def is_safe_request_id(value: str) -> bool:
    """True when a client's X-Request-Id may be reused as ours.

    >>> [is_safe_request_id(v) for v in ("3f2a9c1e-7b44-4c1d-9d2e-0a1b2c3d4e5f", "a b", "", "x" * 65)]
    [True, False, False, False]
    """
    return _SAFE_REQUEST_ID.fullmatch(value) is not None


class AccessEntry(NamedTuple):
    """What the access log says about one answered request (``id``: the file id asked for, if any)."""

    request_id: str
    remote: str | None
    method: str
    path: str
    id: str | None
    status: int
    bytes_in: int
    bytes_out: int
    duration_ms: float


_second_cache: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """Render a time as ISO 8601 UTC with milliseconds (the seconds part is cached).

    >>> _timestamp(784111777.25)
    '1994-11-06T08:49:37.250Z'
    """
    global _second_cache
    whole = int(created)
    second, text = _second_cache
    if second != whole:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second_cache = (whole, text)
    return f"{text}.{int((created - whole) * 1000):03d}Z"


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else _quote(value)


class JsonLineFormatter(logging.Formatter):
    """Format a record as one JSON object: access records carry an AccessEntry in ``record.access``."""

    def format_access(self, created: float, entry: AccessEntry) -> str:
        """Return an access line: time, ``"log": "access"``, then the entry's fields in order.

        Written out field by field rather than through json.dumps, at a third of
        the cost; every string goes through json's own escaping.

        >>> line = JsonLineFormatter().format_access(
        ...     784111777.25, AccessEntry("r1", None, "GET", '/"x"', None, 400, 0, 82, 0.04))
        >>> json.loads(line)["path"], list(json.loads(line)) == ["time", "log", *AccessEntry._fields]
        ('/"x"', True)
        """
        return (
            f'{{"time": "{_timestamp(created)}", "log": "access", "request_id": {_quote(entry.request_id)}, '
            f'"remote": {_json_or_null(entry.remote)}, "method": {_quote(entry.method)}, '
            f'"path": {_quote(entry.path)}, "id": {_json_or_null(entry.id)}, "status": {entry.status:d}, '
            f'"bytes_in": {entry.bytes_in:d}, "bytes_out": {entry.bytes_out:d}, '
            f'"duration_ms": {float(entry.duration_ms)!r}}}'
        )

    def format_audit(self, created: float, fields: dict[str, Any]) -> str:
        """Return an audit line: time, ``"log": "audit"``, then the fields in order."""
        return json.dumps({"time": _timestamp(created), "log": "audit", **fields})

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON (newlines in tracebacks are escaped)."""
        entry: AccessEntry | None = getattr(record, "access", None)
        if entry is not None:
            return self.format_access(record.created, entry)
        audit: dict[str, Any] | None = getattr(record, "audit", None)
        if audit is not None:
            return self.format_audit(record.created, audit)
        document = {
            "time": _timestamp(record.created),
            "log": "error" if record.levelno >= logging.ERROR else record.levelname.lower(),
            "logger": record.name,
            "request_id": current_request_id.get(),
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            document["error"] = f"{type(error).__name__}: {error}"
            document["traceback"] = self.formatException(record.exc_info)
        return json.dumps(document)


class TextLineFormatter(logging.Formatter):
    """Format a record as plain text for people reading a terminal."""

    def format_access(self, created: float, entry: AccessEntry) -> str:
        """Return an access line: time, client, request id, request, status, bytes, duration."""
        return (
            f"{_timestamp(created)} {entry.remote} {entry.request_id} {entry.method[:16]!r} {entry.path!r} "
            f"{entry.status} in={entry.bytes_in} out={entry.bytes_out} {entry.duration_ms:.3f}ms"
        )

    def format_audit(self, created: float, fields: dict[str, Any]) -> str:
        """Return an audit line: time, AUDIT, then key=value pairs."""
        return f"{_timestamp(created)} AUDIT " + " ".join(f"{k}={v!r}" for k, v in fields.items())

    def format(self, record: logging.LogRecord) -> str:
        """Return an access line, or an error line followed by its traceback."""
        entry: AccessEntry | None = getattr(record, "access", None)
        if entry is not None:
            return self.format_access(record.created, entry)
        audit: dict[str, Any] | None = getattr(record, "audit", None)
        if audit is not None:
            return self.format_audit(record.created, audit)
        line = f"{_timestamp(record.created)} {record.levelname} {current_request_id.get() or '-'} "
        line += record.getMessage()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class StderrLineHandler(logging.StreamHandler):
    """Write each record as one line to whatever ``sys.stderr`` is when it is emitted.

    Looked up per record rather than held, so a test runner or daemon that
    swaps stderr gets the lines, and no closed stream is ever written to.
    stderr is line-buffered, so a line reaches the file in one write(2).
    """

    formatter: JsonLineFormatter | TextLineFormatter

    def __init__(self, formatter: JsonLineFormatter | TextLineFormatter) -> None:
        logging.Handler.__init__(self)
        self.setFormatter(formatter)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always sys.stderr

    def write_access(self, created: float, entry: AccessEntry) -> None:
        """Format and write one access line without a LogRecord (see :func:`emit_access`)."""
        self.write_line(self.formatter.format_access(created, entry) + "\n")

    def write_line(self, line: str) -> None:
        """Write one formatted line in one call, under the handler's lock."""
        lock = self.lock
        assert lock is not None
        with lock:
            # As in logging's own handlers, a broken log stream must not fail the request.
            try:  # noqa: SIM105 - contextlib.suppress costs more than the write on this path
                sys.stderr.write(line)
            except Exception:
                pass


def install(access_log: str) -> None:
    """Route the access and error loggers to stderr in ``access_log`` format (json, text, off).

    Idempotent: building several apps in one process (the tests do) keeps one
    handler per logger. ``off`` silences access lines only.
    """
    formatter = TextLineFormatter() if access_log == "text" else JsonLineFormatter()
    for name in (ACCESS_LOGGER, ERROR_LOGGER, AUDIT_LOGGER):
        logger = logging.getLogger(name)
        handler = next((h for h in logger.handlers if isinstance(h, StderrLineHandler)), None)
        if handler is None:
            logger.addHandler(StderrLineHandler(formatter))
        else:
            handler.setFormatter(formatter)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logging.getLogger(ACCESS_LOGGER).disabled = access_log == "off"


def _sole_line_handler(logger: logging.Logger) -> StderrLineHandler | None:
    """Our stderr handler when it is the logger's only one and nothing filters, else None."""
    handlers = logger.handlers
    if len(handlers) != 1 or logger.filters:
        return None
    handler = handlers[0]
    if type(handler) is StderrLineHandler and not handler.filters and handler.level <= logging.INFO:
        return handler
    return None


def emit_audit(**fields: Any) -> None:
    """Log one audit record (JSON: time, ``"log": "audit"``, then ``fields``).

    As :func:`emit_access` does, our own handler alone writes the line without a
    LogRecord (a third of the record's cost on every change); any other handler
    or filter gets a real record.
    """
    logger = _audit_logger
    if logger.disabled or not logger.isEnabledFor(logging.INFO):
        return
    handler = _sole_line_handler(logger)
    if handler is not None:
        handler.write_line(handler.formatter.format_audit(time.time(), fields) + "\n")
        return
    logger.info("audit %s", fields.get("action"), extra={"audit": fields})


def emit_access(entry: AccessEntry) -> None:
    """Log one request's access line.

    When our stderr handler is the only one on the logger and nothing filters
    (the usual case), it formats and writes the line itself: a LogRecord costs
    more than all the other per-request bookkeeping together. Any other handler
    or filter (an operator's, a test runner's) gets real records instead, and
    both ways print the same line.
    """
    logger = _access_logger
    if logger.disabled or not logger.isEnabledFor(logging.INFO):
        return
    handler = _sole_line_handler(logger)
    if handler is not None:
        handler.write_access(time.time(), entry)
        return
    # makeRecord + handle rather than logger.info(): no stack walk to find the caller.
    # The message is for handlers other than ours, formatted only if one asks for it.
    message, fields, extra = "%(method)s %(path)s %(status)s", entry._asdict(), {"access": entry}
    logger.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, message, (fields,), None, extra=extra))
