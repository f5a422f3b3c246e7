"""``python -m bench``: measure our gateway against the peer, then the tape library; print the tables.

Order of work in the HTTP section: dd on the data filesystem, then both
servers start (same uWSGI flags, separate data dirs), the GET/HEAD pool is
pre-loaded, the small-file cells run alternating ours/peer so drift hits both
alike, then the large transfers with peak-RSS samples around them. The tape
section runs after the servers are stopped, so they take no CPU from it.
Servers are stopped and the scratch directory removed whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import (
    audit,
    bulkapi,
    disk,
    identity,
    largefile,
    memory,
    nginxref,
    peer,
    probe,
    recall,
    report,
    servers,
    sideband,
    smallfiles,
    tape,
)
from bench.content import SMALL_SIZE
from pacifica_like.web.devserver import RunningServer, uwsgi_binary

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
#: Concurrency of the small-file cells (wrk connections).
CONCURRENCY = (1, 16)
OPERATIONS = ("put", "get", "head")
#: PUT cells write ids from here up (one block of ids per cell), far from the GET/HEAD pool.
PUT_ID_BASE = 100_000_000
LARGE_FILE_ID = 900_000_001
LARGE_SEED = 20241106
#: Ids read back from each wrk thread's PUT range after a PUT cell.
READBACK_SAMPLES = 20
#: The parts of the benchmark, in the order they run; --only picks one.
SECTIONS = ("http", "tape", "audit", "bulkapi", "sideband", "recall", "identity")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; --quick only changes what was not given explicitly."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8, help="uWSGI --processes for both servers")
    parser.add_argument("--duration", type=int, help="whole seconds per small-file cell (default 5)")
    parser.add_argument("--large-size", type=int, help="large file size in MiB (default 1024)")
    parser.add_argument("--files", type=int, default=2000, help="ids pre-loaded for GET/HEAD")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 1 s cells, 64 MiB large file, {tape.QUICK.files} tape files of "
        f"{tape.QUICK.min_mib}-{tape.QUICK.max_mib} MiB at time_scale {tape.QUICK.time_scale:g}",
    )
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        help="run one section: http (both servers), tape, audit, bulkapi, sideband, recall or identity",
    )
    parser.add_argument(
        "--tape-files", type=int, help=f"files through the tape library (default {tape.FULL.files})"
    )
    parser.add_argument(
        "--tape-scale",
        type=float,
        help=f"the tape library's time_scale (default {tape.FULL.time_scale:g}, "
        f"{tape.QUICK.time_scale:g} with --quick)",
    )
    parser.add_argument(
        "--audit-files",
        type=int,
        help=f"inventory rows and files for the audit (default {audit.FULL.files:,}, "
        f"{audit.QUICK.files:,} with --quick)",
    )
    parser.add_argument(
        "--audit-cold", action="store_true", help="drop the page cache before the audit (root)"
    )
    parser.add_argument("--workdir", type=Path, help="put the scratch dir here (default: bench/)")
    parser.add_argument("--peer-home", type=Path, default=peer.DEFAULT_HOME, help="the peer's virtualenv")
    parser.add_argument("--setup-peer", action="store_true", help="(re)create the peer venv and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (data and server logs)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 1 if args.quick else 5
    if args.large_size is None:
        args.large_size = 64 if args.quick else 1024
    if args.processes < 1 or args.duration <= 0 or args.large_size < 1 or args.files < 1:
        parser.error("--processes, --duration, --large-size and --files must be positive")
    args.sections = (args.only,) if args.only else SECTIONS
    workload = tape.QUICK if args.quick else tape.FULL
    if args.tape_files is not None:
        workload = dataclasses.replace(workload, files=args.tape_files)
    if args.tape_scale is not None:
        workload = dataclasses.replace(workload, time_scale=args.tape_scale)
    if workload.files < 1 or workload.time_scale < 0:
        parser.error("--tape-files must be positive and --tape-scale not negative")
    args.tape_workload = workload
    audit_workload = audit.QUICK if args.quick else audit.FULL
    if args.audit_files is not None:
        if args.audit_files < 1:
            parser.error("--audit-files must be positive")
        audit_workload = dataclasses.replace(audit_workload, files=args.audit_files)
    args.audit_workload = dataclasses.replace(audit_workload, cold=args.audit_cold)
    return args


def _tool_version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"


def machine_info() -> dict[str, Any]:
    """Describe where the numbers came from."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": _tool_version(["wrk", "-v"]),
        "uwsgi": _tool_version([uwsgi_binary(), "--version"]),
    }


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_small_cells(args: argparse.Namespace, running: dict[str, RunningServer]) -> list[smallfiles.Cell]:
    """Run every small-file cell, alternating servers, and read back samples of each PUT."""
    cells = []
    for op in OPERATIONS:
        for index, connections in enumerate(CONCURRENCY):
            first_id = PUT_ID_BASE * (index + 1) if op == "put" else 0
            for name, server in running.items():
                if name == nginxref.NGINX and op == "head":
                    continue  # wrk waits for the body a HEAD answer's Content-Length announces
                os.sync()  # start each cell with no dirty pages left by the previous one
                flavour = "plain" if name == nginxref.NGINX else "pacifica"
                cell = smallfiles.run_cell(
                    name, server.url, op, connections, args.duration, first_id, args.files, SMALL_SIZE,
                    flavour=flavour,
                )  # fmt: skip
                if op == "put":
                    cell.readback = smallfiles.verify_put_ranges(
                        servers.port_of(server), cell.stats["put_ranges"], READBACK_SAMPLES
                    )
                _log(
                    f"{name:<4} {cell.op:<4} c={connections:<2} {cell.ops_per_s:8.0f} ops/s "
                    f"p50 {cell.p50_ms:.2f} ms p99 {cell.p99_ms:.2f} ms errors {cell.errors}"
                    + (f" readback {cell.readback}" if cell.readback else "")
                )
                cells.append(cell)
    return cells


