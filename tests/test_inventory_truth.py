"""The catalog's inventory stays true: rows describe the version on disk, drift is reported, /ready is honest.

Real servers on loopback in both run modes (``pacifica-like serve`` and uWSGI
with several processes), the real SQLite catalog read with ``sqlite3``, digests
read from the stored files. Races are ordered by a gate installed in the server
(``pacifica_like.inventory.before_record``, through a ``sitecustomize`` on the
server's PYTHONPATH) that blocks on FIFOs, never by sleeping.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import LAST_MODIFIED

from backends.base import read_sha256
from pacifica_like import devserver
from pacifica_like.config import DEFAULT_CATALOG_NAME
from pacifica_like.id2filename import id2filename

pytestmark = pytest.mark.live
TIMEOUT = 30
MODES = ("serve", "uwsgi")

GATE_MODULE = """
import os

_gate = os.environ.get("PL_TEST_RECORD_GATE")
if _gate:
    import pacifica_like.inventory as _inventory

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
def serving(mode: str, prefix: Path, env: dict[str, str] | None = None, processes: int = 4) -> Iterator[str]:
    """Yield the URL of the gateway on ``prefix`` in run mode ``mode`` (catalog on, delete allowed)."""
    env = {"PAI_PREFIX": str(prefix), "PAI_ALLOW_DELETE": "true", **(env or {})}
    if mode == "serve":
        with devserver.cli_server([], env=env) as running:
            yield running.url
    else:
        with devserver.uwsgi_server(env, processes=processes) as running:
            yield running.url


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


@pytest.fixture
def gate(tmp_path: Path) -> dict[str, str]:
    """Environment for a server whose upload of 1000 bytes stops between publish and record."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GATE_MODULE)
    fifos = tmp_path / "gate"
    fifos.mkdir()
    for name in ("arrived", "release"):
        os.mkfifo(fifos / name)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "PL_TEST_RECORD_GATE": str(fifos), "PL_TEST_RECORD_GATE_SIZE": "1000"}


@pytest.mark.parametrize("mode", MODES)
def test_an_older_upload_recording_last_leaves_the_row_of_the_newer_one(mode, prefix: Path, gate):
    """Upload A publishes, then B publishes and records, then A records: the row says B (on disk)."""
    first, second = b"a" * 1000, b"b" * 2000
    with serving(mode, prefix, gate) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(put, url, 7, first)
        # Blocks until the server's upload A is published and stopped at the gate.
        with open(Path(gate["PL_TEST_RECORD_GATE"]) / "arrived") as arrived:
            assert arrived.read() == "published\n"
        assert put(url, 7, second).status_code == 201
        assert catalog_row(prefix, 7) == (2000, hashlib.sha256(second).hexdigest())
        with open(Path(gate["PL_TEST_RECORD_GATE"]) / "release", "w") as release:
            release.write("go\n")
        assert held.result(timeout=TIMEOUT).status_code == 201
        assert assert_row_describes_disk(prefix, 7) == second
        assert markers(prefix) == []


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_uploads_to_one_id_leave_the_row_of_the_version_on_disk(mode, prefix: Path):
    """Many bounded rounds of concurrent PUTs of different bodies; after each, row == disk."""
    writers, rounds = 4, 15
    pool = concurrent.futures.ThreadPoolExecutor(writers)
    with serving(mode, prefix, processes=writers) as url, pool:
        for number in range(rounds):
            bodies = [bytes([65 + w]) * (1000 + 100 * w + number) for w in range(writers)]
            answers = list(pool.map(lambda body: put(url, 11, body), bodies))
            assert [a.status_code for a in answers] == [201] * writers
            assert assert_row_describes_disk(prefix, 11) in bodies


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


@pytest.mark.parametrize("mode", MODES)
def test_a_catalog_whose_write_lock_is_held_is_not_ready_until_released(mode, prefix: Path):
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


def chattr(flag: str, path: Path) -> bool:
    try:
        return (
            subprocess.run(["chattr", flag, str(path)], capture_output=True, timeout=TIMEOUT).returncode == 0
        )
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode", MODES)
def test_an_immutable_catalog_is_not_ready_until_writable_again(mode, prefix: Path):
    with serving(mode, prefix) as url:
        assert put(url, 1, b"x").status_code == 201
        catalog = catalog_path(prefix)
        if not chattr("+i", catalog):
            pytest.skip("chattr +i is not possible here (filesystem or capability)")
        try:
            status, document = ready(url)
            assert status == 503
            assert "not writable" in document["checks"]["catalog"]
        finally:
            assert chattr("-i", catalog)
        assert ready(url)[0] == 200
