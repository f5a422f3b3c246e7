"""The tape stager (pacifica_like/storage/tape/stager.c through its ctypes binding), on real files.

Every test runs the library the install built. Volumes and sources live in
``tmp_path``; outcomes are checked on the bytes, headers and file lengths left
on disk, and on the errno each failure carries.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import flip_byte

from pacifica_like.storage.tape import stager as stager_module
from pacifica_like.storage.tape.stager import HEADER_SIZE, Stager, StagerLoadError

MIB = 1 << 20
CAPACITY = 64 * MIB
MAGIC = b"PLTAPE\x00\x01"
#: magic, file id, size, sha-256, reserved
HEADER = struct.Struct("<8sQQ32s8s")
STAGER_C = Path(stager_module.__file__).with_name("stager.c")


@pytest.fixture(scope="module")
def stager() -> Stager:
    return stager_module.load()


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    return tmp_path / "A00001.vol"


def make_source(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def compile_library(directory: Path, name: str, source: str) -> Path:
    """Build a small shared library from C ``source``; return its path."""
    c_file = directory / f"{name}.c"
    c_file.write_text(source)
    library = directory / f"lib{name}.so"
    compiler = shutil.which("cc") or "gcc"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(c_file)], check=True, timeout=60)
    return library


@pytest.fixture
def one_record(stager: Stager, volume: Path, tmp_path: Path) -> tuple[bytes, bytes]:
    """A volume holding one 3 MiB + 5 byte record of file 7 at offset 0; return (data, sha256)."""
    data = os.urandom(3 * MIB + 5)
    size, sha256 = stager.append(volume, 0, CAPACITY, make_source(tmp_path, "one", data), 7)
    assert size == len(data)
    return data, sha256


# --- append, copy_out and verify on good records ---------------------------------------------


def test_two_records_round_trip_with_the_specified_layout(
    stager: Stager, volume: Path, tmp_path: Path
) -> None:
    first, second = os.urandom(5000), os.urandom(2 * MIB + 123)  # the second spans three chunks
    size1, sha1 = stager.append(volume, 0, CAPACITY, make_source(tmp_path, "first", first), 11)
    offset2 = HEADER_SIZE + size1
    size2, sha2 = stager.append(volume, offset2, CAPACITY, make_source(tmp_path, "second", second), 12)

    assert (size1, sha1) == (len(first), hashlib.sha256(first).digest())
    assert (size2, sha2) == (len(second), hashlib.sha256(second).digest())
    raw = volume.read_bytes()
    assert len(raw) == 2 * HEADER_SIZE + size1 + size2
    assert HEADER.unpack_from(raw, 0) == (MAGIC, 11, size1, sha1, bytes(8))
    assert HEADER.unpack_from(raw, offset2) == (MAGIC, 12, size2, sha2, bytes(8))
    assert raw[HEADER_SIZE:offset2] == first
    assert raw[offset2 + HEADER_SIZE :] == second

    for offset, file_id, data, sha256 in ((0, 11, first, sha1), (offset2, 12, second, sha2)):
        dest = tmp_path / f"out-{file_id}"
        stager.copy_out(volume, offset, file_id, len(data), sha256, dest)
        assert dest.read_bytes() == data
        assert dest.stat().st_mode & 0o777 == 0o600
        stager.verify(volume, offset, file_id, len(data), sha256)


def test_a_zero_length_file_is_a_bare_header(stager: Stager, volume: Path, tmp_path: Path) -> None:
    size, sha256 = stager.append(volume, 0, CAPACITY, make_source(tmp_path, "empty", b""), 5)
    assert (size, sha256) == (0, hashlib.sha256(b"").digest())
    assert HEADER.unpack(volume.read_bytes()) == (MAGIC, 5, 0, sha256, bytes(8))
    dest = tmp_path / "out"
    stager.copy_out(volume, 0, 5, 0, sha256, dest)
    assert dest.read_bytes() == b""
    stager.verify(volume, 0, 5, 0, sha256)


# --- append's failures leave the volume at its end of data -----------------------------------


def test_a_record_past_capacity_is_enospc_and_the_volume_keeps_its_end_of_data(
    stager: Stager, volume: Path, tmp_path: Path
) -> None:
    stager.append(volume, 0, CAPACITY, make_source(tmp_path, "first", b"x" * 100), 1)
    end = HEADER_SIZE + 100
    capacity = end + HEADER_SIZE + 50
    with volume.open("ab") as handle:
        handle.write(b"leftovers of an interrupted write")
    with pytest.raises(OSError) as caught:
        stager.append(volume, end, capacity, make_source(tmp_path, "big", b"y" * 51), 2)
    assert caught.value.errno == errno.ENOSPC
    assert volume.stat().st_size == end
    # Exactly full still fits.
    assert stager.append(volume, end, capacity, make_source(tmp_path, "fits", b"z" * 50), 3)[0] == 50
    assert volume.stat().st_size == capacity


def test_append_truncates_leftovers_past_the_end_of_data(
    stager: Stager, volume: Path, tmp_path: Path, one_record: tuple[bytes, bytes]
) -> None:
    data, sha256 = one_record
    end = HEADER_SIZE + len(data)
    with volume.open("ab") as handle:
        handle.write(MAGIC + os.urandom(10_000))  # a torn record that even looks like a header
    second = os.urandom(777)
    size, sha2 = stager.append(volume, end, CAPACITY, make_source(tmp_path, "second", second), 8)
    assert volume.stat().st_size == end + HEADER_SIZE + size
    dest = tmp_path / "out"
    stager.copy_out(volume, end, 8, size, sha2, dest)
    assert dest.read_bytes() == second
    stager.verify(volume, 0, 7, len(data), sha256)


def test_a_source_growing_past_capacity_mid_copy_is_enospc_and_rolled_back(
    stager: Stager, volume: Path, tmp_path: Path
) -> None:
    stager.append(volume, 0, CAPACITY, make_source(tmp_path, "first", b"a" * 10), 1)
    end = HEADER_SIZE + 10
    source = make_source(tmp_path, "growing", os.urandom(2 * MIB))
    capacity = end + HEADER_SIZE + 2 * MIB + 100

    def grow() -> None:
        # The paced append sleeps 0.25 s after its first chunk; this lands well inside.
        time.sleep(0.05)
        with source.open("ab") as handle:
            handle.write(os.urandom(MIB))

    grower = threading.Thread(target=grow)
    grower.start()
    try:
        with pytest.raises(OSError) as caught:
            stager.append(volume, end, capacity, source, 2, rate=4 * MIB)
    finally:
        grower.join()
    assert caught.value.errno == errno.ENOSPC
    assert volume.stat().st_size == end
    stager.verify(volume, 0, 1, 10, hashlib.sha256(b"a" * 10).digest())


def test_append_needs_an_existing_volume_past_offset_zero(
    stager: Stager, volume: Path, tmp_path: Path
) -> None:
    source = make_source(tmp_path, "data", b"data")
    with pytest.raises(FileNotFoundError) as caught:
        stager.append(volume, 128, CAPACITY, source, 1)
    assert str(volume) in str(caught.value)
    assert "offset 128" in str(caught.value)
    assert not volume.exists()


def test_append_refuses_a_volume_shorter_than_its_end_of_data(
    stager: Stager, volume: Path, tmp_path: Path
) -> None:
    volume.write_bytes(b"v" * 10)
    with pytest.raises(OSError) as caught:
        stager.append(volume, 1000, CAPACITY, make_source(tmp_path, "data", b"data"), 1)
    assert caught.value.errno == stager_module.SHORT_READ
    assert volume.read_bytes() == b"v" * 10


def test_a_missing_source_leaves_the_volume_alone(
    stager: Stager, volume: Path, tmp_path: Path, one_record: tuple[bytes, bytes]
) -> None:
    before = volume.read_bytes()
    with pytest.raises(FileNotFoundError) as caught:
        stager.append(volume, len(before), CAPACITY, tmp_path / "no-such-source", 9)
    assert "no-such-source" in str(caught.value)
    assert volume.read_bytes() == before


# --- damaged records: an errno each, and never a dest file -----------------------------------


def test_a_flipped_data_byte_is_a_checksum_mismatch(
    stager: Stager, volume: Path, tmp_path: Path, one_record: tuple[bytes, bytes]
) -> None:
    data, sha256 = one_record
    flip_byte(volume, HEADER_SIZE + len(data) - 1)
    dest = tmp_path / "out"
    with pytest.raises(OSError) as caught:
        stager.copy_out(volume, 0, 7, len(data), sha256, dest)
    assert caught.value.errno == errno.EBADMSG == stager_module.CHECKSUM_MISMATCH
    assert not dest.exists()
    with pytest.raises(OSError) as caught:
        stager.verify(volume, 0, 7, len(data), sha256)
    assert caught.value.errno == errno.EBADMSG


@pytest.mark.parametrize("keep", [HEADER_SIZE + 3 * MIB, HEADER_SIZE - 1], ids=["data", "header"])
def test_a_truncated_volume_is_a_short_read(
    stager: Stager, volume: Path, tmp_path: Path, one_record: tuple[bytes, bytes], keep: int
) -> None:
    data, sha256 = one_record
    os.truncate(volume, keep)
    dest = tmp_path / "out"
    with pytest.raises(OSError) as caught:
        stager.copy_out(volume, 0, 7, len(data), sha256, dest)
    assert caught.value.errno == errno.ENODATA == stager_module.SHORT_READ
    assert not dest.exists()
    with pytest.raises(OSError) as caught:
        stager.verify(volume, 0, 7, len(data), sha256)
    assert caught.value.errno == errno.ENODATA


@pytest.mark.parametrize("wrong", ["file_id", "size", "sha256", "magic"])
def test_a_header_that_does_not_match_is_a_bad_record(
    stager: Stager, volume: Path, tmp_path: Path, one_record: tuple[bytes, bytes], wrong: str
) -> None:
    data, sha256 = one_record
    file_id, size = 7, len(data)
    if wrong == "file_id":
        file_id = 8
    elif wrong == "size":
        size -= 1
    elif wrong == "sha256":
        sha256 = hashlib.sha256(b"another file").digest()
    else:
        flip_byte(volume, 0)
    dest = tmp_path / "out"
    with pytest.raises(OSError) as caught:
        stager.copy_out(volume, 0, file_id, size, sha256, dest)
    assert caught.value.errno == errno.EILSEQ == stager_module.BAD_RECORD
    assert not dest.exists()
    with pytest.raises(OSError) as caught:
        stager.verify(volume, 0, file_id, size, sha256)
    assert caught.value.errno == errno.EILSEQ


def test_a_missing_volume_is_file_not_found(stager: Stager, volume: Path, tmp_path: Path) -> None:
    sha256 = hashlib.sha256(b"").digest()
    dest = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as caught:
        stager.copy_out(volume, 64, 1, 0, sha256, dest)
    assert str(volume) in str(caught.value)
    assert "offset 64" in str(caught.value)
    assert not dest.exists()
    with pytest.raises(FileNotFoundError):
        stager.verify(volume, 64, 1, 0, sha256)


def test_an_existing_dest_is_refused_and_left_untouched(
    stager: Stager, volume: Path, tmp_path: Path, one_record: tuple[bytes, bytes]
) -> None:
    data, sha256 = one_record
    dest = make_source(tmp_path, "out", b"somebody else's file")
    with pytest.raises(FileExistsError):
        stager.copy_out(volume, 0, 7, len(data), sha256, dest)
    assert dest.read_bytes() == b"somebody else's file"


def test_bad_arguments_never_reach_c(stager: Stager, volume: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sha256"):
        stager.verify(volume, 0, 1, 0, b"short")
    with pytest.raises(ValueError, match="offset"):
        stager.verify(volume, -1, 1, 0, bytes(32))


# --- pacing: a drive's rate, with the GIL released -------------------------------------------


@pytest.fixture
def eight_mib_record(stager: Stager, volume: Path, tmp_path: Path) -> tuple[int, bytes]:
    return stager.append(volume, 0, CAPACITY, make_source(tmp_path, "big", os.urandom(8 * MIB)), 1)


def test_copy_out_is_paced_and_two_drives_overlap(
    stager: Stager, volume: Path, tmp_path: Path, eight_mib_record: tuple[int, bytes]
) -> None:
    size, sha256 = eight_mib_record
    rate = 16 * MIB  # 8 MiB takes 0.5 s

    started = time.monotonic()
    stager.copy_out(volume, 0, 1, size, sha256, tmp_path / "alone", rate)
    assert time.monotonic() - started >= 0.45

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        copies = [
            pool.submit(stager.copy_out, volume, 0, 1, size, sha256, tmp_path / f"drive{n}", rate)
            for n in (1, 2)
        ]
        for copy in copies:
            copy.result()
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 0.8, elapsed  # together, not one after the other (>= 1 s)
    assert (tmp_path / "drive2").stat().st_size == size


def test_append_and_verify_are_paced_too(stager: Stager, volume: Path, tmp_path: Path) -> None:
    data = os.urandom(2 * MIB)
    started = time.monotonic()
    size, sha256 = stager.append(volume, 0, CAPACITY, make_source(tmp_path, "data", data), 1, rate=16 * MIB)
    assert time.monotonic() - started >= 0.11
    started = time.monotonic()
    stager.verify(volume, 0, 1, size, sha256, rate=16 * MIB)
    assert time.monotonic() - started >= 0.11


# --- loading ----------------------------------------------------------------------------------


def test_load_is_cached_per_path(stager: Stager) -> None:
    assert stager_module.load() is stager
    assert stager_module.load(stager_module.DEFAULT_PATH) is stager


def test_load_of_a_missing_library_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "libstager.so"
    with pytest.raises(StagerLoadError, match="pip install -e") as caught:
        stager_module.load(missing)
    assert str(missing) in str(caught.value)


def test_load_of_a_file_that_is_no_library_names_the_path(tmp_path: Path) -> None:
    junk = make_source(tmp_path, "libstager.so", b"not an ELF file")
    with pytest.raises(StagerLoadError) as caught:
        stager_module.load(junk)
    assert str(junk) in str(caught.value)


def test_load_of_a_library_without_the_stager_api_names_the_path(tmp_path: Path) -> None:
    library = compile_library(tmp_path, "unrelated", "int unrelated(void) { return 0; }\n")
    with pytest.raises(StagerLoadError) as caught:
        stager_module.load(library)
    assert str(library) in str(caught.value)
    assert "stg_abi_version" in str(caught.value)


def test_load_of_another_abi_names_both_versions(tmp_path: Path) -> None:
    library = compile_library(tmp_path, "future", "int stg_abi_version(void) { return 99; }\n")
    with pytest.raises(StagerLoadError) as caught:
        stager_module.load(library)
    message = str(caught.value)
    assert str(library) in message
    assert "version 99" in message
    assert f"version {stager_module.STAGER_ABI}" in message


def test_stager_c_compiles_without_warnings(tmp_path: Path) -> None:
    # setup.py does not use -Werror (a newer compiler must not break installs); CI does, here.
    compiler = shutil.which("cc") or "gcc"
    flags = ["-std=c11", "-pedantic", "-O2", "-Wall", "-Wextra", "-Wconversion", "-Werror", "-fPIC", "-c"]
    subprocess.run(
        [compiler, *flags, "-o", str(tmp_path / "stager.o"), str(STAGER_C)], check=True, timeout=60
    )
