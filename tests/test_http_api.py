"""The wire contract through HTTP, in process (WebTest over the real WSGI app)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from conftest import LAST_MODIFIED, LAST_MODIFIED_EPOCH, files_under, put

BODY = b"the quick brown fox jumps over the lazy dog\n" * 10


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def assert_json_error(response, status: int) -> dict:
    assert response.status_int == status, response.body
    assert response.content_type == "application/json"
    document = json.loads(response.body)
    assert document["status"] == status
    assert document["message"]
    assert "Traceback" not in response.text
    return document


def test_health_message_is_pacificas(app):
    response = app.get("/")
    assert response.status_int == 200
    assert response.json == {"message": "Pacifica Archive Interface Up and Running"}


def test_put_stores_bytes_at_the_sharded_path_with_mtime(app, prefix: Path):
    response = put(app, 12345, BODY)
    assert response.status_int == 201
    assert response.json == {"message": "File added to archive", "total_bytes": len(BODY)}
    stored = prefix / "39" / "3039"
    assert stored.read_bytes() == BODY
    assert stored.stat().st_mtime == LAST_MODIFIED_EPOCH
    assert files_under(prefix) == [stored]  # no temp file left behind


def test_a_new_shard_directory_is_flushed_into_its_parent_before_the_answer(
    app, prefix: Path, monkeypatch: pytest.MonkeyPatch
):
    """A file's name is durable only with its directory's: each directory an upload made is flushed."""
    flushed: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fsync)
    assert put(app, 0x123456, BODY).status_int == 201  # makes 56/ and 56/34/
    top, middle = prefix / "56", prefix / "56" / "34"
    assert (middle / "123456").read_bytes() == BODY
    # The file, its directory (the new entry), then the parents of the directories made (the
    # catalog, under the prefix, may flush its own directory after that).
    [temp] = [n for n, path in enumerate(flushed) if os.path.basename(path).startswith(".123456.")]
    assert flushed[temp + 1 : temp + 4] == [str(middle), str(top), str(prefix)]
    flushed.clear()
    assert put(app, 0x133456, BODY).status_int == 201  # into 56/34/ again: nothing made
    assert os.path.basename(flushed[0]).startswith(".133456.") and flushed[1] == str(middle)
    assert str(top) not in flushed


def test_flat_layout_when_id2filename_is_off(make_app, prefix: Path):
    app = make_app(use_id2filename=False)
    assert put(app, 12345, BODY).status_int == 201
    assert (prefix / "12345").read_bytes() == BODY
    assert app.head("/12345").headers["X-Pacifica-File"] == "12345"


def test_get_streams_the_file_with_identity_headers(app):
    put(app, 7, BODY)
    response = app.get("/7")
    assert response.status_int == 200
    assert response.body == BODY
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Length"] == str(len(BODY))
    assert response.headers["Last-Modified"] == LAST_MODIFIED
    assert response.headers["Accept-Ranges"] == "bytes"
    digest = hashlib.sha256(BODY).digest()
    assert response.headers["Repr-Digest"] == f"sha-256=:{b64(digest)}:"
    assert response.headers["ETag"] == f'"{digest.hex()}"'


def test_head_reports_pacifica_headers(app):
    put(app, 12345, BODY)
    response = app.head("/12345")
    assert response.status_int == 204
    headers = response.headers
    assert headers["X-Pacifica-Messsage"] == "File was found"
    assert headers["X-Pacifica-File"] == "39/3039"
    assert headers["X-Content-Length"] == str(len(BODY))
    assert float(headers["Last-Modified"]) == LAST_MODIFIED_EPOCH
    assert float(headers["X-Pacifica-Ctime"]) > 0
    assert headers["X-Pacifica-Bytes-Per-Level"] == f"({len(BODY)}, 0)"
    assert headers["X-Pacifica-File-Storage-Media"] == "disk"
    assert headers["Repr-Digest"] == f"sha-256=:{b64(hashlib.sha256(BODY).digest())}:"
    assert response.body == b""


@pytest.mark.parametrize(
    ("range_header", "status", "expected", "content_range"),
    [
        ("bytes=0-9", 206, BODY[:10], f"bytes 0-9/{len(BODY)}"),
        ("bytes=10-", 206, BODY[10:], f"bytes 10-{len(BODY) - 1}/{len(BODY)}"),
        ("bytes=-5", 206, BODY[-5:], f"bytes {len(BODY) - 5}-{len(BODY) - 1}/{len(BODY)}"),
        ("bytes=5-100000", 206, BODY[5:], f"bytes 5-{len(BODY) - 1}/{len(BODY)}"),
        ("bytes=0-1,5-6", 200, BODY, None),  # multiple ranges: whole file, as RFC 9110 allows
        ("items=0-1", 200, BODY, None),
    ],
)
def test_range_requests(app, range_header, status, expected, content_range):
    put(app, 8, BODY)
    response = app.get("/8", headers={"Range": range_header})
    assert response.status_int == status
    assert response.body == expected
    assert response.headers["Content-Length"] == str(len(expected))
    assert response.headers.get("Content-Range") == content_range


def test_unsatisfiable_range_is_416(app):
    put(app, 8, BODY)
    response = app.get("/8", headers={"Range": f"bytes={len(BODY)}-"}, expect_errors=True)
    assert_json_error(response, 416)
    assert response.headers["Content-Range"] == f"bytes */{len(BODY)}"


def test_if_range_with_a_stale_etag_gets_the_whole_file(app):
    put(app, 8, BODY)
    response = app.get("/8", headers={"Range": "bytes=0-1", "If-Range": '"stale"'})
    assert response.status_int == 200
    assert response.body == BODY


def test_pacifica_byte_range_is_half_open(app):
    put(app, 9, BODY)
    assert app.get("/9?byte_range=2-6").body == BODY[2:6]
    assert app.get(f"/9?byte_range=10-{len(BODY) + 50}").body == BODY[10:]
    assert_json_error(app.get("/9?byte_range=6-2", expect_errors=True), 400)
    assert_json_error(app.get("/9?byte_range=abc", expect_errors=True), 400)


def test_missing_file_is_404_on_every_read_verb_and_creates_nothing(app, prefix: Path):
    for response in (
        app.get("/4242", expect_errors=True),
        app.head("/4242", expect_errors=True),
        app.post("/4242", expect_errors=True),
    ):
        assert response.status_int == 404
    assert_json_error(app.get("/4242", expect_errors=True), 404)
    assert list(prefix.rglob("*")) == []  # not even a shard directory


def test_head_of_a_missing_id_carries_the_peers_not_found_headers(app):
    """Pacifica's cart service reads every status header of a HEAD, 404 or not (else a KeyError)."""
    put(app, 7, BODY)
    response = app.head("/4242", expect_errors=True)
    assert response.status_int == 404
    headers = response.headers
    assert headers["X-Pacifica-Messsage"] == "File Not found"
    for name in (
        "X-Pacifica-File",
        "X-Content-Length",
        "Last-Modified",
        "X-Pacifica-Ctime",
        "X-Pacifica-Bytes-Per-Level",
    ):
        assert headers[name] == "File Not Found", name
    # The one departure from the peer: cartd HEADs any other media forever (tests/test_cartd_client.py).
    assert headers["X-Pacifica-File-Storage-Media"] == "disk"
    assert headers["Content-Type"] == "application/json"
    # Only HEAD speaks the peer's header dialect; GET's 404 stays a plain JSON error.
    assert "X-Pacifica-File" not in app.get("/4242", expect_errors=True).headers
    assert app.head("/7").headers["X-Pacifica-Messsage"] == "File was found"


