"""PATCH cannot be raced or abused (issue 11, findings 1, 2 and 5).

Every case runs through real HTTP against ``pacifica-like serve`` and uWSGI,
each once with openat2 and once with the directory-fd walk forced. The race
between check and use is driven by the real seam, ``safeopen.after_source_checks``:
a ``sitecustomize`` module on the servers' PYTHONPATH replaces it with a function
that swaps the source (or its directory) for a symlink, a FIFO or a device, chosen
by the source's name. inotify shows that FIFOs and devices are never opened.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import http.client
import itertools
import json
import os
import socket
import stat
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacifica_like.core.config import ConfigError, load_settings
from pacifica_like.core.errors import Conflict, FileNotInArchive, Forbidden, InvalidRequest
from pacifica_like.storage import diskcache as posix_module
from pacifica_like.storage import registry, safeopen
from pacifica_like.storage.contract import read_sha256
from pacifica_like.web import devserver

TIMEOUT = 10.0
#: serve's request threads and uWSGI's worker processes in these servers.
WORKERS = {"serve": 3, "uwsgi": 2}

#: Imported by the servers at start (PYTHONPATH): the swap an attacker would do, at the moment they would.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os
    import stat

    from pacifica_like.storage import safeopen

    if os.environ.get("PL_TEST_NO_OPENAT2"):
        safeopen.openat2_supported = lambda: False

    def _swap(source):
        path = source.path
        outside = os.path.join(os.environ["PL_TEST_OUTSIDE"], os.path.basename(path))
        if path.endswith(".swap-parent"):
            parent = os.path.dirname(path)
            os.rename(parent, parent + ".orig")
            os.symlink(os.path.join(os.environ["PL_TEST_OUTSIDE"], os.path.basename(parent)), parent)
            return
        if path.endswith(".add-hardlink"):
            os.link(path, outside)
            return
        if not path.endswith((".swap-link", ".swap-fifo", ".swap-device")):
            return
        os.rename(path, path + ".orig")
        if path.endswith(".swap-link"):
            os.symlink(outside, path)
        elif path.endswith(".swap-fifo"):
            os.mkfifo(path)
        else:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))

    safeopen.after_source_checks = _swap
    """
)


