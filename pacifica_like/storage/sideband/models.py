"""The sideband schema (Oracle HSM's table and column names) and the pooled database behind it.

Tables, each keyed on the file's identity ``(ino, gen)``: an inode number alone
is reused by the filesystem once a file is gone, and only the generation tells
the new file from rows the old one left behind.

* ``sam_inode``: one row per file: type, size, ``online`` (data on disk), ``csum``
  (sha-256, hex), times (epoch seconds), owner;
* ``sam_file``: the directory entry: parent identity ``(p_ino, p_gen)``, name, name hash;
* ``sam_path``: the path relative to the filesystem's mount point (``sam_qfs_prefix``);
* ``sam_archive``: one row per archive copy: copy number, volume (``vsn``), ``position``
  of the record on the volume, ``offset`` within it, size, ``stale`` once replaced;
* ``sam_version``: the schema version.

Models are bound to :data:`database`, a ``peewee.DatabaseProxy`` that
:func:`open_database` points at a real database when a backend starts, never at
import: uWSGI forks after import, and no connection may cross the fork. The
hot paths (HEAD, the updater) run their queries on the database object
:func:`open_database` returned, so a process that opened a second database (the
tests do) still queries the right one. Connections are kept per thread and
bounded (:mod:`pacifica_like.db.pool`); errors are translated by code
(:mod:`pacifica_like.db.errors`); the tables are created and upgraded by
versioned migrations (:mod:`pacifica_like.db.migrations`), the version kept in
``sam_version``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import peewee
from playhouse.migrate import SchemaMigrator

from pacifica_like.core.config import redact_url
from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.db import errors as db_errors
from pacifica_like.db.migrations import Schema, upgrade
from pacifica_like.db.urls import dialect_of, parse_url
from pacifica_like.db.urls import open_database as open_url

log = logging.getLogger("pacifica_like.sideband")

#: ``sam_inode.type`` of a regular file (the only kind the gateway stores).
TYPE_FILE = 0
#: ``sam_archive.media_type`` of an LTO cartridge, as Oracle HSM names it.
MEDIA_LTO = "li"

database = peewee.DatabaseProxy()


class _SamModel(peewee.Model):
    class Meta:
        database = database
        legacy_table_names = False


class SamInode(_SamModel):
    """One file (a regular file: ``type`` 0). ``online`` 1: its data is on disk."""

    ino = peewee.BigIntegerField()
    gen = peewee.BigIntegerField()
    type = peewee.SmallIntegerField(default=TYPE_FILE)
    size = peewee.BigIntegerField()
    online = peewee.SmallIntegerField()
    csum = peewee.CharField(max_length=64, null=True)
    create_time = peewee.BigIntegerField()
    modify_time = peewee.BigIntegerField()
    uid = peewee.IntegerField(default=0)
    gid = peewee.IntegerField(default=0)

    class Meta:
        table_name = "sam_inode"
        primary_key = peewee.CompositeKey("ino", "gen")


class SamFile(_SamModel):
    """A directory entry: the file ``(ino, gen)`` is ``name`` in directory ``(p_ino, p_gen)``."""

    ino = peewee.BigIntegerField()
    gen = peewee.BigIntegerField()
    p_ino = peewee.BigIntegerField()
    p_gen = peewee.BigIntegerField()
    name = peewee.CharField(max_length=255)
    name_hash = peewee.BigIntegerField()

    class Meta:
        table_name = "sam_file"
        primary_key = peewee.CompositeKey("ino", "gen")
        indexes = ((("p_ino", "p_gen", "name_hash"), False),)


class SamPath(_SamModel):
    """The file's path relative to the mount point; HEAD finds files by it (unique index)."""

    ino = peewee.BigIntegerField()
    gen = peewee.BigIntegerField()
    path = peewee.CharField(max_length=760, unique=True)

    class Meta:
        table_name = "sam_path"
        primary_key = peewee.CompositeKey("ino", "gen")


