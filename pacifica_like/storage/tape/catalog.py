"""The tape library's catalog: volumes, drives and tape copies, in SQLite beside the volumes.

Every process that touches the library (uWSGI workers, the maintenance CLI)
opens the same file. WAL lets readers run beside one writer; every write
transaction starts ``BEGIN IMMEDIATE`` so read-then-update steps (claiming a
drive, appending to a volume) never interleave between processes, and
``synchronous=FULL`` makes a committed row survive a power cut.

Model classes are made per catalog (:func:`pacifica_like.db.binding.bind_models`)
rather than bound to a global proxy, so one process can hold several libraries
(the tests do). Errors are translated by :mod:`pacifica_like.db.errors`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import peewee
from playhouse.migrate import SchemaMigrator, migrate

from pacifica_like.core import checksums
from pacifica_like.db.binding import bind_models
from pacifica_like.db.errors import ErrorTranslator
from pacifica_like.db.migrations import Schema, upgrade
from pacifica_like.db.urls import open_database

CATALOG_NAME = "catalog.sqlite"
#: Ids per query in batched look-ups (below SQLite's bound-parameter limit).
ID_BATCH = 900


class _Meta(peewee.Model):
    """Library-wide facts recorded at ``tape init`` (schema version, creation time)."""

    key = peewee.CharField(primary_key=True)
    value = peewee.TextField()


class _Volume(peewee.Model):
    """One cartridge: ``fill`` is its end of data, where the next record goes."""

    vsn = peewee.CharField(primary_key=True)
    capacity = peewee.BigIntegerField()
    fill = peewee.BigIntegerField(default=0)
    records = peewee.IntegerField(default=0)
    full = peewee.BooleanField(default=False)


class _Drive(peewee.Model):
    """One drive: what it holds, where its head is, who uses it, and its counters.

    ``owner`` is ``host:pid:start:token`` of the process using the drive (None
    when idle); a dead owner's claim is cleared by the next process that looks.
    """

    name = peewee.CharField(primary_key=True)
    vsn = peewee.CharField(null=True)
    position = peewee.BigIntegerField(default=0)
    owner = peewee.CharField(null=True)
    #: The volume the owner is mounting or using; set in the claim, before the mount.
    claimed_vsn = peewee.CharField(null=True)
    claimed_at = peewee.FloatField(null=True)
    last_used = peewee.FloatField(default=0.0)
    mounts = peewee.BigIntegerField(default=0)
    unmounts = peewee.BigIntegerField(default=0)
    bytes_located = peewee.BigIntegerField(default=0)
    bytes_read = peewee.BigIntegerField(default=0)
    bytes_written = peewee.BigIntegerField(default=0)


class _TapeCopy(peewee.Model):
    """One record on a volume holding one version of a file.

    ``stale``: a newer version replaced it (PUT, PATCH, DELETE). ``bad``: its
    bytes failed a checksum; never cleared silently. ``size``, ``sha256``,
    ``mtime`` and ``ctime`` describe the file version, so HEAD of a file that
    is only on tape needs no tape access; ``checksums`` holds the grid's
    adler32 and md5 the disk file carried when it was written (schema 2), so
    they survive release and recall.
    """

    file_id = peewee.BigIntegerField(index=True)
    vsn = peewee.CharField()
    seq = peewee.IntegerField()
    offset = peewee.BigIntegerField()
    size = peewee.BigIntegerField()
    sha256 = peewee.CharField(max_length=64)
    mtime = peewee.FloatField()
    ctime = peewee.FloatField()
    stale = peewee.BooleanField(default=False)
    bad = peewee.BooleanField(default=False)
    written_at = peewee.FloatField()
    verified_at = peewee.FloatField(null=True)
    verify_result = peewee.CharField(null=True)
    checksums = peewee.CharField(max_length=128, null=True)

    class Meta:
        indexes = ((("vsn", "offset"), True),)


class _Recall(peewee.Model):
    """A recall in flight (the file is UNMIGRATING) and the process doing it."""

    file_id = peewee.BigIntegerField(primary_key=True)
    owner = peewee.CharField()
    vsn = peewee.CharField()
    started_at = peewee.FloatField()


_TABLES = {"meta": _Meta, "volume": _Volume, "drive": _Drive, "tapecopy": _TapeCopy, "recall": _Recall}


def _create_v1(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """Version 1: the tables as ``tape init`` created them before migrations were run."""
    db.create_tables(list(bind_models(db, _TABLES).values()), safe=True)


def _add_checksums_v2(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """Version 2: each tape copy keeps the grid checksums (adler32, md5) of the version it holds."""
    if "checksums" not in {column.name for column in db.get_columns("tapecopy")}:
        field = peewee.CharField(max_length=128, null=True)
        migrate(migrator.add_column("tapecopy", "checksums", field))


class MetaVersionStore:
    """The library's schema version lives in its ``meta`` table (key ``schema_version``)."""

    def read(self, db: peewee.Database, component: str) -> int | None:
        if not db.table_exists("meta"):
            return None
        row = db.execute_sql("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else None

    def write(self, db: peewee.Database, component: str, version: int) -> None:
        db.execute_sql(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),)
        )

    def forget(self, db: peewee.Database, component: str) -> None:
        db.execute_sql("DELETE FROM meta WHERE key = 'schema_version'")


