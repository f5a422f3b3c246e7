"""The bulk-staging API over HTTP (WebTest over the real app): requests, polls, cancel, release, info.

End-to-end tests run over every tape-backed backend in the registry; the
recalls are done by a real scheduler in the test's thread (``run_until_idle``),
and the library's counters say how the tape was used.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bulk_helpers import (
    content,
    http,
    make_settings,
    on_disk,
    poll,
    scheduler,
    states,
    store_offline,
    submit,
    tape_backed_names,
)
from conftest import corrupt

from pacifica_like.bulk.store import BulkStore
from pacifica_like.core.config import load_settings
from pacifica_like.storage import registry as factory

TIMEOUT = 60
TAPE_BACKED = tape_backed_names()


@pytest.fixture
def archive(tmp_path: Path, prepare_backend):
    """Build (settings, backend) for a backend name, bulk settings as given; closed at the end."""
    built = []

    def build(name: str = "tape", bulk: dict | None = None, **sections: dict):
        settings = make_settings(tmp_path, name, prepare_backend, bulk, **sections)
        backend = factory.create(settings)
        built.append(backend)
        return settings, backend

    yield build
    for backend in built:
        backend.close()


def problem(answer, status: int) -> dict:
    assert answer.status_int == status, answer.body
    assert answer.content_type == "application/problem+json"
    document = answer.json
    assert document["status"] == status and document["title"] and document["detail"]
    assert "Traceback" not in answer.text
    return document


# -- discovery -----------------------------------------------------------------------


def test_well_known_names_the_endpoint_and_our_limits(archive):
    settings, backend = archive(
        bulk={
            "max_files_per_request": 500,
            "max_in_flight_per_client": 900,
            "max_requests_per_client": 7,
            "retention_seconds": 86400.0,
        }
    )
    document = http(settings, backend).get("/.well-known/wlcg-tape-rest-api").json
    assert document["sitename"] == "pacifica_like"
    (endpoint,) = document["endpoints"]
    assert endpoint["uri"].endswith("/api/v1") and endpoint["version"] == "v1"
    assert endpoint["metadata"] == {
        "maxFilesPerRequest": 500,
        "maxInFlightPerClient": 900,
        "minPollSeconds": 1.0,
        "maxRequestsPerClient": 7,
        "requestRetentionSeconds": 86400.0,
    }


# -- end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("name", TAPE_BACKED)
def test_a_bulk_request_recalls_every_offline_file_in_tape_order(archive, name):
    settings, backend = archive(name)
    sizes = {file_id: 3000 + 17 * file_id for file_id in range(1, 19)}
    store_offline(backend, sizes, spread=3)
    with backend.open_writer(500, 784111777.0) as writer:
        writer.write(b"already here")
        writer.commit()
    app = http(settings, backend)
    before = backend.library.counters()
    paths = [f"/{i}" for i in sorted(sizes, reverse=True)] + ["/500", "/424242", "not-a-path"]
    answer = submit(app, paths)
    request_id = answer.json["requestId"]
    assert answer.headers["Location"] == f"/api/v1/stage/{request_id}"

    first = poll(app, request_id)
    assert [f["path"] for f in first["files"]] == paths  # request order
    assert states(first)["/500"] == "COMPLETED" and "onDisk" not in first["files"][-3]
    failed = {f["path"]: f["error"] for f in first["files"] if f["state"] == "FAILED"}
    assert set(failed) == {"/424242", "not-a-path"}
    assert "no such file" in failed["/424242"] and "/<id>" in failed["not-a-path"]
    assert first["summary"]["states"]["SUBMITTED"] == 18 and "completedAt" not in first
    assert first["summary"]["volumesTotal"] == 3 and first["summary"]["volumesDone"] == 0

    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    done = poll(app, request_id)
    assert all(states(done)[f"/{i}"] == "COMPLETED" for i in sizes)
    assert done["completedAt"] is not None and done["startedAt"] is not None
    summary = done["summary"]
    assert summary["states"] == {"SUBMITTED": 0, "STARTED": 0, "COMPLETED": 19, "FAILED": 2, "CANCELLED": 0}
    assert summary["bytesDone"] == summary["bytesTotal"] == sum(sizes.values())
    assert summary["volumesDone"] == 3 and summary["etaSeconds"] == 0
    for file_id, size in sizes.items():
        assert on_disk(backend, file_id) == content(file_id, size)
        assert app.get(f"/{file_id}").body == content(file_id, size)
    after = backend.library.counters()
    # Each file read once, each volume mounted at most once.
    assert after["bytes_read"] - before["bytes_read"] == sum(sizes.values())
    assert after["mounts"] - before["mounts"] <= 3


def test_pages_follow_the_cursor_and_filter_by_state(archive):
    settings, backend = archive()
    store_offline(backend, {1: 100, 2: 100})
    app = http(settings, backend)
    paths = ["/1", "/2"] + [f"/{9000 + i}" for i in range(23)]
    request_id = submit(app, paths).json["requestId"]
    seen, cursor = [], None
    while True:
        params = {"limit": 10} if cursor is None else {"limit": 10, "cursor": cursor}
        page = poll(app, request_id, **params)
        assert len(page["files"]) <= 10
        seen += [f["path"] for f in page["files"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == paths
    failed = poll(app, request_id, state="FAILED")
    assert [f["path"] for f in failed["files"]] == paths[2:]
    both = poll(app, request_id, state="SUBMITTED,FAILED", limit=5)
    assert len(both["files"]) == 5 and both["nextCursor"] is not None
    assert both["summary"]["states"]["FAILED"] == 23  # the summary covers the whole request
    problem(app.get(f"/api/v1/stage/{request_id}?state=DONE", expect_errors=True), 400)
    problem(app.get(f"/api/v1/stage/{request_id}?limit=0", expect_errors=True), 400)
    problem(app.get(f"/api/v1/stage/{request_id}?cursor=abc", expect_errors=True), 400)


def test_two_requests_for_one_file_share_one_recall(archive):
    settings, backend = archive()
    store_offline(backend, {7: 5000, 8: 6000})
    app = http(settings, backend)
    before = backend.library.counters()
    first = submit(app, ["/7", "/8"]).json["requestId"]
    second = submit(app, ["/7"], X_Client_Id="someone-else").json["requestId"]
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    assert states(poll(app, first)) == {"/7": "COMPLETED", "/8": "COMPLETED"}
    assert states(poll(app, second)) == {"/7": "COMPLETED"}
    assert backend.library.counters()["bytes_read"] - before["bytes_read"] == 11000


def test_cancel_stops_queued_files_and_is_all_or_nothing(archive):
    settings, backend = archive()
    store_offline(backend, {1: 1000, 2: 1000, 3: 1000})
    app = http(settings, backend)
    request_id = submit(app, ["/1", "/2", "/3"]).json["requestId"]
    foreign = app.post_json(
        f"/api/v1/stage/{request_id}/cancel", {"paths": ["/1", "/77"]}, expect_errors=True
    )
    assert '"/77"' in problem(foreign, 400)["detail"]
    assert states(poll(app, request_id)) == {"/1": "SUBMITTED", "/2": "SUBMITTED", "/3": "SUBMITTED"}
    app.post_json(f"/api/v1/stage/{request_id}/cancel", {"paths": ["/1", "/2"]}, status=200)
    before = backend.library.counters()
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    document = poll(app, request_id)
    assert states(document) == {"/1": "CANCELLED", "/2": "CANCELLED", "/3": "COMPLETED"}
    assert on_disk(backend, 1) is None and on_disk(backend, 2) is None
    assert backend.library.counters()["bytes_read"] - before["bytes_read"] == 1000
    assert document["completedAt"] is not None


def test_delete_forgets_the_request_and_cancels_its_files(archive):
    settings, backend = archive()
    store_offline(backend, {1: 1000})
    app = http(settings, backend)
    request_id = submit(app, ["/1"]).json["requestId"]
    app.delete(f"/api/v1/stage/{request_id}", status=200)
    problem(app.get(f"/api/v1/stage/{request_id}", expect_errors=True), 404)
    problem(app.delete(f"/api/v1/stage/{request_id}", expect_errors=True), 404)
    before = backend.library.counters()
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    assert backend.library.counters()["bytes_read"] == before["bytes_read"]
    assert app.get("/api/v1/queues").json == {"volumes": []}


def test_a_corrupted_volume_fails_its_files_with_a_reason_and_the_rest_complete(archive):
    settings, backend = archive()
    sizes = {i: 4000 for i in range(1, 9)}
    store_offline(backend, sizes, spread=2)
    bad_vsn = backend.catalog.current_copies(1)[0].vsn
    bad = [i for i in sizes if backend.catalog.current_copies(i)[0].vsn == bad_vsn]
    for file_id in bad:
        corrupt(backend, file_id)
    app = http(settings, backend)
    request_id = submit(app, [f"/{i}" for i in sizes]).json["requestId"]
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    document = poll(app, request_id)
    for entry in document["files"]:
        file_id = int(entry["path"][1:])
        if file_id in bad:
            assert entry["state"] == "FAILED" and "sha-256" in entry["error"], entry
            assert on_disk(backend, file_id) is None
        else:
            assert entry["state"] == "COMPLETED", entry
            assert on_disk(backend, file_id) == content(file_id, 4000)
    assert document["completedAt"] is not None
    info = app.post_json("/api/v1/archiveinfo", {"paths": [f"/{bad[0]}"]}).json
    assert info == [{"path": f"/{bad[0]}", "locality": "LOST"}]


def test_archiveinfo_reports_each_locality_or_an_error(archive):
    settings, backend = archive()
    store_offline(backend, {1: 100, 2: 100})
    with backend.open_writer(3, 784111777.0) as writer:
        writer.write(b"disk only")
        writer.commit()
    scheduler_app = http(settings, backend)
    request_id = submit(scheduler_app, ["/2"]).json["requestId"]
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    assert states(poll(scheduler_app, request_id)) == {"/2": "COMPLETED"}
    paths = ["/1", "/2", "/3", "/4", "/x", "/1/2"]
    answer = scheduler_app.post_json("/api/v1/archiveinfo", {"paths": paths}).json
    assert answer[:4] == [
        {"path": "/1", "locality": "TAPE"},
        {"path": "/2", "locality": "DISK_AND_TAPE"},
        {"path": "/3", "locality": "DISK"},
        {"path": "/4", "error": "no such file in the archive"},
    ]
    assert [set(a) for a in answer[4:]] == [{"path", "error"}, {"path", "error"}]


def test_queues_show_files_waiting_per_volume(archive):
    settings, backend = archive(bulk={"mount_min_files": 100, "max_wait_seconds": 3600})
    store_offline(backend, {1: 100, 2: 200, 3: 300}, spread=2)
    app = http(settings, backend)
    submit(app, ["/1", "/2", "/3"])
    # Queues this small are not worth a mount yet, and have not waited long: nothing starts.
    assert scheduler(settings, backend).run_pass() == []
    volumes = app.get("/api/v1/queues").json["volumes"]
    assert sorted((v["files"], v["bytes"]) for v in volumes) == [(1, 200), (2, 400)]
    assert all(v["mounted"] is False and v["oldestAgeSeconds"] >= 0 for v in volumes)


# -- bad input -------------------------------------------------------------------------


def test_whole_request_errors_are_problem_json(archive):
    settings, backend = archive(bulk={"max_files_per_request": 100_000})
    app = http(settings, backend)

    def post(body: bytes | str, **kwargs) -> dict:
        return app.post("/api/v1/stage", body, content_type="application/json", expect_errors=True, **kwargs)

    problem(post(b"{not json"), 400)
    problem(post(b"\xff\xfe"), 400)
    problem(post(json.dumps({"files": []})), 400)
    problem(post(json.dumps({"nofiles": 1})), 400)
    problem(post(json.dumps([1, 2])), 400)
    problem(post(json.dumps({"files": [{"nopath": 1}]})), 400)
    too_many = {"files": [{"path": f"/{i}"} for i in range(100_001)]}
    assert "100001" in problem(post(json.dumps(too_many)), 413)["detail"]
    # Nothing was stored by any of them.
    assert app.get("/api/v1/queues").json == {"volumes": []}


def test_unknown_requests_paths_and_verbs(archive):
    settings, backend = archive()
    app = http(settings, backend)
    problem(app.get("/api/v1/stage/0123456789abcdef", expect_errors=True), 404)
    problem(app.post_json("/api/v1/stage/nope/cancel", {"paths": ["/1"]}, expect_errors=True), 404)
    problem(app.get("/api/v1/nothing-here", expect_errors=True), 404)
    problem(app.get("/api/v2/stage", expect_errors=True), 404)
    wrong = app.put("/api/v1/stage", b"{}", expect_errors=True)
    problem(wrong, 405)
    assert "POST" in wrong.headers["Allow"]
    problem(app.get("/api/v1/archiveinfo", expect_errors=True), 405)
    problem(app.post_json("/api/v1/archiveinfo", {"paths": []}, expect_errors=True), 400)
    problem(app.post_json("/api/v1/archiveinfo", {"paths": [1]}, expect_errors=True), 400)


def test_a_client_over_its_in_flight_cap_is_throttled_not_refused(archive):
    """FTS stages from one address and fails every file of a refused job: past the cap files wait."""
    settings, backend = archive(bulk={"max_in_flight_per_client": 3})
    store_offline(backend, {i: 10 for i in range(1, 8)})
    app = http(settings, backend)
    first = submit(app, ["/1", "/2"], X_Client_Id="alice").json["requestId"]
    second = submit(app, ["/3", "/4", "/5"], X_Client_Id="alice").json["requestId"]  # 201, not 429
    bob = submit(app, ["/6"], X_Client_Id="bob").json["requestId"]  # another client has its own share
    store = BulkStore.open(settings.archive.catalog)
    try:
        # Clients see SUBMITTED; underneath, /4 and /5 wait without a recall job.
        assert states(poll(app, second)) == {"/3": "SUBMITTED", "/4": "SUBMITTED", "/5": "SUBMITTED"}
        assert poll(app, second)["summary"]["states"]["SUBMITTED"] == 3  # as the files say
        listed = poll(app, second, state="SUBMITTED")
        assert sorted(states(listed)) == ["/3", "/4", "/5"]
        rows = {row.path: row.state for row in store.File.select().where(store.File.request_id == second)}
        assert rows == {"/3": "SUBMITTED", "/4": "DEFERRED", "/5": "DEFERRED"}
        assert sorted(job.file_id for job in store.Job.select()) == [1, 2, 3, 6]
        # Nothing finished: no room, nothing starts. One finishes: one deferred file starts, oldest first.
        assert store.activate_deferred(3) == 0
        assert store.finish_job(1, "test", "COMPLETED") == 1
        assert store.activate_deferred(3) == 1
        assert sorted(job.file_id for job in store.Job.select()) == [2, 3, 4, 6]
        # A cancel reaches a deferred file too.
        cancelled = submit(app, ["/7"], X_Client_Id="alice").json["requestId"]
        app.post_json(f"/api/v1/stage/{cancelled}/cancel", {"paths": ["/7"]})
        assert states(poll(app, cancelled)) == {"/7": "CANCELLED"}
    finally:
        store.close()
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    for request_id in (first, second, bob):
        document = poll(app, request_id)
        assert set(states(document).values()) == {"COMPLETED"}, document
        assert "completedAt" in document


def test_without_a_catalog_the_bulk_api_says_so(archive):
    settings, backend = archive()
    off = load_settings(
        flags={
            "archive": {"backend": "tape", "prefix": settings.archive.prefix},
            "tape": {"time_scale": 0.0},
        },
        env={"PAI_CATALOG": "off", "PAI_TAPE_LIBRARY": settings.tape.library},
    )
    assert off.archive.catalog is None
    app = http(off, backend)
    answer = problem(app.post_json("/api/v1/stage", {"files": [{"path": "/1"}]}, expect_errors=True), 501)
    assert "catalog" in answer["detail"]
    assert app.get("/.well-known/wlcg-tape-rest-api").status_int == 200


def test_odd_query_parameters_paths_and_ids_are_400_or_404_never_500(archive):
    settings, backend = archive()
    store_offline(backend, {1: 10})
    app = http(settings, backend)
    request_id = submit(app, ["/1"]).json["requestId"]
    url = f"/api/v1/stage/{request_id}"
    for query in (
        "limit=1&limit=2",  # a repeated parameter arrives as a list
        "cursor=1&cursor=2",
        "limit=%C2%B2",  # "²" passes str.isdigit() but not int()
        "cursor=%C2%B2",
        "cursor=9999999999999999999",  # 19 digits, past 2**63-1
        "limit=-1",
        "state=DONE",
    ):
        assert problem(app.get(f"{url}?{query}", expect_errors=True), 400)["detail"], query
    # Paths no database can hold (PostgreSQL refuses NUL; no driver encodes a lone surrogate).
    for raw in (b'{"files":[{"path":"/\\ud800"}]}', b'{"files":[{"path":"/1\\u0000"}]}'):
        answer = app.post("/api/v1/stage", raw, content_type="application/json", expect_errors=True)
        assert '"files"[0].path' in problem(answer, 400)["detail"]
    cancel = app.post(f"{url}/cancel", b'{"paths":["/\\ud800"]}', content_type="application/json", status="*")
    assert '"paths"[0]' in problem(cancel, 400)["detail"]
    # Ids that are not of the form the server hands out are unknown, whatever they hold.
    for bad in ("%00", "a" * 5000, "%C3%A9t%C3%A9"):
        problem(app.get(f"/api/v1/stage/{bad}", expect_errors=True), 404)
        problem(app.delete(f"/api/v1/stage/{bad}", expect_errors=True), 404)
    assert poll(app, request_id, limit=1)["files"][0]["path"] == "/1"


def test_a_heavy_stage_request_waits_for_a_slot_then_gets_429_past_heavy_wait_seconds(archive):
    from pacifica_like.core.slots import SlotPool, directory_for

    bulk = {"max_heavy_requests": 1, "heavy_request_files": 2, "heavy_wait_seconds": 0.2}
    settings, backend = archive(bulk=bulk)
    store_offline(backend, {1: 10, 2: 10})
    app = http(settings, backend)
    slots = SlotPool(directory_for(settings.archive.prefix), "heavy", 1)
    held = slots.try_acquire()  # another process's heavy request, as far as the server can tell
    assert held is not None
    try:
        refused = submit(app, ["/1", "/2"], status=429)
        assert "try again" in problem(refused, 429)["detail"]
    finally:
        slots.release(held)
    assert submit(app, ["/1", "/2"]).status_int == 201


def test_a_client_at_its_stored_requests_cap_loses_its_oldest_finished_unpinned_request_not_the_new_one(
    archive,
):
    settings, backend = archive(bulk={"max_requests_per_client": 2})
    store_offline(backend, {1: 10})
    with backend.open_writer(5, 784111777.0) as writer:
        writer.write(b"on disk")
        writer.commit()
    app = http(settings, backend)

    def stage_unpinned(path: str) -> str:
        body = {"files": [{"path": path, "diskLifetime": "PT0S"}]}
        return app.post_json("/api/v1/stage", body, headers={"X-Client-Id": "fts"}).json["requestId"]

    oldest = stage_unpinned("/5")  # on disk: COMPLETED at once, pinned for 0 s
    newer = stage_unpinned("/5")
    third = stage_unpinned("/5")  # 201: the oldest finished one made room
    assert app.get(f"/api/v1/stage/{oldest}", status=404)
    assert states(poll(app, newer)) == {"/5": "COMPLETED"}
    assert states(poll(app, third)) == {"/5": "COMPLETED"}
    # Open and pinning requests still fill the cap: the client waits for them (429), as before.
    open_one = stage_unpinned("/1")  # purges `newer`
    assert states(poll(app, open_one)) == {"/1": "SUBMITTED"}
    pinning = app.post_json("/api/v1/stage", {"files": [{"path": "/5"}]}, headers={"X-Client-Id": "fts"})
    assert pinning.status_int == 201  # purges `third`; pins /5 for default_pin_seconds
    refused = app.post_json(
        "/api/v1/stage", {"files": [{"path": "/5"}]}, headers={"X-Client-Id": "fts"}, status=429
    )
    assert "stored requests" in problem(refused, 429)["detail"]
