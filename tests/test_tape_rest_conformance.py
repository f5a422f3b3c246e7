"""The WLCG Tape REST API v1 reference document, point by point, over HTTP (WebTest, the real app).

Each test names the spec's words it checks. gfal2 2.21 tolerated what these
fixed; stricter clients and FTS may not (issue 14's conformance list).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from bulk_helpers import http, make_settings, poll, scheduler, states, store_offline, submit

from pacifica_like.bulk.store import BulkStore
from pacifica_like.storage import registry

TIMEOUT = 60


@pytest.fixture
def archive(tmp_path: Path, prepare_backend):
    """(settings, backend, app) of a tape archive: files 1 and 2 offline, 3 on disk only."""
    built = []

    def build(bulk: dict | None = None, **sections: dict):
        settings = make_settings(tmp_path, "tape", prepare_backend, bulk, **sections)
        backend = registry.create(settings)
        built.append(backend)
        store_offline(backend, {1: 100, 2: 200})
        with backend.open_writer(3, 784111777.0) as writer:
            writer.write(b"disk only")
            writer.commit()
        return settings, backend, http(settings, backend)

    yield build
    for backend in built:
        backend.close()


def pins_of(settings, file_id: int) -> float | None:
    store = BulkStore.open(settings.archive.catalog)
    try:
        return store.pins([file_id]).get(file_id)
    finally:
        store.close()


def test_archiveinfo_gives_an_error_not_a_locality_for_a_file_that_does_not_exist(archive):
    """'If a provided file does not exist, the locality MUST NOT be returned'; NONE is an empty file."""
    _, _, app = archive()
    answer = app.post_json("/api/v1/archiveinfo", {"paths": ["/1", "/3", "/424242"]}).json
    assert answer[:2] == [{"path": "/1", "locality": "TAPE"}, {"path": "/3", "locality": "DISK"}]
    assert answer[2] == {"path": "/424242", "error": "no such file in the archive"}


def test_archiveinfo_past_the_file_limit_answers_the_first_paths_without_an_error(archive):
    """'If the client asks for too many files, the server MUST NOT return an error.'"""
    _, _, app = archive(bulk={"max_files_per_request": 3})
    answer = app.post_json("/api/v1/archiveinfo", {"paths": ["/3", "/1", "/2", "/4", "/5"]})
    assert answer.status_int == 200
    assert [a["path"] for a in answer.json] == ["/3", "/1", "/2"]


def test_polls_carry_state_never_ondisk_and_leave_out_times_that_do_not_exist(archive):
    """onDisk and state exclude each other; request startedAt is mandatory; file times only with state."""
    settings, backend, app = archive()
    request_id = submit(app, ["/1", "/3", "/424242"]).json["requestId"]
    first = poll(app, request_id)
    assert isinstance(first["createdAt"], int)
    assert isinstance(first["startedAt"], int) and first["startedAt"] >= first["createdAt"]
    assert "completedAt" not in first  # optional: absent, not null, while files are open
    assert states(first) == {"/1": "SUBMITTED", "/3": "COMPLETED", "/424242": "FAILED"}
    for entry in first["files"]:
        assert "onDisk" not in entry
        assert None not in entry.values(), entry
    submitted = next(f for f in first["files"] if f["path"] == "/1")
    assert set(submitted) == {"path", "state"}
    failed = next(f for f in first["files"] if f["path"] == "/424242")
    assert set(failed) == {"path", "state", "error", "startedAt", "finishedAt"}

    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    done = poll(app, request_id)
    assert isinstance(done["completedAt"], int) and done["completedAt"] >= done["startedAt"]
    assert states(done)["/1"] == "COMPLETED"
    # A released pin does not turn a COMPLETED file into one that looks offline forever.
    app.post_json(f"/api/v1/release/{request_id}", {"paths": ["/1", "/3"]})
    assert states(poll(app, request_id))["/1"] == "COMPLETED"
    assert all("onDisk" not in f for f in poll(app, request_id)["files"])


def test_the_python_client_reads_a_completed_file_as_on_disk_without_ondisk():
    from pacifica_like.client.models import StagedFile

    assert StagedFile.from_json({"path": "/1", "state": "COMPLETED"}).on_disk is True
    assert StagedFile.from_json({"path": "/1", "state": "SUBMITTED"}).on_disk is False
    only_on_disk = StagedFile.from_json({"path": "/1", "onDisk": True})
    assert only_on_disk.on_disk is True and only_on_disk.state == "COMPLETED"


def test_paths_are_sanitised_on_every_call(archive):
    """'The server MUST sanitise the path (removal of duplicate slashes...)': //3 is /3, everywhere."""
    _, _, app = archive()
    request_id = submit(app, ["//3", "///1", "/2"]).json["requestId"]
    assert states(poll(app, request_id)) == {"/3": "COMPLETED", "/1": "SUBMITTED", "/2": "SUBMITTED"}
    app.post_json(f"/api/v1/stage/{request_id}/cancel", {"paths": ["//1"]})
    assert states(poll(app, request_id))["/1"] == "CANCELLED"
    app.post_json(f"/api/v1/release/{request_id}", {"paths": ["//3"]})
    answer = app.post_json("/api/v1/archiveinfo", {"paths": ["//2", "/2"]}).json
    assert answer == [{"path": "/2", "locality": "TAPE"}]


