"""GET /metrics and GET /ready: counts through the real app, tape values from the catalog, uWSGI totals.

Scrapes are parsed with prometheus_client's own parser, so a test passes only
if a Prometheus server would read the same numbers.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import webtest
from conftest import LAST_MODIFIED, put
from prometheus_client.parser import text_string_to_metric_families
from test_storage_faults import tiny_filesystem

from pacifica_like import wsgi
from pacifica_like.core.config import ConfigError, load_settings
from pacifica_like.storage import registry as factory
from pacifica_like.storage.tape import operations
from pacifica_like.storage.tape.backend import TapeBackend
from pacifica_like.storage.tape.library import TapeLibrary
from pacifica_like.storage.tape.stager import HEADER_SIZE
from pacifica_like.web import devserver
from pacifica_like.web.app import build_app

TIMEOUT = 30
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((f"pacifica_like_{name}", frozenset(labels.items())), 0.0)


def scrape(app: webtest.TestApp) -> Samples:
    response = app.get("/metrics")
    assert response.status_int == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def digest_header(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


def test_requests_bytes_and_latency_are_counted_per_endpoint_method_and_status(app):
    body = os.urandom(5000)
    assert put(app, 10, body).status_int == 201
    for _ in range(3):
        assert app.get("/10").body == body
    app.get("/11", expect_errors=True)  # 404
    app.head("/10")
    app.get("/")
    samples = scrape(app)
    assert value(samples, "http_requests_total", endpoint="file", method="PUT", status="201") == 1
    assert value(samples, "http_requests_total", endpoint="file", method="GET", status="200") == 3
    assert value(samples, "http_requests_total", endpoint="file", method="GET", status="404") == 1
    assert value(samples, "http_requests_total", endpoint="file", method="HEAD", status="204") == 1
    assert value(samples, "http_requests_total", endpoint="root", method="GET", status="200") == 1
    assert value(samples, "http_received_bytes_total", endpoint="file", method="PUT") == 5000
    assert value(samples, "http_sent_bytes_total", endpoint="file", method="GET") == 3 * 5000 + len(
        app.get("/11", expect_errors=True).body
    )
    latency = {"endpoint": "file", "method": "GET"}
    assert value(samples, "http_request_duration_seconds_count", **latency) == 4
    assert value(samples, "http_request_duration_seconds_bucket", le="+Inf", **latency) == 4
    assert 0 < value(samples, "http_request_duration_seconds_sum", **latency) < 10
    # The scrape itself is counted once it is answered.
    assert value(scrape(app), "http_requests_total", endpoint="metrics", method="GET", status="200") == 1


def test_uploads_rejected_are_counted_by_reason(make_app, prefix: Path):
    app = make_app(write_once=True, require_last_modified=True)
    body = b"some bytes"
    assert put(app, 1, body).status_int == 201
    assert put(app, 1, body).status_int == 409  # write-once conflict
    assert put(app, 2, body, Repr_Digest=digest_header(b"other bytes")).status_int == 422
    short = app.put("/3", b"only ten b", headers={"Last-Modified": LAST_MODIFIED, "Content-Length": "100"},
                    expect_errors=True)  # fmt: skip
    assert short.status_int == 400
    assert app.put("/4", body, expect_errors=True).status_int == 400  # no Last-Modified, where required
    assert put(app, "x4", body).status_int == 400  # not an id
    patched = app.request("/5", method="PATCH", body=b"{}", headers={"Content-Type": "text/plain"},
                          expect_errors=True)  # fmt: skip
    assert patched.status_int == 415
    samples = scrape(app)
    expected = {
        ("PUT", "write_once_conflict"): 1,
        ("PUT", "digest_mismatch"): 1,
        ("PUT", "short_body"): 1,
        ("PUT", "bad_request"): 2,
        ("PATCH", "unsupported_media_type"): 1,
    }
    found = {
        (dict(labels)["method"], dict(labels)["reason"]): count
        for (name, labels), count in samples.items()
        if name == "pacifica_like_uploads_rejected_total"
    }
    assert found == expected
    # Bytes count as received when read: the stored upload, the mismatched and the short one.
    # Uploads refused up front (write-once, no Last-Modified, bad id) were never read.
    assert value(samples, "http_received_bytes_total", endpoint="file", method="PUT") == 3 * len(body)


def test_a_full_disk_is_counted_as_storage_full(make_app, tmp_path: Path):
    with tiny_filesystem(tmp_path / "small") as small:
        app = make_app(prefix=str(small))
        assert put(app, 1, os.urandom(2 << 20)).status_int == 507
        assert value(scrape(app), "uploads_rejected_total", method="PUT", reason="storage_full") == 1


def test_openmetrics_is_served_to_scrapers_that_ask_for_it(app):
    response = app.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_build_info_and_backend_source_are_reported(app):
    samples = scrape(app)
    assert value(samples, "build_info", backend="posix", version="0.1.0") == 1
    assert value(samples, "backend_metrics_up", source="backend") == 1


def test_a_failing_backend_source_still_answers_with_the_request_metrics(make_settings):
    settings = make_settings()
    backend = factory.create(settings)

    def broken() -> list:
        raise OSError("catalog went away")

    backend.metrics_snapshot = broken  # type: ignore[method-assign]
    app = webtest.TestApp(build_app(settings, backend))
    app.get("/")
    samples = scrape(app)
    assert value(samples, "backend_metrics_up", source="backend") == 0
    assert value(samples, "http_requests_total", endpoint="root", method="GET", status="200") == 1


def test_metrics_and_ready_take_only_get_and_head(app):
    response = app.post("/metrics", expect_errors=True)
    assert response.status_int == 405
    assert response.json["status"] == 405
    assert app.head("/ready").status_int == 200


# -- the tape backend: values read from the catalog at scrape time ----------------------------------------


@pytest.fixture
def tape_app(tmp_path: Path) -> Iterator[tuple[webtest.TestApp, TapeBackend]]:
    tape = {
        "library": str(tmp_path / "library"),
        "time_scale": 0.0,
        "volume_capacity": 64 << 20,
        "volumes": 3,
    }
    settings = load_settings(
        flags={"archive": {"backend": "tape", "prefix": str(tmp_path / "cache")}, "tape": tape}, env={}
    )
    library = TapeLibrary(settings.tape, require_stager=False)
    library.initialise()
    library.catalog.close()
    backend = factory.create(settings)
    assert isinstance(backend, TapeBackend)
    yield webtest.TestApp(build_app(settings, backend)), backend
    backend.close()


def test_tape_counters_fixity_and_recalls_come_from_the_catalog(tape_app):
    app, backend = tape_app
    for file_id in (1, 2, 3):
        assert put(app, file_id, os.urandom(1000 * file_id)).status_int == 201
    plan = operations.plan_migrate(backend, [1, 2, 3])
    assert not operations.run_migrate(backend, plan).failed
    assert not operations.run_release(backend, operations.plan_release(backend, [2])).failed
    assert app.post("/2").status_int == 200  # recalled from tape

    # Corrupt file 3's record and verify everything: one mismatch, two ok.
    copy = backend.catalog.current_copies(3)[0]
    with open(backend.library.volume_path(copy.vsn), "r+b") as volume:
        volume.seek(copy.offset + HEADER_SIZE + 10)
        byte = volume.read(1)
        volume.seek(-1, os.SEEK_CUR)
        volume.write(bytes([byte[0] ^ 0xFF]))
    operations.run_verify(backend, operations.plan_verify(backend, 1.0, "seed", 180))

    samples = scrape(app)
    totals = backend.library.counters()
    assert totals["mounts"] >= 1 and totals["bytes_written"] == 6000 and totals["bytes_read"] > 0
    for key, count in totals.items():
        assert value(samples, f"tape_{key}_total") == count
        drives = backend.library.drives()
        assert sum(value(samples, f"tape_drive_{key}_total", drive=d.name) for d in drives) == count
    assert value(samples, "tape_copies", verify_result="ok") == 2
    assert value(samples, "tape_copies", verify_result="mismatch") == 1
    assert value(samples, "tape_copies", verify_result="never") == 0
    assert value(samples, "tape_last_verify_timestamp_seconds") > 0
    assert value(samples, "tape_recalls_in_flight") == 0
    fills = {dict(labels)["vsn"]: v for (name, labels), v in samples.items()
             if name == "pacifica_like_tape_volume_used_bytes"}  # fmt: skip
    assert sum(fills.values()) == sum(row.fill for row in backend.catalog.Volume.select())
    assert len(fills) == 3

    # A recall in flight, as another live process would record it (our own pid is alive).
    backend.catalog.Recall.create(file_id=1, owner=backend.library.owner, vsn=copy.vsn, started_at=0.0)
    samples = scrape(app)
    assert value(samples, "tape_recalls_in_flight") == 1
    assert value(samples, "tape_volume_recalls_in_flight", vsn=copy.vsn) == 1
    # ... and one left by a process of this host that died: not in flight.
    host = backend.library.owner.split(":")[0]
    backend.catalog.Recall.update(owner=f"{host}:999999999:0:dead").execute()
    assert value(scrape(app), "tape_recalls_in_flight") == 0


# -- readiness ------------------------------------------------------------------------------------------


def test_ready_is_200_with_every_check_ok(app):
    response = app.get("/ready")
    assert response.status_int == 200
    assert response.json["status"] == "ready"
    assert response.json["backend"] == "posix"
    assert set(response.json["checks"].values()) == {"ok"}
    assert response.headers["Cache-Control"] == "no-store"


def test_ready_is_503_naming_a_removed_prefix(app, prefix: Path):
    app.get("/")
    shutil.rmtree(prefix)
    response = app.get("/ready", expect_errors=True)
    assert response.status_int == 503
    assert response.json["status"] == "not ready"
    assert "archive prefix" in response.json["reason"]
    assert "No such file" in response.json["checks"]["storage"]
    assert app.get("/").status_int == 200  # liveness is not readiness


def test_ready_is_503_when_the_prefix_is_not_a_writable_directory(app, prefix: Path):
    shutil.rmtree(prefix)
    prefix.write_bytes(b"a file where the archive should be")
    response = app.get("/ready", expect_errors=True)
    assert response.status_int == 503
    assert "not a directory" in response.json["checks"]["storage"]
    prefix.unlink()
    prefix.mkdir(mode=0o500)
    if os.geteuid() == 0:
        return  # root writes anywhere: the read-only mode cannot make it unready
    response = app.get("/ready", expect_errors=True)
    assert response.status_int == 503
    assert "not writable" in response.json["checks"]["storage"]


def test_ready_of_a_tape_archive_checks_the_library(tape_app):
    app, backend = tape_app
    assert app.get("/ready").json == {
        "status": "ready",
        "backend": "tape",
        "checks": {name: "ok" for name in app.get("/ready").json["checks"]},
    }
    catalog = Path(backend.catalog.path)
    saved = catalog.read_bytes()
    catalog.write_bytes(b"this is not a database" * 1000)  # unreadable catalog
    response = app.get("/ready", expect_errors=True)
    assert response.status_int == 503
    assert "tape library" in response.json["checks"]["storage"]
    catalog.write_bytes(saved)
    assert app.get("/ready").status_int == 200
    catalog.rename(catalog.with_suffix(".moved"))  # library directory without its catalog
    response = app.get("/ready", expect_errors=True)
    assert response.status_int == 503
    assert "not initialised" in response.json["checks"]["storage"]


# -- the uWSGI master's choice of metrics directory ------------------------------------------------------


def unset_multiproc_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset PROMETHEUS_MULTIPROC_DIR for the test; whatever the code under test sets is undone after."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "placeholder")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")


def test_the_master_clears_a_configured_directory_and_workers_do_not(tmp_path: Path, monkeypatch):
    unset_multiproc_dir(monkeypatch)
    directory = tmp_path / "metrics"
    settings = load_settings(flags={"archive": {"prefix": str(tmp_path / "a")}}, env={})
    settings = dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, metrics_dir=str(directory))
    )
    assert wsgi.prepare_metrics_dir(settings, in_master=True, processes=4) == str(directory)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(directory)
    (directory / "counter_123.db").write_bytes(b"old")
    (directory / "notes.txt").write_text("not ours")
    wsgi.prepare_metrics_dir(settings, in_master=False, processes=4)  # a --lazy-apps worker
    assert (directory / "counter_123.db").exists()
    wsgi.prepare_metrics_dir(settings, in_master=True, processes=4)
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]


def test_without_a_directory_lazy_apps_workers_refuse_and_the_master_makes_one(tmp_path: Path, monkeypatch):
    unset_multiproc_dir(monkeypatch)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    settings = load_settings(flags={"archive": {"prefix": str(tmp_path / "a")}}, env={})
    with pytest.raises(ConfigError, match="metrics_dir"):
        wsgi.prepare_metrics_dir(settings, in_master=False, processes=4)
    made = Path(wsgi.prepare_metrics_dir(settings, in_master=True, processes=4))
    assert made.parent == tmp_path and made.name.startswith(f"pacifica-like-metrics-{os.getpid()}-")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_a_new_master_sweeps_directories_of_stopped_servers_only(tmp_path: Path):
    script = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True, timeout=TIMEOUT)
    stopped = tmp_path / f"pacifica-like-metrics-{int(dead.stdout)}-abc"
    running = tmp_path / f"pacifica-like-metrics-{os.getpid()}-def"
    unrelated = tmp_path / "pacifica-like-metrics-notapid"
    for directory in (stopped, running, unrelated):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"x")
    made = Path(wsgi.make_metrics_dir(str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, unrelated.name, made.name])


# -- live: many uWSGI processes, one set of totals ------------------------------------------------------


def fetch_all(url: str, count: int, workers: int = 8) -> list[requests.Response]:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda _: requests.get(url, timeout=TIMEOUT), range(count)))


@pytest.mark.live
@pytest.mark.parametrize("configured", [True, False], ids=["metrics_dir", "temp_dir"])
def test_uwsgi_workers_add_up_to_exact_totals(tmp_path: Path, configured: bool):
    env = {"PAI_PREFIX": str(tmp_path / "archive")}
    metrics_dir = tmp_path / "metrics"
    if configured:
        # A previous run's file: the master must clear it, or its counts would be added in.
        metrics_dir.mkdir()
        shutil.copy(_stale_counter_file(tmp_path), metrics_dir / "counter_999999.db")
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    body = os.urandom(4096)
    # Workers are recycled every 80 requests: their successors must carry on their counts.
    recycle = ["--max-requests", "80", "--min-worker-lifetime", "0"]
    with devserver.uwsgi_server(env, processes=4, extra=recycle) as server:
        put_answer = requests.put(f"{server.url}/77", data=body, headers={"Last-Modified": LAST_MODIFIED},
                                  timeout=TIMEOUT)  # fmt: skip
        assert put_answer.status_code == 201
        count = 400
        answers = fetch_all(f"{server.url}/77", count)
        assert {(a.status_code, a.content == body) for a in answers} == {(200, True)}
        # A worker counts a request when it closes the response, which can be just after the client
        # has read the last byte: wait (briefly) until the last one is in, then every scrape must agree.
        deadline = time.monotonic() + 10
        while True:
            seen = value(parse(requests.get(f"{server.url}/metrics", timeout=TIMEOUT).text),
                         "http_requests_total", endpoint="file", method="GET", status="200")  # fmt: skip
            assert seen <= count, f"counted {seen} of {count} requests"
            if seen == count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # Every scrape, whichever worker answers it, reports the same totals.
        scrapes = [parse(a.text) for a in fetch_all(f"{server.url}/metrics", 8, workers=4)]
        for samples in scrapes:
            assert value(samples, "http_requests_total", endpoint="file", method="GET", status="200") == count
            assert value(samples, "http_sent_bytes_total", endpoint="file", method="GET") == count * len(body)
            assert (
                value(samples, "http_request_duration_seconds_count", endpoint="file", method="GET") == count
            )
            assert value(samples, "http_requests_total", endpoint="file", method="PUT", status="201") == 1
            assert value(samples, "http_received_bytes_total", endpoint="file", method="PUT") == len(body)
            assert value(samples, "backend_metrics_up", source="backend") == 1
        assert "Respawned uWSGI worker" in server.log()  # workers really were replaced meanwhile
        if configured:
            # One file per worker slot and type, however often workers were replaced.
            counters = sorted(p.name for p in metrics_dir.iterdir() if p.name.startswith("counter_"))
            assert "counter_999999.db" not in counters
            assert 2 <= len(counters) <= 4, counters
            assert set(counters) <= {f"counter_{n}.db" for n in range(1, 5)}, counters


def _stale_counter_file(tmp_path: Path) -> Path:
    """Make a multiprocess counter file holding 1000 GET 200s, as a crashed earlier server would leave."""
    staging = tmp_path / "stale"
    staging.mkdir()
    script = (
        "from prometheus_client import CollectorRegistry, Counter\n"
        "c = Counter('pacifica_like_http_requests', 'x', ['endpoint', 'method', 'status'],"
        " registry=CollectorRegistry())\n"
        "c.labels('file', 'GET', '200').inc(1000)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(staging)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=TIMEOUT)
    (made,) = staging.glob("counter_*.db")
    return made
