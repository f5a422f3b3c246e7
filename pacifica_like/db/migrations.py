"""Versioned schema migrations, safe when many processes start at once.

A :class:`Schema` is a component's list of migrations: ordered functions
``migrate(db, migrator)`` (``migrator``: peewee's ``playhouse.migrate``
SchemaMigrator for the database), migration *i* taking the schema from version
*i* to *i + 1*. The version each component has reached is a row in
``pl_schema_version`` (or a store of the component's own, :class:`VersionStore`).

:func:`upgrade` reads the version without a lock (the common case: up to
date, nothing more to do), and otherwise takes a lock that serialises every
process upgrading this database, reads the version again, and applies what is
missing: SQLite ``BEGIN IMMEDIATE`` (the whole upgrade is one transaction),
PostgreSQL ``pg_advisory_lock`` (each migration one transaction), MySQL
``GET_LOCK`` (MySQL commits DDL at once, so a migration that fails half way
must be written to be run again). Many uWSGI workers starting on a fresh
database therefore create the schema once, and no CREATE races another.

Version 1 of each component is the schema the code created before versions
were recorded: it creates only what is missing, so a database made by that code
(its tables there, no version row) upgrades cleanly. A migration added later
must not use the live models (they will have changed again): declare the
columns it adds, or frozen copies of models, in the migration itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import peewee
from playhouse.migrate import SchemaMigrator

from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.db.binding import bind_models
from pacifica_like.db.urls import dialect_of

#: One step: bring the schema from one version to the next.
Migration = Callable[[peewee.Database, SchemaMigrator], None]
#: The table that records each component's version.
VERSION_TABLE = "pl_schema_version"
#: Seconds a process waits for another one's upgrade (PostgreSQL, MySQL) before it gives up.
LOCK_WAIT = 120


class VersionStore(Protocol):
    """Where a component's schema version is kept."""

    def read(self, db: peewee.Database, component: str) -> int | None:
        """Return the recorded version, None when none is recorded (a new or a pre-version database)."""

    def write(self, db: peewee.Database, component: str, version: int) -> None:
        """Record ``version`` (called under the upgrade lock)."""

    def forget(self, db: peewee.Database, component: str) -> None:
        """Remove the record (the component's tables were dropped)."""


class _VersionRow(peewee.Model):
    component = peewee.CharField(max_length=64, primary_key=True)
    version = peewee.IntegerField()
    upgraded_at = peewee.DoubleField()


class VersionTable:
    """The default store: one row per component in ``pl_schema_version``."""

    def _model(self, db: peewee.Database) -> type[peewee.Model]:
        return bind_models(db, {VERSION_TABLE: _VersionRow})[VERSION_TABLE]

    def read(self, db: peewee.Database, component: str) -> int | None:
        if not db.table_exists(VERSION_TABLE):
            return None
        model = self._model(db)
        row = model.get_or_none(model.component == component)
        return None if row is None else row.version

    def write(self, db: peewee.Database, component: str, version: int) -> None:
        model = self._model(db)
        db.create_tables([model], safe=True)
        changed = model.update(version=version, upgraded_at=time.time()).where(model.component == component)
        if not changed.execute():
            model.insert(component=component, version=version, upgraded_at=time.time()).execute()

    def forget(self, db: peewee.Database, component: str) -> None:
        if not db.table_exists(VERSION_TABLE):
            return
        model = self._model(db)
        model.delete().where(model.component == component).execute()
        if not model.select().exists():
            db.drop_tables([model], safe=True)


@dataclass(frozen=True)
class Schema:
    """A component's migrations, in order; its latest version is how many there are."""

    component: str
    migrations: tuple[Migration, ...]
    store: VersionStore = field(default_factory=VersionTable)

    @property
    def latest(self) -> int:
        return len(self.migrations)


@dataclass(frozen=True)
class Upgrade:
    """What :func:`upgrade` found and left: ``before`` None when no version was recorded."""

    component: str
    before: int | None
    after: int

    @property
    def changed(self) -> bool:
        return self.before != self.after


