"""One database module for every catalog (gateway inventory, bulk requests, tape library, sideband).

* :mod:`~pacifica_like.db.urls`: open a database from a URL (SQLite, PostgreSQL with psycopg 3,
  MariaDB/MySQL with mysqlclient where installed, else PyMySQL: :mod:`~pacifica_like.db.mysql`);
* :mod:`~pacifica_like.db.errors`: translate errors by SQLSTATE / errno / SQLite code, one
  context manager;
* :mod:`~pacifica_like.db.retry`: run a transaction again after contention, jittered and bounded;
* :mod:`~pacifica_like.db.durable`: commits on disk when they return (or, lazily, within a
  second), flushed outside the lock by group commit;
* :mod:`~pacifica_like.db.binding`: bind a model set to one database instance;
* :mod:`~pacifica_like.db.pool`: bounded connections kept per thread (public peewee API only);
* :mod:`~pacifica_like.db.migrations`: versioned schema migrations under a per-database lock.
"""
