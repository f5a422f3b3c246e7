"""The sideband section: HEAD ops/s over many files, sideband (SQLite, MariaDB) next to posix.

One SAM-QFS directory of ``files`` small files (written straight to disk with
their sha-256 xattr and mtime; no fsync, they are benchmark data) is served by
four uWSGI servers with the same flags: posix, sideband on SQLite, sideband
on MariaDB through the default driver (mysqlclient where installed) and through
PyMySQL (a scratch database, dropped afterwards). The sideband rows are the
ones the updater computes (``desired_rows``), inserted in bulk. Cells run
``wrk`` HEAD at 16 connections over the whole id range, alternating the
servers for ``rounds`` rounds so drift hits all alike; each server's best
round is reported. Target: sideband at least 80% of posix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import smallfiles
from bench.content import SMALL_SIZE, small_content
from pacifica_like.core.config import load_settings
from pacifica_like.core.ids import id2filename
from pacifica_like.storage.contract import SHA256_XATTR
from pacifica_like.storage.sideband import models
from pacifica_like.storage.sideband.identity import ParentCache, read_disk_file
from pacifica_like.storage.sideband.updater import Statements, desired_rows
from pacifica_like.web.devserver import free_port, run_server, uwsgi_command

FILES = 100_000
CONNECTIONS = 16
MTIME = 784111777
MYSQL_URL = os.environ.get("PL_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
TARGET = 0.8


def write_files(prefix: Path, count: int, log: Callable[[str], None]) -> None:
    """Write ids 1..count as sharded files with the digest xattr the gateway records."""
    for file_id in range(1, count + 1):
        path = prefix / id2filename(file_id)[1:]
        data = small_content(file_id, SMALL_SIZE)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        try:
            os.write(fd, data)
            os.setxattr(fd, SHA256_XATTR, hashlib.sha256(data).digest())
            os.utime(fd, (MTIME, MTIME))
        finally:
            os.close(fd)
        if file_id % 20_000 == 0:
            log(f"sideband: wrote {file_id} files")


def fill_database(url: str, prefix: Path, count: int, log: Callable[[str], None]) -> None:
    """Insert the rows the updater would write for ids 1..count, in bulk."""
    db = models.open_database(url, 10.0, 4)
    models.create_schema(db)
    sql = Statements(db)
    parents = ParentCache()
    batch: dict[str, list[tuple]] = {"sam_inode": [], "sam_file": [], "sam_path": []}
    with models.connected(db):

        def flush() -> None:
            with db.atomic():
                cursor = db.cursor()
                for table, rows in batch.items():
                    if rows:
                        cursor.executemany(sql.insert[table], rows)
                    rows.clear()

        for file_id in range(1, count + 1):
            relpath = id2filename(file_id)[1:]
            disk = read_disk_file(str(prefix / relpath), parents)
            assert disk is not None and disk.gen is not None
            rows = desired_rows(relpath, file_id, disk, [], (disk.ino, disk.gen))
            assert rows is not None and rows.file is not None
            batch["sam_inode"].append(rows.inode)
            batch["sam_file"].append(rows.file)
            batch["sam_path"].append(rows.path)
            if file_id % 5_000 == 0:
                flush()
        flush()
    db.close_all()
    log(f"sideband: {count} files' rows in {models.redact_url(url)}")


@contextlib.contextmanager
def scratch_mysql() -> Iterator[str]:
    """Yield the URL of a fresh MariaDB database; drop it afterwards."""
    import pymysql

    base = MYSQL_URL.rsplit("/", 1)[0]
    name = f"pl_bench_{uuid.uuid4().hex[:10]}"
    admin = models.open_database(MYSQL_URL, 10.0, 1)
    with models.connected(admin):
        admin.execute_sql(f"CREATE DATABASE {name}")
    try:
        yield f"{base}/{name}"
    finally:
        with contextlib.suppress(pymysql.MySQLError), models.connected(admin):
            admin.execute_sql(f"DROP DATABASE {name}")
        admin.close_all()


def run_sideband(
    workdir: Path,
    log: Callable[[str], None],
    files: int = FILES,
    processes: int = 8,
    duration: int = 5,
    rounds: int = 3,
) -> dict[str, Any]:
    """Measure HEAD on posix and sideband (SQLite, MariaDB); return cells and ratios."""
    qfs = workdir / "qfs"
    library = workdir / "library"
    qfs.mkdir(parents=True)
    write_files(qfs, files, log)
    from pacifica_like.storage.tape.library import TapeLibrary

    settings = load_settings(flags={"tape": {"library": str(library), "volumes": 1}}, env={})
    TapeLibrary(settings.tape, require_stager=False).initialise()
    sqlite_url = f"sqlite:///{qfs / '.sideband.sqlite'}"
    fill_database(sqlite_url, qfs, files, log)
    common = {"PAI_PREFIX": str(qfs), "PAI_CATALOG": "off", "PAI_ACCESS_LOG": "off"}
    sideband = {**common, "PAI_BACKEND_TYPE": "sideband", "PAI_TAPE_LIBRARY": str(library)}
    results: dict[str, Any] = {"files": files, "connections": CONNECTIONS, "cells": []}
    with scratch_mysql() as mysql_url:
        fill_database(mysql_url, qfs, files, log)
        targets = {
            "posix": {**common, "PAI_BACKEND_TYPE": "posix"},
            "sideband-sqlite": {**sideband, "PAI_SIDEBAND_DATABASE": sqlite_url},
            "sideband-mariadb": {**sideband, "PAI_SIDEBAND_DATABASE": mysql_url},
            # The same database through the pure-Python driver (the default is mysqlclient, where installed).
            "sideband-mariadb-pymysql": {**sideband, "PAI_SIDEBAND_DATABASE": f"{mysql_url}?driver=pymysql"},
        }
        with contextlib.ExitStack() as stack:
            running = {}
            for name, env in targets.items():
                port = free_port()
                command = uwsgi_command(port, processes)
                log_path = os.fspath(workdir / f"{name}-uwsgi.log")
                running[name] = stack.enter_context(run_server(command, port, env, log_path, 60))
            best: dict[str, float] = {}
            for round_number in range(rounds):
                for name, server in running.items():
                    cell = smallfiles.run_cell(name, server.url, "head", CONNECTIONS, duration, 0, files)
                    results["cells"].append({**cell.as_dict(), "round": round_number})
                    if cell.errors:
                        raise RuntimeError(f"{name}: {cell.errors} HEAD errors")
                    best[name] = max(best.get(name, 0.0), cell.ops_per_s)
                    log(f"sideband: {name} HEAD c={CONNECTIONS}: {cell.ops_per_s:,.0f} ops/s")
    results["best_ops_per_s"] = best
    results["ratio"] = {name: best[name] / best["posix"] for name in best if name != "posix"}
    results["target"] = TARGET
    for name, ratio in results["ratio"].items():
        log(f"sideband: {name} HEAD = {ratio:.2f}x posix (target >= {TARGET})")
    return results
