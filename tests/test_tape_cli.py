"""The tape maintenance commands end to end: ``tape``, ``migrate``, ``release``, ``stage``, ``verify``.

Each test writes its own archive.ini in ``tmp_path`` with ``time_scale = 0`` (no
modelled delays: behaviour is judged by counters, never clocks), runs the real
``pacifica_like.cli.main.main`` and checks what the command left behind: exit status,
printed text and JSON, files in the disk cache, catalog rows, drive counters and
the records in the volume files, walked byte by byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import flip_byte

from pacifica_like.cli.main import main
from pacifica_like.core.config import load_settings
from pacifica_like.storage import registry
from pacifica_like.storage.contract import read_sha256
from pacifica_like.storage.tape import operations
from pacifica_like.storage.tape.backend import DUAL, OFFLINE, REGULAR, TapeBackend
from pacifica_like.storage.tape.catalog import CopyInfo, to_info
from pacifica_like.storage.tape.stager import HEADER_SIZE

MIB = 1 << 20
KIB = 1 << 10
DAY = 86400.0
MTIME = 784111777.0
#: A record header as stager.c writes it: magic, file id, data size, sha-256, reserved.
HEADER = struct.Struct("<8sQQ32s8s")
MAGIC = b"PLTAPE\x00\x01"
#: The volume serial numbers ``tape init`` gives the first volumes.
VSNS = ["PL0000L9", "PL0001L9", "PL0002L9", "PL0003L9", "PL0004L9"]
#: With 64 KiB volumes three records of this size fit and a fourth spills over.
SIZE = 20_000
#: The bad stager path the configuration tests use.
MISSING_STAGER = "/nonexistent/libstager.so"


def file_ids(count: int) -> list[int]:
    """Return ``count`` ids whose sharded paths each have a cache directory of their own.

    Ids 1001..1255 differ in their lowest byte, the outermost directory of id2filename.
    """
    assert count <= 255
    return list(range(1001, 1001 + count))


def payload(file_id: int, size: int) -> bytes:
    """Return the bytes stored under ``file_id``: reproducible and different for every id."""
    return random.Random(file_id).randbytes(size)


@dataclass(frozen=True)
class Result:
    """What one CLI run returned and printed."""

    status: int
    out: str
    err: str

    def json(self) -> Any:
        """Parse stdout as one JSON document."""
        return json.loads(self.out)

    def summary(self) -> Any:
        """Parse the ``summary:`` line that ends verify's text report."""
        last = self.out.strip().splitlines()[-1]
        assert last.startswith("summary: "), self.out
        return json.loads(last.removeprefix("summary: "))


class Archive:
    """One test's archive.ini, disk cache and tape library, and the CLI run against them."""

    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.ini = root / "archive.ini"
        self.prefix = root / "cache"
        self.library = root / "lib"
        self._capsys = capsys

    def configure(self, backend: str = "tape", **tape: object) -> None:
        """Write archive.ini: a small library with every delay off; ``tape`` overrides [tape] keys."""
        values = {
            "library": self.library,
            "drives": 2,
            "volumes": 3,
            "volume_capacity": "1MiB",
            "time_scale": 0,
            **tape,
        }
        lines = ["[archive]", f"backend = {backend}", f"prefix = {self.prefix}", "[tape]"]
        lines += [f"{key} = {value}" for key, value in values.items()]
        self.ini.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def cli(self, *argv: str) -> Result:
        """Run ``pacifica-like ARGV -c archive.ini``; return its status and what it printed."""
        self._capsys.readouterr()  # only this run's output counts
        status = main([*argv, "-c", str(self.ini)])
        captured = self._capsys.readouterr()
        return Result(status, captured.out, captured.err)

    def init(self, **tape: object) -> None:
        """Configure and run ``tape init``, which must succeed."""
        self.configure(**tape)
        result = self.cli("tape", "init")
        assert result.status == 0, result.err

    @contextmanager
    def backend(self) -> Iterator[TapeBackend]:
        """Open the archive the way the service does; closed on leaving the block."""
        backend = registry.create(load_settings(config_file=str(self.ini), env={}))
        assert isinstance(backend, TapeBackend)
        try:
            yield backend
        finally:
            backend.close()

    def store(self, ids: Iterable[int], size: int = SIZE, mtime: float = MTIME) -> dict[int, bytes]:
        """Upload each id's payload through the backend; return id -> bytes stored."""
        stored = {}
        with self.backend() as backend:
            for file_id in ids:
                data = payload(file_id, size)
                with backend.open_writer(file_id, mtime) as writer:
                    writer.write(data)
                    assert writer.commit() == len(data)
                stored[file_id] = data
        return stored

    def path(self, file_id: int) -> Path:
        """Where the disk cache keeps ``file_id``."""
        with self.backend() as backend:
            return Path(backend.path(file_id))

    def states(self, ids: Iterable[int]) -> dict[int, str]:
        """Return each id's DMF state."""
        with self.backend() as backend:
            return {file_id: backend.state(file_id) for file_id in ids}

    def copies(self) -> dict[int, CopyInfo]:
        """Return the current (not stale) tape copy of every file, by file id."""
        with self.backend() as backend:
            tape_copy = backend.catalog.TapeCopy
            rows = tape_copy.select().where(tape_copy.stale == False)  # noqa: E712
            copies = [to_info(row) for row in rows]
        by_id = {copy.file_id: copy for copy in copies}
        assert len(by_id) == len(copies), "a file has two current copies"
        return by_id

    def copy_count(self) -> int:
        """Return how many tape copies the catalog holds, stale ones included."""
        with self.backend() as backend:
            return backend.catalog.TapeCopy.select().count()

    def volumes(self) -> dict[str, tuple[int, int, int]]:
        """Return VSN -> (capacity, fill, records) from the catalog."""
        with self.backend() as backend:
            volume = backend.catalog.Volume
            return {v.vsn: (v.capacity, v.fill, v.records) for v in volume.select().order_by(volume.vsn)}

    def counters(self) -> dict[str, int]:
        """Return the library's counters summed over its drives."""
        with self.backend() as backend:
            return backend.library.counters()

    def loaded(self) -> list[str | None]:
        """Return the volume in each drive (None for an empty drive), by drive name."""
        with self.backend() as backend:
            return [drive.vsn for drive in backend.library.drives()]

    def volume_file(self, vsn: str) -> Path:
        """Return the file holding volume ``vsn``."""
        return self.library / f"{vsn}.vol"


