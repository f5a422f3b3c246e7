"""The gateway catalog: the inventory of stored files and the operations in flight.

One database per archive, named by ``[archive] catalog`` (a peewee database
URL: ``sqlite:///PATH`` by default under the prefix, ``postgresql://`` or
``mysql://`` when several gateway nodes share the archive). Two tables:

* ``inventory``: one row per stored file: size, mtime, sha-256 (hex), when
  the gateway stored it (``stored_at``) and ``state`` (``present``, or
  ``LOST`` once an audit found the file gone from storage);
* ``operation``: one row per PATCH or DELETE under way, inserted before the
  storage is touched and removed in the same transaction that records the
  outcome, so an audit can leave those files alone. An upload writes none: its
  temp file marks it in flight, and its row is its only write
  (``pacifica_like.gateway.inventory``).

Nothing connects at import or construction: peewee opens a connection per
thread on the first query, and the schema is brought to its latest version on
first use in each process (uWSGI forks after import; no connection may cross the
fork), or by ``pacifica-like db upgrade``. Model classes are made per catalog
(:func:`pacifica_like.db.binding.bind_models`), so one process may hold several
catalogs. Database errors leave this module as
:class:`~pacifica_like.core.errors.StorageUnavailable`, cause kept
(:mod:`pacifica_like.db.errors`); a transaction that lost a race for a lock is
run again (:mod:`pacifica_like.db.retry`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import peewee
from playhouse.migrate import SchemaMigrator

from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.core.owners import owner_name
from pacifica_like.db.binding import bind_models
from pacifica_like.db.durable import SQLITE_SHARED, DurableCommits
from pacifica_like.db.errors import Contention, ErrorTranslator, label_of
from pacifica_like.db.migrations import Schema, forget, upgrade
from pacifica_like.db.retry import RetryPolicy, retry, transaction
from pacifica_like.db.urls import dialect_of, open_database

log = logging.getLogger("pacifica_like.gateway.catalog")

PRESENT = "present"
LOST = "LOST"
#: Rows read per query when an audit takes a snapshot: bounded memory on the client, any database.
SNAPSHOT_PAGE = 50_000
#: Seconds a call waits for a locked SQLite catalog, and its first and longest pause between tries.
LOCK_WAIT = 30.0
LOCK_PAUSE = 0.00005
LOCK_PAUSE_MAX = 0.001
#: Seconds ``/ready`` waits for the catalog's write lock before it calls the catalog unable to take a write.
READY_LOCK_WAIT = 1.0
#: How the catalog's transactions retry contention (a locked SQLite database, a deadlock victim).
RETRY = RetryPolicy(seconds=LOCK_WAIT, first_pause=LOCK_PAUSE, max_pause=LOCK_PAUSE_MAX)
READY_RETRY = RetryPolicy(seconds=READY_LOCK_WAIT, first_pause=LOCK_PAUSE, max_pause=0.05)

T = TypeVar("T")


class _InventoryRow(peewee.Model):
    """One stored file as the gateway recorded it. Times are epoch seconds."""

    # DoubleField, not FloatField: peewee maps FloatField to a 4-byte REAL on PostgreSQL and
    # MySQL, which cannot tell two epoch timestamps within a few minutes apart.
    file_id = peewee.BigIntegerField(primary_key=True)
    size = peewee.BigIntegerField()
    mtime = peewee.DoubleField()
    sha256 = peewee.CharField(max_length=64, null=True)
    stored_at = peewee.DoubleField()
    state = peewee.CharField(max_length=16, default=PRESENT)


class _OperationRow(peewee.Model):
    """A PUT, PATCH or DELETE of ``file_id`` that started and has not finished."""

    id = peewee.BigAutoField()
    file_id = peewee.BigIntegerField(index=True)
    verb = peewee.CharField(max_length=16)
    started_at = peewee.DoubleField()
    #: host:pid:start:token of the gateway process (``pacifica_like.core.owners``): a sweep tells
    #: the marker of a dead upload by it; older gateways wrote host:pid.
    owner = peewee.CharField(max_length=255)


class _AuditRow(peewee.Model):
    """The outcome of one finished audit run, so /metrics can report the latest per name."""

    id = peewee.BigAutoField()
    name = peewee.CharField(max_length=128, index=True)
    finished_at = peewee.DoubleField()
    verdict = peewee.CharField(max_length=32)
    #: -1 when not judged (an incomplete listing judges no file missing).
    missing = peewee.BigIntegerField()
    orphans = peewee.BigIntegerField()
    listed = peewee.BigIntegerField()


_TABLES = {"inventory": _InventoryRow, "operation": _OperationRow, "audit_run": _AuditRow}


def _create_v1(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """Version 1: the tables as the gateway created them before versions were recorded."""
    db.create_tables(list(bind_models(db, _TABLES).values()), safe=True)


#: The catalog's schema versions (``pacifica-like db upgrade``; see pacifica_like.db.migrations).
SCHEMA = Schema("catalog", (_create_v1,))


@dataclass(frozen=True)
class AuditRun:
    """The latest recorded outcome of an audit name."""

    name: str
    finished_at: float
    verdict: str
    missing: int
    orphans: int
    listed: int


@dataclass(frozen=True)
class InventoryEntry:
    """One inventory row as a plain value."""

    file_id: int
    size: int
    mtime: float
    sha256: str | None
    stored_at: float
    state: str


@dataclass
class Snapshot:
    """The inventory at one moment, as parallel arrays sorted by file id (8 bytes per value).

    ``lost`` holds 1 where the row is marked LOST; ``digests`` (when asked for)
    the first 8 bytes of each row's sha-256 as a signed integer, 0 for none: enough
    to spot a file whose digest differs from its row (the audit then compares the
    whole digest). Parallel arrays, not objects: a million rows take 25 MiB
    instead of several hundred.
    """

    ids: array
    stored_at: array
    sizes: array
    lost: array
    seconds: float = 0.0
    digests: array | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Operation:
    """An operation marker: which file, which verb, since when, by whom (``token``: its row id)."""

    file_id: int
    verb: str
    started_at: float
    owner: str
    token: int = 0


@dataclass(frozen=True)
class StoredVersion:
    """A version of a file as storage holds it now: what its inventory row must say."""

    size: int
    mtime: float
    sha256: bytes | None


#: Reads the version storage holds under a file id now (None: nothing is stored under it).
#: Called with the file's inventory row locked, so a later reader sees a later storage state.
StorageProbe = Callable[[], StoredVersion | None]


def digest_key(sha256: str | bytes | None) -> int:
    """Return the first 8 bytes of a sha-256 (hex or raw) as a signed integer; 0 for none."""
    if sha256 is None:
        return 0
    raw = bytes.fromhex(sha256[:16]) if isinstance(sha256, str) else sha256[:8]
    return int.from_bytes(raw, "big", signed=True) if len(raw) == 8 else 0


def _same_version(found: StoredVersion, said: StoredVersion | None) -> bool:
    """True when a row saying ``said`` describes ``found`` (mtimes within a microsecond).

    A float mtime set with utime() reads back through nanoseconds, not always bit for bit.
    """
    return (
        said is not None
        and (found.size, found.sha256) == (said.size, said.sha256)
        and abs(found.mtime - said.mtime) < 1e-6
    )


def _translate(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a catalog method (one transaction): errors translated, contention retried (RETRY)."""
    return transaction(what, RETRY)


