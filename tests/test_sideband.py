"""The sideband backend on SQLite and real MariaDB: rows kept true, HEAD from the database, load, outages.

Every test that touches the database runs twice (``db`` fixture: ``sqlite`` and
``mysql``); the MariaDB half is skipped, saying why, where no server is
reachable (tests/dbservers.py), and fails instead in CI. Rows are read back
through a connection of the test's own, never through the backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import webtest
from conftest import LAST_MODIFIED, LAST_MODIFIED_EPOCH, corrupt, init_tape_library
from dbservers import scratch_database
from playhouse.db_url import connect

from pacifica_like.cli.main import main
from pacifica_like.core.config import load_settings
from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.storage import registry
from pacifica_like.storage.sideband.backend import ExternalSidebandBackend, SidebandBackend
from pacifica_like.storage.sideband.identity import generation, name_hash
from pacifica_like.storage.tape import operations
from pacifica_like.storage.tape.backend import TapeBackend
from pacifica_like.web.app import build_app
from pacifica_like.web.devserver import uwsgi_binary, uwsgi_server

TIMEOUT = 10


@pytest.fixture(params=["sqlite", "mysql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty sideband database: a SQLite file, or a scratch MariaDB database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sideband.sqlite'}"
    else:
        with scratch_database("mysql", "pl_sideband") as url:
            yield url


@pytest.fixture
def make_sideband(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Build sideband backends over one library and SAM-QFS directory in tmp_path (closed at the end)."""
    built: list[Any] = []

    def build(url: str, hsm: str = "emulator", sideband: dict[str, Any] | None = None, **archive: Any) -> Any:
        tape = {"library": str(tmp_path / "library"), "time_scale": 0.0, "volume_capacity": 64 << 20}
        flags = {
            "archive": {
                "backend": "sideband",
                "prefix": str(tmp_path / "gateway"),
                "catalog": "off",
                **archive,
            },
            "tape": tape,
            "sideband": {
                "database": url,
                "sam_qfs_prefix": str(tmp_path / "qfs"),
                "hsm": hsm,
                **(sideband or {}),
            },
        }
        settings = init_tape_library(load_settings(flags=flags, env={}))
        built.append(registry.create(settings))
        return built[-1]

    yield build
    for backend in built:
        backend.close()


def store(backend: Any, file_id: int, data: bytes) -> None:
    with backend.open_writer(file_id, LAST_MODIFIED_EPOCH) as writer:
        writer.write(data)
        writer.commit()


def migrate(backend: TapeBackend, *ids: int) -> None:
    outcome = operations.run_migrate(backend, operations.plan_migrate(backend, ids))
    assert not outcome.failed, outcome.failed


def release(backend: TapeBackend, *ids: int) -> None:
    outcome = operations.run_release(backend, operations.plan_release(backend, ids))
    assert not outcome.failed, outcome.failed


def tables(url: str) -> dict[str, list[tuple]]:
    """Every row of the four file tables, sorted, read through a connection of our own."""
    database = connect(url)
    try:
        return {
            table: sorted(tuple(row) for row in database.execute_sql(f"SELECT * FROM {table}").fetchall())
            for table in ("sam_inode", "sam_file", "sam_path", "sam_archive")
        }
    finally:
        database.close()


def table_names(url: str) -> list[str]:
    """The tables of the database, read through a connection of our own."""
    database = connect(url)
    try:
        return database.get_tables()
    finally:
        database.close()


def execute(url: str, sql: str, params: tuple = ()) -> None:
    database = connect(url)
    try:
        with database.atomic():
            database.execute_sql(sql.replace("?", database.param), params)
    finally:
        database.close()


