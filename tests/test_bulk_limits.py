"""Heavy requests cannot take the service down, and bulk state stays bounded (issue 11, findings 6 and 8).

Through real servers in both run modes (``pacifica-like serve`` and uWSGI):

- archiveinfo answers 100,000 paths (one batched look-up, not one query per path);
- past ``max_heavy_requests`` heavy requests in flight, the next get 429
  problem+json with Retry-After, and ``GET /`` still answers;
- past ``stage_waiters`` POST /<id> of released files waiting for a recall,
  POST answers 202 at once, and ``GET /`` still answers;
- past ``max_requests_per_client`` stored requests, a client gets 429;
- the bulk API's former 500s (query parameters, deep JSON, huge numbers, odd types) are 4xx problem+json.

Heavy requests are held in flight by a hook (``pacifica_like.web.bulkapi.HEAVY_HOOK``)
that a ``sitecustomize`` installs in the server processes: it reports entry
through a FIFO and waits on a file lock the test holds. Recalls are held by
the test itself holding every drive of the tape library, as a busy library would.
Retention is checked on the database: expired requests' rows are gone, open
ones and other requests' pins stay.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bulk_helpers import content, http, make_settings, scheduler, store_offline
from conftest import init_tape_library

from pacifica_like.bulk.store import BulkStore
from pacifica_like.client import ArchiveClient, TooManyRequests
from pacifica_like.core.config import load_settings
from pacifica_like.core.slots import directory_for
from pacifica_like.gateway.catalog import GatewayCatalog
from pacifica_like.storage import registry
from pacifica_like.storage.tape.backend import TapeBackend
from pacifica_like.web.devserver import RunningServer, cli_server, uwsgi_binary, uwsgi_server

PROBLEM = "application/problem+json"
TIMEOUT = 20.0
#: Released files that the POST test stages (ids 1..STAGED), and what else the archive holds.
STAGED = 40
OFFLINE = (50, 51)
ON_DISK = (60, 61, 62)
LOST = 777
HEAVY = 1000  # heavy_request_files
MAX_HEAVY = 2
STAGE_WAITERS = 2

#: Installed in the server processes: hold each heavy request until the test lets it go.
HOOK = """
import fcntl, os
from pacifica_like.web import bulkapi as api

HOLD = os.environ.get("PL_TEST_HOLD")


