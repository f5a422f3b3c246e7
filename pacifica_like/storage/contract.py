"""The backend contract, and helpers every backend shares.

Plugin API (what a backend implements and the web layer calls):

* :class:`Backend` - one instance per process, shared by all request threads,
  holding no per-request state. It hands out per-request handles:
* :class:`Reader` - an open, seekable view of one stored file and its status;
* :class:`Writer` - a pending upload that becomes visible only on ``commit()``;
* :class:`FileStatus` - what HEAD reports, as a frozen value;
* :class:`MetricSample` - one value a backend reports when ``/metrics`` is scraped;
* :class:`TapePosition` - where a file that is only on tape would be recalled from
  (backends with tape behind the disk; the bulk-staging scheduler orders by it);
* :class:`VolumeSession` - a drive held with one volume mounted, for recalls in
  tape order (:class:`HoldsVolumes`);
* capability protocols, checked with ``isinstance`` where a caller needs more
  than the contract: :class:`TapeManaged` (migrate, release, recall, verify),
  :class:`KeepsSideband` (a sideband database kept by the backend itself);
* storage events (:class:`StorageEvent` and its kinds: :class:`Stored`,
  :class:`Replaced`, :class:`Moved`, :class:`Deleted`, :class:`Migrated`,
  :class:`Released`, :class:`Recalled`, :class:`CopyBad`), emitted on
  ``Backend.events`` (:class:`EventBus`) after each change is durable, to the
  subscribers wired when the app or CLI is built.

Helpers (not part of the API, shared so every backend commits the same way):
:class:`AtomicFileWriter`, :class:`UploadDigests`, :class:`FileReader`, :func:`translate_os_errors`,
:func:`read_sha256`, :func:`read_checksums`, :func:`publish` (over
:mod:`pacifica_like.core.durable`). Opening a PATCH source safely lives in
:mod:`pacifica_like.storage.safeopen`.

Backends raise only :mod:`pacifica_like.core.errors` types. OS errors are translated
in one place, :func:`translate_os_errors`, keeping the cause.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import hmac
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from pacifica_like.core import checksums, durable
from pacifica_like.core.config import ConfigError, Settings
from pacifica_like.core.errors import (
    ArchiveError,
    Conflict,
    DigestMismatch,
    FileNotInArchive,
    Forbidden,
    InsufficientStorage,
    InvalidRequest,
    StorageUnavailable,
)

log = logging.getLogger("pacifica_like.storage")

#: Extended attribute holding the raw sha-256 of a stored file's bytes.
SHA256_XATTR = "user.pacifica_like.sha256"
#: The grid checksums (adler32, md5) recorded beside it (:func:`pacifica_like.core.checksums.encode_grid`).
CHECKSUMS_XATTR = "user.pacifica_like.checksums"
#: Bytes moved per read/write call; large enough for syscall cost to vanish,
#: small enough that memory stays flat whatever the file size.
CHUNK_SIZE = 1 << 20


#: Dirty bytes an upload accumulates before we ask the kernel to start writing them.
WRITEBACK_STEP = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int], None]:
    """Bind Linux's sync_file_range(2); elsewhere return a no-op.

    Python's os module lacks it. It starts write-out of a range without waiting,
    so a large upload streams to disk while it arrives and the commit's fsync
    finds little left to flush (instead of all of it at once).
    """
    name = ctypes.util.find_library("c")
    function = getattr(ctypes.CDLL(name, use_errno=True), "sync_file_range", None) if name else None
    if function is None:
        return lambda fd, offset, length: None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, length: int) -> None:
        # Advisory: a failure here only means the final fsync does all the work.
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    return start_writeback


start_writeback = _load_sync_file_range()


#: Called by ``Backend.list_ids`` with where the listing failed and the error.
ListingErrorHandler = Callable[[str, ArchiveError], None]
#: Called by a listing with the absolute path of each upload temp file it passes.
TempFileHandler = Callable[[str], object]


class ExpectedDigest(Protocol):
    """A client's claim about the upload (see ``pacifica_like.core.httpfields``)."""

    algorithm: str
    value: bytes
    header: str


@dataclass(frozen=True)
class ArchiveCopy:
    """One tape copy of a file's current version, as HEAD lists it (``copy:vsn:position``)."""

    copy: int
    vsn: str
    position: int


