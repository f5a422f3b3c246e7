"""``POST /<id>`` through the recall scheduler while one runs, so drive caps and tape order hold for it.

A POST for an offline file becomes a one-file stage request (client
``file-api``) whose recall job is shared with every bulk request for the same
file; the scheduler mounts each volume once for all the files queued on it.
The POST then waits for the recall as a direct one did: up to ``[tape]
stage_timeout`` seconds, and only while one of ``[tape] stage_waiters`` slots
is free (the backend's own pool), answering 200 when the file is on disk and
202 with ``Location: /<id>`` otherwise (HEAD the file to follow it). A recall
the scheduler gave up on is a 503 naming its reason.

Where no scheduler has passed within :data:`RUNNING_WITHIN` seconds (plain
uWSGI with no ``pacifica-like worker``, or ``[bulk] scheduler = off`` and none
started), the backend recalls the file itself, as before: a POST never waits on
a queue nobody serves. Files on disk, unknown ids and files without a readable
tape copy go to the backend as well, which answers them as always.
"""

from __future__ import annotations

import time

from pacifica_like.bulk.store import COMPLETED, FAILED, SUBMITTED, BulkStore, NewFile
from pacifica_like.core.config import TapeSettings
from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.storage import contract
from pacifica_like.storage.contract import Backend
from pacifica_like.storage.hsm import stage_waits

#: Seconds since a scheduler's last pass within which it counts as running (passes come every
#: ``poll_seconds``, 1 s by default, also while recalls run).
RUNNING_WITHIN = 30.0
#: The client name of the requests POST /<id> makes.
CLIENT = "file-api"
#: First and longest pause between looks at a waited-for recall, seconds.
FIRST_LOOK, LONGEST_LOOK = 0.02, 0.5


class ScheduledStager:
    """Stage a file for ``POST /<id>``: queued for the running scheduler, else recalled by the backend."""

    def __init__(self, backend: Backend, store: BulkStore, tape: TapeSettings) -> None:
        self.backend = backend
        self.store = store
        self.timeout = tape.stage_timeout
        # The pool the backend's own POST waits take slots from: one bound for both paths.
        self.waits = stage_waits(tape)

    def __call__(self, file_id: int) -> bool:
        """Return True when the file is on disk, False when its recall is queued or under way."""
        position = contract.tape_positions(self.backend, [file_id]).get(file_id)
        if position is None or not self.store.scheduler_running(time.time() - RUNNING_WITHIN):
            return self.backend.stage(file_id)
        path = f"/{file_id}"
        queued = NewFile(path, SUBMITTED, file_id, position.size, position.vsn, position.position)
        request_id = self.store.create_request(CLIENT, [queued])
        if self.timeout <= 0:
            return False
        with self.waits.hold() as may_wait:
            return may_wait and self._wait(request_id, file_id)

    def _wait(self, request_id: str, file_id: int) -> bool:
        """Wait up to the stage timeout for the request's one file to finish; True when it is on disk."""
        deadline = time.monotonic() + self.timeout
        pause = FIRST_LOOK
        while True:
            files, _ = self.store.files(request_id, limit=1)
            if files and files[0].state == COMPLETED:
                return True
            if files and files[0].state == FAILED:
                raise StorageUnavailable(f"the recall of file {file_id} from tape failed: {files[0].error}")
            if not files or time.monotonic() + pause > deadline:
                return False
            time.sleep(pause)
            pause = min(LONGEST_LOOK, pause * 2)
