"""Leftovers of uploads whose process died: their temp files and their operation markers.

A process killed mid-upload leaves its temp file beside the target
(``.<name>.<pid>-<start>@<host>.<random>.part``, ``pacifica_like.storage.contract.temp_name_prefix``)
and its operation marker in the catalog, for ever. :func:`sweep` removes them;
the gateway runs it when it builds its app (each process, at start) and
``pacifica-like audit`` reports them (and removes them with ``--fix``).

What is whose, and when it may go (docs/decisions/0002-inventory-commit-order.md):

* a temp file goes when its writer is certainly dead: it ran on this host and
  no process with its pid *and start time* runs now (a reused pid does not pass
  for it). Under uWSGI another worker's upload in flight is alive, so its file
  stays. A file of another host, or one named before writers were named, goes
  only when it has not been written for ``stale_after`` seconds;
* a marker goes when its owner (``host:pid:start:token``, ``pacifica_like.core.owners``)
  is certainly dead, or runs on another host and is older than ``stale_after``. Its file's row is
  first made to describe what storage holds (the upload may have published just
  before its process died), in the transaction that ends the marker.

Temp files are looked for beside the files of the markers (a PATCH's), so a
sweep at start reads one table and a few directories instead of walking the
archive. An upload writes no marker (its temp file is its marker), so the temp
file of an upload whose process died is found by the next audit's listing,
which passes it anyway, and removed by ``audit --fix``.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from pacifica_like.core.errors import ArchiveError
from pacifica_like.gateway.catalog import GatewayCatalog, Operation
from pacifica_like.gateway.inventory import Inventory, attach_inventory, storage_probe
from pacifica_like.storage.contract import TEMP_SUFFIX, Backend

log = logging.getLogger("pacifica_like.error")

#: Seconds after which a temp file or marker whose writer cannot be judged counts as abandoned.
DEFAULT_STALE_AFTER = 86400.0


@dataclass(frozen=True)
class TempFile:
    """A temp file of an upload that will never finish; ``why`` says how we know."""

    relpath: str
    size: int
    why: str


@dataclass
class Leftovers:
    """What a sweep found (and, unless a dry run, removed)."""

    temp_files: list[TempFile] = field(default_factory=list)
    markers: list[Operation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    removed: bool = False

    def summary(self, name: str | None = None) -> dict[str, Any]:
        """The counts for a report (``name``: the audit's, naming its list file)."""
        document: dict[str, Any] = {
            "temp_files": len(self.temp_files),
            "temp_bytes": sum(t.size for t in self.temp_files),
            "dead_markers": len(self.markers),
            "removed": self.removed,
            "errors": self.errors,
        }
        if name is not None:
            document["file"] = f"{name}_leftover.txt"
        return document

    def describe(self) -> str:
        """One line for a log."""
        size = sum(t.size for t in self.temp_files)
        verb = "removed" if self.removed else "found"
        return (
            f"{verb} {len(self.temp_files)} temp file(s) ({size} bytes) and {len(self.markers)} operation "
            f"marker(s) of uploads whose process died"
        )


def running_since(pid: int) -> str:
    """Return the start time (clock ticks) of process ``pid``; "?" when it does not run.

    Unlike ``owners.process_start``, a zombie counts as not running: a writer
    killed by a signal is a zombie until its parent (or init) reaps it.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return "?"
    return "?" if len(fields) < 20 or fields[0] in ("Z", "X", "x") else fields[19]


def writer_alive(owner: str) -> bool | None:
    """Tell whether the writer ``<pid>-<start>@<host>`` of a temp file runs; None when it cannot be told."""
    ident, at, host = owner.partition("@")
    pid, dash, start = ident.partition("-")
    if not (at and dash and pid.isdigit()) or host != socket.gethostname():
        return None
    return running_since(int(pid)) == start


def marker_alive(owner: str) -> bool | None:
    """Tell whether the process that wrote a marker runs; None when it cannot be told (another host)."""
    parts = owner.split(":")
    if len(parts) not in (2, 4) or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return None
    started = running_since(int(parts[1]))
    # host:pid:start:token; older gateways wrote host:pid (no start time: any process of that pid).
    return started != "?" if len(parts) == 2 else started == parts[2]


def _temp_files(path: str) -> list[str]:
    directory, name = os.path.split(path)
    return glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*{TEMP_SUFFIX}"))


#: The writer in a temp file name ``.<name>.<pid>-<start>@<host>.<random>.part`` (names, hosts: dots too).
_WRITER = re.compile(r"\.(\d+-\d+@[^/]*)\.[^./]+" + re.escape(TEMP_SUFFIX) + "$")


def _why_abandoned(temp: str, now: float, stale_after: float) -> tuple[str | None, int]:
    """Return (why the temp file is abandoned, or None to keep it; its size)."""
    named = _WRITER.search(os.path.basename(temp))
    owner = named.group(1) if named else ""  # older temp files named no writer
    try:
        st = os.lstat(temp)
    except FileNotFoundError:
        return None, 0
    alive = writer_alive(owner) if owner else None
    if alive is False:
        return "its writer is dead", st.st_size
    if alive is None and st.st_mtime < now - stale_after:
        return f"not written for more than {stale_after:g} s", st.st_size
    return None, st.st_size


def find(
    backend: Backend, catalog: GatewayCatalog, stale_after: float, now: float, listed: Iterable[str] = ()
) -> Leftovers:
    """Return the dead uploads' temp files and markers (nothing is changed).

    Temp files are looked for beside the files of the markers, and among
    ``listed`` (the temp files an audit's listing passed: an upload writes no
    marker, so only a walk finds the temp file of one whose process died).
    """
    found = Leftovers()
    operations = catalog.operations()
    for op in operations:
        alive = marker_alive(op.owner)
        if alive is False or (alive is None and op.started_at < now - stale_after):
            found.markers.append(op)
    path_of = getattr(backend, "path", None)
    prefix = os.path.join(backend.settings.archive.prefix, "")
    if path_of is None:
        return found
    temps = set(listed)
    for file_id in {op.file_id for op in operations}:
        temps.update(_temp_files(path_of(file_id)))
    for temp in sorted(temps):
        why, size = _why_abandoned(temp, now, stale_after)
        if why is not None:
            found.temp_files.append(TempFile(temp.removeprefix(prefix), size, why))
    return found


def remove(backend: Backend, catalog: GatewayCatalog, found: Leftovers) -> Leftovers:
    """Remove what :func:`find` found: temp files, then markers (each file's row settled first)."""
    prefix = backend.settings.archive.prefix
    for temp in found.temp_files:
        with contextlib.suppress(FileNotFoundError):
            try:
                os.unlink(os.path.join(prefix, temp.relpath))
            except OSError as exc:
                found.errors.append(f"{temp.relpath}: {exc.strerror or exc}")
    ordered = sorted(found.markers, key=lambda op: op.file_id)
    for file_id, group in groupby(ordered, key=lambda op: op.file_id):
        ops = list(group)
        probe = storage_probe(backend, file_id)
        try:
            if probe is None:
                catalog.settle(file_id, lambda: None, tuple(op.token for op in ops), forget_absent=False)
            else:
                deleted = any(op.verb == "DELETE" for op in ops)
                catalog.settle(file_id, probe, tuple(op.token for op in ops), forget_absent=deleted)
        except ArchiveError as exc:
            found.errors.append(f"markers of file {file_id}: {exc}")
    found.removed = True
    return found


def sweep(
    backend: Backend,
    catalog: GatewayCatalog,
    stale_after: float = DEFAULT_STALE_AFTER,
    now: float | None = None,
    dry_run: bool = False,
) -> Leftovers:
    """Find and (unless ``dry_run``) remove the leftovers of dead uploads; return what was found."""
    found = find(backend, catalog, stale_after, time.time() if now is None else now)
    if dry_run or not (found.temp_files or found.markers):
        return found
    return remove(backend, catalog, found)


def sweep_at_start(backend: Backend, catalog: GatewayCatalog) -> Leftovers | None:
    """Sweep when a gateway process builds its app; log what was removed. Never fails the start.

    A SQLite catalog that does not exist yet is not created here (the first upload creates it).
    """
    if not catalog.may_exist():
        return None
    try:
        found = sweep(backend, catalog)
    except ArchiveError as exc:
        log.warning("start-up sweep of dead uploads' leftovers skipped: %s", exc)
        return None
    if found.temp_files or found.markers:
        log.warning("start-up sweep: %s", found.describe())
    for error in found.errors:
        log.warning("start-up sweep: could not remove %s", error)
    return found


def keep_inventory(backend: Backend, catalog_url: str | None) -> Inventory | None:
    """Have the catalog record ``backend``'s changes (see attach_inventory); sweep on first attach.

    For front doors built without :func:`pacifica_like.web.app.build_app` (a
    site mounting the file resource in its own CherryPy tree): without the
    inventory, the next ``audit --fix`` would take their uploads for orphans.
    """
    attached = any(
        isinstance(guard, Inventory) and guard.catalog.url == catalog_url for guard in backend.events.guards
    )
    inventory = attach_inventory(backend, catalog_url)
    if inventory is not None and not attached:
        sweep_at_start(backend, inventory.catalog)
    return inventory