@pytest.mark.parametrize(
    "segment",
    [
        "abc",
        "-5",
        "+5",
        "007",
        "1.5",
        "1e3",
        "9223372036854775808",
        "99999999999999999999",
        "%2F..",
        "%2e%2e",
        " 5",
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"])
def test_bad_ids_are_400_on_every_verb_and_touch_nothing(app, prefix: Path, method, segment):
    response = app.request(
        f"/{segment}",
        method=method,
        headers={"Last-Modified": LAST_MODIFIED, "Content-Type": "application/json"},
        body=b'{"path": "/etc/passwd"}' if method in ("PUT", "PATCH") else b"",
        expect_errors=True,
    )
    assert response.status_int == 400, response.body
    if method != "HEAD":
        assert_json_error(response, 400)
    assert list(prefix.rglob("*")) == []


def test_largest_id_is_accepted(app, prefix: Path):
    assert put(app, 2**63 - 1, b"x").status_int == 201
    assert app.get(f"/{2**63 - 1}").body == b"x"


@pytest.mark.parametrize("path", ["/1/2", "/%2F../etc/passwd", "/a/b/c", "/1/", "//1"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_extra_segments_are_json_400_and_touch_nothing(app, prefix: Path, path, method):
    response = app.request(path, method=method, headers={"Last-Modified": LAST_MODIFIED}, expect_errors=True)
    assert_json_error(response, 400)
    assert list(prefix.rglob("*")) == []


def test_paths_given_to_cherrypy_answer_json(make_settings):
    """Mounted APIs (fallback_names) reach CherryPy, whose errors are JSON too."""
    import cherrypy
    import webtest

    from pacifica_like.storage import registry
    from pacifica_like.web.app import build_app

    settings = make_settings()
    api = build_app(settings, registry.create(settings)).app.app.files  # below the guard and WebDAV split
    # Not a mounted API (/api is the bulk API, whose errors are problem+json): CherryPy's own 404.
    api.fallback_names = frozenset({"extra"})
    response = webtest.TestApp(api).get("/extra/v1/nothing", expect_errors=True)
    assert_json_error(response, 404)
    assert isinstance(api.fallback, cherrypy.Application)


def test_unsupported_verb_is_405_with_allow(app):
    response = app.request("/5", method="MKCOL", expect_errors=True)
    assert_json_error(response, 405)
    assert "PUT" in response.headers["Allow"]


def test_put_on_root_is_405(app):
    assert_json_error(app.put("/", b"x", expect_errors=True), 405)


def test_put_without_last_modified_is_400_and_stores_nothing_when_required(make_app, prefix: Path):
    app = make_app(require_last_modified=True)
    response = app.put("/5", BODY, expect_errors=True)
    assert "Last-Modified" in assert_json_error(response, 400)["message"]
    assert files_under(prefix) == []


def test_put_without_last_modified_stores_the_file_with_the_upload_time(app, prefix: Path):
    """Clients written against the peer never send Last-Modified: the upload's start is the mtime."""
    before = time.time()
    response = app.put("/12345", BODY)
    after = time.time()
    assert response.status_int == 201
    assert response.json == {"message": "File added to archive", "total_bytes": len(BODY)}
    stored = prefix / "39" / "3039"
    assert stored.read_bytes() == BODY
    assert before <= stored.stat().st_mtime <= after
    assert before <= float(app.head("/12345").headers["Last-Modified"]) <= after


@pytest.mark.parametrize(
    "date", ["yesterday", "Sun, 32 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 25:49:37 GMT", ""]
)
def test_put_with_bad_date_is_400_and_stores_nothing(app, prefix: Path, date):
    response = put(app, 5, BODY, Last_Modified=date)
    assert_json_error(response, 400)
    assert files_under(prefix) == []


@pytest.mark.parametrize(
    "date",
    ["Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994", "Sun, 06 Nov 1994 10:49:37 +0200"],
)
def test_rfc850_asctime_and_offsets_set_the_same_mtime(app, prefix: Path, date):
    assert put(app, 12345, BODY, Last_Modified=date).status_int == 201
    assert (prefix / "39" / "3039").stat().st_mtime == LAST_MODIFIED_EPOCH


def test_overwrite_replaces_the_file(app, prefix: Path):
    put(app, 12345, b"old")
    response = put(app, 12345, b"new contents")
    assert response.status_int == 201
    assert response.json["total_bytes"] == len(b"new contents")
    assert app.get("/12345").body == b"new contents"
    assert files_under(prefix) == [prefix / "39" / "3039"]


def test_write_once_refuses_a_second_put_and_keeps_the_first(make_app, prefix: Path):
    app = make_app(write_once=True)
    assert put(app, 12345, b"first").status_int == 201
    assert_json_error(put(app, 12345, b"second"), 409)
    assert app.get("/12345").body == b"first"
    assert files_under(prefix) == [prefix / "39" / "3039"]


def test_empty_upload_stores_an_empty_file(app, prefix: Path):
    response = put(app, 300, b"")
    assert response.json["total_bytes"] == 0
    assert app.get("/300").body == b""


def digest_headers(body: bytes) -> list[dict[str, str]]:
    sha256, sha512, md5 = (hashlib.new(n, body).digest() for n in ("sha256", "sha512", "md5"))
    return [
        {"Repr-Digest": f"sha-256=:{b64(sha256)}:"},
        {"Content-Digest": f"sha-512=:{b64(sha512)}:"},
        {"Repr-Digest": f"unknown=:AAAA:, sha-256=:{b64(sha256)}:"},
        {"Digest": f"SHA-256={b64(sha256)}"},
        {"Content-MD5": b64(md5)},
    ]


@pytest.mark.parametrize("index", range(5))
def test_matching_digests_are_accepted(app, index):
    headers = digest_headers(BODY)[index]
    assert put(app, 77, BODY, **{k.replace("-", "_"): v for k, v in headers.items()}).status_int == 201
    assert app.get("/77").body == BODY


@pytest.mark.parametrize("index", range(5))
def test_digest_mismatch_is_422_and_keeps_the_previous_version(app, prefix: Path, index):
    put(app, 77, b"previous")
    headers = digest_headers(b"something else")[index]
    response = put(app, 77, BODY, **{k.replace("-", "_"): v for k, v in headers.items()})
    assert_json_error(response, 422)
    assert app.get("/77").body == b"previous"
    assert files_under(prefix) == [prefix / "file.4d"]


def test_digest_mismatch_on_a_new_id_stores_nothing(app, prefix: Path):
    response = put(app, 78, BODY, Repr_Digest=f"sha-256=:{b64(hashlib.sha256(b'x').digest())}:")
    assert_json_error(response, 422)
    assert_json_error(app.get("/78", expect_errors=True), 404)
    assert files_under(prefix) == []


@pytest.mark.parametrize(
    "headers",
    [{"Repr-Digest": "sha-256=:not base64!:"}, {"Repr-Digest": "sha-256=:AAAA:"}, {"Digest": "sha-256"}],
)
def test_malformed_digest_headers_are_400(app, prefix: Path, headers):
    response = put(app, 79, BODY, **{k.replace("-", "_"): v for k, v in headers.items()})
    assert_json_error(response, 400)
    assert files_under(prefix) == []


def test_short_body_is_400_and_stores_nothing(app, prefix: Path):
    put(app, 80, b"previous")
    response = app.put(
        "/80",
        b"only ten b",
        headers={"Last-Modified": LAST_MODIFIED, "Content-Length": "100"},
        expect_errors=True,
    )
    assert "10 of 100" in assert_json_error(response, 400)["message"]
    assert app.get("/80").body == b"previous"
    assert files_under(prefix) == [prefix / "file.50"]


def test_post_stages_an_existing_file(app):
    put(app, 12345, BODY)
    response = app.post("/12345")
    assert response.json == {"message": "File was staged", "file": "12345"}


def test_delete_is_405_unless_enabled(app, make_app, prefix: Path):
    put(app, 12345, BODY)
    response = app.delete("/12345", expect_errors=True)
    assert_json_error(response, 405)
    assert "DELETE" not in response.headers["Allow"]
    assert (prefix / "39" / "3039").exists()

    deleting = make_app(allow_delete=True)
    assert deleting.delete("/12345").json == {"message": "File Deleted", "file": "12345"}
    assert not (prefix / "39" / "3039").exists()
    assert_json_error(deleting.delete("/12345", expect_errors=True), 404)


# --- PATCH -----------------------------------------------------------------


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    directory = tmp_path / "incoming"
    directory.mkdir()
    return directory


def patch(app, file_id, document, content_type="application/json"):
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return app.request(
        f"/{file_id}", method="PATCH", body=body, headers={"Content-Type": content_type}, expect_errors=True
    )


def test_patch_moves_a_file_from_an_allowed_root(make_app, incoming: Path, prefix: Path):
    app = make_app(patch_roots=(str(incoming),))
    source = incoming / "upload.dat"
    source.write_bytes(BODY)
    os.utime(source, (LAST_MODIFIED_EPOCH, LAST_MODIFIED_EPOCH))
    response = patch(app, 12345, {"path": str(source)})
    assert response.status_int == 200
    assert response.json == {"message": "File Moved Successfully"}
    assert not source.exists()
    assert (prefix / "39" / "3039").read_bytes() == BODY
    head = app.head("/12345")
    assert head.headers["Repr-Digest"] == f"sha-256=:{b64(hashlib.sha256(BODY).digest())}:"
    assert float(head.headers["Last-Modified"]) == LAST_MODIFIED_EPOCH


def test_patch_outside_the_roots_is_403_and_leaves_the_source(make_app, incoming: Path, tmp_path: Path):
    app = make_app(patch_roots=(str(incoming),))
    outside = tmp_path / "elsewhere.dat"
    outside.write_bytes(BODY)
    assert_json_error(patch(app, 5, {"path": str(outside)}), 403)
    assert outside.read_bytes() == BODY
    # A path that climbs out of the root, and a symlink inside it pointing out, are outside too.
    assert_json_error(patch(app, 5, {"path": f"{incoming}/../elsewhere.dat"}), 403)
    (incoming / "link").symlink_to(outside)
    assert_json_error(patch(app, 5, {"path": str(incoming / "link")}), 403)
    assert outside.read_bytes() == BODY


def test_patch_without_roots_is_403(app, tmp_path: Path):
    source = tmp_path / "x"
    source.write_bytes(b"x")
    assert_json_error(patch(app, 5, {"path": str(source)}), 403)
    assert source.exists()


def test_patch_error_cases(make_app, incoming: Path):
    app = make_app(patch_roots=(str(incoming),))
    assert_json_error(patch(app, 5, {"path": str(incoming / "missing")}), 404)
    assert_json_error(patch(app, 5, b"{not json"), 400)
    assert_json_error(patch(app, 5, {"other": 1}), 400)
    assert_json_error(patch(app, 5, ["path"]), 400)
    assert_json_error(patch(app, 5, {"path": 5}), 400)
    assert_json_error(patch(app, 5, {"path": "relative/file"}), 400)
    assert_json_error(patch(app, 5, {"path": str(incoming)}), 403)  # the root itself is not a file in it
    (incoming / "dir").mkdir()
    assert_json_error(patch(app, 5, {"path": str(incoming / "dir")}), 400)
    assert_json_error(patch(app, 5, {"path": "x"}, content_type="text/plain"), 415)
    assert_json_error(patch(app, 5, b"", content_type=""), 415)


def test_patch_into_a_write_once_archive_refuses_an_existing_id(make_app, incoming: Path):
    app = make_app(patch_roots=(str(incoming),), write_once=True)
    put(app, 12345, b"first")
    source = incoming / "second"
    source.write_bytes(b"second")
    assert_json_error(patch(app, 12345, {"path": str(source)}), 409)
    assert source.read_bytes() == b"second"
    assert app.get("/12345").body == b"first"
