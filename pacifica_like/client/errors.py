"""How the client reports failure: the server's own error classes, and TransportError.

An answer of 400 or more becomes the class from :mod:`pacifica_like.core.errors`
that declares its status (``ERRORS_BY_STATUS``, derived from that module, so a
new error class there needs no edit here). Failures below HTTP (no connection,
a timeout, an answer cut short) become :class:`TransportError`, translated in
one place (:func:`transport_errors`).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import requests

from pacifica_like.core import errors as core_errors
from pacifica_like.core import httpfields
from pacifica_like.core.errors import (
    ArchiveError,
    InvalidRequest,
    MethodDisabled,
    OfflineOnTape,
    RangeNotSatisfiable,
    StorageUnavailable,
)


class TransportError(OSError):
    """The server could not be reached, or the exchange broke off (timeout, reset, short body)."""


def error_classes(module: ModuleType = core_errors) -> list[type[ArchiveError]]:
    """Return the ArchiveError classes ``module`` defines, in the order it defines them."""
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, ArchiveError) and value.__module__ == module.__name__
    ]


def classes_by_status(classes: Iterable[type[ArchiveError]]) -> dict[int, type[ArchiveError]]:
    """Map each status to the class that declares it (not one inheriting it from its base).

    A subclass that keeps its base's status (IncompleteUpload, StatusMismatch)
    cannot be told from its base by the status, so the base stands for both.
    When two unrelated classes declare one status the first one defined wins
    (404: FileNotInArchive; the bulk API's calls ask for UnknownRequest instead).
    """
    found: dict[int, type[ArchiveError]] = {}
    for cls in classes:
        if "http_status" in vars(cls):
            found.setdefault(cls.http_status, cls)
    return found


#: Status -> the error raised for it; 503 with Retry-After is OfflineOnTape, anything else ArchiveError.
ERRORS_BY_STATUS: dict[int, type[ArchiveError]] = classes_by_status(error_classes())


def _retry_after(raw: str | None) -> float | None:
    """Return Retry-After in seconds (delta-seconds or an HTTP date), or None."""
    if not raw:
        return None
    if raw.strip().isdigit():
        return float(raw.strip())
    try:
        return max(0.0, httpfields.parse_http_date(raw) - time.time())
    except InvalidRequest:
        return None


def _error_message(response: requests.Response, method: str, body: bytes, document: Any) -> str:
    if isinstance(document, dict):
        for key in ("message", "detail", "title"):
            if isinstance(document.get(key), str) and document[key]:
                return document[key]
    text = body.decode(response.encoding or "utf-8", errors="replace").strip()
    path = urlsplit(response.url).path or "/"
    return text[:500] if text else f"{response.status_code} {response.reason} for {method} {path}"


def error_from_response(
    response: requests.Response,
    method: str,
    overrides: Mapping[int, type[ArchiveError]] | None = None,
    body: bytes | None = None,
) -> ArchiveError:
    """Return the error an answer of 400 or more stands for, carrying the server's message.

    ``overrides`` replaces the class for some statuses (the bulk API's 404 is an
    unknown request). ``body`` is the answer's body when the caller read it
    itself (a streamed answer); by default ``response.content``.
    """
    status = response.status_code
    if body is None:
        body = response.content or b""
    try:
        document = json.loads(body) if body else None
    except ValueError:
        document = None
    message = _error_message(response, method, body, document)
    retry_after = _retry_after(response.headers.get("Retry-After"))
    cls = (overrides or {}).get(status) or ERRORS_BY_STATUS.get(status, ArchiveError)
    error: ArchiveError
    if cls is StorageUnavailable and retry_after is not None:
        error = OfflineOnTape(message, retry_after=round(retry_after))
    elif cls is MethodDisabled:
        error = MethodDisabled(message, allow=response.headers.get("Allow", ""))
    elif cls is RangeNotSatisfiable:
        size = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
        error = RangeNotSatisfiable(message, size=int(size.group(1)) if size else -1)
    else:
        error = cls(message)
    error.status = status  # type: ignore[attr-defined]
    error.method = method  # type: ignore[attr-defined]
    error.url = response.url  # type: ignore[attr-defined]
    error.request_id = response.headers.get("X-Request-Id")  # type: ignore[attr-defined]
    error.retry_after = retry_after  # type: ignore[attr-defined]
    error.document = document  # type: ignore[attr-defined]
    return error


@contextlib.contextmanager
def transport_errors(what: str) -> Iterator[None]:
    """Translate requests' and urllib3's failures into TransportError, in this one place."""
    try:
        yield
    except requests.RequestException as exc:
        raise TransportError(f"{what}: {_root_cause(exc)}") from exc


def _root_cause(exc: BaseException) -> str:
    """Return the innermost reason urllib3 wrapped (its retry wrapper's text hides it)."""
    reason: Any = exc.args[0] if exc.args else exc
    while getattr(reason, "reason", None) is not None:
        reason = reason.reason
    text = str(reason)
    # NewConnectionError reads "HTTPConnection(host=..., port=...): Failed to establish ...".
    return text.split("): ", 1)[-1] if text.startswith("HTTPConnection") else text
