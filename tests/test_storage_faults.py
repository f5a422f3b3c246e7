"""Storage faults through HTTP: a full disk, moves across filesystems, odd files."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import files_under, put

from pacifica_like.core.errors import InsufficientStorage
from pacifica_like.storage.contract import translate_os_errors


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str = "1m") -> Iterator[Path]:
    """Mount a small tmpfs at ``path`` (needs CAP_SYS_ADMIN; skips without it)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_enospc_maps_to_insufficient_storage():
    """A real ENOSPC (writing to /dev/full) becomes InsufficientStorage, cause kept."""
    with (
        pytest.raises(InsufficientStorage) as raised,
        translate_os_errors("writing"),
        open("/dev/full", "wb") as full,
    ):
        full.write(b"x")
        full.flush()
    assert isinstance(raised.value.__cause__, OSError)
    assert raised.value.__cause__.errno == errno.ENOSPC


def test_full_disk_is_507_and_keeps_the_previous_version(make_app, tmp_path: Path):
    with tiny_filesystem(tmp_path / "small") as small:
        app = make_app(prefix=str(small))
        assert put(app, 12345, b"previous").status_int == 201
        response = put(app, 12345, os.urandom(2 << 20))
        assert response.status_int == 507, response.body
        assert json.loads(response.body)["status"] == 507
        assert app.get("/12345").body == b"previous"
        assert files_under(small) == [small / "39" / "3039"]  # the temp file is gone


def test_patch_across_filesystems_copies_commits_then_removes_the_source(make_app, tmp_path: Path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    with tempfile.TemporaryDirectory(dir=shm) as incoming:
        source = Path(incoming) / "big.dat"
        data = os.urandom(3 << 20)
        source.write_bytes(data)
        os.utime(source, (784111777, 784111777))
        app = make_app(patch_roots=(incoming,))
        response = app.request(
            "/12345",
            method="PATCH",
            body=json.dumps({"path": str(source)}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert response.status_int == 200
        assert not source.exists()
        stored = tmp_path / "archive" / "39" / "3039"
        assert stored.read_bytes() == data
        assert stored.stat().st_mtime == 784111777
        assert files_under(tmp_path / "archive") == [stored]


def test_temp_files_are_invisible_to_reads_and_listings(app, backend, prefix: Path):
    put(app, 12345, b"x")
    (prefix / "39" / ".3039.abc.part").write_bytes(b"half")
    assert sorted(backend.list_ids()) == [12345]
    assert app.get("/12345").body == b"x"


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (errno.EACCES, "Forbidden"),
        (errno.EPERM, "Forbidden"),
        (errno.EDQUOT, "InsufficientStorage"),
        (errno.EIO, "StorageUnavailable"),
        (errno.EROFS, "StorageUnavailable"),
        (errno.ENAMETOOLONG, "InvalidRequest"),
        (errno.ENOENT, "FileNotInArchive"),
        (errno.EBADF, "ArchiveError"),
    ],
)
def test_errno_translation_table(code, error):
    with pytest.raises(Exception) as raised, translate_os_errors("doing", missing="gone"):
        raise OSError(code, os.strerror(code))
    assert type(raised.value).__name__ == error
    assert raised.value.__cause__.errno == code


def test_a_directory_where_a_file_should_be_is_404(app, prefix: Path):
    (prefix / "39" / "3039").mkdir(parents=True)
    assert app.get("/12345", expect_errors=True).status_int == 404
    assert app.head("/12345", expect_errors=True).status_int == 404


def test_unexpected_errors_are_a_json_500_without_traceback(make_settings, capsys):
    import webtest

    from pacifica_like.storage import registry as factory
    from pacifica_like.web.app import build_app

    settings = make_settings()
    backend = factory.create(settings)

    def broken(file_id: int):
        raise ZeroDivisionError("a bug")

    backend.status = broken  # type: ignore[method-assign]
    response = webtest.TestApp(build_app(settings, backend)).post("/5", expect_errors=True)
    assert response.status_int == 500
    assert json.loads(response.body) == {
        "status": 500,
        "message": "internal server error; the server log has the details",
    }
    # The error log has it (one JSON line, tagged with the request id), the client does not.
    errors = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"log": "error"' in line]
    assert [e["error"] for e in errors] == ["ZeroDivisionError: a bug"]
    assert "Traceback" in errors[0]["traceback"]
    assert errors[0]["request_id"] == response.headers["X-Request-Id"]


def test_backends_factory_does_not_import_the_web_layer():
    code = (
        "import json, sys, pacifica_like.storage.registry, pacifica_like.storage.posix; "
        "print(json.dumps([m for m in sys.modules if m.split('.')[0] in ('cherrypy', 'pacifica_like')]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(result.stdout)
    assert "cherrypy" not in loaded
    assert set(loaded) <= {
        "pacifica_like",
        "pacifica_like.core",
        "pacifica_like.storage",
        "pacifica_like.storage.registry",
        "pacifica_like.storage.contract",
        "pacifica_like.storage.posix",
        "pacifica_like.storage.diskcache",
        "pacifica_like.storage.safeopen",
        "pacifica_like.core.checksums",
        "pacifica_like.core.config",
        "pacifica_like.core.durable",
        "pacifica_like.core.errors",
        "pacifica_like.core.ids",
        "pacifica_like.core.settings_schema",
    }