@dataclass(frozen=True)
class FileStatus:
    """What the archive knows about one stored file, as HEAD reports it.

    ``bytes_per_level`` is (bytes on disk, bytes on tape); ``media`` is
    ``"disk"`` unless the data is only on tape; ``relpath`` is relative to the
    archive prefix, never an absolute server path; ``sha256`` is the digest
    recorded at ingest (None when the storage could not record one); ``state``
    is the HSM state (``REGULAR``, ``DUAL``, ``OFFLINE``, ``UNMIGRATING``) on
    backends with tape behind the disk, None elsewhere; ``copies`` lists the
    archive copies of this version where the backend knows them (sideband), else None.
    """

    size: int
    mtime: float
    ctime: float
    bytes_per_level: tuple[int, ...]
    media: str
    relpath: str
    sha256: bytes | None = None
    state: str | None = None
    copies: tuple[ArchiveCopy, ...] | None = None


@dataclass(frozen=True)
class MetricSample:
    """One value a backend reports at scrape time (see :meth:`Backend.metrics_snapshot`).

    ``name`` is a Prometheus-style name without the service prefix
    (``tape_mounts``); ``kind`` is ``"counter"`` for a value that only grows
    (mounts, bytes read; exposed with a ``_total`` suffix) or ``"gauge"``;
    ``labels`` tell apart the samples of one name (drive, volume). Every sample
    of one name carries the same ``help``, ``kind`` and label names.
    """

    name: str
    value: float
    help: str
    kind: str = "gauge"
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, order=True)
class TapePosition:
    """Where the recall of a file that is only on tape reads from.

    Ordered by (``vsn``, ``position``): the order a drive reads a volume in one
    pass. ``position`` is a byte offset on the volume, ``size`` the file's bytes.
    """

    vsn: str
    position: int
    file_id: int
    size: int


# -- storage events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageEvent:
    """Something the storage changed and made durable, about one file id."""

    file_id: int


@dataclass(frozen=True)
class Stored(StorageEvent):
    """An upload created the file (its publish found no file at the path): size, sha256 and mtime."""

    size: int
    mtime: float
    sha256: bytes | None


@dataclass(frozen=True)
class Replaced(Stored):
    """An upload replaced the file's previous version on disk."""


@dataclass(frozen=True)
class Moved(Stored):
    """A file already on the server was moved in (PATCH); it may have replaced a previous version."""


@dataclass(frozen=True)
class Deleted(StorageEvent):
    """The file was removed (disk copy unlinked, tape copies retired)."""


@dataclass(frozen=True)
class Migrated(StorageEvent):
    """A tape copy of the file's current version was written at ``position`` of volume ``vsn``."""

    vsn: str
    position: int


@dataclass(frozen=True)
class Released(StorageEvent):
    """The disk copy was dropped; the verified tape copy at ``position`` of ``vsn`` keeps the file."""

    vsn: str
    position: int


@dataclass(frozen=True)
class Recalled(StorageEvent):
    """The file was copied back from tape to disk."""


@dataclass(frozen=True)
class CopyBad(StorageEvent):
    """A tape copy (at ``position`` of ``vsn``) failed its checksum and no longer counts."""

    vsn: str
    position: int


@dataclass(frozen=True)
class Intent:
    """A change about to be made (before storage is touched): ``verb`` PUT, PATCH or DELETE of ``file_id``."""

    file_id: int
    verb: str


#: A subscriber: called with each event, in the thread that made the change.
Subscriber = Callable[[StorageEvent], None]
#: Told of the event that ended a change (None: the change failed or was abandoned; nothing changed).
Finisher = Callable[[StorageEvent | None], None]
#: A guard: called with each Intent before storage is touched; raising refuses the change (the
#: request fails and nothing is stored); else returns the Finisher of that one change.
Guard = Callable[[Intent], Finisher]


class Change:
    """One change under way: ended by :meth:`done` (with its event) or :meth:`abandon`.

    A ``with`` block abandons it on leaving unless :meth:`done` was called.
    """

    def __init__(self, bus: EventBus, finishers: list[Finisher]) -> None:
        self._bus = bus
        self._finishers = finishers
        self._open = True

    def done(self, event: StorageEvent) -> None:
        """The change is durable: tell the guards' finishers, then every subscriber."""
        if not self._open:
            return
        self._open = False
        self._bus.finish(self._finishers, event)
        self._bus.emit(event)

    def abandon(self) -> None:
        """Nothing was changed: tell the guards' finishers (None); safe to call twice."""
        if self._open:
            self._open = False
            self._bus.finish(self._finishers, None)

    def __enter__(self) -> Change:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abandon()


