"""The Python client and its command line against real servers on loopback.

File API: ``pacifica-like serve`` on a posix archive and on a tape archive
(emulated library, delays off). Answers the real server gives only under
faults (a full disk, a bug, a body cut short, a corrupt digest, a throttle)
come from a small stub HTTP server on loopback that replays them. The bulk
tests run the client's stage_many against the real bulk API over a tape archive.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import http.server
import importlib.util
import io
import itertools
import json
import os
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacifica_like.cli.main import main
from pacifica_like.client import (
    ArchiveClient,
    AsyncArchiveClient,
    RequestTooLarge,
    StageProgress,
    TooManyRequests,
    TransportError,
    UnknownRequest,
)
from pacifica_like.core.errors import (
    ArchiveError,
    Conflict,
    DigestMismatch,
    FileNotInArchive,
    Forbidden,
    InsufficientStorage,
    InvalidRequest,
    MethodDisabled,
    OfflineOnTape,
    RangeNotSatisfiable,
    StorageUnavailable,
    UnsupportedMediaType,
)
from pacifica_like.web import devserver

pytestmark = pytest.mark.live
TIMEOUT = 30.0
MIB = 1 << 20
MTIME = 784111777
_ids = itertools.count(1000)


def new_id() -> int:
    """Return an id no other test of this module uses (the servers are shared)."""
    return next(_ids)


# -- servers --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def posix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A posix archive served by `pacifica-like serve`: (url, prefix, patch root)."""
    root = tmp_path_factory.mktemp("posix")
    patch_root = root / "incoming"
    patch_root.mkdir()
    env = {"PAI_ALLOW_DELETE": "true", "PAI_PATCH_ROOTS": str(patch_root)}
    with devserver.cli_server(["--prefix", str(root / "archive")], env=env) as server:
        yield server.url, root / "archive", patch_root


@pytest.fixture
def client(posix: tuple[str, Path, Path]) -> Iterator[ArchiveClient]:
    with ArchiveClient(posix[0], timeout=TIMEOUT) as archive:
        yield archive


