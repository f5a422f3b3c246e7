"""The grid's checksums: adler32 and md5 computed while an upload streams, kept with the file
through migrate, release and recall, and answered to ``Want-Digest`` / ``Want-Repr-Digest``."""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import threading
import zlib
from pathlib import Path

import pytest
from conftest import put

from pacifica_like.core.config import ConfigError
from pacifica_like.core.errors import FileNotInArchive
from pacifica_like.core.httpfields import parse_want_digest, parse_want_repr_digest
from pacifica_like.storage.contract import CHECKSUMS_XATTR, SHA256_XATTR
from pacifica_like.storage.tape import operations
from pacifica_like.storage.tape.catalog import SCHEMA_VERSION
from pacifica_like.storage.tape.library import TapeLibrary

BODY = b"grid checksums ride along with every upload\n" * 300


def adler32_of(data: bytes) -> bytes:
    return zlib.adler32(data).to_bytes(4, "big")


def expected(data: bytes) -> dict[str, bytes]:
    return {
        "sha256": hashlib.sha256(data).digest(),
        "adler32": adler32_of(data),
        "md5": hashlib.md5(data).digest(),
    }


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def store(backend, file_id: int, data: bytes) -> None:
    with backend.open_writer(file_id, 1_700_000_000.0) as writer:
        writer.write(data[:1000])
        writer.write(data[1000:])
        writer.commit()
        assert writer.checksums == expected(data)


# -- every backend keeps them -----------------------------------------------------


def test_every_backend_records_adler32_and_md5_with_the_upload(make_backend):
    backend = make_backend()
    store(backend, 41, BODY)
    assert backend.checksums(41) == expected(BODY)
    # A replace records the new version's, not a mix.
    store(backend, 41, BODY[::-1])
    assert backend.checksums(41) == expected(BODY[::-1])


def test_posix_keeps_them_in_the_files_extended_attributes(backend):
    store(backend, 5, BODY)
    path = backend.path(5)
    assert os.getxattr(path, SHA256_XATTR) == hashlib.sha256(BODY).digest()
    assert os.getxattr(path, CHECKSUMS_XATTR) == (
        f"adler32={adler32_of(BODY).hex()} md5={hashlib.md5(BODY).hexdigest()}".encode()
    )


def test_a_patched_in_file_gets_them_too(make_backend, tmp_path: Path):
    source = tmp_path / "incoming" / "data.bin"
    source.parent.mkdir()
    source.write_bytes(BODY)
    backend = make_backend(patch_roots=str(source.parent))
    backend.adopt(9, str(source))
    assert backend.checksums(9) == expected(BODY)


def test_a_file_stored_before_they_were_kept_answers_its_sha256_only(backend):
    store(backend, 6, BODY)
    os.chmod(backend.path(6), 0o644)
    os.removexattr(backend.path(6), CHECKSUMS_XATTR)
    assert backend.checksums(6) == {"sha256": hashlib.sha256(BODY).digest()}


# -- tape: through migrate, release and recall -------------------------------------


def test_tape_keeps_them_through_release_and_recall(make_tape):
    backend = make_tape()
    store(backend, 7, BODY)
    assert not operations.run_migrate(backend, operations.plan_migrate(backend, [7])).failed
    copy = backend.catalog.current_copies(7)[0]
    assert dict(copy.checksums) == {"adler32": adler32_of(BODY), "md5": hashlib.md5(BODY).digest()}
    assert not operations.run_release(backend, operations.plan_release(backend, [7])).failed
    assert not os.path.exists(backend.path(7))
    assert backend.checksums(7) == expected(BODY)  # from the catalog, no recall
    assert backend.stage(7)
    assert os.getxattr(backend.path(7), CHECKSUMS_XATTR).startswith(
        b"adler32=" + adler32_of(BODY).hex().encode()
    )
    assert backend.checksums(7) == expected(BODY)


def test_a_version_1_tape_catalog_is_refused_until_tape_init_upgrades_it(tape_settings):
    settings = tape_settings()
    catalog = Path(settings.tape.library) / "catalog.sqlite"
    with sqlite3.connect(catalog) as db:
        db.execute("ALTER TABLE tapecopy DROP COLUMN checksums")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    library = TapeLibrary(settings.tape, require_stager=False)
    with pytest.raises(
        ConfigError, match="catalog schema 1, this build needs 2: run `pacifica-like tape init`"
    ):
        library.check_ready()
    library.initialise()
    library.check_ready()
    library.catalog.close()
    assert SCHEMA_VERSION == 2
    with sqlite3.connect(catalog) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(tapecopy)")}
    assert "checksums" in columns


# -- over HTTP ---------------------------------------------------------------------