class EventBus:
    """Deliver storage events to the subscribers and guards wired when the app or CLI is built.

    Delivery is synchronous, in subscription order, after the change is
    durable and before the storage call returns: when ``PUT`` answers 201,
    every subscriber has seen the event. The change cannot be undone, so a
    subscriber (or finisher) that raises does not fail the call: its error is
    logged, with the event, and the next ones still run; each keeps its own
    record true later (the inventory's audit, ``sideband load``).

    Guards (:meth:`guard`) also hear of a PUT, PATCH or DELETE *before* it
    touches storage (:meth:`begin`), and may refuse it by raising: the
    inventory writes its operation marker there (docs/decisions/0002).
    """

    def __init__(self) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()
        self._guards: tuple[Guard, ...] = ()
        self._closers: tuple[Callable[[], None], ...] = ()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add ``callback``; return a function that removes it again."""
        self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe

    def guard(self, callback: Guard, close: Callable[[], None] | None = None) -> Callable[[], None]:
        """Add a guard (see the class docstring); ``close`` runs when the backend closes."""
        self._guards = (*self._guards, callback)
        if close is not None:
            self._closers = (*self._closers, close)

        def unguard() -> None:
            self._guards = tuple(g for g in self._guards if g is not callback)

        return unguard

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        """The subscribers, in delivery order."""
        return self._subscribers

    @property
    def guards(self) -> tuple[Guard, ...]:
        """The guards, in the order they are asked."""
        return self._guards

    def begin(self, file_id: int, verb: str) -> Change:
        """Ask every guard about a change of ``file_id``; raises (refusing it) as a guard does."""
        finishers: list[Finisher] = []
        if self._guards:
            intent = Intent(file_id, verb)
            try:
                for guard in self._guards:
                    finishers.append(guard(intent))
            except BaseException:
                self.finish(finishers, None)
                raise
        return Change(self, finishers)

    def finish(self, finishers: list[Finisher], event: StorageEvent | None) -> None:
        """Call each finisher with ``event``; log, never raise, what one of them raises."""
        for finisher in finishers:
            try:
                finisher(event)
            except Exception:  # the change is durable (or nothing changed): never fail the call here
                log.exception("storage event %r: finisher %r failed", event, finisher)

    def emit(self, event: StorageEvent) -> None:
        """Hand ``event`` to every subscriber; log, never raise, what one of them raises."""
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:  # the change is durable: a subscriber's failure may not fail it
                log.exception("storage event %r: subscriber %r failed", event, callback)

    def close(self) -> None:
        """Release what the guards hold (their ``close``), once; called by ``Backend.close``."""
        closers, self._closers = self._closers, ()
        for close in closers:
            try:
                close()
            except Exception:
                log.exception("closing storage event guard %r failed", close)


#: What archiveinfo reports per file (the WLCG Tape REST API's localities).
LOCALITIES = ("DISK", "TAPE", "DISK_AND_TAPE", "LOST", "NONE", "UNAVAILABLE")


class VolumeSession(abc.ABC):
    """A drive held with one volume mounted (see :class:`HoldsVolumes`); one thread uses it."""

    @abc.abstractmethod
    def recall(self, file_id: int) -> bool | None:
        """Copy ``file_id`` from this volume to disk.

        Returns True when it was recalled now, False when it was on disk
        already, and None when another process is recalling it (try again
        later: waiting here could need the drive this session holds). Raises
        ArchiveError when the recall failed.
        """


class StagingSession(VolumeSession):
    """The session of a backend without drives to hold: each file is staged on its own."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def recall(self, file_id: int) -> bool | None:
        """Stage the file; None while the backend reports it still under way."""
        return None if not self.backend.stage(file_id) else True