class TapeArchive:
    """A tape archive in a directory: its archive.ini, and the CLI run against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ini = root / "archive.ini"
        self.ini.write_text(
            "\n".join(
                [
                    "[archive]",
                    "backend = tape",
                    f"prefix = {root / 'cache'}",
                    "write_once = true",
                    "[tape]",
                    f"library = {root / 'library'}",
                    "drives = 2",
                    "volumes = 3",
                    "volume_capacity = 4MiB",
                    "time_scale = 0",
                    "stage_timeout = 5",
                    "[bulk]",
                    "max_files_per_request = 5",
                    "min_poll_seconds = 0.1",
                    "mount_min_files = 1",
                    "max_wait_seconds = 0",
                    "poll_seconds = 0.05",
                ]
            )
            + "\n",
            encoding="utf-8",
        )
        assert main(["tape", "init", "-c", str(self.ini)]) == 0

    def offline(self, client: ArchiveClient, ids: list[int]) -> dict[int, bytes]:
        """Store files, then migrate and release them; return id -> bytes."""
        stored = {}
        for file_id in ids:
            stored[file_id] = os.urandom(5000 + file_id % 97)
            client.put(file_id, stored[file_id], mtime=MTIME)
        names = [str(i) for i in ids]
        assert main(["migrate", *names, "-c", str(self.ini), "--progress", "never"]) == 0
        assert main(["release", *names, "-c", str(self.ini), "--progress", "never"]) == 0
        return stored


@pytest.fixture(scope="module")
def tape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TapeArchive]]:
    """A tape archive (write-once, delete disabled) served by `pacifica-like serve`."""
    archive = TapeArchive(tmp_path_factory.mktemp("tape"))
    with devserver.cli_server(["-c", str(archive.ini)]) as server:
        yield server.url, archive


@pytest.fixture
def tape_client(tape: tuple[str, TapeArchive]) -> Iterator[ArchiveClient]:
    with ArchiveClient(tape[0], timeout=TIMEOUT) as archive:
        yield archive


Reply = Callable[[http.server.BaseHTTPRequestHandler], None]


class StubServer:
    """A loopback HTTP server answering each path with a canned reply (for faults we cannot cause)."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                stub.replies[self.path.split("?")[0]](self)

            do_GET = do_PUT = do_POST = do_HEAD = do_PATCH = do_DELETE = _reply  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def canned(
    status: int, body: bytes | dict[str, Any] = b"", content_type: str = "application/json", **headers: str
) -> Reply:
    """Return a reply sending ``status``, ``headers`` and ``body`` (a dict is sent as JSON)."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else body

    def reply(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(raw)))
        for name, value in headers.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(raw)

    return reply


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    yield server
    server.close()


def leftovers(directory: Path) -> list[str]:
    """Every name in ``directory``, hidden temp files included."""
    return sorted(os.listdir(directory))


# -- round trips ----------------------------------------------------------------------------------------


def test_put_get_round_trips_from_a_path_bytes_a_file_object_and_chunks(
    client: ArchiveClient, tmp_path: Path
):
    source = tmp_path / "source.bin"
    data = os.urandom(3 * MIB + 17)
    source.write_bytes(data)
    os.utime(source, (MTIME, MTIME))
    sources: list[Any] = [source, data, io.BytesIO(data), iter([data[:MIB], b"", data[MIB:]])]
    for source_kind in sources:
        file_id = new_id()
        upload = client.put(file_id, source_kind, mtime=None if source_kind is source else MTIME)
        assert upload.total_bytes == len(data)
        assert upload.sha256 == hashlib.sha256(data).hexdigest()
        dest = tmp_path / f"copy-{file_id}"
        download = client.get(file_id, dest)
        assert dest.read_bytes() == data
        assert download.verified and download.sha256 == upload.sha256 and download.size == len(data)
        assert dest.stat().st_mtime == MTIME  # the file's Last-Modified, carried both ways
        info = client.stat(file_id)
        assert (info.size, info.mtime, info.media, info.on_disk) == (len(data), MTIME, "disk", True)
        assert info.sha256 == upload.sha256 and (info.bytes_on_disk, info.bytes_on_tape) == (len(data), 0)
    assert leftovers(tmp_path) == sorted(["source.bin", *(p.name for p in tmp_path.glob("copy-*"))])


def test_get_to_a_file_object_and_a_byte_range(client: ArchiveClient):
    file_id = new_id()
    data = bytes(range(256)) * 40
    client.put(file_id, data)
    whole, part = io.BytesIO(), io.BytesIO()
    assert client.get(file_id, whole).verified
    assert whole.getvalue() == data
    download = client.get(file_id, part, byte_range=(100, 356))
    assert part.getvalue() == data[100:356] and download.size == 256 and not download.verified


def test_put_with_a_wrong_digest_stores_nothing_and_keeps_the_previous_version(client: ArchiveClient):
    file_id = new_id()
    client.put(file_id, b"previous")
    with pytest.raises(DigestMismatch) as caught:
        client.put(file_id, b"new bytes", sha256="00" * 32)
    assert caught.value.status == 422 and "does not match" in str(caught.value)
    out = io.BytesIO()
    client.get(file_id, out)
    assert out.getvalue() == b"previous"


def test_move_and_delete(client: ArchiveClient, posix: tuple[str, Path, Path], tmp_path: Path):
    file_id = new_id()
    incoming = posix[2] / f"move-{file_id}"
    incoming.write_bytes(b"moved in")
    client.move(file_id, incoming)
    assert not incoming.exists()
    out = io.BytesIO()
    client.get(file_id, out)
    assert out.getvalue() == b"moved in"
    client.delete(file_id)
    with pytest.raises(FileNotInArchive):
        client.stat(file_id)


# -- streaming and data safety ----------------------------------------------------------------------------


def test_large_transfers_stream_without_buffering(client: ArchiveClient, tmp_path: Path):
    size, block = 64 * MIB, os.urandom(MIB)

    def body() -> Iterator[bytes]:
        for _ in range(size // MIB):
            yield block

    expected = hashlib.sha256(block * (size // MIB)).hexdigest()
    file_id = new_id()
    tracemalloc.start()
    try:
        upload = client.put(file_id, body(), sha256=False)
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        download = client.get(file_id, tmp_path / "large")
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert upload.total_bytes == size and upload.sha256 == expected
    assert download.sha256 == expected and download.verified
    # A few chunks in flight at most, whatever the file size.
    assert put_peak < 8 * MIB, put_peak
    assert get_peak < 8 * MIB, get_peak


def test_interrupted_download_leaves_no_file_and_the_previous_one_intact(stub: StubServer, tmp_path: Path):
    def cut_short(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(4 * MIB))
        handler.end_headers()
        handler.wfile.write(b"x" * MIB)
        handler.close_connection = True

    stub.replies["/7"] = cut_short
    dest = tmp_path / "out"
    dest.write_bytes(b"previous download")
    with ArchiveClient(stub.url, timeout=TIMEOUT) as archive, pytest.raises(TransportError):
        archive.get(7, dest)
    assert dest.read_bytes() == b"previous download"
    assert leftovers(tmp_path) == ["out"]
    with ArchiveClient(stub.url, timeout=TIMEOUT) as archive, pytest.raises(TransportError):
        archive.get(7, tmp_path / "fresh")
    assert leftovers(tmp_path) == ["out"]


def test_download_not_matching_repr_digest_is_refused_and_leaves_nothing(stub: StubServer, tmp_path: Path):
    wrong = "sha-256=:" + "A" * 43 + "=:"
    stub.replies["/8"] = canned(200, b"these bytes", "application/octet-stream", Repr_Digest=wrong)
    with ArchiveClient(stub.url, timeout=TIMEOUT) as archive:
        with pytest.raises(DigestMismatch, match="Repr-Digest"):
            archive.get(8, tmp_path / "out")
        assert leftovers(tmp_path) == []
        unverified = archive.get(8, tmp_path / "out", verify=False)
    assert (tmp_path / "out").read_bytes() == b"these bytes" and not unverified.verified


def test_download_gets_a_new_files_permissions_under_the_umask_and_the_mtime(
    stub: StubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    modified = email.utils.formatdate(MTIME, usegmt=True)
    stub.replies["/9"] = canned(200, b"a user's file", "application/octet-stream", Last_Modified=modified)
    monkeypatch.chdir(tmp_path)  # a bare name: the temp file goes beside it in the working directory
    old = os.umask(0o027)
    try:
        with ArchiveClient(stub.url, timeout=TIMEOUT) as archive:
            archive.get(9, "mine")
    finally:
        os.umask(old)
    assert (tmp_path / "mine").read_bytes() == b"a user's file"
    assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o640  # 0666 under the umask, not a temp file's 0600
    assert (tmp_path / "mine").stat().st_mtime == MTIME
    assert leftovers(tmp_path) == ["mine"]


# -- errors -------------------------------------------------------------------------------------------------


def test_real_server_errors_map_to_the_server_classes(
    client: ArchiveClient, posix: tuple[str, Path, Path], tmp_path: Path
):
    with pytest.raises(InvalidRequest) as bad_id:
        client.stat("../etc")
    assert bad_id.value.status == 400
    with pytest.raises(InvalidRequest, match=r"segment|id"):
        client.get("12a", io.BytesIO())
    outside = tmp_path / "outside"
    outside.write_bytes(b"x")
    with pytest.raises(Forbidden) as forbidden:
        client.move(new_id(), outside)
    assert forbidden.value.status == 403 and outside.exists()
    missing = new_id()
    with pytest.raises(FileNotInArchive) as not_found:
        client.get(missing, tmp_path / "missing")
    assert not_found.value.status == 404 and str(missing) in str(not_found.value)
    assert not_found.value.request_id
    assert not (tmp_path / "missing").exists()
    with pytest.raises(FileNotInArchive):
        client.stat(missing)  # HEAD carries no body; the message still names the request
    file_id = new_id()
    client.put(file_id, b"0123456789")
    with pytest.raises(RangeNotSatisfiable) as bad_range:
        client.get(file_id, io.BytesIO(), byte_range=(100, 200))
    assert bad_range.value.status == 416


def test_tape_server_errors_offline_write_once_and_delete_disabled(
    tape_client: ArchiveClient, tape: tuple[str, TapeArchive], tmp_path: Path
):
    ids = [new_id(), new_id()]
    stored = tape[1].offline(tape_client, ids)
    with pytest.raises(OfflineOnTape) as offline:
        tape_client.get(ids[0], tmp_path / "offline")
    assert offline.value.status == 503 and offline.value.retry_after is not None
    assert "POST" in str(offline.value)
    assert not (tmp_path / "offline").exists()
    info = tape_client.stat(ids[0])
    assert (info.media, info.state, info.bytes_on_disk, info.bytes_on_tape) == (
        "tape",
        "OFFLINE",
        0,
        len(stored[ids[0]]),
    )
    # stage=True recalls it first; stage() alone does it too.
    assert tape_client.get(ids[0], tmp_path / "staged", stage=True).verified
    assert (tmp_path / "staged").read_bytes() == stored[ids[0]]
    assert tape_client.stage(ids[1], wait=True) is True
    assert tape_client.stat(ids[1]).state == "DUAL"
    with pytest.raises(Conflict) as conflict:
        tape_client.put(ids[0], b"again")
    assert conflict.value.status == 409
    with pytest.raises(MethodDisabled) as disabled:
        tape_client.delete(ids[0])
    assert disabled.value.status == 405 and "DELETE" not in disabled.value.headers["Allow"]


@pytest.mark.parametrize(
    ("status", "body", "headers", "error", "message"),
    [
        (413, {"type": "about:blank", "title": "Payload Too Large", "status": 413, "detail": "over 5 files"},
         {}, RequestTooLarge, "over 5 files"),
        (415, {"status": 415, "message": "PATCH takes JSON"}, {}, UnsupportedMediaType, "PATCH takes JSON"),
        (429, {"title": "Too Many Requests", "status": 429, "detail": "in flight"}, {"Retry_After": "7"},
         TooManyRequests, "in flight"),
        (500, {"status": 500, "message": "internal server error"}, {}, ArchiveError, "internal server error"),
        (503, {"status": 503, "message": "catalog down"}, {}, StorageUnavailable, "catalog down"),
        (503, {"status": 503, "message": "on tape"}, {"Retry_After": "60"}, OfflineOnTape, "on tape"),
        (507, {"status": 507, "message": "disk full"}, {}, InsufficientStorage, "disk full"),
        (502, b"<html>bad gateway</html>", {}, ArchiveError, "bad gateway"),
    ],
)  # fmt: skip
def test_fault_answers_map_to_typed_errors(stub: StubServer, status, body, headers, error, message):
    stub.replies["/9"] = canned(status, body, X_Request_Id="req-9", **headers)
    with ArchiveClient(stub.url, timeout=TIMEOUT) as archive, pytest.raises(error) as caught:
        archive.put(9, b"data")
    assert type(caught.value) is error  # the most specific class, not a parent
    assert str(caught.value) == message or message in str(caught.value)
    assert caught.value.status == status and caught.value.request_id == "req-9"
    if "Retry_After" in headers:
        assert caught.value.retry_after == float(headers["Retry_After"])
    if error is StorageUnavailable:
        assert not isinstance(caught.value, OfflineOnTape)


def test_unreachable_and_silent_servers_raise_transport_errors(stub: StubServer):
    nobody = f"http://127.0.0.1:{devserver.free_port()}"
    with ArchiveClient(nobody, timeout=TIMEOUT) as archive, pytest.raises(TransportError, match="refused"):
        archive.stat(1)

    def silent(handler: http.server.BaseHTTPRequestHandler) -> None:
        time.sleep(2)

    stub.replies["/1"] = silent
    with ArchiveClient(stub.url, timeout=0.3) as archive, pytest.raises(TransportError, match="timed out"):
        archive.stat(1)


# -- futures ------------------------------------------------------------------------------------------------


def test_futures_keep_at_most_max_in_flight_requests_on_the_wire(posix: tuple[str, Path, Path]):
    release = threading.Event()
    lock = threading.Lock()
    started: list[int] = []

    def body(file_id: int) -> Iterator[bytes]:
        with lock:
            started.append(file_id)
        release.wait(TIMEOUT)
        yield str(file_id).encode() * 1000

    ids = [new_id() for _ in range(8)]
    with AsyncArchiveClient(posix[0], timeout=TIMEOUT, max_in_flight=3) as archive:
        futures = [archive.put(file_id, body(file_id), sha256=False) for file_id in ids]
        deadline = time.monotonic() + TIMEOUT
        while len(started) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # time enough for a fourth upload to start, were it allowed to
        assert len(started) == 3
        release.set()
        for future in concurrent.futures.as_completed(futures, timeout=TIMEOUT):
            assert future.result().total_bytes > 0
        assert sorted(started) == ids
        reads = [archive.get(file_id, io.BytesIO()) for file_id in ids]
        assert all(f.result(timeout=TIMEOUT).verified for f in reads)
        with pytest.raises(FileNotInArchive):
            archive.stat(new_id()).result(timeout=TIMEOUT)


# -- command line -------------------------------------------------------------------------------------------


def test_cli_put_stat_get_and_failures(posix: tuple[str, Path, Path], tmp_path: Path, capsys):
    url, file_id = posix[0], new_id()
    source = tmp_path / "in.txt"
    source.write_bytes(b"from the command line\n")
    base = ["--url", url, "--progress", "never"]
    assert main(["client", "put", str(file_id), str(source), *base]) == 0
    assert "22 bytes" in capsys.readouterr().out
    assert main(["client", "stat", str(file_id), *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["size"] == 22
    dest = tmp_path / "out.txt"
    assert main(["client", "get", str(file_id), str(dest), *base]) == 0
    assert dest.read_bytes() == b"from the command line\n" and "verified" in capsys.readouterr().out
    assert main(["client", "stat", str(new_id()), *base]) == 1
    assert "404 FileNotInArchive" in capsys.readouterr().err
    unreachable = ["--url", f"http://127.0.0.1:{devserver.free_port()}"]
    assert main(["client", "stat", "1", *unreachable]) == 3
    assert "cannot talk to" in capsys.readouterr().err


# -- bulk staging -------------------------------------------------------------------------------------------

needs_bulk = pytest.mark.skipif(
    importlib.util.find_spec("pacifica_like.web.bulkapi") is None, reason="the bulk API is not built yet"
)


@needs_bulk
def test_stage_many_recalls_every_file_and_reports_each(
    tape_client: ArchiveClient, tape: tuple[str, TapeArchive]
):
    ids = [new_id() for _ in range(7)]
    stored = tape[1].offline(tape_client, ids)
    unknown = new_id()
    seen: list[StageProgress] = []
    # Seven files and one unknown over requests of at most five; a duplicate is sent once.
    results = tape_client.stage_many([*ids, unknown, ids[0]], progress=seen.append, disk_lifetime="PT1H")
    assert list(results) == [*ids, unknown]
    for file_id in ids:
        assert results[file_id].state == "COMPLETED", results[file_id]
        assert tape_client.stat(file_id).on_disk
        out = io.BytesIO()
        tape_client.get(file_id, out)
        assert out.getvalue() == stored[file_id]
    assert results[unknown].state == "FAILED" and results[unknown].error
    assert seen and seen[-1].done == 8 and len(seen[-1].request_ids) == 2
    localities = {e.path: e.locality for e in tape_client.archiveinfo(ids[:2])}
    assert localities == {f"/{ids[0]}": "DISK_AND_TAPE", f"/{ids[1]}": "DISK_AND_TAPE"}


@needs_bulk
def test_bulk_requests_paginate_cancel_delete_and_refuse_bad_input(tape_client: ArchiveClient):
    info = tape_client.tape_rest_info()
    assert info.max_files_per_request == 5 and info.min_poll_seconds == pytest.approx(0.1)
    with pytest.raises(InvalidRequest) as empty:
        tape_client.stage_request([])
    assert empty.value.status == 400
    with pytest.raises(RequestTooLarge):
        tape_client.stage_request([new_id() for _ in range(6)])
    ids = [new_id() for _ in range(4)]
    request_id = tape_client.stage_request(ids)  # unknown ids: accepted, each fails on its own
    pages, cursor = [], None
    while True:
        page = tape_client.poll(request_id, limit=3, cursor=cursor)
        pages.append(page)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert [f.path for p in pages for f in p.files] == [f"/{i}" for i in ids]
    assert pages[0].summary.files == 4
    with pytest.raises(InvalidRequest):
        tape_client.cancel(request_id, [new_id()])
    tape_client.delete_request(request_id)
    with pytest.raises(UnknownRequest) as gone:
        tape_client.poll(request_id)
    assert gone.value.status == 404
