"""Access and error logs: one JSON line per request on stderr, request ids, nothing secret.

In process through WebTest (lines read from the captured stderr), then live:
`pacifica-like serve` and uWSGI with four workers, lines read from the
server's own output.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import logging.handlers
import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import webtest
from conftest import LAST_MODIFIED, put

from pacifica_like.core.config import Settings
from pacifica_like.storage import registry
from pacifica_like.web import devserver, logs
from pacifica_like.web.app import build_app

TIMEOUT = 30
GENERATED_ID = re.compile(r"[0-9a-f]{16}")
SECRET = "Bearer s3cr3t-t0ken-do-not-log"


def lines(text: str, kind: str = "access") -> list[dict[str, Any]]:
    """The JSON log lines of one kind in ``text``; any other line that looks like ours fails the test."""
    found = []
    for line in text.splitlines():
        if line.startswith('{"time"'):
            record = json.loads(line)
            if record["log"] == kind:
                found.append(record)
    return found


def test_every_request_writes_one_json_line_with_its_fields(app, capsys):
    body = b"x" * 1234
    response = put(app, 42, body)
    got = app.get("/42")
    entries = lines(capsys.readouterr().err)
    assert [(e["method"], e["path"], e["id"], e["status"]) for e in entries] == [
        ("PUT", "/42", "42", 201),
        ("GET", "/42", "42", 200),
    ]
    stored, fetched = entries
    assert (stored["bytes_in"], stored["bytes_out"]) == (1234, len(response.body))
    assert (fetched["bytes_in"], fetched["bytes_out"]) == (0, 1234)
    assert stored["request_id"] == response.headers["X-Request-Id"]
    assert fetched["request_id"] == got.headers["X-Request-Id"]
    assert GENERATED_ID.fullmatch(stored["request_id"]) and stored["request_id"] != fetched["request_id"]
    assert 0 <= fetched["duration_ms"] < 10_000
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fetched["time"])
    assert list(fetched) == [
        "time", "log", "request_id", "remote", "method", "path", "id", "status", "bytes_in", "bytes_out",
        "duration_ms",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("request_id", "kept"),
    [
        ("3f2a9c1e-7b44-4c1d-9d2e-0a1b2c3d4e5f", True),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("has space", False),
        ('quote"inject', False),
        ("semi;colon", False),
        ("", False),
    ],
)
def test_a_sane_incoming_request_id_is_honoured_and_anything_else_replaced(app, capsys, request_id, kept):
    response = app.get("/", headers={"X-Request-Id": request_id})
    echoed = response.headers["X-Request-Id"]
    assert (echoed == request_id) is kept
    if not kept:
        assert GENERATED_ID.fullmatch(echoed)
    assert lines(capsys.readouterr().err)[-1]["request_id"] == echoed


def test_errors_carry_the_request_id_too(app, capsys):
    answers = [
        app.get("/404404", expect_errors=True),  # our 404
        app.get("/not-an-id", expect_errors=True),  # 400
        app.get("/metrics/nothing", expect_errors=True),  # CherryPy's 404
        app.request("/5", method="MKCOL", expect_errors=True),  # 405
    ]
    assert [a.status_int for a in answers] == [404, 400, 404, 405]
    entries = lines(capsys.readouterr().err)
    assert [e["request_id"] for e in entries] == [a.headers["X-Request-Id"] for a in answers]
    assert [e["status"] for e in entries] == [404, 400, 404, 405]


def test_a_500_is_logged_as_json_with_traceback_and_request_id(make_settings, capsys):
    settings = make_settings()
    backend = registry.create(settings)

    def broken(file_id: int) -> None:
        raise RuntimeError(f"bug while staging {file_id}")

    backend.stage = broken  # type: ignore[method-assign]
    app = webtest.TestApp(build_app(settings, backend))
    response = app.post("/9", headers={"X-Request-Id": "trace-500"}, expect_errors=True)
    assert response.status_int == 500
    assert response.headers["X-Request-Id"] == "trace-500"
    assert "Traceback" not in response.text
    err = capsys.readouterr().err
    (error,) = lines(err, "error")
    assert error["request_id"] == "trace-500"
    assert error["logger"] == "pacifica_like.error"
    assert error["error"] == "RuntimeError: bug while staging 9"
    assert "Traceback (most recent call last)" in error["traceback"]
    assert [(e["status"], e["request_id"]) for e in lines(err)] == [(500, "trace-500")]


def test_no_body_bytes_header_values_or_query_strings_reach_the_log(app, capsys):
    secret_body = b"PAYLOAD-that-must-never-be-logged" * 10
    put(app, 7, secret_body, Authorization=SECRET, Cookie=f"session={SECRET}")
    app.get(
        "/7?byte_range=0-10&token=query-secret", headers={"Authorization": SECRET, "Cookie": "c=query-secret"}
    )
    app.get("/7", headers={"Proxy-Authorization": SECRET}, expect_errors=True)
    err = capsys.readouterr().err
    assert len(lines(err)) == 3
    for leaked in ("s3cr3t", "PAYLOAD", "query-secret", "session="):
        assert leaked not in err


def test_junk_paths_are_logged_escaped_and_cut(app, capsys):
    app.get("/" + "a%1B%5B31m%0A" * 100, expect_errors=True)  # escape codes and newlines, decoded
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1  # the newlines in the path did not split the line
    (entry,) = lines(err)
    assert entry["path"] == ("/" + "a\x1b[31m\n" * 100)[:256]
    assert entry["id"] is None


def with_access_log(settings: Settings, access_log: str) -> Settings:
    return dataclasses.replace(settings, server=dataclasses.replace(settings.server, access_log=access_log))


def test_text_format_and_off(make_settings, capsys):
    settings = with_access_log(make_settings(), "text")
    app = webtest.TestApp(build_app(settings, registry.create(settings)))
    rid = app.get("/", headers={"X-Request-Id": "plain-1"}).headers["X-Request-Id"]
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(rf"\S+Z None {rid} 'GET' '/' 200 in=0 out=56 \d+\.\d{{3}}ms", line), line

    off = with_access_log(settings, "off")
    backend = registry.create(off)
    backend.stage = lambda file_id: 1 / 0  # type: ignore[method-assign]
    app = webtest.TestApp(build_app(off, backend))
    app.get("/")
    assert app.post("/3", expect_errors=True).status_int == 500
    err = capsys.readouterr().err
    # No access lines, but errors are still logged.
    assert lines(err) == []
    assert [e["error"] for e in lines(err, "error")] == ["ZeroDivisionError: division by zero"]
    logs.install("json")  # back to the default for the tests that follow


def test_the_fast_path_and_log_records_write_the_same_line(app, capsys, monkeypatch):
    """Alone on the logger, our handler writes lines itself; with company, records go to everyone."""
    logger = logging.getLogger(logs.ACCESS_LOGGER)
    records = []
    make_record = logger.makeRecord
    monkeypatch.setattr(logger, "makeRecord", lambda *a, **k: records.append(a) or make_record(*a, **k))
    others = [h for h in logger.handlers if not isinstance(h, logs.StderrLineHandler)]  # pytest's own
    buffer = logging.handlers.BufferingHandler(10)
    fixed = {"X-Request-Id": "same-line"}
    for handler in others:
        logger.removeHandler(handler)
    try:
        app.get("/", headers=fixed)
        fast = capsys.readouterr().err
        assert records == []  # no LogRecord was made
        logger.addHandler(buffer)
        app.get("/", headers=fixed)
        slow = capsys.readouterr().err
    finally:
        logger.removeHandler(buffer)
        for handler in others:
            logger.addHandler(handler)
    assert len(records) == 1
    assert [r.getMessage() for r in buffer.buffer] == ["GET / 200"]
    (fast_entry,), (slow_entry,) = lines(fast), lines(slow)
    for entry in (fast_entry, slow_entry):
        del entry["time"], entry["duration_ms"]
    assert fast_entry == slow_entry


# -- live servers ---------------------------------------------------------------------------------------


@pytest.fixture(params=["cli", "uwsgi"])
def server(request, tmp_path: Path):
    """The service on a free port, as `pacifica-like serve` and under uWSGI with four workers."""
    prefix = str(tmp_path / "archive")
    if request.param == "cli":
        with devserver.cli_server(["--prefix", prefix]) as running:
            yield running
    else:
        with devserver.uwsgi_server({"PAI_PREFIX": prefix}, processes=4) as running:
            yield running


@pytest.mark.live
def test_live_servers_log_every_request_once_with_unique_ids(server, tmp_path: Path):
    body = b"live bytes\n" * 100
    stored = requests.put(f"{server.url}/31", data=body, headers={"Last-Modified": LAST_MODIFIED},
                          timeout=TIMEOUT)  # fmt: skip
    assert stored.status_code == 201
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: requests.get(f"{server.url}/31", timeout=TIMEOUT), range(120)))
    answers += [
        requests.get(f"{server.url}/32", timeout=TIMEOUT),
        requests.get(f"{server.url}/31", headers={"X-Request-Id": "client-chosen-1"}, timeout=TIMEOUT),
        requests.get(f"{server.url}/ready", timeout=TIMEOUT),
    ]
    ids = [a.headers["X-Request-Id"] for a in [stored, *answers]]
    assert len(set(ids)) == len(ids)  # unique across threads and worker processes
    assert ids[-2] == "client-chosen-1"
    # A line is written as its answer completes; give the last ones a moment to land.
    entries: list[dict[str, Any]] = []
    for _ in range(50):
        entries = [e for e in lines(server.log()) if e["request_id"] in set(ids)]
        if len(entries) >= len(ids):
            break
        time.sleep(0.1)
    by_id = {e["request_id"]: e for e in entries}
    assert len(entries) == len(ids) == len(by_id)  # once each
    assert by_id[ids[0]]["bytes_in"] == len(body) and by_id[ids[0]]["status"] == 201
    assert {by_id[i]["bytes_out"] for i in ids[1:121]} == {len(body)}
    assert by_id[ids[-3]]["status"] == 404
    assert by_id[ids[-1]]["path"] == "/ready"
    assert all(e["remote"] == "127.0.0.1" for e in entries)
