"""The real database servers tests run against, in throwaway schemas of their own.

.ci/run provides PostgreSQL and MariaDB on loopback and exports their URLs;
a developer may point elsewhere with ``PL_TEST_POSTGRES_URL`` and
``PL_TEST_MYSQL_URL``. Where a server is unreachable its tests are skipped,
naming why, unless ``PL_TEST_REQUIRE_DATABASES=1`` (set by .ci/run) makes
them fail instead.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

from pacifica_like.gateway.catalog import GatewayCatalog

POSTGRES_URL = os.environ.get("PL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("PL_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
KINDS = ("mysql", "postgresql")
#: Servers found unreachable in this run (label -> reason), for the summary at the end of the run.
UNREACHABLE: dict[str, str] = {}
_LABELS = {"pymysql": "MariaDB/MySQL", "psycopg": "PostgreSQL"}


def require_server(url: str, driver: str) -> None:
    """Skip when the server is unreachable, unless CI promised it (PL_TEST_REQUIRE_DATABASES=1)."""
    required = os.environ.get("PL_TEST_REQUIRE_DATABASES") == "1"
    try:
        __import__(driver)
        probe = GatewayCatalog(url)
        probe.db.connect()
        probe.close()
    except Exception as exc:  # any failure to reach it: driver missing, refused, bad credentials
        if required:
            raise
        label = _LABELS.get(driver, driver)
        UNREACHABLE.setdefault(label, f"{url}: {exc}")
        pytest.skip(f"{label} at {url} is not reachable here ({exc}); .ci/run provides it")


@contextlib.contextmanager
def scratch_database(kind: str, prefix: str = "pl_test") -> Iterator[str]:
    """Yield the URL of a new, empty schema (PostgreSQL) or database (MariaDB); drop it afterwards.

    ``kind`` is ``mysql`` or ``postgresql``; skips (or fails, in CI) when the server is unreachable.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    if kind == "postgresql":
        require_server(POSTGRES_URL, "psycopg")
        admin = GatewayCatalog(POSTGRES_URL)
        admin.db.execute_sql(f"CREATE SCHEMA {name}")
        separator = "&" if "?" in POSTGRES_URL else "?"
        url = f"{POSTGRES_URL}{separator}options=-csearch_path%3D{name}"
        drop = f"DROP SCHEMA {name} CASCADE"
    elif kind == "mysql":
        require_server(MYSQL_URL, "pymysql")
        admin = GatewayCatalog(MYSQL_URL)
        admin.db.execute_sql(f"CREATE DATABASE {name}")
        base, _, query = MYSQL_URL.partition("?")
        url = base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
        drop = f"DROP DATABASE {name}"
    else:
        raise ValueError(f"unknown database kind {kind!r}")
    try:
        yield url
    finally:
        admin.db.execute_sql(drop)
        admin.close()
