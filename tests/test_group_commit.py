"""Group commit of the SQLite catalog, and the file as the record of truth when a power cut takes rows.

The flushes are real fdatasyncs of a real WAL, counted in the sync file every
process shares; the power cut is the catalog put back to a copy taken before
the uploads (every page written since then lost, which covers losing any
un-flushed part of it), after a kill -9 of a live uWSGI server.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import peewee
import pytest
import requests
from test_inventory_truth import (
    TIMEOUT,
    assert_row_describes_disk,
    audit,
    catalog_path,
    make_gate,
    put,
    running,
)

from pacifica_like.core.ids import id2filename
from pacifica_like.db import durable
from pacifica_like.db.durable import SQLITE_SHARED, DurableCommits


def open_db(path: Path, busy_wait_ms: int = 0) -> peewee.SqliteDatabase:
    """Open the test database as the catalog does (``busy_wait_ms``: let SQLite wait for its lock)."""
    pragmas = {**SQLITE_SHARED, "busy_timeout": busy_wait_ms}
    db = peewee.SqliteDatabase(str(path), pragmas=pragmas, timeout=busy_wait_ms / 1000)
    db.execute_sql("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
    return db


def test_a_flush_that_began_after_a_commit_returned_covers_it(tmp_path: Path):
    commits = DurableCommits(open_db(tmp_path / "c.sqlite"), flush_interval=0)
    with commits.db.atomic():
        commits.db.execute_sql("INSERT INTO t VALUES (1)")
    first_done = time.monotonic_ns()
    with commits.db.atomic():
        commits.db.execute_sql("INSERT INTO t VALUES (2)")
    commits.sync_wal()  # leads: the flush begins after both commits returned
    assert commits.flushes() == 1
    commits.sync_wal(committed=first_done)  # covered by that flush: no second one
    assert commits.flushes() == 1
    with commits.transaction():  # a commit after the last flush began: flushed again
        commits.db.execute_sql("INSERT INTO t VALUES (3)")
    assert commits.flushes() == 2


def test_commits_queued_behind_a_flush_in_another_process_share_the_next_one(tmp_path: Path):
    """Three processes commit while a fourth holds the flush; two flushes serve them all, none is skipped."""
    path = tmp_path / "c.sqlite"
    leader = DurableCommits(open_db(path), flush_interval=0)
    with leader.transaction():
        leader.db.execute_sql("INSERT INTO t VALUES (0)")
    assert leader.flushes() == 1
    # Hold the sync lock as a leader does while it flushes.
    fd = os.open(leader.sync_path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    pids, ready = [], []
    for n in range(1, 4):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker process: commit, say so, then wait for a durable commit
            os.close(r)
            status = 1
            try:
                # The three commit at once: SQLite's own wait orders them (no retry helper here).
                commits = DurableCommits(open_db(path, busy_wait_ms=TIMEOUT * 1000), flush_interval=0)
                with commits.db.atomic():
                    commits.db.execute_sql("INSERT INTO t VALUES (?)", (n,))
                # Timed before saying so (as transaction() times it right after the commit): the
                # leader's flush then surely begins after every commit it must cover.
                committed = time.monotonic_ns()
                os.write(w, b"committed")
                commits.sync_wal(committed=committed)
                status = 0
            except BaseException as exc:
                os.write(w, repr(exc).encode())
            finally:
                os._exit(status)
        os.close(w)
        pids.append(pid)
        ready.append(r)
    for r in ready:
        assert os.read(r, 16) == b"committed"
        os.close(r)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    # One of them led a flush that began after all three had committed; the others shared it.
    assert leader.flushes() == 2
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert sorted(n for (n,) in db.execute("SELECT n FROM t")) == [0, 1, 2, 3]


def test_a_lazy_commit_is_flushed_within_the_interval_by_a_timer(tmp_path: Path, monkeypatch):
    flushed = threading.Event()
    monkeypatch.setattr(durable, "after_flush", lambda wal: flushed.set())
    commits = DurableCommits(open_db(tmp_path / "c.sqlite"), flush_interval=0.2)
    with commits.transaction(lazy=True):  # no flush yet at all: this one leads
        commits.db.execute_sql("INSERT INTO t VALUES (1)")
    assert commits.flushes() == 1 and flushed.is_set()
    flushed.clear()
    with commits.transaction(lazy=True):  # within the interval: answered before its flush...
        commits.db.execute_sql("INSERT INTO t VALUES (2)")
    assert commits.flushes() == 1
    assert flushed.wait(TIMEOUT)  # ...which the timer runs once the interval has passed
    assert commits.flushes() == 2
    with commits.transaction():  # strict (bulk requests, deletions): flushed before it returns
        commits.db.execute_sql("INSERT INTO t VALUES (3)")
    assert commits.flushes() == 3


def test_an_upload_killed_between_publish_and_record_is_recorded_by_the_next_audit(
    prefix: Path, tmp_path: Path
):
    (tmp_path / "gate").mkdir()
    gate = make_gate(tmp_path / "gate")
    fifos = Path(gate["PL_TEST_RECORD_GATE"])
    body = b"k" * 1000  # the gated size
    with running("uwsgi", prefix, env=gate) as server:
        assert put(server.url, 31, b"first").status_code == 201
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(put, server.url, 32, body)
            with open(fifos / "arrived") as arrived:  # published and durable, not recorded
                assert arrived.read() == "published\n"
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=TIMEOUT)
            with pytest.raises(requests.ConnectionError):  # the client never got its answer
                held.result(timeout=TIMEOUT)
    assert (prefix / id2filename(32)[1:]).read_bytes() == body
    with contextlib.closing(sqlite3.connect(catalog_path(prefix))) as db:
        assert db.execute("SELECT file_id FROM inventory ORDER BY file_id").fetchall() == [(31,)]
    reports = tmp_path / "reports"
    status, summary = audit(prefix, reports, "kill", "--fix", "--max-orphan-fraction", "1")
    assert status == 1  # drift found (and fixed)
    assert summary["orphan"]["unrecorded_uploads"] == 1
    assert [(a["file"], a["action"]) for a in summary["fix"]["actions"]] == [(32, "record")]
    assert assert_row_describes_disk(prefix, 32) == body
    assert audit(prefix, reports, "after")[1]["verdict"] == "ok"


def test_every_acknowledged_upload_survives_a_power_cut_that_takes_the_catalogs_pages(
    prefix: Path, tmp_path: Path
):
    """Rows lost with the catalog's pages come back from the files' xattrs: recorded, never quarantined."""
    saved = tmp_path / "catalog-before"
    with running("uwsgi", prefix, processes=4) as server:
        assert put(server.url, 1, b"before the cut").status_code == 201
        # What the disk held before the uploads: the catalog with one row (as if no page since
        # had reached it). Copied while the WAL holds that row, with its -wal.
        saved.mkdir()
        for part in ("", "-wal"):
            shutil.copy2(f"{catalog_path(prefix)}{part}", saved / f"catalog{part}")
        ids = range(100, 300)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda n: put(server.url, n, b"%d" % n * 50), ids))
        assert {a.status_code for a in answers} == {201}  # every one acknowledged
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=TIMEOUT)
    for part in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{catalog_path(prefix)}{part}")
    shutil.copy2(saved / "catalog", catalog_path(prefix))
    shutil.copy2(saved / "catalog-wal", f"{catalog_path(prefix)}-wal")

    reports = tmp_path / "reports"
    status, summary = audit(prefix, reports, "cut", "--max-orphan-fraction", "1")
    assert (status, summary["orphan"]["count"], summary["orphan"]["unrecorded_uploads"]) == (1, 200, 200)
    status, summary = audit(prefix, reports, "cut", "--fix", "--max-orphan-fraction", "1")
    actions = {a["action"] for a in summary["fix"]["actions"]}
    assert actions == {"record"} and len(summary["fix"]["actions"]) == 200
    for n in ids:
        assert assert_row_describes_disk(prefix, n) == b"%d" % n * 50
    assert assert_row_describes_disk(prefix, 1) == b"before the cut"
    assert not (prefix / ".quarantine").exists()
    assert audit(prefix, reports, "after")[1]["verdict"] == "ok"
