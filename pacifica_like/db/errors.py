"""Translate database errors by their codes (SQLSTATE, MySQL errno, SQLite result code), in one place.

Message texts differ between servers, versions and locales; codes do not.
Contention (a deadlock victim, a serialization failure, a lock wait that gave
up, a SQLite database busy or locked) leaves as :class:`Contention`: the
transaction was rolled back and running it again is safe (see
:mod:`pacifica_like.db.retry`). Every other failure leaves as
:class:`~pacifica_like.core.errors.StorageUnavailable` naming the database
(password hidden), the driver's error kept as the cause; a connection that
broke is closed on the way out, so the thread's next call opens a fresh one.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any, NamedTuple

import peewee

from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.db.pool import PoolExhausted

#: MySQL/MariaDB: 1213 deadlock (the transaction was rolled back), 1205 lock wait timeout.
MYSQL_CONTENTION = frozenset({1213, 1205})
#: PostgreSQL: serialization_failure, deadlock_detected, lock_not_available (lock_timeout, NOWAIT).
POSTGRES_CONTENTION = frozenset({"40001", "40P01", "55P03"})
#: SQLite primary result codes: SQLITE_BUSY, SQLITE_LOCKED (extended codes carry them in the low byte).
SQLITE_CONTENTION = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


class Contention(StorageUnavailable):
    """The transaction lost a race for a lock and was rolled back; running it again is safe."""


class DriverCode(NamedTuple):
    """The code a database driver gave an error: ``dialect`` sqlite/postgresql/mysql, ``code``."""

    dialect: str
    code: int | str


def driver_error(exc: BaseException) -> BaseException:
    """Return the driver's own exception behind a peewee one (passed as its argument, or its cause).

    Peewee may wrap twice (a failed statement, then the transaction that ends with it).
    """
    found = exc
    for _ in range(8):
        if not isinstance(found, peewee.PeeweeException):
            return found
        if found.args and isinstance(found.args[0], BaseException):
            inner: BaseException | None = found.args[0]
        else:
            inner = found.__cause__ or found.__context__
        if inner is None:
            return found
        found = inner
    return found


def error_code(exc: BaseException) -> DriverCode | None:
    """Return the driver's code for ``exc`` (a peewee or a driver exception), None when it has none."""
    inner = driver_error(exc)
    module = type(inner).__module__
    if isinstance(inner, sqlite3.Error):
        code = getattr(inner, "sqlite_errorcode", None)
        return DriverCode("sqlite", code) if code is not None else None
    if module.startswith("psycopg"):
        # psycopg 3: sqlstate; psycopg2: pgcode.
        state = getattr(inner, "sqlstate", None) or getattr(inner, "pgcode", None)
        return DriverCode("postgresql", state) if state else None
    if module.startswith(("pymysql", "MySQLdb")) and inner.args and isinstance(inner.args[0], int):
        return DriverCode("mysql", inner.args[0])
    return None


def is_contention(exc: BaseException) -> bool:
    """True when ``exc`` is a deadlock, serialization failure, lock timeout or SQLite busy/locked."""
    found = error_code(exc)
    if found is None:
        return False
    dialect, code = found
    if dialect == "sqlite":
        return isinstance(code, int) and code & 0xFF in SQLITE_CONTENTION
    if dialect == "postgresql":
        return code in POSTGRES_CONTENTION
    return code in MYSQL_CONTENTION


def reason_of(exc: BaseException) -> str:
    """Return the error's text, or its class name when it has none."""
    return str(exc).strip() or type(exc).__name__


def discard_connection(db: peewee.Database) -> None:
    """Close this thread's connection, ignoring errors (it is broken already)."""
    with contextlib.suppress(Exception):
        if not db.is_closed():
            db.close()


class ErrorTranslator:
    """The context manager every catalog runs its database calls in.

    ``label`` starts every message (``catalog database sqlite:///...``);
    ``pool_setting`` names the setting to raise when :class:`PoolExhausted`.
    ``db`` None: a translator shared by several databases (no connection is closed).
    ``os_errors`` False: OSError passes through (blocks that also do file I/O of their own).
    """

    def __init__(
        self,
        db: peewee.Database | None,
        label: str,
        pool_setting: str = "max_connections",
        os_errors: bool = True,
    ) -> None:
        self.db = db
        self.label = label
        self.pool_setting = pool_setting
        self.caught: tuple[type[BaseException], ...] = (
            (peewee.PeeweeException, OSError) if os_errors else (peewee.PeeweeException,)
        )

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        """Run the block; its database errors leave as Contention or StorageUnavailable naming ``what``."""
        try:
            yield
        except StorageUnavailable:
            raise
        except PoolExhausted as exc:
            raise StorageUnavailable(
                f"{self.label}: {what}: all {exc.max_connections} pooled connections are held by other "
                f"threads; raise {self.pool_setting} above the number of threads that use the database "
                "(request threads, recalls, bulk workers)"
            ) from exc
        except self.caught as exc:
            raise self.translate(exc, what) from exc

    def translate(self, exc: BaseException, what: str) -> StorageUnavailable:
        """Return the error to raise for ``exc``; closes the connection when it broke."""
        message = f"{self.label}: {what}: {reason_of(exc)}"
        if is_contention(exc):
            return Contention(message)
        if self.db is not None and isinstance(exc, peewee.InterfaceError | peewee.OperationalError | OSError):
            discard_connection(self.db)
        return StorageUnavailable(message)


def label_of(db: Any, kind: str) -> str:
    """Return ``<kind> database <url>`` for messages (``display_url`` set by ``open_database``)."""
    return f"{kind} database {getattr(db, 'display_url', db.database)}"
