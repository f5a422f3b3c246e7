"""Bind a set of model classes to one database instance, so one process may hold several databases.

Subclasses, not ``bind()`` on the shared classes: binding those would move
every other instance's models to the last database bound.
"""

from __future__ import annotations

from collections.abc import Mapping

import peewee


def bind_models(
    db: peewee.Database, tables: Mapping[str, type[peewee.Model]]
) -> dict[str, type[peewee.Model]]:
    """Return a subclass of each model bound to ``db``, keyed like ``tables`` (table name -> model).

    Each subclass is named like its base without a leading underscore, keeps the base's fields
    and indexes, and carries its table name as ``TABLE_NAME``.
    """
    bound = {}
    for table, base in tables.items():
        meta = type("Meta", (), {"database": db, "table_name": table})
        name = base.__name__.lstrip("_")
        # TABLE_NAME: the name for hand-written SQL, without reaching into peewee's ``_meta``.
        attributes = {"Meta": meta, "__module__": base.__module__, "TABLE_NAME": table}
        bound[table] = type(name, (base,), attributes)
    return bound