def identity(path: Path) -> tuple[int, int]:
    """The (ino, gen) the filesystem gives the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        gen = generation(fd)
        assert gen is not None, "these tests need a filesystem with inode generations (ext4, xfs, btrfs)"
        return os.fstat(fd).st_ino, gen
    finally:
        os.close(fd)


def expected_file_rows(backend: SidebandBackend, file_id: int, data: bytes) -> dict[str, list[tuple]]:
    """The inode, file and path rows a file on disk must have, from the filesystem itself."""
    path = Path(backend.path(file_id))
    ino, gen = identity(path)
    st = path.stat()
    parent = identity(path.parent)
    import hashlib

    inode = (ino, gen, 0, len(data), 1, hashlib.sha256(data).hexdigest(), int(st.st_ctime), 784111777)
    return {
        "sam_inode": [(*inode, st.st_uid, st.st_gid)],
        "sam_file": [(ino, gen, *parent, path.name, name_hash(path.name))],
        "sam_path": [(ino, gen, backend.relpath(file_id))],
    }


def http(backend: Any) -> webtest.TestApp:
    return webtest.TestApp(build_app(backend.settings, backend))


# -- the emulator keeps the tables true -------------------------------------------------------


def test_rows_follow_create_migrate_release_recall_overwrite_and_delete(make_sideband, db: str):
    backend = make_sideband(db, allow_delete=True)
    app = http(backend)
    data = b"sideband bytes " * 100
    store(backend, 7, data)
    first = expected_file_rows(backend, 7, data)
    ino, gen = first["sam_inode"][0][:2]
    assert tables(db) == {**first, "sam_archive": []}
    assert app.head("/7").headers["X-Pacifica-File-State"] == "REGULAR"

    migrate(backend, 7)
    (copy,) = backend.catalog.current_copies(7)
    archive = (ino, gen, 1, copy.seq, "li", copy.vsn, copy.offset, 0, len(data), 0, int(copy.written_at))
    assert tables(db) == {**first, "sam_archive": [archive]}
    headers = app.head("/7").headers
    assert headers["X-Pacifica-File-State"] == "DUAL"
    assert headers["X-Pacifica-Archive-Copies"] == f"1:{copy.vsn}:{copy.offset}"
    assert headers["X-Pacifica-Bytes-Per-Level"] == f"({len(data)}, {len(data)})"

    release(backend, 7)
    offline = [(*first["sam_inode"][0][:4], 0, *first["sam_inode"][0][5:])]
    assert tables(db) == {**first, "sam_inode": offline, "sam_archive": [archive]}
    headers = app.head("/7").headers
    assert (headers["X-Pacifica-File-State"], headers["X-Pacifica-File-Storage-Media"]) == ("OFFLINE", "tape")
    assert headers["X-Pacifica-Bytes-Per-Level"] == f"(0, {len(data)})"
    # The bulk scheduler's positions: from sam_archive, the same as the tape catalog gives.
    assert backend.tape_positions([7]) == TapeBackend.tape_positions(backend, [7])
    assert backend.tape_positions([7])[7].position == copy.offset

    assert backend.stage(7)  # recall: the emulator publishes a new inode; the copies move with the bytes
    recalled = expected_file_rows(backend, 7, data)
    new_ino, new_gen = recalled["sam_inode"][0][:2]
    assert (new_ino, new_gen) != (ino, gen)
    moved = (new_ino, new_gen, *archive[2:])
    assert tables(db) == {**recalled, "sam_archive": [moved]}
    assert backend.tape_positions([7]) == {}

    newer = b"a newer version"
    assert app.put("/7", newer, headers={"Last-Modified": LAST_MODIFIED}).status_int == 201
    replaced = expected_file_rows(backend, 7, newer)
    assert tables(db) == {**replaced, "sam_archive": [(*moved[:9], 1, moved[10])]}  # old copy stale
    assert app.head("/7").headers["X-Pacifica-Archive-Copies"] == ""

    assert app.delete("/7").status_int == 200
    assert tables(db) == {
        "sam_inode": [],
        "sam_file": [],
        "sam_path": [],
        "sam_archive": [(*moved[:9], 1, moved[10])],
    }
    assert app.head("/7", expect_errors=True).status_int == 404


def test_rows_of_an_older_generation_never_attach_to_the_new_file(make_sideband, db: str):
    """An inode number is reused once its file is gone; only the generation tells the files apart."""
    backend = make_sideband(db)
    store(backend, 21, b"the file now at this inode")
    ino, gen = identity(Path(backend.path(21)))
    old = gen - 1
    # What an earlier file at the same inode number left: offline, two live copies on tape.
    execute(db, "INSERT INTO sam_inode VALUES (?, ?, 0, 999, 0, NULL, 1, 1, 0, 0)", (ino, old))
    for copy, position in ((1, 4096), (2, 8192)):
        execute(
            db,
            "INSERT INTO sam_archive VALUES (?, ?, ?, 1, 'li', 'OLD001', ?, 0, 999, 0, 1)",
            (ino, old, copy, position),
        )
    # A join on the inode number alone (the peer's) would pick these up:
    peer = connect(db)
    try:
        sql = "SELECT COUNT(*) FROM sam_path p JOIN sam_archive a ON a.ino = p.ino WHERE p.path = ?"
        assert peer.execute_sql(sql.replace("?", peer.param), (backend.relpath(21),)).fetchone()[0] == 2
    finally:
        peer.close()

    status = backend.status(21)
    assert (status.state, status.copies, status.size) == ("REGULAR", (), len(b"the file now at this inode"))
    assert status.bytes_per_level == (status.size, 0)
    headers = http(backend).head("/21").headers
    assert headers["X-Pacifica-Archive-Copies"] == ""
    release_candidates = backend.tape_positions([21])
    assert release_candidates == {}


def test_a_released_files_inode_number_reused_by_a_new_file_keeps_both_apart(make_sideband, db: str):
    """Released file A's inode number goes to new file B: A stays OFFLINE with its copy, B REGULAR."""
    backend = make_sideband(db, use_id2filename=False)  # one directory: ext4 hands the freed number on
    store(backend, 1, b"file A")
    migrate(backend, 1)
    ino_a = identity(Path(backend.path(1)))
    release(backend, 1)
    for file_id in range(2, 40):
        store(backend, file_id, b"file B")
        if identity(Path(backend.path(file_id)))[0] == ino_a[0]:
            break
    else:
        pytest.skip("the filesystem did not reuse the inode number here")
    assert identity(Path(backend.path(file_id))) != ino_a
    a, b = backend.status(1), backend.status(file_id)
    assert (a.state, len(a.copies or ())) == ("OFFLINE", 1)
    assert (b.state, b.copies) == ("REGULAR", ())
    assert set(backend.tape_positions([1, file_id])) == {1}


