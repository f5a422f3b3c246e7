"""``POST /<id>`` through the recall scheduler: a mount per volume for many POSTs, recalls shared with bulk.

Real app (WebTest), real tape emulator and catalog; the scheduler runs its
passes in the test (``run_until_idle``), and the library's counters say how
many cartridges were mounted.
"""

from __future__ import annotations

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
    wait_for,
)
from conftest import corrupt

from pacifica_like.bulk.stager import CLIENT
from pacifica_like.bulk.store import BulkStore
from pacifica_like.storage import registry as factory

TIMEOUT = 60
SIZE = 2000


@pytest.fixture
def archive(tmp_path: Path, prepare_backend):
    """(settings, backend, app): a tape archive whose scheduler holds one drive; POSTs do not wait."""
    settings = make_settings(tmp_path, "tape", prepare_backend, bulk={"drives": 1}, tape={"stage_waiters": 0})
    backend = factory.create(settings)
    yield settings, backend, http(settings, backend)
    backend.close()


def test_forty_posts_alternating_over_two_volumes_cost_two_mounts(archive):
    settings, backend, app = archive
    ids = list(range(1, 41))
    store_offline(backend, dict.fromkeys(ids, SIZE), spread=2)  # odd ids on one volume, even on the other
    running = scheduler(settings, backend)
    running.run_pass()  # the scheduler runs (nothing is queued yet)
    backend.library.unload_idle()  # the migration left cartridges in the drives
    before = backend.library.counters()
    for file_id in ids:  # alternating volumes, as 40 clients would ask
        answer = app.post(f"/{file_id}", status=202)
        assert answer.headers["Location"] == f"/{file_id}"
        assert answer.json["state"] == "UNMIGRATING"
    assert backend.library.counters()["mounts"] == before["mounts"]  # queued, nothing mounted yet
    assert running.run_until_idle(timeout=TIMEOUT)
    after = backend.library.counters()
    assert after["mounts"] - before["mounts"] == 2
    assert after["bytes_read"] - before["bytes_read"] == 40 * SIZE  # each file read once
    for file_id in ids:
        assert on_disk(backend, file_id) == content(file_id, SIZE)
        assert app.post(f"/{file_id}").status_int == 200  # on disk now: answered at once


def test_a_post_shares_the_recall_of_a_bulk_request_for_the_same_file(archive):
    settings, backend, app = archive
    store_offline(backend, {5: SIZE})
    request_id = submit(app, ["/5"]).json["requestId"]
    store = BulkStore.open(settings.archive.catalog)
    try:
        store.seen("a scheduler elsewhere")  # one runs: POST queues instead of recalling itself
        app.post("/5", status=202)
        assert store.Job.select().count() == 1  # one recall for both
        assert store.Request.select().where(store.Request.client == CLIENT).count() == 1
    finally:
        store.close()
    before = backend.library.counters()
    assert scheduler(settings, backend).run_until_idle(timeout=TIMEOUT)
    assert backend.library.counters()["bytes_read"] - before["bytes_read"] == SIZE  # read once
    assert states(poll(app, request_id)) == {"/5": "COMPLETED"}
    assert on_disk(backend, 5) == content(5, SIZE)


def test_without_a_running_scheduler_a_post_recalls_the_file_itself(tmp_path: Path, prepare_backend):
    """Plain uWSGI with no worker: nobody would serve a queue, so the backend recalls as before."""
    settings = make_settings(tmp_path, "tape", prepare_backend, bulk={"drives": 1})
    backend = factory.create(settings)
    try:
        store_offline(backend, {7: SIZE})
        app = http(settings, backend)
        assert app.post("/7").status_int == 200  # waited for its own recall
        assert on_disk(backend, 7) == content(7, SIZE)
        store = BulkStore.open(settings.archive.catalog)
        try:
            assert store.Request.select().count() == 0
        finally:
            store.close()
    finally:
        backend.close()


def test_a_stopped_scheduler_is_forgotten_and_posts_recall_directly_again(archive):
    settings, backend, app = archive
    store_offline(backend, {8: SIZE, 9: SIZE})
    running = scheduler(settings, backend)
    running.run_pass()
    app.post("/8", status=202)  # queued for the scheduler
    assert running.run_until_idle(timeout=TIMEOUT)
    assert on_disk(backend, 8) == content(8, SIZE)
    running.stop()  # it says it is gone
    # The next POST recalls by itself (not waiting here: 202), and makes no request.
    app.post("/9", status=202)
    assert wait_for(lambda: on_disk(backend, 9) == content(9, SIZE), timeout=TIMEOUT)
    store = BulkStore.open(settings.archive.catalog)
    try:
        assert store.Request.select().where(store.Request.client == CLIENT).count() == 1  # only /8's
    finally:
        store.close()


@pytest.mark.parametrize("name", tape_backed_names())
def test_a_post_waiting_on_a_scheduled_recall_answers_200_or_a_503_naming_its_failure(
    tmp_path: Path, prepare_backend, name: str
):
    settings = make_settings(tmp_path, name, prepare_backend, bulk={"drives": 1, "max_attempts": 1})
    backend = factory.create(settings)
    running = scheduler(settings, backend)
    try:
        store_offline(backend, {11: SIZE, 12: SIZE})
        corrupt(backend, 12)  # its only copy fails its checksum
        app = http(settings, backend)
        running.start()
        store = BulkStore.open(settings.archive.catalog)
        try:
            assert wait_for(lambda: store.scheduler_running(0.0), timeout=TIMEOUT)
        finally:
            store.close()
        assert app.post("/11").status_int == 200  # waited while the scheduler recalled it
        assert on_disk(backend, 11) == content(11, SIZE)
        failed = app.post("/12", status=503).json
        assert "the recall of file 12 from tape failed" in failed["message"]
        assert on_disk(backend, 12) is None
    finally:
        running.stop()
        backend.close()
