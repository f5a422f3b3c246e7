"""Turn a run's results into the tables, the verdicts and the JSON file.

HTTP targets are checked against our server only; the peer's numbers are the
yardstick. The tape section has its own table and targets. Every figure
printed is also in the JSON, with wrk's raw counters and the tape library's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import audit, bulkapi, identity, recall, tape
from bench.largefile import Transfer
from bench.nginxref import NGINX
from bench.servers import OURS, PEER
from bench.smallfiles import Cell

KIB_PER_MIB = 1024
#: The largest acceptable growth of a worker's peak RSS during the large transfers.
RSS_RISE_LIMIT_MIB = 64.0
#: ours/peer ops/s each small-file operation must reach, by (operation, connections).
SMALL_TARGETS = {
    ("GET", 1): 2.5,
    ("GET", 16): 2.5,
    ("HEAD", 1): 2.5,
    ("HEAD", 16): 2.5,
    ("PUT", 1): 1.0,
    ("PUT", 16): 1.5,
}
#: What nginx does in its reference cells (its PUT is WebDAV without fsync; GET serves the file).
NGINX_DOES = {"PUT": "PUT without fsync", "GET": "static GET"}
#: Large PUT vs dd conv=fsync write, large GET vs the peer's GET.
LARGE_PUT_VS_DD = 0.90
LARGE_GET_VS_PEER = 1.00


@dataclass
class Verdict:
    """One target: met or not, with the figure that decided it."""

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        """Return the printed form."""
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


def _ratio(ours: float, peer: float) -> float | None:
    return ours / peer if peer > 0 else None


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _side(value: str, p50: str = "", p99: str = "", errors: str = "") -> str:
    return f"{value:>10} {p50:>7} {p99:>7} {errors:>5}"


LABEL_WIDTH = 34
#: Small PUT at c=16 against the disk's own limit for durable 4 KiB files (bench/probe.py).
PUT_VS_PROBE = 0.5
HEADER = (
    f"{'test':<{LABEL_WIDTH}} | {_side('ours', 'p50 ms', 'p99 ms', 'errs')} "
    f"| {_side('peer', 'p50 ms', 'p99 ms', 'errs')} | ours/peer"
)


def _row(label: str, ours: str, peer: str, ratio: str) -> str:
    return f"{label:<{LABEL_WIDTH}} | {ours} | {peer} | {ratio:>9}"


def _cell_side(cell: Cell) -> str:
    return _side(f"{cell.ops_per_s:.0f}", f"{cell.p50_ms:.2f}", f"{cell.p99_ms:.2f}", str(cell.errors))


def _transfer_side(transfer: Transfer | None) -> str:
    if transfer is None:
        return _side("failed", errors="1")
    return _side(f"{transfer.mib_per_s:.1f}", errors="0" if transfer.ok else "1")


def small_pairs(cells: list[Cell]) -> list[tuple[Cell, Cell]]:
    """Pair each of our cells with the peer's cell of the same op and concurrency."""
    peer_cells = {(c.op, c.connections): c for c in cells if c.server == PEER}
    return [(c, peer_cells[(c.op, c.connections)]) for c in cells if c.server == OURS]


def table(results: dict[str, Any]) -> str:
    """Return the tables of every section that ran, ready to print."""
    tables = []
    if "cells" in results:
        tables.append(http_table(results))
    if "tape" in results:
        tables.append(tape_table(results["tape"]))
    if "audit" in results:
        tables.append(audit.table(results["audit"]))
    if "bulkapi" in results:
        tables.append(bulkapi.table(results["bulkapi"]))
    if "recall" in results:
        tables.append(recall.table(results["recall"]))
    if "identity" in results:
        tables.append(identity.identity_table(results["identity"]))
    return "\n\n".join(tables)


