"""The database module (pacifica_like.db) on real SQLite, PostgreSQL and MariaDB.

URLs per dialect; errors told apart by their codes on real servers (a real
deadlock, a real lock timeout, a locked SQLite file); the retry helper; schema
migrations from a database the code before versions made; many processes
running ``pacifica-like db upgrade`` at once; the command's output and exit status.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import peewee
import pytest
from dbservers import scratch_database

from pacifica_like.cli.main import main
from pacifica_like.core.config import redact_url
from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.db.durable import SQLITE_SHARED
from pacifica_like.db.errors import Contention, ErrorTranslator, error_code
from pacifica_like.db.retry import RetryPolicy, retry
from pacifica_like.db.urls import DatabaseURL, open_database, parse_url
from pacifica_like.gateway.catalog import GatewayCatalog

#: ``mysql`` runs on the default driver (mysqlclient where installed), ``mysql@pymysql`` on PyMySQL.
KINDS = ("sqlite", "postgresql", "mysql", "mysql@pymysql")
FAST = RetryPolicy(seconds=10.0, first_pause=0.0001, max_pause=0.001)

#: The catalog's tables exactly as the gateway created them before schema versions were recorded.
OLD_SCHEMA = {
    "sqlite": [
        'CREATE TABLE "audit_run" ("id" INTEGER NOT NULL PRIMARY KEY, "name" VARCHAR(128) NOT NULL, '
        '"finished_at" REAL NOT NULL, "verdict" VARCHAR(32) NOT NULL, "missing" INTEGER NOT NULL, '
        '"orphans" INTEGER NOT NULL, "listed" INTEGER NOT NULL)',
        'CREATE INDEX "auditrow_name" ON "audit_run" ("name")',
        'CREATE TABLE "inventory" ("file_id" INTEGER NOT NULL PRIMARY KEY, "size" INTEGER NOT NULL, '
        '"mtime" REAL NOT NULL, "sha256" VARCHAR(64), "stored_at" REAL NOT NULL, '
        '"state" VARCHAR(16) NOT NULL)',
        'CREATE TABLE "operation" ("id" INTEGER NOT NULL PRIMARY KEY, "file_id" INTEGER NOT NULL, '
        '"verb" VARCHAR(16) NOT NULL, "started_at" REAL NOT NULL, "owner" VARCHAR(255) NOT NULL)',
        'CREATE INDEX "operationrow_file_id" ON "operation" ("file_id")',
    ],
    "postgresql": [
        'CREATE TABLE "audit_run" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "name" VARCHAR(128) NOT NULL, '
        '"finished_at" DOUBLE PRECISION NOT NULL, "verdict" VARCHAR(32) NOT NULL, "missing" BIGINT NOT NULL, '
        '"orphans" BIGINT NOT NULL, "listed" BIGINT NOT NULL)',
        'CREATE INDEX "auditrow_name" ON "audit_run" ("name")',
        'CREATE TABLE "inventory" ("file_id" BIGINT NOT NULL PRIMARY KEY, "size" BIGINT NOT NULL, '
        '"mtime" DOUBLE PRECISION NOT NULL, "sha256" VARCHAR(64), "stored_at" DOUBLE PRECISION NOT NULL, '
        '"state" VARCHAR(16) NOT NULL)',
        'CREATE TABLE "operation" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "file_id" BIGINT NOT NULL, '
        '"verb" VARCHAR(16) NOT NULL, "started_at" DOUBLE PRECISION NOT NULL, "owner" VARCHAR(255) NOT NULL)',
        'CREATE INDEX "operationrow_file_id" ON "operation" ("file_id")',
    ],
    "mysql": [
        "CREATE TABLE `audit_run` (`id` BIGINT AUTO_INCREMENT NOT NULL PRIMARY KEY, "
        "`name` VARCHAR(128) NOT NULL, "
        "`finished_at` DOUBLE PRECISION NOT NULL, `verdict` VARCHAR(32) NOT NULL, `missing` BIGINT NOT NULL, "
        "`orphans` BIGINT NOT NULL, `listed` BIGINT NOT NULL)",
        "CREATE INDEX `auditrow_name` ON `audit_run` (`name`)",
        "CREATE TABLE `inventory` (`file_id` BIGINT NOT NULL PRIMARY KEY, `size` BIGINT NOT NULL, "
        "`mtime` DOUBLE PRECISION NOT NULL, `sha256` VARCHAR(64), `stored_at` DOUBLE PRECISION NOT NULL, "
        "`state` VARCHAR(16) NOT NULL)",
        "CREATE TABLE `operation` (`id` BIGINT AUTO_INCREMENT NOT NULL PRIMARY KEY, "
        "`file_id` BIGINT NOT NULL, "
        "`verb` VARCHAR(16) NOT NULL, `started_at` DOUBLE PRECISION NOT NULL, `owner` VARCHAR(255) NOT NULL)",
        "CREATE INDEX `operationrow_file_id` ON `operation` (`file_id`)",
    ],
}


@contextlib.contextmanager
def database_url(kind: str, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of an empty database of ``kind`` (a scratch schema on the servers)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    else:
        kind, _, driver = kind.partition("@")
        with scratch_database(kind, "pl_db") as url:
            yield url + (("&" if "?" in url else "?") + f"driver={driver}" if driver else "")


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as found:
        yield found


@pytest.fixture(params=("postgresql", "mysql", "mysql@pymysql"))
def server_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as found:
        yield found


def kind_of(url: str) -> str:
    return parse_url(url).dialect


def rows(url: str, sql: str) -> list[tuple]:
    """Run ``sql`` on a connection of our own; return its rows."""
    db = open_database(url)
    try:
        return [tuple(row) for row in db.execute_sql(sql).fetchall()]
    finally:
        db.close()


def versions(url: str) -> dict[str, int]:
    return dict(rows(url, "SELECT component, version FROM pl_schema_version"))


def probe_table(url: str) -> peewee.Database:
    """Return a database holding table pl_probe with rows 1 and 2."""
    db = open_database(url)
    db.execute_sql("CREATE TABLE pl_probe (id INTEGER PRIMARY KEY, v INTEGER)")
    db.execute_sql("INSERT INTO pl_probe (id, v) VALUES (1, 0), (2, 0)")
    return db


# -- URLs ------------------------------------------------------------------------------------


def test_urls_are_parsed_per_dialect():
    assert parse_url("sqlite:////srv/state/catalog.sqlite") == DatabaseURL(
        "sqlite", "/srv/state/catalog.sqlite"
    )
    assert parse_url(
        "postgres://gw:p%40ss%3Aw@db.example:6543/archive?connect_timeout=5&sslmode=require"
    ) == (
        DatabaseURL(
            "postgresql",
            "archive",
            "db.example",
            6543,
            "gw",
            "p@ss:w",
            {"connect_timeout": 5, "sslmode": "require"},
        )
    )
    found = parse_url("mariadb://root@127.0.0.1/test?read_timeout=2.5&autocommit=true")
    assert (found.dialect, found.database, found.port, found.user, found.password) == (
        "mysql",
        "test",
        None,
        "root",
        None,
    )
    assert found.options == {"read_timeout": 2.5, "autocommit": True}
    with pytest.raises(ValueError, match="three slashes"):
        parse_url("sqlite://catalog.sqlite")
    with pytest.raises(ValueError, match="names no database"):
        parse_url("mysql://root@127.0.0.1:3306/")
    with pytest.raises(ValueError, match="unsupported database URL") as refused:
        parse_url("oracle://gw:s3cret@db/archive")
    assert "s3cret" not in str(refused.value)


def test_each_url_opens_its_dialect_with_its_driver(url: str):
    db = open_database(url)
    try:
        driver = type(db.connection()).__module__.split(".")[0]
        mysql = (
            "pymysql" if "driver=pymysql" in url or importlib.util.find_spec("MySQLdb") is None else "MySQLdb"
        )
        assert driver == {"sqlite": "sqlite3", "postgresql": "psycopg", "mysql": mysql}[kind_of(url)]
        assert db.execute_sql("SELECT 1").fetchone()[0] == 1
        assert db.display_url == redact_url(url)
    finally:
        db.close()


def test_an_unknown_mysql_driver_is_refused_by_name():
    with pytest.raises(
        StorageUnavailable, match="unknown MySQL driver 'oursql': driver= takes mysqlclient or pymysql"
    ):
        open_database("mysql://root@127.0.0.1:3306/test?driver=oursql")


# -- errors by code --------------------------------------------------------------------------


def test_a_real_deadlock_is_contention_by_its_code(server_url: str):
    setup = probe_table(server_url)
    first, second = open_database(server_url), open_database(server_url)
    both_hold_one = threading.Barrier(2, timeout=30)
    outcomes: dict[int, BaseException | None] = {}

    def update(db: peewee.Database, mine: int, theirs: int) -> None:
        sql = f"UPDATE pl_probe SET v = v + 1 WHERE id = {db.param}"
        try:
            with ErrorTranslator(db, "probe database")("cannot update"), db.atomic():
                db.execute_sql(sql, (mine,))
                both_hold_one.wait()
                db.execute_sql(sql, (theirs,))  # each waits for the other: the server breaks the cycle
            outcomes[mine] = None
        except StorageUnavailable as exc:
            outcomes[mine] = exc

    threads = [threading.Thread(target=update, args=args) for args in ((first, 1, 2), (second, 2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        failed = [exc for exc in outcomes.values() if exc is not None]
        assert len(outcomes) == 2 and len(failed) == 1, outcomes
        assert isinstance(failed[0], Contention)
        assert "probe database: cannot update:" in str(failed[0])
        expected = {"mysql": 1213, "postgresql": "40P01"}[kind_of(server_url)]
        assert error_code(failed[0].__cause__) == (kind_of(server_url), expected)
        # The winner committed both rows; the victim's transaction was rolled back.
        assert rows(server_url, "SELECT id, v FROM pl_probe ORDER BY id") == [(1, 1), (2, 1)]
    finally:
        for db in (first, second, setup):
            db.close()


def test_a_lock_wait_that_gives_up_is_contention_by_its_code(url: str):
    setup = probe_table(url)
    holder = open_database(url)
    kind = kind_of(url)
    waiter = (
        open_database(url, sqlite_pragmas=SQLITE_SHARED, lock_type="IMMEDIATE", timeout=0)
        if kind == "sqlite"
        else open_database(url)
    )
    if kind == "mysql":
        waiter.execute_sql("SET SESSION innodb_lock_wait_timeout = 1")
    elif kind == "postgresql":
        waiter.execute_sql("SET lock_timeout = '100ms'")
    try:
        with holder.atomic():
            holder.execute_sql("UPDATE pl_probe SET v = 7 WHERE id = 1")  # holds the row (SQLite: the file)
            with (
                pytest.raises(Contention) as caught,
                ErrorTranslator(waiter, "probe database")("cannot update"),
                waiter.atomic(),
            ):
                waiter.execute_sql("UPDATE pl_probe SET v = 9 WHERE id = 1")
        found = error_code(caught.value.__cause__)
        assert found is not None and found.dialect == kind
        if kind == "sqlite":
            assert isinstance(found.code, int) and found.code & 0xFF == sqlite3.SQLITE_BUSY
        else:
            assert found.code == {"mysql": 1205, "postgresql": "55P03"}[kind]
        assert rows(url, "SELECT v FROM pl_probe WHERE id = 1") == [(7,)]
    finally:
        for db in (waiter, holder, setup):
            db.close()


def test_other_errors_are_storage_unavailable_not_contention(url: str):
    db = open_database(url)
    try:
        with (
            pytest.raises(StorageUnavailable, match="probe database: cannot read: ") as caught,
            ErrorTranslator(db, "probe database")("cannot read"),
        ):
            db.execute_sql("SELECT * FROM pl_no_such_table")
        assert not isinstance(caught.value, Contention)
        assert isinstance(caught.value.__cause__, peewee.DatabaseError)
    finally:
        db.close()


# -- retries ---------------------------------------------------------------------------------


def test_retry_runs_again_after_contention_and_only_then():
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Contention("busy")
        return "done"

    assert retry(flaky, FAST) == "done" and len(calls) == 3

    failures: list[int] = []

    def down() -> None:
        failures.append(1)
        raise StorageUnavailable("down")

    with pytest.raises(StorageUnavailable, match="down"):
        retry(down, FAST)
    assert len(failures) == 1


def test_retry_is_bounded_by_attempts_and_by_time():
    calls: list[int] = []
    cause = OSError("the lock")

    def always() -> None:
        calls.append(1)
        try:
            raise cause
        except OSError as exc:
            raise Contention("busy") from exc

    with pytest.raises(StorageUnavailable, match="gave up") as caught:
        retry(
            always,
            RetryPolicy(seconds=60.0, first_pause=0.0001, attempts=4),
            lambda last: StorageUnavailable("gave up"),
        )
    assert len(calls) == 4 and caught.value.__cause__ is cause
    calls.clear()
    with pytest.raises(Contention):
        retry(always, RetryPolicy(seconds=0.0))
    assert len(calls) == 1


def test_a_transaction_is_retried_past_a_sqlite_lock_released_meanwhile(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'probe.sqlite'}"
    probe_table(url).close()
    holder = sqlite3.connect(tmp_path / "probe.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    db = open_database(url, sqlite_pragmas=SQLITE_SHARED, lock_type="IMMEDIATE", timeout=0)
    errors = ErrorTranslator(db, "probe database")
    attempts: list[int] = []

    def write() -> None:
        attempts.append(1)
        if len(attempts) == 2:
            holder.execute("ROLLBACK")  # the lock goes between the first try and the second
        with errors("cannot write"), db.atomic():
            db.execute_sql("UPDATE pl_probe SET v = 5 WHERE id = 2")

    try:
        retry(write, FAST)
        assert len(attempts) == 2
        assert rows(url, "SELECT v FROM pl_probe WHERE id = 2") == [(5,)]
    finally:
        holder.close()
        db.close()


# -- migrations and `pacifica-like db upgrade` -------------------------------------------------


def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, catalog: str) -> dict[str, str]:
    env = {"PAI_PREFIX": str(tmp_path / "archive"), "PAI_CATALOG": catalog, "PAI_BACKEND_TYPE": "posix"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def make_old_catalog(url: str) -> None:
    """Create the catalog as the code before schema versions did, with a file and a marker in it."""
    kind = kind_of(url)
    if kind == "sqlite":
        Path(parse_url(url).database).parent.mkdir(parents=True, exist_ok=True)
    db = open_database(url)
    try:
        for statement in OLD_SCHEMA[kind]:
            db.execute_sql(statement)
        db.execute_sql(
            "INSERT INTO inventory (file_id, size, mtime, sha256, stored_at, state) "
            "VALUES (41, 3, 784111777.0, NULL, 1700000000.5, 'present')"
        )
        db.execute_sql(
            "INSERT INTO operation (file_id, verb, started_at, owner) VALUES (42, 'PUT', 1.0, 'old:1')"
        )
    finally:
        db.close()


def test_a_catalog_made_by_the_old_code_upgrades_cleanly(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    make_old_catalog(url)
    settings_env(monkeypatch, tmp_path, url)
    assert main(["db", "upgrade"]) == 0
    out = capsys.readouterr().out
    assert "catalog schema upgraded from version none to 1" in out
    assert "bulk schema upgraded from version none to 2" in out
    assert versions(url) == {"catalog": 1, "bulk": 2}
    catalog = GatewayCatalog(url)
    try:
        entry = catalog.entry(41)
        assert entry is not None and (entry.size, entry.stored_at) == (3, 1700000000.5)
        assert [(op.file_id, op.verb) for op in catalog.operations()] == [(42, "PUT")]
        catalog.record_audit("nightly", "clean", 0, 0, 1)
        assert [run.name for run in catalog.latest_audits()] == ["nightly"]
    finally:
        catalog.close()
    assert rows(url, "SELECT name FROM bulk_mutex") == [("volumes",)]

    assert main(["db", "upgrade"]) == 0
    out = capsys.readouterr().out
    assert "catalog schema at version 1, up to date" in out and "bulk schema at version 2, up to date" in out


def test_the_gateway_upgrades_an_old_catalog_on_first_use(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'state' / 'catalog.sqlite'}"
    make_old_catalog(url)
    catalog = GatewayCatalog(url)
    try:
        assert catalog.count() == 1
    finally:
        catalog.close()
    assert versions(url) == {"catalog": 1}


def test_many_processes_upgrading_at_once_create_the_schema_once(url: str, tmp_path: Path):
    env = {
        **os.environ,
        "PAI_PREFIX": str(tmp_path / "archive"),
        "PAI_CATALOG": url,
        "PAI_BACKEND_TYPE": "posix",
    }
    # Each process says it is ready once imported, then waits for the word: the upgrades start
    # together, not one by one as each finishes importing.
    gate = (
        "import sys; from pacifica_like.cli.main import main; "
        "print('ready', flush=True); sys.stdin.readline(); sys.exit(main(sys.argv[1:]))"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", gate, "db", "upgrade"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(4)
    ]
    for process in processes:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.flush()
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, results
    out = "".join(stdout.decode() for stdout, _ in results)
    for component, version in (("catalog", 1), ("bulk", 2)):
        assert out.count(f"{component} schema upgraded from version none to {version}") == 1, out
        assert out.count(f"{component} schema at version {version}, up to date") == 3, out
    assert versions(url) == {"catalog": 1, "bulk": 2}
    tables = set(open_database(url).get_tables())
    assert {"inventory", "operation", "audit_run", "bulk_request", "bulk_file", "bulk_mutex"} <= tables


#: Run in a process: get ready, wait for the word, then use one component, so its schema is created
#: on first use the way a request thread does it (translated, contention retried).
FIRST_USE = """
import sys
from pacifica_like.bulk.store import BulkStore
from pacifica_like.gateway.catalog import GatewayCatalog
url, component = sys.argv[1:]
print("ready", flush=True)
sys.stdin.readline()
if component == "catalog":
    print(GatewayCatalog(url).count())
