"""The recall scheduler: queued files, volume by volume, in tape order, with bounded drive use.

One :class:`Scheduler` per process (``pacifica-like serve`` runs it in a
thread; ``pacifica-like worker`` runs only it). Each *pass*:

1. takes back the work of schedulers that died (their recalls are queued
   again, or failed once they used up ``max_attempts``);
2. fails recalls running longer than ``recall_timeout`` (the watchdog);
   and, once a minute, queues again any open file left without a recall job
   (two writers' transactions crossed; ``BulkStore.requeue_jobless``) and
   forgets requests finished more than ``retention_seconds`` ago;
3. picks volumes worth a mount (``mount_min_files`` files or
   ``mount_min_bytes`` bytes queued, or the oldest file waited
   ``max_wait_seconds``, or only ``idle_wait_seconds`` while a drive is
   free; waited-longest first) while fewer than ``drives``
   volumes are held by all schedulers together, claims each in the database,
   and starts a thread for it.

A volume thread holds one drive with the volume mounted
(``contract.open_volume``) and reads its queue in one pass in position order,
claiming jobs in batches (at most ``max_recalls_in_flight`` over all drives)
and taking files queued meanwhile behind the head in a second pass. Each
outcome goes to every request waiting for the file. A failed recall is
retried (from another copy when the backend points elsewhere) after a
back-off, until ``max_attempts``; a damaged copy with no other to read fails
at once, with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from pacifica_like.bulk.store import COMPLETED, FAILED, BulkStore, Job, VolumeQueue, make_owner
from pacifica_like.core.config import Settings
from pacifica_like.core.errors import ArchiveError
from pacifica_like.storage import contract
from pacifica_like.storage.contract import Backend

log = logging.getLogger("pacifica_like.bulk")

#: Longest pause before a failed recall or mount is tried again, seconds.
MAX_BACKOFF = 300.0
#: Passes over a volume's queue in one mount (the second picks up files queued behind the head).
PASSES_PER_MOUNT = 2
#: Seconds between searches for open files left without a recall job (it scans every open file row).
JOBLESS_SWEEP_SECONDS = 60.0
#: Expired requests forgotten per round of the same sweep.
PURGE_BATCH = 100
#: Seconds between the records that this scheduler runs (well inside the file API's
#: ``bulk.stager.RUNNING_WITHIN``): one write every few seconds, not one per pass.
SEEN_EVERY = 5.0


class Scheduler:
    """Recall the queued bulk-staging files of one catalog through one backend."""

    def __init__(self, settings: Settings, backend: Backend, store: BulkStore) -> None:
        self.policy = settings.bulk
        self.backend = backend
        self.store = store
        #: Volumes all schedulers on the database may hold at once. Each held volume has at
        #: least one recall in flight, so fewer recalls allowed than drives means fewer drives.
        self.drives = min(self.policy.drives or settings.tape.drives, self.policy.max_recalls_in_flight)
        self.batch = max(1, self.policy.max_recalls_in_flight // self.drives)
        # A scheduler on another host is presumed dead once its heartbeat is this old.
        self.lease = self.policy.recall_timeout + 60.0
        self._seen_at = -SEEN_EVERY  # when this scheduler last recorded that it runs
        self.owner = make_owner()
        self._sessions: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_sweep = 0.0  # monotonic; the first pass sweeps

    @classmethod
    def from_settings(cls, settings: Settings, backend: Backend) -> Scheduler:
        """Build the scheduler over the catalog named by ``[archive] catalog``; ValueError if it is off."""
        if not settings.archive.catalog:
            raise ValueError("bulk staging needs the gateway catalog ([archive] catalog is off)")
        return cls(settings, backend, BulkStore.open(settings.archive.catalog))

    # -- running -------------------------------------------------------------------

    def start(self) -> None:
        """Run passes in a background thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="bulk-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking work, let running recalls finish (up to ``timeout``), and give volumes back."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.join_sessions(timeout)
        with contextlib.suppress(ArchiveError):
            self.store.gone(self.owner)  # POST /<id> recalls directly again
        self._seen_at = -SEEN_EVERY

    def run(self) -> None:
        """Run passes until stopped; a pass that fails (database down) is logged and tried again."""
        log.info("bulk scheduler %s started (%d drives)", self.owner, self.drives)
        while not self._stop.is_set():
            try:
                self.run_pass()
            except ArchiveError as exc:
                log.error("bulk scheduler pass failed: %s", exc)
            except Exception:
                log.exception("bulk scheduler pass failed")
            self._wake.wait(self.policy.poll_seconds)
            self._wake.clear()
        log.info("bulk scheduler %s stopped", self.owner)

    def run_until_idle(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Run passes until no job is queued or running anywhere; False if ``timeout`` passed first.

        For ``pacifica-like worker --until-idle``, tests and benchmarks.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.run_pass()
            if not self.active_volumes() and not self.store.queues(self.lease) and not self.store.deferred():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)

    def join_sessions(self, timeout: float | None = None) -> None:
        """Wait for this process's volume threads to end."""
        with self._lock:
            threads = list(self._sessions.values())
        for thread in threads:
            thread.join(timeout)

    def active_volumes(self) -> list[str]:
        """Return the volumes this process is working on now."""
        with self._lock:
            for vsn, thread in list(self._sessions.items()):
                if not thread.is_alive():
                    del self._sessions[vsn]
            return sorted(self._sessions)

    # -- one pass ------------------------------------------------------------------

    def run_pass(self, now: float | None = None) -> list[str]:
        """Recover, run the watchdog, and start work on the volumes worth a mount; return those started."""
        now = time.time() if now is None else now
        if now - self._seen_at >= SEEN_EVERY:  # POST /<id> queues recalls for us while we run
            self.store.seen(self.owner, now)
            self._seen_at = now
        requeued, failed = self.store.recover(self.owner, self.lease, self.policy.max_attempts, now)
        if requeued or failed:
            log.warning("took back %d recalls of stopped schedulers (%d failed for good)", requeued, failed)
        expired = self.store.expire_running(self.policy.recall_timeout, now)
        if expired:
            log.error(
                "watchdog: %d recalls ran past recall_timeout and failed: %s", len(expired), expired[:10]
            )
        if time.monotonic() >= self._next_sweep:
            jobless = self.store.requeue_jobless(now)
            if jobless:
                log.warning("queued again %d files whose recall job was lost to a concurrent update", jobless)
            self.purge_expired(now)
            self._next_sweep = time.monotonic() + JOBLESS_SWEEP_SECONDS
        deferred = self.store.activate_deferred(self.policy.max_in_flight_per_client, now)
        if deferred:
            log.info("started %d deferred files as their clients' earlier files finished", deferred)
        active = self.active_volumes()
        orphans = self.store.requeue_orphans(self.owner, active)
        if orphans:
            log.warning("queued %d recalls again whose volume thread had stopped", orphans)
        for vsn in active:
            self.store.heartbeat(vsn, self.owner, now)
        if self._stop.is_set():
            return []
        started = []
        idle = self.store.held_volumes() < self.drives
        for queue in self.pick(self.store.waiting_volumes(now), now, idle=idle):
            if self.store.held_volumes() >= self.drives:
                break
            if self.store.claim_volume(queue.vsn, self.owner, self.drives, now):
                self._start_session(queue.vsn)
                started.append(queue.vsn)
        return started

    def purge_expired(self, now: float | None = None) -> int:
        """Forget the requests finished more than ``retention_seconds`` ago (and unpinned); return how many.

        In rounds of PURGE_BATCH requests, each request its own transaction, so
        submits and recall outcomes are not held up behind one long delete.
        """
        purged = 0
        while not self._stop.is_set():
            done = self.store.purge_expired(self.policy.retention_seconds, now, limit=PURGE_BATCH)
            purged += done
            if done < PURGE_BATCH:
                break
        if purged:
            log.info("forgot %d bulk requests past retention_seconds", purged)
        return purged

    def pick(self, waiting: list[VolumeQueue], now: float, idle: bool = False) -> list[VolumeQueue]:
        """Return the volumes worth a mount now, most urgent first.

        Worth it: enough files or bytes queued, or the oldest file waited
        ``max_wait_seconds`` (so a small queue is never starved); ``idle`` (a
        drive is free): ``idle_wait_seconds`` is wait enough, since a free drive
        gains nothing from waiting longer for files to gather. Volumes past
        their wait come first, longest waiting first; then the fullest queues.
        """
        policy = self.policy
        wait = min(policy.max_wait_seconds, policy.idle_wait_seconds) if idle else policy.max_wait_seconds
        aged = [q for q in waiting if now - q.oldest_queued_at >= wait]
        full = [
            q
            for q in waiting
            if q not in aged and (q.files >= policy.mount_min_files or q.bytes >= policy.mount_min_bytes)
        ]
        aged.sort(key=lambda q: q.oldest_queued_at)
        full.sort(key=lambda q: (-q.files, -q.bytes, q.oldest_queued_at))
        return aged + full

    def _start_session(self, vsn: str) -> None:
        thread = threading.Thread(target=self._work_volume, args=(vsn,), name=f"bulk-{vsn}", daemon=True)
        with self._lock:
            self._sessions[vsn] = thread
        thread.start()

    # -- one volume ----------------------------------------------------------------

    def _work_volume(self, vsn: str) -> None:
        """Mount ``vsn`` and drain its queue; always give the volume back."""
        mounted = False
        try:
            with contract.open_volume(self.backend, vsn) as session:
                mounted = True
                self._drain(vsn, session.recall)
        except ArchiveError as exc:
            if mounted:
                log.error("bulk recall from %s stopped: %s", vsn, exc)
            else:
                self._mount_failed(vsn, exc)
        except Exception:
            log.exception("bulk recall from %s stopped", vsn)
        finally:
            try:
                self.store.release_volume(vsn, self.owner)
            except ArchiveError as exc:  # the next pass of any scheduler takes it back
                log.error("could not give volume %s back: %s", vsn, exc)

    def _mount_failed(self, vsn: str, exc: ArchiveError) -> None:
        reason = f"volume {vsn} could not be mounted: {exc}"
        log.error("%s", reason)
        retry_at = time.time() + min(MAX_BACKOFF, self.policy.poll_seconds * 4)
        failed = self.store.fail_volume(vsn, self.owner, reason, self.policy.max_attempts, retry_at)
        if failed:
            log.error("%d files of %s failed: out of attempts", failed, vsn)

    def _drain(self, vsn: str, recall: Callable[[int], bool | None]) -> None:
        """Recall the volume's queue in position order: one pass, then one more for late arrivals."""
        position = 0
        passes = 1
        while not self._stop.is_set():
            jobs = self.store.claim_jobs(vsn, self.owner, position, self.batch)
            if not jobs:
                if position == 0 or passes >= PASSES_PER_MOUNT:
                    return
                position, passes = 0, passes + 1  # files queued behind the head: one more pass
                continue
            for job in jobs:
                if self._stop.is_set():
                    return  # release_volume puts the rest back in the queue
                self._recall(job, recall)
                position = job.position + 1
                self.store.heartbeat(vsn, self.owner)

    def _recall(self, job: Job, recall: Callable[[int], bool | None]) -> None:
        """Recall one claimed file and record the outcome for every request waiting for it."""
        attempt = self.store.start_job(job.file_id, self.owner, hold=self.policy.recall_timeout)
        if attempt is None:
            return  # cancelled by every request, or taken back by a watchdog
        try:
            outcome = recall(job.file_id)
        except ArchiveError as exc:
            self._failed(job, attempt, str(exc))
            return
        except Exception as exc:  # a bug: the file must still end in a state, with a reason
            log.exception("recall of file %d failed", job.file_id)
            self._failed(job, attempt, f"internal error ({type(exc).__name__}); the server log has details")
            return
        if outcome is None:
            # Another process is recalling it: look again shortly; this attempt does not count.
            retry_at = time.time() + self.policy.poll_seconds
            self.store.requeue_job(job.file_id, self.owner, job.vsn, job.position, retry_at, refund=True)
            return
        self.store.finish_job(job.file_id, self.owner, COMPLETED)

    def _failed(self, job: Job, attempt: int, reason: str) -> None:
        """Retry a failed recall (maybe from another copy) after a back-off, or fail it for good."""
        file_id = job.file_id
        with contextlib.suppress(ArchiveError):
            if self.backend.localities([file_id]).get(file_id) in ("DISK", "DISK_AND_TAPE"):
                self.store.finish_job(file_id, self.owner, COMPLETED)
                return
        try:
            position = contract.tape_positions(self.backend, [file_id]).get(file_id)
        except ArchiveError:
            position = None
        if attempt >= self.policy.max_attempts or position is None:
            # No position: no undamaged copy is left to try (a checksum failure marked the last one bad).
            log.warning("file %d failed (attempt %d): %s", file_id, attempt, reason)
            reason = f"{reason} (attempt {attempt} of {self.policy.max_attempts})"
            self.store.finish_job(file_id, self.owner, FAILED, reason)
            return
        retry_at = time.time() + min(MAX_BACKOFF, self.policy.poll_seconds * 2**attempt)
        self.store.requeue_job(file_id, self.owner, position.vsn, position.position, retry_at, error=reason)


def run_in_engine(settings: Settings, backend: Backend) -> Scheduler | None:
    """Start the scheduler with CherryPy's engine and stop it with the engine (``pacifica-like serve``).

    Returns None (and starts nothing) when ``[bulk] scheduler`` is off or the catalog is off.
    """
    import cherrypy

    if settings.bulk.scheduler != "in-process" or not settings.archive.catalog:
        return None
    scheduler = Scheduler.from_settings(settings, backend)
    cherrypy.engine.subscribe("start", scheduler.start)
    cherrypy.engine.subscribe("stop", scheduler.stop)
    return scheduler
