"""Consistency audit: compare the inventory with what the storage holds, and act only when it is safe.

A listing of a live archive is not an instant: files are stored and deleted
while it runs. The audit therefore takes the inventory twice, before and after
the listing, and counts

* as **missing** only a file whose row is in both snapshots, describing the
  same version (same ``stored_at``), and that the listing did not find: it was
  in the inventory for the whole listing, so the listing should have seen it;
* as an **orphan** only a file the listing found that is in neither snapshot:
  a file stored during the listing is in the second snapshot, one deleted
  during it is in the first.

and, among the files that are both listed and in both snapshots, as a
**mismatch** a file whose size or recorded digest (the sha-256 xattr written at
ingest; the bytes are never read) differs from its row: the row describes
another version than the one stored. It also reports **leftovers**: temp files
and operation markers of uploads whose process died (``pacifica_like.gateway.leftovers``),
removed by ``--fix``.

On top of that it leaves alone files with an operation marker younger than
``inflight_timeout`` (a PUT, PATCH or DELETE under way) and files younger than
``ignore_age`` (the inventory's ``stored_at`` for missing files, the storage's
ctime for orphans: ctime changes when a file is written or renamed into place,
where mtime is the client's Last-Modified).

Reading each snapshot in pages is safe: operation markers are read *before*
each snapshot's rows, and an upload's row is written in the transaction that
removes its marker, so every upload that committed before the second
snapshot is either in its rows or in its markers.

A marker older than ``inflight_timeout`` belongs to an operation whose outcome
was never recorded (the catalog failed after the storage call, or the process
died). An orphan that carries our sha-256 xattr (every upload through the
gateway does: the file is the record of truth, and an upload writes no marker)
or that has such a PATCH marker is an *unrecorded upload*; a missing file with
such a DELETE marker an *unrecorded deletion*. They are reported with the rest,
and ``--fix`` records them instead of quarantining or marking them LOST. The
listing also collects the hidden temp files it passes, so ``--fix`` removes
those whose writer died (an upload's temp file is its only in-flight marker).

The verdict: ``incomplete`` when part of the storage could not be listed (then
nothing else counts), ``thresholds exceeded`` when there is more drift than the
operator allowed, ``drift`` when anything was found, else ``ok``. Actions
(:func:`plan_fix` / :func:`apply_fix`) run only on ``drift``.

Memory: ids, times and sizes live in ``array`` columns (8 bytes each) sorted
by id and compared in one merge pass, so a million files cost tens of MiB.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Protocol

from pacifica_like.core import durable
from pacifica_like.core.durable import fsync_dir
from pacifica_like.core.errors import ArchiveError, FileNotInArchive
from pacifica_like.core.ids import parse_id
from pacifica_like.gateway import leftovers
from pacifica_like.gateway.catalog import GatewayCatalog, Operation, Snapshot, digest_key
from pacifica_like.gateway.inventory import storage_probe, stored_version
from pacifica_like.storage.contract import Backend, read_sha256

DEFAULT_IGNORE_AGE = 86400.0
DEFAULT_INFLIGHT_TIMEOUT = 86400.0
#: Past these the audit acts on nothing: a wrong catalog URL or an unmounted
#: filesystem looks like mass drift, and mass "repairs" would make it worse.
DEFAULT_MAX_MISSING = 1000
DEFAULT_MAX_ORPHAN_FRACTION = 0.05
#: Garbage lines quoted in the error (all are counted).
MAX_QUOTED_PROBLEMS = 20
#: Listing progress is reported every this many ids (a call per id would cost more than the walk).
PROGRESS_STEP = 4096
VERDICTS = ("ok", "drift", "thresholds exceeded", "incomplete")
UPLOAD_VERBS = frozenset({"PUT", "PATCH"})

#: progress(label, total) -> a context manager yielding update(n).
ProgressFactory = Callable[[str, int | None], AbstractContextManager[Callable[[int], object]]]


@contextlib.contextmanager
def no_progress(label: str, total: int | None) -> Iterator[Callable[[int], object]]:
    """A ProgressFactory that shows nothing."""
    yield lambda n: None


class BadInventoryFile(Exception):
    """An external inventory file has lines that are not file ids; the audit refuses to run."""

    def __init__(self, path: str, problems: list[tuple[int, str]], count: int) -> None:
        quoted = "; ".join(f"line {line}: {text!r}" for line, text in problems)
        more = f" (and {count - len(problems)} more)" if count > len(problems) else ""
        super().__init__(
            f"inventory file {path}: {count} line(s) are not file ids: {quoted}{more}; nothing was audited"
        )
        self.path = path
        self.problems = problems
        self.count = count


# -- inventories -------------------------------------------------------------------


class InventorySource(Protocol):
    """Where the inventory comes from: the catalog, or an external file of ids."""

    catalog: GatewayCatalog | None

    def describe(self) -> dict[str, Any]:
        """Return what the summary says about the source."""

    def operations(self) -> list[Operation]:
        """Return the operation markers (none for a file)."""

    def snapshot(self, progress: Callable[[int], object], digests: bool = False) -> Snapshot:
        """Return the inventory now (``digests``: with each row's digest key, where there are any)."""


class CatalogInventory:
    """The gateway catalog's inventory table."""

    def __init__(self, catalog: GatewayCatalog) -> None:
        self.catalog: GatewayCatalog | None = catalog
        self._catalog = catalog

    def describe(self) -> dict[str, Any]:
        """Name the catalog (password hidden)."""
        return {"source": "catalog", "catalog": self._catalog.display_url}

    def operations(self) -> list[Operation]:
        """Read the operation markers."""
        return self._catalog.operations()

    def snapshot(self, progress: Callable[[int], object], digests: bool = False) -> Snapshot:
        """Read every row."""
        return self._catalog.snapshot(progress, digests)


class FileInventory:
    """An external list of ids, one per line (blank lines and ``#`` comments allowed).

    The whole file is checked when it is opened: any other line makes
    :class:`BadInventoryFile`, naming the lines. The list carries no times or
    sizes, so missing files cannot be aged (every one counts) and have no byte count.
    """

    catalog = None

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        started = time.monotonic()
        ids = array("q")
        problems: list[tuple[int, str]] = []
        count = 0
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                text = raw.strip()
                if not text or text.startswith(b"#"):
                    continue
                try:
                    ids.append(parse_id(text.decode("ascii")))
                except (UnicodeDecodeError, ValueError):
                    count += 1
                    if len(problems) < MAX_QUOTED_PROBLEMS:
                        problems.append((number, raw.decode("utf-8", "replace").rstrip("\r\n")[:80]))
        if count:
            raise BadInventoryFile(self.path, problems, count)
        self.entries = len(ids)
        unique = _sorted_unique(ids)
        self.duplicates = self.entries - len(unique)
        zeros = len(unique)
        self._snapshot = Snapshot(
            ids=unique,
            stored_at=array("d", bytes(8 * zeros)),  # 0.0: as old as can be
            sizes=array("q", [-1]) * zeros,  # unknown
            lost=array("b", bytes(zeros)),
            seconds=time.monotonic() - started,
        )

    def describe(self) -> dict[str, Any]:
        """Name the file."""
        return {"source": "file", "path": self.path, "lines": self.entries, "duplicates": self.duplicates}

    def operations(self) -> list[Operation]:
        """A file has no operation markers."""
        return []

    def snapshot(self, progress: Callable[[int], object], digests: bool = False) -> Snapshot:
        """Return the ids read when the file was opened (it does not change under us; no digests)."""
        progress(len(self._snapshot))
        return self._snapshot


def _sorted_unique(ids: array) -> array:
    """Return ``ids`` sorted, without duplicates, as an ``array('q')``."""
    return array("q", (key for key, _ in groupby(sorted(ids))))


# -- the report --------------------------------------------------------------------


@dataclass(frozen=True)
class MissingFile:
    """In the inventory (both snapshots, same version), not in storage."""

    file_id: int
    size: int
    stored_at: float
    #: A DELETE of it started long ago and its outcome was never recorded.
    unrecorded_delete: bool = False


@dataclass(frozen=True)
class OrphanFile:
    """In storage, in neither inventory snapshot."""

    file_id: int
    size: int
    ctime: float
    relpath: str
    #: Bytes on a level other than disk (a tape copy): quarantine moves disk files only.
    off_disk_bytes: int
    #: Ours, never recorded: it carries our sha-256 xattr, or a PATCH of it started long ago.
    unrecorded_upload: bool = False


@dataclass(frozen=True)
class MismatchFile:
    """Listed and in the inventory, but its size or recorded digest is not what its row says."""

    file_id: int
    relpath: str
    row_size: int
    size: int
    row_sha256: str | None
    sha256: str | None

    @property
    def damaged(self) -> bool:
        """Same digest recorded at ingest, other size: the bytes changed after ingest."""
        return self.sha256 is not None and self.sha256 == self.row_sha256 and self.size != self.row_size


@dataclass
class AuditReport:
    """Everything one audit found; :meth:`summary` is the JSON document."""

    name: str
    backend: str
    prefix: str
    inventory: dict[str, Any]
    started_at: float
    options: dict[str, Any]
    missing: list[MissingFile] = field(default_factory=list)
    orphans: list[OrphanFile] = field(default_factory=list)
    mismatches: list[MismatchFile] = field(default_factory=list)
    #: Temp files and markers of dead uploads (None: not looked for, without a catalog).
    leftovers: leftovers.Leftovers | None = None
    #: (file_id, stored_at) of rows marked LOST whose file is in storage again.
    reappeared: list[tuple[int, float]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    abandoned: list[Operation] = field(default_factory=list)
    inventory_before: int = 0
    inventory_after: int = 0
    listed: int = 0
    listed_duplicates: int = 0
    listing_errors: list[dict[str, str]] = field(default_factory=list)
    exceeded: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    verdict: str = "ok"
    #: False when the listing was incomplete: no file is called missing then.
    missing_judged: bool = True
    fix: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """Return the summary document (counts, bytes, durations, thresholds, verdict)."""
        missing_sizes = [m.size for m in self.missing]
        return {
            "name": self.name,
            "verdict": self.verdict,
            "started": _iso(self.started_at),
            "backend": self.backend,
            "prefix": self.prefix,
            "inventory": {**self.inventory, "before": self.inventory_before, "after": self.inventory_after},
            "storage": {
                "listed": self.listed,
                "listed_twice": self.listed_duplicates,
                "errors": self.listing_errors,
            },
            "missing": {
                # null when not judged (incomplete listing).
                "count": len(self.missing) if self.missing_judged else None,
                # An external id list carries no sizes: then the byte count is unknown (null).
                "bytes": None
                if not self.missing_judged or any(s < 0 for s in missing_sizes)
                else sum(missing_sizes),
                "unrecorded_deletes": sum(m.unrecorded_delete for m in self.missing),
                "file": f"{self.name}_missing.txt",
            },
            "orphan": {
                "count": len(self.orphans),
                "bytes": sum(o.size for o in self.orphans),
                "unrecorded_uploads": sum(o.unrecorded_upload for o in self.orphans),
                "fraction": round(len(self.orphans) / self.listed, 6) if self.listed else 0.0,
                "file": f"{self.name}_orphan.txt",
            },
            "mismatch": {
                "count": len(self.mismatches),
                "size_differs": sum(m.size != m.row_size for m in self.mismatches),
                "digest_differs": sum(
                    m.sha256 is not None and m.row_sha256 is not None and m.sha256 != m.row_sha256
                    for m in self.mismatches
                ),
                "file": f"{self.name}_mismatch.txt",
            },
            "leftovers": None if self.leftovers is None else self.leftovers.summary(self.name),
            "reappeared": [file_id for file_id, _ in self.reappeared],
            "ignored": self.ignored,
            "abandoned_operations": [
                {"file": op.file_id, "verb": op.verb, "started": _iso(op.started_at), "owner": op.owner}
                for op in self.abandoned
            ],
            "thresholds": {
                "max_missing": self.options["max_missing"],
                "max_orphan_fraction": self.options["max_orphan_fraction"],
                "exceeded": self.exceeded,
            },
            "settings": {
                "ignore_age": self.options["ignore_age"],
                "inflight_timeout": self.options["inflight_timeout"],
            },
            "durations": {key: round(value, 3) for key, value in self.durations.items()},
            "fix": self.fix,
        }


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def write_reports(report: AuditReport, directory: str) -> list[str]:
    """Write the NAME_*.txt lists and NAME_summary.json; return their paths.

    NAME_missing.txt, NAME_orphan.txt and NAME_mismatch.txt hold sorted ids;
    NAME_leftover.txt the temp files of dead uploads, relative to the prefix.
    Each is written to a temp file and renamed, so a reader never sees half a report.
    """
    paths = []
    lists = {
        f"{report.name}_missing.txt": [m.file_id for m in report.missing],
        f"{report.name}_orphan.txt": [o.file_id for o in report.orphans],
        f"{report.name}_mismatch.txt": [m.file_id for m in report.mismatches],
    }
    for filename, ids in lists.items():
        text = "".join(f"{file_id}\n" for file_id in sorted(ids))
        paths.append(_write_atomically(os.path.join(directory, filename), text))
    if report.leftovers is not None:
        text = "".join(f"{temp.relpath}\n" for temp in sorted(report.leftovers.temp_files, key=str))
        paths.append(_write_atomically(os.path.join(directory, f"{report.name}_leftover.txt"), text))
    summary = json.dumps(report.summary(), indent=2) + "\n"
    paths.append(_write_atomically(os.path.join(directory, f"{report.name}_summary.json"), summary))
    return paths


def _write_atomically(path: str, text: str) -> str:
    """Replace the report file ``path`` durably (temp, fsync, rename, directory fsync); return it."""
    durable.write_file(path, text, mode=0o644)
    return path


# -- the audit ---------------------------------------------------------------------


@dataclass(frozen=True)
class AuditOptions:
    """What the operator asked for (seconds; None disables a threshold)."""

    name: str
    ignore_age: float = DEFAULT_IGNORE_AGE
    inflight_timeout: float = DEFAULT_INFLIGHT_TIMEOUT
    max_missing: int | None = DEFAULT_MAX_MISSING
    max_orphan_fraction: float | None = DEFAULT_MAX_ORPHAN_FRACTION


def run_audit(
    backend: Backend,
    source: InventorySource,
    options: AuditOptions,
    progress: ProgressFactory = no_progress,
    clock: Callable[[], float] = time.time,
) -> AuditReport:
    """Snapshot, list, snapshot again, compare and classify; return the report (nothing is changed).

    Raises StorageUnavailable when the catalog cannot be read.
    """
    started = time.monotonic()
    now = clock()
    report = AuditReport(
        name=options.name,
        backend=backend.name,
        prefix=backend.settings.archive.prefix,
        inventory=source.describe(),
        started_at=now,
        options=vars(options).copy(),
    )
    timer = _Timer(report.durations)

    with timer("inventory_before"):
        operations = source.operations()
        with progress("inventory (before)", None) as update:
            before = source.snapshot(update)
    report.inventory_before = len(before)

    temps: list[str] = []
    with timer("listing"), progress("listing storage", len(before)) as update:
        listed = _list_storage(backend, report.listing_errors, update, temps)
    report.listed = len(listed)

    with timer("inventory_after"):
        operations += source.operations()
        with progress("inventory (after)", None) as update:
            after = source.snapshot(update, digests=True)
    report.inventory_after = len(after)

    with timer("compare"):
        ordered = _sorted_unique(listed)
        report.listed_duplicates = len(listed) - len(ordered)
        report.listed = len(ordered)
        del listed
        with progress("comparing", len(before) + len(ordered)) as update:
            found = _compare(before, after, ordered, update)
        del ordered

    in_flight, abandoned = _split_operations(operations, now - options.inflight_timeout)
    report.abandoned = abandoned
    abandoned_verbs: dict[int, set[str]] = {}
    for op in abandoned:
        abandoned_verbs.setdefault(op.file_id, set()).add(op.verb)
    ignored = dict.fromkeys(
        ("young", "in_flight", "changed_during_audit", "vanished_during_audit", "already_lost"), 0
    )
    ignored["changed_during_audit"] = found.changed
    ignored["already_lost"] = found.known_lost
    young_since = now - options.ignore_age

    with timer("classify"):
        for index in found.missing:
            file_id, stored_at = after.ids[index], after.stored_at[index]
            if file_id in in_flight:
                ignored["in_flight"] += 1
            elif stored_at > young_since:
                ignored["young"] += 1
            else:
                deleted = "DELETE" in abandoned_verbs.get(file_id, ())
                report.missing.append(MissingFile(file_id, after.sizes[index], stored_at, deleted))
        report.reappeared = [(after.ids[i], after.stored_at[i]) for i in found.reappeared]
        with progress("checking orphans", len(found.orphans)) as update:
            for file_id in found.orphans:
                update(1)
                if file_id in in_flight:
                    ignored["in_flight"] += 1
                    continue
                try:
                    status = backend.status(file_id)
                except FileNotInArchive:
                    ignored["vanished_during_audit"] += 1
                    continue
                except ArchiveError as exc:
                    # Age unknown, so it cannot be judged: the listing is incomplete.
                    report.listing_errors.append({"where": f"file {file_id}", "error": str(exc)})
                    continue
                if status.ctime > young_since:
                    ignored["young"] += 1
                    continue
                # Ours: it carries the digest the gateway writes with every upload (the row may have
                # been lost with a power cut, or never written when the catalog failed).
                uploaded = status.sha256 is not None or bool(
                    abandoned_verbs.get(file_id, set()) & UPLOAD_VERBS
                )
                off_disk = sum(status.bytes_per_level[1:])
                report.orphans.append(
                    OrphanFile(file_id, status.size, status.ctime, status.relpath, off_disk, uploaded)
                )
        report.ignored = ignored  # the check below counts files it leaves out there too
        with progress("checking sizes and digests", len(found.present)) as update:
            _check_present(
                backend, source.catalog, after, found.present, in_flight, young_since, report, update
            )
    if source.catalog is not None:
        with timer("leftovers"):
            report.leftovers = leftovers.find(backend, source.catalog, options.inflight_timeout, now, temps)
    report.ignored = ignored
    if report.listing_errors:
        # A file in a part that was not listed would look missing: judge none. Every orphan
        # found is still one (listed, yet in neither snapshot).
        report.missing_judged = False
        report.missing = []
        report.verdict = "incomplete"
        report.durations["total"] = time.monotonic() - started
        return report
    report.exceeded = _exceeded(report, options)
    if report.exceeded:
        report.verdict = "thresholds exceeded"
    elif report.missing or report.orphans or report.reappeared or report.mismatches or _has_leftovers(report):
        report.verdict = "drift"
    else:
        report.verdict = "ok"
    report.durations["total"] = time.monotonic() - started
    return report


def _has_leftovers(report: AuditReport) -> bool:
    found = report.leftovers
    return found is not None and bool(found.temp_files or found.markers)


def _check_present(
    backend: Backend,
    catalog: GatewayCatalog | None,
    after: Snapshot,
    present: array,
    in_flight: set[int],
    young_since: float,
    report: AuditReport,
    update: Callable[[int], object],
) -> None:
    """Compare the size and digest xattr of each file listed and recorded with its row (no bytes read).

    A stat and a getxattr by path per file; a difference is confirmed from one
    open inode against the row read again, so a PUT during the audit is not one.
    """
    path_of = getattr(backend, "path", None)
    digests = after.digests
    if path_of is None or catalog is None or digests is None:
        return
    prefix = os.path.join(backend.settings.archive.prefix, "")
    ignored = report.ignored
    steps = 0
    # Files whose row or inode changed since the audit began are left out: a PUT
    # publishing now records its row a moment later.
    for index in present:
        steps += 1
        if steps == PROGRESS_STEP:
            update(steps)
            steps = 0
        file_id = after.ids[index]
        if after.stored_at[index] > young_since or file_id in in_flight:
            continue
        path = path_of(file_id)
        row_key = digests[index]
        try:
            st = os.stat(path)
            # No digest in the row (a filesystem without xattrs): the size alone is compared.
            digest = read_sha256(path) if row_key else None
        except OSError:
            continue  # not on disk (a tape file released) or gone: the listing judged it
        if st.st_ctime > young_since:
            continue
        if st.st_size == after.sizes[index] and (digest is None or digest_key(digest) == row_key):
            continue
        entry = catalog.entry(file_id)
        found = stored_version(path)
        if entry is None or entry.stored_at != after.stored_at[index] or found is None:
            ignored["changed_during_audit"] += 1
            continue
        disk = found.sha256.hex() if found.sha256 is not None else None
        digest_differs = disk is not None and entry.sha256 is not None and disk != entry.sha256
        if found.size != entry.size or digest_differs:
            relpath = path.removeprefix(prefix)
            report.mismatches.append(
                MismatchFile(file_id, relpath, entry.size, found.size, entry.sha256, disk)
            )
    update(steps)


class _Timer:
    def __init__(self, durations: dict[str, float]) -> None:
        self._durations = durations

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self._durations[what] = time.monotonic() - started


def _list_storage(
    backend: Backend, errors: list[dict[str, str]], update: Callable[[int], object], temps: list[str]
) -> array:
    """Stream the backend's listing into an ``array('q')``; failures to ``errors``, temp files to ``temps``.

    A backend whose ``list_ids`` takes no ``on_error`` stops at its first failure;
    the audit is then just as incomplete, only with one error named instead of all.
    """

    def failed(where: str, error: ArchiveError) -> None:
        errors.append({"where": where, "error": str(error)})

    ids = array("q")
    pending = 0
    handlers = {"on_error": failed, "on_temp": temps.append}
    try:
        taken = _taken_keywords(backend)
        listing = backend.list_ids(**{name: h for name, h in handlers.items() if name in taken})
        for file_id in listing:
            ids.append(file_id)
            pending += 1
            if pending == PROGRESS_STEP:
                update(pending)
                pending = 0
    except (ArchiveError, OSError) as exc:
        errors.append({"where": "listing", "error": str(exc)})
    update(pending)
    return ids


def _taken_keywords(backend: Backend) -> set[str]:
    """Return which of the contract's ``on_error`` and ``on_temp`` the backend's ``list_ids`` takes."""
    try:
        parameters = inspect.signature(backend.list_ids).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return {"on_error", "on_temp"}
    return {"on_error", "on_temp"} & set(parameters)


@dataclass
class _Found:
    missing: array  # indexes into the second snapshot
    orphans: array  # file ids
    reappeared: array  # indexes into the second snapshot
    #: Indexes into the second snapshot of files listed and in both snapshots, same version, not LOST.
    present: array = field(default_factory=lambda: array("q"))
    changed: int = 0
    known_lost: int = 0


def _compare(before: Snapshot, after: Snapshot, listed: array, update: Callable[[int], object]) -> _Found:
    """Merge the three id-sorted columns in one pass.

    Missing: in both snapshots with the same ``stored_at`` and not listed (rows
    marked LOST are counted apart). Orphan: listed and in neither snapshot.
    Reappeared: listed while its row (after) says LOST.
    """
    found = _Found(array("q"), array("q"), array("q"))
    ids1, ids2 = before.ids, after.ids
    n1, n2, nl = len(ids1), len(ids2), len(listed)
    end = 1 << 63  # above every id (ids are at most 2**63 - 1)
    i = j = k = 0
    a = ids1[0] if n1 else end
    b = ids2[0] if n2 else end
    c = listed[0] if nl else end
    steps = 0
    while True:
        m = a if a < b else b
        if c < m:
            m = c
        if m == end:
            break
        if c == m:
            if a != m and b != m:
                found.orphans.append(m)
            elif b == m and after.lost[j]:
                found.reappeared.append(j)
            elif a == m and b == m and before.stored_at[i] == after.stored_at[j]:
                found.present.append(j)
            k += 1
            c = listed[k] if k < nl else end
        elif a == m and b == m:
            if before.stored_at[i] != after.stored_at[j]:
                found.changed += 1
            elif after.lost[j]:
                found.known_lost += 1
            else:
                found.missing.append(j)
        if a == m:
            i += 1
            a = ids1[i] if i < n1 else end
        if b == m:
            j += 1
            b = ids2[j] if j < n2 else end
        steps += 1
        if steps == PROGRESS_STEP:
            update(steps)
            steps = 0
    update(steps)
    return found


def _split_operations(operations: list[Operation], cutoff: float) -> tuple[set[int], list[Operation]]:
    """Return (ids with an operation started after ``cutoff``, operations started before it, once each)."""
    in_flight = {op.file_id for op in operations if op.started_at > cutoff}
    abandoned = {
        (op.file_id, op.verb, op.started_at, op.owner): op for op in operations if op.started_at <= cutoff
    }
    return in_flight, sorted(abandoned.values(), key=lambda op: (op.file_id, op.started_at))


def _exceeded(report: AuditReport, options: AuditOptions) -> list[str]:
    exceeded = []
    if options.max_missing is not None and len(report.missing) > options.max_missing:
        exceeded.append(
            f"{len(report.missing)} missing files is more than --max-missing {options.max_missing}"
        )
    fraction = len(report.orphans) / report.listed if report.listed else 0.0
    if options.max_orphan_fraction is not None and fraction > options.max_orphan_fraction:
        exceeded.append(
            f"{len(report.orphans)} orphans are {fraction:.2%} of the {report.listed} files listed, more "
            f"than --max-orphan-fraction {options.max_orphan_fraction:g}"
        )
    return exceeded


# -- acting on the findings --------------------------------------------------------


@dataclass
class Action:
    """One thing ``--fix`` does to one file; ``result`` is filled in when it runs."""

    kind: str  # quarantine | record | mark_lost | forget | mark_present | rerecord | skip
    file_id: int
    detail: str
    target: str | None = None
    result: str | None = None

    def describe(self) -> str:
        """Say what the action does (and did), for the plan and the report."""
        text = f"{ACTION_LABELS[self.kind]} file {self.file_id}: {self.detail}"
        return text if self.result is None else f"{text} => {self.result}"

    @property
    def outcome(self) -> str:
        """``done``, ``left alone``, ``skipped`` or ``failed`` (None before it ran)."""
        if self.result is None:
            return "planned"
        for outcome in ("left alone", "skipped", "failed"):
            if self.result.startswith(outcome):
                return outcome
        return "done"


ACTION_LABELS = {
    "quarantine": "quarantine",
    "record": "record",
    "mark_lost": "mark LOST",
    "forget": "forget",
    "mark_present": "mark present",
    "rerecord": "re-record",
    "skip": "skip",
}


def plan_fix(
    report: AuditReport, quarantine_dir: str, has_catalog: bool, record_orphans: bool = False
) -> list[Action]:
    """Return what ``--fix`` would do, file by file (the dry run prints exactly this).

    ``record_orphans``: add every orphan to the inventory instead of quarantining it
    (the first audit of an archive that was filled before it had a catalog).
    """
    if report.verdict != "drift":
        return []
    actions = []
    for orphan in report.orphans:
        if orphan.unrecorded_upload and has_catalog:
            actions.append(
                Action("record", orphan.file_id, "stored, but its upload was never recorded: add it")
            )
        elif record_orphans and has_catalog:
            actions.append(Action("record", orphan.file_id, "add it to the inventory (--record-orphans)"))
        elif orphan.off_disk_bytes:
            actions.append(
                Action(
                    "skip", orphan.file_id, "it has a copy off disk (tape); quarantine moves disk files only"
                )
            )
        else:
            target = os.path.join(quarantine_dir, orphan.relpath)
            actions.append(Action("quarantine", orphan.file_id, f"{orphan.relpath} -> {target}", target))
    for missing in report.missing:
        if not has_catalog:
            actions.append(
                Action("skip", missing.file_id, "the inventory is an external list: nothing to mark")
            )
        elif missing.unrecorded_delete:
            actions.append(
                Action(
                    "forget", missing.file_id, "its deletion was never recorded: remove it from the inventory"
                )
            )
        else:
            actions.append(Action("mark_lost", missing.file_id, "gone from storage"))
    if has_catalog:
        for file_id, _ in report.reappeared:
            actions.append(Action("mark_present", file_id, "back in storage"))
        for mismatch in report.mismatches:
            if mismatch.damaged:
                detail = "its bytes changed after ingest (same digest, other size): verify it, restore it"
                actions.append(Action("skip", mismatch.file_id, detail))
            else:
                detail = "its row describes another version: record the version stored"
                actions.append(Action("rerecord", mismatch.file_id, detail))
    return actions


def apply_fix(
    actions: list[Action],
    report: AuditReport,
    backend: Backend,
    catalog: GatewayCatalog | None,
    options: AuditOptions,
    quarantine_dir: str,
    progress: ProgressFactory = no_progress,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Carry out ``actions``, re-checking each file first; return what was done.

    Every action re-checks its file just before acting (a PUT or DELETE may
    have come since the listing) and is skipped, with the reason, if the
    finding no longer holds. Orphans are moved, never deleted.
    """
    started = time.monotonic()
    now = clock()
    young_since = now - options.ignore_age
    in_flight_since = now - options.inflight_timeout
    missing = {m.file_id: m for m in report.missing}
    orphans = {o.file_id: o for o in report.orphans}
    stored_at_of = dict(report.reappeared)
    prefix = backend.settings.archive.prefix
    with progress("fixing", len(actions)) as update:
        for action in actions:
            update(1)
            try:
                if action.kind == "skip":
                    action.result = "skipped"
                elif catalog is not None and catalog.has_operation(action.file_id, in_flight_since):
                    action.result = "left alone: an operation on it started since the audit"
                elif action.kind == "quarantine":
                    assert action.target is not None
                    action.result = _quarantine(
                        catalog,
                        action.file_id,
                        prefix,
                        orphans[action.file_id].relpath,
                        action.target,
                        young_since,
                    )
                elif action.kind == "record":
                    assert catalog is not None
                    action.result = _record(catalog, backend, action.file_id)
                elif action.kind == "rerecord":
                    assert catalog is not None
                    action.result = _rerecord(catalog, backend, action.file_id)
                else:
                    assert catalog is not None
                    action.result = _mark(catalog, backend, action, missing, stored_at_of)
            except (ArchiveError, OSError) as exc:
                action.result = f"failed: {exc}"
    counts = dict.fromkeys(("done", "left alone", "skipped", "failed"), 0)
    for action in actions:
        counts[action.outcome] += 1
    swept: dict[str, Any] | None = None
    if catalog is not None and report.leftovers is not None and _has_leftovers(report):
        # Temp files of dead writers, and dead uploads' markers (their rows settled from storage).
        swept = leftovers.remove(backend, catalog, report.leftovers).summary()
    cleared: int | str = 0
    if catalog is not None:
        # Markers of operations that will never finish; their files were judged above.
        try:
            cleared = catalog.clear_operations(in_flight_since)
        except ArchiveError as exc:
            cleared = f"failed: {exc}"
    return {
        "dry_run": False,
        "quarantine_dir": quarantine_dir,
        "actions": [
            {"action": a.kind, "file": a.file_id, "detail": a.detail, "result": a.result} for a in actions
        ],
        "counts": counts,
        "abandoned_operations_cleared": cleared,
        "leftovers_removed": swept,
        "seconds": round(time.monotonic() - started, 3),
    }


def _quarantine(
    catalog: GatewayCatalog | None, file_id: int, prefix: str, relpath: str, target: str, young_since: float
) -> str:
    """Move one orphan's disk file to ``target`` (keeping its bytes, digest xattr and times).

    The file is first renamed aside to a hidden name in its own directory (atomic,
    and listings skip hidden names); if the inode moved is not the one checked, an
    upload got there first, and the file is put back. The checked file is held open
    until that comparison: a freed inode number can go to the next new file at once.
    """
    if catalog is not None and catalog.entry(file_id) is not None:
        return "left alone: the inventory has it now"
    source = os.path.join(prefix, relpath)
    directory, name = os.path.split(source)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return "left alone: it is gone from storage"
    try:
        st = os.fstat(fd)
        if st.st_ctime > young_since:
            return "left alone: it changed since the audit"
        aside = os.path.join(directory, f".{name}.{os.getpid()}-{time.monotonic_ns()}.quarantine")
        os.rename(source, aside)
        moved = os.lstat(aside)
        if (moved.st_ino, moved.st_dev) != (st.st_ino, st.st_dev):
            # An upload replaced the file between the check and the rename: the new one stays.
            _put_back(aside, source)
            return "left alone: it was replaced during the fix"
    finally:
        os.close(fd)
    fsync_dir(directory)
    try:
        final = _free_name(target)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        # Durable in both directories; to another filesystem: a durable copy, its temp removed on failure.
        durable.move_file(aside, final, replace=False)
    except BaseException:
        _put_back(aside, source)
        raise
    return f"moved to {final}"


def _put_back(aside: str, source: str) -> None:
    """Return a file set aside to its archive name (unless a newer upload holds it)."""
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.link(aside, source)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(aside)
    fsync_dir(os.path.dirname(source))


def _free_name(target: str) -> str:
    """Return ``target``, or ``target.N`` for the first N not taken (an earlier fix of the same id)."""
    candidate, number = target, 0
    while os.path.lexists(candidate):
        number += 1
        candidate = f"{target}.{number}"
    return candidate


def _record(catalog: GatewayCatalog, backend: Backend, file_id: int) -> str:
    try:
        status = backend.status(file_id)
    except FileNotInArchive:
        return "left alone: it is gone from storage"
    if not catalog.record(file_id, status.size, status.mtime, status.sha256, status.ctime):
        return "left alone: the inventory has it now"
    return "recorded"


def _rerecord(catalog: GatewayCatalog, backend: Backend, file_id: int) -> str:
    probe = storage_probe(backend, file_id)
    if probe is None:
        return "skipped: this backend has no disk path to read"
    catalog.settle(file_id, probe, (), forget_absent=False)
    return "re-recorded"


def _mark(
    catalog: GatewayCatalog,
    backend: Backend,
    action: Action,
    missing: dict[int, MissingFile],
    stored_at_of: dict[int, float],
) -> str:
    file_id = action.file_id
    try:
        backend.status(file_id)
        present = True
    except FileNotInArchive:
        present = False
    if action.kind == "mark_present":
        if not present:
            return "left alone: it is gone from storage again"
        changed = not catalog.mark_present(file_id, stored_at_of[file_id])
        return "left alone: its inventory row changed" if changed else "marked present"
    if present:
        return "left alone: it is back in storage"
    stored_at = missing[file_id].stored_at
    if action.kind == "forget":
        changed = not catalog.forget(file_id, stored_at)
        return "left alone: its inventory row changed" if changed else "removed from the inventory"
    changed = not catalog.mark_lost(file_id, stored_at)
    return "left alone: its inventory row changed" if changed else "marked LOST"
