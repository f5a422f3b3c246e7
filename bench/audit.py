"""The audit section: ``pacifica-like audit`` over a million files, timed and its memory measured.

Everything is real: the inventory is a SQLite catalog of ``files`` rows (the
gateway's default, under the prefix), and the storage a sharded directory tree
of as many empty files (the audit lists names and never reads data, so a file's
size changes nothing but the disk space the benchmark takes). Ids are
consecutive from 2**20, as a database sequence hands them out: 6 hex digits,
so 65,536 leaf directories of about 15 files each.

Then drift is made, as an operator's ``rm`` and a restore from an old backup
would: ``drift`` of the files are unlinked (missing) and as many unknown files
planted (orphans). The audit runs as the real command line in a child process
(``python -m pacifica_like audit ... --ignore-age 0``), whose wall time and peak
RSS (``wait4``'s ru_maxrss) are what is reported; its reports must name
exactly the files unlinked and planted.

The directory tree is in the page cache when the audit runs (it was just
written); ``--audit-cold`` drops the caches first (root only) to measure a
listing that goes to the disk.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pacifica_like.core.config import DEFAULT_CATALOG_NAME
from pacifica_like.core.ids import id2filename
from pacifica_like.gateway.catalog import GatewayCatalog

REPO = Path(__file__).resolve().parents[1]
#: The audit must compare a million entries with a million files within this, using less than this.
TARGET_SECONDS = 60.0
TARGET_RSS_MIB = 1024.0
FIRST_ID = 1 << 20
#: The digest recorded for every (empty) file.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SEED = 20261121
MTIME = 784111777.0


@dataclass(frozen=True)
class AuditWorkload:
    """How many files the inventory and the tree hold, and the share that drifts."""

    files: int
    drift: float = 0.01
    cold: bool = False


FULL = AuditWorkload(files=1_000_000)
QUICK = AuditWorkload(files=100_000)


def _build_tree(prefix: Path, ids: range, log: Callable[[str], None]) -> float:
    """Create an empty file at the sharded path of every id; return the seconds it took.

    Directory by directory: consecutive ids land in different directories, and
    creating them in id order made every create look up a directory whose blocks
    this VM had already dropped from its cache (0.5 ms per file instead of 20 µs).
    """
    started = time.monotonic()
    root = str(prefix)
    directory = None
    for count, relative in enumerate(sorted(id2filename(file_id) for file_id in ids), start=1):
        parent = os.path.dirname(relative)
        if parent != directory:
            os.makedirs(root + parent, exist_ok=True)
            directory = parent
        os.close(os.open(root + relative, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o444))
        if count % 200_000 == 0:
            log(f"audit: {count} files created")
    return time.monotonic() - started


def _load_inventory(catalog: GatewayCatalog, ids: range, stored_at: float) -> float:
    """Insert one row per id, as the gateway would have recorded them; return the seconds."""
    started = time.monotonic()
    catalog.load((file_id, 0, MTIME, EMPTY_SHA256, stored_at) for file_id in ids)
    return time.monotonic() - started


def _drop_caches() -> bool:
    """Write back and drop the page, dentry and inode caches; False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as control:
            control.write("3\n")
    except OSError:
        return False
    return True