class Reader(abc.ABC):
    """An open stored file. The web layer closes it when the response ends."""

    status: FileStatus

    @property
    def size(self) -> int:
        """Bytes in the file as opened (a concurrent overwrite does not change it)."""
        return self.status.size

    @abc.abstractmethod
    def read(self, size: int = CHUNK_SIZE) -> bytes:
        """Return up to ``size`` bytes; ``b""`` at end of file."""

    @abc.abstractmethod
    def seek(self, offset: int) -> None:
        """Move to ``offset`` bytes from the start."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the handle; safe to call twice."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Writer(abc.ABC):
    """A pending upload: nothing is visible at the id until ``commit()``.

    Leaving the ``with`` block without committing discards every byte written,
    so an error anywhere (client gone, short body, digest mismatch, full disk)
    leaves the previous version of the file untouched.
    """

    sha256: bytes | None = None
    #: After commit: every digest computed while the bytes streamed (:data:`checksums.KEPT`).
    checksums: dict[str, bytes] | None = None

    @abc.abstractmethod
    def write(self, chunk: bytes) -> None:
        """Append ``chunk`` to the pending file."""

    @abc.abstractmethod
    def commit(self) -> int:
        """Verify, make durable and publish the file; return bytes stored."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop the pending file if it was not committed; safe to call twice."""

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