def test_a_path_named_twice_is_staged_once_instead_of_failing_the_request(archive):
    """dCache and StoRM drop duplicates; refusing would fail every file of an FTS job."""
    _, _, app = archive()
    answer = submit(app, ["/1", "/2", "/1", "//2", "/3"])
    document = poll(app, answer.json["requestId"])
    assert [f["path"] for f in document["files"]] == ["/1", "/2", "/3"]
    assert document["summary"]["files"] == 3


@pytest.mark.parametrize("lifetime", ["forever", 9, "P1Y", ""])
def test_a_disk_lifetime_that_is_no_duration_gets_the_default_pin(archive, lifetime):
    """'The endpoint MAY ignore this field': ignored, the request goes through with the default pin."""
    settings, _, app = archive(bulk={"default_pin_seconds": 7200.0})
    before = time.time()
    body = {"files": [{"path": "/3", "diskLifetime": lifetime}]}
    assert app.post_json("/api/v1/stage", body).status_int == 201
    until = pins_of(settings, 3)
    assert until is not None and before + 7200 <= until <= time.time() + 7200


def test_the_default_pin_outlasts_a_day_of_fts_queueing():
    from pacifica_like.core.config import load_settings

    assert load_settings(flags={}, env={}).bulk.default_pin_seconds >= 86400


def test_a_release_naming_no_request_drops_only_the_callers_own_pins(archive):
    """gfal2 releases with ``gfal2-placeholder-id`` when it has no request id; dCache answers 200."""
    settings, _, app = archive()
    submit(app, ["/3"], **{"X-Client-Id": "alice"})
    bob = submit(app, ["/3"], **{"X-Client-Id": "bob"}).json["requestId"]
    alice = {"X-Client-Id": "alice"}
    released = app.post_json("/api/v1/release/gfal2-placeholder-id", {"paths": ["/3"]}, headers=alice)
    assert released.status_int == 200
    assert released.json == {"requestId": "gfal2-placeholder-id", "releasedPins": 1}
    assert pins_of(settings, 3) is not None  # bob's pin still holds the file
    again = app.post_json("/api/v1/release/gfal2-placeholder-id", {"paths": ["/3"]}, headers=alice)
    assert again.json["releasedPins"] == 0
    app.post_json(f"/api/v1/release/{bob}", {"paths": ["/3"]}, headers={"X-Client-Id": "bob"})
    assert pins_of(settings, 3) is None


def test_the_discovery_uri_is_the_public_url_behind_a_proxy(archive):
    """A TLS proxy's clients must be sent to the proxy, not to the address the request reached."""
    _, _, app = archive(server={"public_url": "https://tape.example.org:8443/gw/"})
    (endpoint,) = app.get("/.well-known/wlcg-tape-rest-api").json["endpoints"]
    assert endpoint["uri"] == "https://tape.example.org:8443/gw/api/v1"


def test_the_discovery_uri_is_the_request_address_without_a_public_url(archive):
    _, _, app = archive()
    (endpoint,) = app.get("/.well-known/wlcg-tape-rest-api").json["endpoints"]
    assert endpoint["uri"] == "http://localhost:80/api/v1"
