"""The file API's two adapters over one set of handlers, and the one error renderer.

The CherryPy MethodDispatcher resource (``pacifica_like.web.fileresource``)
and the plain WSGI adapter (``pacifica_like.web.fileapi``) must give the same
answers, stream bodies both ways, and be mountable: the resource in a site's
own CherryPy tree, below a prefix, on a real server. ``pacifica_like.web.errors``
renders every error class with its status and headers, JSON on the file API
and problem+json on the bulk API, chosen by mount.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import cherrypy
import pytest
import requests
import webob
import webtest
from conftest import LAST_MODIFIED, put

from pacifica_like.core import errors as core_errors
from pacifica_like.core.errors import ArchiveError, OfflineOnTape
from pacifica_like.gateway.catalog import PRESENT, GatewayCatalog
from pacifica_like.storage import registry
from pacifica_like.storage.contract import CHUNK_SIZE
from pacifica_like.web import devserver, errors
from pacifica_like.web.app import build_app
from pacifica_like.web.fileresource import DISPATCH_CONFIG, FileResource

TIMEOUT = 30
BODY = b"both adapters, one set of handlers\n" * 3
#: Headers that differ between two servers by nature (times, ids, the server's name).
VOLATILE = {"date", "server", "x-request-id", "x-pacifica-ctime"}


def answer_of(response: webtest.TestResponse) -> tuple[int, dict[str, str], Any]:
    """Status, headers (lower-case names, volatile ones dropped) and body (parsed when JSON)."""
    headers = {k.lower(): v for k, v in response.headers.items() if k.lower() not in VOLATILE}
    body: Any = response.body
    if response.content_type in ("application/json", errors.PROBLEM_TYPE) and body:
        body = json.loads(body)  # CherryPy pads its own error pages with spaces
        headers.pop("content-length")
    return response.status_int, headers, body


REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/", {}, b""),
    ("HEAD", "/", {}, b""),
    ("GET", "/5", {}, b""),
    ("GET", "/5", {"Range": "bytes=3-9"}, b""),
    ("GET", "/5", {"Range": "bytes=999-"}, b""),
    ("GET", "/5?byte_range=1-4", {}, b""),
    ("GET", "/5?self=1&x=%ff", {}, b""),
    ("HEAD", "/5", {}, b""),
    ("POST", "/5", {}, b""),
    ("HEAD", "/404", {}, b""),
    ("GET", "/404", {}, b""),
    ("POST", "/404", {}, b""),
    ("DELETE", "/5", {}, b""),
    ("OPTIONS", "/5", {}, b""),
    ("OPTIONS", "/", {}, b""),
    ("PROPFIND", "/5", {"Depth": "0"}, b""),
    ("PROPFIND", "/", {"Depth": "1"}, b""),
    ("PROPFIND", "/", {}, b""),
    ("MKCOL", "/5", {}, b""),
    ("MKCOL", "/", {}, b""),
    ("PUT", "/", {"Last-Modified": LAST_MODIFIED}, b"x"),
    ("get", "/5", {}, b""),
    ("GET", "//5", {}, b""),
    ("GET", "/5/", {}, b""),
    ("GET", "/5/6", {}, b""),
    ("GET", "/abc", {}, b""),
    ("GET", "/__class__", {}, b""),
    ("GET", "/GET", {}, b""),
    ("PUT", "/6", {}, b"no date"),
    ("PUT", "/6", {"Last-Modified": "yesterday"}, b"bad date"),
    ("PATCH", "/6", {"Content-Type": "text/plain"}, b"{}"),
    ("PATCH", "/6", {"Content-Type": "application/json"}, b"{not json"),
    ("GET", "/metrics/extra", {}, b""),
    ("GET", "/api/v1/nothing", {}, b""),
]


def test_both_adapters_give_the_same_answers(make_settings, tmp_path: Path):
    answers = {}
    for adapter in ("wsgi", "cherrypy"):
        settings = make_settings(prefix=str(tmp_path / adapter))
        app = webtest.TestApp(build_app(settings, registry.create(settings), file_api=adapter))
        assert put(app, 5, BODY).status_int == 201
        answers[adapter] = [
            answer_of(app.request(path, method=method, headers=headers, body=body, expect_errors=True))
            for method, path, headers, body in REQUESTS
        ]
    for request, wsgi, resource in zip(REQUESTS, answers["wsgi"], answers["cherrypy"], strict=True):
        assert wsgi == resource, request
    # The cases reached the handlers: a file, a health check, and refusals of every kind.
    statuses = [status for status, _, _ in answers["cherrypy"]]
    assert {200, 204, 206, 207, 400, 404, 405, 415, 416} <= set(statuses)


def test_the_resource_answers_unknown_verbs_in_the_file_apis_words(make_app):
    app = make_app()
    file_refusal = app.request("/5", method="MKCOL", expect_errors=True)
    assert json.loads(file_refusal.body) == {"status": 405, "message": "MKCOL is not supported on /<id>"}
    assert file_refusal.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PROPFIND, PUT"
    root_refusal = app.request("/", method="MKCOL", expect_errors=True)
    assert json.loads(root_refusal.body)["message"] == "MKCOL needs a file id: MKCOL /<id>"
    assert root_refusal.headers["Allow"] == "GET, HEAD, OPTIONS, PROPFIND"


def raw_call(app: Any, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], Any]:
    """Call a WSGI app directly; return status, headers and the unconsumed body iterable."""
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        seen["status"], seen["headers"] = status, headers

    body = app(environ, start_response)
    return seen["status"], seen["headers"], body


def descriptors_on(path: Path) -> int:
    """How many of this process's descriptors are open on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass
    return count


