"""``pacifica-like db upgrade``: bring the schemas of the archive's databases to this version.

The gateway also upgrades on first use in each process, so running this is
optional; it lets a deployment upgrade before it starts the new workers, and
shows what changed. Safe while gateways run and when several hosts run it at
once (:mod:`pacifica_like.db.migrations` takes a lock per database).
Databases: the gateway catalog (``[archive] catalog``: inventory and bulk
tables) and, for the sideband backend with the emulated HSM, the sideband
database. A real HSM's sideband database (``hsm = external``) is never changed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable

import peewee

from pacifica_like.core.config import Settings
from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.db.errors import ErrorTranslator, label_of
from pacifica_like.db.migrations import Schema, Upgrade, upgrade
from pacifica_like.db.retry import RetryPolicy, retry, still_locked
from pacifica_like.db.urls import open_database

#: The top-level commands this module runs.
COMMANDS = ("db",)
#: How long to wait for another process's upgrade or a busy SQLite database.
POLICY = RetryPolicy(seconds=60.0, first_pause=0.01, max_pause=0.5)


def add_commands(commands: argparse._SubParsersAction, settings_arguments: Callable) -> None:
    """Add ``db upgrade`` to the CLI's parser."""
    db = commands.add_parser("db", help="database maintenance (schema upgrades)")
    actions = db.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    upgrade = actions.add_parser(
        "upgrade", help="create or upgrade the catalog and sideband tables (safe while gateways run)"
    )
    settings_arguments(upgrade)


def _targets(settings: Settings) -> list[tuple[peewee.Database, str, list[Schema]]]:
    """Return (database, label, schemas) for every database of the archive this code keeps."""
    from pacifica_like.bulk import store
    from pacifica_like.gateway import catalog
    from pacifica_like.storage import registry

    found = []
    if settings.archive.catalog:
        gateway = catalog.GatewayCatalog(settings.archive.catalog)
        found.append((gateway.db, gateway.errors.label, [catalog.SCHEMA, store.SCHEMA]))
    backend = registry.ALIASES.get(settings.archive.backend.lower(), settings.archive.backend.lower())
    if backend == "sideband" and settings.sideband.hsm == "emulator":
        from pacifica_like.storage.sideband import models

        db = open_database(settings.sideband_url())
        found.append((db, label_of(db, "sideband"), [models.SCHEMA]))
    return found


def _upgrade(db: peewee.Database, label: str, schema: Schema) -> Upgrade:
    """Upgrade one schema, running again while another process holds the database's lock (SQLite)."""
    errors = ErrorTranslator(db, label)
    what = f"cannot upgrade the {schema.component} tables"

    def attempt() -> Upgrade:
        with errors(what):
            return upgrade(db, schema, label)

    return retry(attempt, POLICY, still_locked(label, what, POLICY))


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Upgrade every database; print one line per schema. Exit 0, or 1 when a database failed."""
    status = 0
    for db, label, schemas in _targets(settings):
        if isinstance(db, peewee.SqliteDatabase):
            os.makedirs(os.path.dirname(db.database) or ".", exist_ok=True)
        try:
            for schema in schemas:
                done = _upgrade(db, label, schema)
                if done.changed:
                    before = "none" if done.before is None else done.before
                    print(
                        f"{label}: {schema.component} schema upgraded from version {before} to {done.after}"
                    )
                else:
                    print(f"{label}: {schema.component} schema at version {done.after}, up to date")
        except StorageUnavailable as exc:
            print(f"pacifica-like db upgrade: {exc}", file=sys.stderr)
            status = 1
        finally:
            with contextlib.suppress(Exception):
                db.close()
    return status
