"""Bulk staging under faults: watchdog, failed mounts, pins against release, claims across
processes, a server killed mid-recall, and several workers on one database (SQLite, PostgreSQL, MariaDB).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bulk_helpers import (
    content,
    http,
    make_settings,
    on_disk,
    poll,
    scheduler,
    states,
    store_offline,
    submit,
    wait_for,
)
from dbservers import scratch_database

from pacifica_like.bulk.store import BulkStore, make_owner
from pacifica_like.core.config import load_settings
from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.storage import registry
from pacifica_like.storage.tape import operations
from pacifica_like.web.devserver import cli_server, uwsgi_binary, uwsgi_server

TIMEOUT = 60


@pytest.fixture
def archive(tmp_path: Path, prepare_backend):
    """Build (settings, backend) for the tape backend; closed at the end."""
    built = []

    def build(bulk: dict | None = None, **sections: dict):
        settings = make_settings(tmp_path, "tape", prepare_backend, bulk, **sections)
        backend = registry.create(settings)
        built.append(backend)
        return settings, backend

    yield build
    for backend in built:
        backend.close()


# -- watchdog, retries, policy ---------------------------------------------------------


def test_the_watchdog_fails_a_recall_that_runs_past_recall_timeout(archive):
    settings, backend = archive(
        bulk={"recall_timeout": 0.3, "max_attempts": 1},
        tape={
            "time_scale": 1.0,
            "mount_seconds": 0,
            "unmount_seconds": 0,
            "locate_seconds": 0,
            "read_mib_s": 1.0,
        },
    )
    store_offline(backend, {1: 1 << 20})
    app = http(settings, backend)
    request_id = submit(app, ["/1"]).json["requestId"]
    running = scheduler(settings, backend)
    running.start()
    try:
        document = wait_for(lambda: (d := poll(app, request_id)).get("completedAt") and d)
    finally:
        running.stop()
    (entry,) = document["files"]
    assert entry["state"] == "FAILED" and "recall_timeout" in entry["error"], entry


def test_a_volume_that_cannot_be_mounted_fails_its_files_after_max_attempts(archive):
    settings, backend = archive(bulk={"max_attempts": 2, "poll_seconds": 0.01})
    store_offline(backend, {1: 100, 2: 100})
    vsn = backend.catalog.current_copies(1)[0].vsn
    backend.library.unload_idle()  # the cartridge left in a drive by the migration
    os.rename(backend.library.volume_path(vsn), backend.library.volume_path(vsn) + ".gone")
    app = http(settings, backend)
    request_id = submit(app, ["/1", "/2"]).json["requestId"]
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    document = poll(app, request_id)
    assert set(states(document).values()) == {"FAILED"}
    assert all("could not be mounted" in f["error"] and vsn in f["error"] for f in document["files"])


def test_a_free_drive_waits_idle_wait_seconds_not_max_wait_seconds(archive):
    """A 3-file request on an idle library is mounted after 10 s, not 300 s; busy drives wait longer."""
    from pacifica_like.bulk.store import VolumeQueue

    settings, backend = archive(
        bulk={"mount_min_files": 32, "max_wait_seconds": 300, "idle_wait_seconds": 10}
    )
    store_offline(backend, {1: 100, 2: 100, 3: 100})
    app = http(settings, backend)
    request_id = submit(app, ["/1", "/2", "/3"]).json["requestId"]
    running = scheduler(settings, backend)
    queued_at = time.time()
    assert running.run_pass(now=queued_at + 5) == []  # a free drive, but the queue is only 5 s old
    assert len(running.run_pass(now=queued_at + 11)) == 1  # 11 s: mounted, 289 s before max_wait_seconds
    assert running.run_until_idle(timeout=60)
    assert set(states(poll(app, request_id)).values()) == {"COMPLETED"}

    now = 1000.0
    waiting = [VolumeQueue("SMALL", 3, 300, now - 11, False), VolumeQueue("FRESH", 1, 100, now - 2, False)]
    assert running.pick(waiting, now) == []  # every drive busy: small queues wait max_wait_seconds
    assert [q.vsn for q in running.pick(waiting, now, idle=True)] == ["SMALL"]


def test_aged_queues_are_mounted_first_and_small_fresh_ones_wait(archive):
    settings, backend = archive(bulk={"mount_min_files": 3, "max_wait_seconds": 100})
    running = scheduler(settings, backend)
    from pacifica_like.bulk.store import VolumeQueue

    now = 1000.0
    waiting = [
        VolumeQueue("FRESH", 1, 10, now - 1, False),
        VolumeQueue("BIG", 5, 10, now - 5, False),
        VolumeQueue("OLD", 1, 10, now - 500, False),
        VolumeQueue("OLDER", 1, 10, now - 900, False),
    ]
    assert [q.vsn for q in running.pick(waiting, now)] == ["OLDER", "OLD", "BIG"]


def test_volume_claims_respect_the_drive_cap_across_owners(archive):
    settings, _ = archive()
    store = BulkStore.open(settings.archive.catalog)
    first, second = make_owner(), make_owner()
    assert store.claim_volume("A", first, cap=1)
    assert not store.claim_volume("B", second, cap=1)  # one drive for all schedulers
    assert not store.claim_volume("A", second, cap=2)  # a volume has one holder
    assert store.claim_volume("B", second, cap=2)
    store.release_volume("A", first)
    assert store.claim_volume("A", second, cap=2)


def test_fewer_recalls_in_flight_than_drives_holds_fewer_drives(archive):
    # Mounts take a moment, so both volume threads would still be running after one pass.
    slow_mounts = {"time_scale": 1.0, "mount_seconds": 0.5, "unmount_seconds": 0, "locate_seconds": 0}
    settings, backend = archive(bulk={"max_recalls_in_flight": 1}, tape=slow_mounts)
    store_offline(backend, {1: 100, 2: 100}, spread=2)
    assert len({backend.catalog.current_copies(i)[0].vsn for i in (1, 2)}) == 2
    app = http(settings, backend)
    request_id = submit(app, ["/1", "/2"]).json["requestId"]
    running = scheduler(settings, backend)
    running.run_pass()
    assert len(running.active_volumes()) == 1  # two drives, but one recall in flight at most
    assert running.run_until_idle(timeout=TIMEOUT)
    assert set(states(poll(app, request_id)).values()) == {"COMPLETED"}


# -- pins --------------------------------------------------------------------------------


def test_a_staged_file_stays_pinned_until_released_and_release_skips_it(archive):
    settings, backend = archive()
    store_offline(backend, {1: 500, 2: 500})
    app = http(settings, backend)
    body = {"files": [{"path": "/1", "diskLifetime": "P1D"}, {"path": "/2", "diskLifetime": "PT0S"}]}
    request_id = app.post_json("/api/v1/stage", body, status=201).json["requestId"]
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    assert states(poll(app, request_id)) == {"/1": "COMPLETED", "/2": "COMPLETED"}
    pins = BulkStore.open(settings.archive.catalog).pins
    steps = {s.file_id: s for s in operations.plan_release(backend, [1, 2], pins)}
    assert steps[1].action == "skip" and "pinned" in steps[1].reason
    assert steps[2].action == "release"  # its zero-second pin has expired
    outcome = operations.run_release(backend, list(steps.values()), pinned=pins)
    assert on_disk(backend, 1) == content(1, 500) and on_disk(backend, 2) is None
    assert [s.file_id for s in outcome.skipped] == [1]

    foreign = app.post_json(f"/api/v1/release/{request_id}", {"paths": ["/9"]}, expect_errors=True)
    assert foreign.status_int == 400 and '"/9"' in foreign.json["detail"]
    app.post_json(f"/api/v1/release/{request_id}", {"paths": ["/1"]}, status=200)
    assert operations.plan_release(backend, [1], pins)[0].action == "release"


def test_the_release_command_names_the_pin(archive, tmp_path: Path):
    settings, backend = archive()
    store_offline(backend, {1: 500})
    app = http(settings, backend)
    submit(app, ["/1"])
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    ini = write_ini(tmp_path / "archive.ini", settings.archive.prefix, settings.tape.library, None)

    def release(*flags: str) -> dict:
        command = [
            sys.executable,
            "-m",
            "pacifica_like",
            "release",
            "--config",
            str(ini),
            "--json",
            *flags,
            "1",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    (step,) = release("--dry-run")["files"]
    assert step["action"] == "skip" and "pinned on disk by a bulk stage request" in step["reason"]
    summary = release()
    assert summary["files"] == 0 and summary["skipped"] == 1
    assert on_disk(backend, 1) == content(1, 500)


# -- several processes -------------------------------------------------------------------


def write_ini(path: Path, prefix: str, library: str, catalog: str | None, **tape: Any) -> Path:
    """Write an archive.ini for a tape archive shared by the test and the processes it starts."""
    tape_lines = "\n".join(f"{key} = {value}" for key, value in {"time_scale": 0, **tape}.items())
    path.write_text(
        f"[archive]\nbackend = tape\nprefix = {prefix}\n"
        + (f"catalog = {catalog}\n" if catalog else "")
        + f"[tape]\nlibrary = {library}\nvolume_capacity = 64MiB\n{tape_lines}\n"
        "[bulk]\nmount_min_files = 1\nmax_wait_seconds = 0\npoll_seconds = 0.05\n",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A catalog URL of ``kind``: a SQLite file, or a scratch schema on the real server."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared-catalog.sqlite'}"
        return
    with scratch_database(kind) as url:
        yield url


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mysql"])
def test_two_workers_on_one_database_recall_each_file_once(kind, tmp_path: Path, prepare_backend):
    with database(kind, tmp_path) as url:
        tape = prepare_backend("tape")["tape"]
        ini = write_ini(
            tmp_path / "archive.ini", str(tmp_path / "archive"), tape["library"], url,
            time_scale=0.02, mount_seconds=1, unmount_seconds=1, locate_seconds=0,
        )  # fmt: skip
        settings = load_settings(config_file=str(ini), flags={"tape": {"time_scale": 0.0}}, env={})
        backend = registry.create(settings)
        try:
            sizes = {i: 2000 + i for i in range(1, 41)}
            store_offline(backend, sizes, spread=4)
            app = http(settings, backend)
            request_id = submit(app, [f"/{i}" for i in sizes]).json["requestId"]
            before = backend.library.counters()
            command = [sys.executable, "-m", "pacifica_like", "worker", "--config", str(ini), "--until-idle"]
            workers = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
            for worker in workers:
                _, err = worker.communicate(timeout=TIMEOUT * 2)
                assert worker.returncode == 0, err
            document = poll(app, request_id)
            assert set(states(document).values()) == {"COMPLETED"}, document["summary"]
            after = backend.library.counters()
            # Every byte read exactly once: no file was recalled twice, whichever worker took it.
            assert after["bytes_read"] - before["bytes_read"] == sum(sizes.values())
            assert after["mounts"] - before["mounts"] <= 4  # no volume mounted twice
            for file_id, size in sizes.items():
                assert on_disk(backend, file_id) == content(file_id, size)
            BulkStore.open(url).drop_tables()
        finally:
            backend.close()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def _post(url: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_a_server_killed_mid_recall_finishes_every_file_after_restart(tmp_path: Path, prepare_backend):
    tape = prepare_backend("tape")["tape"]
    ini = write_ini(
        tmp_path / "archive.ini", str(tmp_path / "archive"), tape["library"], None,
        time_scale=1, mount_seconds=0, unmount_seconds=0, locate_seconds=0, read_mib_s=4,
    )  # fmt: skip
    settings = load_settings(config_file=str(ini), flags={"tape": {"time_scale": 0.0}}, env={})
    backend = registry.create(settings)
    try:
        sizes = {i: (1 << 20) + i for i in range(1, 9)}
        store_offline(backend, sizes, spread=2)
        args = ["--config", str(ini)]
        with cli_server(args) as server:
            request_id = _post(server.url + "/api/v1/stage", {"files": [{"path": f"/{i}"} for i in sizes]})[
                "requestId"
            ]
            poll_url = f"{server.url}/api/v1/stage/{request_id}"
            # Kill it while one file is done and others are still being read.
            wait_for(lambda: _get(poll_url)["summary"]["states"]["COMPLETED"] >= 1)
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)
        unfinished = BulkStore.open(settings.archive.catalog).summary(request_id)
        assert unfinished.states["COMPLETED"] < len(sizes)
        with cli_server(args) as server:
            poll_url = f"{server.url}/api/v1/stage/{request_id}"
            document = wait_for(lambda: (d := _get(poll_url)).get("completedAt") and d)
        assert set(states(document).values()) == {"COMPLETED"}, document
        for file_id, size in sizes.items():
            assert on_disk(backend, file_id) == content(file_id, size)
        leftovers = [p for p in Path(settings.archive.prefix).rglob("*.recall")]
        assert leftovers == []
    finally:
        backend.close()


def test_uwsgi_serves_the_api_and_a_worker_beside_it_recalls(tmp_path: Path, prepare_backend):
    try:
        uwsgi_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    tape = prepare_backend("tape")["tape"]
    ini = write_ini(tmp_path / "archive.ini", str(tmp_path / "archive"), tape["library"], None)
    settings = load_settings(config_file=str(ini), env={})
    backend = registry.create(settings)
    try:
        sizes = {i: 3000 + i for i in range(1, 6)}
        store_offline(backend, sizes, spread=2)
    finally:
        backend.close()
    worker = f"cmd={sys.executable} -m pacifica_like worker,stopsignal=15"
    with uwsgi_server({"PAI_CONFIG": str(ini)}, processes=2, extra=["--attach-daemon2", worker]) as server:
        body = {"files": [{"path": f"/{i}"} for i in sizes]}
        request_id = _post(server.url + "/api/v1/stage", body)["requestId"]
        poll_url = f"{server.url}/api/v1/stage/{request_id}"
        document = wait_for(lambda: (d := _get(poll_url)).get("completedAt") and d)
    assert set(states(document).values()) == {"COMPLETED"}, document
    for file_id, size in sizes.items():
        assert on_disk(backend, file_id) == content(file_id, size)


def test_claims_left_by_a_stopped_volume_thread_are_queued_again(archive):
    settings, backend = archive()
    store_offline(backend, {1: 100, 2: 100})
    app = http(settings, backend)
    request_id = submit(app, ["/1", "/2"]).json["requestId"]
    store = BulkStore.open(settings.archive.catalog)
    me = make_owner()
    vsn = backend.catalog.current_copies(1)[0].vsn
    assert store.claim_volume(vsn, me, cap=2)
    jobs = store.claim_jobs(vsn, me, 0, 10)
    assert [j.file_id for j in jobs] == [1, 2]
    assert store.start_job(1, me) == 1
    assert states(poll(app, request_id)) == {"/1": "STARTED", "/2": "SUBMITTED"}
    assert store.requeue_orphans(me, active=[vsn]) == 0  # a live thread still works on it
    assert store.requeue_orphans(me, active=[]) == 2
    assert states(poll(app, request_id)) == {"/1": "SUBMITTED", "/2": "SUBMITTED"}
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    assert states(poll(app, request_id)) == {"/1": "COMPLETED", "/2": "COMPLETED"}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mysql"])
def test_a_request_stored_while_its_shared_recall_ends_is_still_served(kind, archive, tmp_path: Path):
    """Request B shares file 1's running job while that recall ends: B's file must still finish.

    B's insert of the shared job (ON CONFLICT DO NOTHING / INSERT IGNORE) and the
    end of the recall (job deleted, open rows completed) run in two transactions
    that cross; on PostgreSQL the insert locks nothing, so B's row was left
    SUBMITTED with no job, forever.
    """
    import threading

    from pacifica_like.bulk.store import SUBMITTED, NewFile

    with database(kind, tmp_path) as url:
        settings, backend = archive(archive={"catalog": url})
        store_offline(backend, {1: 5000})
        app = http(settings, backend)
        first = submit(app, ["/1"]).json["requestId"]
        position = backend.tape_positions([1])[1]
        store = BulkStore.open(url)
        other = BulkStore.open(url)
        store.held_volumes()  # tables ensured now: CREATE INDEX IF NOT EXISTS would wait for B
        inserted, proceed = threading.Event(), threading.Event()
        insert_rows = other._insert_rows

        def insert_then_pause(model, fields, rows, ignore_duplicates=False):
            insert_rows(model, fields, rows, ignore_duplicates)
            if model is other.Job:  # B's shared job is "inserted"; its transaction is still open
                inserted.set()
                proceed.wait(TIMEOUT)

        other._insert_rows = insert_then_pause  # type: ignore[method-assign]
        created: list[str] = []
        entry = NewFile("/1", SUBMITTED, 1, position.size, position.vsn, position.position, pin_seconds=60)
        storing = threading.Thread(target=lambda: created.append(other.create_request("b", [entry])))
        storing.start()
        assert inserted.wait(TIMEOUT)
        assert backend.recall(1)  # the running recall's bytes land, and it records its end
        ending = threading.Thread(target=store.finish_job, args=(1, "someone", "COMPLETED"))
        ending.start()
        time.sleep(0.5)  # the end goes first where the database lets it
        proceed.set()
        storing.join(TIMEOUT)
        ending.join(TIMEOUT)
        other.close()
        (second,) = created
        assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
        for request_id in (first, second):
            assert set(states(poll(app, request_id)).values()) == {"COMPLETED"}, (kind, request_id)
        store.drop_tables()
        store.close()


def test_a_file_pinned_while_the_release_command_drops_it_is_back_on_disk(archive):
    """A stage request that finds the file on disk and pins it between release's pin check and
    the release itself queues no recall: the release must not leave that pinned file offline."""
    settings, backend = archive()
    store_offline(backend, {1: 700})
    app = http(settings, backend)
    assert backend.recall(1) and on_disk(backend, 1) == content(1, 700)  # DUAL: releasable
    pins = BulkStore.open(settings.archive.catalog).pins
    steps = operations.plan_release(backend, [1], pins)
    assert [s.action for s in steps] == ["release"]
    requests: list[str] = []

    def pins_then_a_request_pins_it(ids: list[int]) -> dict[int, float]:
        found = pins(ids)
        if not requests:  # the check just before the release: then a request comes in
            requests.append(submit(app, ["/1"]).json["requestId"])
        return found

    outcome = operations.run_release(backend, steps, pinned=pins_then_a_request_pins_it)
    (request_id,) = requests
    document = poll(app, request_id)
    assert states(document) == {"/1": "COMPLETED"}
    assert on_disk(backend, 1) == content(1, 700)
    assert [s.file_id for s in outcome.skipped] == [1] and not outcome.done and not outcome.failed


def test_a_file_recalled_for_a_request_is_pinned_before_its_outcome_is_recorded(archive):
    """The recalled file is on disk a moment before the scheduler records COMPLETED (and the
    lifetime pin): a release in that moment must already see a pin, or the request would say
    COMPLETED for a file that is back on tape."""
    settings, backend = archive()
    store_offline(backend, {1: 700})
    app = http(settings, backend)
    request_id = submit(app, ["/1"]).json["requestId"]
    running = scheduler(settings, backend)
    store = running.store
    released: list[list[str]] = []

    def recall_then_a_release_runs(file_id: int) -> bool:
        landed = backend.recall(file_id)
        # The release command, between the file landing and the outcome being recorded.
        steps = operations.plan_release(backend, [file_id], store.pins)
        released.append([s.action for s in steps])
        operations.run_release(backend, steps, pinned=store.pins)
        return landed

    (job,) = store.claim_jobs(backend.catalog.current_copies(1)[0].vsn, running.owner, 0, 10)
    running._recall(job, recall_then_a_release_runs)
    assert released == [["skip"]]
    document = poll(app, request_id)
    assert states(document) == {"/1": "COMPLETED"}
    assert on_disk(backend, 1) == content(1, 700)
    assert store.pins([1])  # the lifetime pin replaced the recall's


def test_a_failed_or_cancelled_recall_leaves_no_pin(archive):
    settings, backend = archive(bulk={"max_attempts": 1})
    store_offline(backend, {1: 700, 2: 700})
    app = http(settings, backend)
    submit(app, ["/1", "/2"])
    running = scheduler(settings, backend)
    store = running.store
    vsn = backend.catalog.current_copies(1)[0].vsn
    first, second = store.claim_jobs(vsn, running.owner, 0, 10)

    def fails(file_id: int) -> bool:
        assert store.pins([file_id])  # held while the recall runs
        raise StorageUnavailable("the drive jammed")

    running._recall(first, fails)
    assert store.pins([first.file_id]) == {}
    assert store.start_job(second.file_id, running.owner, hold=60) == 1
    assert store.pins([second.file_id])
    (request_id,) = {r.id for r in store.Request.select()}
    store.cancel(request_id, [f"/{second.file_id}"])
    assert store.pins([second.file_id]) == {}


def test_a_tape_serve_that_recalled_a_file_stops_on_sigterm(tmp_path: Path, prepare_backend):
    """The recall executor's threads once kept `engine.block()` waiting for ever after a POST /<id>."""
    tape = prepare_backend("tape")["tape"]
    ini = write_ini(tmp_path / "archive.ini", str(tmp_path / "archive"), tape["library"], None)
    settings = load_settings(config_file=str(ini), env={})
    backend = registry.create(settings)
    try:
        store_offline(backend, {1: 1 << 10})
    finally:
        backend.close()
    with cli_server(["--config", str(ini)]) as server:
        # A SIGTERM before the engine has started exits 70 by CherryPy's design; wait for the start.
        assert wait_for(lambda: "Bus STARTED" in server.log())
        request = urllib.request.Request(f"{server.url}/1", method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        os.killpg(server.process.pid, signal.SIGTERM)
        # The server's own stop path, not the harness's SIGKILL after 15 s, must end it.
        assert server.process.wait(timeout=10) == 0, server.log()[-2000:]
