"""WebDAV for the grid, in process through both file API adapters: PROPFIND and OPTIONS on the
Pacifica door (``/``, ``/<id>``) and the ``/webdav/`` door with HTTP's usual HEAD, PUT and DELETE."""

from __future__ import annotations

import base64
import hashlib
import io
import tracemalloc
import zlib
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import webtest
from conftest import LAST_MODIFIED, LAST_MODIFIED_EPOCH, files_under, put

from pacifica_like.core.httpfields import format_http_date
from pacifica_like.storage import registry
from pacifica_like.web.app import build_app

BODY = b"a file the grid lists, sums and copies\n" * 50
DAV = "{DAV:}"
CHECKSUMS = "{http://www.dcache.org/2013/webdav}Checksums"
LOCALITY = "{urn:pacifica-like:webdav}locality"
ASK_EVERYTHING = (
    b'<?xml version="1.0"?><d:propfind xmlns:d="DAV:" xmlns:dc="http://www.dcache.org/2013/webdav" '
    b'xmlns:pl="urn:pacifica-like:webdav"><d:prop><d:getcontentlength/><d:getlastmodified/>'
    b"<d:resourcetype/><dc:Checksums/><pl:locality/><d:quota-used-bytes/></d:prop></d:propfind>"
)


def propfind(app: webtest.TestApp, path: str, depth: str | None = "0", body: bytes = b"", status: int = 207):
    headers = {"Depth": depth} if depth is not None else {}
    return app.request(path, method="PROPFIND", headers=headers, body=body, status=status, expect_errors=True)


def responses(answer) -> dict[str, dict[str, dict[str, Any]]]:
    """href -> {"200": {prop: element}, "404": {...}} from a multistatus body."""
    assert answer.status_int == 207
    assert answer.headers["Content-Type"].startswith("application/xml")
    root = ElementTree.fromstring(answer.body)
    assert root.tag == f"{DAV}multistatus"
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for response in root.findall(f"{DAV}response"):
        href = response.findtext(f"{DAV}href")
        assert href is not None
        by_status: dict[str, dict[str, Any]] = {}
        for propstat in response.findall(f"{DAV}propstat"):
            code = propstat.findtext(f"{DAV}status").split()[1]
            by_status[code] = {prop.tag: prop for prop in propstat.find(f"{DAV}prop")}
        found[href] = by_status
    return found