@pytest.fixture
def archive(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Archive:
    """An archive in the test directory; PAI_* variables from the caller's shell cannot leak in."""
    for name in list(os.environ):
        if name.startswith("PAI_"):
            monkeypatch.delenv(name)
    # A relative default path (./tape-library) must land in the test directory, never in the repo.
    monkeypatch.chdir(tmp_path)
    return Archive(tmp_path, capsys)


def records_on(volume: Path) -> list[tuple[int, int, int]]:
    """Walk a volume file's records from byte 0; return (offset, file id, size) of each.

    Fails on a torn record: a bad magic, data shorter than its header says, data
    that does not hash to the header's sha-256, or bytes after the last record.
    """
    assert HEADER.size == HEADER_SIZE
    data = volume.read_bytes()
    records, offset = [], 0
    while offset < len(data):
        assert len(data) - offset >= HEADER_SIZE, f"{volume.name}: torn header at byte {offset}"
        magic, file_id, size, digest, _ = HEADER.unpack_from(data, offset)
        assert magic == MAGIC, f"{volume.name}: no record header at byte {offset}"
        body = data[offset + HEADER_SIZE : offset + HEADER_SIZE + size]
        assert len(body) == size, f"{volume.name}: record at byte {offset} is cut short"
        assert hashlib.sha256(body).digest() == digest, f"{volume.name}: record at {offset} is damaged"
        records.append((offset, file_id, size))
        offset += HEADER_SIZE + size
    return records


def assert_volumes_match_catalog(archive: Archive) -> None:
    """Every volume file is exactly as long as its catalog fill and holds exactly the catalog's records."""
    copies = archive.copies()
    for vsn, (capacity, fill, records) in archive.volumes().items():
        assert fill <= capacity
        assert archive.volume_file(vsn).stat().st_size == fill, vsn
        on_tape = records_on(archive.volume_file(vsn))
        expected = sorted((c.offset, c.file_id, c.size) for c in copies.values() if c.vsn == vsn)
        assert on_tape == expected, vsn
        assert len(on_tape) == records


def directory_entries(path: Path) -> list[str]:
    """Return every name, hidden ones too, in the directory that holds ``path``."""
    return sorted(os.listdir(path.parent)) if path.parent.exists() else []


def offline(archive: Archive, count: int, size: int = SIZE) -> dict[int, bytes]:
    """Store, migrate and release ``count`` files; return id -> bytes."""
    stored = archive.store(file_ids(count), size)
    assert archive.cli("migrate", "--all").status == 0
    assert archive.cli("release", "--all").status == 0
    assert set(archive.states(stored).values()) == {OFFLINE}
    return stored


# -- tape init and status -------------------------------------------------------------------------------


def test_tape_init_creates_volumes_and_catalog_and_a_rerun_changes_nothing(archive: Archive):
    archive.configure()
    first = archive.cli("tape", "init")
    assert first.status == 0, first.err
    assert "(3 volumes and 2 drives added)" in first.out
    assert sorted(p.name for p in archive.library.glob("*.vol")) == [f"{vsn}.vol" for vsn in VSNS[:3]]
    assert all(archive.volume_file(vsn).stat().st_size == 0 for vsn in VSNS[:3])
    assert (archive.library / "catalog.sqlite").is_file()
    assert archive.volumes() == {vsn: (MIB, 0, 0) for vsn in VSNS[:3]}
    assert archive.loaded() == [None, None]

    files_before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in archive.library.glob("*.vol")}
    again = archive.cli("tape", "init")
    assert again.status == 0, again.err
    assert "(0 volumes and 0 drives added)" in again.out
    assert archive.volumes() == {vsn: (MIB, 0, 0) for vsn in VSNS[:3]}
    assert len(archive.loaded()) == 2
    files_after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in archive.library.glob("*.vol")}
    assert files_after == files_before


