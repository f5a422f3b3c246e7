"""The emulated tape library: volumes, drives, mounts, head positions and what they cost.

A volume is a file ``<VSN>.vol`` in the library directory; the catalog knows
its capacity and end of data. Drives are catalog rows: a process *claims* one
(one transaction, so two processes never share a drive or mount one volume
twice), mounts the volume it needs, locates, moves bytes through the C stager,
and releases the claim. The cartridge stays in the drive afterwards, as in a
real library, so the next request for that volume pays no mount.

The cost model sleeps for mounts, unmounts, locates (proportional to head
travel) and paces transfers to the drive's rate inside the stager. Every
delay is multiplied by ``time_scale`` (0: no delays). Counters (mounts,
unmounts, bytes located, read and written) are kept per drive whatever the
scale: scheduling quality is judged by them, not by clocks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pacifica_like.core import checksums
from pacifica_like.core.config import ConfigError, TapeSettings
from pacifica_like.core.errors import ArchiveError, InsufficientStorage, StorageUnavailable
from pacifica_like.core.owners import alive_here, owner_name
from pacifica_like.storage.contract import read_checksums, translate_os_errors
from pacifica_like.storage.tape import stager as stager_module
from pacifica_like.storage.tape.catalog import SCHEMA_VERSION, Catalog, CopyInfo, to_info

MIB = 1 << 20
#: A volume with less room than this left takes no more writes (like a tape at its early-warning mark).
FULL_THRESHOLD = 1 << 20
#: Longest pause between two attempts to claim a drive.
_POLL_MAX = 0.2


class CopyDamaged(StorageUnavailable):
    """A tape copy's bytes do not match its checksum (or its record is unreadable)."""


class VolumeFull(ArchiveError):
    """The record does not fit on the volume; the caller moves on to the next one."""


def vsn_name(index: int) -> str:
    """Return the volume serial number of the library's ``index``-th volume (LTO-9 style)."""
    return f"PL{index:04d}L9"


def owner_alive(owner: str) -> bool:
    """Tell whether the process named by an owner string (host:pid:start:token) still runs.

    Claims from other hosts are presumed alive: we cannot look at their processes.
    """
    here = alive_here(owner)
    return True if here is None else here


@dataclass(frozen=True)
class DriveInfo:
    """A drive's state and counters, as ``tape status`` prints them."""

    name: str
    vsn: str | None
    position: int
    owner: str | None
    mounts: int
    unmounts: int
    bytes_located: int
    bytes_read: int
    bytes_written: int


