"""Build or refresh the sideband database from a scan (what sites do from a samfsdump).

Two passes. The *plan* reads everything in bulk, changes nothing, and lists
the files whose rows differ from what the disk cache and the tape catalog say
(``--dry-run`` prints it): files to add, rows to update, rows whose file is
gone. The *run* hands exactly those files to :meth:`SidebandUpdater.refresh_many`
in batches, which reads each file again under its row lock, so a load racing
live uploads never writes an older view over a newer one, and writes the very
rows the live upkeep writes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import peewee

from pacifica_like.storage.sideband.identity import ParentCache, read_disk_file
from pacifica_like.storage.sideband.models import check_schema, connected, translate_errors
from pacifica_like.storage.sideband.updater import SidebandUpdater, desired_rows

#: Files refreshed per transaction.
BATCH = 500


@dataclass
class LoadPlan:
    """What a load would change: file ids by kind of change, and how many files were already right."""

    add: list[int] = field(default_factory=list)
    update: list[int] = field(default_factory=list)
    remove: list[int] = field(default_factory=list)
    unchanged: int = 0
    #: Rows whose path maps to no file id (written by something else); left alone.
    foreign: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[int]:
        return sorted([*self.add, *self.update, *self.remove])

    def summary(self) -> dict[str, object]:
        return {
            "add": len(self.add),
            "update": len(self.update),
            "remove": len(self.remove),
            "unchanged": self.unchanged,
            "foreign_paths": len(self.foreign),
        }


def _tables_exist(db: peewee.Database) -> bool:
    """True when the sideband tables are there; asks without creating a SQLite file that is not."""
    if isinstance(db, peewee.SqliteDatabase) and not os.path.exists(db.database):
        return False
    with translate_errors(db, "cannot read the sideband tables"), connected(db):
        if not db.table_exists("sam_version"):
            return False
    with translate_errors(db, "cannot read the sideband tables"):
        check_schema(db)
    return True


def plan_load(
    updater: SidebandUpdater, progress: Callable[[int], None] = lambda n: None, create: bool = True
) -> LoadPlan:
    """Compare the database with the disk cache and the tape catalog; change nothing but, with
    ``create``, the tables (made where missing). Without ``create`` (a dry run) a database
    without the tables, or a SQLite file that does not exist, counts as empty and is left so.
    """
    backend = updater.backend
    db = updater.db
    if create:
        with translate_errors(db, "cannot create the sideband tables"):
            updater.prepare()
        exists = True
    else:
        exists = _tables_exist(db)
    held_paths: dict[str, tuple[int, int]] = {}
    if exists:
        with translate_errors(db, "cannot read the sideband tables"), connected(db):
            rows = db.execute_sql(_paths_sql(db)).fetchall()
            held_paths = {row[0]: (int(row[1]), int(row[2])) for row in rows}
    copies = backend.copies_by_file()
    ids = set(backend.list_ids()) | set(copies)
    by_path = {backend.relpath(file_id): file_id for file_id in ids}
    plan = LoadPlan()
    for relpath in held_paths:
        if relpath not in by_path:
            file_id = backend.cache.id_of(relpath)
            if file_id is None:
                plan.foreign.append(relpath)
            else:
                plan.remove.append(file_id)
    parents = ParentCache()
    with translate_errors(db, "cannot read the sideband tables"), contextlib.ExitStack() as stack:
        if exists:
            stack.enter_context(connected(db))
        for relpath, file_id in sorted(by_path.items(), key=lambda item: item[1]):
            existing = held_paths.get(relpath)
            disk = read_disk_file(backend.path(file_id), parents)
            file_copies = copies.get(file_id, [])
            if not exists:
                if disk is not None or any(not c.stale for c in file_copies):
                    plan.add.append(file_id)
                progress(1)
                continue
            wanted = desired_rows(relpath, file_id, disk, file_copies, updater.identity_for(disk, existing))
            held = updater.stored_rows(existing) if existing is not None else None
            if (
                wanted is not None
                and held is not None
                and wanted.file is None
                and held.identity == wanted.identity
            ):
                wanted = type(wanted)(wanted.inode, held.file, wanted.path, wanted.archive)
            if wanted == held:
                plan.unchanged += 1
            elif held is None:
                plan.add.append(file_id)
            elif wanted is None:
                plan.remove.append(file_id)
            else:
                plan.update.append(file_id)
            progress(1)
    return plan


def run_load(
    updater: SidebandUpdater, plan: LoadPlan, progress: Callable[[int], None] = lambda n: None
) -> int:
    """Refresh the planned files in batches; return how many changed."""
    changed = 0
    todo = plan.changes
    parents = ParentCache()
    for start in range(0, len(todo), BATCH):
        batch = todo[start : start + BATCH]
        changed += updater.refresh_many(batch, parents)
        progress(len(batch))
    return changed


def _paths_sql(db: object) -> str:
    quote = db.quote  # type: ignore[attr-defined]
    left, right = quote[0], quote[-1]
    return f"SELECT {left}path{right}, {left}ino{right}, {left}gen{right} FROM {left}sam_path{right}"
