"""The memory backend beyond the contract suite: nothing on disk, one archive per process and prefix.

The contract itself is checked by tests/test_backend_contract.py (over the registry).
Here: what a test double must promise its users, through the real servers too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import requests
import webtest
from conftest import LAST_MODIFIED, LAST_MODIFIED_EPOCH

from pacifica_like.core.config import load_settings
from pacifica_like.storage import registry as factory
from pacifica_like.web import devserver
from pacifica_like.web.app import build_app


def memory_settings(prefix: Path, **archive):
    return load_settings(flags={"archive": {"backend": "memory", "prefix": str(prefix), **archive}}, env={})


def test_nothing_is_written_to_disk(tmp_path: Path):
    prefix = tmp_path / "archive"
    settings = memory_settings(prefix, catalog="off")
    app = webtest.TestApp(build_app(settings, factory.create(settings)))
    assert app.put("/12345", b"in memory", headers={"Last-Modified": LAST_MODIFIED}).status_int == 201
    assert app.get("/12345").body == b"in memory"
    head = app.head("/12345")
    assert head.headers["X-Pacifica-File"] == "39/3039"  # posix's sharded relpath
    assert head.headers["X-Pacifica-Bytes-Per-Level"] == "(9, 0)"
    assert app.get("/ready").json["status"] == "ready"
    assert not prefix.exists()


def test_backends_on_one_prefix_share_files_and_other_prefixes_do_not(tmp_path: Path):
    first = factory.create(memory_settings(tmp_path / "a"))
    with first.open_writer(7, LAST_MODIFIED_EPOCH) as writer:
        writer.write(b"shared")
        writer.commit()
    assert (
        factory.create(memory_settings(tmp_path / "a")).status(7).sha256 == hashlib.sha256(b"shared").digest()
    )
    assert list(factory.create(memory_settings(tmp_path / "b")).list_ids()) == []


def test_a_reader_keeps_its_bytes_after_delete(tmp_path: Path):
    backend = factory.create(memory_settings(tmp_path / "archive"))
    with backend.open_writer(3, LAST_MODIFIED_EPOCH) as writer:
        writer.write(b"still readable")
        writer.commit()
    with backend.open_reader(3) as reader:
        backend.delete(3)
        assert reader.read() == b"still readable"


def live_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PAI_BACKEND_TYPE": "memory",
        "PAI_PREFIX": str(tmp_path / "archive"),
        "PAI_CATALOG": "off",
    }


def round_trip(url: str) -> None:
    put = requests.put(
        f"{url}/42", data=b"served from memory", headers={"Last-Modified": LAST_MODIFIED}, timeout=10
    )
    assert put.status_code == 201, put.text
    got = requests.get(f"{url}/42", timeout=10)
    assert (got.status_code, got.content) == (200, b"served from memory")


def test_serve_keeps_files_in_its_process(tmp_path: Path):
    with devserver.cli_server([], env=live_env(tmp_path)) as server:
        round_trip(server.url)
    assert not (tmp_path / "archive").exists()


def test_uwsgi_with_one_process_serves(tmp_path: Path):
    with devserver.uwsgi_server(live_env(tmp_path), processes=1) as server:
        round_trip(server.url)


def test_uwsgi_with_several_processes_refuses_to_start(tmp_path: Path):
    with (
        pytest.raises(RuntimeError, match="keeps files in one process's memory, but uWSGI runs 2 processes"),
        devserver.uwsgi_server(live_env(tmp_path), processes=2),
    ):
        pass