def http_table(results: dict[str, Any]) -> str:
    """Return the one comparison table of the HTTP section."""
    args, machine = results["settings"], results["machine"]
    lines = [
        f"ours = pacifica_like, peer = {results['peer']}; both under uWSGI --processes "
        f"{args['processes']}; {args['duration']:g} s per small-file cell; {machine['cpus']} CPUs, "
        f"loopback; load avg (1 min) {machine['loadavg_start'][0]:.2f} at start, "
        f"{machine['loadavg_end'][0]:.2f} at end",
        HEADER,
        "-" * len(HEADER),
    ]
    references = {(c.op, c.connections): c for c in results["cells"] if c.server == NGINX}
    for ours, peer in small_pairs(results["cells"]):
        label = f"{ours.op:<4} 4 KiB  c={ours.connections:<2} (ops/s)"
        ratio = _fmt_ratio(_ratio(ours.ops_per_s, peer.ops_per_s))
        lines.append(_row(label, _cell_side(ours), _cell_side(peer), ratio))
        reference = references.get((ours.op, ours.connections))
        if reference is not None:
            # nginx (C; its PUT never fsyncs) in the peer's column; the ratio is ours/nginx.
            ratio = _fmt_ratio(_ratio(ours.ops_per_s, reference.ops_per_s))
            label = f"  vs nginx (C, {NGINX_DOES.get(ours.op, ours.op)})"
            lines.append(_row(label, _side(""), _cell_side(reference), ratio))
    large = results["large"]
    for op in ("PUT", "GET"):
        ours_t, peer_t = large[OURS].get(op), large[PEER].get(op)
        ratio = _ratio(ours_t.mib_per_s, peer_t.mib_per_s) if ours_t and peer_t else None
        label = f"{op:<4} {args['large_size']} MiB stream (MiB/s)"
        lines.append(_row(label, _transfer_side(ours_t), _transfer_side(peer_t), _fmt_ratio(ratio)))
    rss = results["rss"]
    for key, title in (("peak_mib", "worker peak RSS (MiB)"), ("rise_mib", "  rise in large phase (MiB)")):
        lines.append(_row(title, _side(f"{rss[OURS][key]:.1f}"), _side(f"{rss[PEER][key]:.1f}"), ""))
    disk = results["disk"]
    for key in ("write", "read", "read_direct"):
        run = disk[key]
        label = f"disk dd {run.what} (MiB/s)"
        lines.append(_row(label[:LABEL_WIDTH], _side(f"{run.mib_per_s:.1f}"), _side(""), ""))
    probe = results.get("probe")
    if probe is not None:
        # The disk's own limit for durable 4 KiB files; the ratio column: each server's PUT c=16 / it.
        puts = {c.server: c.ops_per_s for c in results["cells"] if c.op == "PUT" and c.connections == 16}
        label = f"fsync probe 4 KiB x{probe['processes']} (ops/s)"
        shares = " ".join(f"{name} {rate / probe['ops_per_s']:.2f}" for name, rate in sorted(puts.items()))
        lines.append(_row(label[:LABEL_WIDTH], _side(f"{probe['ops_per_s']:.0f}"), _side(""), ""))
        lines.append(f"  PUT c=16 as a share of the probe: {shares}")
    return "\n".join(lines)


TAPE_HEADER = (
    f"{'tape phase':<22} | {'drives':>6} | {'files':>5} | {'MiB':>7} | {'seconds':>7} | {'MiB/s':>8} "
    f"| {'mounts':>6} | {'unmounts':>8} | {'located MiB':>11}"
)


def _mib(nbytes: int) -> str:
    return f"{nbytes / (KIB_PER_MIB * KIB_PER_MIB):.1f}"