class SchemaTooNew(StorageUnavailable):
    """The database holds a later schema version than this code knows (a newer gateway upgraded it)."""


def _too_new(label: str, schema: Schema, found: int) -> SchemaTooNew:
    return SchemaTooNew(
        f"{label} holds schema version {found}, but this gateway reads and writes version "
        f"{schema.latest} of its {schema.component} tables; upgrade the gateway, or point it at a "
        "database of that version"
    )


def _lock_name(db: peewee.Database) -> str:
    """Name the lock after the database (and PostgreSQL schema): upgrades elsewhere never wait.

    One lock for every component of a database, not one per component: their versions share
    one table, and two components' first upgrades must not race to create it.
    """
    dialect = dialect_of(db)
    if dialect == "postgresql":
        where = db.execute_sql("SELECT current_database(), current_schema()").fetchone()
    else:
        where = db.execute_sql("SELECT DATABASE()").fetchone()
    return f"pacifica_like:{'.'.join(str(part) for part in where)}"


@contextlib.contextmanager
def upgrade_lock(db: peewee.Database, schema: Schema) -> Iterator[None]:
    """Hold the lock that serialises the upgrades of ``schema`` in ``db`` (see the module's docstring)."""
    dialect = dialect_of(db)
    if dialect == "sqlite":
        with db.atomic(lock_type="IMMEDIATE"):
            yield
        return
    name = _lock_name(db)
    if dialect == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        with db.atomic():
            # A session lock taken in a transaction outlives it; lock_timeout bounds only the wait.
            db.execute_sql(f"SET LOCAL lock_timeout = '{LOCK_WAIT}s'")
            db.execute_sql("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield
        finally:
            db.execute_sql("SELECT pg_advisory_unlock(%s)", (key,))
        return
    # MySQL names locks server-wide, in at most 64 characters.
    if len(name) > 64:
        name = "pacifica_like:" + hashlib.sha256(name.encode()).hexdigest()[:48]
    (taken,) = db.execute_sql("SELECT GET_LOCK(%s, %s)", (name, LOCK_WAIT)).fetchone()
    if taken != 1:
        raise StorageUnavailable(f"another process has been upgrading the schema for {LOCK_WAIT} s ({name})")
    try:
        yield
    finally:
        db.execute_sql("SELECT RELEASE_LOCK(%s)", (name,))


def schema_version(db: peewee.Database, schema: Schema) -> int | None:
    """Return the version ``db`` records for ``schema`` (None: none recorded)."""
    return schema.store.read(db, schema.component)


def upgrade(db: peewee.Database, schema: Schema, label: str) -> Upgrade:
    """Bring ``schema`` in ``db`` to its latest version; safe to run from many processes at once.

    ``label`` names the database in errors. Raises SchemaTooNew for a database of a
    later version (nothing is changed), and lets database errors through for the
    caller's translator (a lock held elsewhere, on SQLite, is contention: retry).
    """
    found = schema.store.read(db, schema.component)
    if found == schema.latest:
        return Upgrade(schema.component, found, found)
    if found is not None and found > schema.latest:
        raise _too_new(label, schema, found)
    with upgrade_lock(db, schema):
        found = schema.store.read(db, schema.component)
        if found is not None and found > schema.latest:
            raise _too_new(label, schema, found)
        migrator = SchemaMigrator.from_database(db)
        transactional = dialect_of(db) != "mysql"
        for version in range((found or 0), schema.latest):
            with db.atomic() if transactional else contextlib.nullcontext():
                schema.migrations[version](db, migrator)
                schema.store.write(db, schema.component, version + 1)
    return Upgrade(schema.component, found, schema.latest)


def forget(db: peewee.Database, schema: Schema) -> None:
    """Remove ``schema``'s version record (after its tables were dropped)."""
    schema.store.forget(db, schema.component)
