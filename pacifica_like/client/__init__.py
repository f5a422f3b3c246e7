"""A Python client for the archive: files on ``/<id>`` and bulk staging on ``/api/v1``.

Public surface:

- :class:`ArchiveClient`: synchronous calls over one ``requests.Session`` whose
  connection pool holds ``max_in_flight`` connections, so threads may share it.
- :class:`AsyncArchiveClient`: the same calls as ``concurrent.futures.Future``\\ s,
  run by ``max_in_flight`` threads over one ``ArchiveClient``; never more than
  ``max_in_flight`` requests are on the wire, however many are submitted.
- Results: :class:`FileInfo` (HEAD), :class:`Upload`, :class:`Download`,
  :class:`Locality`, :class:`TapeRestInfo`, :class:`StagePage` with
  :class:`StagedFile` and :class:`StageSummary`, :class:`StageProgress`.
- Errors: an answer of 400 or more raises the server's own class from
  :mod:`pacifica_like.core.errors` (404 :class:`~pacifica_like.core.errors.FileNotInArchive`,
  503 with ``Retry-After`` :class:`~pacifica_like.core.errors.OfflineOnTape`, ...;
  the bulk API's own: :class:`RequestTooLarge` (413), :class:`TooManyRequests`
  (429) and :class:`UnknownRequest` (404 for a request id), re-exported here).
  ``str(error)`` is the server's message; ``status``, ``method``, ``url``,
  ``request_id``, ``retry_after`` and ``document`` (the parsed body) say more.
  Not reaching the server, a timeout or an answer cut short raises
  :class:`TransportError`.

Modules: :mod:`~pacifica_like.client.sync` (ArchiveClient),
:mod:`~pacifica_like.client.futures` (AsyncArchiveClient),
:mod:`~pacifica_like.client.models` (the results), :mod:`~pacifica_like.client.errors`
(the status -> class map, derived from :mod:`pacifica_like.core.errors`, and
TransportError), :mod:`~pacifica_like.client.transfer` (streamed bodies). The client
imports only :mod:`pacifica_like.core` and requests: never the server's layers.

Bodies stream both ways in 1 MiB chunks: memory does not grow with file size.
A download to a path goes to a hidden temp file beside it and is renamed into
place only once every byte has arrived and matched the server's ``Repr-Digest``,
so an interrupted or corrupt download leaves nothing (and the previous file).
"""

from __future__ import annotations

from pacifica_like.client.errors import ERRORS_BY_STATUS, TransportError, error_from_response
from pacifica_like.client.futures import AsyncArchiveClient
from pacifica_like.client.models import (
    FILE_STATES,
    TERMINAL_STATES,
    Download,
    FileId,
    FileInfo,
    Locality,
    StagedFile,
    StagePage,
    StageProgress,
    StageSummary,
    TapeRestInfo,
    Upload,
    file_path,
)
from pacifica_like.client.sync import (
    CONNECT_TIMEOUT,
    MAX_ERROR_BODY,
    PAGE_RETRIES,
    PAGE_SIZE,
    ArchiveClient,
    discover_token,
)
from pacifica_like.client.transfer import CHUNK_SIZE, BodySource, Progress
from pacifica_like.core.errors import (
    ArchiveError,
    Conflict,
    DigestMismatch,
    FileNotInArchive,
    Forbidden,
    IncompleteUpload,
    InsufficientStorage,
    InvalidRequest,
    MethodDisabled,
    NotAuthenticated,
    OfflineOnTape,
    RangeNotSatisfiable,
    RequestTooLarge,
    StorageUnavailable,
    TooManyRequests,
    UnknownRequest,
    UnsupportedMediaType,
)

__all__ = [
    "CHUNK_SIZE",
    "CONNECT_TIMEOUT",
    "ERRORS_BY_STATUS",
    "FILE_STATES",
    "MAX_ERROR_BODY",
    "PAGE_RETRIES",
    "PAGE_SIZE",
    "TERMINAL_STATES",
    "ArchiveClient",
    "ArchiveError",
    "AsyncArchiveClient",
    "BodySource",
    "Conflict",
    "DigestMismatch",
    "Download",
    "FileId",
    "FileInfo",
    "FileNotInArchive",
    "Forbidden",
    "IncompleteUpload",
    "InsufficientStorage",
    "InvalidRequest",
    "Locality",
    "MethodDisabled",
    "NotAuthenticated",
    "OfflineOnTape",
    "Progress",
    "RangeNotSatisfiable",
    "RequestTooLarge",
    "StagePage",
    "StageProgress",
    "StageSummary",
    "StagedFile",
    "StorageUnavailable",
    "TapeRestInfo",
    "TooManyRequests",
    "TransportError",
    "UnknownRequest",
    "UnsupportedMediaType",
    "Upload",
    "discover_token",
    "error_from_response",
    "file_path",
]