class Backend(abc.ABC):
    """The storage contract the web layer and the maintenance CLI rely on.

    One instance serves every thread of a process, so implementations keep
    no per-request state on ``self``; per-request state lives in the handles.
    """

    #: The registry name (``pacifica_like.storage.registry.REGISTRY``).
    name: ClassVar[str]

    def __init__(self, settings: Settings, events: EventBus | None = None) -> None:
        self.settings = settings
        #: Where the backend announces each change it made durable (see :class:`EventBus`).
        self.events = events if events is not None else EventBus()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Have ``callback`` told of every change this backend makes; return the unsubscribe function."""
        return self.events.subscribe(callback)

    @abc.abstractmethod
    def open_reader(self, file_id: int) -> Reader:
        """Open a stored file for reading; FileNotInArchive if there is none."""

    @abc.abstractmethod
    def open_writer(
        self, file_id: int, mtime: float, expect: Sequence[ExpectedDigest] = (), exclusive: bool = False
    ) -> Writer:
        """Start an upload that will store ``file_id`` with modification time ``mtime``.

        ``expect`` lists digests the client claimed; commit() raises
        DigestMismatch unless the bytes match all of them. Raises Conflict up
        front when the archive is write-once (or ``exclusive``: a caller that may
        only create) and the id is taken, and at commit when a file appeared meanwhile.
        """

    @abc.abstractmethod
    def status(self, file_id: int) -> FileStatus:
        """Return the status of a stored file; FileNotInArchive if there is none."""

    def checksums(self, file_id: int) -> dict[str, bytes]:
        """Return the digests recorded for the file's current version, by hashlib name.

        Read only when a client asks (``Want-Digest``, PROPFIND), so HEAD and
        GET pay nothing for them. Backends that record the grid's adler32 and
        md5 return those beside the sha-256; a version recorded before they
        were kept has only what it has. FileNotInArchive if there is no file.
        """
        sha256 = self.status(file_id).sha256
        return {"sha256": sha256} if sha256 is not None else {}

    @classmethod
    def preflight(cls, settings: Settings) -> None:
        """Check what the backend needs outside the settings (libraries, directories).

        Called where a service starts (the uWSGI master, ``check-config``), so a
        broken deployment fails there naming the path. Raises ConfigError.
        """
        return None

    @abc.abstractmethod
    def stage(self, file_id: int) -> bool:
        """Make the file's bytes readable from disk.

        Returns True when they are on disk now, False when a recall was started
        (or is under way) and has not finished within the backend's wait.
        """

    @abc.abstractmethod
    def adopt(self, file_id: int, source_path: str) -> int:
        """Move a file already on the server into the archive (PATCH); return its size."""

    def plan_adopt(self, file_id: int, source_path: str) -> dict[str, Any]:
        """Say what :meth:`adopt` would do (PATCH ``?dryRun=true``), changing nothing.

        The source is opened and checked as :meth:`adopt` opens it (the same
        400/403/404 answers), and a write-once archive refuses a taken id (409).
        Returns ``source``, ``size``, ``replaces`` (a file has the id now) and
        ``method``: ``rename`` when the source lives on the archive's filesystem
        (adopt still copies if another process has it open at that moment), else
        ``copy``.
        """
        from pacifica_like.storage import safeopen  # a leaf module; only PATCH needs it

        archive = self.settings.archive
        try:
            self.status(file_id)
            replaces = True
        except FileNotInArchive:
            replaces = False
        with safeopen.open_adopt_source(source_path, archive.patch_roots) as source:
            if replaces and archive.write_once:
                raise Conflict(f"file {file_id} already exists and the archive is write-once")
            method = "copy"
            path_of = getattr(self, "path", None)
            if path_of is not None:
                # The nearest directory that exists on the way to the file's place.
                place = os.path.dirname(path_of(file_id))
                while place and not os.path.isdir(place):
                    place = os.path.dirname(place)
                if place and os.stat(place).st_dev == source.stat.st_dev:
                    method = "rename"
            return {
                "source": source.path,
                "size": source.stat.st_size,
                "replaces": replaces,
                "method": method,
            }

    @abc.abstractmethod
    def delete(self, file_id: int) -> None:
        """Remove a stored file; FileNotInArchive if there is none."""

    @abc.abstractmethod
    def list_ids(
        self, on_error: ListingErrorHandler | None = None, on_temp: TempFileHandler | None = None
    ) -> Iterator[int]:
        """Yield the id of every stored file, in no particular order (for audits).

        ``on_error(where, error)`` is called for each part of the storage that
        cannot be listed (an unreadable directory: ``where`` is its path), and the
        listing goes on without it; without a handler the error is raised.
        ``on_temp(path)`` is called with the absolute path of each upload temp
        file the listing passes (in flight, or left by a writer that died).
        """

    def close(self) -> None:
        """Release process-wide resources (connections, libraries), and what the event guards hold.

        Backends that hold resources override it and call ``super().close()``.
        """
        self.events.close()

    def check_ready(self) -> None:
        """Raise StorageUnavailable, with the reason, unless the backend can serve requests now.

        Called by ``GET /ready`` (a readiness probe, so it must stay cheap and
        write nothing). The default repeats :meth:`preflight` (for the tape
        backend: a fresh catalog connection and query, the stager library, the
        library directory), so storage that vanished or broke after start is
        reported. Backends with a disk tier add its check
        (:meth:`pacifica_like.storage.diskcache.DiskCache.check_ready`).
        """
        try:
            type(self).preflight(self.settings)
        except ConfigError as exc:
            raise StorageUnavailable(str(exc)) from exc

    def localities(self, file_ids: Iterable[int]) -> dict[int, str]:
        """Return where each file's bytes are: one of :data:`LOCALITIES` per id.

        DISK, TAPE or DISK_AND_TAPE; LOST when the archive knows the file but
        cannot produce its bytes (every tape copy damaged); NONE when there is
        no such file; UNAVAILABLE when the storage cannot tell now. The default
        asks :meth:`status` per id; backends answer in batches where they can.
        """
        found: dict[int, str] = {}
        for file_id in file_ids:
            try:
                status = self.status(file_id)
            except FileNotInArchive:
                found[file_id] = "NONE"
            except ArchiveError:
                found[file_id] = "UNAVAILABLE"
            else:
                on_disk, on_tape = status.media == "disk", sum(status.bytes_per_level[1:]) > 0
                found[file_id] = "DISK_AND_TAPE" if on_disk and on_tape else "DISK" if on_disk else "TAPE"
        return found

    def metrics_snapshot(self) -> list[MetricSample]:
        """Return the backend's own metrics, read now from shared state; none by default.

        Called on every ``GET /metrics`` in whichever process serves it, so the
        values must come from state every process shares (a catalog database),
        never from per-process memory.
        """
        return []


# -- capabilities beyond the contract ----------------------------------------------------------


@runtime_checkable
class TapeManaged(Protocol):
    """A backend with a tape library behind its disk cache: migrate, release, recall, verify.

    Checked with ``isinstance`` (or ``issubclass`` on a class) by the tape
    CLI, the image's entrypoint and the tests. Such a backend also has
    ``library`` (the tape library), ``catalog`` (its catalog) and ``tape``
    (the ``[tape]`` settings), which :mod:`pacifica_like.storage.tape.operations` uses.
    """

    def path(self, file_id: int) -> str:
        """Return the disk cache path of ``file_id``."""

    def state(self, file_id: int) -> str:
        """Return the file's HSM state (REGULAR, DUAL, OFFLINE, UNMIGRATING)."""

    def recall(self, file_id: int, copy: Any = None, drive: Any = None) -> bool:
        """Copy an offline file back to disk; False when it was on disk."""

    def release(self, file_id: int) -> Any:
        """Drop the disk copy of a file with a verified tape copy."""

    def migration_source(self, file_id: int) -> tuple[int, os.stat_result, bytes] | None:
        """Open a REGULAR file for migration."""


