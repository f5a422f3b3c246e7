"""The tape backend: the tape HSM (a disk cache with the emulated library behind it) served directly.

Everything it does is :class:`~pacifica_like.storage.hsm.TapeHsm`'s; this
module is what the registry names (``tape``, alias ``hpss``). The emulated
sideband HSM composes the same machinery (:mod:`pacifica_like.storage.sideband.backend`).
"""

from __future__ import annotations

from pacifica_like.storage.hsm import (
    DUAL,
    OFFLINE,
    REGULAR,
    UNMIGRATING,
    RecallInProgress,
    TapeHsm,
    TapeWriter,
    copy_matches,
)

__all__ = [
    "DUAL",
    "OFFLINE",
    "REGULAR",
    "UNMIGRATING",
    "RecallInProgress",
    "TapeBackend",
    "TapeWriter",
    "copy_matches",
]


class TapeBackend(TapeHsm):
    """Disk cache plus emulated tape library, sharing one catalog with every process."""

    name = "tape"