else:
    print(BulkStore.open(url).in_flight("nobody"))
"""


def start_first_use(url: str, components: list[str]) -> list[subprocess.Popen]:
    """Start a process per component, each ready to use it (FIRST_USE) once told to go."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_USE, url, component],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for component in components
    ]
    for process in processes:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.flush()
    return processes


def wait_for_waiters(db: peewee.Database, application: str, count: int) -> None:
    """Return once ``count`` connections named ``application`` wait for a lock (PostgreSQL)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'"
    deadline = time.monotonic() + 60
    while db.execute_sql(query, (application,)).fetchone()[0] < count:
        assert time.monotonic() < deadline, f"{count} connections of {application} never waited together"


def test_processes_upgrading_different_components_of_a_fresh_database_at_once_all_succeed(url: str):
    # The catalog and the bulk store record their versions in one pl_schema_version table: the
    # first upgrade of each must not race the other's to create it (PostgreSQL: duplicate key).
    components = ["catalog", "bulk"] * 2
    held = None
    if kind_of(url) == "postgresql":
        # Make the race certain: a transaction of ours creates the version table and holds it
        # uncommitted until both processes wait (each on it, or one on it and one on the other's
        # lock), so without one lock per database both CREATEs meet.
        components = ["catalog", "bulk"]
        application = f"pl_race_{os.getpid()}_{threading.get_ident()}"
        target = f"{url}&application_name={application}"
        held, watcher = open_database(url), open_database(url)
        try:
            with held.atomic() as transaction:
                held.execute_sql(
                    "CREATE TABLE pl_schema_version (component VARCHAR(64) PRIMARY KEY, "
                    "version INTEGER NOT NULL, upgraded_at DOUBLE PRECISION NOT NULL)"
                )
                processes = start_first_use(target, components)
                try:
                    wait_for_waiters(watcher, application, len(components))
                finally:
                    transaction.rollback()
        finally:
            held.close()
            watcher.close()
    else:
        processes = start_first_use(url, components)
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * len(components), results
    assert [stdout for stdout, _ in results] == [b"0\n"] * len(components)
    assert versions(url) == {"catalog": 1, "bulk": 2}


def test_a_catalog_of_a_newer_version_is_refused_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    url = f"sqlite:///{tmp_path / 'state' / 'catalog.sqlite'}"
    settings_env(monkeypatch, tmp_path, url)
    assert main(["db", "upgrade"]) == 0
    db = open_database(url)
    db.execute_sql("UPDATE pl_schema_version SET version = 99 WHERE component = 'catalog'")
    db.close()
    capsys.readouterr()
    assert main(["db", "upgrade"]) == 1
    err = capsys.readouterr().err
    assert "holds schema version 99, but this gateway reads and writes version 1 of its catalog tables" in err
    catalog = GatewayCatalog(url)
    with pytest.raises(StorageUnavailable, match="schema version 99"):
        catalog.count()
    catalog.close()
    assert versions(url) == {"catalog": 99, "bulk": 2}


def test_db_upgrade_of_an_unreachable_database_exits_1_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings_env(monkeypatch, tmp_path, f"postgresql://gw:s3cret@127.0.0.1:{port}/none?connect_timeout=5")
    assert main(["db", "upgrade"]) == 1
    err = capsys.readouterr().err
    assert f"pacifica-like db upgrade: catalog database postgresql://gw:***@127.0.0.1:{port}/none" in err
    assert "s3cret" not in err


def test_db_upgrade_creates_the_emulated_sideband_tables_and_refuses_another_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    settings_env(monkeypatch, tmp_path, "off")
    monkeypatch.setenv("PAI_BACKEND_TYPE", "sideband")
    fresh = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    monkeypatch.setenv("PAI_SIDEBAND_DATABASE", fresh)
    assert main(["db", "upgrade"]) == 0
    assert "sideband schema upgraded from version none to 1" in capsys.readouterr().out
    assert rows(fresh, "SELECT id, version FROM sam_version") == [(1, 1)]
    assert {"sam_inode", "sam_file", "sam_path", "sam_archive"} <= set(open_database(fresh).get_tables())

    other = f"sqlite:///{tmp_path / 'other.sqlite'}"
    db = open_database(other)
    db.execute_sql("CREATE TABLE sam_version (id INTEGER PRIMARY KEY, version INTEGER)")
    db.execute_sql("INSERT INTO sam_version VALUES (1, 7)")
    db.close()
    monkeypatch.setenv("PAI_SIDEBAND_DATABASE", other)
    assert main(["db", "upgrade"]) == 1
    assert "holds schema version 7, but this gateway reads and writes version 1" in capsys.readouterr().err
    assert open_database(other).get_tables() == ["sam_version"]  # nothing created in it

    # A real HSM's database (hsm = external) is never changed: nothing to upgrade.
    monkeypatch.setenv("PAI_SIDEBAND_HSM", "external")
    assert main(["db", "upgrade"]) == 0
    assert capsys.readouterr().out == ""


def test_the_tape_catalog_is_versioned_by_the_same_migrations(tmp_path: Path):
    from pacifica_like.storage.tape.catalog import SCHEMA_VERSION, Catalog

    catalog = Catalog(str(tmp_path))
    try:
        assert catalog.create({"VOL000": 1 << 20}, ["drive0"]) == (["VOL000"], ["drive0"])
        assert catalog.create({"VOL000": 1 << 20, "VOL001": 1 << 20}, ["drive0"]) == (["VOL001"], [])
        assert catalog.schema_version() == SCHEMA_VERSION == 2
        catalog.db.execute_sql("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
        with pytest.raises(
            StorageUnavailable, match="holds schema version 9, but this gateway reads and writes"
        ):
            catalog.create({"VOL002": 1 << 20}, [])
        assert [row.vsn for row in catalog.Volume.select().order_by(catalog.Volume.vsn)] == [
            "VOL000",
            "VOL001",
        ]
    finally:
        catalog.close()
