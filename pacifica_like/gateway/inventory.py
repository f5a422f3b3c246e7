"""Keep the catalog's inventory current as files are stored, moved in and deleted.

:class:`InventoryBackend` wraps the real backend (``build_app`` installs it when
the catalog is on) and delegates every call to it. Around the three calls that
change what is stored (``open_writer``/``commit``, ``adopt``, ``delete``) it
writes two small transactions:

1. before the storage is touched: an operation marker (``GatewayCatalog.begin``),
   so an audit running meanwhile leaves the file alone. If the catalog cannot
   record it, the request fails with 503 and nothing is stored: refusing
   before storing never creates drift;
2. after the storage call succeeded: the inventory row (or its removal) and
   the end of the marker, in one transaction. If the catalog fails *here*, the
   file is already stored and durable, so the client still gets its success;
   the error is logged, the marker stays, and the next audit reports the file
   as an orphan whose upload was never recorded (and ``--fix`` records it
   rather than quarantining it).

A failed or abandoned upload ends its marker and records nothing.

**Commit order.** Two uploads of one id can publish in one order and record
in the other; a row written from the writer's own values would then describe
a version no longer on disk. So the second transaction takes the row's lock
first and then reads the version storage holds *now* (an ``fstat`` and the
digest xattr of the file at the id's path), and records that: the record that
takes the lock last reads storage after the last publish, whatever the order
(``GatewayCatalog._settle``; docs/decisions/0002-inventory-commit-order.md).
DELETE records the same way, so an upload that published after the unlink
keeps its row.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from pacifica_like.core.errors import ArchiveError, FileNotInArchive, StorageUnavailable
from pacifica_like.gateway.catalog import GatewayCatalog, StorageProbe, StoredVersion
from pacifica_like.storage.contract import (
    Backend,
    ExpectedDigest,
    FileStatus,
    MetricSample,
    Reader,
    TapePosition,
    VolumeSession,
    Writer,
    read_sha256,
)

log = logging.getLogger("pacifica_like.gateway.inventory")

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


class InventoryWriter(Writer):
    """An upload through the real backend's writer whose commit is recorded in the inventory."""

    def __init__(
        self,
        inner: Writer,
        catalog: GatewayCatalog,
        file_id: int,
        mtime: float,
        token: int,
        backend: Backend | None = None,
    ) -> None:
        self.inner = inner
        self._catalog = catalog
        self._file_id = file_id
        self._mtime = mtime
        self._token: int | None = token
        self._backend = backend

    def write(self, chunk: bytes) -> None:
        """Pass ``chunk`` to the real writer."""
        self.inner.write(chunk)

    def commit(self) -> int:
        """Publish through the real writer, then record the file; return bytes stored."""
        stored = self.inner.commit()
        self.sha256 = self.inner.sha256
        token, self._token = self._token, None
        assert token is not None
        if before_record is not None:
            before_record(self._file_id, stored)
        ours = StoredVersion(stored, self._mtime, self.sha256)
        probe = storage_probe(self._backend, self._file_id, ours) if self._backend is not None else None
        try:
            self._catalog.finish_stored(token, self._file_id, stored, self._mtime, self.sha256, probe)
        except ArchiveError as exc:
            # The bytes are durable and published: the upload succeeded. Say loudly what drifted.
            log.error(
                "file %d is stored (%d bytes) but the inventory did not record it; the next audit "
                "will report it as an unrecorded upload: %s",
                self._file_id,
                stored,
                exc,
            )
        return stored

    def discard(self) -> None:
        """Drop the real writer's temp file; end the marker of an upload that stored nothing."""
        try:
            self.inner.discard()
        finally:
            token, self._token = self._token, None
            if token is not None:
                _abandon(self._catalog, token, self._file_id)

    def __getattr__(self, name: str) -> Any:
        # Attributes of the real writer (bytes_written, final_path...) stay readable.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _begin(catalog: GatewayCatalog, file_id: int, verb: str) -> int:
    """Write the operation marker; StorageUnavailable (503) without the database's name if it fails.

    The detailed error (URL without password, driver message) is the cause, which
    the error log records; clients learn only that the request can be retried.
    """
    try:
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


