"""The failures the archive can report, each a noun with its HTTP status.

Backends raise only these; lower-level errors (OSError, driver errors) are
translated at the backend's edge with ``raise ... from exc``. The web layer
(``pacifica_like.web.app``) is the only place that turns them into responses; the
``http_status`` attribute is data it reads, so a new error needs no edit there.
Stdlib only: every layer may import this module.
"""

from __future__ import annotations


class ArchiveError(Exception):
    """Base of every error the archive reports to a client."""

    http_status = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ArchiveError):
    """The request is malformed: bad id, date, range, JSON or a short body."""

    http_status = 400


class IncompleteUpload(InvalidRequest):
    """The upload's body ended before its Content-Length, or the client went away mid-upload."""


class LengthRequired(ArchiveError):
    """A chunked body reached a server that cannot check its framing (uWSGI's own HTTP socket)."""

    http_status = 411


class NotAuthenticated(ArchiveError):
    """The request needs a token, or the token sent cannot be accepted (``WWW-Authenticate`` says how)."""

    http_status = 401


class Forbidden(ArchiveError):
    """The request touches something outside what the archive may touch."""

    http_status = 403


class FileNotInArchive(ArchiveError):
    """No file is stored under the requested id (or a PATCH source is missing)."""

    http_status = 404


class MethodDisabled(ArchiveError):
    """The verb exists but this deployment switched it off (DELETE by default)."""

    http_status = 405

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.headers = {"Allow": allow}


class Conflict(ArchiveError):
    """The archive is write-once and the id already holds a file."""

    http_status = 409


class UnsupportedMediaType(ArchiveError):
    """The request body is not in a format the verb accepts (PATCH wants JSON)."""

    http_status = 415


class RangeNotSatisfiable(ArchiveError):
    """A ``Range`` header asks for bytes the file does not have."""

    http_status = 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.headers = {"Content-Range": f"bytes */{size}"}


class DigestMismatch(ArchiveError):
    """The uploaded bytes do not hash to the digest the client sent."""

    http_status = 422


class StorageUnavailable(ArchiveError):
    """The storage system (database, stager, mount) cannot be reached now."""

    http_status = 503


class StatusMismatch(StorageUnavailable):
    """The HSM's status database and the filesystem disagree about a file, so its status is unknown.

    A file on disk the database does not list, or a database row whose file is
    not on disk (an updater running behind, or one that missed an event).
    """


class OfflineOnTape(StorageUnavailable):
    """The file exists only on tape; the client must stage it first."""

    def __init__(self, message: str, retry_after: int = 60) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class RequestTooLarge(InvalidRequest):
    """A bulk request names more files (or bytes) than the server accepts in one request."""

    http_status = 413


class TooManyRequests(ArchiveError):
    """The client has more files in flight than its share; it may retry after ``retry_after`` seconds."""

    http_status = 429

    def __init__(self, message: str, retry_after: int = 60) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class UnknownRequest(ArchiveError):
    """No bulk request has this id (never made, or deleted)."""

    http_status = 404


class BulkNotConfigured(ArchiveError):
    """Bulk staging needs the gateway catalog, which this deployment turned off."""

    http_status = 501


class InsufficientStorage(ArchiveError):
    """The storage is full or over quota (ENOSPC, EDQUOT)."""

    http_status = 507