class SamArchive(_SamModel):
    """One archive copy of a file version: where it sits on tape. ``stale`` 1: a newer version exists."""

    ino = peewee.BigIntegerField()
    gen = peewee.BigIntegerField()
    copy = peewee.SmallIntegerField()
    seq = peewee.IntegerField()
    media_type = peewee.CharField(max_length=4, default=MEDIA_LTO)
    vsn = peewee.CharField(max_length=32)
    position = peewee.BigIntegerField()
    offset = peewee.BigIntegerField(default=0)
    size = peewee.BigIntegerField()
    stale = peewee.SmallIntegerField(default=0)
    create_time = peewee.BigIntegerField()

    class Meta:
        table_name = "sam_archive"
        primary_key = peewee.CompositeKey("ino", "gen", "copy", "seq")
        indexes = ((("vsn", "position"), False),)


class SamVersion(_SamModel):
    """The schema version (one row)."""

    id = peewee.IntegerField(primary_key=True)
    version = peewee.IntegerField()

    class Meta:
        table_name = "sam_version"


MODELS = (SamVersion, SamInode, SamFile, SamPath, SamArchive)


def open_database(url: str, connect_timeout: float, max_connections: int) -> peewee.Database:
    """Open (lazily: nothing connects here) the database ``url`` names; point the proxy at it.

    ``sqlite:///PATH`` (WAL, so HEADs never wait for a writer) or
    ``mysql://user:password@host:port/schema`` (mysqlclient or PyMySQL, with connect, read
    and write timeouts of ``connect_timeout`` seconds, so a dead server gives
    a prompt 503 rather than a hung request). At most ``max_connections``
    connections, each kept by its thread; a thread waits ``connect_timeout``
    seconds for one.
    """
    try:
        dialect = parse_url(url).dialect
    except ValueError as exc:
        raise StorageUnavailable(f"unsupported sideband database {redact_url(url)}: {exc}") from exc
    if dialect == "sqlite":
        db = open_url(
            url,
            max_connections=max_connections,
            pool_wait=connect_timeout,
            # mmap: page reads are memory reads shared by every worker process, not pread() calls.
            sqlite_pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",
                "busy_timeout": 30000,
                "mmap_size": 1 << 30,
            },
            # Writers take the lock up front: a refresh reads, then writes, and must not interleave.
            lock_type="IMMEDIATE",
        )
    elif dialect == "mysql":
        timeout = max(1, round(connect_timeout))
        db = open_url(
            url,
            max_connections=max_connections,
            pool_wait=connect_timeout,
            connect_timeout=timeout,
            read_timeout=timeout,
            write_timeout=timeout,
            # A row lock waited for must give up (error 1205, retried) before the read timeout
            # drops the connection (InnoDB waits 50 s by default); else the refresh is lost.
            init_command=f"SET SESSION innodb_lock_wait_timeout = {max(1, timeout - 1)}",
        )
    else:
        raise StorageUnavailable(f"unsupported sideband database {redact_url(url)}")
    db.connect_timeout = connect_timeout  # type: ignore[attr-defined]
    db.errors = db_errors.ErrorTranslator(  # type: ignore[attr-defined]
        db, f"{db_errors.label_of(db, 'sideband')} is unavailable", "[sideband] max_connections"
    )
    database.initialize(db)
    return db


@contextlib.contextmanager
def connected(db: peewee.Database) -> Iterator[None]:
    """Run the block on this thread's pooled connection, taking one from the pool on first use.

    The connection stays with the thread afterwards: checking it in and out
    per query cost more than a HEAD's query (peewee re-runs the SQLite pragmas
    on every check-out, PyMySQL rolls back on every check-in). A failed one is
    closed by :func:`translate_errors`.
    """
    if db.is_closed():
        db.connect()
    yield


def is_mysql(db: peewee.Database) -> bool:
    """True for MySQL/MariaDB (upsert syntax, locking reads)."""
    return dialect_of(db) == "mysql"


def translate_errors(db: peewee.Database, what: str) -> contextlib.AbstractContextManager[None]:
    """Turn database and driver errors into StorageUnavailable naming the database (password hidden).

    The translator every catalog uses (:mod:`pacifica_like.db.errors`): a
    connection that broke is closed, so the next call opens a fresh one and
    requests recover by themselves once the server is back.
    """
    return db.errors(what)  # type: ignore[attr-defined, no-any-return]


def discard_connection(db: peewee.Database) -> None:
    """Close this thread's connection (it failed)."""
    db_errors.discard_connection(db)


