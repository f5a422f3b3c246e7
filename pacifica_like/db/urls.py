"""Open a peewee database from a URL: SQLite, PostgreSQL (psycopg 3), MariaDB/MySQL (mysqlclient, PyMySQL).

``sqlite:///PATH``, ``postgresql://user:password@host:port/name?option=value``
(``postgres://`` too) and ``mysql://user:password@host:port/name`` (``mariadb://``
too). User and password are percent-decoded; query options go to the driver,
numbers and booleans converted (``connect_timeout=5``), except MySQL's
``driver=mysqlclient|pymysql`` (default: mysqlclient where installed,
:mod:`pacifica_like.db.mysql`). Nothing connects here:
peewee opens a connection per thread on the first query (uWSGI forks after
import and construction; no connection may cross the fork).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee

from pacifica_like.core.config import redact_url
from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.db.mysql import BoundedMySQLClientDatabase, MySQLClientDatabase, mysql_driver
from pacifica_like.db.pool import BoundedMySQLDatabase, BoundedSqliteDatabase

#: URL scheme -> dialect.
SCHEMES = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
}
#: Dialect -> (driver module, the setup.py extra that installs it).
DRIVERS = {"postgresql": ("psycopg", "postgres")}  # MySQL: pacifica_like.db.mysql


@dataclass(frozen=True)
class DatabaseURL:
    """A parsed database URL. ``database`` is the file path for SQLite."""

    dialect: str
    database: str
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    options: dict[str, Any] = field(default_factory=dict)


def _option(value: str) -> Any:
    """Convert a query-string value: true/false, integers and decimals; anything else stays text."""
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_url(url: str) -> DatabaseURL:
    """Parse ``url``; ValueError naming the problem (the password never appears in it)."""
    parts = urlsplit(url)
    dialect = SCHEMES.get(parts.scheme.lower())
    if dialect is None:
        raise ValueError(
            f"unsupported database URL {redact_url(url)!r}: expected "
            f"{', '.join(s + '://...' for s in SCHEMES)}"
        )
    options = {key: _option(value) for key, value in parse_qsl(parts.query, keep_blank_values=True)}
    if dialect == "sqlite":
        if parts.netloc or not parts.path.startswith("/") or len(parts.path) < 2:
            raise ValueError(f"a SQLite database is sqlite:///PATH (three slashes), got {url!r}")
        return DatabaseURL("sqlite", parts.path[1:], options=options)
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise ValueError(f"{redact_url(url)!r} names no database (…://host:port/NAME)")
    return DatabaseURL(
        dialect,
        name,
        host=parts.hostname,
        port=parts.port,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        options=options,
    )


def require_driver(dialect: str) -> None:
    """Import the driver of ``dialect`` now, so a missing one is named with its extra, not on a query."""
    if dialect == "mysql":
        mysql_driver()
        return
    if dialect not in DRIVERS:
        return
    module, extra = DRIVERS[dialect]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise StorageUnavailable(
            f"a {dialect} database needs the {module} driver (pip install 'pacifica-like[{extra}]')"
        ) from exc


def open_database(
    url: str,
    *,
    sqlite_pragmas: dict[str, Any] | None = None,
    max_connections: int | None = None,
    pool_wait: float = 0.0,
    **driver_options: Any,
) -> peewee.Database:
    """Return the (unconnected) peewee database ``url`` names.

    ``sqlite_pragmas`` are run on every SQLite connection. ``max_connections``:
    at most that many connections at once, each kept by the thread that opened it
    (see :mod:`pacifica_like.db.pool`; SQLite and MySQL), a thread waiting up to
    ``pool_wait`` seconds for one. ``driver_options`` beat the URL's query options.
    The database carries ``display_url`` (password hidden) for messages.
    """
    parsed = parse_url(url)
    require_driver(parsed.dialect)
    options = {**parsed.options, **driver_options}
    db: peewee.Database
    if parsed.dialect == "sqlite":
        options.setdefault("check_same_thread", False)
        if max_connections is None:
            db = peewee.SqliteDatabase(parsed.database, pragmas=sqlite_pragmas or {}, **options)
        else:
            db = BoundedSqliteDatabase(
                parsed.database,
                max_connections=max_connections,
                pool_wait=pool_wait,
                pragmas=sqlite_pragmas or {},
                **options,
            )
    else:
        for key in ("host", "port", "user", "password"):
            value = getattr(parsed, key)
            if value is not None:
                options.setdefault(key, value)
        if parsed.dialect == "postgresql":
            if max_connections is not None:
                raise ValueError("bounded per-thread connections are for SQLite and MySQL")
            # psycopg 3 even where psycopg2 is installed too: one driver, one set of error codes.
            db = peewee.PostgresqlDatabase(parsed.database, prefer_psycopg3=True, **options)
        else:
            client = mysql_driver(options.pop("driver", None)) == "mysqlclient"
            if max_connections is None:
                db = (MySQLClientDatabase if client else peewee.MySQLDatabase)(parsed.database, **options)
            else:
                bounded = BoundedMySQLClientDatabase if client else BoundedMySQLDatabase
                db = bounded(parsed.database, max_connections=max_connections, pool_wait=pool_wait, **options)
    db.display_url = redact_url(url)  # type: ignore[attr-defined]
    db.dialect = parsed.dialect  # type: ignore[attr-defined]
    return db


def dialect_of(db: peewee.Database) -> str:
    """Return ``sqlite``, ``postgresql`` or ``mysql`` for ``db``."""
    if isinstance(db, peewee.SqliteDatabase):
        return "sqlite"
    if isinstance(db, peewee.PostgresqlDatabase):
        return "postgresql"
    if isinstance(db, peewee.MySQLDatabase):
        return "mysql"
    raise ValueError(f"unsupported database {type(db).__name__}")
