"""Races and faults in the tape backend found in review, each pinned by an interleaving.

Concurrency is made deterministic by hooking the step where the other party
must act (the stager call, publish, a catalog write), so every test shows the
outcome of one exact schedule and runs in well under a second.
"""

from __future__ import annotations

import concurrent.futures
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import webtest
from conftest import LAST_MODIFIED

import pacifica_like.storage.hsm as tape_backend_module
from pacifica_like.core.errors import Conflict, FileNotInArchive
from pacifica_like.storage.tape import operations
from pacifica_like.storage.tape.backend import TapeBackend
from pacifica_like.web.app import build_app


def store(backend: TapeBackend, file_id: int, data: bytes) -> None:
    with backend.open_writer(file_id, 784111777.0) as writer:
        writer.write(data)
        writer.commit()


def offline(backend: TapeBackend, *ids: int) -> None:
    """Migrate and release the files (REGULAR -> OFFLINE)."""
    migrated = operations.run_migrate(backend, operations.plan_migrate(backend, ids))
    assert not migrated.failed, migrated.failed
    released = operations.run_release(backend, operations.plan_release(backend, ids))
    assert not released.failed, released.failed


def http(backend: TapeBackend) -> webtest.TestApp:
    return webtest.TestApp(build_app(backend.settings, backend))


class _HookedStager:
    """The real stager, with a callback run right after each append (another party acting)."""

    def __init__(self, real: Any, after_append: Callable[[], None]) -> None:
        self._real = real
        self._after_append = after_append

    def append(self, *args: Any, **kwargs: Any) -> Any:
        result = self._real.append(*args, **kwargs)
        self._after_append()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


# -- (1) data loss and files at the wrong id ---------------------------------------


def test_a_stage_whose_recall_finishes_at_once_does_not_hang_the_worker(make_tape):
    """add_done_callback runs the callback at once on a finished future; under the lock it deadlocked."""
    backend = make_tape()
    store(backend, 1, b"quick")
    offline(backend, 1)
    real_submit = backend._executor.submit

    def submit_and_finish(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future = real_submit(fn, *args)
        concurrent.futures.wait([future])  # the pool thread wins the race with the caller
        return future

    backend._executor.submit = submit_and_finish  # type: ignore[method-assign]
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(backend.stage(1)), daemon=True)
    worker.start()
    worker.join(timeout=2)
    assert not worker.is_alive(), "stage() deadlocked on its own lock"
    assert results == [True]
    assert Path(backend.path(1)).read_bytes() == b"quick"


def test_release_keeps_an_upload_that_reused_the_released_inode_number(make_tape, monkeypatch):
    """Two uploads land between release's check and its rename; the second reuses the first inode number."""
    backend = make_tape()
    store(backend, 2, b"version one")
    operations.run_migrate(backend, operations.plan_migrate(backend, [2]))
    path = backend.path(2)
    real_rename = os.rename

    def rename(src: str, dst: str) -> None:
        if str(dst).endswith(".release"):
            # Both uploads are published but have not reached their catalog step yet.
            monkeypatch.setattr(backend.catalog, "mark_stale", lambda file_id: 0)
            store(backend, 2, b"version two")
            store(backend, 2, b"version three")
            monkeypatch.undo()
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Conflict, match="changed while being released"):
        backend.release(2)
    monkeypatch.undo()
    assert Path(path).read_bytes() == b"version three"


def test_release_refuses_when_verify_marks_the_copy_bad_meanwhile(make_tape, monkeypatch):
    backend = make_tape()
    store(backend, 3, b"only good copy is on disk")
    operations.run_migrate(backend, operations.plan_migrate(backend, [3]))
    copy = backend.catalog.current_copies(3)[0]
    real_digest = backend.disk_digest

    def digest_while_verify_finds_a_mismatch(fd: int) -> bytes:
        result = real_digest(fd)
        backend.catalog.record_verification(copy.id, "mismatch")  # a concurrent `verify` run
        return result

    monkeypatch.setattr(backend, "disk_digest", digest_while_verify_finds_a_mismatch)
    with pytest.raises(Conflict):
        backend.release(3)
    assert Path(backend.path(3)).read_bytes() == b"only good copy is on disk"


def test_a_file_deleted_while_it_is_migrated_stays_deleted(make_tape):
    backend = make_tape(archive={"allow_delete": True})
    store(backend, 4, b"delete me during migration")
    library = backend.library
    library._stager = _HookedStager(library.stager, lambda: backend.delete(4))
    outcome = operations.run_migrate(backend, operations.plan_migrate(backend, [4]))
    assert [file_id for file_id, _ in outcome.failed] == [4]
    with pytest.raises(FileNotInArchive):
        backend.status(4)
    assert backend.catalog.current_copies(4) == []
    assert http(backend).head("/4", expect_errors=True).status_int == 404


