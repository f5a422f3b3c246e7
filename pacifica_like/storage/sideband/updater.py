"""Keep the sideband tables true, as Oracle HSM's database updater does, for the emulated HSM.

Every event (a file created or replaced, migrated, released, recalled,
deleted) is handled the same way: :meth:`SidebandUpdater.refresh` reads the
file as it is *now* (disk cache, tape catalog) and makes its rows say so, in
one transaction that first locks the file's ``sam_path`` row. Because it
derives the rows from the current state instead of replaying the event, calls
are idempotent, order does not matter, and two processes refreshing one file
leave the rows of whichever looked last, which saw the newest state. The same
code builds the database from a scan (``pacifica-like sideband load``).

What the rows say:

* a file on disk: ``sam_inode`` with the disk inode's identity, ``online`` 1,
  and one ``sam_archive`` row per current, undamaged tape copy of exactly
  these bytes (same size and sha-256);
* a file only on tape: the identity it had on disk (or, if the database never
  saw it there, inode number 0 and the file id as generation: our emulator
  keeps no inode for a released file), ``online`` 0, its copies;
* a new version (PUT, PATCH): the old identity's inode, file and path rows go,
  its archive rows stay with ``stale`` 1; a recall (new inode, same bytes)
  moves the copies to the new identity;
* a deleted file: its rows go, its archive rows become stale.

Copies are numbered 1, 2... in the order they were written; ``position`` is the
record's byte offset on the volume (what the tape catalog calls ``offset``) and
``offset`` (within the record) is 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import peewee

from pacifica_like.core.config import Settings
from pacifica_like.db.retry import RetryPolicy, retry
from pacifica_like.storage.contract import StorageEvent
from pacifica_like.storage.sideband import models
from pacifica_like.storage.sideband.identity import DiskFile, ParentCache, name_hash, read_disk_file
from pacifica_like.storage.sideband.models import MEDIA_LTO, TYPE_FILE, connected, is_mysql, translate_errors

log = logging.getLogger("pacifica_like.sideband")

#: Inode number of a file known only from tape (generation: its file id). Never a real inode number.
NO_INODE = 0
#: Deadlocks (MySQL 1213) and lock wait timeouts (1205) between refreshes are retried this long:
#: under many writers a refresh may lose several times in a row (pacifica_like.db.retry).
RETRY = RetryPolicy(seconds=30.0)

InodeRow = tuple[int, int, int, int, int, str | None, int, int, int, int]
FileRow = tuple[int, int, int, int, str, int]
PathRow = tuple[int, int, str]
ArchiveRow = tuple[int, int, int, int, str, str, int, int, int, int, int]

INODE_COLUMNS = (
    "ino",
    "gen",
    "type",
    "size",
    "online",
    "csum",
    "create_time",
    "modify_time",
    "uid",
    "gid",
)
FILE_COLUMNS = ("ino", "gen", "p_ino", "p_gen", "name", "name_hash")
PATH_COLUMNS = ("ino", "gen", "path")
ARCHIVE_COLUMNS = (
    "ino",
    "gen",
    "copy",
    "seq",
    "media_type",
    "vsn",
    "position",
    "offset",
    "size",
    "stale",
    "create_time",
)


@dataclass(frozen=True)
class FileRows:
    """Every live row of one file (archive rows: the non-stale ones, by copy number)."""

    inode: InodeRow
    file: FileRow | None
    path: PathRow
    archive: tuple[ArchiveRow, ...]

    @property
    def identity(self) -> tuple[int, int]:
        return self.inode[0], self.inode[1]

    @property
    def version(self) -> tuple[int, str | None]:
        """(size, csum): what tells one version of the file's bytes from another."""
        return self.inode[3], self.inode[5]


class CopyInfo(Protocol):
    """What the updater reads of a tape copy (the tape catalog's ``CopyInfo``)."""

    id: int
    seq: int
    vsn: str
    offset: int
    size: int
    sha256: bytes | None
    stale: bool
    bad: bool
    written_at: float
    mtime: float
    ctime: float


def _matching(copies: Iterable[CopyInfo], size: int, sha256: bytes | None) -> list[CopyInfo]:
    """The undamaged copies of exactly these bytes, in the order they were written."""
    found = [c for c in copies if not c.stale and not c.bad and c.size == size and c.sha256 == sha256]
    return sorted(found, key=lambda c: (c.written_at, c.id))