class SamVersionStore:
    """The sideband's schema version lives in Oracle HSM's own ``sam_version`` table (one row)."""

    def read(self, db: peewee.Database, component: str) -> int | None:
        if not db.table_exists("sam_version"):
            return None
        found = _versions(db)
        if len(found) > 1:
            raise StorageUnavailable(
                f"sideband database {db.display_url} holds several schema versions "  # type: ignore[attr-defined]
                f"({', '.join(map(str, found))}) in sam_version"
            )
        return found[0] if found else None

    def write(self, db: peewee.Database, component: str, version: int) -> None:
        left, right = db.quote[0], db.quote[-1]
        table = f"{left}sam_version{right}"
        db.execute_sql(f"DELETE FROM {table}")
        db.execute_sql(
            f"INSERT INTO {table} ({left}id{right}, {left}version{right}) VALUES (1, {int(version)})"
        )

    def forget(self, db: peewee.Database, component: str) -> None:
        if db.table_exists("sam_version"):
            db.execute_sql("DELETE FROM sam_version")


def _create_v1(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """Version 1: the five tables as the emulator created them before migrations were run."""
    with db.bind_ctx(MODELS):
        db.create_tables(MODELS, safe=True)


#: The sideband tables' schema versions; ``sam_version`` holds the one a database is at.
SCHEMA = Schema("sideband", (_create_v1,), SamVersionStore())
#: The schema version this code reads and writes (``sam_version``).
SCHEMA_VERSION = SCHEMA.latest


_schema_ready: set[tuple[int, str]] = set()


def create_schema(db: peewee.Database) -> None:
    """Create the tables and the version row where missing, then check the version (once per process)."""
    key = (os.getpid(), str(db.database), "create")
    if key in _schema_ready:
        return
    # No lock across the round trips in this process: with the server unreachable, threads
    # waiting in turn would each add a connect timeout to the next one's wait. upgrade() takes
    # the database's own lock only when there is something to do, and reads the version first,
    # so nothing is created in a database of another schema version.
    if isinstance(db, peewee.SqliteDatabase):
        os.makedirs(os.path.dirname(db.database) or ".", exist_ok=True)
    with connected(db):
        upgrade(db, SCHEMA, db_errors.label_of(db, "sideband"))
    _schema_ready.add(key)


def check_schema(db: peewee.Database) -> None:
    """Raise unless the database holds the sideband tables at our schema version (once per process).

    For a database someone else keeps: nothing is created.
    """
    key = (os.getpid(), str(db.database), "check")
    if key in _schema_ready:
        return
    with connected(db):
        _require_version(db)
    _schema_ready.add(key)


#: The tables HEAD and the scheduler read; a database someone else keeps must have them.
READ_TABLES = ("sam_inode", "sam_path", "sam_archive")


def check_tables(db: peewee.Database) -> None:
    """Raise unless the database holds the tables the gateway reads (once per process).

    For a database a real HSM keeps (``hsm = external``): nothing is created, and
    ``sam_version`` is not compared, since the HSM numbers its own schema.
    """
    key = (os.getpid(), str(db.database), "tables")
    if key in _schema_ready:
        return
    with connected(db):
        missing = [table for table in READ_TABLES if not db.table_exists(table)]
    if missing:
        raise StorageUnavailable(
            f"sideband database {db.display_url} has no {', '.join(missing)} "  # type: ignore[attr-defined]
            "table: [sideband] database must name the HSM's sideband schema"
        )
    _schema_ready.add(key)


def _versions(db: peewee.Database) -> list[int]:
    """Return the distinct versions ``sam_version`` holds, sorted."""
    left, right = db.quote[0], db.quote[-1]
    sql = f"SELECT {left}version{right} FROM {left}sam_version{right}"
    return sorted({int(row[0]) for row in db.execute_sql(sql).fetchall()})


def _require_version(db: peewee.Database) -> None:
    """StorageUnavailable unless ``sam_version`` says :data:`SCHEMA_VERSION`: other columns, other rows."""
    found = _versions(db)
    if found != [SCHEMA_VERSION]:
        raise StorageUnavailable(
            f"sideband database {db.display_url} holds schema version "  # type: ignore[attr-defined]
            f"{', '.join(map(str, found)) or '(none: sam_version is empty)'}, but this gateway reads and "
            f"writes version {SCHEMA_VERSION}; point [sideband] database at a database of that version"
        )
