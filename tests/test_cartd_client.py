"""The real Pacifica cart service (pacifica-cartd 0.7.0) against a live gateway.

Pacifica's cart service is the archive interface's main client: it POSTs each
file to stage it, HEADs it until ``X-Pacifica-File-Storage-Media`` says
``disk``, GETs it, checks its hash and bundles the cart into a tar. Here it
runs as it does in production: its CherryPy REST server and a Celery worker
(each its own process, in a virtualenv of their own, cached between runs
under ``~/.cache/pacifica-like-tests``) share a SQLite database and the
RabbitMQ broker on 127.0.0.1:5672 (guest/guest). The module is skipped when
no broker listens there. Each test uses a queue of its own, deleted when the
test ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from client_venvs import cache_home, ensure_venv
from conftest import LAST_MODIFIED, LAST_MODIFIED_EPOCH, init_tape_library

from pacifica_like.core.config import Settings, load_settings
from pacifica_like.storage import registry
from pacifica_like.storage.tape import operations
from pacifica_like.web import devserver

pytestmark = pytest.mark.live

TIMEOUT = 10
#: Seconds a cart of a few small files may take to end (they take well under one here).
CART_DEADLINE = 20.0
BROKER = ("127.0.0.1", 5672)
BROKER_URL = "pyamqp://guest:guest@127.0.0.1:5672//"

CARTD_VERSION = "0.7.0"
CARTD_REQUIREMENTS = (
    f"pacifica-cartd=={CARTD_VERSION}",
    # peewee 4 dropped the sqliteext:// scheme cartd's own configuration uses.
    "peewee==3.19.0",
    "celery==5.7.0",
)

#: The CherryPy configuration cartd's deployment ships (its REST API is a MethodDispatcher resource).
CARTD_CPCONFIG = """\
[global]
log.screen: True
engine.autoreload.on: False

[/]
request.dispatch: cherrypy.dispatch.MethodDispatcher()
"""

#: Read by both of cartd's Celery apps (producer and worker) through CELERY_CONFIG_MODULE.
CELERY_CONFIG = """\
task_default_queue = {queue!r}
worker_enable_remote_control = False
"""

#: Deletes the test's queue and the direct exchange Celery names after it; run by the cartd venv's Python.
DELETE_QUEUE = """\
import sys
from kombu import Connection
with Connection(sys.argv[1], connect_timeout=5) as connection:
    channel = connection.channel()
    channel.queue_delete(sys.argv[2])
    channel.exchange_delete(sys.argv[2])
"""


# -- the cart service -----------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> str:
    """The broker's URL; skip the module when nothing listens on 127.0.0.1:5672."""
    try:
        socket.create_connection(BROKER, timeout=2).close()
    except OSError as exc:
        pytest.skip(f"no RabbitMQ broker on {BROKER[0]}:{BROKER[1]} ({exc}): pacifica-cartd needs one")
    return BROKER_URL


@pytest.fixture(scope="module")
def cartd_python(broker: str) -> Path:
    """The Python of the cached cartd venv (built on first use, which takes about 30 s)."""
    return ensure_venv(cache_home(f"cartd-{CARTD_VERSION}"), CARTD_REQUIREMENTS)


