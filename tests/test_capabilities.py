"""Capabilities beyond the contract are protocols checked with isinstance; no backend imports another;
every writer that replaces a file whole goes through one durable-write helper.
"""

from __future__ import annotations

import ast
import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacifica_like.cli.main import main
from pacifica_like.core import durable
from pacifica_like.core.config import load_settings
from pacifica_like.core.ids import id2filename
from pacifica_like.storage import contract, registry
from pacifica_like.storage.contract import HoldsVolumes, KeepsSideband, LocatesOnTape, TapeManaged
from pacifica_like.storage.tape.library import vsn_name

PACKAGE = Path(__file__).resolve().parents[1] / "pacifica_like"
STORAGE = PACKAGE / "storage"
#: Registry name -> the module (or package) that is that backend.
BACKEND_ROOTS = {
    name: target.split(":")[0].removeprefix("pacifica_like.storage.").split(".")[0]
    for name, target in registry.REGISTRY.items()
}


# -- capabilities -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tape_managed", "keeps_sideband"),
    [("posix", False, False), ("memory", False, False), ("tape", True, True), ("sideband", True, True)],
)
def test_registered_classes_declare_their_capabilities(name: str, tape_managed: bool, keeps_sideband: bool):
    chosen = registry.resolve(name)
    assert issubclass(chosen, TapeManaged) is tape_managed
    assert issubclass(chosen, KeepsSideband) is keeps_sideband


def test_built_backends_are_checked_with_isinstance(tmp_path: Path, prepare_backend):
    found: dict[str, tuple[bool, bool]] = {}
    for case in ("posix", "memory", "tape", "sideband"):
        flags = {"archive": {"backend": case, "prefix": str(tmp_path / case)}, **prepare_backend(case)}
        backend = registry.create(load_settings(flags=flags, env={}))
        try:
            found[case] = (isinstance(backend, TapeManaged), isinstance(backend, KeepsSideband))
        finally:
            backend.close()
    assert found == {
        "posix": (False, False),
        "memory": (False, False),
        "tape": (True, True),
        "sideband": (True, True),
    }


def test_the_external_hsm_is_no_tape_managed_backend(tmp_path: Path, prepare_backend):
    flags = {"archive": {"backend": "sideband", "prefix": str(tmp_path / "x")}, **prepare_backend("sideband")}
    emulated = registry.create(load_settings(flags=flags, env={}))
    emulated.close()  # creates the sideband tables the external HSM would own
    flags["sideband"] = {**flags.get("sideband", {}), "hsm": "external"}
    external = registry.create(load_settings(flags=flags, env={}))
    try:
        assert not isinstance(external, TapeManaged)
        assert not issubclass(registry.backend_class(external.settings), TapeManaged)
    finally:
        external.close()


def test_tape_positions_and_volume_sessions_are_capabilities(tmp_path: Path, prepare_backend):
    """Only backends with tape locate files on it or hold volumes; the others stage each file alone."""
    found: dict[str, tuple[bool, bool]] = {}
    for case in ("posix", "memory", "tape", "sideband"):
        flags = {"archive": {"backend": case, "prefix": str(tmp_path / case)}, **prepare_backend(case)}
        backend = registry.create(load_settings(flags=flags, env={}))
        try:
            found[case] = (isinstance(backend, LocatesOnTape), isinstance(backend, HoldsVolumes))
            with backend.open_writer(3, 1_000_000.0) as writer:
                writer.write(b"on disk")
                writer.commit()
            assert contract.tape_positions(backend, [3, 4]) == {}  # on disk, unknown: nothing to recall
            with contract.open_volume(backend, vsn_name(0)) as session:
                staged = session.recall(3)
            # A held volume finds the file on disk already (False); staging alone says it is there (True).
            assert staged is (not found[case][1])
        finally:
            backend.close()
    flags = {"archive": {"backend": "sideband", "prefix": str(tmp_path / "x")}, **prepare_backend("sideband")}
    registry.create(load_settings(flags=flags, env={})).close()
    flags["sideband"] = {**flags.get("sideband", {}), "hsm": "external"}
    external = registry.create(load_settings(flags=flags, env={}))
    try:
        found["sideband external"] = (isinstance(external, LocatesOnTape), isinstance(external, HoldsVolumes))
    finally:
        external.close()
    assert found == {
        "posix": (False, False),
        "memory": (False, False),
        "tape": (True, True),
        "sideband": (True, True),
        "sideband external": (True, False),
    }


# -- no backend imports another ------------------------------------------------------------------


def _owner(module: str) -> str | None:
    """Return the backend (its root module under storage) that ``module`` belongs to, else None."""
    parts = module.split(".")
    if parts[:2] != ["pacifica_like", "storage"] or len(parts) < 3:
        return None
    return parts[2] if parts[2] in BACKEND_ROOTS.values() else None