class GatewayCatalog:
    """The catalog database of one archive; safe to share between threads.

    ``url`` is a peewee database URL. The database directory of a SQLite file is
    created on first use.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.lower().startswith("sqlite")
        if self.is_sqlite:
            # Several processes write: see pacifica_like.db.durable (WAL, lock at BEGIN, fsync
            # of the WAL outside the lock, retries sooner than SQLite's own busy wait).
            self.db = open_database(url, sqlite_pragmas=SQLITE_SHARED, lock_type="IMMEDIATE", timeout=0)
        else:
            self.db = open_database(url)
        self.display_url: str = self.db.display_url  # type: ignore[attr-defined]
        self.errors = ErrorTranslator(self.db, label_of(self.db, "catalog"))
        self.durable = DurableCommits(self.db)
        self.is_mysql = dialect_of(self.db) == "mysql"
        bound = bind_models(self.db, _TABLES)
        self.Inventory, self.Operation = bound["inventory"], bound["operation"]
        self.AuditRun = bound["audit_run"]
        self._returning = dialect_of(self.db) == "postgresql"
        self._sql = self._statements()
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        # SQLite: the file each thread's connection opened, and whether this process ever had one.
        self._path = self.db.database if self.is_sqlite and self.db.database != ":memory:" else None
        self._opened = threading.local()
        self._had_file = False
        self._owner: tuple[int, str] | None = None

    @property
    def owner(self) -> str:
        """The owner name operation markers carry (host:pid:start:gateway), made once per process."""
        pid = os.getpid()
        if self._owner is None or self._owner[0] != pid:
            self._owner = (pid, owner_name("gateway"))
        return self._owner[1]

    def __repr__(self) -> str:
        return f"GatewayCatalog({self.display_url!r})"

    def _statements(self) -> dict[str, str]:
        """Return the SQL of the calls every upload makes, written once per dialect.

        Building these through peewee's query builder cost ~0.5 ms of CPU per PUT,
        more than the SQLite work itself (~0.05 ms); under load, CPU is what PUTs wait for.
        """
        left, right = self.db.quote[0], self.db.quote[-1]

        def name(identifier: str) -> str:
            return f"{left}{identifier}{right}"

        param = self.db.param
        inventory, operation = name("inventory"), name("operation")
        columns = ("file_id", "size", "mtime", "sha256", "stored_at", "state")
        insert = (
            f"INSERT INTO {inventory} ({', '.join(map(name, columns))}) "
            f"VALUES ({', '.join([param] * len(columns))})"
        )
        if self.is_mysql:
            update = ", ".join(f"{name(c)} = VALUES({name(c)})" for c in columns[1:])
            upsert = f"{insert} ON DUPLICATE KEY UPDATE {update}"
        else:
            update = ", ".join(f"{name(c)} = EXCLUDED.{name(c)}" for c in columns[1:])
            upsert = f"{insert} ON CONFLICT ({name('file_id')}) DO UPDATE SET {update}"
        begin = (
            f"INSERT INTO {operation} ({name('file_id')}, {name('verb')}, {name('started_at')}, "
            f"{name('owner')}) VALUES ({param}, {param}, {param}, {param})"
        )
        if self._returning:
            begin += f" RETURNING {name('id')}"
        return {
            "begin": begin,
            "upsert": upsert,
            "end": f"DELETE FROM {operation} WHERE {name('id')} = {param}",
            "forget": f"DELETE FROM {inventory} WHERE {name('file_id')} = {param}",
            "correct": (
                f"UPDATE {inventory} SET {name('size')} = {param}, {name('mtime')} = {param}, "
                f"{name('sha256')} = {param}, {name('stored_at')} = {param}, {name('state')} = {param} "
                f"WHERE {name('file_id')} = {param}"
            ),
            "row": (
                f"SELECT {name('size')}, {name('mtime')}, {name('sha256')}, {name('state')} FROM {inventory} "
                f"WHERE {name('file_id')} = {param}" + ("" if self.is_sqlite else " FOR UPDATE")
            ),
            "probe": (
                f"INSERT INTO {operation} ({name('file_id')}, {name('verb')}, {name('started_at')}, "
                f"{name('owner')}) VALUES (-1, 'READY', 0, 'ready probe')"
            ),
        }

    # -- plumbing ------------------------------------------------------------------

    def _check_file(self) -> None:
        """SQLite: make sure this thread's connection has the file the catalog path names now.

        A connection holds its file open, so a catalog deleted or replaced under a
        running gateway would otherwise take writes into a file no one will ever
        read again. A replaced file (restored from a backup) is reopened. A deleted
        one is refused (StorageUnavailable) rather than recreated empty: an empty
        inventory makes every stored file look like an orphan. The catalog is
        created only by a process that never had it, and not where a ``-wal``
        file shows it was deleted while in use. One stat per call.
        """
        path = self._path
        if path is None:
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if self._had_file or any(os.path.exists(path + s) for s in ("-wal", "-shm")):
                raise StorageUnavailable(
                    f"catalog database {self.display_url}: the file was deleted while in use; restore it "
                    f"(with its -wal), or remove {path}-wal and {path}-shm to start a new, empty catalog "
                    "(then audit --fix --record-orphans)"
                ) from None
            return  # first use: connecting creates it
        identity = (st.st_dev, st.st_ino)
        opened = getattr(self._opened, "identity", None)
        if opened is not None and opened != identity and not self.db.is_closed():
            log.error(
                "catalog database %s: the path names another file than the one this process had open "
                "(replaced or restored); using the file there now",
                self.display_url,
            )
            self.db.close()
            self._schema_ready = False
        if self.db.is_closed():
            self.db.connect(reuse_if_open=True)
            st = os.stat(path)
            identity = (st.st_dev, st.st_ino)
        self._opened.identity = identity
        self._had_file = True

    def may_exist(self) -> bool:
        """False when the SQLite catalog file does not exist (yet): nothing in it to read."""
        return self._path is None or os.path.exists(self._path)

    def ensure_schema(self) -> None:
        """Check the SQLite file, then upgrade the schema once per process (safe when many do at once)."""
        self._check_file()
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            if self.is_sqlite:
                path = self.db.database
                if path != ":memory:":
                    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            upgrade(self.db, SCHEMA, self.errors.label)
            self._schema_ready = True

    @_translate("cannot connect")
    def connect(self) -> None:
        """Make sure this thread has a connection (no query when it has one); a database known down: 503.

        An upload checks this before storing instead of writing a marker: while
        the catalog is down, uploads are refused (503) rather than piling up for
        the next audit to record. The inventory closes the connection after a
        failed write (:meth:`close`), so the next upload connects afresh.
        """
        self.ensure_schema()
        self.db.connect(reuse_if_open=True)

    @_translate("cannot record the audit result")
    def record_audit(self, name: str, verdict: str, missing: int | None, orphans: int, listed: int) -> None:
        """Store one finished audit's outcome (``missing`` None: not judged)."""
        self.ensure_schema()
        with self.durable.transaction():
            self.AuditRun.create(
                name=name,
                finished_at=time.time(),
                verdict=verdict,
                missing=-1 if missing is None else missing,
                orphans=orphans,
                listed=listed,
            )

    @_translate("cannot read the audit results")
    def latest_audits(self) -> list[AuditRun]:
        """Return the most recent outcome of each audit name, by name."""
        self.ensure_schema()
        table = self.AuditRun
        newest = table.select(table.name, peewee.fn.MAX(table.id).alias("newest")).group_by(table.name)
        ids = [row.newest for row in newest]
        rows = table.select().where(table.id.in_(ids)).order_by(table.name) if ids else []
        return [AuditRun(r.name, r.finished_at, r.verdict, r.missing, r.orphans, r.listed) for r in rows]

    def check_ready(self) -> None:
        """Raise StorageUnavailable unless the catalog can take a write now (``GET /ready``).

        A real write that is rolled back: a marker row inserted in a transaction
        (on SQLite one that takes the write lock, BEGIN IMMEDIATE), waiting at most
        READY_LOCK_WAIT for a lock another connection holds. On SQLite also: the
        path still names the file this process has open, and the file, its
        ``-wal`` and its directory are writable (an immutable or read-only file
        refuses new connections, which the open one would not notice).
        """
        try:
            with self.errors("cannot take a write"):
                self.ensure_schema()
                if self._path is not None:
                    for what in (self._path, self._path + "-wal", os.path.dirname(self._path) or "."):
                        if os.path.exists(what) and not os.access(what, os.W_OK):
                            raise StorageUnavailable(
                                f"catalog database {self.display_url}: {what} is not writable"
                            )
        except Contention as busy:
            # Upgrading the schema found the database locked: not ready now (a 503), no wait.
            raise StorageUnavailable(
                f"catalog database {self.display_url}: cannot take a write: the database is locked"
            ) from busy.__cause__

        def probe() -> None:
            with self.errors("cannot take a write"):
                self._write_probe()

        def give_up(last: Contention) -> StorageUnavailable:
            return StorageUnavailable(
                f"catalog database {self.display_url}: cannot take a write: another connection "
                f"has held the write lock for more than {READY_LOCK_WAIT:g} s"
            )

        retry(probe, READY_RETRY, give_up)

    def _write_probe(self) -> None:
        """Insert a marker and roll it back, waiting at most about READY_LOCK_WAIT for a lock."""
        wait = max(1, round(READY_LOCK_WAIT))
        if self.is_mysql:
            # Session-wide on MySQL, so put the server's defaults back for the uploads after us.
            self.db.execute_sql(f"SET SESSION lock_wait_timeout = {wait}, innodb_lock_wait_timeout = {wait}")
        try:
            with self.db.atomic() as transaction:
                if self._returning:  # PostgreSQL
                    self.db.execute_sql(f"SET LOCAL lock_timeout = {int(READY_LOCK_WAIT * 1000)}")
                self.db.execute_sql(self._sql["probe"])
                transaction.rollback()
        finally:
            if self.is_mysql:
                self.db.execute_sql(
                    "SET SESSION lock_wait_timeout = DEFAULT, innodb_lock_wait_timeout = DEFAULT"
                )

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        with contextlib.suppress(peewee.PeeweeException):
            if not self.db.is_closed():
                self.db.close()

    @_translate("cannot drop the tables")
    def drop_tables(self) -> None:
        """Remove the catalog's tables (tests and benchmarks clean up with this)."""
        self.db.drop_tables([self.Inventory, self.Operation, self.AuditRun], safe=True)
        forget(self.db, SCHEMA)
        self._schema_ready = False

    # -- what the gateway records --------------------------------------------------

    @_translate("cannot record an operation")
    def begin(self, file_id: int, verb: str) -> int:
        """Mark an operation on ``file_id`` as started; return its token for the ``finish`` calls."""
        self.ensure_schema()
        with self.db.atomic():
            cursor = self.db.execute_sql(self._sql["begin"], (file_id, verb, time.time(), self.owner))
            return cursor.fetchone()[0] if self._returning else cursor.lastrowid

    @_translate("cannot record a stored file")
    def finish_stored(
        self,
        token: int | None,
        file_id: int,
        size: int,
        mtime: float,
        sha256: bytes | None,
        probe: StorageProbe | None = None,
    ) -> None:
        """Record the file now stored under ``file_id`` and end marker ``token`` (if any), in one transaction.

        With ``probe``, the row ends up describing what storage holds *now*, read
        with the row locked: two uploads of one id may publish in one order and
        record in the other, and the later record must not put back the older
        version (see :meth:`_settle`).
        """
        self.ensure_schema()
        row = (file_id, size, mtime, sha256.hex() if sha256 is not None else None, time.time(), PRESENT)
        # Lazy: the file carries its own record, and the next audit records a row a power cut took.
        with self.durable.transaction(lazy=True):
            # The upsert takes the row's lock (SQLite: the database's, taken at BEGIN IMMEDIATE).
            self.db.execute_sql(self._sql["upsert"], row)
            if probe is not None:
                self._settle(file_id, StoredVersion(size, mtime, sha256), probe())
            if token is not None:
                self.db.execute_sql(self._sql["end"], (token,))

    def _settle(self, file_id: int, written: StoredVersion | None, found: StoredVersion | None) -> None:
        """Make the locked row of ``file_id`` say ``found`` (what storage holds), where it says ``written``.

        Why this is commit order: every PUT, PATCH and DELETE records *after* its
        storage call, and reads storage only once it holds the row lock. The
        record that takes the lock last therefore reads storage after the last
        storage call, and its row is the truth, whichever order the records came in.
        """
        if found is None:
            self.db.execute_sql(self._sql["forget"], (file_id,))
        elif not _same_version(found, written):
            digest = found.sha256.hex() if found.sha256 is not None else None
            values = (found.size, found.mtime, digest, time.time(), PRESENT, file_id)
            self.db.execute_sql(self._sql["correct"], values)

    def _settle_locked(self, file_id: int, probe: StorageProbe, forget_absent: bool) -> None:
        """Lock the row of ``file_id``, then make it describe what ``probe`` finds.

        ``forget_absent``: no file means no row (a deletion); otherwise an
        existing row stays when there is no file (the audit reports it missing).
        """
        row = self.db.execute_sql(self._sql["row"], (file_id,)).fetchone()
        if row is None:
            # No row to lock: a placeholder locks the key (settled below, never committed as such).
            self.db.execute_sql(self._sql["upsert"], (file_id, -1, 0.0, None, time.time(), PRESENT))
            said = None
        else:
            size, mtime, digest, state = row
            said = StoredVersion(size, mtime, bytes.fromhex(digest) if digest else None)
            if state != PRESENT:
                said = None  # a LOST row whose file is back gets corrected below
        found = probe()
        if found is None and row is not None and not forget_absent:
            return
        self._settle(file_id, said, found)

    @_translate("cannot settle a file's inventory row")
    def settle(self, file_id: int, probe: StorageProbe, tokens: tuple[int, ...], forget_absent: bool) -> None:
        """Make the row of ``file_id`` describe what storage holds now; end markers ``tokens`` with it.

        For operations whose process died before recording them (the start-up
        sweep): a file on storage is complete (only committed files get their
        name), so it is recorded. ``forget_absent``: see :meth:`_settle_locked`.
        """
        self.ensure_schema()
        with self.durable.transaction():
            self._settle_locked(file_id, probe, forget_absent)
            for token in tokens:
                self.db.execute_sql(self._sql["end"], (token,))

    @_translate("cannot record a file")
    def record(self, file_id: int, size: int, mtime: float, sha256: bytes | None, stored_at: float) -> bool:
        """Add a row for a file the inventory lacks (an audit's fix); False if a row appeared meanwhile.

        Also ends the file's leftover operation markers, in the same transaction.
        """
        self.ensure_schema()
        row = {
            "file_id": file_id,
            "size": size,
            "mtime": mtime,
            "sha256": sha256.hex() if sha256 is not None else None,
            "stored_at": stored_at,
            "state": PRESENT,
        }
        with self.durable.transaction():
            if self.Inventory.get_or_none(self.Inventory.file_id == file_id) is not None:
                return False
            self.Inventory.insert(**row).execute()
            self.Operation.delete().where(self.Operation.file_id == file_id).execute()
        return True

    @_translate("cannot remove a file from the inventory")
    def forget(self, file_id: int, stored_at: float) -> bool:
        """Remove the row of a deleted file if it still describes the version stored at ``stored_at``.

        Also ends the file's leftover operation markers. False when the row changed meanwhile.
        """
        self.ensure_schema()
        inventory = self.Inventory
        with self.durable.transaction():
            removed = (
                inventory.delete()
                .where((inventory.file_id == file_id) & (inventory.stored_at == stored_at))
                .execute()
            )
            if removed:
                self.Operation.delete().where(self.Operation.file_id == file_id).execute()
        return bool(removed)

    @_translate("cannot read the operations in flight")
    def has_operation(self, file_id: int, started_after: float) -> bool:
        """True when an operation on ``file_id`` started after ``started_after`` is still marked."""
        self.ensure_schema()
        operation = self.Operation
        query = operation.select(operation.id).where(
            (operation.file_id == file_id) & (operation.started_at > started_after)
        )
        return query.exists()

    @_translate("cannot open the catalog")
    def require_existing(self) -> None:
        """Raise StorageUnavailable unless the catalog was created already (by the gateway).

        An audit must not create an empty catalog: against an empty inventory
        every stored file would look like an orphan.
        """
        if self.is_sqlite and not os.path.isfile(self.db.database):
            raise StorageUnavailable(
                f"catalog database {self.display_url}: no such file (is [archive] catalog right? "
                "the gateway creates it on its first upload)"
            )
        if not self.db.table_exists("inventory"):
            raise StorageUnavailable(
                f"catalog database {self.display_url}: it has no inventory table (is [archive] "
                "catalog right? the gateway creates it on its first upload)"
            )
        self.ensure_schema()

    @_translate("cannot record a deleted file")
    def finish_deleted(self, token: int, file_id: int, probe: StorageProbe | None = None) -> None:
        """Drop ``file_id`` from the inventory and end operation ``token``, in one transaction.

        With ``probe``, a file stored again since the deletion keeps (or gets) its row.
        """
        self.ensure_schema()
        with self.durable.transaction():
            if probe is None:
                self.db.execute_sql(self._sql["forget"], (file_id,))
            else:
                self._settle_locked(file_id, probe, forget_absent=True)
            self.db.execute_sql(self._sql["end"], (token,))

    @_translate("cannot end an operation")
    def abandon(self, token: int) -> None:
        """End operation ``token`` without changing the inventory (it failed or stored nothing)."""
        self.ensure_schema()
        with self.db.atomic():
            self.db.execute_sql(self._sql["end"], (token,))

    # -- what an audit reads and changes -------------------------------------------

    @_translate("cannot read the inventory")
    def entry(self, file_id: int) -> InventoryEntry | None:
        """Return the inventory row of ``file_id``, or None."""
        self.ensure_schema()
        row = self.Inventory.get_or_none(self.Inventory.file_id == file_id)
        if row is None:
            return None
        return InventoryEntry(row.file_id, row.size, row.mtime, row.sha256, row.stored_at, row.state)

    @_translate("cannot read the inventory")
    def count(self) -> int:
        """Return the number of inventory rows."""
        self.ensure_schema()
        return self.Inventory.select().count()

    @_translate("cannot read the operations in flight")
    def operations(self) -> list[Operation]:
        """Return every operation marker."""
        self.ensure_schema()
        query = self.Operation.select().where(self.Operation.file_id >= 0).order_by(self.Operation.id)
        return [Operation(row.file_id, row.verb, row.started_at, row.owner, row.id) for row in query]

    @_translate("cannot read the inventory")
    def snapshot(self, progress: Callable[[int], object] | None = None, digests: bool = False) -> Snapshot:
        """Read every row, page by page in file id order, into a :class:`Snapshot`.

        Pages (keyset, not OFFSET) keep client memory bounded on every database;
        the audit's two snapshots make a page-by-page read safe (see
        ``pacifica_like.gateway.audit``). ``progress`` is called with each page's size.
        ``digests``: also fill ``Snapshot.digests``.
        """
        self.ensure_schema()
        started = time.monotonic()
        found = Snapshot(array("q"), array("d"), array("q"), array("b"))
        inventory = self.Inventory
        fields = (inventory.file_id, inventory.stored_at, inventory.size, inventory.state)
        if digests:
            found.digests = array("q")
            fields += (inventory.sha256,)
        last = -1
        while True:
            query = (
                inventory.select(*fields)
                .where(inventory.file_id > last)
                .order_by(inventory.file_id)
                .limit(SNAPSHOT_PAGE)
                .tuples()
            )
            page = list(query)
            for file_id, stored_at, size, state, *_ in page:
                found.ids.append(file_id)
                found.stored_at.append(stored_at)
                found.sizes.append(size)
                found.lost.append(state == LOST)
            if found.digests is not None:
                found.digests.extend(digest_key(row[4]) for row in page)
            if progress is not None:
                progress(len(page))
            if len(page) < SNAPSHOT_PAGE:
                break
            last = page[-1][0]
        found.seconds = time.monotonic() - started
        return found

    @_translate("cannot mark a file LOST")
    def mark_lost(self, file_id: int, stored_at: float) -> bool:
        """Mark the row of ``file_id`` LOST if it still describes the version stored at ``stored_at``.

        Returns False when the row changed or went (a PUT or DELETE since the audit's snapshot).
        """
        self.ensure_schema()
        inventory = self.Inventory
        with self.durable.transaction():
            return bool(
                inventory.update(state=LOST)
                .where(
                    (inventory.file_id == file_id)
                    & (inventory.stored_at == stored_at)
                    & (inventory.state == PRESENT)
                )
                .execute()
            )

    @_translate("cannot mark a file present")
    def mark_present(self, file_id: int, stored_at: float) -> bool:
        """Mark a LOST row present again (its file came back); False if the row changed meanwhile."""
        self.ensure_schema()
        inventory = self.Inventory
        with self.durable.transaction():
            return bool(
                inventory.update(state=PRESENT)
                .where(
                    (inventory.file_id == file_id)
                    & (inventory.stored_at == stored_at)
                    & (inventory.state == LOST)
                )
                .execute()
            )

    @_translate("cannot clear abandoned operations")
    def clear_operations(self, started_before: float) -> int:
        """Remove markers of operations started before ``started_before`` (crashed processes)."""
        self.ensure_schema()
        with self.db.atomic():
            return self.Operation.delete().where(self.Operation.started_at < started_before).execute()

    @_translate("cannot load the inventory")
    def load(self, rows: Iterator[tuple[int, int, float, str | None, float]], batch: int = 5000) -> int:
        """Insert (file_id, size, mtime, sha256 hex, stored_at) rows in batches; return how many.

        For benchmarks and for importing an inventory; the gateway itself records through
        :meth:`finish_stored`.
        """
        self.ensure_schema()
        fields = [
            self.Inventory.file_id,
            self.Inventory.size,
            self.Inventory.mtime,
            self.Inventory.sha256,
            self.Inventory.stored_at,
        ]
        total = 0
        chunk: list[tuple[int, int, float, str | None, float]] = []
        with self.durable.transaction():
            for row in rows:
                chunk.append(row)
                if len(chunk) >= batch:
                    self.Inventory.insert_many(chunk, fields=fields).execute()
                    total += len(chunk)
                    chunk = []
            if chunk:
                self.Inventory.insert_many(chunk, fields=fields).execute()
                total += len(chunk)
        return total
