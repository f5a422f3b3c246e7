"""The sideband maintenance command: ``sideband load``.

``load`` builds or refreshes the sideband database from a scan of the disk
cache and the tape catalog (what an Oracle HSM site does from a samfsdump):
``--dry-run`` prints what would change and changes nothing. Only for the
emulated HSM (``[sideband] hsm = emulator``, or ``backend = tape`` with a
``[sideband] database``): with an external HSM its own updater owns the tables.
Exit status: 0 done (or nothing to do), 1 the database or the storage failed,
2 configuration errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from pacifica_like.cli.args import add_output_flags, progress_disabled
from pacifica_like.core.config import ConfigError, Settings, redact_url
from pacifica_like.core.errors import ArchiveError

#: The top-level commands this module runs.
COMMANDS = ("sideband",)


def add_commands(commands: argparse._SubParsersAction, settings_arguments: Callable) -> None:
    """Add ``sideband load`` to the CLI's parser."""
    sideband = commands.add_parser("sideband", help="maintain the sideband (HSM status) database")
    actions = sideband.add_subparsers(dest="sideband_command", metavar="ACTION", required=True)
    load = actions.add_parser(
        "load",
        help="build or refresh the sideband database from the disk cache and the tape catalog",
        description="Build or refresh the sideband database from a scan of the disk cache "
        "and the tape catalog.",
    )
    settings_arguments(load)
    load.add_argument("-n", "--dry-run", action="store_true", help="print what would change, change nothing")
    add_output_flags(load, "print the result as JSON")


def _open_backend(settings: Settings) -> Any:
    """Open the configured backend with the updater of its sideband database (``sideband_updater()``)."""
    from pacifica_like.storage import registry
    from pacifica_like.storage.contract import KeepsSideband, TapeManaged

    chosen = registry.backend_class(settings)
    where = settings.source_of("archive", "backend")
    if not (issubclass(chosen, TapeManaged) and issubclass(chosen, KeepsSideband)):
        if settings.archive.backend.lower() in ("sideband", "hsm_sideband"):
            raise ConfigError(
                f"{settings.source_of('sideband', 'hsm')}: with an external HSM its own database "
                "updater keeps the sideband tables; `sideband load` only serves the emulated HSM"
            )
        raise ConfigError(
            f"{where}: sideband load needs backend = sideband (or tape), not {settings.archive.backend!r}"
        )
    registry.check(settings)
    backend = registry.create(settings)
    if backend.sideband_updater() is None:  # type: ignore[attr-defined]
        backend.close()
        raise ConfigError("backend = tape keeps no sideband database: set [sideband] database")
    return backend


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``sideband load``; return the exit status."""
    from tqdm import tqdm

    from pacifica_like.storage.sideband.load import plan_load, run_load

    backend = _open_backend(settings)
    try:
        updater = backend.sideband_updater()
        url = redact_url(settings.sideband_url())
        disable = progress_disabled(args.progress)
        with tqdm(desc="scan", unit=" files", disable=disable) as bar:
            plan = plan_load(updater, bar.update, create=not args.dry_run)
        document: dict[str, object] = {"database": url, "dry_run": args.dry_run, **plan.summary()}
        if args.dry_run:
            document["files"] = {"add": plan.add, "update": plan.update, "remove": plan.remove}
            if args.json:
                print(json.dumps(document, indent=2))
            else:
                for kind in ("add", "update", "remove"):
                    for file_id in getattr(plan, kind):
                        print(f"would {kind} the rows of file {file_id}")
                print(
                    f"dry run against {url}: would add {len(plan.add)}, update {len(plan.update)} and remove "
                    f"{len(plan.remove)} files' rows; {plan.unchanged} already right; nothing was changed"
                )
            return 0
        with tqdm(total=len(plan.changes), desc="load", unit=" files", disable=disable) as bar:
            document["changed"] = run_load(updater, plan, bar.update)
        if args.json:
            print(json.dumps(document, indent=2))
        else:
            print(
                f"sideband load into {url}: {document['changed']} files' rows written "
                f"(added {len(plan.add)}, updated {len(plan.update)}, removed {len(plan.remove)}); "
                f"{plan.unchanged} already right"
            )
        return 0
    except ArchiveError as exc:
        print(f"pacifica-like sideband load: {exc}", file=sys.stderr)
        return 1
    finally:
        backend.close()