def test_tape_init_adds_only_new_volumes_and_never_truncates_one_holding_data(archive: Archive):
    archive.init()
    archive.store(file_ids(1))
    assert archive.cli("migrate", "--all").status == 0
    written = archive.volume_file(VSNS[0]).read_bytes()
    assert len(written) == HEADER_SIZE + SIZE

    archive.configure(volumes=5, drives=3, volume_capacity="2MiB")
    grown = archive.cli("tape", "init")
    assert grown.status == 0, grown.err
    assert "(2 volumes and 1 drives added)" in grown.out
    assert archive.volume_file(VSNS[0]).read_bytes() == written
    assert all(archive.volume_file(vsn).stat().st_size == 0 for vsn in VSNS[3:])
    # Existing cartridges keep their capacity and fill; only the new ones take the new size.
    assert archive.volumes() == {
        VSNS[0]: (MIB, len(written), 1),
        VSNS[1]: (MIB, 0, 0),
        VSNS[2]: (MIB, 0, 0),
        VSNS[3]: (2 * MIB, 0, 0),
        VSNS[4]: (2 * MIB, 0, 0),
    }

    status = archive.cli("tape", "status", "--json")
    assert status.status == 0, status.err
    document = status.json()
    assert document["library"] == str(archive.library)
    assert [v["vsn"] for v in document["volumes"]] == VSNS
    first = document["volumes"][0]
    assert (first["capacity"], first["used"], first["records"]) == (MIB, len(written), 1)
    assert first["full"] is False
    drives = document["drives"]
    assert [d["name"] for d in drives] == ["drive0", "drive1", "drive2"]
    holder = next(d["name"] for d in drives if d["vsn"] == VSNS[0])
    assert first["mounted_in"] == holder
    assert document["counters"]["mounts"] == 1
    assert document["counters"]["bytes_written"] == SIZE
    assert document["counters"]["bytes_read"] == SIZE  # the read-back after writing
    assert sum(d["bytes_written"] for d in drives) == SIZE

    text = archive.cli("tape", "status")
    assert text.status == 0
    assert all(vsn in text.out for vsn in VSNS)
    assert re.search(rf"^{VSNS[0]} .* 1  ok, in {holder}$", text.out, re.MULTILINE), text.out

    # With the catalog lost, init refuses: a fresh catalog would put the next record over this data.
    for path in archive.library.glob("catalog.sqlite*"):
        path.unlink()
    rebuilt = archive.cli("tape", "init")
    assert rebuilt.status == 2
    assert f"{VSNS[0]}.vol holds {len(written)} bytes the catalog does not know" in rebuilt.err
    assert not (archive.library / "catalog.sqlite").exists()
    assert archive.volume_file(VSNS[0]).read_bytes() == written


# -- migrate --------------------------------------------------------------------------------------------


