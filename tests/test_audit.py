"""The inventory and the consistency audit, end to end.

Files are stored, replaced, moved in and deleted through HTTP (WebTest over the
real app, which records them in the catalog), then the storage is changed
behind the gateway's back: files unlinked, orphans written straight into the
prefix's sharded paths, directories made unreadable. ``pacifica-like audit``
runs through the real CLI in a separate reports directory, and each test checks
what it left behind: exit status, the report files, catalog rows, and the bytes
on disk and in quarantine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import webtest
from conftest import LAST_MODIFIED, LAST_MODIFIED_EPOCH
from dbservers import scratch_database

from pacifica_like.cli.main import main
from pacifica_like.core.config import ConfigError, load_settings
from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.core.ids import id2filename
from pacifica_like.gateway import audit
from pacifica_like.gateway.catalog import LOST, PRESENT, GatewayCatalog
from pacifica_like.storage import registry
from pacifica_like.storage.contract import SHA256_XATTR, Backend, read_sha256
from pacifica_like.web.app import build_app

REPO = Path(__file__).resolve().parents[1]
DAY = 86400.0
#: Audit flags for tests that want every file judged now, whatever its age or share.
JUDGE_ALL = ("--ignore-age", "0", "--max-orphan-fraction", "1")


def payload(file_id: int) -> bytes:
    """Return bytes that differ for every id (and in length)."""
    return f"file {file_id} ".encode() * (1 + file_id % 7)


@dataclass(frozen=True)
class Result:
    """One audit run: exit status, output, and the reports it wrote (None when it wrote none)."""

    status: int
    out: str
    err: str
    missing: list[int] | None
    orphan: list[int] | None
    summary: dict[str, Any] | None


class Site:
    """One test's archive: archive.ini, the prefix, the app over HTTP, and the audit CLI."""

    def __init__(self, root: Path, backend: str, extra: dict[str, dict[str, Any]], capsys: Any) -> None:
        self.root = root
        self.backend_name = backend
        self.prefix = root / "archive"
        self.incoming = root / "incoming"
        self.reports = root / "reports"
        self.ini = root / "archive.ini"
        self.incoming.mkdir()
        self.reports.mkdir()
        self._capsys = capsys
        self._extra = extra
        self._apps: list[webtest.TestApp] = []
        self.configure()

    def configure(self, **archive: Any) -> None:
        """Write archive.ini; ``archive`` adds or overrides [archive] keys."""
        keys = {
            "backend": self.backend_name,
            "prefix": self.prefix,
            "allow_delete": "true",
            "patch_roots": self.incoming,
            **archive,
        }
        lines = ["[archive]", *(f"{key} = {value}" for key, value in keys.items())]
        for section, values in self._extra.items():
            lines += [f"[{section}]", *(f"{key} = {value}" for key, value in values.items())]
        self.ini.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._app = None

    def settings(self) -> Any:
        return load_settings(config_file=str(self.ini), env={})

    @property
    def app(self) -> webtest.TestApp:
        """The real WSGI app over this archive (built on first use after each configure)."""
        if self._app is None:
            settings = self.settings()
            self._app = webtest.TestApp(build_app(settings, registry.create(settings)))
            self._apps.append(self._app)
        return self._app

    @property
    def backend(self) -> Backend:
        """The app's backend (the inventory listens to its storage events)."""
        api = self.app.app
        while not isinstance(getattr(api, "backend", None), Backend):
            api = api.app  # a middleware (access log, metrics) in front of the file API
        return api.backend

    def put(self, file_id: int, data: bytes | None = None) -> bytes:
        data = payload(file_id) if data is None else data
        response = self.app.put(f"/{file_id}", data, headers={"Last-Modified": LAST_MODIFIED})
        assert response.status_int == 201, response.body
        return data

    def delete(self, file_id: int) -> None:
        assert self.app.delete(f"/{file_id}").status_int == 200

    def path(self, file_id: int) -> Path:
        return self.prefix / id2filename(file_id)[1:]

    def plant(self, file_id: int, data: bytes) -> Path:
        """Write a file straight into the archive, as a restore from backup or a stray tool would."""
        path = self.path(file_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def catalog(self) -> GatewayCatalog:
        url = self.settings().archive.catalog
        assert url is not None
        return GatewayCatalog(url)

    def rows(self) -> dict[int, tuple[int, str | None, str]]:
        """Return file id -> (size, sha256 hex, state) for every inventory row."""
        catalog = self.catalog()
        try:
            query = catalog.Inventory.select().order_by(catalog.Inventory.file_id)
            return {row.file_id: (row.size, row.sha256, row.state) for row in query}
        finally:
            catalog.close()

    def audit(self, name: str, *argv: str) -> Result:
        """Run ``pacifica-like audit --name NAME ARGV -c archive.ini`` in the reports directory."""
        self.hsm_catches_up()
        self._capsys.readouterr()
        previous = os.getcwd()
        os.chdir(self.reports)
        try:
            status = main(["audit", "--name", name, *argv, "-c", str(self.ini)])
        finally:
            os.chdir(previous)
        captured = self._capsys.readouterr()
        return self.result(name, status, captured.out, captured.err)

    def hsm_catches_up(self) -> None:
        """Sideband: record changes made behind the gateway's back, as a real HSM's updater does."""
        if self.backend_name == "sideband":
            assert self.cli("sideband", "load", "--progress", "never") == 0

    def result(self, name: str, status: int, out: str, err: str) -> Result:
        def ids(kind: str) -> list[int] | None:
            path = self.reports / f"{name}_{kind}.txt"
            return [int(line) for line in path.read_text().splitlines()] if path.exists() else None

        summary_path = self.reports / f"{name}_summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        return Result(status, out, err, ids("missing"), ids("orphan"), summary)

    def cli(self, *argv: str) -> int:
        return main([*argv, "-c", str(self.ini)])

    def close(self) -> None:
        for app in self._apps:
            self.backend_of(app).close()

    @staticmethod
    def backend_of(app: webtest.TestApp) -> Any:
        api = app.app
        while not hasattr(api, "backend"):
            api = api.app
        return api.backend


@pytest.fixture
def make_site(
    tmp_path: Path, prepare_backend: Callable[[str], dict], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Site]]:
    """Build a Site for a backend (posix by default); PAI_* variables cannot leak in."""
    for name in list(os.environ):
        if name.startswith("PAI_"):
            monkeypatch.delenv(name)
    sites: list[Site] = []

    def build(backend: str = "posix") -> Site:
        root = tmp_path / f"site{len(sites)}"
        root.mkdir()
        sites.append(Site(root, backend, prepare_backend(backend), capsys))
        return sites[-1]

    yield build
    for site in sites:
        site.close()