class InventoryBackend(Backend):
    """The real backend, with every stored, moved-in and deleted file recorded in the catalog.

    Reads (``open_reader``, ``status``, ``stage``, ``list_ids``, ``metrics_snapshot``)
    go straight to the real backend; so does any attribute this class does not
    define (``library`` of the tape backend, for example). ``check_ready`` asks
    the real backend and then the catalog database.
    """

    def __init__(self, inner: Backend, catalog: GatewayCatalog) -> None:
        super().__init__(inner.settings)
        self.inner = inner
        self.inventory = catalog

    @property
    def name(self) -> str:  # type: ignore[override]
        """The real backend's registry name."""
        return self.inner.name

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def open_reader(self, file_id: int) -> Reader:
        """Open through the real backend."""
        return self.inner.open_reader(file_id)

    def status(self, file_id: int) -> FileStatus:
        """Report through the real backend."""
        return self.inner.status(file_id)

    def stage(self, file_id: int) -> bool:
        """Stage through the real backend (no change to the inventory)."""
        return self.inner.stage(file_id)

    def list_ids(self, *args: Any, **kwargs: Any) -> Iterator[int]:
        """List through the real backend."""
        return self.inner.list_ids(*args, **kwargs)

    # The contract's optional methods have defaults in Backend, so __getattr__ would never
    # reach the real backend's versions: pass them on explicitly.
    def tape_positions(self, file_ids: Iterable[int]) -> dict[int, TapePosition]:
        """Look up tape positions through the real backend."""
        return self.inner.tape_positions(file_ids)

    def localities(self, file_ids: Iterable[int]) -> dict[int, str]:
        """Report localities through the real backend."""
        return self.inner.localities(file_ids)

    def open_volume(self, vsn: str) -> contextlib.AbstractContextManager[VolumeSession]:
        """Hold a volume through the real backend."""
        return self.inner.open_volume(vsn)

    def open_writer(self, file_id: int, mtime: float, expect: Sequence[ExpectedDigest] = ()) -> Writer:
        """Open the real writer (which may refuse: write-once), then mark the upload as in flight.

        StorageUnavailable (503) when the catalog cannot record the marker; nothing is stored.
        """
        inner = self.inner.open_writer(file_id, mtime, expect)
        try:
            token = _begin(self.inventory, file_id, "PUT")
        except BaseException:
            inner.discard()
            raise
        return InventoryWriter(inner, self.inventory, file_id, mtime, token, self.inner)

    def adopt(self, file_id: int, source_path: str) -> int:
        """Move a server-side file in through the real backend and record it."""
        token = _begin(self.inventory, file_id, "PATCH")
        try:
            size = self.inner.adopt(file_id, source_path)
        except BaseException:
            _abandon(self.inventory, token, file_id)
            raise
        try:
            # The digest and mtime the backend recorded with the file it now holds.
            status = self.inner.status(file_id)
            ours = StoredVersion(size, status.mtime, status.sha256)
            probe = storage_probe(self.inner, file_id, ours)
            self.inventory.finish_stored(token, file_id, size, status.mtime, status.sha256, probe)
        except ArchiveError as exc:
            log.error(
                "file %d was moved in (%d bytes) but the inventory did not record it; the next audit "
                "will report it as an unrecorded upload: %s",
                file_id,
                size,
                exc,
            )
        return size

    def delete(self, file_id: int) -> None:
        """Delete through the real backend, then drop the file from the inventory."""
        token = _begin(self.inventory, file_id, "DELETE")
        try:
            self.inner.delete(file_id)
        except BaseException:
            _abandon(self.inventory, token, file_id)
            raise
        try:
            self.inventory.finish_deleted(token, file_id, storage_probe(self.inner, file_id))
        except ArchiveError as exc:
            log.error(
                "file %d was deleted but the inventory still lists it; the next audit will report it "
                "as an unrecorded deletion: %s",
                file_id,
                exc,
            )

    def check_ready(self) -> None:
        """Raise StorageUnavailable unless the real backend and the catalog database both answer."""
        self.inner.check_ready()
        self.inventory.check_ready()

    def metrics_snapshot(self) -> list[MetricSample]:
        """Return the real backend's metrics."""
        return self.inner.metrics_snapshot()

    def audit_metrics(self) -> list[MetricSample]:
        """Return the latest recorded result of each audit name, from the catalog."""
        samples: list[MetricSample] = []
        for run in self.inventory.latest_audits():

            def add(name: str, value: float, text: str, run: Any = run) -> None:
                samples.append(MetricSample(name, value, text, "gauge", (("audit", run.name),)))

            add("audit_last_finished_timestamp_seconds", run.finished_at, "When the audit last finished.")
            add("audit_last_ok", 1.0 if run.verdict == "ok" else 0.0, "1 if the last audit found no drift.")
            add("audit_last_missing_files", run.missing, "Missing files in the last audit (-1: not judged).")
            add("audit_last_orphan_files", run.orphans, "Orphan files in the last audit.")
            add("audit_last_listed_files", run.listed, "Files the last audit listed in storage.")
        return samples

    def close(self) -> None:
        """Close the real backend and this thread's catalog connection."""
        try:
            self.inner.close()
        finally:
            self.inventory.close()


def with_inventory(backend: Backend, catalog_url: str | None) -> Backend:
    """Return ``backend`` wrapped so the catalog at ``catalog_url`` records changes (as is when None)."""
    if catalog_url is None or isinstance(backend, InventoryBackend):
        return backend
    return InventoryBackend(backend, GatewayCatalog(catalog_url))