def test_tape_backend_with_a_sideband_database_keeps_it_too(make_tape, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'side.sqlite'}"
    backend = make_tape()
    assert type(backend.sideband_upkeep).__name__ == "_NoUpkeep"
    settings = load_settings(
        flags={
            "archive": {"backend": "tape", "prefix": backend.settings.archive.prefix},
            "tape": {"library": backend.settings.tape.library, "time_scale": 0.0},
            "sideband": {"database": url},
        },
        env={},
    )
    with_db = registry.create(settings)
    try:
        store(with_db, 5, b"kept")
        migrate(with_db, 5)
        rows = tables(url)
        assert [r[2] for r in rows["sam_path"]] == [with_db.relpath(5)]
        assert len(rows["sam_archive"]) == 1
    finally:
        with_db.close()


# -- HEAD: clear errors when the database and the disk disagree ---------------------------------


def test_a_copy_found_bad_leaves_the_archive_rows_and_the_tape_positions(make_sideband, db: str):
    backend = make_sideband(db)
    store(backend, 60, b"verified, then damaged on tape")
    store(backend, 61, b"damaged on tape, found by a recall")
    migrate(backend, 60, 61)
    release(backend, 60, 61)
    for file_id in (60, 61):
        corrupt(backend, file_id)
    assert set(backend.tape_positions([60, 61])) == {60, 61}
    damaged = backend.catalog.current_copies(60)[0]
    checks, _ = operations.run_verify(backend, {damaged.vsn: [damaged]})
    assert [c.mismatches for c in checks] == [[60]]
    with pytest.raises(StorageUnavailable):
        backend.recall(61)
    assert backend.tape_positions([60, 61]) == {}
    assert [r for r in tables(db)["sam_archive"] if not r[-2]] == []  # no live copy row is left
    assert app_head_copies(backend, 60) == app_head_copies(backend, 61) == ""


