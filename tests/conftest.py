"""Shared fixtures: settings on a temp prefix, the real app through WebTest."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import webtest

from pacifica_like.core.config import DEFAULT_CATALOG_NAME, Settings, load_settings
from pacifica_like.storage import registry as factory
from pacifica_like.storage.contract import Backend
from pacifica_like.web.app import build_app


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say plainly which database-server halves of the suite did not run, and why."""
    from dbservers import UNREACHABLE

    for label, reason in sorted(UNREACHABLE.items()):
        terminalreporter.write_line(
            f"NOTE: the {label} half of the tests was SKIPPED: {reason}. "
            "`.ci/run` installs and starts the server; or set PL_TEST_MYSQL_URL / PL_TEST_POSTGRES_URL.",
            yellow=True,
            bold=True,
        )


LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"
LAST_MODIFIED_EPOCH = 784111777.0


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    """The archive root of the test."""
    return tmp_path / "archive"


#: Backend cases beyond the registry's names: ``name@variant`` runs backend ``name`` on a variant
#: of its environment (``sideband@mysql``: the sideband database on MariaDB instead of SQLite).
BACKEND_VARIANTS = ("sideband@mysql",)


def backend_cases() -> list[str]:
    """Every registered backend, plus its variants: what the contract suite runs over."""
    return sorted([*factory.REGISTRY, *BACKEND_VARIANTS])


@pytest.fixture
def prepare_backend(tmp_path: Path) -> Iterator[Callable[[str], dict[str, dict[str, Any]]]]:
    """Return the extra setting flags a backend case needs, creating what it needs on disk.

    tape and sideband: an initialised library in the test directory with every
    delay off, so tests check behaviour and counters, never clocks.
    ``sideband@mysql``: also a scratch MariaDB database (skipped, saying why,
    where no server is reachable), dropped after the test.
    """
    with contextlib.ExitStack() as cleanup:

        def prepare(case: str) -> dict[str, dict[str, Any]]:
            name, _, variant = case.partition("@")
            name = factory.ALIASES.get(name, name)
            if name not in ("tape", "sideband"):
                return {}
            tape = {"library": str(tmp_path / "tape-library"), "time_scale": 0.0, "volume_capacity": 64 << 20}
            init_tape_library(load_settings(flags={"tape": tape}, env={}))
            flags: dict[str, dict[str, Any]] = {"tape": tape}
            if variant == "mysql":
                from dbservers import scratch_database

                url = cleanup.enter_context(scratch_database("mysql", "pl_sideband"))
                flags["sideband"] = {"database": url}
            return flags

        yield prepare


@pytest.fixture(params=backend_cases())
def make_backend(request, tmp_path: Path, prepare_backend) -> Iterator[Callable[..., Backend]]:
    """Build the parametrised backend case (through the registry) over a fresh prefix; closed after."""
    built: list[Backend] = []

    def build(**archive: Any) -> Backend:
        name = request.param.partition("@")[0]
        archive = {"backend": name, "prefix": str(tmp_path / "archive"), **archive}
        settings = load_settings(flags={"archive": archive, **prepare_backend(request.param)}, env={})
        built.append(factory.create(settings))
        return built[-1]

    yield build
    for backend in built:
        backend.close()


def flip_byte(path: str | Path, offset: int) -> None:
    """Invert one byte of a file in place, as a failing cartridge might."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def corrupt(backend: Any, file_id: int) -> None:
    """Flip one byte in the middle of the file's current tape copy on its volume (a tape backend)."""
    from pacifica_like.storage.tape.stager import HEADER_SIZE

    copy = backend.catalog.current_copies(file_id)[0]
    flip_byte(backend.library.volume_path(copy.vsn), copy.offset + HEADER_SIZE + copy.size // 2)


def init_tape_library(settings: Settings) -> Settings:
    """Create (or extend) the tape library the settings name, as `tape init` does; return them."""
    from pacifica_like.storage.tape.library import TapeLibrary

    library = TapeLibrary(settings.tape, require_stager=False)
    library.initialise()
    library.catalog.close()
    return settings


@pytest.fixture
def tape_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build settings for a tape archive in tmp_path (library initialised, delays off).

    Keyword args override [tape] keys; ``archive`` overrides [archive] keys.
    """

    def build(archive: dict[str, Any] | None = None, **tape: Any) -> Settings:
        tape = {
            "library": str(tmp_path / "library"),
            "time_scale": 0.0,
            "volume_capacity": 64 << 20,
            "volumes": 4,
            **tape,
        }
        flags = {"archive": {"backend": "tape", "prefix": str(tmp_path / "cache"), **(archive or {})}}
        return init_tape_library(load_settings(flags={**flags, "tape": tape}, env={}))

    return build


@pytest.fixture
def make_tape(tape_settings: Callable[..., Settings]) -> Iterator[Callable[..., Backend]]:
    """Build tape backends over one library and cache in tmp_path (closed at the end of the test)."""
    from pacifica_like.storage.tape.backend import TapeBackend

    built: list[Backend] = []

    def build(archive: dict[str, Any] | None = None, **tape: Any) -> Backend:
        backend = factory.create(tape_settings(archive, **tape))
        assert isinstance(backend, TapeBackend)
        built.append(backend)
        return backend

    yield build
    for backend in built:
        backend.close()


@pytest.fixture
def make_settings(prefix: Path) -> Callable[..., Settings]:
    """Build Settings over the test prefix; keyword args override [archive] keys."""

    def build(**archive: Any) -> Settings:
        archive.setdefault("prefix", str(prefix))
        return load_settings(flags={"archive": archive}, env={})

    return build


@pytest.fixture(params=["wsgi", "cherrypy"])
def file_api(request: pytest.FixtureRequest) -> str:
    """The file API's adapter: the plain WSGI one (uWSGI's) or the CherryPy MethodDispatcher resource."""
    return request.param


@pytest.fixture
def make_app(make_settings: Callable[..., Settings], file_api: str) -> Callable[..., webtest.TestApp]:
    """Build the real WSGI app (file API + CherryPy fallback) for WebTest, on each file API adapter."""

    def build(**archive: Any) -> webtest.TestApp:
        settings = make_settings(**archive)
        return webtest.TestApp(build_app(settings, factory.create(settings), file_api=file_api))

    return build


@pytest.fixture
def app(make_app: Callable[..., webtest.TestApp]) -> webtest.TestApp:
    """The app with default settings (sharded posix, overwrite allowed, no delete)."""
    return make_app()


@pytest.fixture
def backend(make_settings: Callable[..., Settings]) -> Backend:
    """A posix backend on the test prefix."""
    return factory.create(make_settings())


def put(app: webtest.TestApp, file_id: int | str, body: bytes, **headers: str) -> webtest.TestResponse:
    """PUT ``body`` with a valid Last-Modified unless the caller overrides headers."""
    all_headers = {"Last-Modified": LAST_MODIFIED, **{k.replace("_", "-"): v for k, v in headers.items()}}
    return app.put(f"/{file_id}", body, headers=all_headers, expect_errors=True)


def files_under(root: Path) -> list[Path]:
    """Every regular file below ``root`` (temp files included), sorted.

    The gateway catalog's SQLite files (``<prefix>/.catalog.sqlite*``) are not archive files.
    """
    if not root.exists():
        return []
    catalog = [root / (DEFAULT_CATALOG_NAME + suffix) for suffix in ("", "-wal", "-shm", "-journal", "-sync")]
    return sorted(p for p in root.rglob("*") if p.is_file() and p not in catalog)
