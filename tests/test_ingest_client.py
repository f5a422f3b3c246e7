"""The real Pacifica ingest code (pacifica-ingest 0.4.1) uploading a bundle to a live gateway.

Pacifica's ingest service unpacks an uploaded tar bundle and PUTs each file to the archive
interface with its own ``TarIngester`` and ``FileIngester``. Those send ``Last-Modified`` as
``time.ctime`` (asctime, local time), stream the body from the tar member with an explicit
``Content-Length``, then check the sha1 the bundle's ``metadata.txt`` gives. The ids come from
Pacifica's uniqueid service, which this test does not run: it numbers the files itself and
hands ingest the same per-file records its ``MetaParser`` builds. Everything that touches the
archive is ingest's own code, from a virtualenv of its own (cached like cartd's).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import requests
from client_venvs import cache_home, ensure_venv

from pacifica_like.web import devserver

pytestmark = pytest.mark.live

INGEST_VERSION = "0.4.1"
INGEST_REQUIREMENTS = (f"pacifica-ingest=={INGEST_VERSION}",)
TIMEOUT = 60
#: Member mtimes: whole seconds, as tar keeps them.
MTIME = 1_600_000_000

#: Run by the ingest venv's Python: ingest's TarIngester over the bundle, with the test's ids.
DRIVER = """\
import json, sys
from pacifica.ingest.tarutils import MetaParser, TarIngester, open_tar
tar = open_tar(sys.argv[1])
meta = MetaParser()
meta.files = json.loads(sys.argv[2])
TarIngester(tar, meta).ingest()
print("ingested", len(meta.files))
"""


@pytest.fixture(scope="module")
def ingest_python() -> Path:
    """The Python of the cached pacifica-ingest venv (built on first use)."""
    return ensure_venv(cache_home(f"ingest-{INGEST_VERSION}"), INGEST_REQUIREMENTS)


@pytest.fixture(params=["serve", "production"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path):
    """A live posix gateway, as ``pacifica-like serve`` and as nginx+uWSGI."""
    prefix = tmp_path / "archive"
    if request.param == "serve":
        with devserver.cli_server(["--prefix", str(prefix)]) as running:
            yield running, prefix
    else:
        with devserver.production_server({"PAI_PREFIX": str(prefix)}, processes=2) as running:
            yield running, prefix


def bundle(path: Path, files: dict[str, bytes]) -> list[dict]:
    """Write a Pacifica bundle (``data/<subdir>/<name>`` members and metadata.txt); return its records."""
    records = []
    with tarfile.open(path, "w:") as tar:
        for name, data in files.items():
            subdir, _, base = name.rpartition("/")
            member = tarfile.TarInfo(f"data/{name}")
            member.size, member.mtime = len(data), MTIME
            tar.addfile(member, io.BytesIO(data))
            records.append({
                "destinationTable": "Files", "name": base, "subdir": f"data/{subdir}",
                "hashtype": "sha1", "hashsum": hashlib.sha1(data).hexdigest(), "size": len(data),
            })  # fmt: skip
        document = json.dumps(records).encode()
        member = tarfile.TarInfo("metadata.txt")
        member.size = len(document)
        tar.addfile(member, io.BytesIO(document))
    return records


def test_ingest_uploads_a_bundle_byte_for_byte_with_its_dates(gateway, ingest_python: Path, tmp_path: Path):
    server, prefix = gateway
    files = {
        "run1/small.txt": b"a small file\n",
        "run1/empty.bin": b"",
        "run2/large.bin": os.urandom(9 * 1024 * 1024 + 17),  # several of ingest's read() calls
        **{f"run3/part{n:03d}.dat": os.urandom(100 + n) for n in range(40)},
    }
    records = bundle(tmp_path / "bundle.tar", files)
    first_id = 7_000_000
    ids = {str(first_id + n): {**record, "_id": first_id + n} for n, record in enumerate(records)}
    env = {**os.environ, "ARCHIVEINTERFACE_URL": server.url, "TZ": "UTC"}
    done = subprocess.run(
        [str(ingest_python), "-c", DRIVER, str(tmp_path / "bundle.tar"), json.dumps(ids)],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ingested {len(files)}" in done.stdout
    assert done.stdout.count("validated = True") == len(files)
    for file_id, record in ids.items():
        data = files[f"{record['subdir'][len('data/') :]}/{record['name']}"]
        head = requests.head(f"{server.url}/{file_id}", timeout=TIMEOUT)
        assert head.status_code == 204
        stored = prefix / head.headers["X-Pacifica-File"]
        assert stored.read_bytes() == data
        # ingest's asctime date, read as UTC, is the member's mtime.
        assert stored.stat().st_mtime == MTIME
        assert head.headers["Repr-Digest"].startswith("sha-256=:")