def app_head_copies(backend: Any, file_id: int) -> str:
    return http(backend).head(f"/{file_id}").headers["X-Pacifica-Archive-Copies"]


def test_head_names_files_out_of_step_with_the_database(make_sideband, db: str):
    backend = make_sideband(db)
    app = http(backend)
    store(backend, 30, b"in both")
    planted = Path(backend.path(31))
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"written behind the HSM's back")
    answer = app.head("/31", expect_errors=True)
    assert answer.status_int == 503
    body = app.get("/31", expect_errors=True)  # GET still serves the bytes on disk
    assert body.status_int == 200 and body.body == b"written behind the HSM's back"

    Path(backend.path(30)).unlink()  # gone from disk, still online in the database
    answer = app.post("/30", expect_errors=True)
    assert answer.status_int == 404
    app_answer = http(backend)
    response = app_answer.request("/30", method="HEAD", expect_errors=True)
    assert response.status_int == 503

    # The JSON bodies (HEAD has none on the wire): through the backend's status, as GET /ready would show.
    with pytest.raises(Exception, match="not in the sideband database") as missing:
        backend.status(31)
    assert type(missing.value).__name__ == "StatusMismatch"
    with pytest.raises(Exception, match=r"lists file 30 .* as online, but it is not on disk"):
        backend.status(30)
    assert app.head("/32", expect_errors=True).status_int == 404


# -- sideband load ----------------------------------------------------------------------------


def write_ini(tmp_path: Path, backend: SidebandBackend, url: str) -> Path:
    ini = tmp_path / "archive.ini"
    ini.write_text(
        "[archive]\nbackend = sideband\ncatalog = off\n"
        f"[tape]\nlibrary = {backend.settings.tape.library}\ntime_scale = 0\n"
        f"[sideband]\ndatabase = {url}\nsam_qfs_prefix = {backend.prefix}\n",
        encoding="utf-8",
    )
    return ini


def load(ini: Path, capsys: pytest.CaptureFixture, *flags: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["sideband", "load", "--json", "--progress", "never", *flags, "-c", str(ini)]) == 0
    return json.loads(capsys.readouterr().out)


def test_load_builds_the_rows_the_upkeep_writes_and_refreshes_after_changes(
    make_sideband, db: str, tmp_path: Path, capsys: pytest.CaptureFixture
):
    backend = make_sideband(db)
    for file_id in range(1, 7):
        store(backend, file_id, f"file {file_id}".encode() * file_id)
    migrate(backend, 2, 3, 4)
    release(backend, 4)
    kept = tables(db)
    ini = write_ini(tmp_path, backend, db)

    assert load(ini, capsys, "--dry-run")["unchanged"] == 6  # the upkeep already wrote exactly these

    for table in kept:
        execute(db, f"DELETE FROM {table}")
    plan = load(ini, capsys, "--dry-run")
    assert (plan["add"], plan["files"]["add"]) == (6, [1, 2, 3, 4, 5, 6])
    assert tables(db) == {table: [] for table in kept}  # the dry run changed nothing

    assert load(ini, capsys)["changed"] == 6
    rebuilt = tables(db)
    online = {row[:2] for row in kept["sam_inode"] if row[4] == 1}
    # Files on disk: row for row what the upkeep wrote.
    for table in kept:
        assert [r for r in rebuilt[table] if r[:2] in online] == [r for r in kept[table] if r[:2] in online]
    # The released file: the emulator kept no inode for it, so it is inode 0, generation = its id.
    (offline,) = [r for r in rebuilt["sam_inode"] if r[4] == 0]
    (was,) = [r for r in kept["sam_inode"] if r[4] == 0]
    assert offline[:2] == (0, 4) and offline[2:] == was[2:6] + offline[6:7] + was[7:8] + (0, 0)
    assert [r[2:] for r in rebuilt["sam_archive"] if r[:2] == (0, 4)] == [
        r[2:] for r in kept["sam_archive"] if r[:2] == was[:2]
    ]
    assert backend.status(4).state == "OFFLINE"

    # Out-of-band changes: a file removed, one planted, one replaced behind the gateway's back.
    Path(backend.path(1)).unlink()
    planted = Path(backend.path(40))
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"restored from a dump")
    replaced = Path(backend.path(5))
    replaced.unlink()
    replaced.write_bytes(b"replaced")
    plan = load(ini, capsys, "--dry-run")
    assert (plan["files"]["add"], plan["files"]["update"], plan["files"]["remove"]) == ([40], [5], [1])
    assert load(ini, capsys)["changed"] == 3
    assert load(ini, capsys, "--dry-run")["unchanged"] == 6
    assert backend.status(40).size == len(b"restored from a dump")
    assert backend.status(5).size == len(b"replaced")
    with pytest.raises(Exception, match="not in the archive"):
        backend.status(1)


