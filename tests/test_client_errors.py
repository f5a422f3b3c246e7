"""The client raises the server's own error class for every error the server can answer with.

The client's status -> class map is derived from :mod:`pacifica_like.core.errors`;
this module holds the specification it must meet: for every error class there,
the class a client call raises when a server answers with it. Each answer goes
over a real loopback HTTP exchange, rendered as the server renders it (the
error's ``http_status``, its headers, a JSON body on the file API and
problem+json on the bulk API). The live servers' answers for the same errors
are checked in test_client.py (400, 403, 404, 405, 409, 413, 416, 422, 503).
"""

from __future__ import annotations

import http.server
import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pacifica_like.client import ArchiveClient
from pacifica_like.client.errors import ERRORS_BY_STATUS, error_classes
from pacifica_like.core import errors

TIMEOUT = 30.0
BULK_ENDPOINT = "/api/v1"

#: Every error class -> the class the client raises for its answer, and the API that answers with it.
#: A subclass that keeps its base's status and adds no header reaches the client as the base.
SPEC: dict[type[errors.ArchiveError], tuple[type[errors.ArchiveError], str]] = {
    errors.ArchiveError: (errors.ArchiveError, "file"),
    errors.InvalidRequest: (errors.InvalidRequest, "file"),
    errors.IncompleteUpload: (errors.InvalidRequest, "file"),
    errors.LengthRequired: (errors.LengthRequired, "file"),
    errors.NotAuthenticated: (errors.NotAuthenticated, "file"),
    errors.Forbidden: (errors.Forbidden, "file"),
    errors.FileNotInArchive: (errors.FileNotInArchive, "file"),
    errors.MethodDisabled: (errors.MethodDisabled, "file"),
    errors.Conflict: (errors.Conflict, "file"),
    errors.UnsupportedMediaType: (errors.UnsupportedMediaType, "file"),
    errors.RangeNotSatisfiable: (errors.RangeNotSatisfiable, "file"),
    errors.DigestMismatch: (errors.DigestMismatch, "file"),
    errors.StorageUnavailable: (errors.StorageUnavailable, "file"),
    errors.StatusMismatch: (errors.StorageUnavailable, "file"),
    errors.OfflineOnTape: (errors.OfflineOnTape, "file"),
    errors.InsufficientStorage: (errors.InsufficientStorage, "file"),
    errors.RequestTooLarge: (errors.RequestTooLarge, "bulk"),
    errors.TooManyRequests: (errors.TooManyRequests, "bulk"),
    errors.UnknownRequest: (errors.UnknownRequest, "bulk"),
    errors.BulkNotConfigured: (errors.BulkNotConfigured, "bulk"),
}
#: Constructor arguments beyond the message, for the errors that carry headers.
EXTRA_ARGUMENTS: dict[type[errors.ArchiveError], dict[str, Any]] = {
    errors.MethodDisabled: {"allow": "GET, HEAD"},
    errors.RangeNotSatisfiable: {"size": 10},
    errors.OfflineOnTape: {"retry_after": 60},
    errors.TooManyRequests: {"retry_after": 7},
}


class ErrorServer:
    """A loopback HTTP server answering ``/<n>`` and the bulk API's ``/stage/<n>`` with one error each."""

    def __init__(self) -> None:
        #: Path -> the error that path answers with.
        self.errors: dict[str, errors.ArchiveError] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/.well-known/wlcg-tape-rest-api":
                    self._send(
                        200, {"sitename": "errors", "endpoints": [{"uri": BULK_ENDPOINT, "version": "v1"}]}
                    )
                    return
                error = server.errors[self.path.split("?")[0]]
                if self.path.startswith(BULK_ENDPOINT):
                    body = {"type": "about:blank", "status": error.http_status, "detail": error.message}
                    self._send(error.http_status, body, error.headers, "application/problem+json")
                else:
                    self._send(
                        error.http_status,
                        {"status": error.http_status, "message": error.message},
                        error.headers,
                    )

            def _send(
                self,
                status: int,
                body: dict[str, Any],
                headers: dict[str, str] | None = None,
                content_type: str = "application/json",
            ) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(raw)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def error_server() -> Iterator[ErrorServer]:
    server = ErrorServer()
    yield server
    server.close()


def test_the_specification_names_every_error_class_of_the_errors_module():
    assert set(SPEC) == set(error_classes()), "a new error class needs its line in SPEC"
    assert len(error_classes()) >= 19


def test_the_status_map_holds_only_classes_that_declare_their_status():
    for status, cls in ERRORS_BY_STATUS.items():
        assert cls.http_status == status
    expected = {raised.http_status for raised, _api in SPEC.values()}
    assert set(ERRORS_BY_STATUS) == expected


@pytest.mark.parametrize("cls", list(SPEC), ids=lambda cls: cls.__name__)
def test_each_error_class_answered_over_http_raises_its_class_in_the_client(
    error_server: ErrorServer, cls: type[errors.ArchiveError]
):
    raised, api = SPEC[cls]
    error = cls(f"the server says {cls.__name__}", **EXTRA_ARGUMENTS.get(cls, {}))
    number = list(SPEC).index(cls)
    with ArchiveClient(error_server.url, timeout=TIMEOUT) as client:
        if api == "file":
            error_server.errors[f"/{number}"] = error
            with pytest.raises(errors.ArchiveError) as caught:
                client.get(number, io.BytesIO())
        else:
            error_server.errors[f"{BULK_ENDPOINT}/stage/r{number}"] = error
            with pytest.raises(errors.ArchiveError) as caught:
                client.poll(f"r{number}")
    assert type(caught.value) is raised
    assert caught.value.status == cls.http_status
    assert str(caught.value) == f"the server says {cls.__name__}"
    if isinstance(error, errors.MethodDisabled | errors.RangeNotSatisfiable | errors.OfflineOnTape):
        assert caught.value.headers == error.headers
    if "Retry-After" in error.headers:
        assert caught.value.retry_after == float(error.headers["Retry-After"])
