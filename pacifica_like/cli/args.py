"""Argument types and flags the maintenance commands share (tape commands, audit)."""

from __future__ import annotations

import argparse
import re

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: --progress choice -> tqdm's ``disable`` (None: draw only on a terminal).
_PROGRESS = {"auto": None, "always": False, "never": True}


def parse_age(raw: str) -> float:
    """Parse an age such as ``90s``, ``15m``, ``12h``, ``30d`` or ``2w`` into seconds.

    >>> parse_age("12h"), parse_age("30d"), parse_age("45")
    (43200.0, 2592000.0, 45.0)
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*", raw)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected an age like 90s, 15m, 12h or 30d, got {raw!r}")
    return float(match.group(1)) * _AGE_UNITS[match.group(2) or "s"]


def fraction(raw: str) -> float:
    """Parse a share between 0 and 1."""
    value = float(raw)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {raw}")
    return value


def add_output_flags(command: argparse.ArgumentParser, json_help: str) -> None:
    """Add ``--json`` and ``--progress auto|always|never``."""
    command.add_argument("--json", action="store_true", help=json_help)
    command.add_argument(
        "--progress",
        choices=tuple(_PROGRESS),
        default="auto",
        help="progress bars on stderr (auto: when it is a terminal)",
    )


def progress_disabled(mode: str) -> bool | None:
    """Return tqdm's ``disable`` for a ``--progress`` choice."""
    return _PROGRESS[mode]
