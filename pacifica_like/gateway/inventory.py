"""Keep the catalog's inventory current as files are stored, moved in and deleted.

:class:`Inventory` is a guard on the backend's storage events
(``Backend.events.guard``; :func:`attach_inventory` wires it where the app is
built when the catalog is on). The file and its xattrs are the record of
truth (docs/decisions/0048-the-file-is-the-record.md); the inventory is an
index of them:

* **PUT** writes one transaction, after the upload is durable and published:
  the inventory row. The upload's hidden temp file is its in-flight marker
  (its name carries the writer's pid and start time), so no marker row is
  written before it. If the row cannot be written (the catalog fails, the
  process dies, a power cut takes the last un-synced commits) the file still
  carries its sha-256 xattr, and the next audit reports it as an upload that
  was never recorded and ``--fix`` records it: it never quarantines a file of
  ours.
* **PATCH and DELETE** keep two transactions: before the storage is touched,
  an operation marker (``GatewayCatalog.begin``), so an audit running
  meanwhile leaves the file alone (a deletion leaves no file to speak for
  it); if the catalog cannot record it, the request fails with 503 and
  nothing changes. After the storage call, the row (or its removal) and the
  end of the marker, in one transaction; if that fails, the marker stays and
  the next audit reports the change as unrecorded.

A failed or abandoned change (it ends without an event) ends its marker, if
it has one, and records nothing.

**Commit order.** Two uploads of one id can publish in one order and record
in the other; a row written from the writer's own values would then describe
a version no longer on disk. So the second transaction takes the row's lock
first and then reads the version storage holds *now* (an ``fstat`` and the
digest xattr of the file at the id's path), and records that: the record that
takes the lock last reads storage after the last publish, whatever the order
(``GatewayCatalog._settle``; docs/decisions/0002-inventory-commit-order.md).
DELETE records the same way, so an upload that published after the unlink
keeps its row. Events are delivered synchronously after the change is
durable, so the record is written before the request is answered, as before.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from pacifica_like.core.errors import ArchiveError, FileNotInArchive, StorageUnavailable
from pacifica_like.gateway.catalog import GatewayCatalog, StorageProbe, StoredVersion
from pacifica_like.storage.contract import (
    Backend,
    Deleted,
    Finisher,
    Intent,
    MetricSample,
    Moved,
    StorageEvent,
    Stored,
    read_sha256,
)

log = logging.getLogger("pacifica_like.gateway.inventory")

#: Changes that write no operation marker: an upload's temp file marks it in flight, and its
#: published file carries the xattrs an audit records it from.
UNMARKED_VERBS = frozenset({"PUT"})

#: Test seam: called with (file id, bytes stored) after an upload is published and before it is
#: recorded, in the serving process. None in production; tests install a gate here (through
#: ``sitecustomize`` in a live server) to make two uploads record in the other order.
before_record: Callable[[int, int], None] | None = None


def stored_version(path: str) -> StoredVersion | None:
    """Return the size, mtime and digest xattr of the file at ``path``, from one open inode.

    None when no regular file is there. Raises OSError when it cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return StoredVersion(st.st_size, st.st_mtime, read_sha256(fd))
    finally:
        os.close(fd)


def storage_probe(backend: Backend, file_id: int, ours: StoredVersion | None = None) -> StorageProbe | None:
    """Return the probe that reads the version ``backend`` holds for ``file_id`` now (None: cannot).

    Reads the disk file at ``backend.path(file_id)`` (every backend here keeps its
    files there). Where no disk file is, ``backend.status`` decides (a tape
    file may be released to tape only). ``ours``: the version this process just
    stored; its digest stands in where the filesystem keeps no xattrs.
    """
    path_of = getattr(backend, "path", None)
    if path_of is None:
        return None
    path = path_of(file_id)

    def probe() -> StoredVersion | None:
        try:
            found = stored_version(path)
            if found is None:
                try:
                    status = backend.status(file_id)
                except FileNotInArchive:
                    return None
                return StoredVersion(status.size, status.mtime, status.sha256)
        except (OSError, ArchiveError) as exc:
            log.warning(
                "file %d: cannot read what storage holds (%s); recording the upload as sent", file_id, exc
            )
            return ours
        # No xattrs here: our digest stands for the file we wrote (utime() round-trips through ns).
        same = ours is not None and found.size == ours.size and abs(found.mtime - ours.mtime) < 1e-6
        if found.sha256 is None and same:
            return ours
        return found

    return probe