def hold(what):
    try:  # ENXIO: the test is not holding requests now (nobody reads the FIFO)
        fd = os.open(os.path.join(HOLD, "entered"), os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.write(fd, what.encode()[:1])
    os.close(fd)
    with open(os.path.join(HOLD, "gate"), "rb") as gate:
        fcntl.flock(gate, fcntl.LOCK_SH)  # waits while the test holds it exclusively


if HOLD:
    api.HEAVY_HOOK = hold
"""


@dataclass
class Archive:
    """A tape archive served by one server, and the hold the hook waits on."""

    server: RunningServer
    settings: Any
    hold: Path

    @property
    def url(self) -> str:
        return self.server.url


def _write_ini(root: Path, library: str) -> Path:
    ini = root / "archive.ini"
    ini.write_text(
        f"[archive]\nbackend = tape\nprefix = {root / 'archive'}\n"
        f"[tape]\nlibrary = {library}\nvolume_capacity = 64MiB\ntime_scale = 0\n"
        f"stage_timeout = 60\nstage_waiters = {STAGE_WAITERS}\n"
        "[bulk]\nscheduler = off\nmax_requests_per_client = 3\nheavy_wait_seconds = 60\n"
        f"max_heavy_requests = {MAX_HEAVY}\nheavy_request_files = {HEAVY}\n",
        encoding="utf-8",
    )
    return ini


def _prepare(root: Path) -> Any:
    """Build the archive on disk: released files, disk-only files and one inventory row marked LOST."""
    library = str(root / "tape-library")
    init_tape_library(load_settings(flags={"tape": {"library": library}}, env={}))
    ini = _write_ini(root, library)
    settings = load_settings(config_file=str(ini), env={})
    backend = registry.create(settings)
    try:
        store_offline(backend, {i: 2000 + i for i in (*range(1, STAGED + 1), *OFFLINE)})
        for file_id in ON_DISK:
            with backend.open_writer(file_id, 784111777.0) as writer:
                writer.write(content(file_id, 100))
                writer.commit()
    finally:
        backend.close()
    catalog = GatewayCatalog(settings.archive.catalog)
    assert catalog.record(LOST, 10, 1.0, None, 5.0) and catalog.mark_lost(LOST, 5.0)
    catalog.close()
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
    hold = root / "hold"
    hold.mkdir()
    os.mkfifo(hold / "entered")
    (hold / "gate").touch()
    return ini, settings, hook, hold


@pytest.fixture(scope="module", params=["serve", "uwsgi"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """One tape archive per run mode, served for every test of the module."""
    if request.param == "uwsgi":
        try:
            uwsgi_binary()
        except RuntimeError as exc:
            pytest.skip(str(exc))
    root = tmp_path_factory.mktemp(f"limits-{request.param}")
    ini, settings, hook, hold = _prepare(root)
    path = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {"PAI_CONFIG": str(ini), "PYTHONPATH": path, "PL_TEST_HOLD": str(hold)}
    if request.param == "serve":
        running = cli_server(["--config", str(ini)], env=env)
    else:
        running = uwsgi_server(env, processes=4)
    with running as server:
        yield Archive(server, settings, hold)
    # The slot files live outside the archive (in the temp directory): leave none behind.
    shutil.rmtree(directory_for(settings.archive.prefix), ignore_errors=True)


# -- HTTP helpers ------------------------------------------------------------------


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 60.0,
) -> tuple[int, dict[str, str], bytes]:
    """Send one request; return status, headers and body (errors included)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(
        url, data, {"Content-Type": "application/json", **(headers or {})}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as answer:
        return answer.code, dict(answer.headers), answer.read()


def assert_problem(answer: tuple[int, dict[str, str], bytes], status: int) -> dict[str, Any]:
    code, headers, body = answer
    assert code == status, (code, body[:300])
    assert headers["Content-Type"].startswith(PROBLEM), headers
    assert b"Traceback" not in body
    document = json.loads(body)
    assert document["status"] == status and document["detail"]
    return document


def health(url: str) -> None:
    """GET / answers, and quickly."""
    with urllib.request.urlopen(url + "/", timeout=5) as answer:
        assert answer.status == 200
        assert json.loads(answer.read()) == {"message": "Pacifica Archive Interface Up and Running"}


def paths(count: int, first: int = 1 << 40) -> list[str]:
    """``count`` paths of ids nobody stored."""
    return [f"/{i}" for i in range(first, first + count)]


@contextlib.contextmanager
def held(hold: Path) -> Iterator[Any]:
    """Hold the hook's gate; yield a function waiting until ``n`` more heavy requests entered it."""
    entered = os.open(
        hold / "entered", os.O_RDWR | os.O_NONBLOCK
    )  # never blocks, keeps writers from blocking
    with open(hold / "gate", "rb") as gate:
        fcntl.flock(gate, fcntl.LOCK_EX)

        def wait_entered(count: int) -> bytes:
            got = b""
            deadline = time.monotonic() + TIMEOUT
            while len(got) < count:
                ready, _, _ = select.select([entered], [], [], max(0.0, deadline - time.monotonic()))
                assert ready, f"only {len(got)} of {count} heavy requests reached the server's hook"
                got += os.read(entered, count - len(got))
            return got

        try:
            yield wait_entered
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
            os.close(entered)


# -- archiveinfo -----------------------------------------------------------------------


def test_archiveinfo_answers_100000_paths(archive: Archive):
    known = ["/1", f"/{OFFLINE[0]}", f"/{ON_DISK[0]}", f"/{LOST}", "/not-an-id"]
    asked = known + paths(100_000 - len(known))
    # No timing assert (the benchmark reports numbers); the socket timeout is only generous: the
    # per-path look-ups this replaced took 40 s and more for 100,000 unknown paths.
    code, _, body = call(archive.url + "/api/v1/archiveinfo", "POST", {"paths": asked}, timeout=30)
    assert code == 200, body[:300]
    answers = json.loads(body)
    assert len(answers) == len(asked) and [a["path"] for a in answers] == asked
    assert answers[0]["locality"] in ("TAPE", "DISK_AND_TAPE")  # staged meanwhile or not
    assert answers[1] == {"path": f"/{OFFLINE[0]}", "locality": "TAPE"}
    assert answers[2] == {"path": f"/{ON_DISK[0]}", "locality": "DISK"}
    assert answers[3] == {"path": f"/{LOST}", "locality": "LOST"}  # the inventory's mark, batched
    assert "error" in answers[4]
    assert {a.get("error") for a in answers[5:]} == {"no such file in the archive"}


# -- heavy requests --------------------------------------------------------------------


def test_heavy_requests_past_the_limit_get_429_while_get_root_answers(archive: Archive):
    url = archive.url
    big = submit_request(url, paths(HEAVY, 1 << 41), client="heavy-poller")
    with ThreadPoolExecutor(max_workers=MAX_HEAVY + 2) as pool, held(archive.hold) as wait_entered:
        in_flight = [
            pool.submit(
                call, url + "/api/v1/archiveinfo", "POST", {"paths": [f"/{ON_DISK[0]}", *paths(HEAVY)]}
            )
            for _ in range(MAX_HEAVY)
        ]
        wait_entered(MAX_HEAVY)  # both hold a slot now
        # A heavy stage request waits for a slot (heavy_wait_seconds) instead of a 429: FTS
        # fails every file of a job whose stage request is refused.
        waiting_stage = pool.submit(
            call, url + "/api/v1/stage", "POST", {"files": [{"path": p} for p in paths(HEAVY)]}
        )
        refused = [
            call(url + "/api/v1/archiveinfo", "POST", {"paths": paths(HEAVY)}),
            call(url + f"/api/v1/stage/{big}"),  # a poll of every file: a large page
        ]
        for answer in refused:
            document = assert_problem(answer, 429)
            assert int(answer[1]["Retry-After"]) >= 1 and "try again" in document["detail"]
        health(url)
        # Small requests pass freely while the heavy ones are held.
        code, _, body = call(url + "/api/v1/archiveinfo", "POST", {"paths": [f"/{ON_DISK[1]}"]})
        assert code == 200 and json.loads(body) == [{"path": f"/{ON_DISK[1]}", "locality": "DISK"}]
        code, _, _ = call(url + f"/api/v1/stage/{big}?limit=10")
        assert code == 200
        assert all(not f.done() for f in in_flight)
        assert not waiting_stage.done()
        # The Python client waits a refused page out (Retry-After) and asks again: it gets its
        # listing once the held requests are let go below.
        refused = threading.Event()

        class Watched(ArchiveClient):
            def poll(self, *args: Any, **kwargs: Any) -> Any:
                try:
                    return super().poll(*args, **kwargs)
                except TooManyRequests:
                    refused.set()
                    raise

        listing = pool.submit(lambda: [f.path for f in Watched(url, timeout=30).files(big, page_size=HEAVY)])
        assert refused.wait(TIMEOUT)
    for future in in_flight:
        code, _, body = future.result(timeout=TIMEOUT)
        assert code == 200 and json.loads(body)[0] == {"path": f"/{ON_DISK[0]}", "locality": "DISK"}
    code, _, body = waiting_stage.result(timeout=TIMEOUT)
    assert code == 201, body[:300]
    assert sorted(listing.result(timeout=TIMEOUT)) == sorted(paths(HEAVY, 1 << 41))
    # The slots are free again: a poll of every file answers.
    code, _, body = call(url + f"/api/v1/stage/{big}")
    assert code == 200 and len(json.loads(body)["files"]) == HEAVY
    assert call(url + f"/api/v1/stage/{big}", "DELETE")[0] == 200


def submit_request(url: str, names: list[str], client: str) -> str:
    code, _, body = call(
        url + "/api/v1/stage", "POST", {"files": [{"path": p} for p in names]}, {"X-Client-Id": client}
    )
    assert code == 201, body[:300]
    return json.loads(body)["requestId"]


# -- POST /<id> of released files ---------------------------------------------------------------


def test_posts_of_released_files_past_the_waiters_answer_202_at_once(archive: Archive):
    url = archive.url
    backend = registry.create(archive.settings)
    assert isinstance(backend, TapeBackend)
    try:
        vsns = [v.vsn for v in backend.catalog.Volume.select()]
        wanted = backend.catalog.current_copies(1)[0].vsn
        other = next(v for v in vsns if v != wanted)
        answers: list[tuple[int, dict[str, str], bytes]] = []
        arrived = threading.Condition()

        def post(file_id: int) -> None:
            answer = call(f"{url}/{file_id}", "POST")
            with arrived:
                answers.append(answer)
                arrived.notify_all()

        # Every drive busy (one with the files' own cartridge): no recall can start until we let go.
        with backend.library.drive(wanted), backend.library.drive(other):
            threads = [threading.Thread(target=post, args=(i,)) for i in range(1, STAGED + 1)]
            for thread in threads:
                thread.start()
            with arrived:
                assert arrived.wait_for(lambda: len(answers) >= STAGED - STAGE_WAITERS, TIMEOUT), (
                    f"only {len(answers)} of {STAGED} POSTs answered while recalls were held"
                )
                early = list(answers)
            health(url)
            assert len(early) == STAGED - STAGE_WAITERS
            for code, _, body in early:
                assert code == 202, body[:300]
                assert "HEAD" in json.loads(body)["message"]
        for thread in threads:
            thread.join(TIMEOUT)
        # The waiters got their recall, within stage_timeout.
        assert sorted(code for code, _, _ in answers) == [200] * STAGE_WAITERS + [202] * (
            STAGED - STAGE_WAITERS
        )
        deadline = time.monotonic() + TIMEOUT
        while any(backend.state(i) != "DUAL" for i in range(1, STAGED + 1)):
            assert time.monotonic() < deadline, "the recalls behind the 202s did not finish"
            time.sleep(0.05)
    finally:
        backend.close()


# -- stored requests per client ------------------------------------------------------------


def test_a_client_past_its_stored_requests_gets_429_until_it_deletes_one(archive: Archive):
    url = archive.url
    client = f"capped-{time.monotonic_ns()}"
    made = [submit_request(url, [f"/{ON_DISK[2]}"], client) for _ in range(3)]
    answer = call(
        url + "/api/v1/stage", "POST", {"files": [{"path": f"/{ON_DISK[2]}"}]}, {"X-Client-Id": client}
    )
    document = assert_problem(answer, 429)
    assert "3 stored requests" in document["detail"] and int(answer[1]["Retry-After"]) >= 1
    assert (
        call(
            url + "/api/v1/stage",
            "POST",
            {"files": [{"path": f"/{ON_DISK[2]}"}]},
            {"X-Client-Id": "x" + client},
        )[0]
        == 201
    )
    assert call(url + f"/api/v1/stage/{made[0]}", "DELETE")[0] == 200
    submit_request(url, [f"/{ON_DISK[2]}"], client)


# -- former 500s -------------------------------------------------------------------------------


def test_bad_input_to_the_bulk_api_is_a_4xx_problem(archive: Archive):
    url = archive.url
    request_id = submit_request(url, [f"/{ON_DISK[0]}"], f"fuzz-{time.monotonic_ns()}")
    # Query parameters are ignored where an endpoint takes none, whatever their name.
    for path in ("/api/v1/queues?x=1", "/.well-known/wlcg-tape-rest-api?x=1&x=2", "/api/v1/queues?self=1"):
        code, headers, body = call(url + path)
        assert code == 200 and headers["Content-Type"].startswith("application/json"), (path, body[:200])
    assert call(url + f"/api/v1/stage/{request_id}?request_id=a&request_id=b")[0] == 200
    for path in ("/api/v1/queues/extra", "/.well-known/wlcg-tape-rest-api/extra", "/api/v1/archiveinfo/x"):
        assert_problem(call(url + path), 404)
    deep = b'{"paths": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    huge = b'{"paths": [' + b"7" * 5000 + b"]}"
    for endpoint in ("/api/v1/archiveinfo", "/api/v1/stage", f"/api/v1/release/{request_id}"):
        assert_problem(call(url + endpoint, "POST", raw=deep), 400)
        assert_problem(call(url + endpoint, "POST", raw=huge), 400)
    for body in ({"paths": {"a": 1}}, {"paths": [1, 2]}, {"paths": "x"}, [], 7, None):
        assert_problem(call(url + "/api/v1/archiveinfo", "POST", body), 400)
    for body in (
        {"files": "x"},
        {"files": [1]},
        {"files": [{"path": 1}]},
    ):
        assert_problem(call(url + "/api/v1/stage", "POST", body), 400)
    for query in ("limit=" + "9" * 5000, "cursor=" + "9" * 5000, "limit=%C2%B2", "state=NOPE"):
        assert_problem(call(url + f"/api/v1/stage/{request_id}?{query}"), 400)


# -- retention ---------------------------------------------------------------------------------


def test_finished_requests_past_retention_are_purged_with_their_rows(tmp_path: Path, prepare_backend):
    settings = make_settings(
        tmp_path, "tape", prepare_backend,
        bulk={
            "retention_seconds": 3600.0,
            "max_wait_seconds": 1e9,
            "idle_wait_seconds": 1e9,
            "mount_min_files": 1000,
        },
    )  # fmt: skip
    backend = registry.create(settings)
    try:
        store_offline(backend, {1: 100, 2: 100})
        with backend.open_writer(3, 784111777.0) as writer:
            writer.write(b"on disk")
            writer.commit()
        app = http(settings, backend)

        def stage(client: str, path: str, lifetime: str = "PT1H") -> str:
            body = {"files": [{"path": path, "diskLifetime": lifetime}]}
            return app.post_json("/api/v1/stage", body, headers={"X-Client-Id": client}).json["requestId"]

        expired = stage("alice", "/3")  # COMPLETED at once, pinned for an hour
        short = stage("alice", "/424242")  # FAILED at once: nothing to pin
        open_one = stage("alice", "/1")  # queued: stays open
        pinned = stage("bob", "/3", "P7D")  # finished too, but its pin outlives the retention
        store = BulkStore.open(settings.archive.catalog)
        later = time.time() + 3600 + 3600 + 60  # past retention, and past the one-hour pins
        assert scheduler(settings, backend).run_pass(now=later) == []  # the sweep; no volume worth a mount
        rows = sqlite3.connect(settings.archive.catalog.removeprefix("sqlite:///"))
        try:
            left = dict(rows.execute("SELECT request_id, COUNT(*) FROM bulk_file GROUP BY request_id"))
            requests = {r for (r,) in rows.execute("SELECT id FROM bulk_request")}
        finally:
            rows.close()
        assert expired not in requests and short not in requests
        assert expired not in left and short not in left
        assert requests == {open_one, pinned} and left == {open_one: 1, pinned: 1}
        # bob's pin on file 3 outlives alice's expired request, so retention never cut it short.
        assert 3 in store.pins([3], now=later)
        app.get(f"/api/v1/stage/{expired}", status=404)
        assert app.get(f"/api/v1/stage/{open_one}").json["files"][0]["state"] == "SUBMITTED"
    finally:
        backend.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# -- batched localities of the external sideband HSM -------------------------------------------


def test_external_sideband_localities_answer_in_batches_as_status_would(tmp_path: Path, prepare_backend):
    from pacifica_like.storage.contract import Backend
    from pacifica_like.storage.sideband.backend import ExternalSidebandBackend
    from pacifica_like.storage.tape import operations

    settings = make_settings(tmp_path, "sideband", prepare_backend)
    emulated = registry.create(settings)
    try:
        for file_id in (50, 51, 53):
            with emulated.open_writer(file_id, 784111777.0) as writer:
                writer.write(content(file_id, 300))
                writer.commit()
        assert not operations.run_migrate(emulated, operations.plan_migrate(emulated, [50, 51])).failed
    finally:
        emulated.close()
    flags = {"sideband": {"hsm": "external"}, "bulk": {}}
    external = registry.create(make_settings(tmp_path, "sideband", prepare_backend, **flags))
    try:
        assert isinstance(external, ExternalSidebandBackend)
        # The real HSM released 51 (its inode stays, online = 0); 54 is on disk, unknown to the database.
        database = sqlite3.connect(settings.sideband_url().removeprefix("sqlite:///"))
        with database:
            database.execute(
                "UPDATE sam_inode SET online = 0 WHERE EXISTS (SELECT 1 FROM sam_path p "
                "WHERE p.ino = sam_inode.ino AND p.gen = sam_inode.gen AND p.path = ?)",
                (external.relpath(51),),
            )
        database.close()
        with external.open_writer(54, 784111777.0) as writer:
            writer.write(b"not recorded yet")
            writer.commit()
        ids = [50, 51, 53, 54, *range(1000, 2000)]
        external.check_ready()  # this thread's pooled connection, opened and kept
        statements: list[str] = []
        external.index.db.connection().set_trace_callback(statements.append)
        found = external.localities(ids)
        external.index.db.connection().set_trace_callback(None)
        assert {i: found[i] for i in (50, 51, 53, 54, 1000)} == {
            50: "DISK_AND_TAPE", 51: "TAPE", 53: "DISK", 54: "UNAVAILABLE", 1000: "NONE",
        }  # fmt: skip
        assert found == Backend.localities(external, ids)  # what status() says, file by file
        # One query per 500 files, not one per file.
        assert len([s for s in statements if "sam_path" in s]) == 3, len(statements)
    finally:
        external.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mysql"])
def test_purge_counts_and_lost_look_ups_on_every_catalog_database(kind: str, tmp_path: Path):
    from dbservers import scratch_database

    from pacifica_like.bulk.store import COMPLETED, FAILED, SUBMITTED, NewFile

    with contextlib.ExitStack() as stack:
        if kind == "sqlite":
            url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        else:
            url = stack.enter_context(scratch_database(kind, "pl_limits"))
        store = BulkStore.open(url)
        stack.callback(store.close)
        t0 = 1_800_000_000.0
        done = store.create_request("alice", [NewFile("/3", COMPLETED, 3, pin_seconds=60.0)], now=t0)
        failed = store.create_request("alice", [NewFile("/9", FAILED, 9, error="no such file")], now=t0)
        queued = NewFile("/4", SUBMITTED, 4, 10, "VOL001", 0, pin_seconds=60.0)
        open_one = store.create_request("alice", [queued], now=t0)
        kept = store.create_request("bob", [NewFile("/3", COMPLETED, 3, pin_seconds=7 * 86400.0)], now=t0)
        assert store.stored_requests("alice") == (3, t0)
        # Not yet past retention: nothing goes.
        assert store.purge_expired(3600.0, now=t0 + 1800) == 0
        assert store.purge_expired(3600.0, now=t0 + 7200, client="bob") == 0  # bob's pin still holds
        assert store.purge_expired(3600.0, now=t0 + 7200) == 2
        assert store.request(done) is None and store.request(failed) is None
        assert store.files(done) == ([], None)
        assert store.request(open_one) is not None and store.request(kept) is not None
        assert store.stored_requests("alice") == (1, None)
        assert set(store.pins([3], now=t0 + 7200)) == {3}  # bob's pin on the same file stays
        catalog = GatewayCatalog(url)
        stack.callback(catalog.close)
        assert catalog.record(9, 1, 1.0, None, 2.0) and catalog.mark_lost(9, 2.0)
        assert store.lost([9, 10, *range(1000, 3000)]) == {9}
        store.drop_tables()