def test_load_refuses_an_external_hsm(make_sideband, db: str, tmp_path: Path, capsys: pytest.CaptureFixture):
    backend = make_sideband(db)
    ini = write_ini(tmp_path, backend, db)
    ini.write_text(ini.read_text() + "hsm = external\n", encoding="utf-8")
    assert main(["sideband", "load", "-c", str(ini)]) == 2
    assert "its own database updater" in capsys.readouterr().err


# -- the external HSM ---------------------------------------------------------------------


def test_external_hsm_reads_status_and_never_writes_the_tables(make_sideband, db: str):
    emulated = make_sideband(db)
    store(emulated, 50, b"online file")
    store(emulated, 51, b"offline file")
    migrate(emulated, 50, 51)
    # The HSM numbers its own schema: the gateway reads its tables whatever sam_version says.
    execute(db, "UPDATE sam_version SET version = 5")
    external = make_sideband(db, hsm="external")
    assert isinstance(external, ExternalSidebandBackend)
    # The real HSM released 51: its inode stays on disk with online = 0.
    ino, gen = identity(Path(external.path(51)))
    execute(db, "UPDATE sam_inode SET online = 0 WHERE ino = ? AND gen = ?", (ino, gen))
    before = tables(db)
    app = http(external)
    assert app.head("/50").headers["X-Pacifica-File-State"] == "DUAL"
    assert app.head("/51").headers["X-Pacifica-File-Storage-Media"] == "tape"
    assert app.get("/50").body == b"online file"
    offline = app.get("/51", expect_errors=True)
    assert offline.status_int == 503 and "POST /51" in offline.json["message"]
    assert app.put("/52", b"new", headers={"Last-Modified": LAST_MODIFIED}).status_int == 201
    assert tables(db) == before  # the HSM's updater, not the gateway, records file 52
    assert app.head("/52", expect_errors=True).status_int == 503
    assert set(external.tape_positions([50, 51])) == {51}


# -- outages: a TCP proxy between the gateway and MariaDB, cut and restored ---------------------