def test_a_put_landing_while_its_old_version_is_migrated_leaves_no_current_old_copy(make_tape):
    backend = make_tape()
    store(backend, 5, b"old")
    library = backend.library
    library._stager = _HookedStager(library.stager, lambda: store(backend, 5, b"new"))
    outcome = operations.run_migrate(backend, operations.plan_migrate(backend, [5]))
    assert [file_id for file_id, _ in outcome.failed] == [5]
    assert backend.catalog.current_copies(5) == []
    assert backend.state(5) == "REGULAR"
    assert Path(backend.path(5)).read_bytes() == b"new"


def test_a_delete_racing_a_recall_does_not_bring_the_file_back(make_tape):
    backend = make_tape(archive={"allow_delete": True})
    store(backend, 6, b"deleted while being recalled")
    offline(backend, 6)
    real_mark_stale = backend.catalog.mark_stale
    entered, go_on = threading.Event(), threading.Event()

    def slow_mark_stale(file_id: int) -> int:
        entered.set()
        assert go_on.wait(5)
        return real_mark_stale(file_id)

    backend.catalog.mark_stale = slow_mark_stale  # type: ignore[method-assign]
    deleter = threading.Thread(target=backend.delete, args=(6,))
    deleter.start()
    assert entered.wait(5)
    backend.recall(6)  # publishes while the DELETE is between its steps
    go_on.set()
    deleter.join(5)
    assert not deleter.is_alive()
    with pytest.raises(FileNotInArchive):
        backend.status(6)
    assert not os.path.exists(backend.path(6))


def test_a_recall_does_not_remove_an_identical_upload_that_replaced_it(make_tape, monkeypatch):
    backend = make_tape()
    data = b"same bytes, uploaded again"
    store(backend, 7, data)
    offline(backend, 7)
    real_publish = tape_backend_module.publish

    def publish_then_upload(source: str, target: str, replace: bool) -> None:
        real_publish(source, target, replace)
        store(backend, 7, data)  # a client re-sends the same file right after the recall lands

    monkeypatch.setattr(tape_backend_module, "publish", publish_then_upload)
    backend.recall(7)
    assert Path(backend.path(7)).read_bytes() == data
    assert backend.state(7) == "REGULAR"


# -- (2) drives held while waiting ----------------------------------------------------


def test_a_bulk_recall_does_not_hold_a_drive_while_another_process_recalls_its_file(make_tape):
    """The CLI holds the volume, waits for a file; another process holds the file, waits for the volume."""
    cli = make_tape(drives=1)
    other = make_tape(drives=1)  # another process: a different owner on the same library
    store(cli, 1, b"first on the volume")
    store(cli, 2, b"second on the volume")
    offline(cli, 1, 2)
    copy = cli.catalog.current_copies(1)[0]
    assert cli.catalog.current_copies(2)[0].vsn == copy.vsn
    assert other._begin_recall(1, copy.vsn)  # the other process started recalling file 1 first
    outcome: list[operations.Outcome] = []
    steps = operations.plan_recall(cli, [1, 2])
    runner = threading.Thread(target=lambda: outcome.append(operations.run_recall(cli, steps)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 5
    # Until the CLI has mounted the volume (it holds it, or already read file 2 from it).
    while not any(d.owner for d in cli.library.drives()) and not os.path.exists(cli.path(2)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        with other.library.drive(copy.vsn, timeout=1.0) as drive:
            other._recall_locked(1, copy, other.path(1), drive)
    finally:
        with other.catalog.db.atomic():
            other.catalog.Recall.delete().where(other.catalog.Recall.file_id == 1).execute()
        runner.join(5)
    assert outcome and not outcome[0].failed, outcome
    assert Path(cli.path(1)).read_bytes() == b"first on the volume"
    assert Path(cli.path(2)).read_bytes() == b"second on the volume"
    assert all(d.owner is None for d in cli.library.drives())


# -- (3) catalog errors reach clients as 503 -----------------------------------------------


def test_a_locked_catalog_is_a_json_503_not_a_500(make_tape):
    backend = make_tape(archive={"allow_delete": True})
    store(backend, 8, b"stored before the lock")
    app = http(backend)
    # This thread's connection (webtest calls the app in it) gives up quickly instead of after 30 s.
    backend.catalog.db.connect(reuse_if_open=True)
    backend.catalog.db.execute_sql("PRAGMA busy_timeout = 50")
    holder = sqlite3.connect(backend.catalog.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing (or stuck) in the catalog
    try:
        put = app.put("/9", b"x", headers={"Last-Modified": LAST_MODIFIED}, expect_errors=True)
        delete = app.delete("/8", expect_errors=True)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    for answer in (put, delete):
        assert answer.status_int == 503, answer.body
        assert answer.json["status"] == 503
        assert "catalog" in answer.json["message"]
