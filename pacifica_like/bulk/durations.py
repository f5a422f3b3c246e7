"""ISO 8601 durations as the WLCG Tape REST API's ``diskLifetime`` carries them (``PT1H``, ``P2D``)."""

from __future__ import annotations

import re

_DURATION = re.compile(
    r"P(?:(?P<weeks>\d+(?:\.\d+)?)W)?(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?"
)
_SECONDS = {"weeks": 604800, "days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


def parse_duration(text: str) -> float:
    """Return the seconds in an ISO 8601 duration of weeks, days, hours, minutes and seconds.

    Years and months are refused: their length depends on the calendar.
    Raises ValueError for anything else.

    >>> parse_duration("PT1H"), parse_duration("P1DT30M"), parse_duration("PT0.5S"), parse_duration("P2W")
    (3600.0, 88200.0, 0.5, 1209600.0)
    >>> parse_duration("P1Y")
    Traceback (most recent call last):
    ...
    ValueError: not an ISO 8601 duration of weeks, days, hours, minutes or seconds: 'P1Y'
    """
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or not any(match.groupdict().values()) or text.strip().endswith("T"):
        raise ValueError(f"not an ISO 8601 duration of weeks, days, hours, minutes or seconds: {text!r}")
    return float(sum(float(value) * _SECONDS[unit] for unit, value in match.groupdict().items() if value))
