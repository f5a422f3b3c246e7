"""The catalog's inventory stays true: rows describe the version on disk, drift is reported, /ready is honest.

Real servers on loopback in both run modes (``pacifica-like serve`` and uWSGI
with several processes), the real SQLite catalog read with ``sqlite3``, digests
read from the stored files. Races are ordered by a gate installed in the server
(``pacifica_like.gateway.inventory.before_record``, through a ``sitecustomize`` on the
server's PYTHONPATH) that blocks on FIFOs, never by sleeping.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import LAST_MODIFIED
from dbservers import scratch_database

from pacifica_like.core.config import DEFAULT_CATALOG_NAME
from pacifica_like.core.ids import id2filename
from pacifica_like.gateway.catalog import GatewayCatalog
from pacifica_like.gateway.leftovers import running_since
from pacifica_like.storage.contract import read_sha256
from pacifica_like.web import devserver

pytestmark = pytest.mark.live
TIMEOUT = 30
MODES = ("serve", "uwsgi")

GATE_MODULE = """
import os

_gate = os.environ.get("PL_TEST_RECORD_GATE")
if _gate:
    import pacifica_like.gateway.inventory as _inventory

    _hold = int(os.environ["PL_TEST_RECORD_GATE_SIZE"])

    def _before_record(file_id, size):
        if size != _hold:
            return
        with open(os.path.join(_gate, "arrived"), "w") as signal:
            signal.write("published\\n")
        with open(os.path.join(_gate, "release")) as wait:
            wait.read()

    _inventory.before_record = _before_record
"""


@contextlib.contextmanager
def running(
    mode: str, prefix: Path, env: dict[str, str] | None = None, processes: int = 2
) -> Iterator[devserver.RunningServer]:
    """Run the gateway on ``prefix`` in run mode ``mode`` (catalog on, delete allowed)."""
    env = {"PAI_PREFIX": str(prefix), "PAI_ALLOW_DELETE": "true", **(env or {})}
    if mode == "serve":
        with devserver.cli_server([], env=env) as server:
            yield server
    else:
        with devserver.uwsgi_server(env, processes=processes) as server:
            yield server


@contextlib.contextmanager
def serving(mode: str, prefix: Path, env: dict[str, str] | None = None, processes: int = 2) -> Iterator[str]:
    """Yield the URL of the gateway on ``prefix`` in run mode ``mode``."""
    with running(mode, prefix, env, processes) as server:
        yield server.url


def catalog_path(prefix: Path) -> Path:
    return prefix / DEFAULT_CATALOG_NAME


def catalog_row(prefix: Path, file_id: int) -> tuple[int, str | None] | None:
    """(size, sha-256 hex) of the inventory row, read from the SQLite file itself."""
    with contextlib.closing(sqlite3.connect(catalog_path(prefix), timeout=TIMEOUT)) as db:
        row = db.execute("SELECT size, sha256 FROM inventory WHERE file_id = ?", (file_id,)).fetchone()
    return None if row is None else (row[0], row[1])


def markers(prefix: Path) -> list[tuple[int, str, str]]:
    with contextlib.closing(sqlite3.connect(catalog_path(prefix), timeout=TIMEOUT)) as db:
        return db.execute("SELECT file_id, verb, owner FROM operation WHERE file_id >= 0").fetchall()


def on_disk(prefix: Path, file_id: int) -> tuple[int, str, str]:
    """(size, sha-256 of the bytes, sha-256 in the digest xattr) of the stored file."""
    path = prefix / id2filename(file_id)[1:]
    data = path.read_bytes()
    recorded = read_sha256(str(path))
    return len(data), hashlib.sha256(data).hexdigest(), recorded.hex() if recorded else ""


def put(url: str, file_id: int, body: bytes) -> requests.Response:
    return requests.put(
        f"{url}/{file_id}", data=body, headers={"Last-Modified": LAST_MODIFIED}, timeout=TIMEOUT
    )


def assert_row_describes_disk(prefix: Path, file_id: int) -> bytes:
    size, actual, recorded = on_disk(prefix, file_id)
    assert actual == recorded
    assert catalog_row(prefix, file_id) == (size, actual)
    return (prefix / id2filename(file_id)[1:]).read_bytes()


# -- commit order ------------------------------------------------------------------


def make_gate(root: Path) -> dict[str, str]:
    """Environment for a server whose upload of 1000 bytes stops between publish and record."""
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GATE_MODULE)
    fifos = root / "gate"
    fifos.mkdir()
    for name in ("arrived", "release"):
        os.mkfifo(fifos / name)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "PL_TEST_RECORD_GATE": str(fifos), "PL_TEST_RECORD_GATE_SIZE": "1000"}


@pytest.fixture
def gate(tmp_path: Path) -> dict[str, str]:
    return make_gate(tmp_path)


def race_out_of_order(url: str, gate: dict[str, str], file_id: int, check_row) -> bytes:
    """Upload A publishes, then B publishes and records, then A records; return B's body."""
    first, second = b"a" * 1000, b"b" * 2000
    fifos = Path(gate["PL_TEST_RECORD_GATE"])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(put, url, file_id, first)
        # Blocks until the server's upload A is published and stopped at the gate.
        with open(fifos / "arrived") as arrived:
            assert arrived.read() == "published\n"
        assert put(url, file_id, second).status_code == 201
        assert check_row() == (2000, hashlib.sha256(second).hexdigest())
        with open(fifos / "release", "w") as release:
            release.write("go\n")
        assert held.result(timeout=TIMEOUT).status_code == 201
    return second