def desired_rows(
    relpath: str,
    file_id: int,
    disk: DiskFile | None,
    copies: list[CopyInfo],
    identity: tuple[int, int] | None,
) -> FileRows | None:
    """Return the rows that describe the file now; None when it is neither on disk nor on tape.

    ``copies``: the tape catalog's current copies, newest first; ``identity``:
    the ``(ino, gen)`` to use (the caller settles it: see :meth:`SidebandUpdater.identity_for`).
    """
    name = os.path.basename(relpath)
    if disk is not None:
        assert identity is not None
        ino, gen = identity
        size, csum = disk.size, disk.sha256
        times = (int(disk.ctime), int(disk.mtime))
        owner = (disk.uid, disk.gid)
        online = 1
        parent = disk.parent
    else:
        current = [c for c in copies if not c.stale]
        if not current:
            return None
        newest = current[0]
        ino, gen = identity if identity is not None else (NO_INODE, file_id)
        size, csum = newest.size, newest.sha256
        times = (int(newest.ctime), int(newest.mtime))
        owner = (0, 0)
        online = 0
        parent = None
    archive = tuple(
        (ino, gen, number, c.seq, MEDIA_LTO, c.vsn, c.offset, 0, c.size, 0, int(c.written_at))
        for number, c in enumerate(_matching(copies, size, csum), start=1)
    )
    csum_hex = csum.hex() if csum is not None else None
    inode = (ino, gen, TYPE_FILE, size, online, csum_hex, *times, *owner)
    file = (ino, gen, parent[0], parent[1] or 0, name, name_hash(name)) if parent is not None else None
    return FileRows(inode, file, (ino, gen, relpath), archive)


class Statements:
    """The SQL of the updater and of HEAD, written once per dialect (quoting, parameters)."""

    def __init__(self, db: peewee.Database) -> None:
        left, right = db.quote[0], db.quote[-1]
        p = db.param

        def q(name: str) -> str:
            return f"{left}{name}{right}"

        def cols(names: Iterable[str], alias: str = "") -> str:
            return ", ".join(f"{alias}{q(n)}" for n in names)

        def insert(table: str, names: tuple[str, ...]) -> str:
            return f"INSERT INTO {q(table)} ({cols(names)}) VALUES ({', '.join([p] * len(names))})"

        key = f"{q('ino')} = {p} AND {q('gen')} = {p}"
        lock = " FOR UPDATE" if is_mysql(db) else ""
        self.find_path = f"SELECT {q('ino')}, {q('gen')} FROM {q('sam_path')} WHERE {q('path')} = {p}{lock}"
        self.inode = f"SELECT {cols(INODE_COLUMNS)} FROM {q('sam_inode')} WHERE {key}"
        self.file = f"SELECT {cols(FILE_COLUMNS)} FROM {q('sam_file')} WHERE {key}"
        self.path = f"SELECT {cols(PATH_COLUMNS)} FROM {q('sam_path')} WHERE {key}"
        self.archive = (
            f"SELECT {cols(ARCHIVE_COLUMNS)} FROM {q('sam_archive')} WHERE {key} AND {q('stale')} = 0 "
            f"ORDER BY {q('copy')}, {q('seq')}"
        )
        self.ready = f"SELECT {q('version')} FROM {q('sam_version')}"
        self.max_gen = " UNION ALL ".join(
            f"SELECT MAX({q('gen')}) FROM {q(t)} WHERE {q('ino')} = {p}" for t in ("sam_inode", "sam_archive")
        )
        self.insert = {
            "sam_inode": insert("sam_inode", INODE_COLUMNS),
            "sam_file": insert("sam_file", FILE_COLUMNS),
            "sam_path": insert("sam_path", PATH_COLUMNS),
            "sam_archive": insert("sam_archive", ARCHIVE_COLUMNS),
        }
        self.delete = {t: f"DELETE FROM {q(t)} WHERE {key}" for t in ("sam_inode", "sam_file", "sam_path")}
        self.delete_live_archive = f"DELETE FROM {q('sam_archive')} WHERE {key} AND {q('stale')} = 0"
        self.stale_archive = (
            f"UPDATE {q('sam_archive')} SET {q('stale')} = 1 WHERE {key} AND {q('stale')} = 0"
        )
        # HEAD: the file by path, its inode (joined on ino AND gen), its live copies; one round trip.
        self.status = (
            f"SELECT i.{q('ino')}, i.{q('gen')}, i.{q('size')}, i.{q('online')}, i.{q('csum')}, "
            f"i.{q('create_time')}, i.{q('modify_time')}, a.{q('copy')}, a.{q('vsn')}, a.{q('position')}, "
            f"a.{q('media_type')} "
            f"FROM {q('sam_path')} p JOIN {q('sam_inode')} i ON i.{q('ino')} = p.{q('ino')} "
            f"AND i.{q('gen')} = p.{q('gen')} "
            f"LEFT JOIN {q('sam_archive')} a ON a.{q('ino')} = i.{q('ino')} AND a.{q('gen')} = i.{q('gen')} "
            f"AND a.{q('stale')} = 0 "
            f"WHERE p.{q('path')} = {p} ORDER BY a.{q('copy')}"
        )


