"""Shared set-up for the bulk-staging tests: offline files on a tape-backed archive, and the API."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import webtest
from conftest import init_tape_library

from pacifica_like.bulk.scheduler import Scheduler
from pacifica_like.core.config import Settings, load_settings
from pacifica_like.storage import registry as factory
from pacifica_like.storage.contract import Backend
from pacifica_like.storage.contract import TapeManaged as TapeBackend
from pacifica_like.storage.tape import operations
from pacifica_like.web.app import build_app

MTIME = 784111777.0
#: [bulk] settings for tests: every queue is worth a mount, passes come quickly.
BULK = {"mount_min_files": 1, "poll_seconds": 0.05, "max_wait_seconds": 0.0}


def tape_backed_names() -> list[str]:
    """The registry names whose backend keeps files on tape (the bulk API's real targets)."""
    return sorted(name for name in factory.REGISTRY if issubclass(factory.resolve(name), TapeBackend))


def make_settings(
    tmp_path: Path,
    name: str,
    prepare: Callable[[str], dict[str, dict[str, Any]]],
    bulk: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> Settings:
    """Settings for a ``name`` archive in ``tmp_path``: library ready, delays off, eager scheduler."""
    flags: dict[str, dict[str, Any]] = {"archive": {"backend": name, "prefix": str(tmp_path / "archive")}}
    for section, values in prepare(name).items():
        flags.setdefault(section, {}).update(values)
    for section, values in sections.items():
        flags.setdefault(section, {}).update(values)
    flags["bulk"] = {**BULK, **(bulk or {})}
    return load_settings(flags=flags, env={})


def content(file_id: int, size: int) -> bytes:
    """The bytes file ``file_id`` holds (seeded by its id)."""
    return random.Random(file_id).randbytes(size)


def store_offline(backend: Backend, sizes: dict[int, int], spread: int = 1) -> None:
    """Store each file, migrate it to tape and release it from disk.

    ``spread``: migrate the files in this many groups, each to the next volume
    with room, so they land on several volumes.
    """
    assert isinstance(backend, TapeBackend)
    ids = sorted(sizes)
    for file_id in ids:
        with backend.open_writer(file_id, MTIME) as writer:
            writer.write(content(file_id, sizes[file_id]))
            writer.commit()
    for group in range(spread):
        chosen = ids[group::spread]
        steps = operations.plan_migrate(backend, chosen)
        outcome = operations.run_migrate(backend, steps)
        assert not outcome.failed, outcome.failed
        # The next group goes to a fresh volume: mark this one full.
        vsns = {s.vsn for s in steps if s.action == "migrate"}
        volume = backend.catalog.Volume
        with backend.catalog.db.atomic():
            volume.update(full=True).where(volume.vsn.in_(vsns)).execute()
    outcome = operations.run_release(backend, operations.plan_release(backend, ids))
    assert not outcome.failed, outcome.failed


def on_disk(backend: Backend, file_id: int) -> bytes | None:
    """The bytes of ``file_id`` in the disk cache, or None."""
    path = backend.path(file_id)  # type: ignore[attr-defined]
    if not os.path.exists(path):
        return None
    with open(path, "rb") as handle:
        return handle.read()


def http(settings: Settings, backend: Backend) -> webtest.TestApp:
    """The real app over ``backend`` through WebTest."""
    return webtest.TestApp(build_app(settings, backend))


def scheduler(settings: Settings, backend: Backend) -> Scheduler:
    """A scheduler over the settings' catalog."""
    return Scheduler.from_settings(settings, backend)


def submit(app: webtest.TestApp, paths: Iterable[str], status: int = 201, **headers: str) -> Any:
    """POST a stage request for ``paths``; return the parsed answer."""
    body = {"files": [{"path": p} for p in paths]}
    answer = app.post_json("/api/v1/stage", body, status=status, headers=headers)
    return answer


def poll(app: webtest.TestApp, request_id: str, status: int = 200, **params: Any) -> Any:
    """GET a stage request; return the parsed answer."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return app.get(f"/api/v1/stage/{request_id}" + (f"?{query}" if query else ""), status=status).json


def states(document: dict[str, Any]) -> dict[str, str]:
    """Path -> state of a poll's files."""
    return {f["path"]: f["state"] for f in document["files"]}


def wait_for(check: Callable[[], Any], timeout: float = 60, pause: float = 0.05) -> Any:
    """Return ``check()``'s first true value, asking every ``pause`` s; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"timed out after {timeout} s")


def live_tape_ini(root: Path, extra: str = "") -> Path:
    """Initialise a tape library under ``root`` and write an archive.ini for a live server over it.

    The library's delays are a 200th of an LTO-9's (``time_scale = 0.005``): real mounts, locates
    and reads, but short. ``extra``: more ini text (other sections) appended as it is.
    """
    library = str(root / "library")
    init_tape_library(load_settings(flags={"tape": {"library": library}}, env={}))
    ini = root / "archive.ini"
    ini.write_text(
        f"[archive]\nbackend = tape\nprefix = {root / 'archive'}\n"
        f"[tape]\nlibrary = {library}\nvolume_capacity = 64MiB\ntime_scale = 0.005\n" + extra,
        encoding="utf-8",
    )
    return ini