@pytest.fixture(scope="module", params=MODES)
def gated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(url, prefix, gate env) of a server in each run mode, shared by the commit-order tests."""
    root = tmp_path_factory.mktemp("gated")
    env = make_gate(root)
    with serving(request.param, root / "archive", env, processes=4) as url:
        yield url, root / "archive", env


def test_an_older_upload_recording_last_leaves_the_row_of_the_newer_one(gated):
    """The row says the version on disk (B), although A recorded last."""
    url, prefix, gate = gated
    second = race_out_of_order(url, gate, 7, lambda: catalog_row(prefix, 7))
    assert assert_row_describes_disk(prefix, 7) == second
    assert [m for m in markers(prefix) if m[0] == 7] == []


def test_concurrent_uploads_to_one_id_leave_the_row_of_the_version_on_disk(gated):
    """Many bounded rounds of concurrent PUTs of different bodies; after each, row == disk."""
    url, prefix, _ = gated
    writers, rounds = 4, 15
    with concurrent.futures.ThreadPoolExecutor(writers) as pool:
        for number in range(rounds):
            bodies = [bytes([65 + w]) * (1001 + 100 * w + number) for w in range(writers)]
            answers = list(pool.map(lambda body: put(url, 11, body), bodies))
            assert [a.status_code for a in answers] == [201] * writers
            assert assert_row_describes_disk(prefix, 11) in bodies


@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
def test_commit_order_holds_on_database_servers(kind, prefix: Path, gate):
    """uWSGI processes on a MariaDB or PostgreSQL catalog: records out of order, then PUTs racing a DELETE."""
    with scratch_database(kind, "pl_truth") as url:
        catalog = GatewayCatalog(url)

        def row(file_id: int) -> tuple[int, str | None] | None:
            entry = catalog.entry(file_id)
            return None if entry is None else (entry.size, entry.sha256)

        pool = concurrent.futures.ThreadPoolExecutor(4)
        with serving("uwsgi", prefix, {**gate, "PAI_CATALOG": url}, processes=4) as url_, pool:
            second = race_out_of_order(url_, gate, 7, lambda: row(7))
            assert row(7) == (2000, hashlib.sha256(second).hexdigest())

            def delete(number: int) -> int:
                return requests.delete(f"{url_}/12", timeout=TIMEOUT).status_code

            for number in range(10):
                bodies = [bytes([67 + w]) * (1200 + 10 * w + number) for w in range(3)]
                puts = [pool.submit(put, url_, 12, body) for body in bodies]
                deleted = pool.submit(delete, number)
                assert [p.result().status_code for p in puts] == [201] * 3
                assert deleted.result() in (200, 404)
                path = prefix / id2filename(12)[1:]
                if path.exists():
                    size, actual, _ = on_disk(prefix, 12)
                    assert row(12) == (size, actual)
                else:
                    assert row(12) is None
        catalog.close()


# -- /ready ------------------------------------------------------------------------


def ready(url: str) -> tuple[int, dict]:
    answer = requests.get(f"{url}/ready", timeout=TIMEOUT)
    return answer.status_code, answer.json()


@pytest.mark.parametrize("mode", MODES)
def test_a_deleted_catalog_is_not_ready_and_takes_no_upload_until_restored(mode, prefix: Path):
    """The path no longer names the catalog the workers have open: 503, never a 201 into the unlinked file."""
    with serving(mode, prefix) as url:
        assert put(url, 1, b"before").status_code == 201
        catalog = catalog_path(prefix)
        kept = prefix / "catalog-backup"
        os.link(catalog, kept)
        catalog.unlink()
        for _ in range(8):  # every worker of the uWSGI server, with all likelihood
            status, document = ready(url)
            assert status == 503
            assert "deleted while in use" in document["checks"]["catalog"]
        refused = put(url, 2, b"into the void")
        assert refused.status_code == 503
        assert not (prefix / id2filename(2)[1:]).exists()
        assert not catalog.exists()
        os.rename(kept, catalog)  # restored
        for _ in range(8):
            status, document = ready(url)
            assert (status, document["checks"]["catalog"]) == (200, "ok")
        assert put(url, 2, b"recorded").status_code == 201
        assert_row_describes_disk(prefix, 2)
        assert_row_describes_disk(prefix, 1)


def chattr(flag: str, path: Path) -> bool:
    try:
        done = subprocess.run(["chattr", flag, str(path)], capture_output=True, timeout=TIMEOUT)
    except FileNotFoundError:
        return False
    return done.returncode == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_catalog_that_cannot_take_a_write_is_not_ready_until_it_can(mode, prefix: Path):
    """A write lock held by another connection, then an immutable file (chattr +i): 503, then 200."""
    with serving(mode, prefix) as url:
        assert put(url, 1, b"x").status_code == 201
        assert ready(url)[0] == 200
        holder = sqlite3.connect(catalog_path(prefix), timeout=TIMEOUT, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            status, document = ready(url)
            assert status == 503
            assert "write lock" in document["checks"]["catalog"]
            assert document["reason"].startswith("catalog: ")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert ready(url)[0] == 200

        catalog = catalog_path(prefix)
        if not chattr("+i", catalog):
            pytest.skip("chattr +i is not possible here (filesystem or capability); the lock case passed")
        try:
            status, document = ready(url)
            assert status == 503
            assert "not writable" in document["checks"]["catalog"]
        finally:
            assert chattr("-i", catalog)
        status, document = ready(url)
        assert status == 200, document


# -- leftovers of dead uploads -------------------------------------------------------

HALF = 3 << 20


def temp_files(prefix: Path, file_id: int) -> list[Path]:
    path = prefix / id2filename(file_id)[1:]
    return sorted(path.parent.glob(f".{path.name}.*.part")) if path.parent.exists() else []


def wait_for(condition, timeout: float = TIMEOUT) -> None:
    """Wait until the server has reached a state we can observe (a file on disk, a row)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.02)


