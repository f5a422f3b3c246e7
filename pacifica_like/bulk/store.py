"""Bulk requests, per-file state, recall jobs, volume claims and pins, in the gateway catalog database.

Five tables beside the inventory (same database, so one URL serves both):

* ``bulk_request``: one row per accepted request (id, client, times);
* ``bulk_file``: one row per file of a request: path, resolved id, tape
  position, state (SUBMITTED, STARTED, COMPLETED, FAILED, CANCELLED, and
  DEFERRED: accepted past its client's in-flight cap, no job yet, answered as
  SUBMITTED), error, times, and its pin (``pin_until``: the file stays on disk until then);
* ``bulk_recall``: one *job* per file id to recall, shared by every request
  that wants that file (QUEUED, then RUNNING under its owner; deleted when it
  ends, after its outcome was copied to every waiting ``bulk_file`` row);
* ``bulk_volume``: which scheduler process holds which volume (its drive);
* ``bulk_mutex``: one row locked while a volume is claimed, so the cap on
  drives in use holds across processes on PostgreSQL and MySQL (SQLite's
  ``BEGIN IMMEDIATE`` already serialises writers).

Claims are conditional UPDATEs (``... WHERE owner IS NULL``), so two
schedulers on one database never take the same volume or the same job.
Owners are ``host:pid:start:token``: on the same host a dead owner is seen at
once (its pid no longer runs with that start time); from another host, by
its heartbeat going stale. Every method is one transaction, retried when
SQLite is locked or a server database reports a deadlock.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import peewee
from playhouse.migrate import SchemaMigrator

from pacifica_like.core.owners import alive_here, owner_name
from pacifica_like.db.binding import bind_models
from pacifica_like.db.migrations import Schema, forget, upgrade
from pacifica_like.db.retry import RetryPolicy, transaction
from pacifica_like.gateway.catalog import LOST, GatewayCatalog

SUBMITTED, STARTED, COMPLETED, FAILED, CANCELLED = "SUBMITTED", "STARTED", "COMPLETED", "FAILED", "CANCELLED"
#: The states clients see (the Tape REST API's).
FILE_STATES = (SUBMITTED, STARTED, COMPLETED, FAILED, CANCELLED)
#: Ours only: a file accepted past its client's in-flight cap waits without a recall job until
#: the client's earlier files finish (:meth:`BulkStore.activate_deferred`); clients see SUBMITTED.
DEFERRED = "DEFERRED"
#: Files a recall job stands for.
ACTIVE_STATES = (SUBMITTED, STARTED)
#: Files not finished: their request stays open, a cancel reaches them.
OPEN_STATES = (SUBMITTED, STARTED, DEFERRED)
QUEUED, RUNNING = "QUEUED", "RUNNING"
#: Rows per INSERT when a request is stored (13 parameters each: below every database's limit).
INSERT_CHUNK = 1000
#: Ids per ``IN (...)`` list.
ID_CHUNK = 900
#: Longest path a request may name (the column's size; an id path is at most 20 characters).
MAX_PATH = 512
#: Seconds a call retries a locked SQLite database or a server-side deadlock.
RETRY_SECONDS = 30.0
RETRY = RetryPolicy(seconds=RETRY_SECONDS, first_pause=0.0005, max_pause=0.05)

T = TypeVar("T")


class _Request(peewee.Model):
    id = peewee.CharField(max_length=32, primary_key=True)
    client = peewee.CharField(max_length=255, index=True)
    created_at = peewee.DoubleField()
    started_at = peewee.DoubleField(null=True)
    completed_at = peewee.DoubleField(null=True)
    files = peewee.BigIntegerField()


class _File(peewee.Model):
    id = peewee.BigAutoField()
    request_id = peewee.CharField(max_length=32)
    path = peewee.CharField(max_length=MAX_PATH)
    file_id = peewee.BigIntegerField(null=True)
    size = peewee.BigIntegerField(default=0)
    vsn = peewee.CharField(max_length=64, null=True)
    position = peewee.BigIntegerField(null=True)
    state = peewee.CharField(max_length=16)
    error = peewee.TextField(null=True)
    on_disk = peewee.BooleanField(default=False)
    started_at = peewee.DoubleField(null=True)
    finished_at = peewee.DoubleField(null=True)
    pin_seconds = peewee.DoubleField()
    pin_until = peewee.DoubleField(null=True)

    class Meta:
        indexes = (
            (("request_id", "id"), False),  # pages of one request
            (("request_id", "state", "id"), False),  # pages filtered by state; "anything open?"
            (("request_id", "vsn", "state", "size"), False),  # the summary, from the index alone
            (("file_id", "state"), False),  # a recall's outcome to every request waiting for it; pins
        )


class _Job(peewee.Model):
    file_id = peewee.BigIntegerField(primary_key=True)
    vsn = peewee.CharField(max_length=64)
    position = peewee.BigIntegerField()
    size = peewee.BigIntegerField()
    state = peewee.CharField(max_length=16)
    queued_at = peewee.DoubleField()
    not_before = peewee.DoubleField(default=0.0)
    attempts = peewee.IntegerField(default=0)
    owner = peewee.CharField(max_length=255, null=True)
    claim = peewee.CharField(max_length=32, null=True, index=True)
    started_at = peewee.DoubleField(null=True)
    last_error = peewee.TextField(null=True)

    class Meta:
        indexes = ((("vsn", "state", "position"), False), (("state", "started_at"), False))


class _Volume(peewee.Model):
    vsn = peewee.CharField(max_length=64, primary_key=True)
    owner = peewee.CharField(max_length=255, null=True)
    claimed_at = peewee.DoubleField(null=True)
    heartbeat = peewee.DoubleField(null=True)


class _Mutex(peewee.Model):
    name = peewee.CharField(max_length=32, primary_key=True)


class _Scheduler(peewee.Model):
    """A running scheduler and when its last pass began: the file API stages through it while it runs."""

    owner = peewee.CharField(max_length=255, primary_key=True)
    seen_at = peewee.DoubleField()


_TABLES = {
    "bulk_request": _Request,
    "bulk_file": _File,
    "bulk_recall": _Job,
    "bulk_volume": _Volume,
    "bulk_mutex": _Mutex,
}
#: Tables added after version 1 (created by their own migration).
_LATER_TABLES = {"bulk_scheduler": _Scheduler}


def _create_v1(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """Version 1: the bulk tables as the gateway created them before versions were recorded."""
    bound = bind_models(db, _TABLES)
    db.create_tables(list(bound.values()), safe=True)
    bound["bulk_mutex"].insert(name="volumes").on_conflict_ignore().execute()


#: The bulk tables' schema versions, in the catalog database (see pacifica_like.db.migrations).
def _create_v2(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """Version 2: the running schedulers (``POST /<id>`` queues recalls for them)."""
    db.create_tables(list(bind_models(db, _LATER_TABLES).values()), safe=True)


SCHEMA = Schema("bulk", (_create_v1, _create_v2))


class NewFile(NamedTuple):
    """One file of a request as the API resolved it, before it is stored.

    A named tuple, not a frozen dataclass: a 100,000-file request builds one
    per file, and a frozen dataclass costs several times more to construct.
    """

    path: str
    state: str
    file_id: int | None = None
    size: int = 0
    vsn: str | None = None
    position: int | None = None
    error: str | None = None
    on_disk: bool = False
    pin_seconds: float = 0.0


@dataclass(frozen=True)
class RequestInfo:
    """A stored request's own fields."""

    id: str
    client: str
    created_at: float
    started_at: float | None
    completed_at: float | None
    files: int


