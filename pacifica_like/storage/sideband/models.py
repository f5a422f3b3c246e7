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
tests do) still queries the right one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import peewee
from playhouse.pool import MaxConnectionsExceeded, PooledMySQLDatabase, PooledSqliteDatabase

from pacifica_like.core.config import redact_url
from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.db.schema import create_tables

log = logging.getLogger("pacifica_like.sideband")

#: The schema version this code writes into ``sam_version``.
SCHEMA_VERSION = 1
#: ``sam_inode.type`` of a regular file (the only kind the gateway stores).
TYPE_FILE = 0
#: ``sam_archive.media_type`` of an LTO cartridge, as Oracle HSM names it.
MEDIA_LTO = "li"
#: Seconds a pooled connection is kept before it is replaced (servers drop idle ones).
STALE_SECONDS = 600

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


class _ThreadBoundPool:
    """A pool whose connections stay with the thread that took them, until that thread ends.

    :func:`connected` never checks a connection back in (see there), so a
    thread that ended would hold its connection for good and, after
    ``max_connections`` such threads, every new one would wait and fail. When
    the pool is full, connections of threads that have ended are closed and
    their places freed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: Connection key -> the thread that took it.
        self._owners: dict[int, weakref.ref[threading.Thread]] = {}
        super().__init__(*args, **kwargs)

    def _connect(self) -> Any:
        with self._pool_lock:  # type: ignore[attr-defined]
            try:
                conn = super()._connect()  # type: ignore[misc]
            except MaxConnectionsExceeded:
                if not self._reclaim_ended_threads():
                    raise
                conn = super()._connect()  # type: ignore[misc]
            self._owners[self.conn_key(conn)] = weakref.ref(threading.current_thread())  # type: ignore[attr-defined]
            return conn

    def _reclaim_ended_threads(self) -> bool:
        """Close the in-use connections whose threads have ended; True if any place was freed."""
        freed = False
        with self._pool_lock:  # type: ignore[attr-defined]
            for key, held in list(self._in_use.items()):  # type: ignore[attr-defined]
                owner = self._owners.get(key)
                if owner is None:
                    continue  # not taken through this class: leave it alone
                thread = owner()
                if thread is None or not thread.is_alive():
                    del self._in_use[key]  # type: ignore[attr-defined]
                    self._owners.pop(key, None)
                    self._close_raw(held.connection)  # type: ignore[attr-defined]
                    freed = True
        return freed


class _SqlitePool(_ThreadBoundPool, PooledSqliteDatabase):
    """The SQLite pool (see :class:`_ThreadBoundPool`)."""


class _MySQLPool(_ThreadBoundPool, PooledMySQLDatabase):
    """PyMySQL pool that checks a connection out without a round trip.

    playhouse.pool pings every connection it hands out (a round trip per
    query, as much as the query itself). A connection the server dropped
    fails its next query instead; :func:`translate_errors` then discards it
    and the caller retries once on a fresh one.
    """

    def _is_closed(self, conn: Any) -> bool:
        return not getattr(conn, "open", False)


def open_database(url: str, connect_timeout: float, max_connections: int) -> peewee.Database:
    """Open (lazily: nothing connects here) the pooled database ``url`` names; point the proxy at it.

    ``sqlite:///PATH`` (WAL, so HEADs never wait for a writer) or
    ``mysql://user:password@host:port/schema`` (PyMySQL, with connect, read
    and write timeouts of ``connect_timeout`` seconds, so a dead server gives
    a prompt 503 rather than a hung request).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        path = url.split("://", 1)[1][1:]
        db: peewee.Database = _SqlitePool(
            path,
            max_connections=max_connections,
            stale_timeout=STALE_SECONDS,
            timeout=connect_timeout,
            # mmap: page reads are memory reads shared by every worker process, not pread() calls.
            pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",
                "busy_timeout": 30000,
                "mmap_size": 1 << 30,
            },
            # Writers take the lock up front: a refresh reads, then writes, and must not interleave.
            lock_type="IMMEDIATE",
            check_same_thread=False,
        )
    elif scheme == "mysql":
        try:
            import pymysql  # noqa: F401 - fail here, naming the extra, not on the first query
        except ImportError as exc:
            raise StorageUnavailable(
                "the sideband database is MySQL/MariaDB, but PyMySQL is not installed "
                "(pip install 'pacifica-like[mysql]')"
            ) from exc
        timeout = max(1, round(connect_timeout))
        db = _MySQLPool(
            unquote(parts.path.lstrip("/")),
            max_connections=max_connections,
            stale_timeout=STALE_SECONDS,
            timeout=connect_timeout,
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            charset="utf8mb4",
            connect_timeout=timeout,
            read_timeout=timeout,
            write_timeout=timeout,
            # A row lock waited for must give up (error 1205, retried) before the read timeout
            # drops the connection (InnoDB waits 50 s by default); else the refresh is lost.
            init_command=f"SET SESSION innodb_lock_wait_timeout = {max(1, timeout - 1)}",
        )
    else:
        raise StorageUnavailable(f"unsupported sideband database {redact_url(url)}")
    db.display_url = redact_url(url)  # type: ignore[attr-defined]
    db.connect_timeout = connect_timeout  # type: ignore[attr-defined]
    database.initialize(db)
    return db


