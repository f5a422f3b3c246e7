"""The bulk API section: submit a 100,000-file stage request through the Python client, then poll it.

A tape archive (emulated library, delays off) is served by ``pacifica-like
serve`` on loopback with its bulk scheduler in-process, as an operator runs
it on one node. Its disk cache holds ``files`` planted files (empty, at their
sharded paths, as the audit section plants them), so every path names a real
file the server must look up before it answers. Each round times, through
:class:`pacifica_like.client.ArchiveClient`:

- ``stage_request`` of every id: the client's JSON encoding, the upload, the
  server's parsing, its locality look-up of every file and the durable insert
  of the request and its rows, up to the 201 (target under 2 s);
- the first page of ``poll`` (``limit`` 1,000: the page and the summary; target
  under 200 ms), and a summary-only poll (``limit`` 1), which is what
  ``stage_many`` sends while it follows a request.

The request is deleted after each round. Rounds are repeated and the median
is judged, so one slow fsync does not decide the verdict.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pacifica_like import devserver
from pacifica_like.client import ArchiveClient
from pacifica_like.id2filename import id2filename

FILES = 100_000
ROUNDS = 3
FIRST_ID = 1 << 20
PAGE = 1_000
TARGET_SUBMIT_SECONDS = 2.0
TARGET_POLL_SECONDS = 0.2


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
    ]
    ini.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ini


def run_bulkapi(
    workdir: Path, log: Callable[[str], None], files: int = FILES, rounds: int = ROUNDS
) -> dict[str, Any]:
    """Plant the files, serve them, and time submit and poll ``rounds`` times."""
    from pacifica_like.cli import main as cli_main

    workdir.mkdir(parents=True, exist_ok=True)
    ini = _write_ini(workdir, files)
    ids = range(FIRST_ID, FIRST_ID + files)
    log(f"bulkapi: planting {files:,} files in the disk cache")
    plant_seconds = _plant(workdir / "cache", ids)
    if cli_main(["tape", "init", "-c", str(ini)]) != 0:
        raise RuntimeError("tape init failed")
    results: dict[str, Any] = {
        "settings": {"files": files, "rounds": rounds, "page": PAGE, "server": "pacifica-like serve"},
        "plant_seconds": round(plant_seconds, 2),
        "rounds": [],
        "errors": [],
    }
    with devserver.cli_server(["-c", str(ini)]) as server, ArchiveClient(server.url, timeout=120) as client:
        client.tape_rest_info()  # discovery and the first connection are not part of a round
        for number in range(rounds):
            started = time.perf_counter()
            request_id = client.stage_request(ids)
            submit = time.perf_counter() - started
            started = time.perf_counter()
            page = client.poll(request_id, limit=PAGE)
            first_page = time.perf_counter() - started
            started = time.perf_counter()
            summary = client.poll(request_id, limit=1).summary
            summary_poll = time.perf_counter() - started
            complete = summary.files == files and summary.states.get("COMPLETED") == files
            if len(page.files) != min(PAGE, files) or not complete:
                results["errors"].append(
                    f"round {number}: page of {len(page.files)} files, summary of {summary.files}"
                )
            results["rounds"].append(
                {
                    "submit_seconds": round(submit, 4),
                    "first_page_seconds": round(first_page, 4),
                    "summary_poll_seconds": round(summary_poll, 4),
                    "states": dict(summary.states),
                }
            )
            log(
                f"bulkapi: round {number + 1}: submit {submit:.3f} s, first page {first_page * 1000:.1f} ms, "
                f"summary {summary_poll * 1000:.1f} ms; states {dict(summary.states)}"
            )
            client.delete_request(request_id)
    for key in ("submit_seconds", "first_page_seconds", "summary_poll_seconds"):
        values = [r[key] for r in results["rounds"]]
        results[key] = {"median": statistics.median(values), "best": min(values), "worst": max(values)}
    return results


def error_count(results: dict[str, Any]) -> int:
    """Return the rounds whose answers did not hold what was submitted."""
    return len(results.get("errors", ()))


def table(results: dict[str, Any]) -> str:
    """Return the section's lines, ready to print."""
    settings = results["settings"]
    lines = [
        f"bulk API: {settings['files']:,}-file stage request through pacifica_like.client, "
        f"{settings['server']} on a tape archive, {settings['rounds']} rounds (median / best / worst)"
    ]
    for key, label, scale, unit in (
        ("submit_seconds", "submit (POST /api/v1/stage)", 1, "s"),
        ("first_page_seconds", f"first page (limit {settings['page']:,})", 1000, "ms"),
        ("summary_poll_seconds", "summary poll (limit 1)", 1000, "ms"),
    ):
        figures = results[key]
        lines.append(
            f"  {label:<32} {figures['median'] * scale:9.3f} / {figures['best'] * scale:9.3f} / "
            f"{figures['worst'] * scale:9.3f} {unit}"
        )
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Check the targets on the medians."""
    files = results["settings"]["files"]
    submit, poll = results["submit_seconds"]["median"], results["first_page_seconds"]["median"]
    return [
        (
            f"bulk submit of {files:,} files < {TARGET_SUBMIT_SECONDS:g} s",
            submit < TARGET_SUBMIT_SECONDS,
            f"{submit:.3f} s (median)",
        ),
        (
            f"bulk first page poll < {TARGET_POLL_SECONDS * 1000:g} ms",
            poll < TARGET_POLL_SECONDS,
            f"{poll * 1000:.1f} ms (median)",
        ),
        (
            "bulk answers hold every file submitted",
            error_count(results) == 0,
            f"{error_count(results)} error(s)",
        ),
    ]
