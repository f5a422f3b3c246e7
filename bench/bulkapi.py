"""The bulk API section: submit a 100,000-file stage request through the Python client, then poll it.

A tape archive (emulated library, delays off) is served by ``pacifica-like
serve`` on loopback, as an operator runs it on one node, in two cases:

- ``disk``: ``files`` planted files in the disk cache (empty, at their sharded
  paths, as the audit section plants them): every file is COMPLETED at once;
- ``tape``: ``files`` other ids known only to the tape catalog (rows planted in
  it, one copy each, spread over the volumes): every file is queued at its tape
  position. The scheduler is off, so the request stays as submitted while it is
  polled (and no recall reads the volumes, which hold no such bytes).

Each round times, per case, through :class:`pacifica_like.client.ArchiveClient`:

- ``stage_request`` of every id: the client's JSON encoding, the upload, the
  server's parsing, its locality look-up of every file and the durable insert
  of the request and its rows, up to the 201 (target under 2 s);
- the first page of ``poll`` (``limit`` 1,000: the page and the summary; target
  under 200 ms), and a summary-only poll (``limit`` 1), which is what
  ``stage_many`` sends while it follows a request.

- ``archiveinfo`` of every id of each case, and of as many ids nobody
  stored (each of those is also looked up in the inventory for a LOST mark;
  target under 2 s).

The request is deleted after each round. Rounds are repeated and the median
is judged, so one slow fsync does not decide the verdict.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pacifica_like.client import ArchiveClient
from pacifica_like.core.ids import id2filename
from pacifica_like.web import devserver

FILES = 100_000
ROUNDS = 3
FIRST_ID = 1 << 20
#: The ids of the ``tape`` case start here (after the ``disk`` case's).
FIRST_TAPE_ID = 1 << 24
CASES = ("disk", "tape")
PAGE = 1_000
TARGET_SUBMIT_SECONDS = 2.0
TARGET_POLL_SECONDS = 0.2
TARGET_ARCHIVEINFO_SECONDS = 2.0
#: archiveinfo is timed on each case's ids and on ids nobody stored (these start here).
FIRST_UNKNOWN_ID = 1 << 40
ARCHIVEINFO_CASES = ("disk", "tape", "unknown")


def _plant(prefix: Path, ids: range) -> float:
    """Create an empty file at each id's sharded path; return the seconds it took."""
    started = time.monotonic()
    made: set[Path] = set()
    for file_id in ids:
        path = prefix / id2filename(file_id).lstrip("/")  # id2filename's path starts with "/"
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.touch()
    return time.monotonic() - started


def _plant_tape(library: Path, ids: range) -> float:
    """Record one tape copy of each id in the library's catalog, spread over its volumes; return seconds."""
    import sqlite3

    started = time.monotonic()
    database = sqlite3.connect(library / "catalog.sqlite")
    try:
        vsns = [row[0] for row in database.execute("SELECT vsn FROM volume ORDER BY vsn")]
        now = time.time()
        rows = (
            (file_id, vsns[index % len(vsns)], index, 4096 * index, 1024, "00" * 32, now, now, now)
            for index, file_id in enumerate(ids)
        )
        with database:
            database.executemany(
                'INSERT INTO tapecopy (file_id, vsn, seq, "offset", size, sha256, mtime, ctime, stale, bad, '
                "written_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?)",
                rows,
            )
    finally:
        database.close()
    return time.monotonic() - started


def _write_ini(root: Path, files: int) -> Path:
    ini = root / "archive.ini"
    lines = [
        "[archive]",
        "backend = tape",
        f"prefix = {root / 'cache'}",
        "[tape]",
        f"library = {root / 'library'}",
        "volumes = 2",
        "volume_capacity = 64MiB",
        "time_scale = 0",
        "[bulk]",
        f"max_files_per_request = {max(files, 1)}",
        # Nothing is recalled: the planted tape copies have no bytes on the volumes.
        "scheduler = off",
    ]
    ini.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ini