@dataclass(frozen=True)
class FileInfo:
    """One file of a request as a poll reports it."""

    row: int
    path: str
    state: str
    on_disk: bool
    error: str | None
    started_at: float | None
    finished_at: float | None


@dataclass
class Summary:
    """Counts of a request's files by state, bytes and volumes (total and done)."""

    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILE_STATES, 0))
    bytes_total: int = 0
    bytes_done: int = 0
    volumes_total: int = 0
    volumes_done: int = 0


@dataclass(frozen=True)
class Job:
    """A recall job as the scheduler handles it."""

    file_id: int
    vsn: str
    position: int
    size: int
    attempts: int


@dataclass(frozen=True)
class VolumeQueue:
    """What waits for one volume: files, bytes, the oldest wait, and whether a scheduler holds it."""

    vsn: str
    files: int
    bytes: int
    oldest_queued_at: float
    mounted: bool


def make_owner() -> str:
    """Return this process's owner name for claims: ``host:pid:start:token``."""
    return owner_name(secrets.token_hex(4))


def owner_alive(owner: str, last_seen: float | None, lease: float, now: float) -> bool:
    """Tell whether a claim's owner still runs.

    On this host: its pid runs with the same start time. Elsewhere we cannot
    look, so it counts as alive while its heartbeat (``last_seen``) is within ``lease``.
    """
    here = alive_here(owner)
    if here is not None:
        return here
    return last_seen is not None and now - last_seen < lease