class TapeArchive(Protocol):
    """What the updater reads: the disk cache's paths and the tape catalog (a TapeHsm has both)."""

    catalog: Any
    cache: Any

    def copies_by_file(self) -> dict[int, list[CopyInfo]]:
        """Return every current tape copy by file id, newest first."""

    def relpath(self, file_id: int) -> str:
        """Return the file's path relative to the prefix."""

    def path(self, file_id: int) -> str:
        """Return the file's disk cache path."""

    def list_ids(self) -> Any:
        """Yield every stored id."""


class SidebandUpdater:
    """Writes the rows of the files of one tape archive (disk cache + tape catalog) into ``db``."""

    def __init__(
        self, db: peewee.Database, backend: TapeArchive, prepare: Callable[[], None] = lambda: None
    ) -> None:
        self.db = db
        self.backend = backend
        #: Called before every transaction: creates the tables on first use in this process.
        self.prepare = prepare
        self.sql = Statements(db)
        self._mysql = is_mysql(db)

    # -- reading -------------------------------------------------------------------

    def _one(self, sql: str, params: tuple) -> tuple | None:
        return self.db.execute_sql(sql, params).fetchone()

    def stored_rows(self, identity: tuple[int, int]) -> FileRows | None:
        """Return the live rows the database holds for ``identity`` (None without an inode row)."""
        inode = self._one(self.sql.inode, identity)
        path = self._one(self.sql.path, identity)
        if inode is None or path is None:
            return None
        file = self._one(self.sql.file, identity)
        archive = tuple(tuple(row) for row in self.db.execute_sql(self.sql.archive, identity).fetchall())
        return FileRows(_ints(inode), tuple(file) if file else None, tuple(path), archive)  # type: ignore[arg-type]

    def identity_for(self, disk: DiskFile | None, existing: tuple[int, int] | None) -> tuple[int, int] | None:
        """Settle the ``(ino, gen)`` the rows of a file use.

        On disk: the inode number, with the filesystem's generation, or (a
        filesystem without generations) the recorded one when the path's row
        has this inode number, else one past the highest recorded for it.
        Only on tape: the identity the rows already have.
        """
        if disk is None:
            return existing
        if disk.gen is not None:
            return disk.ino, disk.gen
        if existing is not None and existing[0] == disk.ino:
            return existing
        highest = [row[0] for row in self.db.execute_sql(self.sql.max_gen, (disk.ino, disk.ino)).fetchall()]
        return disk.ino, 1 + max((g for g in highest if g is not None), default=0)

    # -- writing -------------------------------------------------------------------

    def refresh(self, file_id: int) -> bool:
        """Make the rows of ``file_id`` describe it as it is now; True if anything changed.

        Raises StorageUnavailable when the database cannot be reached.
        """
        return self.refresh_many([file_id]) > 0

    def refresh_many(self, file_ids: Iterable[int], parents: ParentCache | None = None) -> int:
        """Refresh several files in one transaction; return how many changed."""
        ids = list(file_ids)
        parents = parents or ParentCache()
        with translate_errors(self.db, "cannot create the sideband tables"):
            self.prepare()

        def attempt() -> int:
            with (
                translate_errors(self.db, "cannot update the file rows"),
                connected(self.db),
                self.db.atomic(),
            ):
                return sum(self._refresh_locked(file_id, parents) for file_id in ids)

        # A deadlock or lock wait timeout between two refreshes: the loser runs again.
        return retry(attempt, RETRY)

    def _refresh_locked(self, file_id: int, parents: ParentCache) -> bool:
        relpath = self.backend.relpath(file_id)
        found = self._one(self.sql.find_path, (relpath,))
        existing = (int(found[0]), int(found[1])) if found else None
        # Read the file only now, holding the path's lock: a later event's refresh waits for ours.
        disk = read_disk_file(self.backend.path(file_id), parents)
        copies = self.backend.catalog.current_copies(file_id)
        wanted = desired_rows(relpath, file_id, disk, copies, self.identity_for(disk, existing))
        held = self.stored_rows(existing) if existing is not None else None
        if (
            wanted is not None
            and wanted.file is None
            and held is not None
            and held.identity == wanted.identity
        ):
            # Released: the directory entry the file had on disk is still its entry.
            wanted = dataclasses.replace(wanted, file=held.file)
        if wanted == held:
            return False
        if existing is not None and (wanted is None or wanted.identity != existing):
            # The path's old identity goes. Its copies move with the bytes (a recall gave them a
            # new inode) or, when the bytes changed or the file went, stay behind as stale.
            for table, sql in self.sql.delete.items():
                del table
                self.db.execute_sql(sql, existing)
            same_bytes = wanted is not None and held is not None and wanted.version == held.version
            self.db.execute_sql(
                self.sql.delete_live_archive if same_bytes else self.sql.stale_archive, existing
            )
        if wanted is not None:
            self._write(wanted)
        return True

    def _write(self, rows: FileRows) -> None:
        """Replace the live rows of ``rows.identity`` with ``rows``."""
        identity = rows.identity
        for sql in self.sql.delete.values():
            self.db.execute_sql(sql, identity)
        self.db.execute_sql(self.sql.delete_live_archive, identity)
        self.db.execute_sql(self.sql.insert["sam_inode"], rows.inode)
        self.db.execute_sql(self.sql.insert["sam_path"], rows.path)
        if rows.file is not None:
            self.db.execute_sql(self.sql.insert["sam_file"], rows.file)
        for row in rows.archive:
            self.db.execute_sql(self.sql.insert["sam_archive"], row)


