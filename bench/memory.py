"""Peak resident memory of a uWSGI server, from /proc.

VmHWM is the kernel's high-water mark of a process's RSS, so sampling it
before and after a phase shows whether that phase grew any worker, without
polling during the transfer.
"""

from __future__ import annotations

import os


def vm_hwm_kib(pid: int) -> int | None:
    """Return the peak RSS of ``pid`` in KiB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int) -> list[int]:
    """Return the pids whose parent is ``pid`` (uWSGI's workers under its master)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                # The command name may contain spaces: the fields follow the last ")".
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def worker_peaks(master_pid: int) -> dict[int, int]:
    """Return {worker pid: VmHWM KiB} for every live worker of ``master_pid``."""
    peaks = {}
    for pid in children(master_pid):
        peak = vm_hwm_kib(pid)
        if peak is not None:
            peaks[pid] = peak
    return peaks


def peak_rise_kib(before: dict[int, int], after: dict[int, int]) -> int:
    """Return the largest growth of one worker's peak RSS between two samples.

    A worker absent from ``before`` (respawned meanwhile) counts its whole peak,
    so a respawn never hides growth.
    """
    return max((peak - before.get(pid, 0) for pid, peak in after.items()), default=0)