@runtime_checkable
class LocatesOnTape(Protocol):
    """A backend that can say where an offline file would be recalled from.

    Bulk staging orders its queue by these positions; a backend without tape
    has nothing to recall (:func:`tape_positions` answers empty for it).
    """

    def tape_positions(self, file_ids: Iterable[int]) -> dict[int, TapePosition]:
        """Return where each of ``file_ids`` that is only on tape would be recalled from.

        Ids on disk, unknown ids and ids whose every tape copy is damaged are left out.
        """


@runtime_checkable
class HoldsVolumes(Protocol):
    """A backend with drives to hold: a volume's files are recalled inside one mount."""

    def open_volume(self, vsn: str) -> contextlib.AbstractContextManager[VolumeSession]:
        """Hold a drive with volume ``vsn`` mounted while the caller recalls files from it.

        Raises StorageUnavailable when the volume cannot be mounted.
        """


def tape_positions(backend: Backend, file_ids: Iterable[int]) -> dict[int, TapePosition]:
    """Ask a :class:`LocatesOnTape` backend for tape positions; any other has none."""
    return backend.tape_positions(file_ids) if isinstance(backend, LocatesOnTape) else {}


def open_volume(backend: Backend, vsn: str) -> contextlib.AbstractContextManager[VolumeSession]:
    """Hold ``vsn`` on a :class:`HoldsVolumes` backend; any other stages each file on its own."""
    if isinstance(backend, HoldsVolumes):
        return backend.open_volume(vsn)
    return contextlib.nullcontext(StagingSession(backend))


@runtime_checkable
class KeepsSideband(Protocol):
    """A backend that keeps a sideband database itself (the emulated HSM).

    ``sideband_updater()`` returns the updater that writes its rows (what
    ``pacifica-like sideband load`` drives), or None when no database is kept.
    """

    def sideband_updater(self) -> Any:
        """Return the sideband updater, or None."""


@contextlib.contextmanager
def translate_os_errors(what: str, missing: str | None = None) -> Iterator[None]:
    """Turn OSError into the archive error that names the failure.

    ``what`` prefixes the message; ``missing`` is the message for ENOENT
    (FileNotInArchive); without it ENOENT is a storage fault.
    """
    try:
        yield
    except ArchiveError:
        raise
    except OSError as exc:
        code = exc.errno
        reason = exc.strerror or str(exc)
        if code in (errno.ENOENT, errno.ENOTDIR) and missing is not None:
            raise FileNotInArchive(missing) from exc
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(f"{what}: storage is full ({reason})") from exc
        if code in (errno.EACCES, errno.EPERM):
            raise Forbidden(f"{what}: permission denied") from exc
        if code in (errno.EIO, errno.EROFS, errno.ESTALE, errno.ENODEV, errno.ENXIO):
            raise StorageUnavailable(f"{what}: storage unavailable ({reason})") from exc
        if code in (errno.ENAMETOOLONG, errno.EISDIR):
            raise InvalidRequest(f"{what}: {reason}") from exc
        raise ArchiveError(f"{what}: {reason}") from exc


def publish(source: str, target: str, replace: bool) -> bool:
    """Give a durable file its archive name, make the new name durable; True if it replaced a file.

    ``replace``: the name is swapped atomically, so readers see the old file
    or the new one (:func:`durable.publish_over`, which tells whether one was
    there). Otherwise link() refuses an existing name (Conflict), so two
    racing write-once commits cannot both win.
    """
    try:
        if replace:
            return durable.publish_over(source, target)
        durable.publish(source, target, replace=False)
        return False
    except FileExistsError:
        raise Conflict(f"{os.path.basename(target)} already exists and the archive is write-once") from None