def test_migrate_dry_run_changes_nothing_and_the_real_run_follows_it(archive: Archive):
    archive.init(volume_capacity="64KiB")
    stored = archive.store(file_ids(5))

    dry = archive.cli("migrate", "--all", "--dry-run")
    assert dry.status == 0, dry.err
    lines = re.findall(r"would migrate file (\d+) \(.*\) to (\S+) at byte (\d+)", dry.out)
    said = {int(file_id): (vsn, int(offset)) for file_id, vsn, offset in lines}
    assert sorted(said) == sorted(stored)
    assert "nothing was changed" in dry.out
    planned = archive.cli("migrate", "--all", "--dry-run", "--json")
    assert planned.status == 0
    document = planned.json()
    assert document["dry_run"] is True
    assert document["bytes"] == 5 * SIZE
    assert {f["file_id"]: (f["vsn"], f["offset"]) for f in document["files"]} == said
    assert {f["action"] for f in document["files"]} == {"migrate"}
    # Three records fill a 64 KiB volume, so the plan spills onto a second one.
    assert sorted(document["volumes"]) == VSNS[:2]

    assert archive.copy_count() == 0
    assert all(archive.volume_file(vsn).stat().st_size == 0 for vsn in VSNS[:3])
    assert set(archive.counters().values()) == {0}
    assert set(archive.states(stored).values()) == {REGULAR}

    real = archive.cli("migrate", "--all", "--json")
    assert real.status == 0, real.err
    outcome = real.json()
    assert (outcome["files"], outcome["bytes"], outcome["failed"]) == (5, 5 * SIZE, [])
    assert {c.file_id: (c.vsn, c.offset) for c in archive.copies().values()} == said
    assert_volumes_match_catalog(archive)
    assert set(archive.states(stored).values()) == {DUAL}
    assert all(archive.path(file_id).read_bytes() == data for file_id, data in stored.items())
    assert archive.counters()["bytes_written"] == 5 * SIZE


def test_migrate_spills_onto_the_next_volume_with_no_half_written_record(archive: Archive):
    archive.init(volume_capacity="64KiB")
    stored = archive.store(file_ids(7))

    result = archive.cli("migrate", "--all")
    assert result.status == 0, result.err
    assert "7 files" in result.out and "0 failed" in result.out
    assert_volumes_match_catalog(archive)
    assert [records for _, _, records in archive.volumes().values()] == [3, 3, 1]
    assert set(archive.states(stored).values()) == {DUAL}

    # The library is full now: one more file is refused, not half-written anywhere.
    extra = archive.store([1100], size=50_000)
    refused = archive.cli("migrate", "1100")
    assert refused.status == 1
    assert "file 1100" in refused.err and "no volume has room" in refused.err
    assert_volumes_match_catalog(archive)
    assert archive.states(extra) == {1100: REGULAR}


def test_migrate_writes_one_volume_per_drive_at_once(archive: Archive):
    """With 3 drives, migration takes 2 by default (one stays for recalls): two volumes written together."""
    archive.init(drives=3)
    ids = file_ids(6)
    stored = archive.store(ids)
    plan = archive.cli("migrate", *map(str, ids), "--dry-run", "--json")
    assert plan.status == 0, plan.err
    assert plan.json()["drives"] == 2
    planned = {step["file_id"]: step["vsn"] for step in plan.json()["files"]}
    # Balanced over the first two volumes, 3 files each.
    assert sorted(list(planned.values()).count(v) for v in set(planned.values())) == [3, 3]
    assert set(planned.values()) == set(VSNS[:2])

    # The two writers meet at a barrier after every file: written one volume after the other,
    # the first writer would wait there alone until the barrier broke the run.
    meet = threading.Barrier(2, timeout=30)
    with archive.backend() as backend:
        drives = operations.migration_drives(backend)
        assert drives == 2
        steps = operations.plan_migrate(backend, ids, drives)
        outcome = operations.run_migrate(backend, steps, lambda nbytes: meet.wait(), drives)
    assert outcome.failed == [] and len(outcome.done) == 6
    placed = {file_id: copy.vsn for file_id, copy in archive.copies().items()}
    assert placed == planned
    for file_id, copy in archive.copies().items():
        assert copy.size == len(stored[file_id])


def test_migrate_moves_on_when_another_migration_fills_the_volume_mid_run(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
):
    archive.init(volume_capacity="64KiB")
    interloper, *named = file_ids(5)
    stored = archive.store([interloper, *named])
    real_plan = operations.plan_migrate

    def plan_then_interfere(
        backend: TapeBackend, ids: Iterable[int], drives: int = 1
    ) -> list[operations.Step]:
        # Another process migrates a file between this run's plan and its writes.
        steps = real_plan(backend, ids, drives)
        monkeypatch.setattr(operations, "plan_migrate", real_plan)
        with archive.backend() as other:
            done = operations.run_migrate(other, real_plan(other, [interloper])).done
        assert [(s.file_id, s.vsn, s.offset) for s in done] == [(interloper, VSNS[0], 0)]
        return steps

    monkeypatch.setattr(operations, "plan_migrate", plan_then_interfere)
    result = archive.cli("migrate", *map(str, named), "--json")
    assert result.status == 0, result.err
    outcome = result.json()
    assert (outcome["files"], outcome["failed"]) == (4, [])

    record = HEADER_SIZE + SIZE
    placed = {c.file_id: (c.vsn, c.offset) for c in archive.copies().values()}
    assert placed == {
        interloper: (VSNS[0], 0),
        named[0]: (VSNS[0], record),
        named[1]: (VSNS[0], 2 * record),
        # Planned at the end of the first volume, which the interloper filled: it went after named[3].
        named[3]: (VSNS[1], 0),
        named[2]: (VSNS[1], record),
    }
    assert_volumes_match_catalog(archive)
    assert set(archive.states(stored).values()) == {DUAL}


