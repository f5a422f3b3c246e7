"""``pacifica-like audit``: find missing, orphan and mismatched files; with ``--fix``, act on them.

Reports go to the current directory: ``NAME_missing.txt``, ``NAME_orphan.txt``,
``NAME_mismatch.txt`` (sorted ids, one per line), ``NAME_leftover.txt`` (temp
files of dead uploads) and ``NAME_summary.json``. Without ``--fix`` nothing
in the archive changes; ``--fix --dry-run`` prints what ``--fix`` would do.

Exit status: 0 no drift; 1 drift found (acted on with ``--fix``), thresholds
exceeded or listing incomplete (nothing acted on: the verdict says which);
2 the audit could not run: bad settings or flags, an inventory file with
lines that are not ids, the catalog database unavailable or not created yet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator

from pacifica_like.cli.args import add_output_flags, fraction, parse_age, progress_disabled
from pacifica_like.cli.tape import human
from pacifica_like.core.config import ConfigError, Settings
from pacifica_like.core.errors import ArchiveError
from pacifica_like.gateway import audit

COMMANDS = ("audit",)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _name(raw: str) -> str:
    if not _NAME.fullmatch(raw):
        raise argparse.ArgumentTypeError(
            f"a report name is letters, digits, '.', '_' and '-' (it names files), got {raw!r}"
        )
    return raw


def _count(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {raw}")
    return value


def add_commands(commands: argparse._SubParsersAction, settings_arguments: Callable) -> None:
    """Add ``audit`` to the CLI's parser."""
    text = "compare the inventory with the storage: report missing and orphan files"
    command = commands.add_parser("audit", help=text, description=text)
    settings_arguments(command)
    command.add_argument(
        "--name", required=True, type=_name, help="names the reports: NAME_missing.txt, NAME_orphan.txt..."
    )
    command.add_argument(
        "--inventory",
        metavar="FILE",
        help="compare with this list of ids (one per line) instead of the catalog's inventory",
    )
    command.add_argument(
        "--ignore-age",
        type=parse_age,
        default=audit.DEFAULT_IGNORE_AGE,
        metavar="AGE",
        help="leave out files stored or changed less than AGE ago (seconds, or 90m, 12h, 2d; default 86400)",
    )
    command.add_argument(
        "--inflight-timeout",
        type=parse_age,
        default=audit.DEFAULT_INFLIGHT_TIMEOUT,
        metavar="AGE",
        help="an operation marker older than this was abandoned (default 86400)",
    )
    command.add_argument(
        "--max-missing",
        type=_count,
        default=audit.DEFAULT_MAX_MISSING,
        metavar="N",
        help=f"act on nothing if more files are missing (default {audit.DEFAULT_MAX_MISSING})",
    )
    command.add_argument(
        "--max-orphan-fraction",
        type=fraction,
        default=audit.DEFAULT_MAX_ORPHAN_FRACTION,
        metavar="F",
        help="act on nothing if orphans are more than this share of the files listed "
        f"(default {audit.DEFAULT_MAX_ORPHAN_FRACTION:g})",
    )
    command.add_argument(
        "--fix", action="store_true", help="quarantine orphans and mark missing files LOST in the catalog"
    )
    command.add_argument(
        "--record-orphans",
        action="store_true",
        help="with --fix: add orphans to the inventory instead of quarantining them "
        "(an archive filled before it had a catalog)",
    )
    command.add_argument(
        "--quarantine",
        metavar="DIR",
        help="where --fix moves orphans, keeping their paths (default: PREFIX/.quarantine/NAME)",
    )
    command.add_argument(
        "-n", "--dry-run", action="store_true", help="with --fix: print the plan, change nothing"
    )
    add_output_flags(command, "print the summary as JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the audit; return the exit status (module docstring)."""
    from pacifica_like.gateway.catalog import GatewayCatalog
    from pacifica_like.storage import registry

    options = audit.AuditOptions(
        name=args.name,
        ignore_age=args.ignore_age,
        inflight_timeout=args.inflight_timeout,
        max_missing=args.max_missing,
        max_orphan_fraction=args.max_orphan_fraction,
    )
    if args.record_orphans and not args.fix:
        raise ConfigError("--record-orphans says what --fix does with orphans; it needs --fix")
    if args.dry_run and not args.fix:
        print(
            "pacifica-like audit: --dry-run without --fix changes nothing anyway; reporting only",
            file=sys.stderr,
        )
    try:
        if args.inventory is not None:
            source: audit.InventorySource = audit.FileInventory(args.inventory)
        elif settings.archive.catalog is None:
            where = settings.source_of("archive", "catalog")
            raise ConfigError(f"{where}: the catalog is off, so there is no inventory; pass --inventory FILE")
        else:
            catalog = GatewayCatalog(settings.archive.catalog)
            catalog.require_existing()
            source = audit.CatalogInventory(catalog)
    except audit.BadInventoryFile as exc:
        print(f"pacifica-like audit: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pacifica-like audit: inventory file {args.inventory}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ArchiveError as exc:
        print(f"pacifica-like audit: {exc}; nothing was audited", file=sys.stderr)
        return 2

    backend = registry.create(settings)
    try:
        progress = _progress_factory(args.progress)
        try:
            report = audit.run_audit(backend, source, options, progress)
        except ArchiveError as exc:
            print(f"pacifica-like audit: {exc}; nothing was acted on", file=sys.stderr)
            return 2
        quarantine = os.path.abspath(
            args.quarantine or os.path.join(settings.archive.prefix, ".quarantine", args.name)
        )
        if args.fix:
            actions = audit.plan_fix(report, quarantine, source.catalog is not None, args.record_orphans)
            if report.verdict != "drift":
                report.fix = {
                    "dry_run": args.dry_run,
                    "actions": [],
                    "refused": f"verdict is {report.verdict}",
                }
            elif args.dry_run:
                report.fix = {
                    "dry_run": True,
                    "quarantine_dir": quarantine,
                    "actions": [{"action": a.kind, "file": a.file_id, "detail": a.detail} for a in actions],
                }
            else:
                report.fix = audit.apply_fix(
                    actions, report, backend, source.catalog, options, quarantine, progress
                )
        try:
            paths = audit.write_reports(report, os.getcwd())
        except OSError as exc:
            print(f"pacifica-like audit: cannot write the reports here: {exc}", file=sys.stderr)
            return 2
        if source.catalog is not None:
            # For /metrics: the servers read the latest outcome per name from the catalog.
            judged = report.summary()
            try:
                source.catalog.record_audit(
                    report.name,
                    report.verdict,
                    judged["missing"]["count"],
                    judged["orphan"]["count"],
                    judged["storage"]["listed"],
                )
            except ArchiveError as exc:
                print(f"pacifica-like audit: the result is not in /metrics: {exc}", file=sys.stderr)
    finally:
        backend.close()
        if source.catalog is not None:
            source.catalog.close()
    summary = report.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_text(report, summary, paths)
    return 0 if report.verdict == "ok" else 1


@contextlib.contextmanager
def _bar(disable: bool | None, label: str, total: int | None) -> Iterator[Callable[[int], object]]:
    from tqdm import tqdm

    with tqdm(total=total, desc=label, unit=" files", unit_scale=True, disable=disable, leave=False) as bar:
        yield bar.update


def _progress_factory(mode: str) -> audit.ProgressFactory:
    disable = progress_disabled(mode)
    return lambda label, total: _bar(disable, label, total)


def _print_text(report: audit.AuditReport, summary: dict, paths: list[str]) -> None:
    inventory = summary["inventory"]
    source = inventory.get("catalog") or inventory.get("path")
    print(f"audit {report.name}: {report.backend} archive {report.prefix}")
    print(f"  inventory: {inventory['source']} {source}")
    print(
        f"  inventory {inventory['before']} entries before the listing, {inventory['after']} after; "
        f"storage {report.listed} files listed in {summary['durations'].get('listing', 0):.2f} s"
    )
    for error in report.listing_errors:
        print(f"  not listed: {error['where']}: {error['error']}")
    missing, orphan = summary["missing"], summary["orphan"]
    if missing["count"] is None:
        missing_text = "missing: not judged (part of the storage was not listed)"
    else:
        size = "size unknown" if missing["bytes"] is None else human(missing["bytes"])
        missing_text = f"missing {missing['count']} ({size})"
    mismatch = summary["mismatch"]
    print(
        f"  {missing_text}, orphan {orphan['count']} ({human(orphan['bytes'])}), "
        f"mismatch {mismatch['count']} ({mismatch['size_differs']} size, {mismatch['digest_differs']} digest)"
    )
    found = summary["leftovers"]
    if found and (found["temp_files"] or found["dead_markers"]):
        print(
            f"  leftovers of dead uploads: {found['temp_files']} temp file(s) "
            f"({human(found['temp_bytes'])}), {found['dead_markers']} marker(s)"
        )
    if report.reappeared:
        print(f"  back in storage after being marked LOST: {len(report.reappeared)}")
    ignored = ", ".join(
        f"{count} {what.replace('_', ' ')}" for what, count in report.ignored.items() if count
    )
    if ignored:
        print(f"  left out: {ignored}")
    for reason in report.exceeded:
        print(f"  threshold exceeded: {reason}")
    fix = report.fix
    if fix is not None:
        for action in fix.get("actions", []):
            done = audit.Action(
                action["action"], action["file"], action["detail"], result=action.get("result")
            )
            print(f"  {'would ' if fix.get('dry_run') else ''}{done.describe()}")
        if fix.get("leftovers_removed"):
            removed = fix["leftovers_removed"]
            print(f"  removed {removed['temp_files']} temp file(s) and {removed['dead_markers']} marker(s)")
        if "counts" in fix:
            print("  fix: " + ", ".join(f"{count} {outcome}" for outcome, count in fix["counts"].items()))
        if fix.get("refused"):
            print(f"  --fix refused: {fix['refused']}; nothing was changed")
        elif fix.get("dry_run"):
            print("  dry run: nothing was changed")
    print(f"  reports: {', '.join(os.path.basename(p) for p in paths)}")
    print(f"verdict: {report.verdict}")