def _begin(catalog: GatewayCatalog, file_id: int, verb: str) -> int | None:
    """Write the operation marker (PUT: check the connection); 503 without the database's name if it fails.

    The detailed error (URL without password, driver message) is the cause, which
    the error log records; clients learn only that the request can be retried.
    """
    try:
        if verb in UNMARKED_VERBS:
            catalog.connect()
            return None
        return catalog.begin(file_id, verb)
    except StorageUnavailable as exc:
        raise StorageUnavailable(
            f"the gateway's catalog database is unavailable, so {verb} /{file_id} was not carried out; "
            "nothing was changed, try again later"
        ) from exc


def _abandon(catalog: GatewayCatalog, token: int, file_id: int) -> None:
    try:
        catalog.abandon(token)
    except ArchiveError as exc:
        # Harmless for the data: an audit treats the marker as in flight until it is old, then clears it.
        log.warning("could not end the operation marker of file %d: %s", file_id, exc)


class Inventory:
    """The catalog's inventory of ``backend``'s files, kept by guarding its storage changes."""

    def __init__(self, backend: Backend, catalog: GatewayCatalog) -> None:
        self.backend = backend
        self.catalog = catalog

    def __call__(self, intent: Intent) -> Finisher:
        """Return the finisher of ``intent``; PATCH and DELETE write their marker first (503 if not)."""
        token = _begin(self.catalog, intent.file_id, intent.verb)
        return lambda event: self.finish(intent, token, event)

    def finish(self, intent: Intent, token: int | None, event: StorageEvent | None) -> None:
        """Record what storage holds after the change (or end the marker of a change that did nothing)."""
        file_id = intent.file_id
        if not isinstance(event, (Deleted, Stored)):  # nothing changed (None: the change failed)
            if token is not None:
                _abandon(self.catalog, token, file_id)
            return
        if isinstance(event, Deleted):
            try:
                self.catalog.finish_deleted(token, file_id, storage_probe(self.backend, file_id))
            except ArchiveError as exc:
                log.error(
                    "file %d was deleted but the inventory still lists it; the next audit will report it "
                    "as an unrecorded deletion: %s",
                    file_id,
                    exc,
                )
            return
        if intent.verb == "PUT" and before_record is not None:
            before_record(file_id, event.size)
        ours = StoredVersion(event.size, event.mtime, event.sha256)
        probe = storage_probe(self.backend, file_id, ours)
        try:
            self.catalog.finish_stored(token, file_id, event.size, event.mtime, event.sha256, probe)
        except ArchiveError as exc:
            # The bytes are durable and published: the change succeeded. Say loudly what drifted,
            # and reconnect before the next upload (refused while the database stays down).
            self.catalog.close()
            how = "moved in" if isinstance(event, Moved) else "stored"
            log.error(
                "file %d is %s (%d bytes) but the inventory did not record it; the next audit "
                "will report it as an unrecorded upload: %s",
                file_id,
                how,
                event.size,
                exc,
            )

    def check_ready(self) -> None:
        """Raise StorageUnavailable unless the catalog database takes a write now."""
        self.catalog.check_ready()

    def audit_metrics(self) -> list[MetricSample]:
        """Return the latest recorded result of each audit name, from the catalog."""
        samples: list[MetricSample] = []
        for run in self.catalog.latest_audits():

            def add(name: str, value: float, text: str, run: Any = run) -> None:
                samples.append(MetricSample(name, value, text, "gauge", (("audit", run.name),)))

            add("audit_last_finished_timestamp_seconds", run.finished_at, "When the audit last finished.")
            add("audit_last_ok", 1.0 if run.verdict == "ok" else 0.0, "1 if the last audit found no drift.")
            add("audit_last_missing_files", run.missing, "Missing files in the last audit (-1: not judged).")
            add("audit_last_orphan_files", run.orphans, "Orphan files in the last audit.")
            add("audit_last_listed_files", run.listed, "Files the last audit listed in storage.")
        return samples


def attach_inventory(backend: Backend, catalog_url: str | None) -> Inventory | None:
    """Have the catalog at ``catalog_url`` record ``backend``'s changes; None when there is no catalog.

    Wired once per backend and catalog (a second app built over the same
    backend reuses the first's inventory). The catalog's connection closes
    with the backend.
    """
    if catalog_url is None:
        return None
    for guard in backend.events.guards:
        if isinstance(guard, Inventory) and guard.catalog.url == catalog_url:
            return guard
    inventory = Inventory(backend, GatewayCatalog(catalog_url))
    backend.events.guard(inventory, close=inventory.catalog.close)
    return inventory
