"""Create database tables when several processes may do it at once (a leaf: peewee only).

Every uWSGI worker creates the tables it needs on its first request, so on a
fresh database several do it at the same moment. ``IF NOT EXISTS`` covers
tables, but not everything: MySQL has no ``CREATE INDEX IF NOT EXISTS`` (peewee
looks before it creates, and another process may create the index in
between: "Duplicate key name"), and PostgreSQL can report a concurrent
``CREATE TABLE IF NOT EXISTS`` as a unique violation. Such a failure means the
other process got there first: look again, and what exists now is skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import peewee

#: Times to look again after another process created part of the schema first.
TRIES = 5


def created_meanwhile(exc: Exception) -> bool:
    """True when ``exc`` says a table or index exists already (another process made it first)."""
    text = str(exc).lower()
    return "duplicate" in text or "already exists" in text


def create_tables(db: peewee.Database, models: Sequence[type[peewee.Model]]) -> None:
    """Create the tables and indexes of ``models`` that do not exist, racing other processes safely."""
    for attempt in range(TRIES):
        try:
            db.create_tables(models, safe=True)
            return
        except (peewee.IntegrityError, peewee.OperationalError, peewee.ProgrammingError) as exc:
            if attempt + 1 == TRIES or not created_meanwhile(exc):
                raise
            # PostgreSQL aborted the transaction the failed statement ran in.
            with contextlib.suppress(peewee.PeeweeException):
                db.rollback()