class Proxy:
    """A loopback TCP proxy to ``target`` that the test can cut (every connection reset) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.hanging = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.hanging:
                self._sockets.append(client)  # a network that drops every packet: no answer, ever
                continue
            if not self.up:
                client.close()  # the "server" is gone: the handshake fails at once
                continue
            try:
                server = socket.create_connection(self.target, timeout=TIMEOUT)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self.hanging:
                    sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.up = False
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def hang(self) -> None:
        """Keep every connection open but forward nothing (a cable cut, not a server stop)."""
        self.hanging = True

    def restore(self) -> None:
        self.up = True
        self.hanging = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_database_outage_gives_503_keeps_get_working_and_recovers_by_itself(make_sideband):
    with scratch_database("mysql", "pl_sideband") as url:
        host_port, _, schema = url.rpartition("/")
        host, port = host_port.rsplit("@", 1)[-1].split(":")
        proxy = Proxy((host, int(port)))
        try:
            proxied = url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
            backend = make_sideband(proxied)
            app = http(backend)
            store(backend, 60, b"online data")
            assert app.head("/60").status_int == 204

            proxy.cut()
            for _ in range(3):  # a pooled connection that broke, then fresh ones refused
                down = app.get("/60", headers={"X-Probe": "1"}, expect_errors=True)
                assert down.status_int == 200 and down.body == b"online data"  # GET needs no database
                answer = app.request("/60", method="HEAD", expect_errors=True)
                assert answer.status_int == 503
            with pytest.raises(
                Exception, match=f"sideband database mysql://.*127.0.0.1:{proxy.port}/{schema}"
            ):
                backend.status(60)
            ready = app.get("/ready", expect_errors=True)
            assert ready.status_int == 503 and "sideband database" in ready.json["reason"]

            proxy.restore()
            assert app.head("/60").status_int == 204  # no restart: the broken connections were dropped
            assert app.get("/ready").json["status"] == "ready"
        finally:
            proxy.close()


def test_a_silent_network_costs_a_head_no_more_than_the_timeout_and_recovers(make_sideband):
    """Packets dropped, not refused: each HEAD waits at most about connect_timeout, never twice that."""
    with scratch_database("mysql", "pl_sideband") as url:
        host_port = url.rpartition("/")[0].rsplit("@", 1)[-1]
        proxy = Proxy((host_port.split(":")[0], int(host_port.split(":")[1])))
        try:
            backend = make_sideband(
                url.replace(host_port, f"127.0.0.1:{proxy.port}"), sideband={"connect_timeout": 1}
            )
            app = http(backend)
            store(backend, 61, b"online data")
            assert app.head("/61").status_int == 204
            proxy.hang()
            for _ in range(2):  # the pooled connection times out; then a fresh one cannot connect
                started = time.monotonic()
                assert app.request("/61", method="HEAD", expect_errors=True).status_int == 503
                assert time.monotonic() - started < 1.8
            proxy.restore()
            assert app.head("/61").status_int == 204
        finally:
            proxy.close()


def test_a_password_in_the_url_never_reaches_the_client(make_sideband, tmp_path: Path):
    # Nothing listens on this port: every query fails, and the message names the database.
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    backend = make_sideband(f"mysql://samdb:s3cret@127.0.0.1:{port}/samqfs")
    answer = http(backend).get("/ready", expect_errors=True)
    assert answer.status_int == 503
    assert "mysql://samdb:***@127.0.0.1" in answer.json["reason"] and "s3cret" not in answer.text


# -- the pool: threads come and go, connections stay bounded -----------------------------------


def in_thread(call: Callable[[], Any]) -> Any:
    """Run ``call`` in a new thread (which then ends); return its result or raise its exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except Exception as exc:
            outcome.append((False, exc))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(TIMEOUT)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def test_connections_of_finished_threads_go_back_to_the_pool(make_sideband, db: str):
    """Each thread keeps its pooled connection; one that ended must not hold it for good."""
    backend = make_sideband(db, sideband={"connect_timeout": 0.5, "max_connections": 2})
    app = http(backend)
    store(backend, 70, b"pooled")
    # More threads, one after the other, than the pool has connections.
    answers = [in_thread(lambda: app.head("/70", expect_errors=True).status_int) for _ in range(5)]
    assert answers == [204] * 5


def test_a_pool_exhausted_by_live_threads_is_a_503_naming_the_setting(make_sideband, db: str):
    backend = make_sideband(db, sideband={"connect_timeout": 0.2, "max_connections": 1})
    app = http(backend)
    store(backend, 71, b"pooled")  # this thread, still alive, now holds the only connection
    assert in_thread(lambda: app.get("/71", expect_errors=True)).body == b"pooled"  # GET reads the disk
    assert in_thread(lambda: app.request("/71", method="HEAD", expect_errors=True)).status_int == 503
    with pytest.raises(StorageUnavailable, match=r"all 1 pooled connections .*max_connections"):
        in_thread(lambda: backend.status(71))
    assert backend.status(71).size == len(b"pooled")  # the holder still answers


# -- a database of another schema version ------------------------------------------------------


def test_a_database_of_another_schema_version_is_refused_and_left_alone(make_sideband, db: str):
    execute(db, "CREATE TABLE sam_version (id INTEGER PRIMARY KEY, version INTEGER)")
    execute(db, "INSERT INTO sam_version VALUES (1, 7)")
    backend = make_sideband(db)
    app = http(backend)
    assert app.put("/80", b"kept on disk", headers={"Last-Modified": LAST_MODIFIED}).status_int == 201
    ready = app.get("/ready", expect_errors=True)
    assert ready.status_int == 503
    assert "schema version 7, but this gateway reads and writes version 1" in ready.json["reason"]
    assert app.request("/80", method="HEAD", expect_errors=True).status_int == 503
    with pytest.raises(StorageUnavailable, match="schema version 7"):
        backend.status(80)
    assert app.get("/80").body == b"kept on disk"
    assert table_names(db) == ["sam_version"]  # nothing created in someone else's database


