"""The grid's file tools against live servers: gfal2 (stat, ls, sum, copy both ways, rm) and davix
(ls, put, get, rm), on the Pacifica door ``/<id>`` and on the ``/webdav/`` door.

``pacifica-like serve`` runs a tape archive (files on disk, on disk and tape, and only on tape);
the production shape (nginx in front of uWSGI) runs posix, to show the front end passes
PROPFIND, OPTIONS and the digest headers through. Each test checks what the tool prints and
what the gateway then holds. davix 0.8 lists a single ``http://`` file with HEAD, whose Pacifica
answer (204, ``X-Content-Length``) it cannot read; ``dav://`` URLs make it use PROPFIND.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bulk_helpers import MTIME, content, store_offline
from conftest import init_tape_library
from test_gfal2_client import _gfal_env

from pacifica_like.core.config import load_settings
from pacifica_like.storage import registry
from pacifica_like.storage.tape import operations
from pacifica_like.web.devserver import RunningServer, cli_server, production_server

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        shutil.which("gfal-stat") is None or shutil.which("davix-ls") is None,
        reason="gfal2's and davix's tools are not installed; .ci/run and `make test` install them "
        "(apt-get install gfal2 gfal2-plugin-http python3-gfal2 python3-gfal2-util gfal2-util-scripts davix)",
    ),
]

TIMEOUT = 30
ON_TAPE_ONLY = 40
ON_BOTH = 41
DISK_ONLY = 42


def size_of(file_id: int) -> int:
    return 5000 + file_id


def state_of(live: Live, file_id: int) -> str:
    """The file's HSM state, from Pacifica's HEAD."""
    request = urllib.request.Request(live.url(f"/{file_id}"), method="HEAD")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
        return answer.headers["X-Pacifica-File-State"]


def stored_path(live: Live, file_id: int) -> Path:
    """Where the gateway keeps the file on disk (Pacifica's HEAD names it)."""
    request = urllib.request.Request(live.url(f"/{file_id}"), method="HEAD")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
        return live.prefix / answer.headers["X-Pacifica-File"]


def adler32(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"


@dataclass
class Live:
    server: RunningServer
    prefix: Path
    env: dict[str, str]

    def url(self, path: str) -> str:
        return f"{self.server.url}{path}"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one tool with a deadline; gfal tools get ``-t``."""
        tool, *rest = args
        deadline = ["-t", str(TIMEOUT)] if tool.startswith("gfal-") else ["--timeout", str(TIMEOUT)]
        return subprocess.run(
            [tool, *deadline, *rest], env=self.env, capture_output=True, text=True, timeout=TIMEOUT + 30
        )

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout


@pytest.fixture(scope="module")
def tape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A tape archive (delete allowed) behind ``pacifica-like serve``."""
    root = tmp_path_factory.mktemp("grid-webdav")
    library = str(root / "tape-library")
    init_tape_library(load_settings(flags={"tape": {"library": library}}, env={}))
    ini = root / "archive.ini"
    ini.write_text(
        f"[archive]\nbackend = tape\nprefix = {root / 'archive'}\nallow_delete = true\n"
        f"[tape]\nlibrary = {library}\nvolume_capacity = 64MiB\ntime_scale = 0.005\n",
        encoding="utf-8",
    )
    settings = load_settings(config_file=str(ini), env={})
    backend = registry.create(settings)
    try:
        store_offline(backend, {ON_TAPE_ONLY: size_of(ON_TAPE_ONLY)})
        for file_id in (ON_BOTH, DISK_ONLY):
            with backend.open_writer(file_id, MTIME) as writer:
                writer.write(content(file_id, size_of(file_id)))
                writer.commit()
        assert not operations.run_migrate(backend, operations.plan_migrate(backend, [ON_BOTH])).failed
    finally:
        backend.close()
    with cli_server(["--config", str(ini)]) as server:
        yield Live(server, root / "archive", _gfal_env())


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A posix archive behind nginx and uWSGI (the production shape)."""
    root = tmp_path_factory.mktemp("grid-webdav-production")
    env = {"PAI_PREFIX": str(root / "archive"), "PAI_ALLOW_DELETE": "true"}
    with production_server(env, processes=2) as server:
        yield Live(server, root / "archive", _gfal_env())


# -- gfal2 on the Pacifica door --------------------------------------------------------


@pytest.mark.parametrize("file_id", [ON_TAPE_ONLY, ON_BOTH, DISK_ONLY])
def test_gfal_stat_gives_size_and_date_wherever_the_file_is(tape: Live, file_id: int):
    printed = tape.ok("gfal-stat", tape.url(f"/{file_id}"))
    assert f"Size: {size_of(file_id)}\tregular file" in printed
    # gfal-stat prints local time: compare with the date the file was stored with.
    assert f"Modify: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(MTIME))}" in printed


@pytest.mark.parametrize("file_id", [ON_TAPE_ONLY, DISK_ONLY])
def test_gfal_sum_adler32_and_md5_without_a_recall(tape: Live, file_id: int):
    data = content(file_id, size_of(file_id))
    assert tape.ok("gfal-sum", tape.url(f"/{file_id}"), "ADLER32").split() == [
        tape.url(f"/{file_id}"), adler32(data)
    ]  # fmt: skip
    assert tape.ok("gfal-sum", tape.url(f"/{file_id}"), "MD5").split()[1] == hashlib.md5(data).hexdigest()
    if file_id == ON_TAPE_ONLY:
        # Still only on tape: the checksums came from the catalog, not from a recall.
        assert state_of(tape, file_id) == "OFFLINE"


def test_gfal_ls_lists_a_file_and_the_root(tape: Live):
    line = tape.ok("gfal-ls", "-l", tape.url(f"/{DISK_ONLY}"))
    assert f" {size_of(DISK_ONLY)} " in line
    names = tape.ok("gfal-ls", tape.url("/webdav/")).split()
    assert {str(ON_TAPE_ONLY), str(ON_BOTH), str(DISK_ONLY)} <= set(names)


def test_gfal_copy_both_ways_with_checksum_check_then_rm(tape: Live, tmp_path: Path):
    source = tmp_path / "upload.bin"
    data = os.urandom(70_000)
    source.write_bytes(data)
    tape.ok("gfal-copy", "-K", "ADLER32", f"file://{source}", tape.url("/43"))
    stored = stored_path(tape, 43)
    assert stored.read_bytes() == data
    back = tmp_path / "download.bin"
    tape.ok("gfal-copy", "-K", "MD5", tape.url("/43"), f"file://{back}")
    assert back.read_bytes() == data
    # Into the WebDAV door too, then removed there.
    tape.ok("gfal-copy", "-K", "ADLER32", f"file://{source}", tape.url("/webdav/44"))
    assert tape.ok("gfal-sum", tape.url("/webdav/44"), "ADLER32").split()[1] == adler32(data)
    assert "DELETED" in tape.ok("gfal-rm", tape.url("/webdav/44"))
    assert "DELETED" in tape.ok("gfal-rm", tape.url("/43"))
    assert not stored.exists()
    missing = tape.run("gfal-stat", tape.url("/43"))
    assert missing.returncode != 0
    assert "No such file" in missing.stderr or "404" in missing.stderr


def test_a_copy_gfal_refuses_for_its_checksum_leaves_nothing(tape: Live, tmp_path: Path):
    source = tmp_path / "upload.bin"
    source.write_bytes(b"some bytes" * 100)
    done = tape.run("gfal-copy", "-K", "ADLER32:00000001", f"file://{source}", tape.url("/45"))
    assert done.returncode != 0
    assert tape.run("gfal-stat", tape.url("/45")).returncode != 0


# -- davix -------------------------------------------------------------------------------


def test_davix_put_ls_get_rm(tape: Live, tmp_path: Path):
    source = tmp_path / "davix.bin"
    data = os.urandom(33_333)
    source.write_bytes(data)
    tape.ok("davix-put", str(source), tape.url("/46"))  # no Last-Modified: stored with the upload time
    listing = tape.ok("davix-ls", "-l", tape.url("/webdav/46"))
    assert " 33333 " in listing
    # On the Pacifica door davix must be told the server speaks WebDAV (dav://): over http:// it
    # stats one file with HEAD, and Pacifica's HEAD is a 204 without Content-Length.
    pacifica_door = tape.ok("davix-ls", "-l", tape.url("/46").replace("http://", "dav://"))
    assert " 33333 " in pacifica_door and " 1970-" not in pacifica_door
    root = tape.ok("davix-ls", "-l", tape.url("/webdav/"))
    mine = next(line for line in root.splitlines() if line.endswith(f" {DISK_ONLY}"))
    assert f" {size_of(DISK_ONLY)} " in mine
    assert time.strftime("%Y-%m-%d", time.localtime(MTIME)) in mine
    back = tmp_path / "back.bin"
    tape.ok("davix-get", tape.url("/webdav/46"), str(back))
    assert back.read_bytes() == data
    tape.ok("davix-rm", tape.url("/webdav/46"))
    assert tape.run("davix-ls", tape.url("/webdav/46")).returncode != 0


# -- the production shape passes the verbs and headers through -------------------------


def test_production_gfal_copy_stat_sum_rm(production: Live, tmp_path: Path):
    source = tmp_path / "prod.bin"
    data = os.urandom(123_456)
    source.write_bytes(data)
    production.ok("gfal-copy", "-K", "ADLER32", f"file://{source}", production.url("/50"))
    stored = stored_path(production, 50)
    assert stored.read_bytes() == data
    assert "Size: 123456\tregular file" in production.ok("gfal-stat", production.url("/50"))
    assert production.ok("gfal-sum", production.url("/50"), "ADLER32").split()[1] == adler32(data)
    # The MD5 travels base64 in Digest; gfal-sum prints it as hex.
    assert production.ok("gfal-sum", production.url("/50"), "MD5").split()[1] == hashlib.md5(data).hexdigest()
    listing = production.ok("davix-ls", "-l", production.url("/webdav/"))
    assert " 123456 " in listing and listing.rstrip().endswith("50")
    assert "DELETED" in production.ok("gfal-rm", production.url("/webdav/50"))
    assert not stored.exists()