class TapeLibrary:
    """One process's handle on a library directory; shared by its threads."""

    def __init__(self, settings: TapeSettings, require_stager: bool = True) -> None:
        self.settings = settings
        self.directory = settings.library
        self.catalog = Catalog(self.directory)
        self._token = secrets.token_hex(4)
        self._stager: stager_module.Stager | None = None
        if require_stager:
            self.stager  # noqa: B018 - load now so a broken build fails at start, naming the path

    @property
    def stager(self) -> stager_module.Stager:
        """The loaded C stager; ConfigError naming the path if it is missing or the wrong build."""
        if self._stager is None:
            try:
                self._stager = stager_module.load(self.settings.stager)
            except stager_module.StagerLoadError as exc:
                raise ConfigError(f"[tape] stager: {exc}") from exc
        return self._stager

    @property
    def owner(self) -> str:
        """This process's claim name; computed per call because uWSGI forks after import."""
        return owner_name(self._token)

    # -- set-up and inspection -------------------------------------------------

    def initialise(self) -> tuple[list[str], list[str]]:
        """Create the directory, catalog, volumes and drives the settings ask for.

        Idempotent: existing volumes and drives are kept as they are, and only
        missing ones are added. Returns the VSNs and drive names created.
        """
        with translate_os_errors(f"cannot create tape library {self.directory}"):
            os.makedirs(self.directory, exist_ok=True)
            volumes = {vsn_name(i): self.settings.volume_capacity for i in range(self.settings.volumes)}
            self._refuse_unknown_data(volumes)
            created = self.catalog.create(volumes, [f"drive{i}" for i in range(self.settings.drives)])
            for vsn in created[0]:
                # An empty cartridge: exclusive create, so an existing volume is never truncated.
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.volume_path(vsn), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return created

    def _refuse_unknown_data(self, volumes: dict[str, int]) -> None:
        """Refuse to catalog a volume file that already holds records (a lost or foreign catalog).

        A fresh catalog would record its end of data as 0, and the next
        migration would write over the records it holds.
        """
        known = set()
        if self.catalog.exists() and self.catalog.schema_version() is not None:
            known = {row.vsn for row in self.catalog.Volume.select(self.catalog.Volume.vsn)}
        for vsn in volumes:
            path = self.volume_path(vsn)
            if vsn not in known and os.path.exists(path) and os.path.getsize(path) > 0:
                raise ConfigError(
                    f"tape library {self.directory}: {path} holds {os.path.getsize(path)} bytes the catalog "
                    "does not know; restore the catalog (catalog.sqlite) instead of initialising over it"
                )

    def check_ready(self) -> None:
        """Raise ConfigError unless the library was initialised by this schema version."""
        if not self.catalog.exists():
            raise ConfigError(
                f"tape library {self.directory} is not initialised: "
                "run `pacifica-like tape init --config <archive.ini>` first"
            )
        version = self.catalog.schema_version()
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"tape library {self.directory}: catalog schema {version}, this build needs {SCHEMA_VERSION}"
                + (": run `pacifica-like tape init` to upgrade it" if (version or 0) < SCHEMA_VERSION else "")
            )

    def volume_path(self, vsn: str) -> str:
        """Return the file holding volume ``vsn``."""
        return os.path.join(self.directory, f"{vsn}.vol")

    def drives(self) -> list[DriveInfo]:
        """Return every drive with its counters, by name."""
        drive = self.catalog.Drive
        return [
            DriveInfo(
                d.name, d.vsn, d.position, d.owner, d.mounts, d.unmounts, d.bytes_located, d.bytes_read,
                d.bytes_written,
            )
            for d in drive.select().order_by(drive.name)
        ]  # fmt: skip

    def counters(self) -> dict[str, int]:
        """Return the counters summed over all drives."""
        totals = dict.fromkeys(("mounts", "unmounts", "bytes_located", "bytes_read", "bytes_written"), 0)
        for info in self.drives():
            for key in totals:
                totals[key] += getattr(info, key)
        return totals

    def copy(self, copy_id: int) -> CopyInfo:
        """Return one tape copy by its catalog id."""
        return to_info(self.catalog.TapeCopy.get_by_id(copy_id))

    # -- the cost model ----------------------------------------------------------

    def delay(self, seconds: float) -> None:
        """Spend ``seconds`` of modelled time, scaled."""
        scaled = seconds * self.settings.time_scale
        if scaled > 0:
            time.sleep(scaled)

    def rate(self, mib_per_second: float) -> int:
        """Return a transfer rate in bytes/s for the stager, scaled (0: unpaced)."""
        if self.settings.time_scale <= 0:
            return 0
        return max(1, int(mib_per_second * MIB / self.settings.time_scale))

    def estimate_recall_seconds(self) -> int:
        """Return a pessimistic guess of one recall's duration, for Retry-After."""
        scaled = (self.settings.mount_seconds + self.settings.locate_seconds) * self.settings.time_scale
        return max(1, int(scaled + 0.999))

    # -- drives -----------------------------------------------------------------

    @contextlib.contextmanager
    def drive(self, vsn: str, timeout: float | None = None) -> Iterator[MountedDrive]:
        """Claim a drive, mount ``vsn`` in it, and release the claim afterwards.

        Waits while every drive is busy, or while the volume sits in a drive
        another process is using (a cartridge is in one drive at a time).
        Raises StorageUnavailable after ``timeout`` seconds (None: wait on).
        """
        name = self._claim(vsn, timeout)
        try:
            mounted = MountedDrive(self, name)
            mounted.mount(vsn)
            yield mounted
        finally:
            drive = self.catalog.Drive
            with self.catalog.db.atomic():
                drive.update(owner=None, claimed_vsn=None, claimed_at=None, last_used=time.time()).where(
                    (drive.name == name) & (drive.owner == self.owner)
                ).execute()

    def _claim(self, vsn: str, timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            name = self._try_claim(vsn)
            if name is not None:
                return name
            if deadline is not None and time.monotonic() >= deadline:
                raise StorageUnavailable(f"no tape drive became free for volume {vsn} within {timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX)

    def _try_claim(self, vsn: str) -> str | None:
        drive = self.catalog.Drive
        me = self.owner
        with self.catalog.db.atomic():
            rows = list(drive.select().order_by(drive.name))
            for row in rows:
                if row.owner is not None and not owner_alive(row.owner):
                    # The process that held it died mid-operation; the drive is free again.
                    drive.update(owner=None, claimed_vsn=None, claimed_at=None).where(
                        drive.name == row.name
                    ).execute()
                    row.owner = row.claimed_vsn = None
            # A cartridge is in one drive at a time: count the one being mounted, not yet in.
            holding = [row for row in rows if vsn in (row.vsn, row.claimed_vsn)]
            if holding:
                if holding[0].owner is not None:
                    return None  # the cartridge is busy in another drive
                pick = holding[0]
            else:
                idle = [row for row in rows if row.owner is None]
                if not idle:
                    return None
                # Prefer an empty drive, then the one idle longest (least likely wanted again soon).
                pick = min(idle, key=lambda row: (row.vsn is not None, row.last_used))
            drive.update(owner=me, claimed_vsn=vsn, claimed_at=time.time()).where(
                drive.name == pick.name
            ).execute()
            return pick.name

    def unload_idle(self) -> None:
        """Unmount every cartridge from drives nobody is using (end of a maintenance run)."""
        for info in self.drives():
            if info.vsn is not None and info.owner is None:
                with contextlib.suppress(StorageUnavailable), self.drive(info.vsn, timeout=0) as mounted:
                    mounted.unload()


class MountedDrive:
    """A claimed drive holding one volume; only the claiming thread uses it."""

    def __init__(self, library: TapeLibrary, name: str) -> None:
        self.library = library
        self.name = name
        self.vsn: str | None = None
        self.position = 0

    def _update(self, **changes: object) -> None:
        drive = self.library.catalog.Drive
        with self.library.catalog.db.atomic():
            drive.update(**changes).where(drive.name == self.name).execute()

    def mount(self, vsn: str) -> None:
        """Put ``vsn`` in this drive, first unloading whatever it holds."""
        row = self.library.catalog.Drive.get_by_id(self.name)
        if row.vsn == vsn:
            self.vsn, self.position = vsn, row.position
            return
        if row.vsn is not None:
            self.vsn = row.vsn
            self.unload()
        if not os.path.isfile(self.library.volume_path(vsn)):
            raise StorageUnavailable(
                f"volume {vsn} is missing from the tape library (no {self.library.volume_path(vsn)})"
            )
        self.library.delay(self.library.settings.mount_seconds)
        drive = self.library.catalog.Drive
        self._update(vsn=vsn, position=0, mounts=drive.mounts + 1)
        self.vsn, self.position = vsn, 0

    def unload(self) -> None:
        """Rewind and unload the cartridge."""
        if self.vsn is None:
            return
        self.library.delay(self.library.settings.unmount_seconds)
        drive = self.library.catalog.Drive
        self._update(vsn=None, position=0, unmounts=drive.unmounts + 1)
        self.vsn, self.position = None, 0

    def locate(self, offset: int) -> None:
        """Move the head to ``offset``; the time is proportional to the distance."""
        travel = abs(offset - self.position)
        if travel:
            capacity = self.library.catalog.Volume.get_by_id(self.vsn).capacity
            self.library.delay(self.library.settings.locate_seconds * travel / capacity)
        drive = self.library.catalog.Drive
        self._update(position=offset, bytes_located=drive.bytes_located + travel)
        self.position = offset

    def _moved(self, end: int, **counter: int) -> None:
        drive = self.library.catalog.Drive
        changes = {key: getattr(drive, key) + value for key, value in counter.items()}
        self._update(position=end, **changes)
        self.position = end

    def _mark_full(self) -> None:
        catalog = self.library.catalog
        with catalog.db.atomic():
            catalog.Volume.update(full=True).where(catalog.Volume.vsn == self.vsn).execute()

    def read_to(self, copy: CopyInfo, dest: str) -> None:
        """Copy a tape copy's bytes into a new file ``dest``, verifying them on the way.

        Raises CopyDamaged (and marks the copy) when the bytes fail the check.
        ``dest`` exists afterwards only if this returned normally.
        """
        self._transfer(copy, dest)

    def verify(self, copy: CopyInfo) -> None:
        """Read a tape copy and check its checksum, writing nothing."""
        self._transfer(copy, None)

    def _transfer(self, copy: CopyInfo, dest: str | None) -> None:
        self.locate(copy.offset)
        volume = self.library.volume_path(copy.vsn)
        rate = self.library.rate(self.library.settings.read_mib_s)
        stager = self.library.stager
        try:
            if dest is None:
                stager.verify(volume, copy.offset, copy.file_id, copy.size, copy.sha256, rate)
            else:
                stager.copy_out(volume, copy.offset, copy.file_id, copy.size, copy.sha256, dest, rate)
        except OSError as exc:
            self._fail(copy, exc, dest)
        self._moved(copy.offset + stager_module.HEADER_SIZE + copy.size, bytes_read=copy.size)

    def _fail(self, copy: CopyInfo, exc: OSError, dest: str | None) -> None:
        where = f"tape copy of file {copy.file_id} on {copy.vsn} at byte {copy.offset}"
        if exc.errno == stager_module.CHECKSUM_MISMATCH:
            self.library.catalog.record_verification(copy.id, "mismatch")
            raise CopyDamaged(f"{where} failed its sha-256 check; it is marked bad") from exc
        if exc.errno in (stager_module.SHORT_READ, stager_module.BAD_RECORD, errno.ENOENT, errno.EIO):
            self.library.catalog.record_verification(copy.id, "unreadable")
            raise CopyDamaged(f"{where} is unreadable ({exc.strerror})") from exc
        if dest is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(f"disk cache is full; cannot recall file {copy.file_id}") from exc
        with translate_os_errors(f"cannot read {where}"):
            raise exc

    def append(self, source: str, file_id: int, mtime: float, ctime: float) -> CopyInfo:
        """Write ``source`` at the volume's end of data and record the new copy.

        Raises VolumeFull when the file does not fit; nothing is recorded. The
        volume is marked full (no more writes planned to it) when less than
        FULL_THRESHOLD is left, or when the end of tape came mid-write.
        """
        catalog = self.library.catalog
        volume = catalog.Volume.get_by_id(self.vsn)
        size = os.stat(source).st_size
        if volume.fill + stager_module.HEADER_SIZE + size > volume.capacity:
            if volume.capacity - volume.fill < FULL_THRESHOLD:
                self._mark_full()
            raise VolumeFull(f"{size} bytes do not fit on {self.vsn}")
        self.locate(volume.fill)
        rate = self.library.rate(self.library.settings.write_mib_s)
        path = self.library.volume_path(self.vsn)
        try:
            written, digest = self.library.stager.append(
                path, volume.fill, volume.capacity, source, file_id, rate
            )
        except OSError as exc:
            if (
                exc.errno == errno.ENOSPC
                and volume.fill + stager_module.HEADER_SIZE + os.stat(source).st_size > volume.capacity
            ):
                self._mark_full()
                raise VolumeFull(f"file {file_id} grew past the room left on {self.vsn}") from exc
            with translate_os_errors(f"cannot write file {file_id} to volume {self.vsn}"):
                raise exc
        end = volume.fill + stager_module.HEADER_SIZE + written
        # The grid checksums recorded with the disk file, kept only when they describe the bytes written.
        recorded = read_checksums(source)
        grid = checksums.encode_grid(recorded) if recorded.get("sha256") == digest else b""
        with catalog.db.atomic():
            row = catalog.TapeCopy.create(
                file_id=file_id,
                vsn=self.vsn,
                seq=volume.records,
                offset=volume.fill,
                size=written,
                sha256=digest.hex(),
                checksums=grid.decode("ascii") or None,
                mtime=mtime,
                ctime=ctime,
                written_at=time.time(),
            )
            catalog.Volume.update(fill=end, records=catalog.Volume.records + 1).where(
                catalog.Volume.vsn == self.vsn
            ).execute()
        self._moved(end, bytes_written=written)
        return to_info(row)
