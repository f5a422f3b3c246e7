"""The tape backend through HTTP and its API: states, recalls, faults, drives shared between processes.

Delays are off (time_scale 0) except where a test is about overlap or
timeouts; then the cost model is set so the behaviour shows in a second or less.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import requests
import webtest
from conftest import LAST_MODIFIED, corrupt, files_under

from pacifica_like.core.config import ConfigError, load_settings
from pacifica_like.core.errors import Conflict, FileNotInArchive, OfflineOnTape
from pacifica_like.storage import registry
from pacifica_like.storage.tape import operations
from pacifica_like.storage.tape.backend import TapeBackend
from pacifica_like.storage.tape.library import TapeLibrary
from pacifica_like.web import devserver
from pacifica_like.web.app import build_app

TIMEOUT = 30


def store(backend: TapeBackend, file_id: int, data: bytes, mtime: float = 784111777.0) -> None:
    with backend.open_writer(file_id, mtime) as writer:
        writer.write(data)
        writer.commit()


def migrate(backend: TapeBackend, *ids: int) -> operations.Outcome:
    outcome = operations.run_migrate(backend, operations.plan_migrate(backend, ids))
    assert not outcome.failed, outcome.failed
    return outcome


def release(backend: TapeBackend, *ids: int) -> None:
    outcome = operations.run_release(backend, operations.plan_release(backend, ids))
    assert not outcome.failed, outcome.failed


def http(backend: TapeBackend) -> webtest.TestApp:
    return webtest.TestApp(build_app(backend.settings, backend))


def head(app: webtest.TestApp, file_id: int) -> dict[str, str]:
    return dict(app.head(f"/{file_id}").headers)


# -- states through HTTP ---------------------------------------------------------


def test_a_file_walks_regular_dual_offline_dual_through_http(make_tape):
    backend = make_tape()
    app = http(backend)
    data = os.urandom(70_000)
    assert app.put("/7", data, headers={"Last-Modified": LAST_MODIFIED}).status_int == 201
    regular = head(app, 7)
    assert regular["X-Pacifica-File-State"] == "REGULAR"
    assert regular["X-Pacifica-Bytes-Per-Level"] == "(70000, 0)"
    assert regular["X-Pacifica-File-Storage-Media"] == "disk"

    migrate(backend, 7)
    dual = head(app, 7)
    assert (dual["X-Pacifica-File-State"], dual["X-Pacifica-Bytes-Per-Level"]) == ("DUAL", "(70000, 70000)")

    release(backend, 7)
    assert not os.path.exists(backend.path(7))
    offline = head(app, 7)
    assert offline["X-Pacifica-File-State"] == "OFFLINE"
    assert offline["X-Pacifica-Bytes-Per-Level"] == "(0, 70000)"
    assert offline["X-Pacifica-File-Storage-Media"] == "tape"
    assert offline["X-Content-Length"] == "70000"
    assert offline["Repr-Digest"] == dual["Repr-Digest"]
    assert offline["Last-Modified"] == dual["Last-Modified"]
    assert offline["X-Pacifica-File"] == dual["X-Pacifica-File"]

    refused = app.get("/7", expect_errors=True)
    assert refused.status_int == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert "POST /7" in refused.json["message"]

    staged = app.post("/7")
    assert staged.json == {"message": "File was staged", "file": "7"}
    assert app.get("/7").body == data
    assert head(app, 7)["X-Pacifica-File-State"] == "DUAL"


def test_auto_stage_recalls_on_get_and_streams(make_tape):
    backend = make_tape(auto_stage=True)
    data = os.urandom(10_000)
    store(backend, 3, data)
    migrate(backend, 3)
    release(backend, 3)
    answer = http(backend).get("/3")
    assert answer.body == data
    assert backend.state(3) == "DUAL"
    assert backend.library.counters()["bytes_read"] >= len(data)


def test_post_answers_202_while_a_slow_recall_runs_then_the_file_arrives(make_tape):
    backend = make_tape(time_scale=1.0, mount_seconds=0.0, unmount_seconds=0.0, read_mib_s=1.0)
    data = os.urandom(600_000)  # about 0.6 s at 1 MiB/s
    store(backend, 11, data)
    migrate(backend, 11)
    release(backend, 11)
    slow = make_tape(time_scale=1.0, read_mib_s=1.0, stage_timeout=0.05, mount_seconds=0.0)
    app = http(slow)
    answer = app.post("/11")
    assert answer.status_int == 202
    assert answer.headers["Location"] == "/11"
    assert answer.json["state"] == "UNMIGRATING"
    assert head(app, 11)["X-Pacifica-File-State"] == "UNMIGRATING"
    assert app.get("/11", expect_errors=True).status_int == 503
    deadline = time.monotonic() + 10
    while head(app, 11)["X-Pacifica-File-State"] != "DUAL":
        assert time.monotonic() < deadline, "the recall did not finish"
        time.sleep(0.05)
    assert app.get("/11").body == data


def test_post_and_get_of_an_unknown_id_are_404(make_tape):
    app = http(make_tape())
    assert app.post("/404", expect_errors=True).status_int == 404
    assert app.get("/404", expect_errors=True).status_int == 404
    assert app.head("/404", expect_errors=True).status_int == 404


def test_a_put_over_a_dual_file_makes_its_copies_stale(make_tape):
    backend = make_tape()
    store(backend, 5, b"first version")
    migrate(backend, 5)
    app = http(backend)
    app.put("/5", b"second, longer version", headers={"Last-Modified": LAST_MODIFIED})
    assert all(c.stale for c in backend.catalog.copies(5))
    after = head(app, 5)
    assert (after["X-Pacifica-File-State"], after["X-Pacifica-Bytes-Per-Level"]) == ("REGULAR", "(22, 0)")
    with pytest.raises(Conflict, match="REGULAR"):
        backend.release(5)
    assert os.path.exists(backend.path(5))


def test_a_put_over_an_offline_file_stores_the_new_version(make_tape):
    backend = make_tape()
    store(backend, 6, b"old bytes on tape")
    migrate(backend, 6)
    release(backend, 6)
    store(backend, 6, b"new")
    assert backend.state(6) == "REGULAR"
    assert http(backend).get("/6").body == b"new"
    assert backend.catalog.current_copies(6) == []


def test_write_once_counts_a_file_kept_only_on_tape(make_tape):
    backend = make_tape(archive={"write_once": True})
    store(backend, 8, b"kept")
    migrate(backend, 8)
    release(backend, 8)
    answer = http(backend).put(
        "/8", b"replacement", headers={"Last-Modified": LAST_MODIFIED}, expect_errors=True
    )
    assert answer.status_int == 409
    assert backend.state(8) == "OFFLINE"


def test_delete_of_an_offline_file_retires_its_copies(make_tape):
    backend = make_tape(archive={"allow_delete": True})
    store(backend, 9, b"to delete")
    migrate(backend, 9)
    release(backend, 9)
    app = http(backend)
    assert app.delete("/9").status_int == 200
    assert app.head("/9", expect_errors=True).status_int == 404
    assert 9 not in set(backend.list_ids())
    assert all(c.stale for c in backend.catalog.copies(9))


def test_list_ids_includes_files_only_on_tape(make_tape):
    backend = make_tape()
    for file_id in (1, 2, 3):
        store(backend, file_id, b"x" * file_id)
    migrate(backend, 1, 2)
    release(backend, 1)
    assert sorted(backend.list_ids()) == [1, 2, 3]


# -- faults ------------------------------------------------------------------------


def test_a_corrupted_byte_fails_the_recall_and_leaves_the_cache_empty(make_tape):
    backend = make_tape()
    store(backend, 21, os.urandom(50_000))
    migrate(backend, 21)
    release(backend, 21)
    corrupt(backend, 21)
    answer = http(backend).post("/21", expect_errors=True)
    assert answer.status_int == 503
    assert "sha-256" in answer.json["message"] and "21" in answer.json["message"]
    assert files_under(Path(backend.prefix)) == []
    assert backend.state(21) == "OFFLINE"
    copy = backend.catalog.copies(21)[0]
    assert copy.bad and copy.verify_result == "mismatch"
    # Never silently "repaired": the next attempt refuses at once, naming the bad copy.
    again = http(backend).post("/21", expect_errors=True)
    assert again.status_int == 503 and "bad copy" in again.json["message"]


def test_a_missing_volume_fails_the_recall_clearly(make_tape):
    backend = make_tape()
    store(backend, 22, b"on a lost cartridge")
    migrate(backend, 22)
    release(backend, 22)
    backend.library.unload_idle()
    os.unlink(backend.library.volume_path(backend.catalog.copies(22)[0].vsn))
    answer = http(backend).post("/22", expect_errors=True)
    assert answer.status_int == 503
    assert "missing from the tape library" in answer.json["message"]
    assert files_under(Path(backend.prefix)) == []
    assert backend.state(22) == "OFFLINE"


def test_a_volume_filling_up_sends_the_file_to_the_next_volume(make_tape):
    backend = make_tape(volume_capacity=300_000)
    for file_id in (1, 2, 3):
        store(backend, file_id, os.urandom(120_000))
    migrate(backend, 1, 2, 3)
    placed = {c.file_id: c.vsn for c in map(lambda i: backend.catalog.copies(i)[0], (1, 2, 3))}
    assert placed[1] == placed[2] != placed[3]
    for volume in backend.catalog.Volume.select():
        assert os.path.getsize(backend.library.volume_path(volume.vsn)) == volume.fill


def test_a_file_larger_than_any_volume_is_refused_and_nothing_is_written(make_tape):
    backend = make_tape(volume_capacity=100_000)
    store(backend, 1, os.urandom(200_000))
    outcome = operations.run_migrate(backend, operations.plan_migrate(backend, [1]))
    assert outcome.failed and "no volume has room" in outcome.failed[0][1]
    assert backend.catalog.copies(1) == []
    assert backend.state(1) == "REGULAR"


def test_release_of_a_regular_file_is_refused(make_tape):
    backend = make_tape()
    store(backend, 30, b"disk only")
    with pytest.raises(Conflict, match="migrate it first"):
        backend.release(30)
    assert backend.state(30) == "REGULAR"


def test_an_unverified_copy_is_not_released(make_tape):
    backend = make_tape(verify_after_write=False)
    store(backend, 31, b"written, never read back")
    migrate(backend, 31)
    assert backend.state(31) == "DUAL"
    with pytest.raises(Conflict, match="not verified"):
        backend.release(31)
    assert os.path.exists(backend.path(31))


def test_preflight_names_a_missing_stager(tape_settings, tmp_path: Path):
    missing = str(tmp_path / "nowhere" / "libstager.so")
    settings = tape_settings(stager=missing)
    with pytest.raises(ConfigError, match=missing):
        registry.check(settings)


def test_preflight_names_an_uninitialised_library(tmp_path: Path):
    library = str(tmp_path / "never-initialised")
    settings = load_settings(
        flags={"archive": {"backend": "hpss", "prefix": str(tmp_path / "c")}, "tape": {"library": library}},
        env={},
    )
    with pytest.raises(ConfigError, match="tape init"):
        registry.check(settings)


def test_reading_an_offline_file_without_auto_stage_raises_offline(make_tape):
    backend = make_tape()
    store(backend, 40, b"x")
    migrate(backend, 40)
    release(backend, 40)
    with pytest.raises(OfflineOnTape):
        backend.open_reader(40)
    with pytest.raises(FileNotInArchive):
        backend.open_reader(41)


# -- drives and processes -----------------------------------------------------------


def test_two_recalls_on_two_drives_overlap(make_tape):
    """Each recall takes ~0.5 s of paced stager reading; together they must not take twice as long."""
    setup = make_tape(volume_capacity=5 << 20)
    for file_id in (1, 2):
        store(setup, file_id, os.urandom(4 << 20))
    migrate(setup, 1, 2)
    release(setup, 1, 2)
    assert setup.catalog.copies(1)[0].vsn != setup.catalog.copies(2)[0].vsn
    setup.library.unload_idle()
    backend = make_tape(time_scale=1.0, read_mib_s=8.0, mount_seconds=0.0, unmount_seconds=0.0)
    mounts_before = [d.mounts for d in backend.library.drives()]
    spans: dict[int, tuple[float, float]] = {}

    def recall(file_id: int) -> None:
        start = time.monotonic()
        backend.recall(file_id)
        spans[file_id] = (start, time.monotonic())

    threads = [threading.Thread(target=recall, args=(i,)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (s1, e1), (s2, e2) = spans[1], spans[2]
    assert min(e1 - s1, e2 - s2) >= 0.4, "the stager did not pace the transfer"
    assert min(e1, e2) - max(s1, s2) >= 0.3, f"recalls did not overlap: {spans}"
    mounts = [d.mounts - before for d, before in zip(backend.library.drives(), mounts_before, strict=True)]
    assert mounts == [1, 1], "each recall should have mounted its volume in its own drive"


def test_one_cartridge_is_mounted_once_for_many_concurrent_recalls(make_tape):
    backend = make_tape()
    data = {i: os.urandom(5000) for i in range(1, 9)}
    for file_id, payload in data.items():
        store(backend, file_id, payload)
    migrate(backend, *data)
    release(backend, *data)
    backend.library.unload_idle()
    before = backend.library.counters()["mounts"]
    threads = [threading.Thread(target=backend.recall, args=(i,)) for i in data]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert backend.library.counters()["mounts"] - before == 1
    for file_id, payload in data.items():
        assert Path(backend.path(file_id)).read_bytes() == payload


KILLED_RECALL = textwrap.dedent(
    """
    import sys
    from pacifica_like.storage import registry
    from pacifica_like.core.config import load_settings
    flags = {"archive": {"backend": "tape", "prefix": sys.argv[1]},
             "tape": {"library": sys.argv[2], "time_scale": 1.0, "read_mib_s": 1.0,
                      "mount_seconds": 0.0, "volume_capacity": 64 << 20, "volumes": 4}}
    registry.create(load_settings(flags=flags, env={})).recall(int(sys.argv[3]))
    """
)


def test_a_process_killed_mid_recall_leaves_no_file_and_the_file_recalls_later(make_tape, tmp_path: Path):
    backend = make_tape()
    data = os.urandom(3 << 20)  # three seconds at 1 MiB/s: plenty of time to kill it mid-way
    store(backend, 50, data)
    migrate(backend, 50)
    release(backend, 50)
    backend.library.unload_idle()
    cache_dir = Path(backend.path(50)).parent
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_RECALL, backend.prefix, backend.library.directory, "50"],
        cwd=Path(__file__).parent.parent,
    )
    try:
        deadline = time.monotonic() + 20
        while not any(p.name.endswith(".recall") and p.stat().st_size > 0 for p in cache_dir.glob(".*")):
            assert time.monotonic() < deadline and child.poll() is None, "the recall never started"
            time.sleep(0.02)
        assert backend.state(50) == "UNMIGRATING"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert not os.path.exists(backend.path(50))
    assert backend.state(50) == "OFFLINE"  # the dead process's claim no longer counts
    assert backend.recall(50) is True
    assert hashlib.sha256(Path(backend.path(50)).read_bytes()).digest() == hashlib.sha256(data).digest()
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []
    assert all(d.owner is None for d in backend.library.drives())


@pytest.mark.live
def test_uwsgi_workers_and_the_cli_share_one_library(tape_settings, tmp_path: Path):
    settings = tape_settings(drives=2, volume_capacity=200_000)
    ini = tmp_path / "archive.ini"
    ini.write_text(
        f"[archive]\nbackend = tape\nprefix = {settings.archive.prefix}\n"
        f"[tape]\nlibrary = {settings.tape.library}\ntime_scale = 0\nvolume_capacity = 200000\nvolumes = 4\n"
        # Every POST below waits for its recall (the default lets 2 wait, the rest answer 202).
        "stage_waiters = 16\n"
    )
    data = {i: os.urandom(40_000 + i) for i in range(1, 13)}
    env = {"PAI_CONFIG": str(ini)}
    with devserver.uwsgi_server(env, processes=4) as server:
        for file_id, payload in data.items():
            answer = requests.put(
                f"{server.url}/{file_id}",
                data=payload,
                headers={"Last-Modified": LAST_MODIFIED},
                timeout=TIMEOUT,
            )
            assert answer.status_code == 201, answer.text
        cli = [sys.executable, "-m", "pacifica_like"]
        for command in ("migrate", "release"):
            done = subprocess.run([*cli, command, "--all", "-c", str(ini)], capture_output=True, timeout=60)
            assert done.returncode == 0, done.stderr.decode()
        # The server sees the CLI's release at once: no cache, every answer derives from catalog + disk.
        for file_id in data:
            answer = requests.head(f"{server.url}/{file_id}", timeout=TIMEOUT)
            assert answer.headers["X-Pacifica-File-State"] == "OFFLINE"
        results: dict[int, int] = {}

        def stage(file_id: int) -> None:
            results[file_id] = requests.post(f"{server.url}/{file_id}", timeout=TIMEOUT).status_code

        threads = [threading.Thread(target=stage, args=(i,)) for i in data]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert set(results.values()) == {200}, results
        for file_id, payload in data.items():
            assert requests.get(f"{server.url}/{file_id}", timeout=TIMEOUT).content == payload
    library = TapeLibrary(settings.tape)
    drives = library.drives()
    mounted = [d.vsn for d in drives if d.vsn]
    assert len(mounted) == len(set(mounted)), "a cartridge was in two drives"
    assert all(d.owner is None for d in drives)
    library.catalog.close()