def run_large(
    args: argparse.Namespace, running: dict[str, RunningServer]
) -> tuple[dict[str, dict[str, largefile.Transfer | None]], dict[str, Any], dict[str, str]]:
    """PUT then GET the large file on each server; sample worker peak RSS around it all."""
    size = args.large_size << 20
    before = {name: memory.worker_peaks(s.process.pid) for name, s in running.items()}
    transfers: dict[str, dict[str, largefile.Transfer | None]] = {name: {} for name in running}
    failures: dict[str, str] = {}
    for op in ("PUT", "GET"):
        for name, server in running.items():
            port = servers.port_of(server)
            try:
                if op == "PUT":
                    result = largefile.put_large(port, LARGE_FILE_ID, size, LARGE_SEED)
                else:
                    put = transfers[name].get("PUT")
                    expected = put.sha256 if put is not None else ""
                    result = largefile.get_large(port, LARGE_FILE_ID, size, expected)
            except (OSError, http.client.HTTPException) as exc:
                failures[f"{name} {op}"] = repr(exc)
                transfers[name][op] = None
                _log(f"{name:<4} large {op} failed: {exc!r}")
                continue
            transfers[name][op] = result
            _log(f"{name:<4} large {op} {result.mib_per_s:8.1f} MiB/s {result.detail}")
    after = {name: memory.worker_peaks(s.process.pid) for name, s in running.items()}
    rss = {
        name: {
            "before_kib": before[name],
            "after_kib": after[name],
            "peak_mib": max(after[name].values(), default=0) / report.KIB_PER_MIB,
            "rise_mib": memory.peak_rise_kib(before[name], after[name]) / report.KIB_PER_MIB,
        }
        for name in running
    }
    return transfers, rss, failures