def run_bulkapi(
    workdir: Path, log: Callable[[str], None], files: int = FILES, rounds: int = ROUNDS
) -> dict[str, Any]:
    """Plant the files, serve them, and time submit and poll ``rounds`` times."""
    from pacifica_like.cli.main import main as cli_main

    workdir.mkdir(parents=True, exist_ok=True)
    ini = _write_ini(workdir, files)
    ids = {"disk": range(FIRST_ID, FIRST_ID + files), "tape": range(FIRST_TAPE_ID, FIRST_TAPE_ID + files)}
    ids["unknown"] = range(FIRST_UNKNOWN_ID, FIRST_UNKNOWN_ID + files)
    log(f"bulkapi: planting {files:,} files in the disk cache and {files:,} copies in the tape catalog")
    plant_seconds = _plant(workdir / "cache", ids["disk"])
    if cli_main(["tape", "init", "-c", str(ini)]) != 0:
        raise RuntimeError("tape init failed")
    plant_seconds += _plant_tape(workdir / "library", ids["tape"])
    results: dict[str, Any] = {
        "settings": {"files": files, "rounds": rounds, "page": PAGE, "server": "pacifica-like serve"},
        "plant_seconds": round(plant_seconds, 2),
        "rounds": [],
        "errors": [],
    }
    # Each case's files end in this state at submission (the scheduler is off).
    expected = {"disk": "COMPLETED", "tape": "SUBMITTED"}
    with devserver.cli_server(["-c", str(ini)]) as server, ArchiveClient(server.url, timeout=120) as client:
        client.tape_rest_info()  # discovery and the first connection are not part of a round
        for number in range(rounds):
            for case in CASES:
                started = time.perf_counter()
                request_id = client.stage_request(ids[case])
                submit = time.perf_counter() - started
                started = time.perf_counter()
                page = client.poll(request_id, limit=PAGE)
                first_page = time.perf_counter() - started
                started = time.perf_counter()
                summary = client.poll(request_id, limit=1).summary
                summary_poll = time.perf_counter() - started
                complete = summary.files == files and summary.states.get(expected[case]) == files
                if len(page.files) != min(PAGE, files) or not complete:
                    results["errors"].append(
                        f"round {number} ({case}): page of {len(page.files)} files, "
                        f"summary {dict(summary.states)}"
                    )
                results["rounds"].append(
                    {
                        "case": case,
                        "submit_seconds": round(submit, 4),
                        "first_page_seconds": round(first_page, 4),
                        "summary_poll_seconds": round(summary_poll, 4),
                        "states": dict(summary.states),
                    }
                )
                log(
                    f"bulkapi: round {number + 1} ({case}): submit {submit:.3f} s, first page "
                    f"{first_page * 1000:.1f} ms, summary {summary_poll * 1000:.1f} ms; "
                    f"states {dict(summary.states)}"
                )
                client.delete_request(request_id)
            for case in ARCHIVEINFO_CASES:
                started = time.perf_counter()
                answers = client.archiveinfo(ids[case])
                seconds = time.perf_counter() - started
                expected_locality = {"disk": "DISK", "tape": "TAPE", "unknown": "NONE"}[case]
                wrong = sum(1 for a in answers if a.locality != expected_locality)
                if len(answers) != files or wrong:
                    results["errors"].append(
                        f"round {number} archiveinfo ({case}): {wrong} wrong of {len(answers)}"
                    )
                results.setdefault("archiveinfo_rounds", []).append(
                    {"case": case, "seconds": round(seconds, 4)}
                )
                log(f"bulkapi: round {number + 1} archiveinfo ({case}): {seconds:.3f} s")
    for case in CASES:
        measured = [r for r in results["rounds"] if r["case"] == case]
        for key in ("submit_seconds", "first_page_seconds", "summary_poll_seconds"):
            values = [r[key] for r in measured]
            results.setdefault(case, {})[key] = {
                "median": statistics.median(values),
                "best": min(values),
                "worst": max(values),
            }
    for case in ARCHIVEINFO_CASES:
        values = [r["seconds"] for r in results.get("archiveinfo_rounds", []) if r["case"] == case]
        results.setdefault("archiveinfo", {})[case] = {
            "median": statistics.median(values),
            "best": min(values),
            "worst": max(values),
        }
    return results


def error_count(results: dict[str, Any]) -> int:
    """Return the rounds whose answers did not hold what was submitted."""
    return len(results.get("errors", ()))


def table(results: dict[str, Any]) -> str:
    """Return the section's lines, ready to print."""
    settings = results["settings"]
    lines = [
        f"bulk API: {settings['files']:,}-file stage requests through pacifica_like.client, "
        f"{settings['server']} on a tape archive, {settings['rounds']} rounds (median / best / worst)"
    ]
    for case, where in (("disk", "files on disk"), ("tape", "files only on tape")):
        for key, label, scale, unit in (
            ("submit_seconds", "submit (POST /api/v1/stage)", 1, "s"),
            ("first_page_seconds", f"first page (limit {settings['page']:,})", 1000, "ms"),
            ("summary_poll_seconds", "summary poll (limit 1)", 1000, "ms"),
        ):
            figures = results[case][key]
            lines.append(
                f"  {where:<19} {label:<30} {figures['median'] * scale:9.3f} / "
                f"{figures['best'] * scale:9.3f} / {figures['worst'] * scale:9.3f} {unit}"
            )
    for case, where in (
        ("disk", "files on disk"),
        ("tape", "files only on tape"),
        ("unknown", "ids nobody stored"),
    ):
        figures = results["archiveinfo"][case]
        lines.append(
            f"  {where:<19} {'archiveinfo':<30} {figures['median']:9.3f} / "
            f"{figures['best']:9.3f} / {figures['worst']:9.3f} s"
        )
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Check the targets on the medians of both cases."""
    files = results["settings"]["files"]
    found = []
    for case, where in (("disk", "on disk"), ("tape", "only on tape")):
        submit = results[case]["submit_seconds"]["median"]
        poll = results[case]["first_page_seconds"]["median"]
        found += [
            (
                f"bulk submit of {files:,} files {where} < {TARGET_SUBMIT_SECONDS:g} s",
                submit < TARGET_SUBMIT_SECONDS,
                f"{submit:.3f} s (median)",
            ),
            (
                f"bulk first page poll ({where}) < {TARGET_POLL_SECONDS * 1000:g} ms",
                poll < TARGET_POLL_SECONDS,
                f"{poll * 1000:.1f} ms (median)",
            ),
        ]
    for case in ARCHIVEINFO_CASES:
        median = results["archiveinfo"][case]["median"]
        found.append(
            (
                f"archiveinfo of {files:,} paths ({case}) < {TARGET_ARCHIVEINFO_SECONDS:g} s",
                median < TARGET_ARCHIVEINFO_SECONDS,
                f"{median:.3f} s (median)",
            )
        )
    found.append(
        (
            "bulk answers hold every file submitted",
            error_count(results) == 0,
            f"{error_count(results)} error(s)",
        )
    )
    return found
