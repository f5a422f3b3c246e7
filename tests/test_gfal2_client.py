"""The real gfal2 command-line tools against a live ``pacifica-like serve`` on a tape archive.

gfal2's HTTP plugin speaks the WLCG Tape REST API: it reads
``/.well-known/wlcg-tape-rest-api``, then ``gfal-bringonline`` POSTs
``/api/v1/stage/`` and polls ``/api/v1/stage/<id>``, ``gfal-archivepoll`` POSTs
``/api/v1/archiveinfo/`` and ``gfal-evict`` POSTs ``/api/v1/release/<token>``
(``gfal2-placeholder-id`` without a token). Each test checks what the tools
print and exit with, and what the gateway then holds: the bytes a GET returns,
the stage request's file states, the pins in the catalog, and its access log.

gfal2 2.21 facts these tests rely on: ``gfal-bringonline`` exits 0 even when a
file FAILED (it prints ``URL => FAILED: reason``) and without
``--polling-timeout`` it only submits; it sends no ``diskLifetime`` (its
``--pin-lifetime`` is not passed on), so pins last ``default_pin_seconds``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bulk_helpers import MTIME, content, store_offline, wait_for
from conftest import init_tape_library

from pacifica_like.bulk.store import BulkStore
from pacifica_like.core.config import Settings, load_settings
from pacifica_like.storage import registry
from pacifica_like.storage.tape import operations
from pacifica_like.web.devserver import RunningServer, cli_server

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        shutil.which("gfal-bringonline") is None,
        reason="the gfal2 command-line tools are not installed (no gfal-bringonline on PATH); "
        ".ci/run and `make test` install them (apt-get install gfal2 gfal2-plugin-http "
        "python3-gfal2 python3-gfal2-util gfal2-util-scripts)",
    ),
]

TIMEOUT = 30.0
#: Debian's interpreter, where python3-gfal2 installs the bindings the gfal-* scripts import.
DEBIAN_PYTHON = "/usr/bin/python3"
MISSING = 424242

# Each test owns its file ids (one archive serves the whole module).
POLLED = (1, 2, 3)  # bring-online, waiting with --polling-timeout
SUBMITTED = (4, 5)  # bring-online, submit only
ON_TAPE_ONLY = 10  # migrated and released
ON_BOTH = 11  # migrated, still on disk
DISK_ONLY = 12  # never migrated
EVICTED = 20  # evict without a token
EVICTED_BY_TOKEN = (21, 22)  # evict with bring_online's token
WITH_MISSING = (30, 31)  # staged beside an id that does not exist
OFFLINE = (*POLLED, *SUBMITTED, ON_TAPE_ONLY, EVICTED, *EVICTED_BY_TOKEN, *WITH_MISSING)


def size_of(file_id: int) -> int:
    return 3000 + file_id


@dataclass
class Gateway:
    """The live server, its settings and the environment the gfal tools run in."""

    server: RunningServer
    settings: Settings
    env: dict[str, str]

    def url(self, file_id: int) -> str:
        return f"{self.server.url}/{file_id}"

    def gfal(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one gfal tool (``gfal-bringonline ...``) with a deadline; return its outcome."""
        tool, *rest = args
        return subprocess.run(
            [tool, "-t", str(int(TIMEOUT)), *rest],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT + 30,
        )

    def store(self) -> BulkStore:
        """The server's bulk catalog (the caller closes it)."""
        return BulkStore.open(self.settings.archive.catalog)

    def access_log(self) -> list[dict[str, Any]]:
        """The server's JSON access lines so far."""
        lines = (line for line in self.server.log().splitlines() if line.startswith("{"))
        return [entry for entry in map(json.loads, lines) if entry.get("log") == "access"]


def _write_ini(root: Path, library: str) -> Path:
    # A small time_scale keeps the emulated mounts, locates and reads real but short.
    ini = root / "archive.ini"
    ini.write_text(
        f"[archive]\nbackend = tape\nprefix = {root / 'archive'}\n"
        f"[tape]\nlibrary = {library}\nvolume_capacity = 64MiB\ntime_scale = 0.005\n"
        "[bulk]\nmount_min_files = 1\nmax_wait_seconds = 0\npoll_seconds = 0.05\n"
        "[server]\naccess_log = json\n",
        encoding="utf-8",
    )
    return ini


