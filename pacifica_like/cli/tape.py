"""The tape maintenance commands: ``tape init|status``, ``migrate``, ``release``, ``stage``, ``verify``.

Every command that changes data takes ``--dry-run``, which prints the plan
(files, volumes, offsets, refusals) from the same planning code the real run
uses, and changes nothing. Long runs show a progress bar on a terminal.
Exit status: 0 success, 1 when any file failed (or verification found a
mismatch or an unreadable copy), 2 for configuration errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pacifica_like.cli.args import add_output_flags, fraction, parse_age, progress_disabled
from pacifica_like.core.config import ConfigError, Settings
from pacifica_like.core.errors import ArchiveError, InvalidRequest
from pacifica_like.core.ids import parse_id

if TYPE_CHECKING:
    from pacifica_like.storage.hsm import TapeHsm
    from pacifica_like.storage.tape.operations import Outcome, Step

#: The top-level commands this module runs.
COMMANDS = ("tape", "migrate", "release", "stage", "verify")


def _file_id(raw: str) -> int:
    try:
        return parse_id(raw)
    except (ValueError, InvalidRequest) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def human(size: float) -> str:
    """Format a byte count with binary units.

    >>> human(512), human(4096), human(3 * 2**30)
    ('512 B', '4.0 KiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def add_commands(commands: argparse._SubParsersAction, settings_arguments: Callable) -> None:
    """Add the tape sub-commands to the CLI's parser."""
    tape = commands.add_parser("tape", help="create or inspect the emulated tape library")
    tape_commands = tape.add_subparsers(dest="tape_command", metavar="ACTION", required=True)
    init = tape_commands.add_parser("init", help="create the library directory, catalog, volumes and drives")
    settings_arguments(init)
    status = tape_commands.add_parser("status", help="show volumes, fill, drives and counters")
    settings_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")

    for name, text in (
        ("migrate", "write REGULAR files to tape (REGULAR -> DUAL)"),
        ("release", "drop the disk copy of files with a verified tape copy (DUAL -> OFFLINE)"),
        ("stage", "recall OFFLINE files to disk in tape order (OFFLINE -> DUAL)"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        settings_arguments(command)
        command.add_argument("ids", nargs="*", type=_file_id, metavar="ID", help="file ids")
        command.add_argument("--all", action="store_true", help="every file this action applies to")
        command.add_argument(
            "--older-than", type=parse_age, metavar="AGE", help="only files whose mtime is older (30d, 12h)"
        )
        _add_run_flags(command)
        if name == "stage":
            command.add_argument("--drives", type=int, help="drives to use (default: all)")
        if name == "migrate":
            command.add_argument(
                "--drives", type=int, help="drives to write with at once (default: [tape] migration_drives)"
            )

    verify = commands.add_parser(
        "verify", help="fixity check: read a sample of each volume's files back through the stager"
    )
    settings_arguments(verify)
    verify.add_argument(
        "--fraction", type=fraction, default=0.25, help="share of each volume's files (default 0.25)"
    )
    verify.add_argument("--seed", help="make the sample reproducible")
    verify.add_argument(
        "--max-age-days",
        type=float,
        default=180.0,
        help="always include copies not verified for this many days (default 180)",
    )
    verify.add_argument("--drives", type=int, help="drives to use in parallel (default: all)")
    _add_run_flags(verify)


def _add_run_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("-n", "--dry-run", action="store_true", help="print the plan, change nothing")
    add_output_flags(command, "print the result as JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one tape command; return the exit status."""
    if args.command == "tape" and args.tape_command == "init":
        _require_tape(settings)
        return tape_init(settings)
    backend = _open_backend(settings)
    try:
        if args.command == "tape":
            return tape_status(backend, args.json)
        if args.command == "verify":
            return verify(backend, args)
        return move(backend, args)
    except ArchiveError as exc:
        print(f"pacifica-like {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        backend.close()


def _require_tape(settings: Settings) -> None:
    from pacifica_like.storage import registry
    from pacifica_like.storage.contract import TapeManaged

    try:
        backend_class = registry.backend_class(settings)
    except ConfigError:
        backend_class = None
    if backend_class is None or not issubclass(backend_class, TapeManaged):
        where = settings.source_of("archive", "backend")
        raise ConfigError(
            f"{where}: tape commands need backend = tape (or sideband with the emulated HSM), "
            f"not {settings.archive.backend!r}"
        )


def _open_backend(settings: Settings) -> TapeHsm:
    from pacifica_like.storage import registry
    from pacifica_like.storage.contract import TapeManaged

    _require_tape(settings)
    registry.check(settings)
    # The configured backend (tape, or sideband whose tables follow every change), not a bare tape HSM.
    backend = registry.create(settings)
    assert isinstance(backend, TapeManaged)
    return backend  # type: ignore[return-value]


def tape_init(settings: Settings) -> int:
    """Create (or extend) the library the settings describe."""
    from pacifica_like.storage.tape.library import TapeLibrary

    library = TapeLibrary(settings.tape, require_stager=False)
    try:
        volumes, drives = library.initialise()
    finally:
        library.catalog.close()
    tape = settings.tape
    print(
        f"tape library {tape.library}: {tape.volumes} volumes of {human(tape.volume_capacity)}, "
        f"{tape.drives} drives ({len(volumes)} volumes and {len(drives)} drives added)"
    )
    return 0


def tape_status(backend: TapeHsm, as_json: bool) -> int:
    """Print volumes, drives and counters."""
    catalog = backend.catalog
    drives = backend.library.drives()
    in_drive = {d.vsn: d.name for d in drives if d.vsn}
    volumes = [
        {
            "vsn": v.vsn,
            "capacity": v.capacity,
            "used": v.fill,
            "records": v.records,
            "full": v.full,
            "mounted_in": in_drive.get(v.vsn),
        }
        for v in catalog.Volume.select().order_by(catalog.Volume.vsn)
    ]
    document = {
        "library": backend.library.directory,
        "volumes": volumes,
        "drives": [vars(d) for d in drives],
        "counters": backend.library.counters(),
    }
    if as_json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"library {document['library']}")
    print(f"{'VSN':10} {'capacity':>12} {'used':>12} {'fill':>7} {'records':>8}  state")
    for v in volumes:
        fill = 100.0 * v["used"] / v["capacity"]
        state = "full" if v["full"] else "ok"
        if v["mounted_in"]:
            state += f", in {v['mounted_in']}"
        print(
            f"{v['vsn']:10} {human(v['capacity']):>12} {human(v['used']):>12} {fill:6.2f}% "
            f"{v['records']:>8}  {state}"
        )
    print(
        f"\n{'drive':8} {'volume':10} {'state':6} {'mounts':>7} {'unmounts':>9} "
        f"{'located':>11} {'read':>11} {'written':>11}"
    )
    for d in drives:
        print(
            f"{d.name:8} {d.vsn or '-':10} {'busy' if d.owner else 'idle':6} {d.mounts:>7} {d.unmounts:>9} "
            f"{human(d.bytes_located):>11} {human(d.bytes_read):>11} {human(d.bytes_written):>11}"
        )
    totals = document["counters"]
    print(
        f"{'total':8} {'':10} {'':6} {totals['mounts']:>7} {totals['unmounts']:>9} "
        f"{human(totals['bytes_located']):>11} {human(totals['bytes_read']):>11} "
        f"{human(totals['bytes_written']):>11}"
    )
    return 0


def _select(backend: TapeHsm, args: argparse.Namespace) -> list[int]:
    """Return the ids a command acts on: the ones named, or every one with --all, filtered by age."""
    if args.all and args.ids:
        raise ConfigError("give file ids or --all, not both")
    if not args.all and not args.ids:
        raise ConfigError(f"{args.command}: name file ids, or pass --all")
    ids = sorted(set(backend.list_ids())) if args.all else list(dict.fromkeys(args.ids))
    if args.older_than is not None:
        cutoff = time.time() - args.older_than
        kept = []
        for file_id in ids:
            try:
                if backend.status(file_id).mtime < cutoff:
                    kept.append(file_id)
            except ArchiveError:
                kept.append(file_id)  # the plan reports why it cannot act on it
        ids = kept
    return ids


@contextmanager
def _progress_bar(args: argparse.Namespace, total: int, what: str) -> Iterator[Callable[[int], None]]:
    from tqdm import tqdm

    disable = progress_disabled(args.progress)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=disable) as bar:
        yield bar.update


_VERB = {"migrate": "migrate", "release": "release", "stage": "recall"}


def move(backend: TapeHsm, args: argparse.Namespace) -> int:
    """Plan and run migrate, release or stage."""
    from pacifica_like.storage.tape import operations

    ids = _select(backend, args)
    planner = {
        "migrate": operations.plan_migrate,
        "release": operations.plan_release,
        "stage": operations.plan_recall,
    }[args.command]
    # Files pinned by bulk stage requests stay on disk: release skips them, naming the pin.
    pinned = _pin_lookup(backend.settings) if args.command == "release" else None
    drives = 1
    if args.command == "migrate":
        drives = operations.migration_drives(backend, args.drives)
        steps = operations.plan_migrate(backend, ids, drives)
    else:
        steps = operations.plan_release(backend, ids, pinned) if pinned else planner(backend, ids)
    if args.all:
        # Files the action does not apply to are not news when nobody named them.
        steps = [s for s in steps if s.action != "skip"]
    action = _VERB[args.command]
    chosen = [s for s in steps if s.action == action]
    if args.dry_run:
        return _print_plan(steps, action, args.json, drives if args.command == "migrate" else None)
    total = sum(s.size for s in chosen)
    with _progress_bar(args, total, args.command) as progress:
        if args.command == "migrate":
            outcome = operations.run_migrate(backend, steps, progress, drives)
        elif args.command == "release":
            outcome = operations.run_release(backend, steps, progress, pinned)
        else:
            outcome = operations.run_recall(backend, steps, args.drives, progress)
    return _print_outcome(outcome, action, args.json)


def _pin_lookup(settings: Settings) -> Callable[[list[int]], dict[int, float]] | None:
    """Return the bulk-staging pin lookup of the gateway catalog (None when the catalog is off)."""
    from pacifica_like.bulk.store import BulkStore

    url = settings.archive.catalog
    if not url or (url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///") :])):
        return None  # no catalog yet, so no bulk request has pinned anything
    return BulkStore.open(url).pins


def _describe(step: Step, action: str) -> str:
    size = human(step.size)
    if step.action == "migrate":
        return f"migrate file {step.file_id} ({size}) to {step.vsn} at byte {step.offset}"
    if step.action == "release":
        return (
            f"release file {step.file_id} ({size} on disk; verified copy on {step.vsn} at byte {step.offset})"
        )
    if step.action == "recall":
        return f"recall file {step.file_id} ({size}) from {step.vsn} at byte {step.offset}"
    return f"{step.action} file {step.file_id}: {step.reason}"


def _print_plan(steps: list[Step], action: str, as_json: bool, drives: int | None = None) -> int:
    chosen = [s for s in steps if s.action == action]
    volumes = sorted({s.vsn for s in chosen if s.vsn})
    if as_json:
        document = {
            "dry_run": True,
            "action": action,
            "files": [vars(s) for s in steps],
            "volumes": volumes,
            "bytes": sum(s.size for s in chosen),
            **({"drives": drives} if drives is not None else {}),
        }
        print(json.dumps(document, indent=2))
        return 0
    for step in steps:
        prefix = "would " if step.action == action else ""
        print(prefix + _describe(step, action))
    print(
        f"dry run: would {action} {len(chosen)} files ({human(sum(s.size for s in chosen))}) "
        f"on {len(volumes)} volumes {' '.join(volumes)}"
        f"{f', {drives} at once (one per drive)' if drives is not None and drives > 1 else ''}; "
        f"{len(steps) - len(chosen)} not applicable; nothing was changed"
    )
    return 0


def _print_outcome(outcome: Outcome, action: str, as_json: bool) -> int:
    summary = outcome.summary()
    if as_json:
        print(json.dumps({"action": action, **summary}, indent=2))
    else:
        for file_id, error in outcome.failed:
            print(f"failed file {file_id}: {error}", file=sys.stderr)
        counters = outcome.counters
        print(
            f"{action}: {summary['files']} files, {human(outcome.bytes)} in {summary['seconds']} s "
            f"({summary['mib_per_second']} MiB/s); {len(outcome.skipped)} skipped, "
            f"{len(outcome.failed)} failed; mounts {counters.get('mounts', 0)}, "
            f"located {human(counters.get('bytes_located', 0))}"
        )
    return 1 if outcome.failed else 0


def verify(backend: TapeHsm, args: argparse.Namespace) -> int:
    """Sample, verify, report per volume and as JSON; exit 1 on any mismatch or unreadable copy."""
    from pacifica_like.storage.tape import operations

    plan = operations.plan_verify(backend, args.fraction, args.seed, args.max_age_days)
    if args.dry_run:
        document = {
            "dry_run": True,
            "volumes": {
                vsn: [{"file": c.file_id, "offset": c.offset, "size": c.size} for c in copies]
                for vsn, copies in plan.items()
            },
        }
        if args.json:
            print(json.dumps(document, indent=2))
        else:
            for vsn, copies in plan.items():
                size = human(sum(c.size for c in copies))
                print(
                    f"would verify {len(copies)} files ({size}) on {vsn}: ids {[c.file_id for c in copies]}"
                )
            print(f"dry run: {len(plan)} volumes; nothing was read or changed")
        return 0
    total = sum(c.size for copies in plan.values() for c in copies)
    with _progress_bar(args, total, "verify") as progress:
        checks, outcome = operations.run_verify(backend, plan, args.drives, progress)
    mismatches = sum(len(c.mismatches) for c in checks)
    unreadable = sum(len(c.unreadable) for c in checks)
    summary = {
        "volumes": [c.report() for c in checks],
        "files": sum(c.files for c in checks),
        "bytes": sum(c.bytes for c in checks),
        "mismatches": mismatches,
        "unreadable": unreadable,
        "seconds": round(outcome.seconds, 3),
        "counters": outcome.counters,
        "ok": mismatches == 0 and unreadable == 0,
    }
    if not args.json:
        print(f"{'VSN':10} {'files':>6} {'bytes':>11} {'mismatch':>9} {'unreadable':>11} {'seconds':>8}")
        for c in checks:
            print(
                f"{c.vsn:10} {c.files:>6} {human(c.bytes):>11} {len(c.mismatches):>9} "
                f"{len(c.unreadable):>11} {c.seconds:>8.2f}"
                + (f"  mismatched ids {c.mismatches}" if c.mismatches else "")
                + (f"  unreadable ids {c.unreadable}" if c.unreadable else "")
                + (f"  ({c.error})" if c.error else "")
            )
        print("summary: " + json.dumps(summary))
    else:
        print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1