@dataclass
class Server:
    """A running gateway and the directories it was given."""

    mode: str
    url: str
    prefix: Path
    incoming: Path
    outside: Path
    ids: Iterator[int]

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None):
        """Send one request; return (status, headers, body)."""
        host, port = self.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def patch(self, file_id: int, source: object) -> tuple[int, dict]:
        body = json.dumps({"path": str(source) if isinstance(source, Path) else source}).encode()
        status, _, raw = self.request("PATCH", f"/{file_id}", body, {"Content-Type": "application/json"})
        return status, json.loads(raw)

    def archived(self, file_id: int) -> Path:
        return self.prefix / id2path(file_id)

    def assert_archived_matches_digest(self, file_id: int, expected: bytes) -> None:
        """GET serves ``expected``, its Repr-Digest matches, and the entry is a regular file."""
        status, headers, body = self.request("GET", f"/{file_id}")
        assert status == 200
        assert body == expected
        assert (
            headers["Repr-Digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(body).digest()).decode()}:"
        )
        assert stat.S_ISREG(os.lstat(self.archived(file_id)).st_mode)


def id2path(file_id: int) -> str:
    from pacifica_like.core.ids import id2filename

    return id2filename(file_id)[1:]


@pytest.fixture(
    scope="module",
    params=[("serve", "openat2"), ("serve", "walk"), ("uwsgi", "openat2"), ("uwsgi", "walk")],
    ids=lambda p: "-".join(p),
)
def server(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server (serve or uWSGI) with openat2 or the fd walk, and the swap hook installed."""
    mode, resolver = request.param
    if resolver == "openat2" and not safeopen.openat2_supported():
        pytest.skip("this kernel has no openat2; the walk cases cover it")
    root = tmp_path_factory.mktemp(f"{mode}-{resolver}")
    prefix, incoming, outside, hooks = (root / n for n in ("archive", "incoming", "outside", "hooks"))
    for directory in (incoming, outside, hooks):
        directory.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        "PAI_PREFIX": str(prefix),
        "PAI_PATCH_ROOTS": str(incoming),
        "PL_TEST_OUTSIDE": str(outside),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
    }
    if resolver == "walk":
        env["PL_TEST_NO_OPENAT2"] = "1"
    if mode == "serve":
        running = devserver.cli_server(["--threads", str(WORKERS["serve"])], env=env)
    else:
        running = devserver.uwsgi_server(env, processes=WORKERS["uwsgi"])
    with running as process:
        yield Server(mode, process.url, prefix, incoming, outside, itertools.count(1000))


def archive_files(server: Server) -> list[Path]:
    """Every entry under the prefix but directories and the catalog (temp names included)."""
    if not server.prefix.exists():
        return []
    return sorted(p for p in server.prefix.rglob("*") if not p.is_dir() and ".catalog.sqlite" not in p.name)


def fresh_dir(base: Path, name: str) -> Path:
    directory = base / name
    directory.mkdir()
    return directory


def outside_secret(server: Server, name: str, data: bytes = b"outside secret") -> Path:
    secret = server.outside / name
    secret.write_bytes(data)
    secret.chmod(0o600)
    return secret


# -- finding 1: no escape from patch_roots -----------------------------------------------------------


def test_source_swapped_for_a_symlink_after_the_checks_is_refused(server: Server):
    file_id = next(server.ids)
    case = fresh_dir(server.incoming, f"link-{file_id}")
    source = case / "big.swap-link"
    data = os.urandom(3 << 20)
    source.write_bytes(data)
    secret = outside_secret(server, source.name)
    before = archive_files(server)

    status, body = server.patch(file_id, source)

    assert (case / "big.swap-link.orig").exists(), "the swap hook did not run"
    assert secret.read_bytes() == b"outside secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    if status == 200:  # only acceptable if what was archived is the inode that was hashed
        server.assert_archived_matches_digest(file_id, data)
    else:
        assert status == 400, body
        assert "replaced" in body["message"]
        assert archive_files(server) == before
        assert server.request("GET", f"/{file_id}")[0] == 404
        # The attacker's symlink is back where it was, the original file untouched beside it.
        assert source.is_symlink() and os.readlink(source) == str(secret)
        assert (case / "big.swap-link.orig").read_bytes() == data
    assert not any(p.is_symlink() for p in archive_files(server))


def test_parent_directory_swapped_for_a_symlink_after_the_checks_moves_only_the_hashed_inode(server: Server):
    file_id = next(server.ids)
    case = fresh_dir(server.incoming, f"parent-{file_id}")
    source = case / "big.swap-parent"
    data = os.urandom(3 << 20)
    source.write_bytes(data)
    inode = source.stat().st_ino
    decoy = fresh_dir(server.outside, case.name) / source.name
    decoy.write_bytes(b"outside secret")
    decoy.chmod(0o600)

    status, body = server.patch(file_id, source)

    assert case.is_symlink() and Path(f"{case}.orig").is_dir(), "the swap hook did not run"
    assert decoy.read_bytes() == b"outside secret"
    assert stat.S_IMODE(decoy.stat().st_mode) == 0o600
    assert status in (200, 400), body
    if status == 200:
        server.assert_archived_matches_digest(file_id, data)
        assert os.lstat(server.archived(file_id)).st_ino == inode
    assert not any(p.is_symlink() for p in archive_files(server))


def test_a_symlinked_directory_on_the_path_is_refused_and_nothing_changes(server: Server):
    target = fresh_dir(server.outside, f"target-{next(server.ids)}")
    secret = target / "file.dat"
    secret.write_bytes(b"outside secret")
    secret.chmod(0o600)
    link = server.incoming / f"linked-{target.name}"
    link.symlink_to(target)
    file_id = next(server.ids)

    status, body = server.patch(file_id, link / "file.dat")

    assert status == 403, body
    assert "symbolic link" in body["message"]
    assert secret.read_bytes() == b"outside secret" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert server.request("GET", f"/{file_id}")[0] == 404

    # A symlink that stays inside the root is refused too: its target can change at any moment.
    inside = fresh_dir(server.incoming, f"real-{target.name}")
    (inside / "file.dat").write_bytes(b"inside")
    alias = server.incoming / f"alias-{target.name}"
    alias.symlink_to(inside)
    assert server.patch(file_id, alias / "file.dat")[0] == 403
    assert (inside / "file.dat").read_bytes() == b"inside"
    assert server.request("GET", f"/{file_id}")[0] == 404


def test_a_symlink_source_is_refused_and_nothing_changes(server: Server):
    secret = outside_secret(server, f"secret-{next(server.ids)}")
    link = server.incoming / f"{secret.name}.link"
    link.symlink_to(secret)
    file_id = next(server.ids)
    assert server.patch(file_id, link)[0] == 403
    assert link.is_symlink() and secret.read_bytes() == b"outside secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert server.request("GET", f"/{file_id}")[0] == 404
    # Also when it points to a file inside the root (it could point elsewhere by the time it is used).
    inside = server.incoming / f"{secret.name}.inside"
    inside.write_bytes(b"inside")
    inside_link = server.incoming / f"{secret.name}.inside-link"
    inside_link.symlink_to(inside)
    assert server.patch(file_id, inside_link)[0] == 403
    assert inside.read_bytes() == b"inside" and inside_link.is_symlink()
    assert server.request("GET", f"/{file_id}")[0] == 404


# -- finding 2: FIFOs and devices are never opened ---------------------------------------------------


class OpenWatch:
    """inotify IN_OPEN on some paths: shows whether anything opened them."""

    IN_OPEN = 0x20
    IN_NONBLOCK = os.O_NONBLOCK

    def __init__(self, *paths: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for path in paths:
            assert libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_OPEN) >= 0

    def opened(self) -> bool:
        try:
            return bool(os.read(self.fd, 4096))
        except BlockingIOError:
            return False
        finally:
            os.close(self.fd)


def test_fifos_get_400_promptly_even_more_of_them_than_workers(server: Server):
    case = fresh_dir(server.incoming, f"fifos-{next(server.ids)}")
    count = WORKERS[server.mode] + 2
    plain = [case / f"plain-{n}" for n in range(count)]
    for fifo in plain:
        os.mkfifo(fifo)
    swapped = [case / f"race-{n}.swap-fifo" for n in range(count)]
    for source in swapped:
        source.write_bytes(b"regular when checked")
    watch = OpenWatch(*plain)

    with concurrent.futures.ThreadPoolExecutor(2 * count) as pool:
        answers = list(pool.map(lambda source: server.patch(next(server.ids), source), plain + swapped))

    assert [status for status, _ in answers] == [400] * (2 * count), answers
    assert all("regular file" in body["message"] for _, body in answers[:count])
    assert all("replaced" in body["message"] for _, body in answers[count:])
    assert not watch.opened()
    assert server.request("GET", "/")[0] == 200
    # The swapped-in FIFOs are back at their names, the regular files beside them.
    for source in swapped:
        assert stat.S_ISFIFO(os.lstat(source).st_mode)
        assert Path(f"{source}.orig").read_bytes() == b"regular when checked"


def test_device_socket_and_directory_sources_get_400_unopened(server: Server):
    case = fresh_dir(server.incoming, f"kinds-{next(server.ids)}")
    device, sock, directory = case / "null", case / "socket", case / "directory"
    os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    directory.mkdir()
    raced = case / "device.swap-device"
    raced.write_bytes(b"regular when checked")
    watch = OpenWatch(device, sock, directory)
    try:
        for source in (device, sock, directory, raced):
            status, body = server.patch(next(server.ids), source)
            assert status == 400, (source, body)
    finally:
        listener.close()
    assert not watch.opened()
    assert stat.S_ISCHR(os.lstat(raced).st_mode)  # the swapped-in device went back, unopened
    assert not any(stat.S_ISCHR(os.lstat(p).st_mode) for p in archive_files(server))


# -- finding 5: integrity without a race --------------------------------------------------------------


def test_a_hardlinked_source_is_refused_and_untouched(server: Server):
    case = fresh_dir(server.incoming, f"hardlink-{next(server.ids)}")
    source = case / "file.dat"
    source.write_bytes(b"two names")
    source.chmod(0o640)
    other = server.outside / f"{case.name}.other-name"
    os.link(source, other)
    file_id = next(server.ids)

    status, body = server.patch(file_id, source)

    assert status == 400, body
    assert "2 links" in body["message"]
    assert source.read_bytes() == b"two names" and stat.S_IMODE(source.stat().st_mode) == 0o640
    assert source.stat().st_nlink == 2
    assert server.request("GET", f"/{file_id}")[0] == 404


def test_a_hard_link_made_after_the_checks_cannot_change_the_archived_bytes(server: Server):
    case = fresh_dir(server.incoming, f"late-link-{next(server.ids)}")
    source = case / "file.add-hardlink"
    data = os.urandom(1 << 20)
    source.write_bytes(data)
    file_id = next(server.ids)

    status, body = server.patch(file_id, source)

    other = server.outside / source.name
    assert other.exists(), "the hook did not run"
    assert status in (200, 400), body
    if status == 200:
        # Write through the other name, as its owner would after the move.
        with contextlib.suppress(PermissionError), open(other, "r+b") as handle:
            handle.write(b"changed through the other name")
        server.assert_archived_matches_digest(file_id, data)


def test_a_source_open_for_writing_is_copied_so_bytes_always_match_the_digest(server: Server):
    case = fresh_dir(server.incoming, f"writer-{next(server.ids)}")
    source = case / "growing.dat"
    first, more = os.urandom(1000), os.urandom(1000)
    file_id = next(server.ids)
    with open(source, "wb") as writer:
        writer.write(first)
        writer.flush()
        status, body = server.patch(file_id, source)
        assert status == 200, body
        # The writer goes on after PATCH returned, through the descriptor it still holds.
        writer.write(more)
        writer.flush()
    server.assert_archived_matches_digest(file_id, first)


def test_a_quiet_source_on_the_same_filesystem_is_renamed_not_copied(server: Server):
    case = fresh_dir(server.incoming, f"quiet-{next(server.ids)}")
    source = case / "file.dat"
    data = os.urandom(4096)
    source.write_bytes(data)
    inode = source.stat().st_ino
    file_id = next(server.ids)
    assert server.patch(file_id, source)[0] == 200
    assert not source.exists()
    server.assert_archived_matches_digest(file_id, data)
    stored = os.stat(server.archived(file_id))
    # The lease probe needs SIGPIPE ignored: Python (serve) and uWSGI workers both ignore it.
    assert stored.st_ino == inode, "a quiet source on the same filesystem should be renamed, not copied"

    assert stat.S_IMODE(stored.st_mode) == 0o444


def test_overlong_and_unencodable_paths_are_400(server: Server):
    for path in (
        f"{server.incoming}/{'x' * 300}",
        f"{server.incoming}/{'d/' * 3000}f",
        f"{server.incoming}/\ud800",
    ):
        status, body = server.patch(next(server.ids), path)
        assert status in (400, 404), (path[:80], body)
        assert "message" in body


# -- openat2 and the walk, directly --------------------------------------------------------------------


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch) -> list[str]:
    """Force one resolver; return the list of openat2 calls made."""
    calls: list[str] = []
    if request.param == "walk":
        monkeypatch.setattr(safeopen, "openat2_supported", lambda: False)
    elif not safeopen.openat2_supported():
        pytest.skip("this kernel has no openat2")
    real = safeopen.openat2

    def counted(dir_fd: int, path: str, flags: int, resolve: int) -> int:
        calls.append(path)
        return real(dir_fd, path, flags, resolve)

    monkeypatch.setattr(safeopen, "openat2", counted)
    return calls


def test_open_adopt_source_walks_beneath_the_root_with_either_resolver(
    resolver: list[str], tmp_path: Path, request
):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "b" / "f").write_bytes(b"inside")
    (outside / "f").write_bytes(b"outside")
    (root / "a" / "up").symlink_to(outside)
    roots = [str(root)]

    with safeopen.open_adopt_source(f"{root}/a/b/f", roots) as source:
        assert os.pread(source.fd, 100, 0) == b"inside"
        assert source.name == "f"
    using_openat2 = "openat2" in request.node.callspec.id
    assert (resolver == ["a/b"]) if using_openat2 else (resolver == [])

    with pytest.raises(Forbidden, match="symbolic link"):
        safeopen.open_adopt_source(f"{root}/a/up/f", roots)
    with pytest.raises(FileNotInArchive):
        safeopen.open_adopt_source(f"{root}/a/missing/f", roots)
    for bad in (f"{root}/a/../a/b/f", f"{root}/a//b/f", f"{root}/a/./b/f", f"{root}/", str(root)):
        with pytest.raises(Forbidden):
            safeopen.open_adopt_source(bad, roots)
    with pytest.raises(InvalidRequest):
        safeopen.open_adopt_source(f"{root}/a", roots)  # a directory
    with pytest.raises(InvalidRequest):
        safeopen.open_adopt_source("relative/f", roots)


def test_openat2_binding_raises_oserror_with_errno(tmp_path: Path):
    if not safeopen.openat2_supported():
        pytest.skip("this kernel has no openat2")
    (tmp_path / "link").symlink_to(tmp_path)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as raised:
            safeopen.openat2(fd, "link", os.O_RDONLY, safeopen.RESOLVE_NO_SYMLINKS)
        assert raised.value.errno == errno.ELOOP
        with pytest.raises(OSError) as raised:
            safeopen.openat2(fd, "../x", os.O_RDONLY, safeopen.RESOLVE_BENEATH)
        assert raised.value.errno == errno.EXDEV
    finally:
        os.close(fd)


# -- patch_roots that overlap what the gateway keeps -----------------------------------------------------


@pytest.mark.parametrize("layout", ["root-holds-prefix", "root-is-prefix", "root-inside-prefix"])
def test_patch_roots_overlapping_the_prefix_fail_at_load_naming_the_file_and_key(tmp_path: Path, layout):
    prefix = tmp_path / "srv" / "archive"
    prefix.mkdir(parents=True)
    root = {
        "root-holds-prefix": tmp_path / "srv",
        "root-is-prefix": prefix,
        "root-inside-prefix": prefix / "incoming",
    }[layout]
    root.mkdir(exist_ok=True)
    ini = tmp_path / "archive.ini"
    ini.write_text(f"[archive]\nprefix = {prefix}\npatch_roots = {root}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(env={}, config_file=str(ini))
    assert f"{ini} [archive] patch_roots" in str(raised.value)
    assert "archive prefix" in str(raised.value)


def test_patch_roots_holding_the_tape_library_or_a_catalog_fail_at_load(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    archive = {"prefix": str(tmp_path / "archive"), "patch_roots": (str(shared),)}
    with pytest.raises(ConfigError, match="tape library"):
        load_settings(flags={"archive": archive, "tape": {"library": str(shared / "library")}}, env={})
    with pytest.raises(ConfigError, match=r"\[archive\] catalog"):
        load_settings(flags={"archive": {**archive, "catalog": f"sqlite:///{shared}/cat.sqlite"}}, env={})
    with pytest.raises(ConfigError, match="patch_roots"):
        load_settings(flags={"archive": {**archive, "patch_roots": (str(tmp_path / "absent"),)}}, env={})
    # Roots are real paths once loaded, whichever source gave them.
    (tmp_path / "alias").symlink_to(shared)
    settings = load_settings(
        flags={"archive": {**archive, "patch_roots": (str(tmp_path / "alias"),)}}, env={}
    )
    assert settings.archive.patch_roots == (str(shared),)


@pytest.mark.parametrize("mode", ["serve", "uwsgi"])
def test_a_server_with_the_prefix_inside_a_patch_root_refuses_to_start(tmp_path: Path, mode: str):
    prefix = tmp_path / "archive"
    prefix.mkdir()
    env = {"PAI_PREFIX": str(prefix), "PAI_PATCH_ROOTS": str(tmp_path)}
    starting = (
        devserver.cli_server([], env=env) if mode == "serve" else devserver.uwsgi_server(env, processes=1)
    )
    with pytest.raises(RuntimeError, match="PAI_PATCH_ROOTS") as raised, starting:
        pass
    assert "overlaps the archive prefix" in str(raised.value)


# -- the rename path's own refusals, driven in-process -------------------------------------------------


@pytest.fixture
def posix_backend(tmp_path: Path):
    """A posix backend on tmp_path/archive with tmp_path/incoming as its patch root."""
    (tmp_path / "incoming").mkdir()
    settings = load_settings(
        flags={
            "archive": {"prefix": str(tmp_path / "archive"), "patch_roots": (str(tmp_path / "incoming"),)}
        },
        env={},
    )
    backend = registry.create(settings)
    yield backend
    backend.close()


def test_a_writer_arriving_during_the_hash_turns_the_move_into_a_copy(
    posix_backend, tmp_path: Path, monkeypatch
):
    source = tmp_path / "incoming" / "file.dat"
    data = os.urandom(1 << 20)
    source.write_bytes(data)
    inode = source.stat().st_ino
    real_hash = posix_module._hash_fd
    writer = threading.Thread(target=lambda: source.open("ab").close())

    def hash_then_let_a_writer_in(fd: int) -> bytes:
        digest = real_hash(fd)
        writer.start()  # blocks in open(2) until the lease is released, breaking it meanwhile
        deadline = time.monotonic() + TIMEOUT
        while fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK and time.monotonic() < deadline:
            time.sleep(0.001)  # polls a kernel condition; nothing is ordered by the sleep
        return digest

    monkeypatch.setattr(posix_module, "_hash_fd", hash_then_let_a_writer_in)
    assert posix_backend.adopt(21, str(source)) == len(data)
    writer.join(TIMEOUT)
    stored = Path(posix_backend.path(21))
    assert stored.stat().st_ino != inode  # copied, not the inode the writer now holds
    assert stored.read_bytes() == data
    assert posix_backend.status(21).sha256 == hashlib.sha256(data).digest()


def test_losing_a_write_once_race_puts_the_source_back_unchanged(tmp_path: Path, monkeypatch):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    settings = load_settings(
        flags={
            "archive": {"prefix": str(tmp_path / "a"), "patch_roots": (str(incoming),), "write_once": True}
        },
        env={},
    )
    backend = registry.create(settings)
    source = incoming / "file.dat"
    source.write_bytes(b"mine")
    source.chmod(0o640)
    real_hash = posix_module._hash_fd

    def hash_while_an_upload_wins(fd: int) -> bytes:
        with backend.open_writer(22, 0.0) as upload:
            upload.write(b"theirs")
            upload.commit()
        return real_hash(fd)

    monkeypatch.setattr(posix_module, "_hash_fd", hash_while_an_upload_wins)
    with pytest.raises(Conflict):
        backend.adopt(22, str(source))
    backend.close()
    assert source.read_bytes() == b"mine"
    assert stat.S_IMODE(source.stat().st_mode) == 0o640
    assert read_sha256(str(source)) is None
    assert Path(backend.path(22)).read_bytes() == b"theirs"
    assert [p.name for p in Path(backend.path(22)).parent.iterdir()] == [Path(backend.path(22)).name]
