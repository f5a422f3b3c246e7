"""``?dryRun=true`` over HTTP: stage, cancel, release and DELETE of a bulk request; PATCH, DELETE of a file.

Each dry run answers with the plan through the real app, and the test then
checks that nothing changed where the change would have landed: the bulk
tables (read through the store), the files on disk, the tape library's counters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bulk_helpers import http, make_settings, poll, states, store_offline, submit

from pacifica_like.bulk.store import BulkStore
from pacifica_like.storage import registry as factory

LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.fixture
def tape(tmp_path: Path, prepare_backend):
    """(settings, backend, app) for a tape archive whose files 1-6 are offline on two volumes, 50 on disk."""
    patch_root = tmp_path / "incoming"
    patch_root.mkdir()
    settings = make_settings(
        tmp_path,
        "tape",
        prepare_backend,
        archive={"allow_delete": True, "patch_roots": (str(patch_root),)},
    )
    backend = factory.create(settings)
    store_offline(backend, {i: 1000 + i for i in range(1, 7)}, spread=2)
    with backend.open_writer(50, 784111777.0) as writer:
        writer.write(b"on disk")
        writer.commit()
    yield settings, backend, http(settings, backend)
    backend.close()


def stored_requests(settings) -> int:
    """How many bulk requests the catalog holds, whoever made them."""
    store = BulkStore.open(settings.archive.catalog)
    try:
        store.ensure_schema()
        return store.Request.select().count()
    finally:
        store.close()


def stage(app, paths: list[str], query: str = "", status: int = 200):
    body = json.dumps({"files": [{"path": p} for p in paths]})
    return app.post(
        f"/api/v1/stage{query}", body, headers={"Content-Type": "application/json"}, status=status
    )


def test_a_stage_dry_run_plans_volumes_in_tape_order_and_stores_nothing(tape):
    settings, backend, app = tape
    mounts = backend.library.counters()["mounts"]
    answer = stage(app, ["/6", "/1", "/2", "/50", "/424242"], "?dryRun=true").json
    assert answer["dryRun"] is True
    by_path = {f["path"]: f for f in answer["files"]}
    assert by_path["/50"]["state"] == "COMPLETED"
    assert by_path["/424242"]["state"] == "FAILED" and "no such file" in by_path["/424242"]["error"]
    assert {by_path[p]["state"] for p in ("/1", "/2", "/6")} == {"SUBMITTED"}
    assert answer["states"] == {"SUBMITTED": 3, "COMPLETED": 1, "FAILED": 1}
    # Files 1, 3, 5 went to one volume and 2, 4, 6 to the other; each listed in position order.
    volumes = {v["volume"]: v for v in answer["volumes"]}
    assert sorted(v["order"] for v in volumes.values()) == [["/1"], ["/2", "/6"]]
    assert [v["bytes"] for v in answer["volumes"] if v["order"] == ["/2", "/6"]] == [1002 + 1006]
    for path in ("/1", "/2", "/6"):
        assert by_path[path]["volume"] in volumes
    # Nothing stored, nothing mounted; the real request then goes through.
    assert stored_requests(settings) == 0
    assert backend.library.counters()["mounts"] == mounts
    assert stage(app, ["/6", "/1"], status=201).json["requestId"]
    assert stored_requests(settings) == 1


def test_a_bad_dry_run_value_is_a_400_and_changes_nothing(tape):
    settings, _, app = tape
    answer = stage(app, ["/1"], "?dryRun=maybe", status=400)
    assert "dryRun='maybe': expected true or false" in answer.json["detail"]
    assert stored_requests(settings) == 0
    assert "dryRun" in app.delete("/50?dryRun=perhaps", status=400).json["message"]
    assert app.get("/50").body == b"on disk"


def test_cancel_release_and_delete_dry_runs_name_what_they_would_touch(tape):
    settings, _, app = tape
    request_id = submit(app, ["/1", "/2", "/50"]).json["requestId"]
    before = poll(app, request_id)
    json_headers = {"Content-Type": "application/json"}
    cancel = app.post(
        f"/api/v1/stage/{request_id}/cancel?dryRun=true",
        json.dumps({"paths": ["/1", "/50"]}),
        headers=json_headers,
    ).json
    assert cancel == {"dryRun": True, "requestId": request_id, "cancelled": ["/1"]}  # /50 is COMPLETED
    release = app.post(
        f"/api/v1/release/{request_id}?dryRun=true",
        json.dumps({"paths": ["/50", "/2"]}),
        headers=json_headers,
    ).json
    assert release == {"dryRun": True, "requestId": request_id, "released": ["/50"]}  # only /50 is pinned
    unknown = app.post(
        f"/api/v1/stage/{request_id}/cancel?dryRun=true",
        json.dumps({"paths": ["/9"]}),
        headers=json_headers,
        status=400,
    ).json
    assert 'does not hold these paths, so nothing would be cancelled: "/9"' in unknown["detail"]
    deleted = app.delete(f"/api/v1/stage/{request_id}?dryRun=true").json
    assert deleted == {
        "dryRun": True,
        "requestId": request_id,
        "files": 3,
        "cancelled": ["/1", "/2"],
        "releasedPins": ["/50"],
    }
    # The request is as it was: open files open, the pin held.
    after = poll(app, request_id)
    assert states(after) == states(before) == {"/1": "SUBMITTED", "/2": "SUBMITTED", "/50": "COMPLETED"}
    store = BulkStore.open(settings.archive.catalog)
    try:
        assert list(store.pins([50])) == [50]
    finally:
        store.close()
    # A release naming no request counts the caller's own pins, and drops none.
    own = app.post(
        "/api/v1/release/gfal2-placeholder-id?dryRun=true",
        json.dumps({"paths": ["/50"]}),
        headers=json_headers,
    ).json
    assert own == {"dryRun": True, "requestId": "gfal2-placeholder-id", "releasedPins": 1}
    assert (
        app.post(
            "/api/v1/release/gfal2-placeholder-id", json.dumps({"paths": ["/50"]}), headers=json_headers
        ).json["releasedPins"]
        == 1
    )


def test_delete_and_patch_dry_runs_keep_every_byte(tape, tmp_path: Path, capsys):
    _, _, app = tape
    capsys.readouterr()
    plan = app.delete("/3?dryRun=true").json
    # The audit trail says it was a dry run, not a deletion.
    [audit] = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"log": "audit"' in line]
    assert (audit["action"], audit["outcome"], audit["status"]) == ("delete", "dry-run", 200)
    assert plan["dryRun"] is True and plan["message"] == "File would be deleted"
    assert (plan["file"], plan["size"], plan["state"]) == ("3", 1003, "OFFLINE")
    assert plan["bytesPerLevel"] == [0, 1003]
    assert app.head("/3").headers["X-Pacifica-File-State"] == "OFFLINE"  # still there, still on tape
    app.delete("/424242?dryRun=true", status=404)

    source = tmp_path / "incoming" / "ready.dat"
    source.write_bytes(b"moved in later")
    body = json.dumps({"path": str(source)})
    json_headers = {"Content-Type": "application/json"}
    plan = app.patch("/60?dryRun=true", body, headers=json_headers).json
    assert plan == {
        "dryRun": True,
        "message": "File would be moved into the archive",
        "file": "60",
        "source": str(source),
        "size": 14,
        "replaces": False,
        "method": "rename",
    }
    assert source.read_bytes() == b"moved in later"
    app.head("/60", status=404)
    assert app.patch("/50?dryRun=true", body, headers=json_headers).json["replaces"] is True
    assert app.get("/50").body == b"on disk"
    # The same refusals as the move itself: outside every root is a 403.
    outside = tmp_path / "elsewhere.dat"
    outside.write_bytes(b"x")
    app.patch("/61?dryRun=true", json.dumps({"path": str(outside)}), headers=json_headers, status=403)
    # And the real move goes through afterwards.
    app.patch("/60", body, headers=json_headers)
    assert app.get("/60").body == b"moved in later" and not source.exists()


def test_a_dry_run_delete_is_refused_where_delete_is(tmp_path: Path, prepare_backend):
    settings = make_settings(tmp_path, "posix", prepare_backend)
    backend = factory.create(settings)
    try:
        app = http(settings, backend)
        app.put("/7", b"kept", headers={"Last-Modified": LAST_MODIFIED})
        assert app.delete("/7?dryRun=true", status=405).headers["Allow"] == "GET, HEAD, PATCH, POST, PUT"
        assert app.get("/7").body == b"kept"
    finally:
        backend.close()
