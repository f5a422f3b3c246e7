"""MariaDB and MySQL through mysqlclient (libmariadb's C client) where installed, PyMySQL otherwise.

A HEAD on the sideband backend is one indexed query; with PyMySQL most of its
cost is the driver parsing the protocol in Python. mysqlclient does that in C.
peewee picks PyMySQL whenever it is importable, so the classes here connect
with mysqlclient themselves, through the hook peewee documents for a driver
of one's own (``Database._connect``). Both drivers speak the same DB-API
dialect to peewee and raise errors carrying the server's errno
(:mod:`pacifica_like.db.errors`). The URL option ``driver=pymysql`` or
``driver=mysqlclient`` chooses one (docs/decisions/0049-mysqlclient-first.md).
"""

from __future__ import annotations

import importlib
from typing import Any

import peewee

from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.db.pool import ThreadBoundConnections

#: Driver name (the URL's ``driver=`` option) -> module, in the order of preference.
MYSQL_DRIVERS = {"mysqlclient": "MySQLdb", "pymysql": "pymysql"}


def mysql_driver(wanted: str | None = None) -> str:
    """Return the MySQL driver to use: ``wanted``, or mysqlclient where it imports, else pymysql.

    StorageUnavailable when ``wanted`` (or, without it, every driver) cannot be imported.
    """
    if wanted is not None and wanted not in MYSQL_DRIVERS:
        raise StorageUnavailable(
            f"unknown MySQL driver {wanted!r}: driver= takes {' or '.join(MYSQL_DRIVERS)}"
        )
    for name in [wanted] if wanted is not None else list(MYSQL_DRIVERS):
        try:
            importlib.import_module(MYSQL_DRIVERS[name])
        except ImportError:
            continue
        return name
    raise StorageUnavailable(
        f"a MariaDB/MySQL database needs {'the ' + wanted if wanted else 'a'} driver: "
        "pip install 'pacifica-like[mysql]' (PyMySQL), and mysqlclient for speed"
    )


class _MySQLClientConnections:
    """Connect with mysqlclient (MySQLdb) instead of the driver peewee imported."""

    driver = "mysqlclient"

    def _connect(self) -> Any:
        import MySQLdb  # imported by mysql_driver() before any class here is made

        params: dict[str, Any] = dict(self.connect_params)  # type: ignore[attr-defined]
        return MySQLdb.connect(database=self.database, autocommit=True, **params)  # type: ignore[attr-defined]


class MySQLClientDatabase(_MySQLClientConnections, peewee.MySQLDatabase):
    """peewee's MySQL dialect over mysqlclient."""


class BoundedMySQLClientDatabase(ThreadBoundConnections, _MySQLClientConnections, peewee.MySQLDatabase):
    """Bounded per-thread connections (:mod:`pacifica_like.db.pool`) over mysqlclient."""
