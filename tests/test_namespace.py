"""``[server] namespace``: a site publishes its files below a path (``/archive/12345``), and every
door names them there: the Pacifica door, the WebDAV door, the Tape REST API, and the real grid tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path
from xml.etree import ElementTree

import pytest
import webtest
from bulk_helpers import http, live_tape_ini, make_settings, poll, scheduler, states, store_offline, submit
from conftest import LAST_MODIFIED, put
from test_gfal2_client import _gfal_env, outcome_lines

from pacifica_like.core.config import ConfigError, load_settings
from pacifica_like.storage import registry
from pacifica_like.web.app import build_app
from pacifica_like.web.devserver import cli_server

BODY = b"published below a prefix\n" * 40


def hrefs(answer) -> list[str]:
    root = ElementTree.fromstring(answer.body)
    return sorted(element.text for element in root.iter("{DAV:}href"))


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("archive", "not an absolute path"),
        ("/a//b", "not an absolute path"),
        ("/a/../b", "not an absolute path"),
        ("/api", "which the gateway serves itself"),
        ("/webdav/x", "which the gateway serves itself"),
        ("/runs/2024", "ends in a number"),
        ("/my archive", "would have to encode"),
    ],
)
def test_a_namespace_that_cannot_work_fails_at_start(value: str, complaint: str):
    with pytest.raises(ConfigError, match=complaint) as refused:
        load_settings(flags={"server": {"namespace": value}}, env={})
    assert "namespace" in str(refused.value)


def namespaced_app(prefix: Path, file_api: str = "wsgi") -> webtest.TestApp:
    flags = {"archive": {"prefix": str(prefix)}, "server": {"namespace": "/archive/"}}
    settings = load_settings(flags=flags, env={})
    return webtest.TestApp(build_app(settings, registry.create(settings), file_api=file_api))


def test_the_pacifica_door_answers_below_the_namespace_too(file_api: str, prefix: Path, capsys):
    app = namespaced_app(prefix, file_api)
    assert put(app, 5, BODY).status_int == 201
    assert app.put("/archive/6", BODY[::-1], headers={"Last-Modified": LAST_MODIFIED}).status_int == 201
    assert app.get("/archive/5").body == BODY
    assert app.get("/6").body == BODY[::-1]  # the bare id still names the file
    head = app.head("/archive/6")
    assert head.status_int == 204 and head.headers["X-Content-Length"] == str(len(BODY))
    listing = app.request("/archive/", method="PROPFIND", headers={"Depth": "1"})
    assert hrefs(listing) == ["/archive/", "/archive/5", "/archive/6"]
    one = app.request("/archive/5", method="PROPFIND", headers={"Depth": "0"})
    assert hrefs(one) == ["/archive/5"]
    # Near misses are not the namespace: /archivex/5 is a path of two segments.
    assert app.get("/archivex/5", expect_errors=True).status_int == 400
    assert app.get("/archive/5/6", expect_errors=True).status_int == 400
    assert app.get("/archive/abc", expect_errors=True).status_int == 400
    # The access log names the whole path, and the id.
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("path") == "/archive/5" and line["method"] == "GET"]
    assert mine and mine[-1]["id"] == "5"
    assert (prefix / app.head("/5").headers["X-Pacifica-File"]).read_bytes() == BODY


def test_the_webdav_door_names_files_below_the_namespace(prefix: Path):
    app = namespaced_app(prefix)
    assert app.put("/webdav/archive/7", BODY).status_int == 201
    head = app.head("/webdav/archive/7")
    assert head.status_int == 200 and head.headers["Content-Length"] == str(len(BODY))
    assert app.get("/webdav/7").body == BODY
    listing = app.request("/webdav/archive/", method="PROPFIND", headers={"Depth": "1"})
    assert hrefs(listing) == ["/webdav/archive/", "/webdav/archive/7"]


def test_tape_rest_takes_paths_below_the_namespace(tmp_path: Path, prepare_backend):
    settings = make_settings(tmp_path, "tape", prepare_backend, server={"namespace": "/archive"})
    backend = registry.create(settings)
    try:
        store_offline(backend, {1: 100, 2: 200})
        app = http(settings, backend)
        info = app.post_json("/api/v1/archiveinfo", {"paths": ["/archive/1", "/2", "/archive/x"]}).json
        assert info[0] == {"path": "/archive/1", "locality": "TAPE"}
        assert info[1] == {"path": "/2", "locality": "TAPE"}
        assert "error" in info[2]
        request_id = submit(app, ["/archive/1", "/2"]).json["requestId"]
        scheduler(settings, backend).run_until_idle()
        assert states(poll(app, request_id)) == {"/archive/1": "COMPLETED", "/2": "COMPLETED"}
    finally:
        backend.close()


@pytest.mark.live
@pytest.mark.skipif(shutil.which("gfal-stat") is None, reason="gfal2's tools are not installed (see .ci/run)")
def test_grid_tools_on_urls_below_the_namespace(tmp_path: Path):
    ini = live_tape_ini(tmp_path, "[server]\nnamespace = /archive\n")
    source = tmp_path / "run.bin"
    data = os.urandom(20_000)
    source.write_bytes(data)
    env = _gfal_env()

    def gfal(*args: str) -> str:
        done = subprocess.run(
            [args[0], "-t", "30", *args[1:]], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    with cli_server(["--config", str(ini)]) as server:
        url = f"{server.url}/archive/61"
        gfal("gfal-copy", "-K", "ADLER32", f"file://{source}", url)
        assert "Size: 20000\tregular file" in gfal("gfal-stat", url)
        assert gfal("gfal-sum", url, "ADLER32").split()[1] == f"{zlib.adler32(data):08x}"
        # Tape REST through the same URL: archiveinfo of /archive/61 (on disk, not yet on tape).
        polled = subprocess.run(
            ["gfal-archivepoll", "-t", "30", url], env=env, capture_output=True, text=True, timeout=60
        )
        assert polled.returncode == 0, (polled.stdout, polled.stderr)
        assert outcome_lines(polled) == {url: "QUEUED"}