def tape_table(results: dict[str, Any]) -> str:
    """Return the tape section's table: one row per phase, counters as deltas over the phase."""
    settings = results["settings"]
    lines = [
        f"tape: {settings['files']} files of {settings['sizes_mib'][0]}-{settings['sizes_mib'][1]} MiB "
        f"({_mib(settings['bytes'])} MiB) on {results['volumes_used']} of {settings['volumes']} volumes "
        f"of {_mib(settings['volume_capacity'])} MiB, {settings['drives']} drives; default cost model "
        f"(mount {settings['mount_seconds']:g} s, unmount {settings['unmount_seconds']:g} s, "
        f"full-tape locate {settings['locate_seconds']:g} s, {settings['read_mib_s']:g} MiB/s)",
        f"time_scale {settings['time_scale']:g}: seconds are scaled model time plus real disk and CPU "
        "time; mounts, unmounts and bytes located are exact whatever the scale",
        TAPE_HEADER,
        "-" * len(TAPE_HEADER),
    ]
    for phase in results["phases"]:
        counters = phase.counters
        drives = "-" if phase.drives is None else str(phase.drives)
        lines.append(
            f"{phase.label:<22} | {drives:>6} | {phase.files:>5} | {_mib(phase.bytes):>7} "
            f"| {phase.seconds:>7.2f} | {phase.mib_per_s:>8.1f} | {counters['mounts']:>6} "
            f"| {counters['unmounts']:>8} | {_mib(counters['bytes_located']):>11}"
        )
    readback = results["readback"]
    lines.append(
        f"recalled files read back from disk: {readback['ok']} ok, {readback['missing']} missing, "
        f"{readback['bad']} bad"
    )
    return "\n".join(lines)


def tape_verdicts(results: dict[str, Any]) -> list[Verdict]:
    """Check the tape targets: the speed-up of verification and migration with every drive, no errors."""
    drives = results["settings"]["drives"]
    ratio = tape.verify_ratio(results)
    seconds = {p.drives: p.seconds for p in results["phases"] if p.kind == "verify"}
    found = [
        Verdict(
            f"tape verify with {drives} drives <= {tape.VERIFY_SPEEDUP_TARGET:g}x the time of 1 drive",
            ratio is not None and ratio <= tape.VERIFY_SPEEDUP_TARGET,
            f"{_fmt_ratio(ratio)} ({seconds.get(drives, 0):.2f} vs {seconds.get(1, 0):.2f} s)",
        )
    ]
    ratio = tape.migrate_ratio(results)
    if ratio is not None:
        seconds = {p.drives: p.seconds for p in results["phases"] if p.kind == "migrate-drives"}
        found.append(
            Verdict(
                f"tape migrate with {drives} drives <= {tape.MIGRATE_SPEEDUP_TARGET:g}x the time of 1 drive",
                ratio <= tape.MIGRATE_SPEEDUP_TARGET,
                f"{_fmt_ratio(ratio)} ({seconds.get(drives, 0):.2f} vs {seconds.get(1, 0):.2f} s)",
            )
        )
    errors = tape.error_count(results)
    found.append(Verdict("zero errors (tape)", errors == 0, f"{errors} error(s)"))
    return found


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    """Check each target of every section that ran."""
    found = []
    if "cells" in results:
        found += http_verdicts(results)
    if "tape" in results:
        found += tape_verdicts(results["tape"])
    if "audit" in results:
        found += [Verdict(*verdict) for verdict in audit.verdicts(results["audit"])]
    if "bulkapi" in results:
        found += [Verdict(*verdict) for verdict in bulkapi.verdicts(results["bulkapi"])]
    if "recall" in results:
        found += [Verdict(*verdict) for verdict in recall.verdicts(results["recall"])]
    return found