# -- release --------------------------------------------------------------------------------------------


def test_release_dry_run_names_the_protecting_copy_and_the_real_run_drops_disk_files(archive: Archive):
    archive.init()
    stored = archive.store(file_ids(3))
    assert archive.cli("migrate", "--all").status == 0
    copies = archive.copies()

    dry = archive.cli("release", "--all", "--dry-run")
    assert dry.status == 0, dry.err
    for file_id, copy in copies.items():
        protected_by = f"verified copy on {copy.vsn} at byte {copy.offset}"
        assert f"would release file {file_id} (19.5 KiB on disk; {protected_by})" in dry.out
    assert "nothing was changed" in dry.out
    assert all(archive.path(file_id).read_bytes() == data for file_id, data in stored.items())
    assert set(archive.states(stored).values()) == {DUAL}

    real = archive.cli("release", "--all", "--json")
    assert real.status == 0, real.err
    outcome = real.json()
    assert (outcome["files"], outcome["bytes"], outcome["failed"]) == (3, 3 * SIZE, [])
    assert set(outcome["counters"].values()) == {0}  # releasing moves no tape
    for file_id in stored:
        path = archive.path(file_id)
        assert not path.exists()
        assert directory_entries(path) == []  # no file renamed aside was left behind
    assert set(archive.states(stored).values()) == {OFFLINE}
    assert archive.copies() == copies  # the tape copies are untouched


def test_release_of_a_regular_file_fails_and_keeps_it_on_disk(archive: Archive):
    archive.init()
    migrated, regular = file_ids(2)
    archive.store([migrated])
    assert archive.cli("migrate", "--all").status == 0
    stored = archive.store([regular])

    result = archive.cli("release", str(migrated), str(regular))
    assert result.status == 1
    assert f"file {regular}" in result.err
    assert "REGULAR" in result.err
    assert f"file {migrated}" not in result.err
    assert archive.path(regular).read_bytes() == stored[regular]
    assert archive.states([migrated, regular]) == {migrated: OFFLINE, regular: REGULAR}


def test_release_of_a_regular_file_says_it_needs_migrating(archive: Archive):
    archive.init()
    archive.store(file_ids(1))
    result = archive.cli("release", str(file_ids(1)[0]))
    assert result.status == 1
    assert "migrat" in result.err.lower(), result.err


def test_release_waits_for_verification_when_verify_after_write_is_off(archive: Archive):
    archive.init(verify_after_write="false")
    stored = archive.store(file_ids(2))
    assert archive.cli("migrate", "--all").status == 0
    assert all(c.verified_at is None for c in archive.copies().values())

    refused = archive.cli("release", "--all")
    assert refused.status == 1
    for file_id in stored:
        assert f"failed file {file_id}: tape copy not verified yet" in refused.err
        assert archive.path(file_id).exists()
    assert set(archive.states(stored).values()) == {DUAL}

    verified = archive.cli("verify", "--fraction", "1")
    assert verified.status == 0, verified.err
    assert {c.verify_result for c in archive.copies().values()} == {"ok"}

    released = archive.cli("release", "--all")
    assert released.status == 0, released.err
    assert set(archive.states(stored).values()) == {OFFLINE}
    assert not any(archive.path(file_id).exists() for file_id in stored)


# -- stage ----------------------------------------------------------------------------------------------


def test_stage_all_recalls_in_tape_order_with_one_mount_per_volume(archive: Archive):
    archive.init(volume_capacity="64KiB")
    stored = offline(archive, 6)
    assert {c.vsn for c in archive.copies().values()} == set(VSNS[:2])
    # Verifying unloads every cartridge, so each volume the recall needs costs one mount.
    assert archive.cli("verify", "--fraction", "1").status == 0
    assert archive.loaded() == [None, None]

    result = archive.cli("stage", "--all", "--json")
    assert result.status == 0, result.err
    outcome = result.json()
    assert (outcome["files"], outcome["bytes"], outcome["failed"]) == (6, 6 * SIZE, [])
    counters = outcome["counters"]
    assert counters["mounts"] == 2
    assert counters["unmounts"] == 0
    # Read in position order from the load point, the head never has to skip or rewind.
    assert counters["bytes_located"] == 0
    assert counters["bytes_read"] == 6 * SIZE
    assert counters["bytes_written"] == 0

    assert set(archive.states(stored).values()) == {DUAL}
    for file_id, data in stored.items():
        path = archive.path(file_id)
        assert path.read_bytes() == data
        assert read_sha256(str(path)) == hashlib.sha256(data).digest()
        assert path.stat().st_mtime == MTIME
        assert directory_entries(path) == [path.name]


