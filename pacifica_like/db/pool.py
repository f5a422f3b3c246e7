"""At most N connections per process, each kept by the thread that opened it (public peewee API only).

Request threads keep their connection from one query to the next: checking
one in and out per query cost more than a HEAD's query (a round trip to ping
it, the SQLite pragmas run again). A thread that ends without closing its
connection gives its place back: when no place is free, the connections of
ended threads are closed first; a thread then waits up to ``pool_wait`` seconds
for a place and otherwise gets :class:`PoolExhausted`. ``close()`` really closes.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Any

import peewee


class PoolExhausted(Exception):
    """Every one of ``max_connections`` connections is held by a live thread."""

    def __init__(self, max_connections: int) -> None:
        super().__init__(f"all {max_connections} connections are held by live threads")
        self.max_connections = max_connections


class ThreadBoundConnections:
    """Mixin for a peewee database class: bounded connections, one per thread, kept until it ends."""

    def __init__(self, *args: Any, max_connections: int, pool_wait: float = 0.0, **kwargs: Any) -> None:
        self.max_connections = max_connections
        self.pool_wait = pool_wait
        self._places = threading.Condition()
        #: Thread -> the raw connection it opened; a thread object collected drops its entry.
        self._holders: weakref.WeakKeyDictionary[threading.Thread, Any] = weakref.WeakKeyDictionary()
        super().__init__(*args, **kwargs)

    def connections_held(self) -> int:
        """Return how many connections threads hold now."""
        with self._places:
            return len(self._holders)

    def _free_ended(self) -> bool:
        """Close the connections of threads that ended; True if a place was freed. Holds ``_places``."""
        ended = [thread for thread in list(self._holders) if not thread.is_alive()]
        for thread in ended:
            conn = self._holders.pop(thread, None)
            if conn is not None:
                # A dead thread's connection, perhaps broken already: nothing to save.
                with contextlib.suppress(Exception):
                    conn.close()
        return bool(ended)

    def _take_place(self, me: threading.Thread) -> None:
        """Reserve a place for ``me``, waiting up to ``pool_wait`` seconds (PoolExhausted after)."""
        deadline = time.monotonic() + self.pool_wait
        with self._places:
            while len(self._holders) >= self.max_connections and not self._free_ended():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolExhausted(self.max_connections)
                # Woken by a close(); a thread that ends does not notify, so look again soon.
                self._places.wait(min(left, 0.05))
            self._holders[me] = None  # the place is ours while connecting

    def connect(self, reuse_if_open: bool = False) -> bool:
        """Open this thread's connection, waiting for a free place (PoolExhausted after ``pool_wait``)."""
        if not self.is_closed():  # type: ignore[attr-defined]
            return super().connect(reuse_if_open)  # type: ignore[misc]
        me = threading.current_thread()
        self._take_place(me)
        try:
            opened = super().connect(reuse_if_open)  # type: ignore[misc]
        except BaseException:
            self._give_back(me)
            raise
        with self._places:
            self._holders[me] = self.connection()  # type: ignore[attr-defined]
        return opened

    def _give_back(self, thread: threading.Thread) -> None:
        with self._places:
            self._holders.pop(thread, None)
            self._places.notify()

    def close(self) -> bool:
        """Close this thread's connection and free its place."""
        try:
            return super().close()  # type: ignore[misc]
        finally:
            if self.is_closed():  # type: ignore[attr-defined]
                self._give_back(threading.current_thread())

    def close_all(self) -> None:
        """Close this thread's connection and those of every thread that ended (at shutdown)."""
        self.close()
        with self._places:
            self._free_ended()
            self._places.notify_all()


class BoundedSqliteDatabase(ThreadBoundConnections, peewee.SqliteDatabase):
    """SQLite with :class:`ThreadBoundConnections`."""


class BoundedMySQLDatabase(ThreadBoundConnections, peewee.MySQLDatabase):
    """PyMySQL with :class:`ThreadBoundConnections`."""