def run(args: argparse.Namespace, workdir: Path, peer_version: str | None) -> dict[str, Any]:
    """Measure every section asked for; return the results the report is made from."""
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H-%M-%S"),
        "settings": {
            "sections": list(args.sections),
            "processes": args.processes,
            "duration": args.duration,
            "large_size": args.large_size,
            "files": args.files,
            "small_size": SMALL_SIZE,
            "concurrency": list(CONCURRENCY),
            "workdir": str(workdir),
        },
        "machine": machine_info(),
    }
    if peer_version is not None:  # main looks the peer up only when the http section runs
        run_http(args, workdir, peer_version, results)
    if "tape" in args.sections:
        results["tape"] = tape.run_tape(workdir / "tape", args.tape_workload, _log)
    if "audit" in args.sections:
        results["audit"] = audit.run_audit_bench(workdir / "audit", args.audit_workload, _log)
    if "bulkapi" in args.sections:
        results["bulkapi"] = bulkapi.run_bulkapi(workdir / "bulkapi", _log)
    if "sideband" in args.sections:
        files = 2_000 if args.quick else sideband.FILES
        results["sideband"] = sideband.run_sideband(
            workdir / "sideband", _log, files, args.processes, args.duration, 1 if args.quick else 3
        )
    if "recall" in args.sections:
        workload = recall.QUICK if args.quick else recall.FULL
        results["recall"] = recall.run_recall(workdir / "recall", workload, _log)
    if "identity" in args.sections:
        results["identity"] = identity.run_identity(
            workdir / "identity", args.processes, args.duration, args.files, _log
        )
    # Other work on the machine skews every number; the JSON keeps the evidence.
    results["machine"]["loadavg_end"] = os.getloadavg()
    return results


def run_http(args: argparse.Namespace, workdir: Path, peer_version: str, results: dict[str, Any]) -> None:
    """Measure the disk, then both servers; add the figures to ``results``."""
    results["peer"] = f"{peer.PEER_PACKAGE} {peer_version}"
    _log(f"dd {args.large_size} MiB in {workdir}")
    results["disk"] = disk.measure_disk(workdir, args.large_size)
    _log(f"fsync probe: {args.processes} processes writing durable 4 KiB files for {args.duration} s")
    results["probe"] = probe.fsync_probe(workdir, args.processes, args.duration)
    _log(f"fsync probe: {results['probe']['ops_per_s']:.0f} files/s")
    targets = servers.make_targets(workdir, args.peer_home, peer_version)
    with contextlib.ExitStack() as stack:
        running = {t.name: stack.enter_context(servers.serve(t, args.processes, workdir)) for t in targets}
        if nginxref.nginx_binary() is not None:
            # A C server over the same files: how far GET and HEAD are from one (no fsync on its PUT).
            running[nginxref.NGINX] = stack.enter_context(nginxref.serve(workdir))
        else:
            _log("nginx is not installed: no C reference in the table (apt-get install nginx-light)")
        results["commands"] = {name: s.process.args for name, s in running.items()}
        urls = ", ".join(f"{name} {server.url}" for name, server in running.items())
        _log(f"servers up: {urls}; pre-loading {args.files} ids")
        results["populate_failures"] = {
            name: smallfiles.populate(servers.port_of(s), 0, args.files) for name, s in running.items()
        }
        results["cells"] = run_small_cells(args, running)
        pair = {name: server for name, server in running.items() if name != nginxref.NGINX}
        results["large"], results["rss"], results["large_failures"] = run_large(args, pair)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 1 on any error (or missed target with --strict)."""
    args = parse_args(argv)
    if args.setup_peer:
        peer.setup_peer(args.peer_home)
        return 0
    peer_version = None
    if ("sideband" in args.sections or "identity" in args.sections) and shutil.which("wrk") is None:
        print("bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    if "http" in args.sections:
        if shutil.which("wrk") is None:
            print("bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
            return 2
        peer_version = peer.ensure_peer(args.peer_home)
    parent = args.workdir or BENCH_DIR
    workdir = Path(tempfile.mkdtemp(prefix=".work-", dir=parent))
    try:
        results = run(args, workdir, peer_version)
    finally:
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    found = report.verdicts(results)
    path = report.write_json(results, found, RESULTS_DIR)
    print(report.table(results))
    print()
    for verdict in found:
        print(verdict.line())
    print(f"\nfull results: {path}")
    if report.failures(results):
        return 1
    return 1 if args.strict and not all(v.passed for v in found) else 0