def _gfal_env() -> dict[str, str]:
    """The environment for the gfal-* scripts: pinned to Debian's python3 when it has the bindings.

    The scripts run the first ``python``/``python3`` on PATH that imports gfal2; a pyenv or
    virtualenv python3 earlier on PATH would send them to /usr/bin/python, absent on Debian 12.
    """
    env = dict(os.environ)
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        return env
    probe = subprocess.run(
        [DEBIAN_PYTHON, "-c", "import gfal2, gfal2_util"], capture_output=True, timeout=TIMEOUT
    )
    if probe.returncode == 0:
        env["GFAL_PYTHONBIN"] = DEBIAN_PYTHON
    return env


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One tape archive served by ``pacifica-like serve`` for the module's tests."""
    root = tmp_path_factory.mktemp("gfal2")
    library = str(root / "tape-library")
    init_tape_library(load_settings(flags={"tape": {"library": library}}, env={}))
    ini = _write_ini(root, library)
    settings = load_settings(config_file=str(ini), env={})
    backend = registry.create(settings)
    try:
        store_offline(backend, {i: size_of(i) for i in OFFLINE}, spread=2)
        for file_id in (ON_BOTH, DISK_ONLY):
            with backend.open_writer(file_id, MTIME) as writer:
                writer.write(content(file_id, size_of(file_id)))
                writer.commit()
        steps = operations.plan_migrate(backend, [ON_BOTH])
        assert not operations.run_migrate(backend, steps).failed
    finally:
        backend.close()
    with cli_server(["--config", str(ini)]) as server:
        yield Gateway(server, settings, _gfal_env())


# -- HTTP helpers ------------------------------------------------------------------