def read_sha256(fd_or_path: int | str) -> bytes | None:
    """Return the sha-256 recorded with a file at ingest, or None if there is none."""
    try:
        value = os.getxattr(fd_or_path, SHA256_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
    return value if len(value) == 32 else None


def read_checksums(fd_or_path: int | str) -> dict[str, bytes]:
    """Return every digest recorded with a file (sha-256, adler32, md5), by hashlib name."""
    found: dict[str, bytes] = {}
    sha256 = read_sha256(fd_or_path)
    if sha256 is not None:
        found["sha256"] = sha256
    try:
        found.update(checksums.decode_grid(os.getxattr(fd_or_path, CHECKSUMS_XATTR)))
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    return found


def record_checksums(fd: int, digests: dict[str, bytes]) -> None:
    """Store the sha-256 and the grid checksums with the file (none where there are no user xattrs)."""
    if "sha256" in digests:
        record_sha256(fd, digests["sha256"])
    grid = checksums.encode_grid(digests)
    try:
        if grid:
            os.setxattr(fd, CHECKSUMS_XATTR, grid)
        else:
            os.removexattr(fd, CHECKSUMS_XATTR)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def record_sha256(fd: int, digest: bytes) -> None:
    """Store the digest with the file; filesystems without user xattrs keep none."""
    try:
        os.setxattr(fd, SHA256_XATTR, digest)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


#: Suffix of an upload's temp file; its full name is :func:`temp_name_prefix` + random + suffix.
TEMP_SUFFIX = ".part"
_process_starts: dict[int, str] = {}


def temp_name_prefix(name: str) -> str:
    """Return the start of the temp file name of an upload to ``name``: ``.<name>.<pid>-<start>@<host>.``.

    The writer's pid, start time and host are in the name so that a sweep
    (``pacifica_like.gateway.leftovers``) can tell the temp file of a dead upload from
    one another live process is still writing.
    """
    pid = os.getpid()
    start = _process_starts.get(pid)
    if start is None:  # read once per process: uWSGI forks after import, hence the pid key
        from pacifica_like.core.owners import process_start  # a leaf; loaded only by writers

        start = _process_starts[pid] = process_start(pid)
    return f".{name}.{pid}-{start}@{socket.gethostname()}."


#: Bytes after which an upload's md5 moves to a thread of its own (a thread per small upload costs more).
SIDE_HASH_AFTER = 4 * CHUNK_SIZE
SIDE_ALGORITHMS = frozenset(("md5",))


class UploadDigests:
    """Hash an upload as it arrives: what the archive keeps (sha-256, adler32, md5) and every claim.

    Shared by the writers of every backend, so all of them accept and refuse
    the same uploads with the same message. After :meth:`verify`,
    ``checksums`` holds the kept digests, to be recorded with the file.
    """

    def __init__(self, expect: Sequence[ExpectedDigest] = ()) -> None:
        self._expect = list(expect)
        names = dict.fromkeys([*checksums.KEPT, *(e.algorithm for e in self._expect)])
        self._hashers = [(name, checksums.new(name)) for name in names]
        self._updates = [hasher.update for _, hasher in self._hashers]
        self._hashed = 0
        self._side: checksums.SideHasher | None = None
        self.checksums: dict[str, bytes] = {}

    def update(self, chunk: bytes) -> None:
        """Hash ``chunk`` with every algorithm (md5 on its own thread once the upload is large)."""
        for update in self._updates:
            update(chunk)
        self._hashed += len(chunk)
        if self._hashed >= SIDE_HASH_AFTER and self._side is None:
            self._move_aside()

    def _move_aside(self) -> None:
        """Hand md5 to a SideHasher: a large upload then pays for it on another core."""
        aside = [hasher for name, hasher in self._hashers if name in SIDE_ALGORITHMS]
        if not aside:
            return
        self._side = checksums.SideHasher(aside)
        self._updates = [h.update for name, h in self._hashers if name not in SIDE_ALGORITHMS]
        self._updates.append(self._side.update)

    def close(self) -> None:
        """Stop the side thread of an upload that ends without verify (safe to call twice)."""
        if self._side is not None:
            self._side.close()

    def verify(self, bytes_received: int) -> bytes:
        """Return the sha-256 of what was hashed; DigestMismatch unless every claim matches."""
        self.close()  # every queued chunk hashed before any digest is read
        computed = {name: hasher.digest() for name, hasher in self._hashers}
        for claim in self._expect:
            actual = computed[claim.algorithm]
            if not hmac.compare_digest(actual, claim.value):
                raise DigestMismatch(
                    f"{claim.header}: {claim.algorithm} of the {bytes_received} bytes received "
                    "does not match the digest sent; nothing was stored"
                )
        self.checksums = {name: computed[name] for name in checksums.KEPT}
        return computed["sha256"]


class AtomicFileWriter(Writer):
    """Write a file under a temporary name beside its target, then publish it.

    The commit protocol of :mod:`pacifica_like.core.durable` (temp beside the
    target -> write -> fsync -> rename -> directory fsync; the temp removed on
    failure), streamed: hashing as bytes arrive and starting write-back every
    WRITEBACK_STEP bytes, so the final fsync finds little left to flush.

    The temp file lives in the target directory (same filesystem, so the
    final rename is atomic) under a hidden name that listings skip. Bytes are
    hashed as they arrive; nothing reads the file back.
    """

    def __init__(
        self,
        final_path: str,
        mtime: float,
        expect: Sequence[ExpectedDigest] = (),
        replace: bool = True,
        mode: int = 0o444,
    ) -> None:
        self.final_path = final_path
        self._mtime = mtime
        self._replace = replace
        self._mode = mode
        self._digests = UploadDigests(expect)
        self.bytes_written = 0
        self._written_back = 0
        self._committed = False
        #: After commit: True when the published file replaced one at ``final_path``.
        self.replaced = False
        #: Shard directories this upload created: their names are flushed with the file's.
        self._made_dirs: list[str] = []
        directory, name = os.path.split(final_path)
        with translate_os_errors(f"cannot store {name}"):
            prefix = temp_name_prefix(name)
            try:
                fd, self._temp_path = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=TEMP_SUFFIX)
            except FileNotFoundError:
                # The shard's first file. Not made up front: a mkdir that finds the directory
                # there is a failed system call on every other upload.
                self._made_dirs = durable.make_dirs(directory)
                fd, self._temp_path = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=TEMP_SUFFIX)
        self._file = os.fdopen(fd, "wb", buffering=CHUNK_SIZE)

    def write(self, chunk: bytes) -> None:
        """Append and hash ``chunk``; start write-out every WRITEBACK_STEP bytes."""
        with translate_os_errors("cannot write upload"):
            self._file.write(chunk)
            self._digests.update(chunk)
            self.bytes_written += len(chunk)
            if self.bytes_written - self._written_back >= WRITEBACK_STEP:
                self._file.flush()
                start_writeback(
                    self._file.fileno(), self._written_back, self.bytes_written - self._written_back
                )
                self._written_back = self.bytes_written

    def commit(self) -> int:
        """Verify digests, then fsync, rename and fsync the directory; return bytes stored."""
        digest = self._digests.verify(self.bytes_written)
        with translate_os_errors("cannot store upload"):
            # Flush Python's buffer first: metadata calls below act on the fd.
            self._file.flush()
            fd = self._file.fileno()
            # Record the digests and times before fsync so one flush makes them durable together.
            record_checksums(fd, self._digests.checksums)
            os.fchmod(fd, self._mode)
            os.utime(fd, (self._mtime, self._mtime))
            # Data and metadata reach the disk before any name points at them.
            os.fsync(fd)
            self._file.close()
            self.replaced = publish(self._temp_path, self.final_path, replace=self._replace)
            # A new shard directory's own name must survive a crash too, or the file goes with it.
            durable.fsync_parents(self._made_dirs)
            self._committed = True
        self.sha256 = digest
        self.checksums = self._digests.checksums
        return self.bytes_written

    def discard(self) -> None:
        """Close and remove the temp file unless it was committed."""
        self._digests.close()
        if not self._file.closed:
            with contextlib.suppress(OSError):
                self._file.close()
        if not self._committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp_path)
            self._committed = True  # nothing left to clean up


class FileReader(Reader):
    """A Reader over an open file descriptor of a regular file."""

    def __init__(self, fd: int, status: FileStatus) -> None:
        self._file = os.fdopen(fd, "rb", buffering=0)
        self.status = status

    def read(self, size: int = CHUNK_SIZE) -> bytes:
        """Return up to ``size`` bytes."""
        with translate_os_errors("cannot read file"):
            return self._file.read(size)

    def seek(self, offset: int) -> None:
        """Move to ``offset``."""
        self._file.seek(offset)

    def fileno(self) -> int:
        """Return the descriptor of the open file (to fstat the very inode being read)."""
        return self._file.fileno()

    def close(self) -> None:
        """Close the descriptor."""
        self._file.close()


def status_from_stat(st: os.stat_result, relpath: str, sha256: bytes | None) -> FileStatus:
    """Build the status of a file that is fully on disk."""
    return FileStatus(
        size=st.st_size,
        mtime=st.st_mtime,
        ctime=st.st_ctime,
        bytes_per_level=(st.st_size, 0),
        media="disk",
        relpath=relpath,
        sha256=sha256,
    )


def hash_file(path: str) -> bytes:
    """Return the sha-256 of a file's bytes, reading in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.digest()