@pytest.fixture(params=["posix", "sideband", "tape"])
def any_site(request: pytest.FixtureRequest, make_site: Callable[..., Site]) -> Site:
    """A Site for each registered backend."""
    # memory keeps its files in the serving process: an audit run as another process cannot see them.
    assert sorted(set(registry.REGISTRY) - {"memory"}) == ["posix", "sideband", "tape"], (
        "a new backend needs its audit case here"
    )
    return make_site(request.param)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the inventory ------------------------------------------------------------------


def test_put_patch_and_delete_keep_the_inventory_current(make_site: Callable[..., Site]):
    site = make_site()
    first = site.put(1001)
    before = time.time()
    newer = site.put(1002, b"version one")
    newer = site.put(1002, b"version two, longer")  # an overwrite replaces the row
    source = site.incoming / "moved.dat"
    source.write_bytes(b"moved in by PATCH")
    os.utime(source, (1_000_000_000, 1_000_000_000))
    response = site.app.request(
        "/1003",
        method="PATCH",
        body=json.dumps({"path": str(source)}).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_int == 200
    site.put(1004)
    site.delete(1004)

    assert site.rows() == {
        1001: (len(first), sha256_hex(first), PRESENT),
        1002: (len(newer), sha256_hex(newer), PRESENT),
        1003: (17, sha256_hex(b"moved in by PATCH"), PRESENT),
    }
    catalog = site.catalog()
    try:
        entry = catalog.entry(1002)
        assert entry is not None and entry.mtime == LAST_MODIFIED_EPOCH
        assert before <= entry.stored_at <= time.time()
        patched = catalog.entry(1003)
        assert patched is not None and patched.mtime == 1_000_000_000
        assert catalog.operations() == []  # every operation ended its marker
    finally:
        catalog.close()


def test_refused_and_failed_uploads_record_nothing_and_leave_no_marker(make_site: Callable[..., Site]):
    site = make_site()
    site.configure(write_once="true")
    site.put(2001)
    wrong = "sha-256=:" + "A" * 43 + "=:"
    response = site.app.put(
        "/2002", b"data", headers={"Last-Modified": LAST_MODIFIED, "Repr-Digest": wrong}, expect_errors=True
    )
    assert response.status_int == 422
    response = site.app.put("/2001", b"again", headers={"Last-Modified": LAST_MODIFIED}, expect_errors=True)
    assert response.status_int == 409
    assert site.app.delete("/2003", expect_errors=True).status_int == 404
    assert list(site.rows()) == [2001]
    catalog = site.catalog()
    try:
        assert catalog.operations() == []
    finally:
        catalog.close()


def closed_port() -> int:
    """Return a loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_put_while_the_catalog_is_down_is_503_and_stores_nothing(
    make_site: Callable[..., Site], capsys: Any
):
    pytest.importorskip("psycopg")
    site = make_site()
    site.configure(catalog=f"postgresql://nobody@127.0.0.1:{closed_port()}/none?connect_timeout=5")
    response = site.app.put("/3001", b"data", headers={"Last-Modified": LAST_MODIFIED}, expect_errors=True)
    assert response.status_int == 503
    body = json.loads(response.body)
    assert body["status"] == 503 and "catalog database is unavailable" in body["message"]
    assert "nobody" not in body["message"]  # the database's address stays in the server log
    assert "nobody@127.0.0.1" in capsys.readouterr().err
    assert not site.path(3001).exists()
    assert [p for p in site.prefix.rglob("*") if p.is_file()] == []  # no temp file either


def test_an_upload_the_catalog_fails_to_record_succeeds_and_the_audit_finds_it(
    make_site: Callable[..., Site],
):
    site = make_site()
    site.put(4001)
    catalog = site.catalog()
    writer = site.backend.open_writer(4002, LAST_MODIFIED_EPOCH)  # no marker: the temp file is one
    writer.write(b"stored while the catalog broke")
    # The table goes away under the gateway (a real database error, not a mock)...
    catalog.db.execute_sql("ALTER TABLE inventory RENAME TO inventory_away")
    try:
        assert writer.commit() == 30  # ...the upload still succeeds: its bytes are durable
        writer.discard()
    finally:
        catalog.db.execute_sql("ALTER TABLE inventory_away RENAME TO inventory")
        catalog.close()
    assert site.path(4002).read_bytes() == b"stored while the catalog broke"
    assert list(site.rows()) == [4001]

    # Its sha-256 xattr says the file is ours: an unrecorded upload, which --fix records.
    result = site.audit("report", *JUDGE_ALL)
    assert (result.status, result.orphan, result.summary["orphan"]["unrecorded_uploads"]) == (1, [4002], 1)
    assert site.path(4002).exists() and 4002 not in site.rows()  # a report changes nothing
    result = site.audit("late", *JUDGE_ALL, "--fix")
    assert result.status == 1
    assert result.orphan == [4002]
    assert result.summary["orphan"]["unrecorded_uploads"] == 1
    assert [(a["action"], a["result"]) for a in result.summary["fix"]["actions"]] == [("record", "recorded")]
    assert site.rows()[4002] == (30, sha256_hex(b"stored while the catalog broke"), PRESENT)
    assert site.path(4002).exists()  # recorded, not quarantined
    assert site.audit("after", *JUDGE_ALL).summary["verdict"] == "ok"


# -- the audit ----------------------------------------------------------------------


def test_the_audit_reports_exactly_the_files_lost_and_planted_behind_the_gateways_back(any_site: Site):
    site = any_site
    ids = [5000 + 37 * n for n in range(20)]
    stored = {file_id: site.put(file_id) for file_id in ids}
    site.delete(ids[0])  # deleted through the gateway: not missing
    site.delete(ids[1])
    offline = ids[2]
    if site.backend_name in ("tape", "sideband"):
        # Only on tape is still in the archive: the tape catalog lists it. (The files unlinked below
        # have no tape copy: a DUAL file whose disk copy goes is OFFLINE, not missing.)
        assert site.cli("migrate", str(offline)) == 0
        assert site.cli("release", str(offline)) == 0
        assert not site.path(offline).exists()
    gone = [ids[5], ids[11], ids[17]]
    for file_id in gone:
        site.path(file_id).unlink()
    planted = {123456: b"restored from an old backup", 99: b"a stray tool wrote this"}
    for file_id, data in planted.items():
        site.plant(file_id, data)
    # Not archive files: a hidden temp file and a name no id maps to.
    (site.prefix / ".something.part").write_bytes(b"temp")
    (site.path(ids[3]).parent / "notes.txt").write_bytes(b"junk")

    result = site.audit("nightly", *JUDGE_ALL)

    assert result.status == 1, result.err
    assert result.missing == sorted(gone)
    assert result.orphan == sorted(planted)
    summary = result.summary
    assert summary["verdict"] == "drift"
    assert summary["backend"] == site.backend_name
    assert summary["inventory"]["before"] == summary["inventory"]["after"] == 18
    assert summary["storage"]["listed"] == 18 - 3 + 2
    assert summary["missing"]["bytes"] == sum(len(stored[i]) for i in gone)
    assert summary["orphan"]["bytes"] == sum(map(len, planted.values()))
    assert summary["storage"]["errors"] == []
    assert set(summary["durations"]) >= {"inventory_before", "listing", "inventory_after", "compare", "total"}
    assert "verdict: drift" in result.out
    # Reporting changed nothing.
    assert all(site.path(file_id).read_bytes() == data for file_id, data in planted.items())
    assert all(state == PRESENT for _, _, state in site.rows().values())
    assert not (site.prefix / ".quarantine").exists()


def test_the_latest_audit_of_each_name_is_in_the_metrics(make_site: Callable[..., Site]):
    site = make_site()
    for file_id in (8001, 8002, 8003):
        site.put(file_id)
    assert site.audit("clean", *JUDGE_ALL).status == 0
    site.path(8002).unlink()
    site.plant(8100, b"orphan")
    assert site.audit("nightly", *JUDGE_ALL).status == 1  # drift
    scrape = site.app.get("/metrics").text
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
             if line.startswith("pacifica_like_audit_last")}  # fmt: skip
    assert lines['pacifica_like_audit_last_ok{audit="clean"}'] == 1.0
    assert lines['pacifica_like_audit_last_missing_files{audit="clean"}'] == 0.0
    assert lines['pacifica_like_audit_last_ok{audit="nightly"}'] == 0.0
    assert lines['pacifica_like_audit_last_missing_files{audit="nightly"}'] == 1.0
    assert lines['pacifica_like_audit_last_orphan_files{audit="nightly"}'] == 1.0
    assert lines['pacifica_like_audit_last_listed_files{audit="nightly"}'] == 3.0
    assert lines['pacifica_like_audit_last_finished_timestamp_seconds{audit="nightly"}'] <= time.time()


def test_young_files_are_left_out(make_site: Callable[..., Site]):
    site = make_site()
    for file_id in (6001, 6002, 6003):
        site.put(file_id)
    site.path(6001).unlink()
    site.plant(70000, b"new orphan")

    result = site.audit("default-age", "--max-orphan-fraction", "1")  # --ignore-age defaults to a day
    assert (result.status, result.missing, result.orphan) == (0, [], [])
    assert result.summary["verdict"] == "ok"
    assert result.summary["ignored"]["young"] == 2
    assert result.summary["settings"]["ignore_age"] == DAY

    # The same archive, judged two days later.
    settings = site.settings()
    backend = registry.create(settings)
    catalog = GatewayCatalog(settings.archive.catalog)
    try:
        options = audit.AuditOptions("later", max_orphan_fraction=1.0)
        later = audit.run_audit(
            backend, audit.CatalogInventory(catalog), options, clock=lambda: time.time() + 2 * DAY
        )
    finally:
        backend.close()
        catalog.close()
    assert [m.file_id for m in later.missing] == [6001]
    assert [o.file_id for o in later.orphans] == [70000]
    assert later.ignored["young"] == 0


class ListingWithTraffic:
    """The real backend, with uploads and deletions arriving while its listing runs."""

    def __init__(self, inner: Any, traffic: Callable[[], None]) -> None:
        self.inner = inner
        self.traffic = traffic

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list_ids(self, on_error: Any = None) -> Iterator[int]:
        listed = list(self.inner.list_ids(on_error=on_error))
        self.traffic()  # after the walk passed every directory, before it reports the last id
        yield from listed


def test_files_stored_and_deleted_during_the_listing_are_not_drift(make_site: Callable[..., Site]):
    site = make_site()
    for file_id in (16001, 16002, 16003):
        site.put(file_id)
    site.path(16003).unlink()  # lost: its row is in both snapshots, its file in neither listing

    def traffic() -> None:
        site.put(16100)  # stored after the walk passed: not listed, but only in the second snapshot
        site.delete(16001)  # listed, then deleted: only in the first snapshot
        site.put(16003, b"stored again")  # its row now describes another version

    settings = site.settings()
    backend = registry.create(settings)
    catalog = GatewayCatalog(settings.archive.catalog)
    try:
        options = audit.AuditOptions("live", ignore_age=0, max_orphan_fraction=1.0)
        report = audit.run_audit(
            ListingWithTraffic(backend, traffic), audit.CatalogInventory(catalog), options
        )
    finally:
        backend.close()
        catalog.close()
    assert (report.verdict, report.missing, report.orphans) == ("ok", [], [])
    assert (report.inventory_before, report.listed, report.inventory_after) == (3, 2, 3)
    assert report.ignored["changed_during_audit"] == 1  # 16003: gone, then replaced


def test_operations_in_flight_are_left_out_and_abandoned_ones_are_reported(make_site: Callable[..., Site]):
    site = make_site()
    for file_id in (7001, 7002, 7003):
        site.put(file_id)
    catalog = site.catalog()
    # A DELETE under way: its marker is written and the file is gone, the row not yet removed.
    catalog.begin(7002, "DELETE")
    site.path(7002).unlink()
    # An upload under way: published, not yet recorded. It writes no marker: its sha-256 xattr
    # tells the audit it is ours (with the default --ignore-age it is too young to be judged).
    writer = site.backend.open_writer(7004, LAST_MODIFIED_EPOCH)
    writer.write(b"in flight")
    writer.publish()
    try:
        result = site.audit("busy", *JUDGE_ALL)
        assert (result.status, result.missing, result.orphan) == (1, [], [7004])
        assert result.summary["ignored"]["in_flight"] == 1
        assert result.summary["orphan"]["unrecorded_uploads"] == 1
        assert site.audit("busy-default", "--max-orphan-fraction", "1").summary["verdict"] == "ok"

        result = site.audit("stuck", *JUDGE_ALL, "--inflight-timeout", "0", "--fix")
        assert (result.status, result.missing, result.orphan) == (1, [7002], [7004])
        summary = result.summary
        assert summary["missing"]["unrecorded_deletes"] == summary["orphan"]["unrecorded_uploads"] == 1
        assert {op["file"]: op["verb"] for op in summary["abandoned_operations"]} == {7002: "DELETE"}
        outcome = {a["file"]: (a["action"], a["result"]) for a in summary["fix"]["actions"]}
        assert outcome == {7002: ("forget", "removed from the inventory"), 7004: ("record", "recorded")}
        assert site.rows() == {
            7001: (len(payload(7001)), sha256_hex(payload(7001)), PRESENT),
            7003: (len(payload(7003)), sha256_hex(payload(7003)), PRESENT),
            7004: (9, sha256_hex(b"in flight"), PRESENT),
        }
        assert catalog.operations() == []
    finally:
        writer.discard()
        catalog.close()
    assert site.audit("settled", *JUDGE_ALL).summary["verdict"] == "ok"


def test_an_inventory_file_with_garbage_lines_is_refused_naming_them(make_site: Callable[..., Site]):
    site = make_site()
    site.put(8001)
    inventory = site.root / "ids.txt"
    inventory.write_bytes(
        b"# exported from the site database\n8001\n\n12x\n8002\n-5\n0012\n\xff\xfe\n 8003 \n"
    )

    result = site.audit("ext", "--inventory", str(inventory), *JUDGE_ALL)

    assert result.status == 2
    assert "line 4: '12x'" in result.err and "line 6: '-5'" in result.err and "line 7: '0012'" in result.err
    assert "line 8:" in result.err and "4 line(s) are not file ids" in result.err
    assert "nothing was audited" in result.err
    assert list(site.reports.iterdir()) == []  # refused before writing anything


def test_an_inventory_file_replaces_the_catalog(make_site: Callable[..., Site]):
    site = make_site()
    for file_id in (8101, 8102, 8103):
        site.put(file_id)
    inventory = site.root / "ids.txt"
    inventory.write_text("8101\n8102\n8102\n8199\n")  # 8199: in the list, never stored

    result = site.audit("ext", "--inventory", str(inventory), *JUDGE_ALL, "--fix", "--dry-run")

    assert (result.status, result.missing, result.orphan) == (1, [8199], [8103])
    assert result.summary["inventory"]["source"] == "file"
    assert result.summary["inventory"]["duplicates"] == 1
    assert result.summary["missing"]["bytes"] is None  # an id list has no sizes
    plan = {a["file"]: a["action"] for a in result.summary["fix"]["actions"]}
    assert plan == {8103: "quarantine", 8199: "skip"}  # no catalog to mark LOST in
    assert site.path(8103).exists()


@contextlib.contextmanager
def unreadable(directory: Path) -> Iterator[None]:
    directory.chmod(0)
    try:
        yield
    finally:
        directory.chmod(0o755)


def run_without_dac_override(site: Site, name: str, *argv: str) -> Result:
    """Run the audit CLI in a subprocess that file permissions bind, even as root.

    Root bypasses a directory's mode bits; dropping CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the bounding set (setpriv) gives the child a real EACCES.
    """
    command = [sys.executable, "-m", "pacifica_like", "audit", "--name", name, *argv, "-c", str(site.ini)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a directory unreadable")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAI_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(command, cwd=site.reports, env=env, capture_output=True, text=True, timeout=120)
    return site.result(name, done.returncode, done.stdout, done.stderr)


def test_an_unreadable_directory_makes_the_audit_incomplete_and_nothing_is_touched(any_site: Site):
    site = any_site
    ids = [9000 + n for n in range(1, 13)]  # lowest bytes 0x29-0x34: a directory each
    for file_id in ids:
        site.put(file_id)
    site.path(ids[0]).unlink()  # real drift the fix would act on...
    orphan = site.plant(0x3139, b"orphan")  # ...in directory 39/
    blocked = site.path(ids[4]).parent

    with unreadable(blocked):
        result = run_without_dac_override(site, "blocked", *JUDGE_ALL, "--fix")

    assert result.status == 1, result.err
    summary = result.summary
    assert summary["verdict"] == "incomplete"
    assert summary["storage"]["errors"], summary
    assert str(blocked) in json.dumps(summary["storage"]["errors"])
    assert "permission denied" in json.dumps(summary["storage"]["errors"]).lower()
    assert summary["missing"]["count"] is None and result.missing == []  # not judged
    if site.backend_name == "posix":
        # The walk reports the directory and goes on: the orphan in another directory is still found.
        assert [e["where"] for e in summary["storage"]["errors"]] == [str(blocked)]
        assert result.orphan == [0x3139]
    assert summary["fix"]["refused"] == "verdict is incomplete"
    assert "verdict: incomplete" in result.out
    # No action: the orphan is in place, no file is LOST, nothing was quarantined.
    assert orphan.read_bytes() == b"orphan"
    assert all(state == PRESENT for _, _, state in site.rows().values())
    assert not (site.prefix / ".quarantine").exists()


def test_an_unavailable_catalog_is_a_clear_error(make_site: Callable[..., Site]):
    pytest.importorskip("psycopg")
    site = make_site()
    site.put(10001)
    url = f"postgresql://nobody@127.0.0.1:{closed_port()}/none?connect_timeout=5"
    site.configure(catalog=url)
    result = site.audit("down", *JUDGE_ALL)
    assert result.status == 2
    assert f"catalog database postgresql://nobody@127.0.0.1:{url.split(':')[2]}" in result.err
    assert "nothing was audited" in result.err
    assert list(site.reports.iterdir()) == []

    # A catalog URL that names no existing catalog is refused, not created empty.
    wrong = site.root / "typo" / "catalog.sqlite"
    site.configure(catalog=f"sqlite:///{wrong}")
    result = site.audit("typo", *JUDGE_ALL)
    assert result.status == 2 and "no such file" in result.err
    assert not wrong.parent.exists()

    site.configure(catalog="off")
    result = site.audit("off", *JUDGE_ALL)
    assert result.status == 2 and "pass --inventory FILE" in result.err


def test_thresholds_exceeded_act_on_nothing(make_site: Callable[..., Site]):
    site = make_site()
    ids = list(range(11001, 11021))
    for file_id in ids:
        site.put(file_id)
    for file_id in ids[:3]:
        site.path(file_id).unlink()
    site.plant(11500, b"orphan one")
    site.plant(11501, b"orphan two")

    # 2 orphans among 19 files listed: above the default 5%.
    result = site.audit("guard", "--ignore-age", "0", "--fix")
    assert result.status == 1
    assert result.summary["verdict"] == "thresholds exceeded"
    assert result.summary["thresholds"]["max_orphan_fraction"] == audit.DEFAULT_MAX_ORPHAN_FRACTION
    assert "--max-orphan-fraction" in result.summary["thresholds"]["exceeded"][0]
    assert result.summary["fix"]["refused"] == "verdict is thresholds exceeded"
    assert (result.missing, result.orphan) == (ids[:3], [11500, 11501])  # still reported

    result = site.audit(
        "guard2", "--ignore-age", "0", "--max-orphan-fraction", "0.2", "--max-missing", "2", "--fix"
    )
    assert result.summary["verdict"] == "thresholds exceeded"
    assert result.summary["thresholds"]["exceeded"] == ["3 missing files is more than --max-missing 2"]
    assert "threshold exceeded: 3 missing files" in result.out

    assert site.path(11500).read_bytes() == b"orphan one"
    assert all(state == PRESENT for _, _, state in site.rows().values())
    assert not (site.prefix / ".quarantine").exists()


def test_fix_after_a_dry_run_quarantines_orphans_and_marks_missing_lost(any_site: Site):
    site = any_site
    ids = [12000 + 3 * n for n in range(12)]
    for file_id in ids:
        site.put(file_id)
    missing = [ids[2], ids[7]]
    for file_id in missing:
        site.path(file_id).unlink()
    orphans = {0x4D2: b"an orphan", 0x12345: b"another orphan, three levels deep"}
    for file_id, data in orphans.items():
        site.plant(file_id, data)
    rows_before = site.rows()

    plan = site.audit("fix", *JUDGE_ALL, "--fix", "--dry-run")
    assert plan.status == 1
    quarantine = site.prefix / ".quarantine" / "fix"
    assert {(a["file"], a["action"]) for a in plan.summary["fix"]["actions"]} == {
        (0x4D2, "quarantine"),
        (0x12345, "quarantine"),
        (ids[2], "mark_lost"),
        (ids[7], "mark_lost"),
    }
    assert f"would quarantine file {0x12345}: 45/23/12345 -> {quarantine}/45/23/12345\n" in plan.out
    assert f"would mark LOST file {ids[2]}: gone from storage\n" in plan.out
    assert "dry run: nothing was changed" in plan.out
    # The dry run changed nothing.
    assert site.rows() == rows_before
    assert all(site.path(file_id).read_bytes() == data for file_id, data in orphans.items())
    assert not quarantine.exists()

    done = site.audit("fix", *JUDGE_ALL, "--fix")
    assert (done.status, done.missing, done.orphan) == (1, sorted(missing), sorted(orphans))
    site.hsm_catches_up()  # the quarantine moved files on the HSM's filesystem
    results = {a["file"]: a["result"] for a in done.summary["fix"]["actions"]}
    assert done.summary["fix"]["counts"] == {"done": 4, "left alone": 0, "skipped": 0, "failed": 0}
    for file_id, data in orphans.items():
        kept = quarantine / id2filename(file_id)[1:]
        assert results[file_id] == f"moved to {kept}"
        assert kept.read_bytes() == data  # bytes preserved, relative path kept
        assert not site.path(file_id).exists()
        assert site.app.get(f"/{file_id}", expect_errors=True).status_int == 404
    assert read_sha256(str(quarantine / "d2" / "4d2")) is None  # planted without one; kept as it was
    rows = site.rows()
    assert {file_id for file_id, (_, _, state) in rows.items() if state == LOST} == set(missing)
    assert len(rows) == len(ids)

    # The next audit finds nothing new: LOST files are known, orphans are gone.
    again = site.audit("next", *JUDGE_ALL)
    assert (again.status, again.missing, again.orphan) == (0, [], [])
    assert again.summary["ignored"]["already_lost"] == 2

    # A LOST file that comes back (restored behind the gateway's back) is noticed and marked present.
    site.plant(ids[2], payload(ids[2]))
    back = site.audit("back", *JUDGE_ALL, "--fix")
    assert back.summary["reappeared"] == [ids[2]]
    assert [(a["action"], a["result"]) for a in back.summary["fix"]["actions"]] == [
        ("mark_present", "marked present")
    ]
    assert site.rows()[ids[2]][2] == PRESENT
    # A new PUT of a LOST id makes it present too.
    site.put(ids[7])
    assert site.rows()[ids[7]][2] == PRESENT


def test_an_archive_filled_before_its_catalog_is_recorded_with_record_orphans(make_site: Callable[..., Site]):
    site = make_site()
    site.configure(catalog="off")
    stored = {file_id: site.put(file_id) for file_id in (17001, 17002, 17003)}
    site.configure()  # the default catalog from now on: it exists once something is recorded
    site.put(17004)
    stored[17004] = payload(17004)

    first = site.audit("seed", "--ignore-age", "0", "--fix")
    assert first.summary["verdict"] == "thresholds exceeded"  # 3 of 4 files unknown: nothing done
    assert list(site.rows()) == [17004]

    seeded = site.audit(
        "seed", "--ignore-age", "0", "--max-orphan-fraction", "1", "--fix", "--record-orphans"
    )
    assert seeded.orphan == [17001, 17002, 17003]
    assert {a["action"] for a in seeded.summary["fix"]["actions"]} == {"record"}
    assert site.rows() == {i: (len(d), sha256_hex(d), PRESENT) for i, d in stored.items()}
    assert all(site.path(file_id).exists() for file_id in stored)  # recorded where they are
    assert site.audit("after", "--ignore-age", "0").summary["verdict"] == "ok"


def test_quarantine_on_another_filesystem_copies_then_removes(make_site: Callable[..., Site], tmp_path: Path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    site = make_site()
    for file_id in range(13001, 13011):
        site.put(file_id)
    # Planted behind the gateway's back (no digest of ours), with an xattr of the site's.
    site.path(13011).parent.mkdir(parents=True, exist_ok=True)
    site.path(13011).write_bytes(b"planted orphan")
    os.setxattr(site.path(13011), "user.site.origin", b"restore job 7")
    quarantine = Path(shm) / f"quarantine-{uuid.uuid4().hex}"
    try:
        result = site.audit("shm", *JUDGE_ALL, "--fix", "--quarantine", str(quarantine))
        kept = quarantine / id2filename(13011)[1:]
        assert result.summary["fix"]["actions"][0]["result"] == f"moved to {kept}"
        assert kept.read_bytes() == b"planted orphan"
        assert os.getxattr(kept, "user.site.origin") == b"restore job 7"  # xattrs copied
        assert not site.path(13011).exists()
        assert not [
            p for p in site.path(13011).parent.iterdir() if p.name.startswith(".")
        ]  # nothing set aside
    finally:
        shutil.rmtree(quarantine, ignore_errors=True)


def test_a_file_whose_size_or_digest_differs_from_its_row_is_a_mismatch(any_site: Site):
    """Compared by size and the digest xattr (never the bytes); --fix re-records stale rows, not damage."""
    site = any_site
    for file_id in (15001, 15002, 15003, 15004):
        site.put(file_id)
    catalog = site.catalog()
    try:
        inventory = catalog.Inventory
        # 15001: its row says another digest (as a lost race between two uploads would leave it).
        inventory.update(sha256="ab" * 32).where(inventory.file_id == 15001).execute()
        # 15003: its row says another size, the digests agree: the bytes changed after ingest.
        inventory.update(size=1).where(inventory.file_id == 15003).execute()
    finally:
        catalog.close()
    # 15002: the file on disk records another digest (replaced behind the gateway's back).
    os.setxattr(site.path(15002), SHA256_XATTR, b"\x01" * 32)
    result = site.audit("mm", *JUDGE_ALL)
    assert result.status == 1
    assert result.summary is not None
    assert result.summary["verdict"] == "drift"
    assert result.summary["mismatch"] == {
        "count": 3,
        "size_differs": 1,
        "digest_differs": 2,
        "file": "mm_mismatch.txt",
    }
    assert (site.reports / "mm_mismatch.txt").read_text() == "15001\n15002\n15003\n"
    assert (result.missing, result.orphan) == ([], [])
    assert "mismatch 3 (1 size, 2 digest)" in result.out

    fixed = site.audit("mm", *JUDGE_ALL, "--fix")
    assert fixed.summary is not None
    results = {a["file"]: (a["action"], a["result"]) for a in fixed.summary["fix"]["actions"]}
    assert results == {
        15001: ("rerecord", "re-recorded"),
        15002: ("rerecord", "re-recorded"),
        15003: ("skip", "skipped"),
    }
    rows = site.rows()
    assert rows[15001][1] == sha256_hex(payload(15001))
    assert rows[15002][1] == "01" * 32  # what the file on disk now records
    again = site.audit("mm2", *JUDGE_ALL)
    assert again.summary is not None
    assert (site.reports / "mm2_mismatch.txt").read_text() == "15003\n"


def test_report_files_json_output_and_progress(make_site: Callable[..., Site]):
    site = make_site()
    site.put(14001)
    site.plant(14002, b"x")
    result = site.audit("json", *JUDGE_ALL, "--json", "--progress", "always")
    assert result.status == 1
    assert json.loads(result.out) == result.summary
    assert "listing storage" in result.err  # the progress bar went to stderr
    assert sorted(p.name for p in site.reports.iterdir()) == [
        "json_leftover.txt",
        "json_mismatch.txt",
        "json_missing.txt",
        "json_orphan.txt",
        "json_summary.json",
    ]
    assert (site.reports / "json_orphan.txt").read_text() == "14002\n"
    assert (site.reports / "json_missing.txt").read_text() == ""
    with pytest.raises(SystemExit):
        main(["audit", "--name", "../escape", "-c", str(site.ini)])


# -- configuration ------------------------------------------------------------------


def test_catalog_setting_defaults_to_sqlite_under_the_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(flags={"archive": {"prefix": "data"}}, env={})
    assert settings.archive.catalog == f"sqlite:///{tmp_path}/data/.catalog.sqlite"
    assert load_settings(env={"PAI_CATALOG": "off"}).archive.catalog is None
    assert (
        load_settings(env={"PAI_CATALOG": "sqlite:///rel/c.db"}).archive.catalog
        == f"sqlite:///{tmp_path}/rel/c.db"
    )
    with pytest.raises(ConfigError, match=r"environment variable PAI_CATALOG: expected a database URL"):
        load_settings(env={"PAI_CATALOG": "oracle://gw:secret@db/archive"})


def test_check_config_hides_the_catalog_password(tmp_path: Path, capsys: Any):
    ini = tmp_path / "a.ini"
    ini.write_text(f"[archive]\nprefix = {tmp_path}\ncatalog = mysql://gw:s3cret@db.example/archive\n")
    assert main(["check-config", "-c", str(ini)]) == 0
    out = capsys.readouterr().out
    assert "[archive] catalog = mysql://gw:***@db.example/archive" in out
    assert "s3cret" not in out


# -- real database servers ----------------------------------------------------------


@pytest.fixture
def server_catalog(request: pytest.FixtureRequest) -> Iterator[str]:
    """A catalog URL on a real server, in a schema/database of this test's own, dropped afterwards."""
    with scratch_database(request.param, "pl_audit") as url:
        yield url


@pytest.mark.parametrize("server_catalog", ["mysql", "postgresql"], indirect=True)
def test_the_inventory_and_the_audit_on_a_database_server(
    make_site: Callable[..., Site], server_catalog: str
):
    site = make_site()
    site.configure(catalog=server_catalog)
    ids = list(range(15001, 15011))
    stored = {file_id: site.put(file_id) for file_id in ids}
    site.put(ids[0], b"replaced")
    stored[ids[0]] = b"replaced"
    site.delete(ids[1])
    del stored[ids[1]]
    assert site.rows() == {i: (len(d), sha256_hex(d), PRESENT) for i, d in stored.items()}
    catalog = site.catalog()
    try:
        entry = catalog.entry(ids[2])
        assert entry is not None and entry.mtime == LAST_MODIFIED_EPOCH
        # A DOUBLE, not a 4-byte REAL: two stores a second apart stay apart.
        assert abs(entry.stored_at - time.time()) < 60 and entry.stored_at != round(entry.stored_at, -3)
    finally:
        catalog.close()

    site.path(ids[3]).unlink()
    site.plant(15999, b"orphan")
    result = site.audit("server", *JUDGE_ALL, "--fix")
    assert (result.status, result.missing, result.orphan) == (1, [ids[3]], [15999])
    assert site.rows()[ids[3]][2] == LOST
    assert (site.prefix / ".quarantine" / "server" / id2filename(15999)[1:]).read_bytes() == b"orphan"


def test_catalog_methods_are_translated_once():
    """record_audit was wrapped twice: two nested retry loops, the outer one's message never used."""
    for name, member in vars(GatewayCatalog).items():
        inner = getattr(member, "__wrapped__", None)
        if inner is not None:
            assert not hasattr(inner, "__wrapped__"), name
    assert GatewayCatalog.record_audit.__wrapped__.__name__ == "record_audit"


def test_check_ready_turns_every_database_error_into_storage_unavailable(tmp_path: Path):
    """A catalog that cannot be opened is a StorageUnavailable naming the write, not a raw driver error."""
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-file").write_bytes(b"")
    for where in (tmp_path / "a-directory", tmp_path / "a-file" / "catalog.db"):
        with pytest.raises(StorageUnavailable, match="cannot take a write"):
            GatewayCatalog(f"sqlite:///{where}").check_ready()


def test_drop_tables_drops_the_audit_table_too(tmp_path: Path):
    catalog = GatewayCatalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.record_audit("nightly", "clean", 0, 0, 3)
    assert "audit_run" in catalog.db.get_tables()
    catalog.drop_tables()
    assert catalog.db.get_tables() == []
    catalog.close()


def test_check_ready_on_a_locked_catalog_without_tables_is_storage_unavailable(tmp_path: Path):
    """Creating the schema while another connection holds SQLite's write lock: a 503's error, not _Busy."""
    path = tmp_path / "catalog.db"
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("CREATE TABLE unrelated (a)")
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StorageUnavailable, match="cannot take a write: the database is locked"):
            GatewayCatalog(f"sqlite:///{path}").check_ready()
    finally:
        holder.close()