def _transaction(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a store method (one transaction): schema ensured, errors translated, contention retried."""
    return transaction(what, RETRY, prepare=lambda store: store.ensure_schema())


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class BulkStore:
    """The bulk-staging tables of one gateway catalog; safe to share between threads.

    Nothing connects at construction; the tables are created on first use in each process.
    """

    def __init__(self, catalog: GatewayCatalog) -> None:
        self.catalog = catalog
        self.db = catalog.db
        self.errors = catalog.errors
        bound = bind_models(self.db, _TABLES)
        self.Request = bound["bulk_request"]
        self.File = bound["bulk_file"]
        self.Job = bound["bulk_recall"]
        self.Volume = bound["bulk_volume"]
        self.Mutex = bound["bulk_mutex"]
        self.Scheduler = bind_models(self.db, _LATER_TABLES)["bulk_scheduler"]
        self._schema_ready = False
        self._for_update = not catalog.is_sqlite

    @classmethod
    def open(cls, url: str) -> BulkStore:
        """Return the store in the catalog database at ``url``."""
        return cls(GatewayCatalog(url))

    def __repr__(self) -> str:
        return f"BulkStore({self.catalog.display_url!r})"

    def ensure_schema(self) -> None:
        """Upgrade the bulk tables' schema once per process (safe when many do at once)."""
        if self._schema_ready:
            return
        upgrade(self.db, SCHEMA, self.errors.label)
        self._schema_ready = True

    def close(self) -> None:
        """Close this thread's connection."""
        self.catalog.close()

    def drop_tables(self) -> None:
        """Remove the bulk tables (tests and benchmarks clean up with this)."""
        with self.errors("cannot drop the bulk tables"):
            tables = [self.Request, self.File, self.Job, self.Volume, self.Mutex, self.Scheduler]
            self.db.drop_tables(tables, safe=True)
            forget(self.db, SCHEMA)
        self._schema_ready = False

    @contextlib.contextmanager
    def _durable(self) -> Iterator[None]:
        with self.catalog.durable.transaction():
            yield

    # -- requests ------------------------------------------------------------------

    @_transaction("cannot store the request")
    def create_request(self, client: str, files: Sequence[NewFile], now: float | None = None) -> str:
        """Store a request, its files and the recall jobs it needs; durable when this returns.

        Files given as COMPLETED are pinned from now. Jobs for files another
        request already queued are shared (the insert leaves the existing job).
        """
        now = time.time() if now is None else now
        request_id = secrets.token_hex(16)
        file_fields = [
            self.File.request_id, self.File.path, self.File.file_id, self.File.size, self.File.vsn,
            self.File.position, self.File.state, self.File.error, self.File.on_disk,
            self.File.started_at, self.File.finished_at, self.File.pin_seconds, self.File.pin_until,
        ]  # fmt: skip
        rows = []
        jobs: dict[int, tuple[Any, ...]] = {}
        for f in files:
            terminal = f.state not in OPEN_STATES
            pin_until = now + f.pin_seconds if f.state == COMPLETED else None
            rows.append((
                request_id, f.path, f.file_id, f.size, f.vsn, f.position, f.state, f.error, f.on_disk,
                now if terminal else None, now if terminal else None, f.pin_seconds, pin_until,
            ))  # fmt: skip
            if f.state == SUBMITTED and f.vsn is not None and f.file_id is not None:
                jobs[f.file_id] = (f.file_id, f.vsn, f.position, f.size, QUEUED, now, 0.0, 0)
        job_fields = [
            self.Job.file_id, self.Job.vsn, self.Job.position, self.Job.size, self.Job.state,
            self.Job.queued_at, self.Job.not_before, self.Job.attempts,
        ]  # fmt: skip
        open_files = sum(1 for f in files if f.state in OPEN_STATES)
        with self._durable():
            self.Request.insert(
                id=request_id, client=client[:255], created_at=now, files=len(files),
                completed_at=None if open_files else now,
            ).execute()  # fmt: skip
            # Hand-written multi-row INSERTs: peewee's builder spends ~10 s of CPU on 100,000 rows.
            self._insert_rows(self.File, file_fields, rows)
            # A job another request queued already is shared: the existing row stays.
            self._insert_rows(self.Job, job_fields, list(jobs.values()), ignore_duplicates=True)
        return request_id

    def _insert_rows(
        self,
        model: type[peewee.Model],
        fields: list[peewee.Field],
        rows: list[tuple[Any, ...]],
        ignore_duplicates: bool = False,
    ) -> None:
        """Insert ``rows`` (tuples in ``fields`` order) with one multi-row statement per chunk.

        ``ignore_duplicates``: rows whose primary key exists already are skipped.
        """
        left, right = self.db.quote[0], self.db.quote[-1]
        columns = ", ".join(f"{left}{f.column_name}{right}" for f in fields)
        one = "(" + ", ".join([self.db.param] * len(fields)) + ")"
        verb = "INSERT IGNORE" if ignore_duplicates and self.catalog.is_mysql else "INSERT"
        head = f"{verb} INTO {left}{model.TABLE_NAME}{right} ({columns}) VALUES "
        tail = " ON CONFLICT DO NOTHING" if ignore_duplicates and not self.catalog.is_mysql else ""
        for chunk in _chunks(rows, INSERT_CHUNK):
            # Every column is a plain int, float, str, bool or None that each driver takes as it is:
            # peewee's per-value db_value() conversion cost most of a 100,000-file submit's CPU.
            values = [value for row in chunk for value in row]
            self.db.execute_sql(head + ", ".join([one] * len(chunk)) + tail, values)

    @_transaction("cannot count the client's files in flight")
    def in_flight(self, client: str) -> int:
        """Return how many files of ``client``'s requests are queued for a recall or being recalled."""
        r, f = self.Request, self.File
        open_requests = r.select(r.id).where((r.client == client[:255]) & r.completed_at.is_null())
        return f.select().where(f.request_id.in_(open_requests) & f.state.in_(ACTIVE_STATES)).count()

    @_transaction("cannot start deferred files")
    def activate_deferred(self, cap: int, now: float | None = None) -> int:
        """Queue the recalls of deferred files while their client is under ``cap``; return how many.

        Oldest request first, per client: a client's deferred files start as
        its earlier ones finish, so a request past the cap is throttled, never
        refused (FTS fails every file of a job that is refused). Two schedulers
        activating at once may pass the cap by what they activate together.
        """
        now = time.time() if now is None else now
        r, f, j = self.Request, self.File, self.Job
        waiting = (
            r.select(r.client)
            .join(f, on=(f.request_id == r.id))
            .where(r.completed_at.is_null() & (f.state == DEFERRED))
            .distinct()
        )
        started = 0
        for (client,) in list(waiting.tuples()):
            room = cap - self.in_flight(client)
            if room <= 0:
                continue
            with self.db.atomic():
                rows = list(
                    f.select(f.id, f.file_id, f.vsn, f.position, f.size)
                    .join(r, on=(f.request_id == r.id))
                    .where((r.client == client) & (f.state == DEFERRED))
                    .order_by(r.created_at, f.id)
                    .limit(room)
                    .tuples()
                )
                jobs = {
                    file_id: (file_id, vsn, position, size, QUEUED, now, 0.0, 0)
                    for _, file_id, vsn, position, size in rows
                }
                fields = [
                    j.file_id, j.vsn, j.position, j.size, j.state, j.queued_at, j.not_before, j.attempts,
                ]  # fmt: skip
                self._insert_rows(j, fields, list(jobs.values()), ignore_duplicates=True)
                for chunk in _chunks([row[0] for row in rows], ID_CHUNK):
                    f.update(state=SUBMITTED).where(f.id.in_(list(chunk)) & (f.state == DEFERRED)).execute()
            started += len(rows)
        return started

    def deferred(self) -> int:
        """Return how many files wait past their client's cap (for ``run_until_idle``)."""
        return self.File.select().where(self.File.state == DEFERRED).count()

    @_transaction("cannot count the client's requests")
    def stored_requests(self, client: str) -> tuple[int, float | None]:
        """Return how many requests ``client`` has stored, and when its earliest finished one finished.

        Stored: open, or finished and not yet purged (see :meth:`purge_expired`).
        """
        r = self.Request
        mine = r.client == client[:255]
        count = r.select().where(mine).count()
        earliest = (
            r.select(peewee.fn.MIN(r.completed_at)).where(mine & r.completed_at.is_null(False)).scalar()
        )
        return count, earliest

    @_transaction("cannot purge expired requests")
    def purge_expired(
        self, retention: float, now: float | None = None, client: str | None = None, limit: int = 100
    ) -> int:
        """Forget up to ``limit`` requests finished more than ``retention`` seconds ago; return how many.

        A request goes with its file rows, and so with its pins; one whose pin
        still holds a file stays until the pin expires, so retention never cuts
        a granted ``diskLifetime`` short. Other requests' rows, and so their
        pins on the same files, are untouched. Only finished requests are
        purged: they have no open file, so no recall job stands for them.
        ``client``: only that client's requests.
        """
        now = time.time() if now is None else now
        r, f = self.Request, self.File
        expired = r.completed_at.is_null(False) & (r.completed_at < now - retention)
        if client is not None:
            expired &= r.client == client[:255]
        pinned = f.select(f.id).where((f.request_id == r.id) & (f.pin_until > now))
        query = r.select(r.id).where(expired & ~peewee.fn.EXISTS(pinned)).order_by(r.completed_at)
        purged = 0
        for (request_id,) in list(query.limit(limit).tuples()):
            # One transaction per request: a 100,000-file request is ~0.3 s of deletes on SQLite,
            # and writers (recall outcomes, submits) should not wait behind many of them.
            with self.db.atomic():
                f.delete().where(f.request_id == request_id).execute()
                purged += r.delete().where(r.id == request_id).execute()
        return purged

    @_transaction("cannot read the inventory")
    def lost(self, file_ids: Sequence[int]) -> set[int]:
        """Return which of ``file_ids`` the inventory marks LOST (an audit found them gone), in batches."""
        self.catalog.ensure_schema()
        left, right = self.db.quote[0], self.db.quote[-1]
        table = f"{left}{self.catalog.Inventory.TABLE_NAME}{right}"
        head = f"SELECT {left}file_id{right} FROM {table} WHERE {left}state{right} = {self.db.param} AND "
        found: set[int] = set()
        for chunk in _chunks(list(file_ids), ID_CHUNK):
            # Plain SQL: peewee's builder spent ~1 s of CPU on the IN lists of 100,000 ids.
            sql = f"{head}{left}file_id{right} IN ({', '.join([self.db.param] * len(chunk))})"
            found.update(i for (i,) in self.db.execute_sql(sql, [LOST, *chunk]))
        return found

    @_transaction("cannot read the request")
    def request(self, request_id: str) -> RequestInfo | None:
        """Return a request's own fields, or None when there is no such request."""
        row = self.Request.get_or_none(self.Request.id == request_id)
        if row is None:
            return None
        return RequestInfo(row.id, row.client, row.created_at, row.started_at, row.completed_at, row.files)

    @_transaction("cannot read the request's files")
    def files(
        self, request_id: str, limit: int | None = None, after: int = 0, states: Sequence[str] = ()
    ) -> tuple[list[FileInfo], int | None]:
        """Return one page of a request's files in request order, and the cursor of the next page.

        Keyset pagination (``id > after``), so every page costs the same however deep it is.
        """
        f = self.File
        query = f.select(f.id, f.path, f.state, f.on_disk, f.error, f.started_at, f.finished_at).where(
            (f.request_id == request_id) & (f.id > after)
        )
        if states:
            # Deferred files are SUBMITTED to clients.
            query = query.where(f.state.in_([*states, *([DEFERRED] if SUBMITTED in states else [])]))
        query = query.order_by(f.id)
        if limit is not None:
            query = query.limit(limit + 1)
        rows = [
            FileInfo(*row) if row[2] != DEFERRED else FileInfo(*row[:2], SUBMITTED, *row[3:])
            for row in query.tuples()
        ]
        if limit is not None and len(rows) > limit:
            return rows[:limit], rows[limit - 1].row
        return rows, None

    @_transaction("cannot summarise the request")
    def summary(self, request_id: str) -> Summary:
        """Count a request's files by state, with bytes and volumes, from one index-only query."""
        f = self.File
        query = (
            f.select(f.vsn, f.state, peewee.fn.COUNT(f.id), peewee.fn.SUM(f.size))
            .where(f.request_id == request_id)
            .group_by(f.vsn, f.state)
            .tuples()
        )
        summary = Summary()
        open_volumes: set[str] = set()
        volumes: set[str] = set()
        for vsn, state, count, size in query:
            state = SUBMITTED if state == DEFERRED else state
            summary.states[state] = summary.states.get(state, 0) + count
            size = int(size or 0)
            if state != CANCELLED and not (state == FAILED and vsn is None):
                summary.bytes_total += size
            if state == COMPLETED:
                summary.bytes_done += size
            if vsn is not None:
                volumes.add(vsn)
                if state in OPEN_STATES:
                    open_volumes.add(vsn)
        summary.volumes_total = len(volumes)
        summary.volumes_done = len(volumes - open_volumes)
        return summary

    def _paths(self, request_id: str, paths: Sequence[str]) -> tuple[list[int], list[str]]:
        """Return the row ids of ``paths`` in the request, and the paths it does not have."""
        f = self.File
        found: dict[str, int] = {}
        wanted = list(dict.fromkeys(paths))
        for chunk in _chunks(wanted, ID_CHUNK):
            query = f.select(f.path, f.id).where((f.request_id == request_id) & f.path.in_(list(chunk)))
            found.update(query.tuples())
        return list(found.values()), [p for p in wanted if p not in found]

    # -- schedulers seen, and the file API's recalls ---------------------------------

    @_transaction("cannot record the scheduler")
    def seen(self, owner: str, now: float | None = None) -> None:
        """Record that scheduler ``owner`` runs (each pass)."""
        now = time.time() if now is None else now
        s = self.Scheduler
        with self.db.atomic():
            if not s.update(seen_at=now).where(s.owner == owner[:255]).execute():
                s.insert(owner=owner[:255], seen_at=now).on_conflict_ignore().execute()

    @_transaction("cannot record the scheduler")
    def gone(self, owner: str) -> None:
        """Forget scheduler ``owner`` (it stopped)."""
        with self.db.atomic():
            self.Scheduler.delete().where(self.Scheduler.owner == owner[:255]).execute()

    @_transaction("cannot read the schedulers")
    def scheduler_running(self, since: float) -> bool:
        """True when a scheduler's pass began after ``since``."""
        return self.Scheduler.select().where(self.Scheduler.seen_at >= since).exists()

    @_transaction("cannot read the request")
    def plan(
        self, request_id: str, paths: Sequence[str] | None, pinned: bool = False, now: float | None = None
    ) -> tuple[list[str], list[str]] | None:
        """Say what a cancel (or, ``pinned``, a release) of ``paths`` (None: all) would touch; change nothing.

        Returns (the paths the request does not hold, the paths whose files are
        open, or with ``pinned`` hold an unexpired pin), or None when there is no
        such request. For ``?dryRun=true``: the same look-ups as the change, no writes.
        """
        now = time.time() if now is None else now
        if not self.Request.select().where(self.Request.id == request_id).exists():
            return None
        f = self.File
        if paths is None:
            rows = [r for (r,) in f.select(f.id).where(f.request_id == request_id).tuples()]
            unknown: list[str] = []
        else:
            rows, unknown = self._paths(request_id, paths)
        touched: list[str] = []
        condition = (f.pin_until > now) if pinned else f.state.in_(OPEN_STATES)
        for chunk in _chunks(rows, ID_CHUNK):
            query = f.select(f.path).where(f.id.in_(list(chunk)) & condition).order_by(f.id)
            touched.extend(path for (path,) in query.tuples())
        return unknown, touched

    @_transaction("cannot read pins")
    def own_pins(self, client: str, paths: Sequence[str], now: float | None = None) -> int:
        """Return how many unexpired pins ``client``'s requests hold on ``paths`` (what release_own drops)."""
        now = time.time() if now is None else now
        r, f = self.Request, self.File
        own = r.select(r.id).where(r.client == client[:255])
        held = 0
        for chunk in _chunks(list(paths), ID_CHUNK):
            held += (
                f.select()
                .where(f.request_id.in_(own) & f.path.in_(list(chunk)) & (f.pin_until > now))
                .count()
            )
        return held

    @_transaction("cannot cancel files")
    def cancel(
        self, request_id: str, paths: Sequence[str] | None, now: float | None = None
    ) -> list[str] | None:
        """Cancel the open files of ``paths`` (None: all) in the request, all or nothing.

        Returns the paths the request does not hold (nothing was changed then),
        an empty list on success, or None when there is no such request.
        Recall jobs no request wants any more are dropped unless already running.
        """
        now = time.time() if now is None else now
        with self.db.atomic():
            if not self.Request.select().where(self.Request.id == request_id).exists():
                return None
            f = self.File
            if paths is None:
                rows = [r for (r,) in f.select(f.id).where(f.request_id == request_id).tuples()]
            else:
                rows, unknown = self._paths(request_id, paths)
                if unknown:
                    return unknown
            self._cancel_rows(request_id, rows, now)
            self._close_requests([request_id], now)
        return []

    def _cancel_rows(self, request_id: str, rows: Sequence[int], now: float) -> None:
        f = self.File
        file_ids: set[int] = set()
        for chunk in _chunks(list(rows), ID_CHUNK):
            where = f.id.in_(list(chunk)) & f.state.in_(OPEN_STATES)
            file_ids.update(
                i for (i,) in f.select(f.file_id).where(where & f.file_id.is_null(False)).tuples()
            )
            f.update(state=CANCELLED, finished_at=now, error="cancelled by the client", pin_until=None).where(
                where
            ).execute()
        self._drop_unwanted_jobs(sorted(file_ids))

    def _drop_unwanted_jobs(self, file_ids: Sequence[int]) -> None:
        """Delete queued jobs of ``file_ids`` that no open file row wants any more."""
        f, j = self.File, self.Job
        for chunk in _chunks(list(file_ids), ID_CHUNK):
            ids = list(chunk)
            wanted = {
                i
                for (i,) in f.select(f.file_id).where(f.file_id.in_(ids) & f.state.in_(OPEN_STATES)).tuples()
            }
            unwanted = [i for i in ids if i not in wanted]
            if unwanted:
                j.delete().where(j.file_id.in_(unwanted) & (j.state == QUEUED)).execute()

    def _close_requests(self, request_ids: Iterable[str], now: float) -> None:
        """Set ``completed_at`` on each request whose every file is terminal now."""
        f, r = self.File, self.Request
        for request_id in request_ids:
            busy = f.select(f.id).where((f.request_id == request_id) & f.state.in_(OPEN_STATES)).exists()
            if not busy:
                r.update(completed_at=now).where((r.id == request_id) & r.completed_at.is_null()).execute()

    @_transaction("cannot delete the request")
    def delete(self, request_id: str, now: float | None = None) -> bool:
        """Cancel a request's open files, drop its pins and forget it; False if there is none."""
        now = time.time() if now is None else now
        with self.db.atomic():
            if not self.Request.select().where(self.Request.id == request_id).exists():
                return False
            f = self.File
            rows = [r for (r,) in f.select(f.id).where(f.request_id == request_id).tuples()]
            # The rows go, so nothing else would mark them; cancel first so shared jobs are dropped.
            self._cancel_rows(request_id, rows, now)
            f.delete().where(f.request_id == request_id).execute()
            self.Request.delete().where(self.Request.id == request_id).execute()
        return True

    @_transaction("cannot release pins")
    def release(self, request_id: str, paths: Sequence[str]) -> list[str] | None:
        """Drop the request's pins on ``paths``; the unknown paths (nothing changed), or None: no request."""
        with self.db.atomic():
            if not self.Request.select().where(self.Request.id == request_id).exists():
                return None
            rows, unknown = self._paths(request_id, paths)
            if unknown:
                return unknown
            f = self.File
            for chunk in _chunks(rows, ID_CHUNK):
                f.update(pin_until=None).where(f.id.in_(list(chunk))).execute()
        return []

    @_transaction("cannot release pins")
    def release_own(self, client: str, paths: Sequence[str], now: float | None = None) -> int:
        """Drop every unexpired pin ``client``'s requests hold on ``paths``; return how many were held.

        For a release naming no request of ours (gfal2's ``gfal2-placeholder-id``
        when it lost the request id): the caller can only let go of its own pins.
        """
        now = time.time() if now is None else now
        r, f = self.Request, self.File
        own = r.select(r.id).where(r.client == client[:255])
        released = 0
        with self.db.atomic():
            for chunk in _chunks(list(paths), ID_CHUNK):
                released += (
                    f.update(pin_until=None)
                    .where(f.request_id.in_(own) & f.path.in_(list(chunk)) & (f.pin_until > now))
                    .execute()
                )
        return released

    @_transaction("cannot read pins")
    def pins(self, file_ids: Iterable[int], now: float | None = None) -> dict[int, float]:
        """Return, for each of ``file_ids`` held by an unexpired pin, when its last pin expires."""
        now = time.time() if now is None else now
        f = self.File
        found: dict[int, float] = {}
        for chunk in _chunks(list(file_ids), ID_CHUNK):
            query = (
                f.select(f.file_id, peewee.fn.MAX(f.pin_until))
                .where(f.file_id.in_(list(chunk)) & (f.pin_until > now))
                .group_by(f.file_id)
                .tuples()
            )
            found.update(query)
        return found

    @_transaction("cannot read the recall queues")
    def queues(self, lease: float, now: float | None = None) -> list[VolumeQueue]:
        """Return what waits or runs per volume, and which volumes a live scheduler holds."""
        now = time.time() if now is None else now
        j, v = self.Job, self.Volume
        held = {
            row.vsn
            for row in v.select().where(v.owner.is_null(False))
            if owner_alive(row.owner, row.heartbeat, lease, now)
        }
        query = (
            j.select(j.vsn, peewee.fn.COUNT(j.file_id), peewee.fn.SUM(j.size), peewee.fn.MIN(j.queued_at))
            .group_by(j.vsn)
            .order_by(j.vsn)
            .tuples()
        )
        return [VolumeQueue(vsn, n, int(size or 0), oldest, vsn in held) for vsn, n, size, oldest in query]

    # -- the scheduler's side ----------------------------------------------------

    @_transaction("cannot read the recall queues")
    def waiting_volumes(self, now: float | None = None) -> list[VolumeQueue]:
        """Return the volumes with jobs ready to run (queued, past any back-off) that nobody holds."""
        now = time.time() if now is None else now
        j, v = self.Job, self.Volume
        held = v.select(v.vsn).where(v.owner.is_null(False))
        query = (
            j.select(j.vsn, peewee.fn.COUNT(j.file_id), peewee.fn.SUM(j.size), peewee.fn.MIN(j.queued_at))
            .where((j.state == QUEUED) & (j.not_before <= now) & j.vsn.not_in(held))
            .group_by(j.vsn)
            .tuples()
        )
        return [VolumeQueue(vsn, n, int(size or 0), oldest, False) for vsn, n, size, oldest in query]

    @_transaction("cannot claim a volume")
    def claim_volume(self, vsn: str, owner: str, cap: int, now: float | None = None) -> bool:
        """Take ``vsn`` for ``owner`` unless another scheduler holds it or ``cap`` volumes are held."""
        now = time.time() if now is None else now
        v = self.Volume
        with self.db.atomic():
            lock = self.Mutex.select().where(self.Mutex.name == "volumes")
            if self._for_update:
                lock = lock.for_update()
            list(lock)  # serialises claims: the count below cannot go stale before our update
            if v.select().where(v.owner.is_null(False)).count() >= cap:
                return False
            v.insert(vsn=vsn).on_conflict_ignore().execute()
            taken = (
                v.update(owner=owner, claimed_at=now, heartbeat=now)
                .where((v.vsn == vsn) & v.owner.is_null())
                .execute()
            )
        return bool(taken)

    @_transaction("cannot count held volumes")
    def held_volumes(self) -> int:
        """Return how many volumes schedulers hold now."""
        return self.Volume.select().where(self.Volume.owner.is_null(False)).count()

    @_transaction("cannot renew a volume claim")
    def heartbeat(self, vsn: str, owner: str, now: float | None = None) -> None:
        """Show that ``owner`` still works on ``vsn`` (for schedulers on other hosts)."""
        now = time.time() if now is None else now
        v = self.Volume
        with self.db.atomic():
            v.update(heartbeat=now).where((v.vsn == vsn) & (v.owner == owner)).execute()

    @_transaction("cannot release a volume")
    def release_volume(self, vsn: str, owner: str) -> None:
        """Give ``vsn`` back, returning any job claimed but not started to the queue."""
        j, v = self.Job, self.Volume
        with self.db.atomic():
            j.update(state=QUEUED, owner=None, claim=None).where(
                (j.vsn == vsn) & (j.owner == owner) & (j.state == RUNNING) & j.started_at.is_null()
            ).execute()
            v.update(owner=None, claimed_at=None).where((v.vsn == vsn) & (v.owner == owner)).execute()

    @_transaction("cannot claim recall jobs")
    def claim_jobs(
        self, vsn: str, owner: str, from_position: int, limit: int, now: float | None = None
    ) -> list[Job]:
        """Claim up to ``limit`` queued jobs of ``vsn`` at or past ``from_position``, in position order."""
        now = time.time() if now is None else now
        j = self.Job
        token = secrets.token_hex(16)
        with self.db.atomic():
            ready = (j.vsn == vsn) & (j.state == QUEUED) & (j.not_before <= now)
            ids = [
                i
                for (i,) in j.select(j.file_id)
                .where(ready & (j.position >= from_position))
                .order_by(j.position)
                .limit(limit)
                .tuples()
            ]
            if not ids:
                return []
            j.update(state=RUNNING, owner=owner, claim=token).where(j.file_id.in_(ids) & ready).execute()
            query = j.select().where(j.claim == token).order_by(j.position)
            return [Job(row.file_id, row.vsn, row.position, row.size, row.attempts) for row in query]

    @_transaction("cannot start a recall")
    def start_job(self, file_id: int, owner: str, now: float | None = None, hold: float = 0.0) -> int | None:
        """Mark a claimed job's recall as started: its files STARTED; return its attempt number.

        The waiting rows are pinned from now, for ``hold`` seconds (the recall's
        longest run) plus their own pin: the recalled file is on disk before its
        outcome is recorded, and a release in between must already see the pin.
        None when the job is no longer ours (a watchdog or recovery took it) or
        no request wants the file any more (the job is dropped then).
        """
        now = time.time() if now is None else now
        j, f, r = self.Job, self.File, self.Request
        with self.db.atomic():
            mine = (j.file_id == file_id) & (j.owner == owner) & (j.state == RUNNING)
            wanted = f.select(f.id).where((f.file_id == file_id) & f.state.in_(OPEN_STATES)).exists()
            if not wanted:
                j.delete().where(mine).execute()
                return None
            if not j.update(attempts=j.attempts + 1, started_at=now).where(mine).execute():
                return None
            f.update(state=STARTED, started_at=now).where(
                (f.file_id == file_id) & (f.state == SUBMITTED)
            ).execute()
            f.update(pin_until=f.pin_seconds + (now + hold)).where(
                (f.file_id == file_id) & (f.state == STARTED)
            ).execute()
            waiting = f.select(f.request_id).where((f.file_id == file_id) & (f.state == STARTED))
            r.update(started_at=now).where(r.id.in_(waiting) & r.started_at.is_null()).execute()
            return j.get_by_id(file_id).attempts

    def _finish(self, file_id: int, state: str, error: str | None, now: float) -> int:
        """Give every open row of ``file_id`` its outcome; close requests that are done. Returns rows."""
        f = self.File
        where = (f.file_id == file_id) & f.state.in_(OPEN_STATES)
        requests = [rid for (rid,) in f.select(f.request_id).where(where).distinct().tuples()]
        changes: dict[Any, Any] = {
            f.state: state,
            f.finished_at: now,
            f.started_at: peewee.fn.COALESCE(f.started_at, now),
            f.error: error,
            f.on_disk: state == COMPLETED,
        }
        # A completed file is pinned for its lifetime from now; any other outcome drops the pin
        # its recall held (start_job).
        changes[f.pin_until] = f.pin_seconds + now if state == COMPLETED else None
        updated = f.update(changes).where(where).execute()
        self._close_requests(requests, now)
        return updated

    @_transaction("cannot record a recall's outcome")
    def finish_job(
        self, file_id: int, owner: str, state: str, error: str | None = None, now: float | None = None
    ) -> int:
        """Record a recall's outcome (COMPLETED or FAILED) for every request waiting for the file.

        Returns the number of file rows that changed. A completion counts
        whoever holds the job now (the bytes are on disk); a failure only ends a job we still hold.
        """
        now = time.time() if now is None else now
        j = self.Job
        with self.db.atomic():
            if state != COMPLETED:
                if not j.delete().where((j.file_id == file_id) & (j.owner == owner)).execute():
                    return 0
            else:
                j.delete().where(j.file_id == file_id).execute()
            return self._finish(file_id, state, error, now)

    @_transaction("cannot requeue a recall")
    def requeue_job(
        self,
        file_id: int,
        owner: str,
        vsn: str,
        position: int,
        not_before: float,
        error: str | None = None,
        refund: bool = False,
    ) -> None:
        """Put a job we hold back in the queue (maybe on another volume); its files wait again.

        ``refund``: the attempt does not count (another process was recalling the file).
        """
        j, f = self.Job, self.File
        with self.db.atomic():
            changes: dict[Any, Any] = {
                j.state: QUEUED, j.owner: None, j.claim: None, j.started_at: None, j.vsn: vsn,
                j.position: position, j.not_before: not_before, j.last_error: error,
            }  # fmt: skip
            if refund:
                changes[j.attempts] = j.attempts - 1
            if j.update(changes).where((j.file_id == file_id) & (j.owner == owner)).execute():
                f.update(state=SUBMITTED, vsn=vsn, position=position, pin_until=None).where(
                    (f.file_id == file_id) & f.state.in_(OPEN_STATES)
                ).execute()

    @_transaction("cannot recover abandoned recalls")
    def recover(self, me: str, lease: float, max_attempts: int, now: float | None = None) -> tuple[int, int]:
        """Take back the work of schedulers that died: requeue their recalls, or fail them past max_attempts.

        Returns (requeued, failed) job counts. A recall that was running when
        its process died counts as an attempt.
        """
        now = time.time() if now is None else now
        j, v = self.Job, self.Volume
        requeued = failed = 0
        with self.db.atomic():
            seen: dict[str, float | None] = {}
            for row in v.select().where(v.owner.is_null(False)):
                seen[row.owner] = max(row.heartbeat or 0.0, seen.get(row.owner) or 0.0)
            for (owner,) in j.select(j.owner).where(j.state == RUNNING).distinct().tuples():
                seen.setdefault(owner, None)
            for owner, last_seen in seen.items():
                if owner == me or owner_alive(owner, last_seen, lease, now):
                    continue
                for job in j.select().where((j.owner == owner) & (j.state == RUNNING)):
                    if job.started_at is not None and job.attempts >= max_attempts:
                        j.delete().where(j.file_id == job.file_id).execute()
                        reason = (
                            f"the gateway process recalling it stopped ({job.attempts} attempts of "
                            f"{max_attempts}); last error: {job.last_error or 'none'}"
                        )
                        self._finish(job.file_id, FAILED, reason, now)
                        failed += 1
                        continue
                    j.update(state=QUEUED, owner=None, claim=None, started_at=None).where(
                        j.file_id == job.file_id
                    ).execute()
                    self.File.update(state=SUBMITTED, pin_until=None).where(
                        (self.File.file_id == job.file_id) & (self.File.state == STARTED)
                    ).execute()
                    requeued += 1
                v.update(owner=None, claimed_at=None).where(v.owner == owner).execute()
        return requeued, failed

    @_transaction("cannot queue again files without a recall job")
    def requeue_jobless(self, now: float | None = None) -> int:
        """Queue a recall again for every open file row that no job stands for; return how many.

        Each writer keeps "every open row has a job" within its transaction, but
        two can cross: a request that shares a running job inserts its row
        while the job's end (or a cancel, or ``start_job`` seeing nobody wants
        the file) deletes the job. Under PostgreSQL's READ COMMITTED the
        shared insert (ON CONFLICT DO NOTHING) locks nothing, and under
        MariaDB's REPEATABLE READ ``start_job`` decides on a snapshot that
        predates the new row, so the row is left waiting for a job nobody will
        run. Rather than lock every path against the others, the scheduler
        repairs it: the new job finds the file on disk (completed at once) or recalls it.
        """
        now = time.time() if now is None else now
        f, j = self.File, self.Job
        with self.db.atomic():
            query = f.select(f.file_id, f.vsn, f.position, f.size).where(
                f.state.in_(ACTIVE_STATES)
                & f.file_id.is_null(False)
                & f.vsn.is_null(False)
                & f.file_id.not_in(j.select(j.file_id))
            )
            jobs: dict[int, tuple[Any, ...]] = {}
            for file_id, vsn, position, size in query.tuples():
                jobs.setdefault(file_id, (file_id, vsn, position, size, QUEUED, now, 0.0, 0))
            if not jobs:
                return 0
            fields = [
                j.file_id, j.vsn, j.position, j.size, j.state, j.queued_at, j.not_before, j.attempts,
            ]  # fmt: skip
            self._insert_rows(j, fields, list(jobs.values()), ignore_duplicates=True)
            for chunk in _chunks(sorted(jobs), ID_CHUNK):
                f.update(state=SUBMITTED, pin_until=None).where(
                    f.file_id.in_(list(chunk)) & (f.state == STARTED)
                ).execute()
        return len(jobs)

    @_transaction("cannot take back orphaned recalls")
    def requeue_orphans(self, owner: str, active: Sequence[str]) -> int:
        """Queue again the jobs and volumes ``owner`` holds without a thread working on them.

        A volume thread that died on an unexpected error (the database went away
        mid-recall) leaves its claims behind; the owner's next pass hands them
        back, as another process would for a dead owner. Returns the jobs requeued.
        """
        j, v, f = self.Job, self.Volume, self.File
        with self.db.atomic():
            orphaned = (j.owner == owner) & (j.state == RUNNING)
            if active:
                orphaned &= j.vsn.not_in(list(active))
            ids = [i for (i,) in j.select(j.file_id).where(orphaned).tuples()]
            for chunk in _chunks(ids, ID_CHUNK):
                j.update(state=QUEUED, owner=None, claim=None, started_at=None).where(
                    j.file_id.in_(list(chunk))
                ).execute()
                f.update(state=SUBMITTED, pin_until=None).where(
                    f.file_id.in_(list(chunk)) & (f.state == STARTED)
                ).execute()
            held = v.owner == owner
            if active:
                held &= v.vsn.not_in(list(active))
            v.update(owner=None, claimed_at=None).where(held).execute()
        return len(ids)

    @_transaction("cannot run the recall watchdog")
    def expire_running(self, timeout: float, now: float | None = None) -> list[int]:
        """Fail every recall that has run longer than ``timeout`` seconds; return their file ids."""
        now = time.time() if now is None else now
        j = self.Job
        expired = []
        with self.db.atomic():
            stuck = j.select(j.file_id).where(
                (j.state == RUNNING) & j.started_at.is_null(False) & (j.started_at < now - timeout)
            )
            for (file_id,) in stuck.tuples():
                j.delete().where(j.file_id == file_id).execute()
                self._finish(
                    file_id, FAILED, f"the recall did not finish within recall_timeout ({timeout:g} s)", now
                )
                expired.append(file_id)
        return expired

    @_transaction("cannot fail the jobs of a volume")
    def fail_volume(
        self, vsn: str, owner: str, error: str, max_attempts: int, retry_at: float, now: float | None = None
    ) -> int:
        """Count a failed mount against every claimed or queued job of ``vsn``; fail those out of attempts.

        Returns how many failed for good; the rest wait until ``retry_at``.
        """
        now = time.time() if now is None else now
        j = self.Job
        failed = 0
        with self.db.atomic():
            mine_or_free = (j.vsn == vsn) & (
                ((j.state == RUNNING) & (j.owner == owner)) | (j.state == QUEUED)
            )
            for job in j.select().where(mine_or_free):
                if job.attempts + 1 >= max_attempts:
                    j.delete().where(j.file_id == job.file_id).execute()
                    self._finish(job.file_id, FAILED, error, now)
                    failed += 1
                else:
                    j.update(
                        state=QUEUED, owner=None, claim=None, started_at=None, attempts=j.attempts + 1,
                        not_before=retry_at, last_error=error,
                    ).where(j.file_id == job.file_id).execute()  # fmt: skip
        return failed
