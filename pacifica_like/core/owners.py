"""Names for the holders of claims (drives, volumes, recalls) that tell a live process from a dead one.

An owner name is ``host:pid:start:token``: ``start`` is the process's start
time in clock ticks, so a pid the kernel reused for another process does not
pass for the dead claimant. Stdlib only: the backends import it (a leaf, like
``config`` and ``errors``).
"""

from __future__ import annotations

import os
import socket


def process_start(pid: int) -> str:
    """Return a process's start time in clock ticks ("?" when it does not run or cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def owner_name(token: str) -> str:
    """Return this process's owner name with ``token``; call it per claim, since uWSGI forks after import."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}:{token}"


def alive_here(owner: str) -> bool | None:
    """Tell whether the owner runs, when it is a process of this host; None for another host.

    A malformed name counts as a dead owner (False).
    """
    try:
        host, pid, start, _ = owner.split(":")
        number = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return None
    return process_start(number) == start