@contextlib.contextmanager
def connected(db: peewee.Database) -> Iterator[None]:
    """Run the block on this thread's pooled connection, taking one from the pool on first use.

    The connection stays with the thread afterwards: checking it in and out
    per query cost more than a HEAD's query (peewee re-runs the SQLite pragmas
    on every check-out, PyMySQL rolls back on every check-in). A failed one is
    discarded by :func:`translate_errors`.
    """
    if db.is_closed():
        db.connect()
    yield


def is_mysql(db: peewee.Database) -> bool:
    """True for MySQL/MariaDB (upsert syntax, locking reads)."""
    return isinstance(db, peewee.MySQLDatabase)


@contextlib.contextmanager
def translate_errors(db: peewee.Database, what: str) -> Iterator[None]:
    """Turn database and driver errors into StorageUnavailable naming the database (password hidden).

    A connection that failed is discarded, not returned to the pool, so the
    next call opens a fresh one: requests recover by themselves once the
    server is back.
    """
    try:
        yield
    except StorageUnavailable:
        raise
    except MaxConnectionsExceeded as exc:
        raise StorageUnavailable(
            f"sideband database {db.display_url}: {what}: all {db._max_connections} pooled connections "  # type: ignore[attr-defined]
            "are held by other threads; raise [sideband] max_connections above the number of threads "
            "that use the database (request threads, recalls, bulk workers)"
        ) from exc
    except (peewee.PeeweeException, OSError) as exc:
        discard_connection(db)
        reason = str(exc).strip() or type(exc).__name__
        raise StorageUnavailable(
            f"sideband database {db.display_url} is unavailable: {what}: {reason}"  # type: ignore[attr-defined]
        ) from exc


def discard_connection(db: peewee.Database) -> None:
    """Close this thread's connection without handing it back to the pool."""
    with contextlib.suppress(Exception):
        if not db.is_closed():
            db.manual_close()


_schema_ready: set[tuple[int, str]] = set()


def create_schema(db: peewee.Database) -> None:
    """Create the tables and the version row where missing, then check the version (once per process)."""
    key = (os.getpid(), str(db.database), "create")
    if key in _schema_ready:
        return
    # No lock across the round trips: with the server unreachable, threads waiting in turn
    # would each add a connect timeout to the next one's wait. Both statements are idempotent.
    if isinstance(db, peewee.SqliteDatabase):
        os.makedirs(os.path.dirname(db.database) or ".", exist_ok=True)
    with connected(db), db.bind_ctx(MODELS):
        if db.table_exists(SamVersion._meta.table_name):
            _require_version(db)  # before creating anything in a database of another schema
        create_tables(db, MODELS)  # several worker processes may race here
        SamVersion.insert(id=1, version=SCHEMA_VERSION).on_conflict_ignore().execute()
        _require_version(db)
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


def _require_version(db: peewee.Database) -> None:
    """StorageUnavailable unless ``sam_version`` says :data:`SCHEMA_VERSION`: other columns, other rows."""
    left, right = db.quote[0], db.quote[-1]
    sql = f"SELECT {left}version{right} FROM {left}sam_version{right}"
    found = sorted({int(row[0]) for row in db.execute_sql(sql).fetchall()})
    if found != [SCHEMA_VERSION]:
        raise StorageUnavailable(
            f"sideband database {db.display_url} holds schema version "  # type: ignore[attr-defined]
            f"{', '.join(map(str, found)) or '(none: sam_version is empty)'}, but this gateway reads and "
            f"writes version {SCHEMA_VERSION}; point [sideband] database at a database of that version"
        )