def adler32(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"


# -- the Pacifica door: PROPFIND and OPTIONS beside Pacifica's verbs --------------


def test_propfind_of_an_id_gives_size_date_and_type(app):
    put(app, 12345, BODY)
    found = responses(propfind(app, "/12345"))
    props = found["/12345"]["200"]
    assert props[f"{DAV}getcontentlength"].text == str(len(BODY))
    assert props[f"{DAV}getlastmodified"].text == LAST_MODIFIED
    assert list(props[f"{DAV}resourcetype"]) == []  # a file: no collection element
    assert props[f"{DAV}getetag"].text == f'"{hashlib.sha256(BODY).hexdigest()}"'
    assert props[f"{DAV}displayname"].text == "12345"
    assert props[f"{DAV}creationdate"].text.endswith("Z")
    assert CHECKSUMS not in props and LOCALITY not in props  # only when asked: they cost a lookup
    # Pacifica's HEAD is unchanged by the new verbs.
    head = app.head("/12345")
    assert head.status_int == 204
    assert head.headers["X-Content-Length"] == str(len(BODY))
    assert float(head.headers["Last-Modified"]) == LAST_MODIFIED_EPOCH


def test_propfind_of_named_properties_answers_unknown_ones_404(app):
    put(app, 8, BODY)
    found = responses(propfind(app, "/8", depth="1", body=ASK_EVERYTHING))["/8"]
    assert set(found["200"]) == {
        f"{DAV}getcontentlength", f"{DAV}getlastmodified", f"{DAV}resourcetype", CHECKSUMS, LOCALITY,
    }  # fmt: skip
    assert set(found["404"]) == {f"{DAV}quota-used-bytes"}
    assert found["200"][LOCALITY].text == "DISK"
    md5 = base64.b64encode(hashlib.md5(BODY).digest()).decode()
    sha = base64.b64encode(hashlib.sha256(BODY).digest()).decode()
    assert found["200"][CHECKSUMS].text == f"adler32={adler32(BODY)},md5={md5},sha-256={sha}"


def test_propname_lists_names_without_values(app):
    put(app, 9, BODY)
    body = b'<?xml version="1.0"?><propfind xmlns="DAV:"><propname/></propfind>'
    props = responses(propfind(app, "/9", body=body))["/9"]["200"]
    assert f"{DAV}getcontentlength" in props
    assert all(prop.text is None for prop in props.values())


def test_allprop_with_include_adds_checksums(app):
    put(app, 10, BODY)
    body = (
        b'<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:allprop/><d:include>'
        b'<x:Checksums xmlns:x="http://www.dcache.org/2013/webdav"/></d:include></d:propfind>'
    )
    props = responses(propfind(app, "/10", body=body))["/10"]["200"]
    assert props[CHECKSUMS].text.startswith(f"adler32={adler32(BODY)},")
    assert f"{DAV}getcontentlength" in props


def test_propfind_refusals(app):
    put(app, 11, BODY)
    assert propfind(app, "/404", status=404).json["status"] == 404
    assert "not XML" in propfind(app, "/11", body=b"<propfind", status=400).json["message"]
    assert "propfind element" in propfind(app, "/11", body=b"<x/>", status=400).json["message"]
    assert "Depth" in propfind(app, "/11", depth="2", status=400).json["message"]
    too_big = b"<propfind xmlns='DAV:'>" + b" " * (70 * 1024) + b"</propfind>"
    assert "over" in propfind(app, "/11", body=too_big, status=400).json["message"]
    # A collection of every file at infinite depth is refused; Depth 1 is the way to list.
    refused = propfind(app, "/", depth=None, status=403).json["message"]
    assert "Depth: infinity" in refused


def test_propfind_of_the_root_lists_every_id_at_depth_1_only(app):
    for file_id in (1, 2, 300):
        put(app, file_id, BODY[:file_id])
    shallow = responses(propfind(app, "/", depth="0"))
    assert list(shallow) == ["/"]
    assert [kind.tag for kind in shallow["/"]["200"][f"{DAV}resourcetype"]] == [f"{DAV}collection"]
    listed = responses(propfind(app, "/", depth="1"))
    assert sorted(listed) == ["/", "/1", "/2", "/300"]
    assert listed["/300"]["200"][f"{DAV}getcontentlength"].text == str(len(BODY[:300]))


def test_options_names_the_verbs_and_dav_class(app):
    answer = app.options("/5")
    assert answer.status_int == 200
    assert answer.headers["DAV"] == "1"
    assert answer.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PROPFIND, PUT"
    assert app.options("/").headers["Allow"] == "GET, HEAD, OPTIONS, PROPFIND"


def test_a_listing_streams_in_constant_memory(make_settings):
    """Depth 1 over 4,000 files: the body is produced as it is sent, not built whole first."""
    settings = make_settings()
    backend = registry.create(settings)
    for file_id in range(1, 4001):
        with backend.open_writer(file_id, LAST_MODIFIED_EPOCH) as writer:
            writer.write(b"x")
            writer.commit()
    app = build_app(settings, backend)
    seen: dict[str, Any] = {}
    environ = {
        "REQUEST_METHOD": "PROPFIND", "PATH_INFO": "/webdav/", "REQUEST_URI": "/webdav/", "SERVER_NAME": "t",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_DEPTH": "1", "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""), "wsgi.errors": io.StringIO(),
    }  # fmt: skip
    body = app(environ, lambda status, headers, exc_info=None: seen.update(status=status, headers=headers))
    assert seen["status"].startswith("207")
    assert "Content-Length" not in dict(seen["headers"])  # streamed
    tracemalloc.start()
    total, peak_chunk = 0, 0
    try:
        for chunk in body:
            total += len(chunk)
            peak_chunk = max(peak_chunk, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        getattr(body, "close", lambda: None)()
    assert total > 1_500_000  # 4,000 entries of some 400 bytes
    assert peak_chunk < 2_000
    assert peak < total / 2, (peak, total)


# -- the /webdav/ door ---------------------------------------------------------------


def test_webdav_head_is_http_head_with_length_and_date(app):
    put(app, 21, BODY)
    head = app.head("/webdav/21")
    assert head.status_int == 200
    assert head.headers["Content-Length"] == str(len(BODY))
    assert head.headers["Last-Modified"] == LAST_MODIFIED
    assert "X-Pacifica-File" not in head.headers
    assert app.get("/webdav/21").body == BODY
    assert app.get("/webdav/21", headers={"Range": "bytes=1-3"}).body == BODY[1:4]


def test_webdav_put_needs_no_date_and_says_created_or_replaced(make_app, prefix: Path):
    app = make_app(require_last_modified=True)  # the Pacifica door's rule, not the WebDAV door's
    created = app.put("/webdav/22", BODY)
    assert created.status_int == 201
    stored = prefix / app.head("/22").headers["X-Pacifica-File"]
    assert stored.read_bytes() == BODY
    replaced = app.put("/webdav/22", BODY[::-1])
    assert replaced.status_int == 204
    assert stored.read_bytes() == BODY[::-1]
    wrong = app.put("/webdav/22", b"other", headers={"Digest": "adler32=00000000"}, expect_errors=True)
    assert wrong.status_int == 422
    assert stored.read_bytes() == BODY[::-1]
    assert app.put("/22", BODY, expect_errors=True).status_int == 400  # still required on /<id>


def test_webdav_delete_follows_allow_delete(make_app, prefix: Path):
    app = make_app()
    put(app, 23, BODY)
    refused = app.delete("/webdav/23", expect_errors=True)
    assert refused.status_int == 405
    assert files_under(prefix) != []
    allowed = make_app(allow_delete=True)
    assert allowed.delete("/webdav/23").status_int == 204
    assert allowed.head("/webdav/23", expect_errors=True).status_int == 404


def test_webdav_propfind_lists_webdav_hrefs(app):
    put(app, 24, BODY)
    put(app, 25, BODY)
    listed = responses(propfind(app, "/webdav/", depth="1"))
    assert sorted(listed) == ["/webdav/", "/webdav/24", "/webdav/25"]
    assert responses(propfind(app, "/webdav", depth="0")).keys() == {"/webdav/"}
    one = responses(propfind(app, "/webdav/24", depth="0"))
    assert one["/webdav/24"]["200"][f"{DAV}getcontentlength"].text == str(len(BODY))


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/webdav/26", 405),
        ("PATCH", "/webdav/26", 405),
        ("MKCOL", "/webdav/new", 400),
        ("MKCOL", "/webdav/26", 405),
        ("GET", "/webdav/", 405),
        ("PUT", "/webdav/", 405),
        ("GET", "/webdav/abc", 400),
        ("GET", "/webdav/1/2", 400),
        ("GET", "/webdav/404", 404),
    ],
)
def test_webdav_refusals_are_json(app, prefix: Path, method: str, path: str, status: int):
    answer = app.request(path, method=method, body=b"x", expect_errors=True)
    assert answer.status_int == status
    assert answer.json["status"] == status
    assert files_under(prefix) == []