def test_get_streams_chunk_by_chunk_and_closing_early_closes_the_file(make_settings, prefix: Path, file_api):
    settings = make_settings()
    app = build_app(settings, registry.create(settings), file_api=file_api)
    data = os.urandom(3 * CHUNK_SIZE + 5)
    assert put(webtest.TestApp(app), 12345, data).status_int == 201
    stored = prefix / "39" / "3039"
    status, headers, body = raw_call(app, webob.Request.blank("/12345").environ)
    assert status.startswith("200") and dict(headers)["Content-Length"] == str(len(data))
    chunks = iter(body)
    first = next(chunks)
    # The first chunk is handed over before the rest is read: streamed, not buffered.
    assert first == data[:CHUNK_SIZE]
    assert descriptors_on(stored) == 1
    body.close()  # the client went away
    assert descriptors_on(stored) == 0


class ReadRecorder:
    """A request body that notes the size of every read."""

    def __init__(self, data: bytes) -> None:
        self._raw = io.BytesIO(data)
        self.reads: list[int] = []

    def read(self, size: int = -1) -> bytes:
        self.reads.append(size)
        return self._raw.read(size)


def test_put_reads_the_body_in_chunks_from_the_request(make_settings, prefix: Path, file_api):
    settings = make_settings()
    app = build_app(settings, registry.create(settings), file_api=file_api)
    data = os.urandom(3 * CHUNK_SIZE + 7)
    environ = webob.Request.blank("/12345", method="PUT", headers={"Last-Modified": LAST_MODIFIED}).environ
    body = ReadRecorder(data)
    environ.update({"wsgi.input": body, "CONTENT_LENGTH": str(len(data))})
    status, _, answer = raw_call(app, environ)
    assert status.startswith("201"), b"".join(answer)
    assert json.loads(b"".join(answer))["total_bytes"] == len(data)
    assert (prefix / "39" / "3039").read_bytes() == data
    assert len(body.reads) >= 4 and 0 < max(body.reads) <= CHUNK_SIZE


@pytest.mark.parametrize(
    ("path", "shape"), [("/12345", "application/json"), ("/api/v1/stage", errors.PROBLEM_TYPE)]
)
@pytest.mark.parametrize(
    "framing",
    [{"CONTENT_LENGTH": "12x"}, {"CONTENT_LENGTH": "5", "HTTP_TRANSFER_ENCODING": "chunked"}],
)
def test_framing_refusals_are_rendered_by_the_mount_they_name(
    make_settings, prefix: Path, file_api, path: str, shape: str, framing: dict[str, str]
):
    settings = make_settings()
    app = build_app(settings, registry.create(settings), file_api=file_api)
    environ = webob.Request.blank(path, method="POST", headers={"Content-Type": "application/json"}).environ
    environ.update({"wsgi.input": io.BytesIO(b'{"files": []}'), **framing})
    status, headers, body = raw_call(app, environ)
    assert status.startswith("400")
    assert dict(headers)["Content-Type"] == shape
    document = json.loads(b"".join(body))
    assert document["status"] == 400
    assert "Content-Length" in (document.get("message") or document.get("detail"))
    assert not prefix.exists() or not any(prefix.rglob("12345"))


class OfflineReads:
    """A posix backend whose every read answers as a released tape file does."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def open_reader(self, file_id: int) -> Any:
        raise OfflineOnTape(f"file {file_id} is on tape only; POST /{file_id} to stage it", retry_after=7)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_resource_carries_an_errors_headers(make_settings):
    """Retry-After travels through CherryPy's error hook as through the WSGI adapter."""
    settings = make_settings()
    resource = FileResource(OfflineReads(registry.create(settings)), settings)  # type: ignore[arg-type]
    app = webtest.TestApp(cherrypy.Application(resource, "", DISPATCH_CONFIG))
    answer = app.get("/5", expect_errors=True)
    assert answer.status_int == 503
    assert answer.headers["Retry-After"] == "7"
    assert answer.json == {"status": 503, "message": "file 5 is on tape only; POST /5 to stage it"}
    assert "Allow" not in answer.headers and "Traceback" not in answer.text


def every_error_class() -> list[type[ArchiveError]]:
    return [
        cls
        for _, cls in inspect.getmembers(core_errors, inspect.isclass)
        if issubclass(cls, ArchiveError) and cls.__module__ == core_errors.__name__
    ]


