"""What the client's calls return: frozen dataclasses built from the server's headers and JSON.

Times are epoch seconds. The bulk API's documents (``GET /api/v1/stage/<id>``)
are read by each class's ``from_json``, so their field names live here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: A file id as the calls take it: ``5``, ``"5"``, or the bulk API's path ``"/5"``.
FileId = int | str
#: A bulk request's file states; the last three are final.
FILE_STATES = ("SUBMITTED", "STARTED", "COMPLETED", "FAILED", "CANCELLED")
TERMINAL_STATES = frozenset(("COMPLETED", "FAILED", "CANCELLED"))


def file_path(file_id: FileId) -> str:
    """Return the bulk API's path for an id: ``5`` -> ``"/5"``; a string starting with ``/`` stays as is."""
    text = str(file_id)
    return text if text.startswith("/") else "/" + text


@dataclass(frozen=True)
class FileInfo:
    """A file's status as HEAD reports it. Times are epoch seconds."""

    file_id: str
    size: int
    mtime: float
    ctime: float
    relpath: str
    bytes_on_disk: int
    bytes_on_tape: int
    media: str
    state: str | None = None
    etag: str | None = None
    sha256: str | None = None

    @property
    def on_disk(self) -> bool:
        """Whether a GET streams at once (no recall from tape needed)."""
        return self.media == "disk"


@dataclass(frozen=True)
class Upload:
    """What a PUT stored: the bytes the server counted and the sha-256 it checked, if any."""

    file_id: str
    total_bytes: int
    sha256: str | None


@dataclass(frozen=True)
class Download:
    """What a GET delivered: bytes written, the sha-256 computed, whether it matched the server's."""

    file_id: str
    size: int
    mtime: float | None
    sha256: str | None
    verified: bool
    path: str | None = None


@dataclass(frozen=True)
class Locality:
    """Where ``archiveinfo`` puts a file (DISK, TAPE, DISK_AND_TAPE, LOST, NONE, UNAVAILABLE), or why not."""

    path: str
    locality: str | None
    error: str | None = None


@dataclass(frozen=True)
class TapeRestInfo:
    """The bulk API's discovery document: where it lives and the limits clients must respect."""

    sitename: str
    description: str
    endpoint: str
    version: str
    max_files_per_request: int
    max_in_flight_per_client: int
    min_poll_seconds: float


@dataclass(frozen=True)
class StagedFile:
    """One file of a bulk request: its state, whether it is on disk, why it failed. Times epoch seconds."""

    path: str
    state: str
    on_disk: bool | None = None
    error: str | None = None
    started_at: int | None = None
    finished_at: int | None = None

    @property
    def done(self) -> bool:
        """Whether the file reached a final state."""
        return self.state in TERMINAL_STATES

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> StagedFile:
        """Build from one entry of the request's ``files``."""
        # Servers send state or onDisk, never both (the spec): each is derived from the other.
        on_disk = entry.get("onDisk")
        state = entry.get("state")
        if state is None:
            state = "COMPLETED" if on_disk else "FAILED" if entry.get("error") else "SUBMITTED"
        elif on_disk is None:
            on_disk = state == "COMPLETED"
        return cls(
            path=entry["path"],
            state=state,
            on_disk=on_disk,
            error=entry.get("error"),
            started_at=entry.get("startedAt"),
            finished_at=entry.get("finishedAt"),
        )


@dataclass(frozen=True)
class StageSummary:
    """A bulk request's progress: files by state, bytes and volumes done, the server's ETA."""

    files: int
    states: Mapping[str, int]
    bytes_total: int = 0
    bytes_done: int = 0
    volumes_total: int = 0
    volumes_done: int = 0
    eta_seconds: float | None = None

    @property
    def pending(self) -> int:
        """Files not yet in a final state."""
        return self.files - sum(self.states.get(state, 0) for state in TERMINAL_STATES)

    @classmethod
    def from_json(cls, summary: Mapping[str, Any]) -> StageSummary:
        """Build from the request's ``summary`` object."""
        return cls(
            files=summary["files"],
            states=dict(summary.get("states") or {}),
            bytes_total=summary.get("bytesTotal") or 0,
            bytes_done=summary.get("bytesDone") or 0,
            volumes_total=summary.get("volumesTotal") or 0,
            volumes_done=summary.get("volumesDone") or 0,
            eta_seconds=summary.get("etaSeconds"),
        )


@dataclass(frozen=True)
class StagePage:
    """One page of a bulk request: its times, a page of its files, its summary, the next page's cursor."""

    request_id: str
    created_at: int | None
    started_at: int | None
    completed_at: int | None
    files: list[StagedFile]
    summary: StageSummary
    next_cursor: str | None

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> StagePage:
        """Build from ``GET /api/v1/stage/<id>``'s answer."""
        cursor = document.get("nextCursor")
        return cls(
            request_id=str(document["id"]),
            created_at=document.get("createdAt"),
            started_at=document.get("startedAt"),
            completed_at=document.get("completedAt"),
            files=[StagedFile.from_json(entry) for entry in document.get("files") or ()],
            summary=StageSummary.from_json(document["summary"]),
            next_cursor=None if cursor in (None, "") else str(cursor),
        )


@dataclass(frozen=True)
class StageProgress:
    """What ``stage_many`` hands its progress callback after every poll: totals over its requests."""

    files: int
    states: Mapping[str, int]
    bytes_total: int
    bytes_done: int
    eta_seconds: float | None
    request_ids: tuple[str, ...]
    #: Files not yet submitted because of the server's in-flight limit.
    waiting: int = 0

    @property
    def done(self) -> int:
        """Files in a final state."""
        return sum(self.states.get(state, 0) for state in TERMINAL_STATES)


def progress_of(summaries: Mapping[str, StageSummary], files: int, waiting: int) -> StageProgress:
    """Return the totals over a ``stage_many``'s requests; ``waiting`` files are not yet submitted."""
    states: dict[str, int] = dict.fromkeys(FILE_STATES, 0)
    for summary in summaries.values():
        for state, count in summary.states.items():
            states[state] = states.get(state, 0) + count
    states["SUBMITTED"] += waiting
    etas = [s.eta_seconds for s in summaries.values() if s.eta_seconds is not None and s.pending]
    return StageProgress(
        files=files,
        states=states,
        bytes_total=sum(s.bytes_total for s in summaries.values()),
        bytes_done=sum(s.bytes_done for s in summaries.values()),
        eta_seconds=max(etas) if etas else None,
        request_ids=tuple(summaries),
        waiting=waiting,
    )
