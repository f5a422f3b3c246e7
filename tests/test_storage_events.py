"""Storage events: every backend announces each change it made durable, through real backends.

The seam (``pacifica_like.storage.contract.EventBus``): guards hear of a PUT,
PATCH or DELETE before storage is touched and may refuse it; subscribers get
the typed event after the change is durable. A subscriber's failure is
logged and fails nothing (the change cannot be undone).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import corrupt

from pacifica_like.core.config import load_settings
from pacifica_like.core.errors import DigestMismatch, OfflineOnTape, StorageUnavailable
from pacifica_like.core.httpfields import ExpectedDigest
from pacifica_like.storage import contract, registry
from pacifica_like.storage.contract import (
    AtomicFileWriter,
    Backend,
    CopyBad,
    Deleted,
    Intent,
    Migrated,
    Moved,
    Recalled,
    Released,
    Replaced,
    StorageEvent,
    Stored,
)
from pacifica_like.storage.sideband.updater import SidebandUpkeep
from pacifica_like.storage.tape import operations

MTIME = 784111777.0


def store(backend: Backend, file_id: int, data: bytes, expect: tuple = ()) -> int:
    with backend.open_writer(file_id, MTIME, expect) as writer:
        writer.write(data)
        return writer.commit()


def read_all(backend: Backend, file_id: int) -> bytes:
    with backend.open_reader(file_id) as reader:
        return b"".join(iter(lambda: reader.read(1 << 16), b""))


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_each_change_announces_its_event(make_backend, tmp_path: Path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    backend = make_backend(patch_roots=(str(incoming),))
    seen: list[StorageEvent] = []
    backend.subscribe(seen.append)

    store(backend, 1, b"first version")
    store(backend, 1, b"second version")
    source = incoming / "moved.dat"
    source.write_bytes(b"moved in")
    os.utime(source, (MTIME, MTIME))
    backend.adopt(2, str(source))
    backend.delete(1)

    assert seen == [
        Stored(1, 13, MTIME, sha(b"first version")),
        Replaced(1, 14, MTIME, sha(b"second version")),
        Moved(2, 8, MTIME, sha(b"moved in")),
        Deleted(1),
    ]
    assert read_all(backend, 2) == b"moved in"


def test_two_racing_uploads_of_a_new_id_announce_one_stored_and_one_replaced(
    make_backend, monkeypatch: pytest.MonkeyPatch
):
    backend = make_backend()
    seen: list[StorageEvent] = []
    backend.subscribe(seen.append)
    writers = [backend.open_writer(5, MTIME) for _ in range(2)]
    if not all(isinstance(writer, AtomicFileWriter) for writer in writers):
        for writer in writers:
            writer.discard()
        pytest.skip("this backend publishes under its own lock: no race to lose")
    # Both commits get as far as their last step before publishing, then go on together.
    both_ready = threading.Barrier(2, timeout=30)
    record = contract.record_sha256

    def record_then_wait(fd: int, digest: bytes) -> None:
        record(fd, digest)
        both_ready.wait()

    monkeypatch.setattr(contract, "record_sha256", record_then_wait)
    for writer, data in zip(writers, [b"one!", b"two!"], strict=True):
        writer.write(data)
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda writer: writer.commit(), writers)) == [4, 4]
    assert sorted(type(event).__name__ for event in seen) == ["Replaced", "Stored"]
    assert read_all(backend, 5) in (b"one!", b"two!")


def test_a_failed_upload_announces_nothing_and_its_guard_hears_it_end(make_backend):
    backend = make_backend()
    seen: list[StorageEvent] = []
    heard: list[tuple[Intent, StorageEvent | None]] = []

    def guard(intent: Intent) -> Callable[[StorageEvent | None], None]:
        return lambda event: heard.append((intent, event))

    backend.subscribe(seen.append)
    backend.events.guard(guard)
    wrong = ExpectedDigest("sha256", sha(b"other bytes"), "Repr-Digest")
    with pytest.raises(DigestMismatch):
        store(backend, 3, b"the bytes sent", (wrong,))
    assert (seen, heard) == ([], [(Intent(3, "PUT"), None)])

    store(backend, 3, b"the bytes sent")
    assert seen == [Stored(3, 14, MTIME, sha(b"the bytes sent"))]
    assert heard[1] == (Intent(3, "PUT"), seen[0])


def test_a_guard_that_refuses_leaves_storage_untouched(make_backend, tmp_path: Path):
    backend = make_backend()
    store(backend, 4, b"kept")
    seen: list[StorageEvent] = []
    backend.subscribe(seen.append)

    def refuse(intent: Intent) -> Callable[[StorageEvent | None], None]:
        raise StorageUnavailable(f"no {intent.verb} now")

    backend.events.guard(refuse)
    with pytest.raises(StorageUnavailable, match="no PUT now"):
        backend.open_writer(5, MTIME)
    with pytest.raises(StorageUnavailable, match="no DELETE now"):
        backend.delete(4)
    assert seen == []
    assert sorted(backend.list_ids()) == [4]
    assert read_all(backend, 4) == b"kept"
    # No temp file either: the refused upload's was removed before the error left open_writer.
    assert [p.name for p in files_under(tmp_path / "archive") if p.name.endswith(".part")] == []


def test_a_failing_subscriber_is_logged_and_fails_nothing(make_backend, caplog: pytest.LogCaptureFixture):
    backend = make_backend()
    seen: list[StorageEvent] = []

    def broken(event: StorageEvent) -> None:
        raise RuntimeError("subscriber bug")

    backend.subscribe(broken)
    backend.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="pacifica_like.storage"):
        assert store(backend, 6, b"durable anyway") == 14
    assert read_all(backend, 6) == b"durable anyway"
    assert seen == [Stored(6, 14, MTIME, sha(b"durable anyway"))]  # the next subscriber still ran
    failures = [r for r in caplog.records if "subscriber" in r.getMessage()]
    assert len(failures) == 1 and "Stored(file_id=6" in failures[0].getMessage()
    assert failures[0].exc_info is not None and "subscriber bug" in str(failures[0].exc_info[1])


def test_unsubscribed_callbacks_hear_nothing_more(make_backend):
    backend = make_backend()
    seen: list[StorageEvent] = []
    unsubscribe = backend.subscribe(seen.append)
    store(backend, 7, b"heard")
    unsubscribe()
    store(backend, 8, b"not heard")
    assert [e.file_id for e in seen] == [7]


# -- the tape machinery's own events ------------------------------------------------------------


def test_tape_work_announces_migrated_released_recalled_and_copy_bad(make_tape):
    backend = make_tape()
    seen: list[StorageEvent] = []
    backend.subscribe(seen.append)
    store(backend, 10, b"to tape and back")
    store(backend, 11, b"damaged on tape")
    seen.clear()

    outcome = operations.run_migrate(backend, operations.plan_migrate(backend, [10, 11]))
    assert not outcome.failed
    copies = {file_id: backend.catalog.current_copies(file_id)[0] for file_id in (10, 11)}
    assert seen == [Migrated(i, copies[i].vsn, copies[i].offset) for i in (10, 11)]

    seen.clear()
    outcome = operations.run_release(backend, operations.plan_release(backend, [10, 11]))
    assert not outcome.failed
    assert seen == [Released(i, copies[i].vsn, copies[i].offset) for i in (10, 11)]

    seen.clear()
    assert backend.stage(10)
    assert seen == [Recalled(10)]
    assert read_all(backend, 10) == b"to tape and back"

    seen.clear()
    corrupt(backend, 11)
    with pytest.raises(StorageUnavailable):
        backend.recall(11)
    assert seen == [CopyBad(11, copies[11].vsn, copies[11].offset)]
    with pytest.raises(OfflineOnTape):
        backend.open_reader(11)


def test_a_tape_archive_keeps_a_sideband_database_only_through_a_subscriber(make_tape, tmp_path: Path):
    plain = make_tape()
    assert plain.sideband_updater() is None
    assert not any(isinstance(s, SidebandUpkeep) for s in plain.events.subscribers)

    url = f"sqlite:///{tmp_path / 'side.sqlite'}"
    settings = load_settings(
        flags={
            "archive": {"backend": "tape", "prefix": plain.settings.archive.prefix},
            "tape": {"library": plain.settings.tape.library, "time_scale": 0.0},
            "sideband": {"database": url},
        },
        env={},
    )
    kept = registry.create(settings)
    try:
        upkeep = [s for s in kept.events.subscribers if isinstance(s, SidebandUpkeep)]
        assert len(upkeep) == 1 and kept.sideband_updater() is upkeep[0].updater
        store(kept, 12, b"has rows")
        rows = upkeep[0].updater.db.execute_sql("SELECT path FROM sam_path").fetchall()
        assert [r[0] for r in rows] == [kept.relpath(12)]
    finally:
        kept.close()