def half_upload(url: str, file_id: int, total: int = 2 * HALF) -> socket.socket:
    """Start a PUT on a raw socket and send only its first HALF bytes; the caller holds the socket."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    head = (
        f"PUT /{file_id} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {total}\r\n"
        f"Last-Modified: {LAST_MODIFIED}\r\n\r\n"
    )
    sock.sendall(head.encode() + b"h" * HALF)
    return sock


def upload_under_way(prefix: Path, file_id: int) -> bool:
    """The server has its temp file, with data: the state a kill -9 freezes (an upload writes no marker)."""
    temps = temp_files(prefix, file_id)
    return bool(temps) and temps[0].stat().st_size >= 1 << 20


def writer_pid(temp: Path) -> int:
    """The pid in a temp file's name (``.<name>.<pid>-<start>@<host>.<random>.part``; names hold dots)."""
    return int(re.search(r"\.(\d+)-\d+@", temp.name).group(1))


def kill_mid_upload(prefix: Path, file_id: int) -> Path:
    """Store a version of ``file_id``, then kill -9 a uWSGI server in the middle of replacing it."""
    with running("uwsgi", prefix) as server:
        assert put(server.url, file_id, b"the version before").status_code == 201
        with contextlib.closing(half_upload(server.url, file_id)):
            wait_for(lambda: upload_under_way(prefix, file_id))
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=TIMEOUT)
    [temp] = temp_files(prefix, file_id)
    # The worker that was writing dies once the signal is delivered (a zombie counts as dead).
    wait_for(lambda: running_since(writer_pid(temp)) == "?")
    assert temp.stat().st_size >= 1 << 20
    assert markers(prefix) == []  # the temp file is the upload's only marker
    return temp


