"""Start the gateway on a free loopback port, for tests, benchmarks and deploy checks.

Real processes, real sockets: ``production_server`` runs the production shape
(nginx with deploy/nginx/pacifica-like.conf in front of ``pacifica_like.wsgi``
under uWSGI on a unix socket), ``uwsgi_server`` runs uWSGI alone on an HTTP
socket, ``cli_server`` runs ``pacifica-like serve`` (waitress). All wait until
``GET /`` answers and stop their process groups on exit, so a failed test
leaves nothing running.
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

from pacifica_like.web import nginxfront


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


def uwsgi_command(
    port: int | str, processes: int = 4, threads: int = 1, extra: Sequence[str] = ()
) -> list[str]:
    """Return the uWSGI command line we deploy with (see README).

    ``port``: a TCP port for uWSGI's own HTTP socket, or the path of a unix
    socket speaking the uwsgi protocol to nginx (the production shape).
    """
    if isinstance(port, str):
        bind = ["--socket", port, "--chmod-socket=666", "--listen", "128"]
    else:
        # --http-socket closes every connection after one response; say so, or
        # keep-alive clients find out by a reset on their next request.
        bind = ["--http-socket", f"127.0.0.1:{port}", "--add-header", "Connection: close"]
    command = [
        uwsgi_binary(),
        *bind,
        "--master",
        # Request heads up to 64 KiB (nginx passes up to 4 x 8 KiB of headers); the 4 KiB default
        # turns a long Range or cookie into a dropped connection (a 502 behind nginx).
        "--buffer-size",
        "65535",
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
        stop_group(process)


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


def stop_group(process: subprocess.Popen[bytes], first: signal.Signals = signal.SIGTERM) -> None:
    """Stop a process started in its own session: its group gets ``first``, SIGKILL after 15 s."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, first)
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


#: The nginx settings we ship for production, included by the test front's configuration.
NGINX_SITE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "deploy",
    "nginx",
    "pacifica-like.conf",
)


def nginx_binary() -> str:
    """Return the nginx executable (Debian installs it in /usr/sbin)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise RuntimeError("nginx is not installed: apt-get install nginx-light")
    return found


def nginx_config(port: int, upstream_socket: str, workdir: str) -> str:
    """Return an nginx.conf serving ``port`` in front of ``upstream_socket`` with the shipped settings."""
    # The Docker entrypoint renders its front with the same function.
    return nginxfront.render(f"127.0.0.1:{port}", upstream_socket, workdir, NGINX_SITE)


@contextlib.contextmanager
def production_server(
    env: Mapping[str, str], processes: int = 4, threads: int = 1, extra: Sequence[str] = ()
) -> Iterator[RunningServer]:
    """Run the production shape: nginx on a free port in front of uWSGI on a unix socket.

    The RunningServer's process and log are uWSGI's; nginx's error log is in
    the same scratch directory.
    """
    import tempfile

    workdir = tempfile.mkdtemp(prefix="pacifica-like-front-")
    upstream = os.path.join(workdir, "uwsgi.sock")
    port = free_port()
    config_path = os.path.join(workdir, "nginx.conf")
    with open(config_path, "w", encoding="utf-8") as handle:
        handle.write(nginx_config(port, upstream, workdir))
    uwsgi_log = os.path.join(workdir, "uwsgi.log")
    with open(uwsgi_log, "wb") as log:
        uwsgi = subprocess.Popen(
            uwsgi_command(upstream, processes, threads, extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    try:
        with run_server(
            [nginx_binary(), "-c", config_path, "-p", workdir],
            port,
            log_path=os.path.join(workdir, "nginx.log"),
        ) as front:
            server = RunningServer(front.url, uwsgi, uwsgi_log)
            _wait_until_up(server, 30.0)
            yield server
    finally:
        stop_group(uwsgi)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def cli_server(args: Sequence[str], env: Mapping[str, str] | None = None) -> Iterator[RunningServer]:
    """Run ``pacifica-like serve ARGS`` (waitress) on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "pacifica_like", "serve", "-a", "127.0.0.1", "-p", str(port), *args]
    with run_server(command, port, env) as server:
        yield server