def instance_of(cls: type[ArchiveError]) -> ArchiveError:
    """An instance of ``cls``, its extra constructor arguments given."""
    extra = {"allow": "GET, HEAD", "size": 10, "retry_after": 9}
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "message")]
    return cls(f"{cls.__name__} happened", **{n: extra[n] for n in names if n in extra})


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda cls: cls.__name__)
def test_every_error_class_renders_its_status_and_headers_in_both_shapes(cls: type[ArchiveError]):
    exc = instance_of(cls)
    for shape, content_type in ((errors.JSON, "application/json"), (errors.PROBLEM, errors.PROBLEM_TYPE)):
        status, headers, body = errors.error_response(exc, shape)
        assert status == cls.http_status
        fields = dict(headers)
        assert fields["Content-Type"] == content_type
        assert fields["Content-Length"] == str(len(body[0]))
        for name, value in exc.headers.items():
            assert fields[name] == value
        document = json.loads(body[0])
        assert document["status"] == cls.http_status
        assert document.get("message", document.get("detail")) == f"{cls.__name__} happened"
    assert {"Retry-After"} <= set(instance_of(OfflineOnTape).headers)


def test_a_bug_is_a_500_without_its_traceback():
    try:
        raise KeyError("secret internal detail")
    except KeyError as exc:
        status, _, body = errors.error_response(exc)
    assert status == 500
    assert json.loads(body[0]) == {"status": 500, "message": errors.INTERNAL_MESSAGE}


SITE = """
import sys

import cherrypy

from pacifica_like.core.config import load_settings
from pacifica_like.gateway.catalog import PRESENT, GatewayCatalog
from pacifica_like.storage import registry
from pacifica_like.web.fileresource import DISPATCH_CONFIG, FileResource


class Site:
    @cherrypy.expose
    def index(self):
        return "the site's own page"


settings = load_settings()
cherrypy.config.update({"server.socket_host": "127.0.0.1", "server.socket_port": int(sys.argv[1]),
                        "engine.autoreload.on": False, "checker.on": False})
cherrypy.tree.mount(Site(), "/", {})
cherrypy.tree.mount(FileResource(registry.create(settings), settings), "/archive", DISPATCH_CONFIG)
cherrypy.engine.signals.subscribe()
cherrypy.engine.start()
cherrypy.engine.block()
"""


def test_a_site_mounts_the_resource_in_its_own_cherrypy_tree_on_a_real_server(tmp_path: Path):
    """The README's example: the resource below /archive of a site's tree, served by CherryPy's own server."""
    script = tmp_path / "site.py"
    script.write_text(textwrap.dedent(SITE))
    prefix = tmp_path / "archive"
    port = devserver.free_port()
    env = {"PAI_PREFIX": str(prefix), "PAI_CATALOG": "off"}
    with devserver.run_server([sys.executable, str(script), str(port)], port, env) as site:
        url = site.url + "/archive"
        assert requests.get(site.url + "/", timeout=TIMEOUT).text == "the site's own page"
        stored = requests.put(
            f"{url}/12345", data=BODY, headers={"Last-Modified": LAST_MODIFIED}, timeout=TIMEOUT
        )
        assert stored.status_code == 201 and stored.json()["total_bytes"] == len(BODY)
        assert (prefix / "39" / "3039").read_bytes() == BODY
        got = requests.get(f"{url}/12345", timeout=TIMEOUT)
        assert got.content == BODY and got.headers["Content-Length"] == str(len(BODY))
        head = requests.head(f"{url}/12345", timeout=TIMEOUT)
        assert head.status_code == 204 and head.headers["X-Pacifica-File"] == "39/3039"
        assert requests.get(url + "/", timeout=TIMEOUT).json()["message"].startswith("Pacifica Archive")
        for target in ("//12345", "/%2F12345", "/12345/x", "/0012345"):
            refused = requests.get(url + target, timeout=TIMEOUT)
            assert refused.status_code == 400, (target, refused.text)
            assert refused.json()["status"] == 400
        refused = requests.delete(f"{url}/12345", timeout=TIMEOUT)
        assert refused.status_code == 405 and "DELETE" not in refused.headers["Allow"]
        assert (prefix / "39" / "3039").read_bytes() == BODY


def test_a_site_mounted_resource_keeps_the_catalog_inventory(tmp_path: Path):
    """Mounted without build_app, the resource still records its changes (audit --fix relies on them)."""
    script = tmp_path / "site.py"
    script.write_text(textwrap.dedent(SITE))
    prefix = tmp_path / "archive"
    catalog_url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    port = devserver.free_port()
    env = {"PAI_PREFIX": str(prefix), "PAI_CATALOG": catalog_url}
    with devserver.run_server([sys.executable, str(script), str(port)], port, env) as site:
        url = site.url + "/archive"
        stored = requests.put(
            f"{url}/77", data=BODY, headers={"Last-Modified": LAST_MODIFIED}, timeout=TIMEOUT
        )
        assert stored.status_code == 201, stored.text
        catalog = GatewayCatalog(catalog_url)
        try:
            entry = catalog.entry(77)
        finally:
            catalog.close()
    assert entry is not None and entry.size == len(BODY) and entry.state == PRESENT
    assert entry.sha256 == hashlib.sha256(BODY).hexdigest()