@pytest.mark.parametrize("mode", MODES)
def test_a_killed_upload_leaves_the_version_before_served_and_recorded(mode, prefix: Path):
    """The next start does not walk the archive for the hidden temp file (the next audit removes it)."""
    temp = kill_mid_upload(prefix, 21)
    with running(mode, prefix) as server:
        assert requests.get(f"{server.url}/21", timeout=TIMEOUT).content == b"the version before"
        assert assert_row_describes_disk(prefix, 21) == b"the version before"
        assert put(server.url, 21, b"after").status_code == 201
        assert assert_row_describes_disk(prefix, 21) == b"after"
        assert temp.exists() and "start-up sweep" not in server.log()


def audit(prefix: Path, reports: Path, name: str, *argv: str) -> tuple[int, dict]:
    """Run ``pacifica-like audit`` in its own process over ``prefix``; return its status and summary."""
    reports.mkdir(exist_ok=True)
    env = {**os.environ, "PAI_PREFIX": str(prefix)}
    command = [sys.executable, "-m", "pacifica_like", "audit", "--name", name, "--ignore-age", "0", *argv]
    done = subprocess.run(command, cwd=reports, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads((reports / f"{name}_summary.json").read_text())


def test_the_audit_reports_a_killed_uploads_leftovers_and_fix_removes_them(prefix: Path, tmp_path: Path):
    temp = kill_mid_upload(prefix, 22)
    reports = tmp_path / "reports"
    status, summary = audit(prefix, reports, "k")
    assert (status, summary["verdict"]) == (1, "drift")
    found = summary["leftovers"]
    assert (found["temp_files"], found["dead_markers"], found["removed"]) == (1, 0, False)
    assert found["temp_bytes"] == temp.stat().st_size
    assert (reports / "k_leftover.txt").read_text() == f"{temp.relative_to(prefix)}\n"
    assert temp.exists()  # a report changes nothing

    status, summary = audit(prefix, reports, "k", "--fix")
    assert summary["fix"]["leftovers_removed"]["temp_files"] == 1
    assert not temp.exists()
    assert assert_row_describes_disk(prefix, 22) == b"the version before"
    status, summary = audit(prefix, reports, "k2")
    assert (status, summary["verdict"]) == (0, "ok")


def test_an_upload_in_flight_in_another_live_process_is_left_alone(prefix: Path, tmp_path: Path):
    """A second server starting on the archive, and an audit --fix, do not touch a live upload's temp file."""
    with running("uwsgi", prefix) as first:
        assert put(first.url, 1, b"x").status_code == 201
        sock = half_upload(first.url, 23, total=HALF + 5)
        with contextlib.closing(sock):
            wait_for(lambda: upload_under_way(prefix, 23))
            [temp] = temp_files(prefix, 23)
            with running("serve", prefix) as second:
                assert "start-up sweep" not in second.log()
            (prefix / "99").mkdir(exist_ok=True)
            (prefix / "99" / "stray").write_bytes(b"x")  # some drift, so that --fix acts
            _, summary = audit(prefix, tmp_path / "reports", "live", "--fix", "--max-orphan-fraction", "1")
            assert summary["leftovers"]["temp_files"] == 0
            assert temp.exists()  # its writer lives: the listing found it, the audit left it
            assert markers(prefix) == []
            sock.sendall(b"tail!")
            sock.shutdown(socket.SHUT_WR)
            assert b" 201 " in sock.recv(65536).split(b"\r\n")[0] + b" "
    assert assert_row_describes_disk(prefix, 23) == b"h" * HALF + b"tail!"
    assert temp_files(prefix, 23) == []