def test_stage_reads_named_files_in_tape_order_whatever_order_they_are_given(archive: Archive):
    archive.init(volume_capacity="64KiB")
    stored = offline(archive, 6)
    assert archive.cli("verify", "--fraction", "1").status == 0

    ids = file_ids(6)
    shuffled = [ids[4], ids[1], ids[5], ids[0], ids[3], ids[2]]
    result = archive.cli("stage", *map(str, shuffled), "--drives", "1", "--json")
    assert result.status == 0, result.err
    counters = result.json()["counters"]
    assert (counters["mounts"], counters["bytes_located"]) == (2, 0)
    assert all(archive.path(file_id).read_bytes() == data for file_id, data in stored.items())


def test_stage_older_than_recalls_only_old_files(archive: Archive):
    archive.init()
    now = time.time()
    old = archive.store(file_ids(4)[:2], mtime=now - 10 * DAY)
    new = archive.store(file_ids(4)[2:], mtime=now)
    assert archive.cli("migrate", "--all").status == 0
    assert archive.cli("release", "--all").status == 0

    result = archive.cli("stage", "--all", "--older-than", "5d", "--json")
    assert result.status == 0, result.err
    assert result.json()["files"] == 2
    assert archive.states(old) == dict.fromkeys(old, DUAL)
    assert archive.states(new) == dict.fromkeys(new, OFFLINE)
    assert all(archive.path(file_id).read_bytes() == data for file_id, data in old.items())
    assert not any(archive.path(file_id).exists() for file_id in new)


# -- verify ---------------------------------------------------------------------------------------------


def test_verify_seed_repeats_the_sample_and_leaves_every_drive_empty(archive: Archive):
    archive.init(volume_capacity="64KiB")
    archive.store(file_ids(8))
    assert archive.cli("migrate", "--all").status == 0
    before = {c.id: c.verified_at for c in archive.copies().values()}
    per_volume = {vsn: records for vsn, (_, _, records) in archive.volumes().items()}
    assert per_volume == {VSNS[0]: 3, VSNS[1]: 3, VSNS[2]: 2}

    plans = [archive.cli("verify", "--fraction", "0.5", "--seed", "s1", "--dry-run", "--json") for _ in "ab"]
    assert [p.status for p in plans] == [0, 0]
    sample = plans[0].json()["volumes"]
    assert plans[1].json()["volumes"] == sample
    assert {vsn: len(files) for vsn, files in sample.items()} == {
        vsn: math.ceil(0.5 * records) for vsn, records in per_volume.items()
    }
    assert any(archive.loaded()), "migrating should leave cartridges in the drives"

    result = archive.cli("verify", "--fraction", "0.5", "--seed", "s1")
    assert result.status == 0, result.err
    rows = dict(re.findall(r"^(PL\d{4}L9)\s+(\d+)\s", result.out, re.MULTILINE))
    assert {vsn: int(files) for vsn, files in rows.items()} == {vsn: len(f) for vsn, f in sample.items()}
    summary = result.summary()
    assert summary["ok"] is True
    assert (summary["mismatches"], summary["unreadable"]) == (0, 0)
    assert {v["vsn"]: v["files"] for v in summary["volumes"]} == {vsn: len(f) for vsn, f in sample.items()}
    assert summary["files"] == sum(len(f) for f in sample.values())

    # Exactly the copies the dry run named were read back (and only they were re-stamped).
    sampled = {(vsn, f["offset"]) for vsn, files in sample.items() for f in files}
    for copy in archive.copies().values():
        if (copy.vsn, copy.offset) in sampled:
            assert copy.verified_at > before[copy.id]
        else:
            assert copy.verified_at == before[copy.id]
    assert archive.loaded() == [None, None]