#: The library catalog's schema versions (see pacifica_like.db.migrations).
SCHEMA = Schema("tape", (_create_v1, _add_checksums_v2), MetaVersionStore())
#: The version this code reads and writes; a library made by another version is refused.
SCHEMA_VERSION = SCHEMA.latest
#: Errors of any library's catalog; the message names the step that failed. OSError passes:
#: the blocks it guards also move bytes between volumes and disk (ENOSPC is not a catalog error).
_ERRORS = ErrorTranslator(None, "the tape catalog is unavailable", os_errors=False)


@dataclass(frozen=True)
class CopyInfo:
    """A tape copy as the library's callers see it (a plain value, no DB handle)."""

    id: int
    file_id: int
    vsn: str
    seq: int
    offset: int
    size: int
    sha256: bytes
    mtime: float
    ctime: float
    stale: bool
    bad: bool
    written_at: float
    verified_at: float | None
    verify_result: str | None
    #: The grid checksums recorded with the version (adler32, md5), empty for copies written before schema 2.
    checksums: tuple[tuple[str, bytes], ...] = ()

    @property
    def safe(self) -> bool:
        """True when the copy is current, undamaged and was read back after writing."""
        return not self.stale and not self.bad and self.verified_at is not None and self.verify_result == "ok"


def translate_db_errors(what: str) -> contextlib.AbstractContextManager[None]:
    """Turn a catalog failure (locked past busy_timeout, unreadable file) into StorageUnavailable."""
    return _ERRORS(what)