def test_webdav_options(app):
    answer = app.options("/webdav/5")
    assert answer.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS, PROPFIND, PUT"
    assert answer.headers["DAV"] == "1"


# -- tape: locality and checksums of a file that is only on tape ----------------------


def test_propfind_on_tape_reports_tape_locality_and_kept_checksums(make_tape, tmp_path: Path):
    from pacifica_like.storage.tape import operations

    backend = make_tape()
    with backend.open_writer(31, LAST_MODIFIED_EPOCH) as writer:
        writer.write(BODY)
        writer.commit()
    assert not operations.run_migrate(backend, operations.plan_migrate(backend, [31])).failed
    assert not operations.run_release(backend, operations.plan_release(backend, [31])).failed
    app = webtest.TestApp(build_app(backend.settings, backend))
    props = responses(propfind(app, "/webdav/31", body=ASK_EVERYTHING))["/webdav/31"]["200"]
    assert props[LOCALITY].text == "TAPE"
    assert props[CHECKSUMS].text.startswith(f"adler32={adler32(BODY)},md5=")
    assert props[f"{DAV}getcontentlength"].text == str(len(BODY))
    assert props[f"{DAV}getlastmodified"].text == format_http_date(LAST_MODIFIED_EPOCH)
    head = app.head("/31", headers={"Want-Digest": "adler32"})
    assert head.headers["Digest"] == f"adler32={adler32(BODY)}"
    assert head.headers["X-Pacifica-File-State"] == "OFFLINE"  # answered without a recall