def test_want_digest_adler32_on_head_and_get(app):
    put(app, 12, BODY)
    head = app.head("/12", headers={"Want-Digest": "adler32"})
    assert head.status_int == 204
    assert head.headers["Digest"] == f"adler32={adler32_of(BODY).hex()}"
    # Pacifica's HEAD headers are untouched beside it.
    assert head.headers["X-Pacifica-Messsage"] == "File was found"
    got = app.get("/12", headers={"Want-Digest": "MD5;q=0.3, ADLER32;q=0.5, UNIXsum"})
    assert got.body == BODY
    assert got.headers["Digest"] == f"adler32={adler32_of(BODY).hex()},md5={b64(hashlib.md5(BODY).digest())}"


def test_digest_of_the_whole_file_on_a_range(app):
    put(app, 13, BODY)
    got = app.get("/13", headers={"Want-Digest": "adler32", "Range": "bytes=0-9"})
    assert got.status_int == 206
    assert got.body == BODY[:10]
    assert got.headers["Digest"] == f"adler32={adler32_of(BODY).hex()}"


def test_no_digest_unless_asked_or_when_nothing_asked_for_is_kept(app):
    put(app, 14, BODY)
    assert "Digest" not in app.head("/14").headers
    assert "Digest" not in app.get("/14").headers
    assert "Digest" not in app.head("/14", headers={"Want-Digest": "UNIXsum, sha-512"}).headers
    assert "Digest" not in app.head("/14", headers={"Want-Digest": "adler32;q=0"}).headers


def test_want_repr_digest_answers_the_algorithms_asked_for_and_sha256(app):
    put(app, 15, BODY)
    digests = expected(BODY)
    head = app.head("/15", headers={"Want-Repr-Digest": "adler=3, md5=9, sha-512=10"})
    assert head.headers["Repr-Digest"] == (
        f"md5=:{b64(digests['md5'])}:, adler=:{b64(digests['adler32'])}:, sha-256=:{b64(digests['sha256'])}:"
    )
    assert head.headers.getall("Repr-Digest") == [head.headers["Repr-Digest"]]


def test_want_digest_on_a_missing_file_is_the_usual_404(app):
    response = app.head("/404", headers={"Want-Digest": "adler32"}, status=404)
    assert "Digest" not in response.headers


def test_put_verifies_a_claimed_adler32(app, prefix: Path):
    wrong = f"{(int.from_bytes(adler32_of(BODY), 'big') ^ 1):08x}"
    refused = put(app, 16, BODY, Digest=f"adler32={wrong}")
    assert refused.status_int == 422
    assert "adler32" in refused.json["message"]
    assert app.head("/16", status=404).status_int == 404
    assert put(app, 16, BODY, Digest=f"adler32={adler32_of(BODY).hex()}").status_int == 201
    assert app.get("/16").body == BODY


def test_a_malformed_adler32_claim_is_a_400(app):
    response = put(app, 17, BODY, Digest="adler32=xyz")
    assert response.status_int == 400
    assert "8 hex digits" in response.json["message"]
    assert app.head("/17", status=404).status_int == 404


@pytest.mark.parametrize(
    ("header", "wanted"),
    [
        ("adler32", ["adler32"]),
        ("md5;q=0.2, adler32;q=0.9", ["adler32", "md5"]),
        ("SHA-256, md5;q=0", ["sha256"]),
        ("unixsum, crc32c", []),
        ("adler32;q=garbage", ["adler32"]),
    ],
)
def test_want_digest_parsing(header: str, wanted: list[str]):
    assert parse_want_digest(header) == wanted


@pytest.mark.parametrize(
    ("header", "wanted"),
    [
        ("sha-256=10", ["sha256"]),
        ("adler=1, md5=5", ["md5", "adler32"]),
        ("sha-256=0, md5=11, adler32=2", ["adler32"]),
        ("not a dictionary", []),
    ],
)
def test_want_repr_digest_parsing(header: str, wanted: list[str]):
    assert parse_want_repr_digest(header) == wanted


# -- large uploads hash md5 on a thread of their own -------------------------------------


def test_a_large_upload_gets_the_same_checksums_and_leaves_no_thread_behind(make_backend):
    backend = make_backend()
    data = os.urandom(9 * 1024 * 1024 + 7)  # past SIDE_HASH_AFTER: md5 moves to its own thread
    before = threading.active_count()
    store(backend, 50, data)
    assert backend.checksums(50) == expected(data)
    # An upload that ends without a commit stops its side thread too.
    with backend.open_writer(51, 1.0) as writer:
        for start in range(0, len(data), 1 << 20):
            writer.write(data[start : start + (1 << 20)])
        assert threading.active_count() == before + 1
    assert threading.active_count() == before
    with pytest.raises(FileNotInArchive):
        backend.status(51)