def _ints(row: tuple) -> tuple:
    """Normalise a row read back from the database (MySQL returns Decimal for some integer types)."""
    return tuple(int(v) if v is not None and not isinstance(v, str) else v for v in row)


class SidebandUpkeep:
    """A storage-event subscriber: refreshes the rows of the file each event names.

    Failures are logged, never raised: the change is already durable, so the
    client gets its success, and the rows are repaired by the next refresh of
    the file or by ``pacifica-like sideband load``. Until then HEAD reports the
    file as out of step with the database (503, naming the remedy).
    """

    def __init__(self, updater: SidebandUpdater) -> None:
        self.updater = updater

    def __call__(self, event: StorageEvent) -> None:
        """Refresh the rows of the file ``event`` names (whatever happened: rows follow the state)."""
        self.changed(event.file_id, type(event).__name__.lower())

    def changed(self, file_id: int, event: str) -> None:
        """Refresh ``file_id``'s rows after ``event`` (stored, migrated, released...)."""
        try:
            self.updater.refresh(file_id)
        except Exception as exc:  # the change is durable: no failure here may fail the request
            log.error(
                "file %d was %s, but its sideband rows could not be updated (HEAD will report it "
                "out of step until `pacifica-like sideband load` or its next change): %s",
                file_id,
                event,
                exc,
            )


def open_sideband(settings: Settings, url: str) -> peewee.Database:
    """Open the sideband database at ``url`` with the ``[sideband]`` pool settings."""
    side = settings.sideband
    return models.open_database(url, side.connect_timeout, side.max_connections)


def keep_sideband(archive: Any, settings: Settings, url: str) -> SidebandUpkeep:
    """Keep the sideband database at ``url`` true for ``archive``'s changes; return the subscriber.

    ``archive`` is a tape HSM (the tape backend, or what the emulated sideband
    backend composes): its events reach the updater, and its
    ``sideband_upkeep`` names the subscriber (``sideband load`` drives its updater).
    """
    db = open_sideband(settings, url)
    upkeep = SidebandUpkeep(SidebandUpdater(db, archive, prepare=lambda: models.create_schema(db)))
    archive.events.subscribe(upkeep)
    archive.sideband_upkeep = upkeep
    return upkeep