class Catalog:
    """The open catalog of one library directory; safe to share between threads."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, CATALOG_NAME)
        self.db = open_database(
            "sqlite:///" + self.path,
            sqlite_pragmas={"journal_mode": "wal", "synchronous": "full", "busy_timeout": 30000},
            lock_type="IMMEDIATE",
        )
        models = bind_models(self.db, _TABLES)
        self.Meta = models["meta"]
        self.Volume = models["volume"]
        self.Drive = models["drive"]
        self.TapeCopy = models["tapecopy"]
        self.Recall = models["recall"]

    def exists(self) -> bool:
        """True when the catalog file is there (``tape init`` ran)."""
        return os.path.isfile(self.path)

    def create(self, volumes: dict[str, int], drives: list[str]) -> tuple[list[str], list[str]]:
        """Upgrade the tables to this version, add missing volumes (VSN -> capacity) and drives.

        Existing volumes and drives are never changed or removed. Returns what was added.
        """
        upgrade(self.db, SCHEMA, f"tape catalog {self.path}")
        with self.db.atomic():
            self.Meta.insert(key="created_at", value=repr(time.time())).on_conflict_ignore().execute()
            have_volumes = {v.vsn for v in self.Volume.select(self.Volume.vsn)}
            have_drives = {d.name for d in self.Drive.select(self.Drive.name)}
            new_volumes = [vsn for vsn in volumes if vsn not in have_volumes]
            new_drives = [name for name in drives if name not in have_drives]
            for vsn in new_volumes:
                self.Volume.create(vsn=vsn, capacity=volumes[vsn])
            for name in new_drives:
                self.Drive.create(name=name)
        return new_volumes, new_drives

    def schema_version(self) -> int | None:
        """Return the schema version the library was made with (None if unreadable)."""
        try:
            row = self.Meta.get_or_none(self.Meta.key == "schema_version")
        except peewee.DatabaseError:
            return None
        return int(row.value) if row else None

    def copies(self, file_id: int) -> list[CopyInfo]:
        """Return every copy of ``file_id``, newest first."""
        query = (
            self.TapeCopy.select()
            .where(self.TapeCopy.file_id == file_id)
            .order_by(self.TapeCopy.written_at.desc(), self.TapeCopy.id.desc())
        )
        return [to_info(row) for row in query]

    def current_copies(self, file_id: int) -> list[CopyInfo]:
        """Return the copies of the file's current version (not stale), newest first."""
        return [c for c in self.copies(file_id) if not c.stale]

    def current_rows(self, file_ids: Sequence[int], columns: str, undamaged: bool = False) -> Iterator[tuple]:
        """Yield ``columns`` of the current copies of ``file_ids``, each file's newest first.

        ``undamaged``: leave out copies that failed their checksum. Plain SQL in
        batches of ID_BATCH: a bulk request looks up 100,000 ids, and peewee's
        query building and row objects would cost seconds of CPU.
        """
        for start in range(0, len(file_ids), ID_BATCH):
            batch = file_ids[start : start + ID_BATCH]
            sql = (
                f"SELECT {columns} FROM tapecopy WHERE stale = 0{' AND bad = 0' if undamaged else ''} "
                f"AND file_id IN ({', '.join('?' * len(batch))}) ORDER BY file_id, written_at DESC, id DESC"
            )
            yield from self.db.execute_sql(sql, batch)

    def mark_stale(self, file_id: int) -> int:
        """Mark every copy of ``file_id`` stale (a newer version exists); return how many."""
        with self.db.atomic():
            return (
                self.TapeCopy.update(stale=True)
                .where((self.TapeCopy.file_id == file_id) & (self.TapeCopy.stale == False))  # noqa: E712
                .execute()
            )

    def retire(self, copy_id: int) -> None:
        """Mark one copy stale: it holds a version that was replaced or deleted while being written."""
        with self.db.atomic():
            self.TapeCopy.update(stale=True).where(self.TapeCopy.id == copy_id).execute()

    def record_verification(self, copy_id: int, result: str, when: float | None = None) -> None:
        """Store the outcome of reading a copy back; a mismatch marks it bad for good."""
        update = {"verified_at": time.time() if when is None else when, "verify_result": result}
        if result == "mismatch":
            update["bad"] = True
        with self.db.atomic():
            self.TapeCopy.update(**update).where(self.TapeCopy.id == copy_id).execute()

    def tape_file_ids(self) -> list[int]:
        """Return the ids that have at least one current copy."""
        query = (
            self.TapeCopy.select(self.TapeCopy.file_id)
            .where(self.TapeCopy.stale == False)  # noqa: E712
            .distinct()
        )
        return [row.file_id for row in query]

    def close(self) -> None:
        """Close this thread's connection."""
        if not self.db.is_closed():
            self.db.close()


def to_info(row: peewee.Model) -> CopyInfo:
    """Freeze a TapeCopy row into a CopyInfo."""
    return CopyInfo(
        id=row.id,
        file_id=row.file_id,
        vsn=row.vsn,
        seq=row.seq,
        offset=row.offset,
        size=row.size,
        sha256=bytes.fromhex(row.sha256),
        mtime=row.mtime,
        ctime=row.ctime,
        stale=row.stale,
        bad=row.bad,
        written_at=row.written_at,
        verified_at=row.verified_at,
        verify_result=row.verify_result,
        checksums=tuple(checksums.decode_grid((row.checksums or "").encode("ascii")).items()),
    )
