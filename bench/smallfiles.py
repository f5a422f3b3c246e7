"""The small-file cells: wrk drives PUT, GET and HEAD; a Lua script checks every answer.

GET and HEAD read a pool of ids PUT beforehand by :func:`populate`; PUT cells
write ids never used before. wrk's own "read" socket errors are not failures
here: uWSGI's --http-socket closes the connection after each answer, and wrk
counts a close it did not expect (no ``Connection: close``, or a body that ends
at the close) as one. Failures are what the Lua ``response()`` callback
rejects (wrong status, wrong bytes), plus connect errors and timeouts.
"""

from __future__ import annotations

import http.client
import re
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.content import LAST_MODIFIED, SMALL_SIZE, small_content

LUA_SCRIPT = Path(__file__).resolve().parent / "lua" / "smallfile.lua"
#: Id distance between wrk threads in a PUT cell; far more than one cell can write.
PUT_STRIDE = 10_000_000
#: Seconds wrk waits for one answer before counting a timeout.
WRK_TIMEOUT = "10s"
_RESULT_LINE = re.compile(r"^BENCH_RESULT (.*)$", re.MULTILINE)


@dataclass
class Cell:
    """One wrk run: an operation at a concurrency against one server."""

    server: str
    op: str
    connections: int
    threads: int
    seconds: float
    requests: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    stats: dict[str, Any]
    readback: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy."""
        return asdict(self)


def _put_one(port: int, file_id: int, size: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(
            "PUT",
            f"/{file_id}",
            body=small_content(file_id, size),
            headers={"Last-Modified": LAST_MODIFIED, "Content-Type": "application/octet-stream"},
        )
        response = connection.getresponse()
        response.read()
        return response.status == 201
    finally:
        connection.close()


def populate(port: int, first_id: int, count: int, size: int = SMALL_SIZE, workers: int = 8) -> int:
    """PUT ids ``first_id+1 .. first_id+count`` with their content; return how many failed."""
    ids = range(first_id + 1, first_id + count + 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda file_id: _put_one(port, file_id, size), ids))
    return results.count(False)


def read_back(port: int, file_id: int, size: int = SMALL_SIZE) -> str:
    """GET one small file: "ok", "missing" (not found) or "bad" (anything else wrong)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", f"/{file_id}")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    # The peer answers a missing id with a 500 naming the ENOENT.
    if response.status == 404 or (response.status == 500 and b"No such file or directory" in body):
        return "missing"
    return "ok" if response.status == 200 and body == small_content(file_id, size) else "bad"


def verify_put_ranges(
    port: int, ranges: list[tuple[int, int]], samples: int, size: int = SMALL_SIZE
) -> dict[str, int]:
    """Read back ``samples`` ids spread over each PUT range; count ok, missing and bad.

    A missing id is a request that never reached the application: the one
    wrk builds to validate the script, one in flight when the cell ended, or
    one written into a connection the server had already closed. Bad bytes
    are errors.
    """
    counts = {"ok": 0, "missing": 0, "bad": 0}
    for first, last in ranges:
        if last < first:
            continue
        step = max(1, (last - first + 1) // samples)
        for file_id in range(first, last + 1, step):
            counts[read_back(port, file_id, size)] += 1
    return counts


def _parse_result(stdout: str) -> dict[str, Any]:
    match = _RESULT_LINE.search(stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no BENCH_RESULT line:\n{stdout}")
    stats: dict[str, Any] = {}
    for pair in match.group(1).split():
        key, value = pair.split("=", 1)
        stats[key] = value if key == "put_ranges" else float(value)
    return stats


def _ranges(raw: str) -> list[tuple[int, int]]:
    if raw == "-":
        return []
    pairs = (item.split("-") for item in raw.split(","))
    return [(int(first), int(last)) for first, last in pairs]


def run_cell(
    server: str,
    url: str,
    op: str,
    connections: int,
    duration: int,
    first_id: int,
    pool: int,
    size: int = SMALL_SIZE,
    headers: Sequence[str] = (),
    flavour: str = "pacifica",
) -> Cell:
    """Run one wrk cell; return throughput, latency percentiles and checked errors.

    ``headers``: ``"Name: value"`` lines every GET and HEAD also sends (wrk ``-H``).
    """
    threads = min(2, connections)
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        WRK_TIMEOUT,
        *(argument for line in headers for argument in ("-H", line)),
        "-s",
        str(LUA_SCRIPT),
        url + "/",
        "--",
        op,
        str(first_id),
        str(pool),
        str(size),
        str(PUT_STRIDE),
        str(connections // threads),
        flavour,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}\n{done.stdout}")
    stats = _parse_result(done.stdout)
    stats["put_ranges"] = _ranges(stats["put_ranges"])
    seconds = stats["duration_us"] / 1e6
    requests = int(stats["requests"])
    unanswered = int(stats["requests"] - stats["checked"])
    errors = int(stats["bad_status"] + stats["bad_body"] + stats["sock_connect"] + stats["sock_timeout"])
    return Cell(
        server=server,
        op=op.upper(),
        connections=connections,
        threads=threads,
        seconds=seconds,
        requests=requests,
        ops_per_s=requests / seconds if seconds else 0.0,
        p50_ms=stats["p50_us"] / 1000,
        p99_ms=stats["p99_us"] / 1000,
        errors=errors + max(unanswered, 0),
        stats=stats,
    )
