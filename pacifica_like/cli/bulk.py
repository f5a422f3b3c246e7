"""``pacifica-like worker``: run the bulk-staging recall scheduler on its own.

For deployments where ``pacifica-like serve`` does not run it in-process:
under uWSGI (beside the workers, e.g. ``--attach-daemon2``), or on another
host sharing the catalog database and the storage. Any number of workers may
share one catalog; they coordinate through row claims. SIGTERM or SIGINT
stops taking work, lets the recalls in flight finish and gives volumes back.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from pacifica_like.core.config import ConfigError, Settings

#: The top-level commands this module runs.
COMMANDS = ("worker",)

log = logging.getLogger("pacifica_like.bulk")


def add_commands(commands: argparse._SubParsersAction, settings_arguments: Callable) -> None:
    """Add ``worker`` to the CLI's parser."""
    worker = commands.add_parser("worker", help="run the bulk-staging recall scheduler (no HTTP)")
    settings_arguments(worker)
    worker.add_argument(
        "--until-idle",
        action="store_true",
        help="exit once no recall is queued or running (for batch use); default: run until stopped",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the scheduler in the foreground; exit status 0 when stopped cleanly, 2 on configuration errors."""
    from pacifica_like.bulk.scheduler import Scheduler
    from pacifica_like.storage import registry

    if not settings.archive.catalog:
        raise ConfigError("pacifica-like worker needs the gateway catalog ([archive] catalog is off)")
    backend = registry.create(settings)
    scheduler = Scheduler.from_settings(settings, backend)
    try:
        if args.until_idle:
            scheduler.run_until_idle()
            scheduler.stop()
            return 0
        stopping = threading.Event()

        def stop(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping after the recalls in flight", signum)
            stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        scheduler.start()
        while not stopping.wait(3600):
            pass
        scheduler.stop()
        return 0
    finally:
        backend.close()
        scheduler.store.close()