def test_verify_always_includes_overdue_copies(archive: Archive):
    archive.init()
    stored = archive.store(file_ids(6))
    assert archive.cli("migrate", "--all").status == 0
    copies = archive.copies()
    overdue = file_ids(6)[3]
    long_ago = time.time() - 400 * DAY
    with archive.backend() as backend:
        backend.catalog.record_verification(copies[overdue].id, "ok", when=long_ago)

    def planned(*flags: str) -> list[int]:
        result = archive.cli("verify", *flags, "--dry-run", "--json")
        assert result.status == 0, result.err
        return [f["file"] for files in result.json()["volumes"].values() for f in files]

    assert planned("--fraction", "0") == [overdue]
    assert planned("--fraction", "0", "--max-age-days", "500") == []
    assert planned("--fraction", "0", "--max-age-days", "0") == sorted(stored)
    for seed in "12345":
        sample = planned("--fraction", "0.2", "--seed", seed)
        assert overdue in sample and len(sample) <= math.ceil(0.2 * len(stored)) + 1

    result = archive.cli("verify", "--fraction", "0", "--json")
    assert result.status == 0, result.err
    assert result.json()["files"] == 1
    assert archive.copies()[overdue].verified_at > long_ago + 399 * DAY
    assert planned("--fraction", "0") == []


def test_verify_finds_a_flipped_byte_marks_the_copy_bad_and_stage_then_fails(archive: Archive):
    archive.init()
    stored = offline(archive, 3)
    victim = file_ids(3)[1]
    copy = archive.copies()[victim]
    flip_byte(archive.volume_file(copy.vsn), copy.offset + HEADER_SIZE + 1234)

    result = archive.cli("verify", "--fraction", "1", "--json")
    assert result.status == 1
    summary = result.json()
    assert summary["ok"] is False
    assert (summary["mismatches"], summary["unreadable"]) == (1, 0)
    assert [(v["vsn"], v["mismatches"], v["unreadable"]) for v in summary["volumes"]] == [
        (copy.vsn, [victim], [])
    ]
    after = archive.copies()
    assert (after[victim].bad, after[victim].verify_result) == (True, "mismatch")
    assert all(not c.bad and c.verify_result == "ok" for c in after.values() if c.file_id != victim)
    assert archive.loaded() == [None, None]

    staged = archive.cli("stage", "--all")
    assert staged.status == 1
    assert f"failed file {victim}:" in staged.err
    assert directory_entries(archive.path(victim)) == []
    for file_id, data in stored.items():
        if file_id != victim:
            assert archive.path(file_id).read_bytes() == data
    assert archive.states([victim]) == {victim: OFFLINE}


def test_stage_of_a_corrupted_copy_fails_and_leaves_no_file_behind(archive: Archive):
    archive.init()
    offline(archive, 2)
    victim = file_ids(2)[0]
    copy = archive.copies()[victim]
    flip_byte(archive.volume_file(copy.vsn), copy.offset + HEADER_SIZE + SIZE - 1)

    result = archive.cli("stage", str(victim))
    assert result.status == 1
    assert f"failed file {victim}:" in result.err and "sha-256" in result.err
    # Neither the file nor the hidden temp file the recall wrote into.
    assert directory_entries(archive.path(victim)) == []
    assert archive.states([victim]) == {victim: OFFLINE}
    assert (archive.copies()[victim].bad, archive.copies()[victim].verify_result) == (True, "mismatch")


@pytest.mark.parametrize("in_drive", [True, False], ids=["cartridge-in-a-drive", "cartridge-on-the-shelf"])
def test_verify_reports_the_files_of_a_missing_volume_unreadable(archive: Archive, in_drive: bool):
    archive.init(volume_capacity="64KiB")
    archive.store(file_ids(5))
    assert archive.cli("migrate", "--all").status == 0
    if not in_drive:
        assert archive.cli("verify", "--fraction", "1").status == 0  # unloads every drive
    assert (VSNS[1] in archive.loaded()) is in_drive
    copies = archive.copies()
    lost = [c.file_id for c in sorted(copies.values(), key=lambda c: c.offset) if c.vsn == VSNS[1]]
    assert len(lost) == 2
    archive.volume_file(VSNS[1]).unlink()

    result = archive.cli("verify", "--fraction", "1")
    assert result.status == 1
    assert re.search(rf"^{VSNS[1]} .*unreadable ids \[{lost[0]}, {lost[1]}\]", result.out, re.MULTILINE)
    summary = result.summary()
    assert summary["ok"] is False
    assert (summary["mismatches"], summary["unreadable"]) == (0, 2)
    by_volume = {v["vsn"]: v for v in summary["volumes"]}
    assert by_volume[VSNS[1]]["unreadable"] == lost
    assert (by_volume[VSNS[0]]["files"], by_volume[VSNS[0]]["unreadable"]) == (3, [])
    if not in_drive:
        assert f"volume {VSNS[1]} is missing" in by_volume[VSNS[1]]["error"]
    after = archive.copies()
    assert {after[file_id].verify_result for file_id in lost} == {"unreadable"}
    assert not any(after[file_id].bad for file_id in lost)  # unreadable is not proof of damage
    assert archive.loaded() == [None, None]