def call(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Send one request (POST when there is a body); return status and body."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read()


def localities(gateway: Gateway, *file_ids: int) -> dict[str, str]:
    status, body = call(f"{gateway.server.url}/api/v1/archiveinfo", {"paths": [f"/{i}" for i in file_ids]})
    assert status == 200, body
    return {entry["path"]: entry.get("locality", entry.get("error")) for entry in json.loads(body)}


def stage_request(gateway: Gateway, request_id: str) -> dict[str, Any]:
    status, body = call(f"{gateway.server.url}/api/v1/stage/{request_id}")
    assert status == 200, body
    return json.loads(body)


def completed_request(gateway: Gateway, request_id: str) -> dict[str, Any]:
    """Poll a stage request until every file is terminal (``completedAt`` appears); return it."""
    return wait_for(lambda: (d := stage_request(gateway, request_id)).get("completedAt") and d)


def request_holding(gateway: Gateway, file_id: int) -> str:
    """The id of the one stage request that names ``/<file_id>`` (each test stages its own ids)."""
    store = gateway.store()
    try:
        f = store.File
        (request_id,) = {r for (r,) in f.select(f.request_id).where(f.path == f"/{file_id}").tuples()}
    finally:
        store.close()
    return request_id


def pins_by_client(gateway: Gateway, file_id: int) -> dict[str, float]:
    """Client -> when its unexpired pin on ``file_id`` expires."""
    store = gateway.store()
    try:
        f, r = store.File, store.Request
        query = (
            f.select(r.client, f.pin_until)
            .join(r, on=f.request_id == r.id)
            .where((f.file_id == file_id) & (f.pin_until > time.time()))
            .tuples()
        )
        return dict(query)
    finally:
        store.close()


def pins(gateway: Gateway, *file_ids: int) -> dict[int, float]:
    store = gateway.store()
    try:
        return store.pins(file_ids)
    finally:
        store.close()


def assert_served(gateway: Gateway, *file_ids: int) -> None:
    """GET returns each file's bytes (so they are on disk: GET of an offline file answers 503)."""
    for file_id in file_ids:
        status, body = call(gateway.url(file_id))
        assert status == 200, (file_id, body[:200])
        assert body == content(file_id, size_of(file_id)), file_id


def outcome_lines(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """URL -> what gfal printed for it last (QUEUED, READY or ``=> FAILED: reason``)."""
    found = {}
    for line in done.stdout.splitlines():
        url, _, verdict = line.partition(" ")
        if url.startswith("http"):
            found[url] = verdict
    return found


def explain(done: subprocess.CompletedProcess[str], gateway: Gateway) -> str:
    return (
        f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}\nserver:\n"
        + (gateway.server.log()[-3000:])
    )


# -- bring-online ------------------------------------------------------------------


def test_bringonline_with_polling_timeout_waits_until_the_files_are_on_disk(gateway: Gateway, tmp_path: Path):
    assert set(localities(gateway, *POLLED).values()) == {"TAPE"}
    assert call(gateway.url(POLLED[0]))[0] == 503  # offline: GET does not recall
    listing = tmp_path / "surls"
    listing.write_text("".join(gateway.url(i) + "\n" for i in POLLED), encoding="utf-8")

    done = gateway.gfal("gfal-bringonline", "--polling-timeout", "20", "--from-file", str(listing))

    assert done.returncode == 0, explain(done, gateway)
    assert outcome_lines(done) == {gateway.url(i): "READY" for i in POLLED}, explain(done, gateway)
    document = stage_request(gateway, request_holding(gateway, POLLED[0]))
    assert {f["path"]: f["state"] for f in document["files"]} == {f"/{i}": "COMPLETED" for i in POLLED}
    assert document["summary"]["bytesDone"] == sum(map(size_of, POLLED))
    assert set(localities(gateway, *POLLED).values()) == {"DISK_AND_TAPE"}
    assert_served(gateway, *POLLED)
    # gfal2 sends no diskLifetime: the server's default pin holds each file.
    assert set(pins(gateway, *POLLED)) == set(POLLED)


def test_bringonline_without_polling_timeout_submits_and_the_recall_completes(gateway: Gateway):
    for file_id in SUBMITTED:
        done = gateway.gfal("gfal-bringonline", gateway.url(file_id))
        assert done.returncode == 0, explain(done, gateway)
        assert outcome_lines(done) == {gateway.url(file_id): "QUEUED"}, explain(done, gateway)

    request_ids = {request_holding(gateway, i) for i in SUBMITTED}
    assert len(request_ids) == len(SUBMITTED)  # one stage request per call
    for request_id in request_ids:
        document = completed_request(gateway, request_id)
        assert [f["state"] for f in document["files"]] == ["COMPLETED"]
    assert_served(gateway, *SUBMITTED)
    # A poll of the finished request through gfal2 itself reports READY at once.
    again = gateway.gfal("gfal-bringonline", "--polling-timeout", "5", gateway.url(SUBMITTED[0]))
    assert again.returncode == 0, explain(again, gateway)
    assert outcome_lines(again)[gateway.url(SUBMITTED[0])] == "READY", explain(again, gateway)


def test_bringonline_of_a_missing_id_fails_that_file_only(gateway: Gateway, tmp_path: Path):
    ids = (*WITH_MISSING, MISSING)
    listing = tmp_path / "surls"
    listing.write_text("".join(gateway.url(i) + "\n" for i in ids), encoding="utf-8")

    done = gateway.gfal("gfal-bringonline", "--polling-timeout", "20", "--from-file", str(listing))

    # gfal-bringonline reports per file and exits 0 whatever the files' fate.
    assert done.returncode == 0, explain(done, gateway)
    printed = outcome_lines(done)
    assert {printed[gateway.url(i)] for i in WITH_MISSING} == {"READY"}, explain(done, gateway)
    assert printed[gateway.url(MISSING)].startswith("=> FAILED:"), explain(done, gateway)
    assert "no such file in the archive" in printed[gateway.url(MISSING)]
    document = stage_request(gateway, request_holding(gateway, MISSING))
    files = {f["path"]: f for f in document["files"]}
    assert {path: f["state"] for path, f in files.items()} == {
        **{f"/{i}": "COMPLETED" for i in WITH_MISSING},
        f"/{MISSING}": "FAILED",
    }
    assert files[f"/{MISSING}"]["error"] == "no such file in the archive"
    assert_served(gateway, *WITH_MISSING)
    assert call(gateway.url(MISSING))[0] == 404


# -- archive poll ------------------------------------------------------------------


def test_archivepoll_reports_migrated_files_and_not_disk_only_ones(gateway: Gateway):
    assert localities(gateway, ON_TAPE_ONLY, ON_BOTH, DISK_ONLY) == {
        f"/{ON_TAPE_ONLY}": "TAPE",
        f"/{ON_BOTH}": "DISK_AND_TAPE",
        f"/{DISK_ONLY}": "DISK",
    }
    for file_id in (ON_TAPE_ONLY, ON_BOTH):
        done = gateway.gfal("gfal-archivepoll", gateway.url(file_id))
        assert done.returncode == 0, explain(done, gateway)
        assert outcome_lines(done) == {gateway.url(file_id): "READY"}, explain(done, gateway)

    # Not on tape yet: archiving is still to come, so gfal2 keeps it queued (EAGAIN), not READY.
    done = gateway.gfal("gfal-archivepoll", gateway.url(DISK_ONLY))
    assert done.returncode == 0, explain(done, gateway)
    assert outcome_lines(done) == {gateway.url(DISK_ONLY): "QUEUED"}, explain(done, gateway)

    done = gateway.gfal("gfal-archivepoll", gateway.url(MISSING))
    assert outcome_lines(done)[gateway.url(MISSING)].startswith("=> FAILED:"), explain(done, gateway)
    assert "no such file in the archive" in done.stdout


# -- evict -------------------------------------------------------------------------


def test_evict_without_a_token_drops_the_callers_pin_and_no_one_elses(gateway: Gateway):
    # Another client stages the same file: its pin must survive our evict.
    status, body = call(
        f"{gateway.server.url}/api/v1/stage",
        {"files": [{"path": f"/{EVICTED}"}]},
        {"X-Client-Id": "another-vo"},
    )
    assert status == 201, body
    other_request = json.loads(body)["requestId"]
    done = gateway.gfal("gfal-bringonline", "--polling-timeout", "20", gateway.url(EVICTED))
    assert outcome_lines(done) == {gateway.url(EVICTED): "READY"}, explain(done, gateway)
    completed_request(gateway, other_request)
    assert set(pins_by_client(gateway, EVICTED)) == {"127.0.0.1", "another-vo"}
    logged = len(gateway.access_log())

    done = gateway.gfal("gfal-evict", gateway.url(EVICTED))

    assert done.returncode == 0, explain(done, gateway)
    assert set(pins_by_client(gateway, EVICTED)) == {"another-vo"}
    (release,) = [e for e in gateway.access_log()[logged:] if e["path"].startswith("/api/v1/release/")]
    assert (release["method"], release["path"], release["status"]) == (
        "POST",
        "/api/v1/release/gfal2-placeholder-id",
        200,
    )
    assert_served(gateway, EVICTED)  # released pins free space later; the copy is still there now


BRING_ONLINE = """
import json, sys
import gfal2

context = gfal2.creat_context()
errors, token = context.bring_online(sys.argv[1:], 0, 60, True)
print(json.dumps({"token": token, "errors": [e.message if e else None for e in errors]}))
"""


def test_evict_with_the_bringonline_token_releases_that_requests_pin(gateway: Gateway):
    if "GFAL_PYTHONBIN" not in gateway.env:
        pytest.skip(f"python3-gfal2 is not importable by {DEBIAN_PYTHON}")
    first, second = EVICTED_BY_TOKEN
    # The CLI does not print bring_online's token; the bindings return it.
    started = subprocess.run(
        [DEBIAN_PYTHON, "-c", BRING_ONLINE, gateway.url(first)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert started.returncode == 0, started.stderr
    answer = json.loads(started.stdout)
    assert answer["errors"] == [None]
    token = answer["token"]
    document = completed_request(gateway, token)
    assert [(f["path"], f["state"]) for f in document["files"]] == [(f"/{first}", "COMPLETED")]
    status, body = call(f"{gateway.server.url}/api/v1/stage", {"files": [{"path": f"/{second}"}]})
    assert status == 201, body
    completed_request(gateway, json.loads(body)["requestId"])
    assert set(pins(gateway, first, second)) == {first, second}

    # A token whose request does not hold the file: the server answers 400, gfal2 EINVAL.
    refused = gateway.gfal("gfal-evict", gateway.url(second), token)
    assert refused.returncode == 22, explain(refused, gateway)
    assert "received 400" in refused.stderr
    assert set(pins(gateway, second)) == {second}

    done = gateway.gfal("gfal-evict", gateway.url(first), token)

    assert done.returncode == 0, explain(done, gateway)
    assert pins(gateway, first) == {}
    released = [(e["path"], e["status"]) for e in gateway.access_log() if e["path"].endswith(token)]
    assert (f"/api/v1/release/{token}", 200) in released
    assert_served(gateway, first)
