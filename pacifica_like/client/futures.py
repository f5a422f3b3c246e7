"""The client's calls as futures: :class:`AsyncArchiveClient`, a bounded pool over one ArchiveClient."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, TypeVar

from pacifica_like.client.models import Download, FileId, FileInfo, Locality, StagedFile, Upload
from pacifica_like.client.sync import ArchiveClient
from pacifica_like.client.transfer import BodySource

T = TypeVar("T")


class AsyncArchiveClient:
    """The client's calls as futures: ``max_in_flight`` threads over one ArchiveClient (one session).

    Every method submits the synchronous call and returns its Future at once;
    at most ``max_in_flight`` run (and so hold a connection) at a time, the rest
    wait their turn in submission order. ``client`` is the synchronous client
    underneath, for calls that should not wait in the queue. Closing waits for
    submitted calls, then closes the session::

        with AsyncArchiveClient("http://archive:8080", max_in_flight=8) as archive:
            futures = [archive.put(i, path) for i, path in enumerate(paths)]
            for future in concurrent.futures.as_completed(futures):
                future.result()  # raises the call's error
    """

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        max_in_flight: int = 8,
        client_id: str | None = None,
        token: str | None = None,
    ) -> None:
        self.client = ArchiveClient(
            url, timeout=timeout, max_in_flight=max_in_flight, client_id=client_id, token=token
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_in_flight, thread_name_prefix="archive-client"
        )

    def __enter__(self) -> AsyncArchiveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, cancel_pending: bool = False) -> None:
        """Wait for running calls (dropping queued ones with ``cancel_pending``), then close the session."""
        self._pool.shutdown(wait=True, cancel_futures=cancel_pending)
        self.client.close()

    def submit(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Run any callable (e.g. a method of ``self.client``) on the bounded pool."""
        return self._pool.submit(call, *args, **kwargs)

    def put(self, file_id: FileId, source: BodySource, **kwargs: Any) -> concurrent.futures.Future[Upload]:
        """:meth:`ArchiveClient.put` as a future."""
        return self.submit(self.client.put, file_id, source, **kwargs)

    def get(
        self, file_id: FileId, dest: str | os.PathLike[str] | BinaryIO, **kwargs: Any
    ) -> concurrent.futures.Future[Download]:
        """:meth:`ArchiveClient.get` as a future."""
        return self.submit(self.client.get, file_id, dest, **kwargs)

    def stat(self, file_id: FileId) -> concurrent.futures.Future[FileInfo]:
        """:meth:`ArchiveClient.stat` as a future."""
        return self.submit(self.client.stat, file_id)

    def stage(self, file_id: FileId, **kwargs: Any) -> concurrent.futures.Future[bool]:
        """:meth:`ArchiveClient.stage` as a future."""
        return self.submit(self.client.stage, file_id, **kwargs)

    def move(self, file_id: FileId, path: str | os.PathLike[str]) -> concurrent.futures.Future[None]:
        """:meth:`ArchiveClient.move` as a future."""
        return self.submit(self.client.move, file_id, path)

    def delete(self, file_id: FileId) -> concurrent.futures.Future[None]:
        """:meth:`ArchiveClient.delete` as a future."""
        return self.submit(self.client.delete, file_id)

    def archiveinfo(self, ids: Iterable[FileId]) -> concurrent.futures.Future[list[Locality]]:
        """:meth:`ArchiveClient.archiveinfo` as a future."""
        return self.submit(self.client.archiveinfo, list(ids))

    def stage_many(
        self, ids: Iterable[FileId], **kwargs: Any
    ) -> concurrent.futures.Future[dict[FileId, StagedFile]]:
        """:meth:`ArchiveClient.stage_many` as a future (it holds one worker while it follows)."""
        return self.submit(self.client.stage_many, list(ids), **kwargs)
