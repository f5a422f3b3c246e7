"""The bulk-staging HTTP API: a WLCG Tape REST API v1 superset, as CherryPy handlers.

Mounted on the CherryPy application behind the file API (``app.build_app``):
``/.well-known/wlcg-tape-rest-api`` and ``/api/v1/{stage,release,archiveinfo,queues}``.
Handlers parse and check the request, resolve files through the backend
contract (``localities``, and ``tape_positions`` where the backend is ``LocatesOnTape``) and read or write
:class:`~pacifica_like.bulk.store.BulkStore`; the scheduler does the recalls.
Every error, ours and CherryPy's (unknown path, wrong verb), is
``application/problem+json`` (RFC 9457) without a traceback, rendered by
``pacifica_like.web.errors`` (configured on these mounts by :func:`mount`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import cherrypy

from pacifica_like.bulk.durations import parse_duration
from pacifica_like.bulk.store import (
    ACTIVE_STATES,
    CANCELLED,
    COMPLETED,
    DEFERRED,
    FAILED,
    FILE_STATES,
    MAX_PATH,
    SUBMITTED,
    BulkStore,
    NewFile,
    RequestInfo,
)
from pacifica_like.core import httpfields
from pacifica_like.core.config import Settings
from pacifica_like.core.errors import (
    ArchiveError,
    BulkNotConfigured,
    InvalidRequest,
    RequestTooLarge,
    TooManyRequests,
    UnknownRequest,
)
from pacifica_like.core.ids import MAX_ID, parse_id
from pacifica_like.core.slots import SlotPool, directory_for
from pacifica_like.identity.scopes import Principal
from pacifica_like.storage import contract
from pacifica_like.storage.contract import Backend
from pacifica_like.web import errors
from pacifica_like.web.authz import ANYONE, CLIENT_KEY, principal_of, refusal

log = logging.getLogger("pacifica_like.error")

#: Bytes a request body may carry per file it names (a path, a lifetime, JSON punctuation).
BODY_BYTES_PER_FILE = 256
#: Extra body bytes allowed beyond that, whatever the file count.
BODY_SLACK = 1 << 20
#: Most files a poll returns in one page when the client asks for a limit.
MAX_PAGE = 100_000
#: The form of the request ids the store hands out; anything else (NUL, 5,000 characters) is simply unknown.
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
#: Seconds a client refused for lack of a heavy-request slot is asked to wait: about one heavy request.
HEAVY_RETRY_AFTER = 2
#: Seconds between looks for a free heavy slot while a stage submit waits for one.
HEAVY_WAIT_STEP = 0.05
#: Called with the endpoint's name while a heavy request holds its slot. None in service; tests
#: set it (in a server process, from a ``sitecustomize``) to hold requests in flight at will.
HEAVY_HOOK: Callable[[str], None] | None = None


def _json(payload: Any, status: int = 200) -> bytes:
    response = cherrypy.serving.response
    response.status = status
    response.headers["Content-Type"] = "application/json"
    response.headers["Cache-Control"] = "no-store"
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def _handler(method: Callable[[Any, tuple[str, ...], dict[str, Any]], bytes]) -> Callable[..., bytes]:
    """Expose a handler; its errors reach ``pacifica_like.web.errors`` (problem+json) through CherryPy.

    CherryPy passes the rest of the path as positional and the query as
    keyword arguments. The handler gets them as one tuple and one dict: named
    parameters would collide with the query (``?self=1``, ``?request_id=``
    given twice) and fail with a TypeError, a 500. Unknown query parameters
    are ignored, as most HTTP servers do; handlers refuse extra path segments with 404.
    """

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> bytes:
        return method(args[0], args[1:], kwargs)

    run.exposed = True  # type: ignore[attr-defined]
    return run


def _epoch(value: float | None) -> int | None:
    return None if value is None else int(value)


def _read_json(max_bytes: int) -> Any:
    """Read and parse the request body; 413 past ``max_bytes``, 400 when it is not JSON."""
    request = cherrypy.serving.request
    length = request.headers.get("Content-Length")
    if length is not None:
        length = length.strip()
        # Only ASCII digits ("²" passes isdigit() but not int()), and no more than int() takes.
        if not _decimal(length) or len(length) > 19:
            raise InvalidRequest(f"Content-Length {length[:40]!r} is not a byte count")
    if length is not None and int(length) > max_bytes:
        raise RequestTooLarge(f"the request body ({length} bytes) is larger than the {max_bytes} accepted")
    # Without a Content-Length (chunked), read to the end of the body, but never past the limit.
    want = int(length) if length is not None else max_bytes + 1
    chunks, got = [], 0
    while got < want:
        chunk = request.rfile.read(min(want - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got > max_bytes:
        raise RequestTooLarge(f"the request body is larger than the {max_bytes} bytes accepted")
    data = b"".join(chunks)
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidRequest("the request body nests JSON arrays or objects too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        # ValueError covers integers past Python's digit limit (4,300) too.
        raise InvalidRequest(f"the request body is not JSON: {exc}") from None


_SLASHES = re.compile(r"//+")


def sanitise(path: str) -> str:
    """Return ``path`` with runs of slashes collapsed, as the spec has servers do (``//3`` is ``/3``).

    Requests store, and answers carry, the sanitised path.
    """
    return _SLASHES.sub("/", path) if "//" in path else path


def _paths_of(body: Any, limit: int, truncate: bool = False) -> list[str]:
    """Return the sanitised, distinct ``paths`` of a cancel, release or archiveinfo body.

    More than ``limit`` paths is a 413, or with ``truncate`` the first
    ``limit`` of them (archiveinfo: the spec forbids an error for too many).
    """
    if not isinstance(body, dict) or not isinstance(body.get("paths"), list):
        raise InvalidRequest('the body must be a JSON object with a "paths" list')
    paths = body["paths"]
    if not paths:
        raise InvalidRequest('"paths" is empty')
    if len(paths) > limit and not truncate:
        raise RequestTooLarge(f'"paths" names {len(paths)} files; at most {limit} are accepted')
    bad = next((i for i, p in enumerate(paths) if not isinstance(p, str)), None)
    if bad is not None:
        raise InvalidRequest(f'"paths"[{bad}] is not a string')
    bad = next((i for i, p in enumerate(paths) if not _storable(p)), None)
    if bad is not None:
        raise InvalidRequest(f'"paths"[{bad}] {_UNSTORABLE}')
    return list(dict.fromkeys(sanitise(p) for p in paths))[:limit]


#: Why a path is refused before any database sees it.
_UNSTORABLE = "holds a NUL character or an unpaired surrogate, which no path can contain"


def _storable(path: str) -> bool:
    """True when ``path`` can be stored and compared by every catalog database.

    PostgreSQL refuses NUL in text, and no driver encodes a lone surrogate
    (JSON's ``\\ud800`` escape) as UTF-8: refused as bad input, not a 500.
    """
    if "\x00" in path:
        return False
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def file_id_of(path: str, namespace: str = "") -> int | None:
    """Return the file id a ``/<id>`` (or ``<namespace>/<id>``) path names, or None when it is neither."""
    if namespace and path.startswith(namespace + "/"):
        path = path[len(namespace) :]
    if not path.startswith("/"):
        return None
    try:
        return parse_id(path[1:])
    except (InvalidRequest, ValueError):
        return None


def _name(paths: list[str], most: int = 10) -> str:
    shown = ", ".join(json.dumps(p) for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


class BulkAPI:
    """The state every bulk handler shares: settings, the storage backend and the store."""

    def __init__(self, settings: Settings, backend: Backend, store: BulkStore | None) -> None:
        self.settings = settings
        self.policy = settings.bulk
        self.backend = backend
        self._store = store
        self.max_body = self.policy.max_files_per_request * BODY_BYTES_PER_FILE + BODY_SLACK
        self.heavy_slots = SlotPool(
            directory_for(settings.archive.prefix), "heavy", self.policy.max_heavy_requests
        )

    @contextlib.contextmanager
    def heavy(self, what: str, files: int, wait: float = 0.0) -> Iterator[None]:
        """Run the block in a heavy-request slot when it handles many files; 429 when none is free.

        Requests naming fewer than ``heavy_request_files`` files pass freely.
        The slots count across every process of this host, so heavy requests
        never hold every uWSGI worker or serve thread: ``GET /`` and small
        requests always find one. ``wait``: seconds to wait for a slot before
        the 429 (stage submits: FTS fails every file of a refused job).
        """
        if files < self.policy.heavy_request_files:
            yield
            return
        slot = self.heavy_slots.try_acquire()
        deadline = time.monotonic() + wait
        while slot is None and time.monotonic() < deadline:
            time.sleep(HEAVY_WAIT_STEP)
            slot = self.heavy_slots.try_acquire()
        if slot is None:
            raise TooManyRequests(
                f"the server is already handling {self.policy.max_heavy_requests} requests of "
                f"{self.policy.heavy_request_files} files or more; try again shortly",
                retry_after=HEAVY_RETRY_AFTER,
            )
        try:
            if HEAVY_HOOK is not None:
                HEAVY_HOOK(what)
            yield
        finally:
            self.heavy_slots.release(slot)

    @property
    def store(self) -> BulkStore:
        """The store; BulkNotConfigured (501) when the catalog is off."""
        if self._store is None:
            raise BulkNotConfigured(
                "bulk staging keeps its requests in the gateway catalog, which is off here "
                "([archive] catalog = off); ask the operator to configure one"
            )
        return self._store

    def principal(self) -> Principal:
        """Who the request acts as (the access guard put it in the environ; anonymous without one)."""
        found = principal_of(cherrypy.serving.request.wsgi_environ)
        return found if found is not None else ANYONE

    def client(self) -> str:
        """Who owns requests and counts against the per-client caps.

        A token's (subject, issuer); without one, X-Client-Id, else the remote address.
        """
        principal = self.principal()
        if principal.kind != "anonymous":
            return principal.owner[:255]
        request = cherrypy.serving.request
        address = request.wsgi_environ.get(CLIENT_KEY) or request.remote.ip
        return request.headers.get("X-Client-Id") or address or "unknown"

    def allow(self, paths: Iterable[str], *actions: str) -> None:
        """Refuse (401/403) unless the principal holds one of ``actions`` on every path's file."""
        principal = self.principal()
        namespace = self.settings.server.namespace
        denied = []
        for path in paths:
            file_id = file_id_of(path, namespace)
            target = f"{namespace}/{file_id}" if file_id is not None else path
            if not any(principal.may(action, target) for action in actions):
                denied.append(path)
        if denied:
            raise refusal(principal, f"this needs storage.{' or storage.'.join(actions)} on {_name(denied)}")

    def own(self, info: RequestInfo | None, request_id: str) -> RequestInfo:
        """Return the request if the caller may see it (its owner, or an admin); UnknownRequest otherwise.

        Someone else's request answers as if it did not exist: its id tells nothing.
        """
        principal = self.principal()
        if info is None or not (principal.admin or info.client == self.client()):
            if principal.kind == "anonymous" and not principal.scopes:
                raise refusal(principal, "bulk requests belong to a token's subject")
            raise UnknownRequest(f"no stage request {request_id!r} (never made, or deleted)")
        return info

    # -- submit ------------------------------------------------------------------

    def submit(self, dry_run: bool = False) -> bytes:
        """Check, resolve and durably store a stage request; 201 with its id (``dry_run``: 200, the plan)."""
        store = self.store
        body = _read_json(self.max_body)
        if not isinstance(body, dict) or "files" not in body:
            raise InvalidRequest('the body must be a JSON object with a "files" list')
        files = body["files"]
        if not isinstance(files, list):
            raise InvalidRequest('"files" must be a list')
        if not files:
            raise InvalidRequest('"files" is empty: name at least one file')
        limit = self.policy.max_files_per_request
        if len(files) > limit:
            raise RequestTooLarge(f"the request names {len(files)} files; at most {limit} are accepted")
        with self.heavy("stage", len(files), wait=self.policy.heavy_wait_seconds):
            entries = self._entries(files)
            self.allow((path for path, _ in entries), "stage")
            client = self.client()
            if dry_run:
                return _json(self._stage_plan(client, self._throttle(client, self._resolve(entries))))
            self._check_stored(client)
            resolved = self._throttle(client, self._resolve(entries))
            request_id = store.create_request(client, resolved)
        cherrypy.serving.response.headers["Location"] = f"/api/v1/stage/{request_id}"
        return _json({"requestId": request_id}, 201)

    def _stage_plan(self, client: str, files: list[NewFile]) -> dict[str, Any]:
        """The answer to a stage request's dry run: each file's first state, and the volumes to mount.

        Volumes are listed with their files in tape order, as the scheduler reads
        them. ``storedRequests`` and ``maxStoredRequests`` tell whether the real
        request would first make room (or be refused, 429).
        """
        volumes: dict[str, list[NewFile]] = {}
        for new in files:
            if new.state in (SUBMITTED, DEFERRED) and new.vsn is not None:
                volumes.setdefault(new.vsn, []).append(new)
        stored, _ = self.store.stored_requests(client)
        states: dict[str, int] = {}
        for new in files:
            shown = SUBMITTED if new.state == DEFERRED else new.state
            states[shown] = states.get(shown, 0) + 1
        return {
            "dryRun": True,
            "files": [
                {
                    "path": new.path,
                    # As a poll would show it: a file past the client's in-flight cap is SUBMITTED too.
                    "state": SUBMITTED if new.state == DEFERRED else new.state,
                    **({"deferred": True} if new.state == DEFERRED else {}),
                    **({"error": new.error} if new.error else {}),
                }
                | ({"volume": new.vsn, "position": new.position} if new.vsn is not None else {})
                for new in files
            ],
            "states": states,
            "volumes": [
                {
                    "volume": vsn,
                    "files": len(queued),
                    "bytes": sum(new.size for new in queued),
                    "order": [new.path for new in sorted(queued, key=lambda new: new.position or 0)],
                }
                for vsn, queued in sorted(volumes.items())
            ],
            "storedRequests": stored,
            "maxStoredRequests": self.policy.max_requests_per_client,
        }

    def _throttle(self, client: str, files: list[NewFile]) -> list[NewFile]:
        """Defer the files past the client's in-flight cap: accepted now, recalled as earlier ones finish.

        Never a 429: FTS stages from one address, and fails every file of a job whose
        stage request is refused. The scheduler starts deferred files in request
        order (``BulkStore.activate_deferred``); clients see them SUBMITTED.
        """
        room = self.policy.max_in_flight_per_client - self.store.in_flight(client)
        throttled = []
        for new in files:
            if new.state == SUBMITTED:
                if room <= 0:
                    new = new._replace(state=DEFERRED)
                room -= 1
            throttled.append(new)
        return throttled

    def _check_stored(self, client: str) -> None:
        """Refuse (429) a client that already has ``max_requests_per_client`` requests stored.

        Its own expired requests are purged first, so a client is never refused
        for requests the scheduler's sweep simply has not reached yet; then, if
        it is still full, its oldest finished requests that pin nothing, before
        their retention ends. Only open or pinning requests fill the cap.
        """
        cap, retention = self.policy.max_requests_per_client, self.policy.retention_seconds
        stored, _ = self.store.stored_requests(client)
        if stored < cap:
            return
        self.store.purge_expired(retention, client=client)
        stored, earliest = self.store.stored_requests(client)
        if stored < cap:
            return
        # Still full: its oldest finished requests that pin nothing go before their retention ends,
        # rather than refuse the new one (FTS fails every file of a job whose stage is refused).
        self.store.purge_expired(0.0, client=client, limit=stored - cap + 1)
        stored, earliest = self.store.stored_requests(client)
        if stored < cap:
            return
        # The earliest finished request expires first (unless a pin keeps it a little longer).
        wait = 60 if earliest is None else max(1, math.ceil(earliest + retention - time.time()))
        raise TooManyRequests(
            f"client {client!r} has {stored} stored requests, the most kept per client is {cap}; "
            f"DELETE finished ones, or wait until they expire ({retention:g} s after they finish)",
            retry_after=min(wait, 86400),
        )

    def _entries(self, files: list[Any]) -> list[tuple[str, float]]:
        """Return (sanitised path, pin seconds) per distinct file; InvalidRequest naming a bad entry.

        As dCache and StoRM do, a path named twice is staged once (the first
        entry's lifetime counts), and a ``diskLifetime`` that is no ISO 8601
        duration gets the default pin: the spec lets the server ignore it, and
        refusing would fail every file of an FTS job.
        """
        entries: dict[str, float] = {}
        default, longest = self.policy.default_pin_seconds, self.policy.max_pin_seconds
        for index, entry in enumerate(files):
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise InvalidRequest(f'"files"[{index}] must be an object with a string "path"')
            path = sanitise(entry["path"])
            if len(path) > MAX_PATH:
                raise InvalidRequest(f'"files"[{index}].path is longer than {MAX_PATH} characters')
            if not _storable(path):
                raise InvalidRequest(f'"files"[{index}].path {_UNSTORABLE}')
            if path in entries:
                continue
            entries[path] = default
            lifetime = entry.get("diskLifetime")
            if lifetime is not None:
                with contextlib.suppress(ValueError):
                    entries[path] = min(parse_duration(lifetime), longest)
        return list(entries.items())

    def _resolve(self, entries: list[tuple[str, float]]) -> list[NewFile]:
        """Decide each file's first state: on disk (COMPLETED), queued at a tape position, or FAILED."""
        namespace = self.settings.server.namespace
        ids = {path: file_id_of(path, namespace) for path, _ in entries}
        wanted = sorted({i for i in ids.values() if i is not None})
        # Positions first: in a bulk request most files are offline, and need no other look-up.
        positions = contract.tape_positions(self.backend, wanted)
        where = self.backend.localities([i for i in wanted if i not in positions])
        resolved = []
        for path, pin in entries:
            file_id = ids[path]
            if file_id is None:
                resolved.append(
                    NewFile(path, FAILED, error="not a file path: expected /<id> with a decimal file id")
                )
                continue
            locality = where.get(file_id, "NONE")
            position = positions.get(file_id)
            if locality in ("DISK", "DISK_AND_TAPE"):
                resolved.append(NewFile(path, COMPLETED, file_id, on_disk=True, pin_seconds=pin))
            elif position is not None:
                resolved.append(
                    NewFile(
                        path,
                        SUBMITTED,
                        file_id,
                        position.size,
                        position.vsn,
                        position.position,
                        pin_seconds=pin,
                    )
                )
            else:
                resolved.append(
                    NewFile(path, FAILED, file_id, error=_unrecallable(locality), pin_seconds=pin)
                )
        return resolved

    # -- poll --------------------------------------------------------------------

    def poll(
        self,
        request_id: str,
        limit: str | list[str] | None,
        cursor: str | list[str] | None,
        state: str | list[str] | None,
    ) -> bytes:
        """Return a request's state: its files (one page) and the summary."""
        store = self.store
        page = _positive(limit, "limit", MAX_PAGE) if limit is not None else None
        after = _cursor(cursor)
        states = _states(state)
        info = self.own(store.request(request_id) if _REQUEST_ID.fullmatch(request_id) else None, request_id)
        # The page is what costs; the summary is an index-only query.
        with self.heavy("poll", min(info.files, page or info.files)):
            files, next_row = store.files(request_id, page, after, states)
            summary = store.summary(request_id)
        open_files = sum(summary.states[s] for s in ACTIVE_STATES)  # deferred files count as SUBMITTED
        # startedAt is mandatory: createdAt until a file starts, as the spec says. completedAt is
        # optional, so absent (not null) while the request is open.
        document: dict[str, Any] = {
            "id": info.id,
            "createdAt": _epoch(info.created_at),
            "startedAt": _epoch(info.started_at if info.started_at is not None else info.created_at),
        }
        if info.completed_at is not None:
            document["completedAt"] = _epoch(info.completed_at)
        document |= {
            "files": [_file_document(f) for f in files],
            "summary": {
                "files": info.files,
                "states": summary.states,
                "bytesTotal": summary.bytes_total,
                "bytesDone": summary.bytes_done,
                "volumesTotal": summary.volumes_total,
                "volumesDone": summary.volumes_done,
                "etaSeconds": _eta(info.started_at, summary.bytes_total, summary.bytes_done, open_files),
            },
            "nextCursor": None if next_row is None else str(next_row),
        }
        return _json(document)

    # -- cancel, delete, release -------------------------------------------------

    def cancel(self, request_id: str, dry_run: bool = False) -> bytes:
        """Cancel the named files of a request (all or nothing); ``dry_run``: name the files it would."""
        paths = _paths_of(_read_json(self.max_body), self.policy.max_files_per_request)
        self.own(self.store.request(request_id) if _REQUEST_ID.fullmatch(request_id) else None, request_id)
        if dry_run:
            touched = self._plan(request_id, paths, pinned=False, refused="nothing would be cancelled")
            return _json({"dryRun": True, "requestId": request_id, "cancelled": touched})
        with self.heavy("cancel", len(paths)):
            unknown = self.store.cancel(request_id, paths) if _REQUEST_ID.fullmatch(request_id) else None
        if unknown is None:
            raise UnknownRequest(f"no stage request {request_id!r} (never made, or deleted)")
        if unknown:
            raise InvalidRequest(
                f"request {request_id} does not hold these paths, so nothing was cancelled: {_name(unknown)}"
            )
        return _json({"requestId": request_id})

    def delete(self, request_id: str, dry_run: bool = False) -> bytes:
        """Cancel what is still open, drop the request's pins and forget it; ``dry_run``: say what."""
        info = self.own(
            self.store.request(request_id) if _REQUEST_ID.fullmatch(request_id) else None, request_id
        )
        if dry_run:
            open_paths = self._plan(request_id, None, pinned=False)
            pinned = self._plan(request_id, None, pinned=True)
            return _json(
                {"dryRun": True, "requestId": request_id, "files": info.files, "cancelled": open_paths,
                 "releasedPins": pinned}
            )  # fmt: skip
        with self.heavy("delete", info.files):
            if not self.store.delete(request_id):
                raise UnknownRequest(f"no stage request {request_id!r} (never made, or deleted)")
        return _json({"requestId": request_id})

    def release(self, request_id: str, dry_run: bool = False) -> bytes:
        """Drop the request's pins on the named files; disk space may then be reclaimed.

        ``dry_run``: name the files whose pins it would drop, and change nothing.

        An id that names no request (gfal2 sends ``gfal2-placeholder-id`` when
        it has none, and dCache answers every release with 200) drops the
        caller's own pins on those paths instead: 200, with how many there were.
        """
        paths = _paths_of(_read_json(self.max_body), self.policy.max_files_per_request)
        info = self.store.request(request_id) if _REQUEST_ID.fullmatch(request_id) else None
        if info is not None:
            self.own(info, request_id)
        if dry_run:
            if info is None:
                self.allow(paths, "stage")
                held = self.store.own_pins(self.client(), paths)
                return _json({"dryRun": True, "requestId": request_id, "releasedPins": held})
            touched = self._plan(request_id, paths, pinned=True, refused="no pin would be released")
            return _json({"dryRun": True, "requestId": request_id, "released": touched})
        with self.heavy("release", len(paths)):
            unknown = self.store.release(request_id, paths) if info is not None else None
            if unknown is None:
                self.allow(paths, "stage")
                released = self.store.release_own(self.client(), paths)
                return _json({"requestId": request_id, "releasedPins": released})
        if unknown:
            raise InvalidRequest(
                f"request {request_id} does not hold these paths, so no pin was released: {_name(unknown)}"
            )
        return _json({"requestId": request_id})

    def _plan(self, request_id: str, paths: list[str] | None, pinned: bool, refused: str = "") -> list[str]:
        """The paths a dry run would touch; InvalidRequest (saying ``refused``) naming paths it lacks.

        UnknownRequest when the request went meanwhile.
        """
        found = self.store.plan(request_id, paths, pinned=pinned)
        if found is None:
            raise UnknownRequest(f"no stage request {request_id!r} (never made, or deleted)")
        unknown, touched = found
        if unknown:
            raise InvalidRequest(
                f"request {request_id} does not hold these paths, so {refused}: {_name(unknown)}"
            )
        return touched

    # -- archiveinfo and queues ------------------------------------------------

    def archiveinfo(self) -> bytes:
        """Report each path's locality, or an error for a path that names no file.

        Past ``max_files_per_request`` paths the answer covers the first ones
        only: the spec forbids an error for asking about too many.
        """
        paths = _paths_of(_read_json(self.max_body), self.policy.max_files_per_request, truncate=True)
        self.allow(paths, "read", "stage", "poll")
        with self.heavy("archiveinfo", len(paths)):
            ids = {path: file_id_of(path, self.settings.server.namespace) for path in paths}
            where = self.backend.localities(sorted({i for i in ids.values() if i is not None}))
            lost = self._inventory_lost(
                sorted({i for i in ids.values() if i is not None and where.get(i, "NONE") == "NONE"})
            )
            answers = []
            for path in paths:
                file_id = ids[path]
                if file_id is None:
                    answers.append(
                        {"path": path, "error": "not a file path: expected /<id> with a decimal file id"}
                    )
                    continue
                locality = where.get(file_id, "NONE")
                if locality == "NONE" and file_id in lost:
                    locality = "LOST"
                if locality == "NONE":
                    # The spec's NONE is an empty file; a file that does not exist gets an error.
                    answers.append({"path": path, "error": "no such file in the archive"})
                else:
                    answers.append({"path": path, "locality": locality})
            return _json(answers)

    def _inventory_lost(self, file_ids: list[int]) -> set[int]:
        """Return which of ``file_ids`` the catalog's inventory marked LOST (an audit found them gone).

        One batched look-up: asking per file cost ~0.4 ms each, 40 s for 100,000 unknown paths.
        """
        if self._store is None or not file_ids:
            return set()
        try:
            return self._store.lost(file_ids)
        except ArchiveError:
            return set()

    def queues(self) -> bytes:
        """Report the recall queue of each volume (admins only: it describes the installation)."""
        principal = self.principal()
        if not principal.admin:
            raise refusal(principal, "the recall queues are for admins (wlcg.groups in admin_groups)")
        now = time.time()
        lease = self.policy.recall_timeout + 60.0
        volumes = [
            {
                "vsn": q.vsn,
                "files": q.files,
                "bytes": q.bytes,
                "oldestAgeSeconds": max(0, int(now - q.oldest_queued_at)),
                "mounted": q.mounted,
            }
            for q in self.store.queues(lease, now)
        ]
        return _json({"volumes": volumes})

    def well_known(self) -> bytes:
        """Describe the endpoint and its limits; the ``uri`` is ``[server] public_url``'s when it is set."""
        base = self.settings.server.public_url or cherrypy.serving.request.base
        endpoint = {
            "uri": f"{base}/api/v1",
            "version": "v1",
            "metadata": {
                "maxFilesPerRequest": self.policy.max_files_per_request,
                "maxInFlightPerClient": self.policy.max_in_flight_per_client,
                "minPollSeconds": self.policy.min_poll_seconds,
                "maxRequestsPerClient": self.policy.max_requests_per_client,
                # The spec leaves retention to the server: finished requests are kept this long.
                "requestRetentionSeconds": self.policy.retention_seconds,
            },
        }
        document = {
            "sitename": self.policy.site_name,
            "description": "pacifica_like archive gateway: WLCG Tape REST API v1, recalls in tape order",
            "endpoints": [endpoint],
        }
        return _json(document)


def _unrecallable(locality: str) -> str:
    if locality == "LOST":
        return "every tape copy of the file failed its checksum; it cannot be recalled"
    if locality == "UNAVAILABLE":
        return "the storage could not say where the file is (unavailable); submit it again later"
    if locality == "TAPE":
        return "the file has no undamaged tape copy to recall from"
    return "no such file in the archive"


def _single(raw: str | list[str], name: str) -> str:
    """Return a query parameter given once; CherryPy makes a repeated one a list."""
    if isinstance(raw, list):
        raise InvalidRequest(f"{name} is given {len(raw)} times; give it once")
    return raw


def _decimal(raw: str) -> bool:
    # str.isdigit() also takes digits int() refuses ("²") and other scripts' digits.
    return raw.isascii() and raw.isdigit()


def _positive(raw: str | list[str], name: str, most: int) -> int:
    raw = _single(raw, name)
    # The length first: int() refuses strings past 4,300 digits (ValueError, not our 400).
    if not _decimal(raw) or len(raw) > 19 or not 1 <= int(raw) <= most:
        raise InvalidRequest(f"{name} must be an integer from 1 to {most}, got {raw[:40]!r}")
    return int(raw)


def _cursor(raw: str | list[str] | None) -> int:
    if raw is None:
        return 0
    raw = _single(raw, "cursor")
    if raw == "":
        return 0
    # Row ids are signed 64-bit: a larger number is no cursor of ours (and overflows the driver).
    if not _decimal(raw) or len(raw) > 19 or int(raw) > MAX_ID:
        raise InvalidRequest(f"cursor {raw[:40]!r} is not one this server handed out (use nextCursor)")
    return int(raw)


def _states(raw: str | list[str] | None) -> list[str]:
    if raw is None:
        return []
    values = raw if isinstance(raw, list) else [raw]
    states = [s.strip().upper() for value in values for s in value.split(",") if s.strip()]
    unknown = [s for s in states if s not in FILE_STATES]
    if unknown:
        raise InvalidRequest(f"unknown state {unknown[0]!r}; expected one of {', '.join(FILE_STATES)}")
    return states


def _file_document(f: Any) -> dict[str, Any]:
    """One file of a poll: its ``state`` and never ``onDisk`` (the spec makes them exclusive).

    gfal2 reads ``onDisk`` first when both are there, so a COMPLETED file whose
    pin was later released would poll as not on disk forever. Times are left
    out rather than null until they exist.
    """
    document: dict[str, Any] = {"path": f.path, "state": f.state}
    if f.error is not None and f.state in (FAILED, CANCELLED):
        document["error"] = f.error
    if f.started_at is not None:
        document["startedAt"] = _epoch(f.started_at)
    if f.finished_at is not None:
        document["finishedAt"] = _epoch(f.finished_at)
    return document


def _eta(started_at: float | None, total: int, done: int, open_files: int) -> int | None:
    """Seconds left at the rate bytes arrived so far; None until there is a rate to go by."""
    if open_files == 0:
        return 0
    if started_at is None or done <= 0:
        return None
    elapsed = max(time.time() - started_at, 1e-3)
    return int((total - done) / (done / elapsed)) + 1


# -- the CherryPy tree ---------------------------------------------------------------


class WellKnownRoot:
    """``/.well-known/``: CherryPy turns ``-`` and ``.`` in path segments into ``_``."""

    def __init__(self, api: BulkAPI) -> None:
        self._api = api

    @_handler
    def wlcg_tape_rest_api(self, path: tuple[str, ...], params: dict[str, Any]) -> bytes:
        """The discovery document."""
        if path:
            raise cherrypy.NotFound()
        _allow(cherrypy.serving.request.method, "GET", "HEAD")
        return self._api.well_known()


class ApiV1:
    """``/api/v1/``: stage, release, archiveinfo, queues."""

    def __init__(self, api: BulkAPI) -> None:
        self._api = api

    @_handler
    def stage(self, path: tuple[str, ...], params: dict[str, Any]) -> bytes:
        """POST (submit), GET (poll), DELETE, and POST .../cancel."""
        method = cherrypy.serving.request.method
        if len(path) > 2 or (len(path) == 2 and path[1] != "cancel"):
            raise cherrypy.NotFound()
        dry_run = httpfields.parse_dry_run(cherrypy.serving.request.query_string)
        if not path:
            _allow(method, "POST")
            return self._api.submit(dry_run)
        request_id = path[0]
        if len(path) == 2:
            _allow(method, "POST")
            return self._api.cancel(request_id, dry_run)
        _allow(method, "GET", "HEAD", "DELETE")
        if method == "DELETE":
            return self._api.delete(request_id, dry_run)
        return self._api.poll(request_id, params.get("limit"), params.get("cursor"), params.get("state"))

    @_handler
    def release(self, path: tuple[str, ...], params: dict[str, Any]) -> bytes:
        """POST /api/v1/release/<id>."""
        if len(path) != 1:
            raise cherrypy.NotFound()
        _allow(cherrypy.serving.request.method, "POST")
        return self._api.release(path[0], httpfields.parse_dry_run(cherrypy.serving.request.query_string))

    @_handler
    def archiveinfo(self, path: tuple[str, ...], params: dict[str, Any]) -> bytes:
        """POST /api/v1/archiveinfo."""
        if path:
            raise cherrypy.NotFound()
        _allow(cherrypy.serving.request.method, "POST")
        return self._api.archiveinfo()

    @_handler
    def queues(self, path: tuple[str, ...], params: dict[str, Any]) -> bytes:
        """GET /api/v1/queues."""
        if path:
            raise cherrypy.NotFound()
        _allow(cherrypy.serving.request.method, "GET", "HEAD")
        return self._api.queues()


class ApiRoot:
    """``/api/``."""

    def __init__(self, api: BulkAPI) -> None:
        self.v1 = ApiV1(api)


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        cherrypy.serving.response.headers["Allow"] = ", ".join(allowed)
        raise cherrypy.HTTPError(405, f"{method} is not supported here; use {' or '.join(allowed)}")


#: First path segments the bulk API serves (``FileAPI.fallback_names``).
PATHS = frozenset((".well-known", "api"))


def mount(root: object, config: dict[str, dict[str, Any]], settings: Settings, backend: Backend) -> BulkAPI:
    """Attach the bulk API under ``root`` (the CherryPy root object) and its error rendering to ``config``.

    ``backend`` is the storage backend itself. The store uses the catalog
    database of ``[archive] catalog``; with the catalog off every bulk call answers 501.
    """
    store = BulkStore.open(settings.archive.catalog) if settings.archive.catalog else None
    api = BulkAPI(settings, backend, store)
    root._well_known = WellKnownRoot(api)  # type: ignore[attr-defined]
    root.api = ApiRoot(api)  # type: ignore[attr-defined]
    for path in ("/.well-known", "/api"):
        config[path] = errors.cherrypy_config(errors.PROBLEM)
    return api