# -- configuration errors -------------------------------------------------------------------------------

TAPE_COMMANDS = [
    pytest.param(["tape", "init"], id="tape-init"),
    pytest.param(["tape", "status"], id="tape-status"),
    pytest.param(["migrate", "--all"], id="migrate"),
    pytest.param(["release", "--all"], id="release"),
    pytest.param(["stage", "--all"], id="stage"),
    pytest.param(["verify"], id="verify"),
]


@pytest.mark.parametrize("argv", TAPE_COMMANDS)
def test_tape_commands_refuse_the_posix_backend(archive: Archive, argv: list[str]):
    archive.configure(backend="posix")
    result = archive.cli(*argv)
    assert result.status == 2
    assert "configuration error" in result.err
    assert "backend = tape" in result.err and "'posix'" in result.err
    assert str(archive.ini) in result.err  # names where the setting came from
    assert not archive.library.exists()


@pytest.mark.parametrize(
    "argv", [["tape", "status"], ["migrate", "--all"], ["release", "1001"], ["stage", "--all"], ["verify"]]
)
def test_a_library_never_initialised_is_a_configuration_error(archive: Archive, argv: list[str]):
    archive.configure()
    result = archive.cli(*argv)
    assert result.status == 2
    assert str(archive.library) in result.err
    assert "tape init" in result.err
    assert not archive.library.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["tape", "status"],
        ["migrate", "--all"],
        ["release", "--all"],
        ["stage", "--all"],
        ["verify"],
        ["check-config"],
    ],
)
def test_a_missing_stager_is_a_configuration_error_naming_its_path(archive: Archive, argv: list[str]):
    archive.init()
    stored = archive.store(file_ids(1))
    archive.configure(stager=MISSING_STAGER)
    result = archive.cli(*argv)
    assert result.status == 2
    assert "configuration error" in result.err
    assert f"[tape] stager: tape stager library {MISSING_STAGER} does not exist" in result.err
    archive.configure()  # the good stager again, to look at what is left
    assert archive.copy_count() == 0  # nothing was migrated
    assert archive.path(file_ids(1)[0]).read_bytes() == stored[file_ids(1)[0]]


def test_check_config_prints_the_tape_settings(archive: Archive):
    archive.init(drives=3, volume_capacity="64KiB", verify_after_write="false")
    result = archive.cli("check-config")
    assert result.status == 0, result.err
    lines = {line.split("    (")[0]: line for line in result.out.splitlines()}
    for expected in (
        "[archive] backend = tape",
        f"[tape] library = {archive.library}",
        "[tape] drives = 3",
        "[tape] volumes = 3",
        f"[tape] volume_capacity = {64 * KIB}",
        "[tape] time_scale = 0.0",
        "[tape] verify_after_write = False",
        "[tape] mount_seconds = 30.0",
    ):
        assert expected in lines, result.out
    assert lines["[tape] drives = 3"].endswith(f"({archive.ini} [tape] drives)")
    assert lines["[tape] mount_seconds = 30.0"].endswith("(default [tape] mount_seconds)")


def test_a_malformed_file_id_is_refused_with_the_id_rule(
    archive: Archive, capsys: pytest.CaptureFixture[str]
):
    archive.init()
    with pytest.raises(SystemExit) as exited:
        archive.cli("migrate", "012")
    assert exited.value.code == 2
    assert "without leading zeros" in capsys.readouterr().err


# -- progress -------------------------------------------------------------------------------------------


def test_progress_always_draws_a_bar_on_stderr_and_never_draws_none(archive: Archive):
    archive.init()
    first, second, third = file_ids(3)
    archive.store([first, second, third])

    drawn = archive.cli("migrate", str(first), "--progress", "always")
    assert drawn.status == 0, drawn.err
    assert re.search(r"migrate: 100%\|.*\| 19\.5k/19\.5k", drawn.err), drawn.err

    quiet = archive.cli("migrate", str(second), "--progress", "never")
    assert quiet.status == 0
    assert quiet.err == ""
    # auto: stderr is not a terminal here, so no bar either.
    auto = archive.cli("migrate", str(third))
    assert auto.status == 0
    assert auto.err == ""
    assert set(archive.states([first, second, third]).values()) == {DUAL}