@dataclass
class CartService:
    """cartd's REST server and worker, working for one gateway."""

    url: str
    gateway: devserver.RunningServer
    worker_log: Path

    def submit(self, uid: str, entries: list[tuple[int, str, bytes]]) -> None:
        """POST a cart of (file id, path in the tar, bytes the file holds)."""
        body = {
            "fileids": [
                {
                    "id": str(file_id),
                    "path": path,
                    "hashtype": "sha256",
                    "hashsum": hashlib.sha256(data).hexdigest(),
                }
                for file_id, path, data in entries
            ]
        }
        answer = requests.post(f"{self.url}/{uid}", json=body, timeout=TIMEOUT)
        assert answer.status_code == 201, answer.text

    def status(self, uid: str) -> tuple[str | None, str]:
        """Return the cart's (status, message) as cartd's HEAD reports them."""
        answer = requests.head(f"{self.url}/{uid}", timeout=TIMEOUT)
        return answer.headers.get("X-Pacifica-Status"), answer.headers.get("X-Pacifica-Message", "")

    def wait_until_ended(self, uid: str, deadline: float = CART_DEADLINE) -> tuple[str | None, str]:
        """Poll the cart until it is ready or in error; fail, saying where it stood, after ``deadline`` s."""
        end = time.monotonic() + deadline
        while True:
            status, message = self.status(uid)
            if status in ("ready", "error"):
                return status, message
            if time.monotonic() > end:
                raise AssertionError(
                    f"cart {uid} still {status!r} ({message!r}) after {deadline} s; "
                    f"gateway HEADs so far: {self.gateway_requests('HEAD')}\n"
                    f"worker log tail:\n{self.worker_log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.1)

    def download(self, uid: str) -> tarfile.TarFile:
        """GET the cart's tar (cartd streams it as ``cart/<path>``)."""
        answer = requests.get(f"{self.url}/{uid}", params={"filename": "cart.tar"}, timeout=TIMEOUT)
        assert answer.status_code == 200, (answer.status_code, answer.text[:500])
        return tarfile.open(fileobj=io.BytesIO(answer.content), mode="r:")

    def gateway_requests(self, method: str) -> dict[str, int]:
        """Count the gateway's access-log lines for ``method`` by path (not its readiness probe ``/``)."""
        counts: dict[str, int] = {}
        for line in self.gateway.log().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if (
                    isinstance(entry, dict)
                    and entry.get("log") == "access"
                    and entry.get("method") == method
                    and entry["path"] != "/"
                ):
                    counts[entry["path"]] = counts.get(entry["path"], 0) + 1
        return counts


@contextlib.contextmanager
def background(
    command: list[str], env: dict[str, str], log: Path, cwd: Path, stop: signal.Signals = signal.SIGTERM
) -> Iterator[subprocess.Popen]:
    """Run ``command`` in its own process group, output to ``log``; send the group ``stop`` on exit."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    try:
        yield process
    finally:
        devserver.stop_group(process, stop)


def delete_queue(python: Path, broker: str, queue: str) -> None:
    """Delete ``queue`` (and its messages) and its exchange from the broker."""
    subprocess.run(
        [str(python), "-c", DELETE_QUEUE, broker, queue], check=True, timeout=30, capture_output=True
    )


def wait_for_line(process: subprocess.Popen, log: Path, text: str, deadline: float = 30.0) -> None:
    """Wait until ``text`` shows in ``log``; fail with the log if the process exits or the deadline passes."""
    end = time.monotonic() + deadline
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > end:
            raise AssertionError(
                f"{process.args[:4]} never printed {text!r}:\n{log.read_text(errors='replace')}"
            )
        time.sleep(0.05)


@pytest.fixture
def start_cartd(tmp_path: Path, broker: str, cartd_python: Path) -> Iterator[Callable[..., CartService]]:
    """Start cartd (dbsync, REST server, worker) for a gateway, on a queue of its own; all stopped after."""
    with contextlib.ExitStack() as stack:

        def start(gateway: devserver.RunningServer) -> CartService:
            workdir = tmp_path / "cartd"
            (workdir / "volume").mkdir(parents=True)
            queue = f"pacifica-like-test-cartd-{uuid.uuid4().hex}"
            (workdir / "cartd_celeryconfig.py").write_text(CELERY_CONFIG.format(queue=queue))
            (workdir / "cpconfig.ini").write_text(CARTD_CPCONFIG)
            inherited = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
            env = {
                **inherited,
                "PYTHONPATH": str(workdir),
                "CELERY_CONFIG_MODULE": "cartd_celeryconfig",
                "CARTD_CONFIG": str(workdir / "absent-config.ini"),
                "CARTD_CPCONFIG": str(workdir / "cpconfig.ini"),
                "VOLUME_PATH": str(workdir / "volume") + "/",
                "PEEWEE_URL": f"sqliteext:///{workdir / 'cartd.sqlite3'}",
                "ARCHIVE_INTERFACE_URL": gateway.url + "/",
                "BROKER_URL": broker,
                "BACKEND_URL": "disabled",
                # Fail fast on a broken database, not after cartd's 10 x 20 s of retries.
                "DATABASE_CONNECT_ATTEMPTS": "1",
            }
            bin_dir = cartd_python.parent
            subprocess.run(
                [str(bin_dir / "pacifica-cartd-cmd"), "dbsync"], env=env, cwd=workdir, check=True, timeout=60
            )
            # Registered first, so it runs last: after both processes are gone, nothing re-declares the queue.
            stack.callback(delete_queue, cartd_python, broker, queue)
            worker_log = workdir / "worker.log"
            worker = stack.enter_context(
                background(
                    [str(cartd_python), "-m", "celery", "-A", "pacifica.cartd.tasks", "worker",
                     "--pool", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
                     "--loglevel", "INFO", "--hostname", f"{queue}@%h"],
                    # Killed: its event loop sees SIGTERM or SIGQUIT only when its epoll next times out,
                    # up to 10 s after its last task. Its queue is deleted after, so nothing is left behind.
                    env, worker_log, workdir, signal.SIGKILL,
                )
            )  # fmt: skip
            port = devserver.free_port()
            server = stack.enter_context(
                devserver.run_server(
                    [str(bin_dir / "pacifica-cartd"), "--address", "127.0.0.1", "--port", str(port)],
                    port, env, log_path=str(workdir / "server.log"),
                )
            )  # fmt: skip
            wait_for_line(worker, worker_log, " ready.")
            return CartService(server.url, gateway, worker_log)

        yield start


# -- the gateway ------------------------------------------------------------------------


def put(gateway: devserver.RunningServer, file_id: int, data: bytes) -> None:
    """PUT ``data`` at ``file_id`` with the suite's Last-Modified."""
    answer = requests.put(
        f"{gateway.url}/{file_id}", data=data, headers={"Last-Modified": LAST_MODIFIED}, timeout=TIMEOUT
    )
    assert answer.status_code == 201, answer.text


def head(gateway: devserver.RunningServer, file_id: int) -> requests.Response:
    """HEAD ``file_id`` on the gateway."""
    return requests.head(f"{gateway.url}/{file_id}", timeout=TIMEOUT)


@pytest.fixture
def posix_gateway(tmp_path: Path) -> Iterator[devserver.RunningServer]:
    """`pacifica-like serve` on the posix backend."""
    with devserver.cli_server(["--prefix", str(tmp_path / "archive")]) as server:
        yield server


@pytest.fixture
def tape_archive(tmp_path: Path) -> Settings:
    """An archive.ini for the tape backend (library initialised, every delay off); its settings."""
    ini = tmp_path / "archive.ini"
    ini.write_text(
        f"[archive]\nbackend = tape\nprefix = {tmp_path / 'cache'}\n"
        f"[tape]\nlibrary = {tmp_path / 'library'}\ntime_scale = 0\nvolumes = 2\nvolume_capacity = 64MiB\n",
        encoding="utf-8",
    )
    return init_tape_library(load_settings(config_file=str(ini), env={}))


@pytest.fixture
def tape_gateway(tmp_path: Path, tape_archive: Settings) -> Iterator[devserver.RunningServer]:
    """`pacifica-like serve` on the tape backend."""
    with devserver.cli_server(["--config", str(tmp_path / "archive.ini")]) as server:
        yield server


def release_to_tape(settings: Settings, file_ids: list[int]) -> None:
    """Migrate the files to tape and drop their disk copies, as `migrate` then `release` do."""
    backend = registry.create(settings)
    try:
        outcome = operations.run_migrate(backend, operations.plan_migrate(backend, file_ids))
        assert not outcome.failed, outcome.failed
        outcome = operations.run_release(backend, operations.plan_release(backend, file_ids))
        assert not outcome.failed, outcome.failed
    finally:
        backend.close()


def assert_tar_holds(archive: tarfile.TarFile, expected: dict[str, bytes]) -> None:
    """The tar holds exactly ``expected`` (path -> bytes) under ``cart/``, each with the PUT's mtime."""
    members = {m.name: m for m in archive.getmembers() if m.isfile()}
    assert sorted(members) == sorted(f"cart/{path}" for path in expected)
    for path, data in expected.items():
        member = members[f"cart/{path}"]
        extracted = archive.extractfile(member)
        assert extracted is not None
        assert extracted.read() == data, path
        # cartd sets each file's mtime from the gateway's HEAD Last-Modified (epoch seconds).
        assert member.mtime == int(LAST_MODIFIED_EPOCH), path


# -- the tests --------------------------------------------------------------------------


def test_a_cart_of_files_on_the_posix_backend_is_bundled_byte_for_byte(posix_gateway, start_cartd):
    files = {12345: ("dir/a.bin", os.urandom(300_000)), 7: ("b.txt", b"small file\n"), 8: ("dir/empty", b"")}
    for file_id, (_, data) in files.items():
        put(posix_gateway, file_id, data)
    cartd = start_cartd(posix_gateway)
    uid = uuid.uuid4().hex
    cartd.submit(uid, [(file_id, path, data) for file_id, (path, data) in files.items()])
    assert cartd.wait_until_ended(uid) == ("ready", "")
    assert_tar_holds(cartd.download(uid), dict(files.values()))
    assert cartd.gateway_requests("GET") == {f"/{file_id}": 1 for file_id in files}


def test_a_cart_of_files_released_to_tape_is_staged_and_bundled(tape_gateway, tape_archive, start_cartd):
    files = {1: ("one.bin", os.urandom(1 << 20)), 2: ("sub/two.bin", os.urandom(70_000))}
    for file_id, (_, data) in files.items():
        put(tape_gateway, file_id, data)
    release_to_tape(tape_archive, sorted(files))
    for file_id in files:
        answer = head(tape_gateway, file_id)
        assert answer.headers["X-Pacifica-File-State"] == "OFFLINE"
        assert answer.headers["X-Pacifica-File-Storage-Media"] == "tape"
    cartd = start_cartd(tape_gateway)
    uid = uuid.uuid4().hex
    cartd.submit(uid, [(file_id, path, data) for file_id, (path, data) in files.items()])
    assert cartd.wait_until_ended(uid) == ("ready", "")
    assert_tar_holds(cartd.download(uid), dict(files.values()))
    # cartd asked the gateway to stage each file before it read it; both are on disk again.
    assert cartd.gateway_requests("POST") == {f"/{file_id}": 1 for file_id in files}
    assert {head(tape_gateway, file_id).headers["X-Pacifica-File-State"] for file_id in files} == {"DUAL"}


#: HEADs of one missing file a cart may make before it gives up (cartd HEADs a file once per status task).
MAX_HEADS_OF_A_MISSING_FILE = 3
#: Seconds a cart naming a missing file may take to end (about one when it does).
MISSING_DEADLINE = 10.0


@pytest.mark.parametrize("beside_a_present_file", [True, False], ids=["beside-a-present-file", "alone"])
def test_a_cart_naming_a_missing_file_ends_in_error_and_stops_asking(
    posix_gateway, start_cartd, beside_a_present_file: bool
):
    present, missing = 5, 6
    data = b"the file that is there\n"
    put(posix_gateway, present, data)
    assert head(posix_gateway, missing).status_code == 404
    cartd = start_cartd(posix_gateway)
    uid = uuid.uuid4().hex
    entries = [(missing, "missing.txt", b"")]
    if beside_a_present_file:
        entries.insert(0, (present, "present.txt", data))
    cartd.submit(uid, entries)
    status, message = cartd.wait_until_ended(uid, MISSING_DEADLINE)
    assert status == "error", message
    # cartd's error quotes the gateway's answer about the file.
    assert f'"file": "{missing}"' in message and "not found" in message.lower(), message
    # Ended, the cart must also stop asking the gateway about the missing file: watch for a while.
    watch_until = time.monotonic() + 2.0
    while time.monotonic() < watch_until:
        heads = cartd.gateway_requests("HEAD").get(f"/{missing}", 0)
        assert heads <= MAX_HEADS_OF_A_MISSING_FILE, (
            f"cartd HEADed the missing /{missing} {heads} times and goes on after the cart ended: {message!r}"
        )
        time.sleep(0.1)
