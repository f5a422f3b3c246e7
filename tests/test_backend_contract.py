"""The backend contract (pacifica_like/storage/contract.py), run against every registered backend.

A backend is done when this suite passes for it. Each case calls the contract
directly and checks real outcomes: bytes read back, statuses, and that failed
writes leave the previous version intact.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from pacifica_like.core.errors import (
    Conflict,
    DigestMismatch,
    FileNotInArchive,
    Forbidden,
    StorageUnavailable,
)
from pacifica_like.core.httpfields import ExpectedDigest
from pacifica_like.storage.contract import Backend, FileStatus

MTIME = 784111777.0


@pytest.fixture
def backend(make_backend) -> Backend:
    return make_backend()


def store(backend: Backend, file_id: int, data: bytes, expect=()) -> int:
    with backend.open_writer(file_id, MTIME, expect) as writer:
        for start in range(0, len(data), 7):
            writer.write(data[start : start + 7])
        return writer.commit()


def read_all(backend: Backend, file_id: int) -> bytes:
    with backend.open_reader(file_id) as reader:
        return b"".join(iter(lambda: reader.read(5), b""))


def test_round_trip_and_status(backend: Backend):
    data = b"some archived bytes" * 3
    assert store(backend, 12345, data) == len(data)
    assert read_all(backend, 12345) == data
    status = backend.status(12345)
    assert isinstance(status, FileStatus)
    assert status.size == len(data)
    assert status.mtime == MTIME
    assert status.sha256 == hashlib.sha256(data).digest()
    assert status.media in ("disk", "tape")
    assert status.bytes_per_level[0] + status.bytes_per_level[1] >= len(data)
    assert not status.relpath.startswith("/")


def test_reader_seek_and_size(backend: Backend):
    store(backend, 5, b"0123456789")
    with backend.open_reader(5) as reader:
        assert reader.size == 10
        reader.seek(4)
        assert reader.read(3) == b"456"


def test_missing_ids_raise_file_not_in_archive(backend: Backend):
    for call in (backend.open_reader, backend.status, backend.stage, backend.delete):
        with pytest.raises(FileNotInArchive):
            call(999)


def test_leaving_a_writer_uncommitted_keeps_the_previous_version(backend: Backend):
    store(backend, 6, b"previous")
    with backend.open_writer(6, MTIME) as writer:
        writer.write(b"half an upload")
    assert read_all(backend, 6) == b"previous"
    assert sorted(backend.list_ids()) == [6]


def test_an_exception_mid_upload_leaves_no_file(backend: Backend):
    with pytest.raises(RuntimeError), backend.open_writer(7, MTIME) as writer:
        writer.write(b"partial")
        raise RuntimeError("client went away")
    with pytest.raises(FileNotInArchive):
        backend.status(7)
    assert list(backend.list_ids()) == []


def test_digest_mismatch_raises_and_stores_nothing(backend: Backend):
    store(backend, 8, b"previous")
    wrong = ExpectedDigest("sha256", hashlib.sha256(b"other").digest(), "Repr-Digest")
    with pytest.raises(DigestMismatch):
        store(backend, 8, b"new bytes", expect=[wrong])
    assert read_all(backend, 8) == b"previous"


def test_matching_digests_of_several_algorithms_commit(backend: Backend):
    data = b"verified"
    expect = [
        ExpectedDigest(name, hashlib.new(name, data).digest(), "test") for name in ("sha256", "sha512", "md5")
    ]
    assert store(backend, 9, data, expect) == len(data)


def test_write_once_refuses_existing_ids(make_backend):
    backend = make_backend(write_once=True)
    store(backend, 10, b"first")
    with pytest.raises(Conflict):
        store(backend, 10, b"second")
    assert read_all(backend, 10) == b"first"


def test_write_once_race_has_exactly_one_winner(make_backend):
    backend = make_backend(write_once=True)
    writers = [backend.open_writer(11, MTIME) for _ in range(2)]  # both pass the early check
    for index, writer in enumerate(writers):
        writer.write(f"writer {index}".encode())
    outcomes = []
    for writer in writers:
        with writer:
            try:
                writer.commit()
                outcomes.append("won")
            except Conflict:
                outcomes.append("conflict")
    assert outcomes == ["won", "conflict"]
    assert read_all(backend, 11) == b"writer 0"
    assert list(backend.list_ids()) == [11]


def test_reader_keeps_its_version_across_an_overwrite(backend: Backend):
    store(backend, 12, b"version one")
    with backend.open_reader(12) as reader:
        store(backend, 12, b"version two, longer")
        assert reader.read(100) == b"version one"
    assert read_all(backend, 12) == b"version two, longer"


def test_concurrent_writers_of_one_id_never_mix(backend: Backend):
    versions = [bytes([65 + n]) * 50_000 for n in range(8)]

    def write(data: bytes) -> None:
        for _ in range(5):
            store(backend, 13, data)

    threads = [threading.Thread(target=write, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert read_all(backend, 13) in versions
    assert list(backend.list_ids()) == [13]


def test_delete_removes_the_file(backend: Backend):
    store(backend, 14, b"x")
    backend.delete(14)
    with pytest.raises(FileNotInArchive):
        backend.status(14)


def test_list_ids_yields_every_stored_id(backend: Backend):
    ids = [0, 1, 255, 256, 12345, 2**40 + 3, 2**63 - 1]
    for file_id in ids:
        store(backend, file_id, b"x")
    assert sorted(backend.list_ids()) == ids


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    """A directory configured as the only patch root."""
    root = tmp_path / "incoming"
    root.mkdir()
    return root


def test_adopt_moves_a_file_from_an_allowed_root(make_backend, incoming: Path):
    backend = make_backend(patch_roots=(str(incoming),))
    source = incoming / "file.dat"
    source.write_bytes(b"adopted bytes")
    assert backend.adopt(15, str(source)) == len(b"adopted bytes")
    assert not source.exists()
    assert read_all(backend, 15) == b"adopted bytes"
    assert backend.status(15).sha256 == hashlib.sha256(b"adopted bytes").digest()


def test_adopt_refuses_paths_outside_the_roots(make_backend, incoming: Path, tmp_path: Path):
    backend = make_backend(patch_roots=(str(incoming),))
    outside = tmp_path / "outside.dat"
    outside.write_bytes(b"x")
    with pytest.raises(Forbidden):
        backend.adopt(16, str(outside))
    assert outside.exists()


def test_check_ready_passes_until_the_prefix_goes(backend: Backend, tmp_path: Path):
    backend.check_ready()
    if not (tmp_path / "archive").exists():
        # A backend that keeps nothing on disk made no prefix, so it has none to lose.
        return
    (tmp_path / "archive").rename(tmp_path / "moved")
    with pytest.raises(StorageUnavailable, match="archive prefix"):
        backend.check_ready()


def test_metrics_snapshot_is_well_formed(backend: Backend):
    store(backend, 5, b"counted")
    families: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    seen = set()
    for sample in backend.metrics_snapshot():
        assert sample.name.isidentifier() and not sample.name.endswith("_total")
        assert sample.kind in ("counter", "gauge") and sample.help
        assert float(sample.value) >= 0
        shape = (sample.kind, sample.help, tuple(key for key, _ in sample.labels))
        assert families.setdefault(sample.name, shape) == shape  # one kind, help and label set per name
        assert (sample.name, sample.labels) not in seen  # no duplicate series
        seen.add((sample.name, sample.labels))