def _imports(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """Yield (line, imported module) of every import in the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:  # ``from pacifica_like.storage import posix`` names a module
                yield node.lineno, f"{base}.{alias.name}"


def test_no_storage_backend_imports_another():
    assert set(BACKEND_ROOTS.values()) >= {"posix", "memory", "tape", "sideband"}
    crossing = []
    for path in sorted(STORAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        source = _owner(module)
        if source is None:
            continue
        for line, target in _imports(path, module):
            owner = _owner(target)
            if owner is not None and owner != source:
                crossing.append(f"{module}:{line} imports {target}")
    assert crossing == []


# -- one durable-write helper ------------------------------------------------------------------------


class EntryLog:
    """Records, in order, changes to directory entries (rename, link, unlink) and directory fsyncs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, tuple[int, int]]] = []
        for name in ("rename", "replace", "link", "unlink"):
            monkeypatch.setattr(os, name, self._entry_change(name, getattr(os, name)))
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                self.events.append(("fsync", (st.st_dev, st.st_ino)))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def _entry_change(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def change(*args: Any, **kwargs: Any) -> Any:
            paths = args[:1] if name == "unlink" else args[:2]
            if not any(key.endswith("dir_fd") for key in kwargs):
                for path in paths:
                    if isinstance(path, str | os.PathLike):
                        with contextlib.suppress(OSError):
                            self.events.append((name, _key(os.path.dirname(os.path.abspath(path)))))
            return real(*args, **kwargs)

        return change

    def flushed_last(self, directory: Path) -> bool:
        """True when ``directory`` had entries changed and was fsynced after the last change."""
        key = _key(str(directory))
        changes = [i for i, (kind, where) in enumerate(self.events) if where == key and kind != "fsync"]
        flushes = [i for i, (kind, where) in enumerate(self.events) if where == key and kind == "fsync"]
        return bool(changes) and bool(flushes) and flushes[-1] > changes[-1]


def _key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_audit_fix_quarantines_and_reports_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    prefix, reports = tmp_path / "archive", tmp_path / "reports"
    reports.mkdir()
    ini = tmp_path / "archive.ini"
    ini.write_text(f"[archive]\nbackend = posix\nprefix = {prefix}\n")
    backend = registry.create(load_settings(config_file=str(ini), env={}))
    for file_id, data in ((501, b"listed"), (0x4D2, b"an orphan")):
        with backend.open_writer(file_id, 784111777.0) as writer:
            writer.write(data)
            writer.commit()
    backend.close()
    inventory = tmp_path / "ids.txt"
    inventory.write_text("501\n")
    orphan = prefix / id2filename(0x4D2)[1:]
    monkeypatch.chdir(reports)

    entries = EntryLog(monkeypatch)
    judge_all = ("--ignore-age", "0", "--max-orphan-fraction", "1")
    status = main(
        ["audit", "--name", "q", "--inventory", str(inventory), *judge_all, "--fix", "-c", str(ini)]
    )
    monkeypatch.undo()

    assert status == 1  # an orphan was found (and quarantined)
    kept = prefix / ".quarantine" / "q" / id2filename(0x4D2)[1:]
    assert kept.read_bytes() == b"an orphan" and not orphan.exists()
    # Nothing left behind: no file set aside, no temp file, in either directory or the reports.
    for directory in (orphan.parent, kept.parent, reports):
        assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []
    # Each directory whose entries changed was flushed after its last change.
    assert entries.flushed_last(orphan.parent)
    assert entries.flushed_last(kept.parent)
    assert entries.flushed_last(reports)
    assert (reports / "q_orphan.txt").read_text() == f"{0x4D2}\n"


def test_atomic_write_leaves_the_old_file_and_no_temp_when_the_writer_fails(tmp_path: Path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), durable.atomic_write(str(target), binary=False) as handle:
        handle.write("half of the new")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

    durable.write_file(str(target), "new", mode=0o640)
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_copy_leaves_no_temp_and_a_refused_move_keeps_the_source(tmp_path: Path):
    (tmp_path / "to").mkdir()
    with pytest.raises(FileNotFoundError):
        durable.copy_file(str(tmp_path / "no-such-file"), str(tmp_path / "to" / "copy"))
    assert list((tmp_path / "to").iterdir()) == []

    source, taken = tmp_path / "source", tmp_path / "to" / "taken"
    source.write_bytes(b"mine")
    taken.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        durable.move_file(str(source), str(taken), replace=False)
    assert (source.read_bytes(), taken.read_bytes()) == (b"mine", b"theirs")
    durable.move_file(str(source), str(tmp_path / "to" / "moved"))
    assert (tmp_path / "to" / "moved").read_bytes() == b"mine" and not source.exists()


def test_publish_over_says_whether_it_replaced_a_file_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "file"
    for content, replaced in ((b"first", False), (b"second", True)):
        temp = tmp_path / ".file.tmp"
        temp.write_bytes(content)
        assert durable.publish_over(str(temp), str(target)) is replaced
        assert target.read_bytes() == content and target.stat().st_nlink == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