def _run_audit_cli(prefix: Path, reports: Path, argv: list[str]) -> tuple[int, float, float, str]:
    """Run the audit command in a child; return (exit status, wall seconds, peak RSS MiB, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAI_")}
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-m", "pacifica_like", "audit", "--prefix", str(prefix), *argv]
    started = time.monotonic()
    with open(reports / "stderr.txt", "w+b") as errors:
        child = subprocess.Popen(command, cwd=reports, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        # wait4, not wait(): its rusage is this child's own peak RSS, whatever else this process ran.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - started
        errors.seek(0)
        stderr = errors.read().decode("utf-8", "replace")
    return child.returncode, seconds, usage.ru_maxrss / 1024, stderr


def run_audit_bench(workdir: Path, workload: AuditWorkload, log: Callable[[str], None]) -> dict[str, Any]:
    """Build the inventory and the tree, make drift, run the audit; return the figures.

    Everything lives under ``workdir``, which the caller removes.
    """
    prefix = workdir / "archive"
    reports = workdir / "reports"
    prefix.mkdir(parents=True)
    reports.mkdir()
    ids = range(FIRST_ID, FIRST_ID + workload.files)
    rng = random.Random(SEED)
    drift = max(1, int(workload.files * workload.drift))
    gone = sorted(rng.sample(ids, drift))
    planted = list(range(ids.stop + 1000, ids.stop + 1000 + drift))
    results: dict[str, Any] = {"settings": {**asdict(workload), "first_id": FIRST_ID, "drifted": drift}}

    log(f"audit: creating {workload.files} files under {prefix}")
    results["create_seconds"] = _build_tree(prefix, ids, log)
    catalog = GatewayCatalog("sqlite:///" + str(prefix / DEFAULT_CATALOG_NAME))
    try:
        log(f"audit: loading {workload.files} inventory rows")
        results["load_seconds"] = _load_inventory(catalog, ids, time.time() - 2 * 86400)
    finally:
        catalog.close()
    for file_id in gone:
        os.unlink(prefix / id2filename(file_id)[1:])
    for file_id in planted:
        path = prefix / id2filename(file_id)[1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    results["cold"] = _drop_caches() if workload.cold else False
    if workload.cold and not results["cold"]:
        log("audit: cannot drop the page cache here (not root); the listing runs warm")

    argv = [
        "--name",
        "bench",
        "--ignore-age",
        "0",
        "--max-missing",
        str(2 * drift),
        "--max-orphan-fraction",
        "0.05",
        "--progress",
        "never",
        "--json",
    ]
    results["command"] = f"cd {reports} && python -m pacifica_like audit --prefix {prefix} " + " ".join(argv)
    log(f"audit: {results['command']}")
    status, seconds, rss_mib, stderr = _run_audit_cli(prefix, reports, argv)
    results.update(status=status, seconds=seconds, peak_rss_mib=rss_mib)
    summary_path = reports / "bench_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    results["summary"] = summary
    if summary is None:
        results["error"] = stderr[-2000:]
        return results
    missing = [int(line) for line in (reports / "bench_missing.txt").read_text().split()]
    orphan = [int(line) for line in (reports / "bench_orphan.txt").read_text().split()]
    results["correct"] = missing == gone and orphan == planted and summary["verdict"] == "drift"
    results["listed"] = summary["storage"]["listed"]
    results["inventory_rows"] = summary["inventory"]["before"]
    log(
        f"audit: {seconds:.1f} s, peak RSS {rss_mib:.0f} MiB, verdict {summary['verdict']}, "
        f"{len(missing)} missing, {len(orphan)} orphans, correct {results['correct']}"
    )
    return results


def error_count(results: dict[str, Any]) -> int:
    """Return 1 when the audit failed or reported anything but exactly the drift made, else 0."""
    return 0 if results.get("correct") and results.get("status") == 1 else 1


def table(results: dict[str, Any]) -> str:
    """Return the audit section's table."""
    settings, summary = results["settings"], results.get("summary")
    cache = "cold cache" if results.get("cold") else "warm cache"
    lines = [
        f"audit: {summary['inventory']['before'] if summary else '?'} inventory rows (SQLite catalog) "
        f"vs {summary['storage']['listed'] if summary else '?'} files in a sharded tree ({cache}); "
        f"{settings['drifted']} unlinked, {settings['drifted']} planted",
        f"{'phase':<28} | {'seconds':>8}",
        "-" * 39,
    ]
    if summary:
        for phase, seconds in summary["durations"].items():
            lines.append(f"{'  ' + phase:<28} | {seconds:>8.2f}")
    lines.append(f"{'audit command, wall':<28} | {results['seconds']:>8.2f}")
    rate = results.get("listed", 0) / results["seconds"] if results["seconds"] else 0
    lines.append(
        f"peak RSS {results['peak_rss_mib']:.0f} MiB; {rate:,.0f} files listed and compared per second"
    )
    lines.append(
        f"(setup, not timed: tree {results['create_seconds']:.1f} s, rows {results['load_seconds']:.1f} s)"
    )
    if "error" in results:
        lines.append(f"audit failed (exit {results['status']}): {results['error']}")
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Check the targets: time, memory, and reports naming exactly the drift made."""
    files = results["settings"]["files"]
    return [
        (
            f"audit of {files:,} vs {files:,} < {TARGET_SECONDS:g} s",
            results["seconds"] < TARGET_SECONDS,
            f"{results['seconds']:.1f} s",
        ),
        (
            f"audit peak RSS < {TARGET_RSS_MIB:g} MiB",
            results["peak_rss_mib"] < TARGET_RSS_MIB,
            f"{results['peak_rss_mib']:.0f} MiB",
        ),
        (
            "audit reports exactly the files unlinked and planted",
            error_count(results) == 0,
            "yes" if error_count(results) == 0 else "no",
        ),
    ]
