"""Start the gateway on a free loopback port, for tests, benchmarks and deploy checks.

Real processes, real sockets: ``uwsgi_server`` runs the production entry
(``pacifica_like.wsgi`` under uWSGI), ``cli_server`` runs ``pacifica-like serve``
(the threaded CherryPy server). Both wait until ``GET /`` answers and stop
the process group on exit, so a failed test leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def uwsgi_binary() -> str:
    """Return the uwsgi executable beside this interpreter, or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "uwsgi")
    found = beside if os.access(beside, os.X_OK) else shutil.which("uwsgi")
    if not found:
        raise RuntimeError("uwsgi is not installed: pip install 'pacifica-like[uwsgi]'")
    return found


@dataclass
class RunningServer:
    """A server process and the URL it answers on."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: str

    def log(self) -> str:
        """Return what the server printed so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()


def uwsgi_command(port: int, processes: int = 4, threads: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """Return the uWSGI command line we deploy with (see README)."""
    command = [
        uwsgi_binary(),
        "--http-socket",
        f"127.0.0.1:{port}",
        "--master",
        "--processes",
        str(processes),
        "--module",
        "pacifica_like.wsgi",
        "--need-app",
        # The tape backend recalls in background threads (POST answers 202 while they run).
        "--enable-threads",
        "--die-on-term",
        "--disable-logging",
        "--socket-timeout",
        "60",
        "--chunked-input-limit",
        str(16 << 20),
        # --http-socket closes every connection after one response; say so, or
        # keep-alive clients find out by a reset on their next request.
        "--add-header",
        "Connection: close",
    ]
    if threads > 1:
        command += ["--threads", str(threads)]
    return command + list(extra)


@contextlib.contextmanager
def run_server(
    command: Sequence[str],
    port: int,
    env: Mapping[str, str] | None = None,
    log_path: str | None = None,
    timeout: float = 30.0,
) -> Iterator[RunningServer]:
    """Run ``command`` until ``GET /`` on ``port`` answers; stop it on exit."""
    log_path = log_path or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pacifica-like-{port}.log")
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_until_up(server, timeout)
        yield server
    finally:
        _stop(process)


def _wait_until_up(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(server.url + "/", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer within {timeout} s:\n{server.log()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@contextlib.contextmanager
def uwsgi_server(
    env: Mapping[str, str], processes: int = 4, threads: int = 1, extra: Sequence[str] = ()
) -> Iterator[RunningServer]:
    """Run ``pacifica_like.wsgi`` under uWSGI on a free port with ``env`` settings."""
    port = free_port()
    with run_server(uwsgi_command(port, processes, threads, extra), port, env) as server:
        yield server


@contextlib.contextmanager
def cli_server(args: Sequence[str], env: Mapping[str, str] | None = None) -> Iterator[RunningServer]:
    """Run ``pacifica-like serve ARGS`` (threaded CherryPy) on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "pacifica_like", "serve", "-a", "127.0.0.1", "-p", str(port), *args]
    with run_server(command, port, env) as server:
        yield server