def test_an_external_database_without_the_sideband_tables_is_refused_and_left_alone(make_sideband, db: str):
    execute(db, "CREATE TABLE sam_version (id INTEGER PRIMARY KEY, version INTEGER)")
    execute(db, "INSERT INTO sam_version VALUES (1, 7)")
    backend = make_sideband(db, hsm="external")
    app = http(backend)
    assert app.put("/81", b"kept on disk", headers={"Last-Modified": LAST_MODIFIED}).status_int == 201
    ready = app.get("/ready", expect_errors=True)
    assert ready.status_int == 503
    assert "has no sam_inode, sam_path, sam_archive table" in ready.json["reason"]
    assert app.request("/81", method="HEAD", expect_errors=True).status_int == 503
    assert app.get("/81").body == b"kept on disk"
    assert table_names(db) == ["sam_version"]  # nothing created in the HSM's database


def test_a_dry_run_load_creates_no_database_and_no_tables(
    make_sideband, db: str, tmp_path: Path, capsys: pytest.CaptureFixture
):
    backend = make_sideband(f"sqlite:///{tmp_path / 'unused.sqlite'}")
    store(backend, 1, b"one")
    store(backend, 2, b"two")
    migrate(backend, 2)
    release(backend, 2)
    fresh = tmp_path / "sub" / "fresh.sqlite"
    for url in (db, f"sqlite:///{fresh}"):
        ini = write_ini(tmp_path, backend, url)
        plan = load(ini, capsys, "--dry-run")
        assert (plan["add"], plan["files"]["add"], plan["unchanged"]) == (2, [1, 2], 0)
    assert not fresh.exists() and not fresh.parent.exists()
    assert table_names(db) == []


# -- under uWSGI: every worker process opens its own connections, after the fork ----------------


@pytest.mark.live
def test_uwsgi_workers_store_and_answer_head_from_the_database_concurrently(db: str, tmp_path: Path):
    try:
        uwsgi_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    library = tmp_path / "library"
    env = {
        "PAI_BACKEND_TYPE": "sideband",
        "PAI_PREFIX": str(tmp_path / "qfs"),
        "PAI_CATALOG": "off",
        "PAI_TAPE_LIBRARY": str(library),
        "PAI_TAPE_TIME_SCALE": "0",
        "PAI_SIDEBAND_DATABASE": db,
    }
    init_tape_library(load_settings(env=env))
    bodies = {file_id: f"file {file_id} ".encode() * file_id for file_id in range(1, 41)}

    def put_then_head(server_url: str, file_id: int) -> tuple[int, int, str]:
        put = urllib.request.Request(
            f"{server_url}/{file_id}",
            data=bodies[file_id],
            method="PUT",
            headers={"Last-Modified": LAST_MODIFIED},
        )
        with urllib.request.urlopen(put, timeout=30) as answer:
            assert answer.status == 201
        head = urllib.request.Request(f"{server_url}/{file_id}", method="HEAD")
        with urllib.request.urlopen(head, timeout=30) as answer:
            return (
                answer.status,
                int(answer.headers["X-Content-Length"]),
                answer.headers["X-Pacifica-File-State"],
            )

    with uwsgi_server(env, processes=4) as server, ThreadPoolExecutor(max_workers=8) as pool:
        answers = dict(zip(bodies, pool.map(lambda i: put_then_head(server.url, i), bodies), strict=True))
    assert answers == {file_id: (204, len(body), "REGULAR") for file_id, body in bodies.items()}
    rows = tables(db)
    assert sorted(row[3] for row in rows["sam_inode"]) == sorted(len(body) for body in bodies.values())
    assert len(rows["sam_path"]) == len(bodies)