def http_verdicts(results: dict[str, Any]) -> list[Verdict]:
    """Check each HTTP target against our server's numbers."""
    found = []
    for ours, peer in small_pairs(results["cells"]):
        want = SMALL_TARGETS[(ours.op, ours.connections)]
        ratio = _ratio(ours.ops_per_s, peer.ops_per_s)
        found.append(
            Verdict(
                f"small {ours.op} c={ours.connections} ops/s >= {want:g}x peer",
                ratio is not None and ratio >= want,
                f"{_fmt_ratio(ratio)} ({ours.ops_per_s:.0f} vs {peer.ops_per_s:.0f})",
            )
        )
    large, disk = results["large"], results["disk"]
    size = results["settings"]["large_size"]
    put, dd_write = large[OURS].get("PUT"), disk["write"].mib_per_s
    put_share = put.mib_per_s / dd_write if put and put.ok else 0.0
    found.append(
        Verdict(
            f"{size} MiB PUT >= {LARGE_PUT_VS_DD:.0%} of dd conv=fsync write",
            put_share >= LARGE_PUT_VS_DD,
            f"{put_share:.0%} ({put.mib_per_s if put else 0:.1f} vs {dd_write:.1f} MiB/s)",
        )
    )
    get, peer_get = large[OURS].get("GET"), large[PEER].get("GET")
    get_share = get.mib_per_s / peer_get.mib_per_s if get and get.ok and peer_get else 0.0
    found.append(
        Verdict(
            f"{size} MiB GET >= {LARGE_GET_VS_PEER:.0%} of peer",
            get_share >= LARGE_GET_VS_PEER,
            f"{get_share:.0%} ({get.mib_per_s if get else 0:.1f} vs "
            f"{peer_get.mib_per_s if peer_get else 0:.1f} MiB/s)",
        )
    )
    rise = results["rss"][OURS]["rise_mib"]
    found.append(
        Verdict(
            f"worker RSS rise in large phase < {RSS_RISE_LIMIT_MIB:g} MiB",
            rise < RSS_RISE_LIMIT_MIB,
            f"{rise:.1f} MiB (peak {results['rss'][OURS]['peak_mib']:.1f} MiB)",
        )
    )
    probe = results.get("probe")
    if probe is not None:
        put16 = next(
            c.ops_per_s
            for c in results["cells"]
            if c.server == OURS and c.op == "PUT" and c.connections == 16
        )
        share = put16 / probe["ops_per_s"] if probe["ops_per_s"] else 0.0
        found.append(
            Verdict(
                f"small PUT c=16 >= {PUT_VS_PROBE:g} of the fsync probe",
                share >= PUT_VS_PROBE,
                f"{share:.2f} ({put16:.0f} vs {probe['ops_per_s']:.0f} files/s)",
            )
        )
    errors = error_count(results, OURS)
    found.append(Verdict("zero errors (ours)", errors == 0, f"{errors} error(s)"))
    return found


def failures(results: dict[str, Any]) -> int:
    """Return every failure on our side, in every section that ran."""
    total = error_count(results, OURS) if "cells" in results else 0
    total += tape.error_count(results["tape"]) if "tape" in results else 0
    total += bulkapi.error_count(results["bulkapi"]) if "bulkapi" in results else 0
    total += recall.error_count(results["recall"]) if "recall" in results else 0
    total += sum(cell["errors"] for cell in results["identity"]["cells"]) if "identity" in results else 0
    return total + (audit.error_count(results["audit"]) if "audit" in results else 0)


def error_count(results: dict[str, Any], server: str) -> int:
    """Return every failure seen for ``server``: cells, PUT read-back, large transfers, pre-load."""
    total = results["populate_failures"][server]
    for cell in results["cells"]:
        if cell.server == server:
            total += cell.errors + cell.readback.get("bad", 0)
    for op in ("PUT", "GET"):
        transfer = results["large"][server].get(op)
        total += 0 if transfer is not None and transfer.ok else 1
    return total


def _jsonable(value: Any) -> Any:
    as_dict: Callable[[], Any] | None = getattr(value, "as_dict", None)
    if as_dict is not None:
        return as_dict()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_json(results: dict[str, Any], found: list[Verdict], directory: Path) -> Path:
    """Write everything measured to ``directory/<timestamp>.json``; return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{results['started'].replace(':', '').replace('-', '')}.json"
    document = {
        **results,
        "verdicts": [{"name": v.name, "passed": v.passed, "detail": v.detail} for v in found],
    }
    path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return path
