"""Real servers on loopback: `pacifica-like serve` (waitress; both file API adapters) and nginx + uWSGI.

Faults a WSGI test cannot produce live here: clients that vanish mid-upload,
chunked bodies, many processes racing on one id, the exact deploy commands.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import LAST_MODIFIED, files_under

from pacifica_like.web import devserver

pytestmark = pytest.mark.live
TIMEOUT = 30


@pytest.fixture(params=["cli", "cli-cherrypy", "production"])
def server(request, prefix: Path) -> Iterator[devserver.RunningServer]:
    """The service on a free port: `pacifica-like serve` on each file API adapter, and nginx + uWSGI."""
    if request.param.startswith("cli"):
        env = {
            "PAI_ALLOW_DELETE": "true",
            "PAI_FILE_API": "cherrypy" if request.param == "cli-cherrypy" else "wsgi",
        }
        with devserver.cli_server(["--prefix", str(prefix)], env=env) as running:
            yield running
    else:
        env = {"PAI_PREFIX": str(prefix), "PAI_ALLOW_DELETE": "true"}
        with devserver.production_server(env, processes=4) as running:
            yield running


def put(url: str, file_id: int, body, **headers: str) -> requests.Response:
    return requests.put(
        f"{url}/{file_id}", data=body, headers={"Last-Modified": LAST_MODIFIED, **headers}, timeout=TIMEOUT
    )


def raw_request(url: str, head: bytes, body: bytes, close_early: bool) -> bytes:
    """Send ``head`` + ``body`` on a raw socket; return the answer (b"" if we hung up)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(head + body)
        if close_early:
            # Reset, not a polite FIN: the server's next read fails at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return b""
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_issue_curl_example_works_as_written(server, tmp_path: Path, prefix: Path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    source = tmp_path / "foo.txt"
    source.write_bytes(b"hello from curl\n")
    result = subprocess.run(
        ["curl", "-sS", "-X", "PUT", "-H", f"Last-Modified: {LAST_MODIFIED}", "--upload-file", str(source),
         f"{server.url}/12345"],
        capture_output=True, text=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    assert '"total_bytes": 16' in result.stdout
    assert (prefix / "39" / "3039").read_bytes() == b"hello from curl\n"
    assert requests.get(f"{server.url}/12345", timeout=TIMEOUT).content == b"hello from curl\n"


def test_client_vanishing_mid_upload_leaves_the_previous_version(server, prefix: Path):
    assert put(server.url, 12345, b"previous").status_code == 201
    head = (
        b"PUT /12345 HTTP/1.1\r\nHost: x\r\nLast-Modified: " + LAST_MODIFIED.encode() + b"\r\n"
        b"Content-Length: 10000000\r\n\r\n"
    )
    raw_request(server.url, head, b"x" * 300_000, close_early=True)
    # The server notices the reset, discards the temp file and keeps the old bytes.
    assert wait_for(lambda: files_under(prefix) == [prefix / "39" / "3039"]), files_under(prefix)
    assert requests.get(f"{server.url}/12345", timeout=TIMEOUT).content == b"previous"


def test_body_shorter_than_content_length_is_400_and_stores_nothing(server, prefix: Path):
    head = (
        b"PUT /777 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nLast-Modified: "
        + LAST_MODIFIED.encode()
        + b"\r\nContent-Length: 5000\r\n\r\n"
    )
    answer = raw_request(server.url, head, b"y" * 1000, close_early=False)
    # The server either answers 400 or drops the connection; it never stores the file.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.0 400"), answer
    assert wait_for(lambda: files_under(prefix) == [])
    assert requests.get(f"{server.url}/777", timeout=TIMEOUT).status_code == 404


def test_chunked_upload_stores_every_byte(server, prefix: Path):
    chunks = [os.urandom(n) for n in (1, 1000, 65536, 300_000, 7)]
    response = put(server.url, 4096, iter(chunks))  # a generator makes requests send chunked
    assert response.status_code == 201, response.text
    data = b"".join(chunks)
    assert response.json()["total_bytes"] == len(data)
    assert requests.get(f"{server.url}/4096", timeout=TIMEOUT).content == data


def test_many_clients_on_distinct_and_identical_ids(server, prefix: Path):
    def own_file(n: int) -> bool:
        data = hashlib.sha256(str(n).encode()).digest() * (n % 50 + 1)
        assert put(server.url, 10_000 + n, data).status_code == 201
        return requests.get(f"{server.url}/{10_000 + n}", timeout=TIMEOUT).content == data

    versions = [bytes([65 + n]) * 200_000 for n in range(6)]

    def shared_file(n: int) -> bool:
        if n % 2:
            return put(server.url, 5, versions[n % len(versions)]).status_code == 201
        response = requests.get(f"{server.url}/5", timeout=TIMEOUT)
        return response.status_code == 404 or response.content in versions

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        own = list(pool.map(own_file, range(120)))
        shared = list(pool.map(shared_file, range(120)))
    assert all(own)
    assert all(shared)
    assert requests.get(f"{server.url}/5", timeout=TIMEOUT).content in versions
    assert not [p for p in files_under(prefix) if p.name.startswith(".")]  # no temp files left


def test_delete_when_enabled(server, prefix: Path):
    put(server.url, 12345, b"x")
    assert requests.delete(f"{server.url}/12345", timeout=TIMEOUT).status_code == 200
    assert files_under(prefix) == []


def test_issue_uwsgi_command_line(tmp_path: Path):
    """The uWSGI line from the README, with only the port changed to a free one."""
    port = devserver.free_port()
    command = [devserver.uwsgi_binary(), "--http-socket", f"127.0.0.1:{port}", "--master", "-p", "8",
               "--module", "pacifica_like.wsgi"]  # fmt: skip
    env = {"PAI_BACKEND_TYPE": "posix", "PAI_PREFIX": str(tmp_path / "data")}
    with devserver.run_server(command, port, env) as running:
        assert put(running.url, 12345, b"under uwsgi").status_code == 201
        assert (tmp_path / "data" / "39" / "3039").read_bytes() == b"under uwsgi"


def test_uwsgi_refuses_to_start_on_a_bad_setting(tmp_path: Path):
    ini = tmp_path / "archive.ini"
    ini.write_text("[archive]\nwrite_once = sometimes\n")
    port = devserver.free_port()
    result = subprocess.run(
        devserver.uwsgi_command(port, processes=2),
        env={**os.environ, "PAI_CONFIG": str(ini)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"{ini} [archive] write_once" in result.stdout + result.stderr


def test_python_dash_m_serves_with_flags(tmp_path: Path):
    port = devserver.free_port()
    command = [sys.executable, "-m", "pacifica_like", "-t", "posix", "-p", str(port), "-a", "127.0.0.1",
               "--prefix", str(tmp_path / "m")]  # fmt: skip
    with devserver.run_server(command, port) as running:
        assert put(running.url, 1, b"m").status_code == 201
        assert (tmp_path / "m" / "file.1").read_bytes() == b"m"


def test_cli_server_honours_server_conf_and_flag_precedence(tmp_path: Path):
    port, other = devserver.free_port(), devserver.free_port()
    conf = tmp_path / "server.conf"
    conf.write_text(f'[global]\nserver.socket_host: "127.0.0.1"\nserver.socket_port: {other}\n')
    command = [
        sys.executable,
        "-m",
        "pacifica_like",
        "serve",
        "--cpconfig",
        str(conf),
        "--prefix",
        str(tmp_path),
    ]
    # server.conf alone chooses the port...
    with devserver.run_server(command, other) as running:
        assert requests.get(running.url + "/", timeout=TIMEOUT).status_code == 200
    # ...and a flag beats it.
    with devserver.run_server([*command, "-p", str(port)], port) as running:
        assert requests.get(running.url + "/", timeout=TIMEOUT).status_code == 200


def test_serve_stops_under_load_without_a_traceback(tmp_path: Path):
    """SIGTERM while keep-alive clients are mid-request: the answers in flight finish, no error is logged.

    waitress's workers tell its event loop about each answer through a trigger; closing that
    trigger before they finished made every one of them log an EBADF traceback.
    """
    import http.client
    import signal
    import threading

    port = devserver.free_port()
    command = [sys.executable, "-m", "pacifica_like", "serve", "-a", "127.0.0.1", "-p", str(port)]
    env = {"PAI_PREFIX": str(tmp_path / "archive"), "PAI_ACCESS_LOG": "off"}
    with devserver.run_server(command, port, env) as server:
        requests.put(f"{server.url}/1", data=b"x" * 4096, timeout=10).raise_for_status()
        answered = threading.Semaphore(0)
        stop = threading.Event()

        def hammer() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                while not stop.is_set():
                    connection.request("GET", "/1")
                    connection.getresponse().read()
                    answered.release()
            except (OSError, http.client.HTTPException):
                return  # the server went away, as it should
            finally:
                connection.close()

        clients = [threading.Thread(target=hammer) for _ in range(24)]
        for client in clients:
            client.start()
        for _ in range(500):  # every client is mid-stream when the signal lands
            assert answered.acquire(timeout=30)
        os.killpg(server.process.pid, signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        stop.set()
        for client in clients:
            client.join(timeout=30)
        log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]
