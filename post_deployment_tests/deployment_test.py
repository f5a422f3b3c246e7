"""Black-box post-deployment tests for a Pacifica-compatible archive gateway.

Point it at any live deployment and run it:

    ARCHIVE_URL=http://host:port pytest post_deployment_tests

Settings (environment variables):

* ``ARCHIVE_URL``: the gateway's base URL (default ``http://127.0.0.1:8080``).
* ``LARGE_FILE_SIZE``: bytes in the large round trip (default 1 GiB).
* ``MANY_FILES_TEST_COUNT``: files in the concurrent round trip (default 1000).
* ``BEARER_TOKEN`` (optional): a token sent with every request (``Authorization:
  Bearer``), for a gateway that checks identity; it needs ``storage.read``,
  ``storage.modify`` and ``storage.stage`` on every file (``storage.read:/`` ...).
* ``ARCHIVE_PATCH_DIR`` (optional): a directory inside the server's patch roots
  that this process sees at the same path (same host or a shared mount). Only
  the PATCH success test needs it; without it that test is skipped.

Select tests by marker (listed in conftest.py), e.g. ``-m smoke`` for a quick look
or ``-m "not large"`` to skip the big transfer.

Why it is safe to run against a production archive:

* only ``requests`` and the standard library; every network call has a timeout;
* every id is a fresh random 62-bit number, recorded before first use, and every
  recorded id is DELETEd when the session ends (a server that answers 405 forbids
  deletes, so nothing can be removed there and the suite warns instead);
* PATCH is only pointed at paths that do not exist, so even a server with wrong
  patch roots cannot be made to move a real file into the archive;
* each request uses a fresh connection (``Connection: close``): a keep-alive
  problem shows up in its one dedicated test, not as random resets elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

ARCHIVE_URL = os.environ.get("ARCHIVE_URL", "http://127.0.0.1:8080").rstrip("/")
LARGE_FILE_SIZE = int(os.environ.get("LARGE_FILE_SIZE", str(1 << 30)))
MANY_FILES_TEST_COUNT = int(os.environ.get("MANY_FILES_TEST_COUNT", "1000"))
PATCH_DIR = os.environ.get("ARCHIVE_PATCH_DIR") or None
BEARER_TOKEN = os.environ.get("BEARER_TOKEN", "").strip()
#: Sent with every request when a token is given.
AUTHORIZATION = {"Authorization": f"Bearer {BEARER_TOKEN}"} if BEARER_TOKEN else {}

#: (connect, read) seconds; "read" is the longest silence allowed between bytes.
TIMEOUT = (10, 60)
#: For the large transfer: the server may fsync the whole file before it answers.
LARGE_TIMEOUT = (10, 900)
WORKERS = 16
CHUNK = 1 << 20
MAX_ID = 2**63 - 1

#: One instant in the three formats HTTP allows (RFC 9110 section 5.6.7).
PUT_DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
PUT_DATE_RFC850 = "Sunday, 06-Nov-94 08:49:37 GMT"
PUT_DATE_ASCTIME = "Sun Nov  6 08:49:37 1994"
PUT_EPOCH = 784111777.0
HEALTH_MESSAGE = "Pacifica Archive Interface Up and Running"

# Header names exactly as Pacifica clients read them (sic: three s in "Messsage").
HEAD_HEADERS = (
    "X-Pacifica-Messsage",
    "X-Pacifica-File",
    "X-Content-Length",
    "Last-Modified",
    "X-Pacifica-Ctime",
    "X-Pacifica-Bytes-Per-Level",
    "X-Pacifica-File-Storage-Media",
    "ETag",
    "Repr-Digest",
)

# --------------------------------------------------------------------------- helpers


def b64(raw: bytes) -> str:
    """Return standard base64 text, the encoding every digest header uses."""
    return base64.b64encode(raw).decode("ascii")


def sha256(data: bytes) -> bytes:
    """Return the raw sha-256 of ``data``."""
    return hashlib.sha256(data).digest()


def payload(seed: int, size: int) -> bytes:
    """Return ``size`` pseudo-random bytes fixed by ``seed``, so a failure can be replayed."""
    return random.Random(seed).randbytes(size)


def parse_repr_digest(value: str | None) -> dict[str, bytes]:
    """Return algorithm -> raw digest from an RFC 9530 ``Repr-Digest`` value."""
    found: dict[str, bytes] = {}
    for member in (value or "").split(","):
        match = re.fullmatch(r"\s*([A-Za-z0-9-]+)=:([A-Za-z0-9+/=]*):\s*", member)
        if match:
            found[match.group(1).lower()] = base64.b64decode(match.group(2))
    return found


def repr_sha256(answer: requests.Response) -> bytes | None:
    """Return the sha-256 the response's ``Repr-Digest`` claims, if any."""
    return parse_repr_digest(answer.headers.get("Repr-Digest")).get("sha-256")


def describe(answer: requests.Response) -> str:
    """Summarise a response for an assertion message: request, status, headers, body start."""
    body = "" if answer.request.method == "HEAD" else answer.text[:400]
    return (
        f"{answer.request.method} {answer.request.url} -> {answer.status_code}\n"
        f"headers: {dict(answer.headers)}\nbody: {body!r}"
    )


def assert_json_error(answer: requests.Response, status: int) -> dict[str, Any]:
    """Check an error is the contract's JSON ``{"status", "message"}``, never a traceback."""
    assert answer.status_code == status, describe(answer)
    if answer.request.method == "HEAD":
        return {}
    content_type = answer.headers.get("Content-Type", "").split(";")[0].strip()
    assert content_type == "application/json", describe(answer)
    assert "Traceback" not in answer.text, describe(answer)
    document = answer.json()
    assert document.get("status") == status, describe(answer)
    assert isinstance(document.get("message"), str), describe(answer)
    assert document["message"], describe(answer)
    return document


def peak_rss_bytes() -> int | None:
    """Return this process's peak resident memory, or None where the OS cannot say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Archive:
    """The deployment under test: exact request shapes, and the ids this run used."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._random = random.SystemRandom()

    def new_id(self) -> int:
        """Return a random 62-bit id no other run will pick, remembered for cleanup."""
        with self._lock:
            while True:
                file_id = self._random.getrandbits(62)
                if file_id >= 1 << 40 and file_id not in self._ids:
                    self._ids.add(file_id)
                    return file_id

    def request(
        self,
        method: str,
        target: int | str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        stream: bool = False,
        timeout: tuple[float, float] = TIMEOUT,
    ) -> requests.Response:
        """Send one request on a fresh connection to ``/<target>``, sent byte for byte.

        ``target`` is an id or a raw path (with query). The URL is set after
        preparing so requests cannot normalise it: ``%2E%2E`` must reach the
        server as written, not as ``..`` resolved away on the client.
        """
        url = f"{self.base_url}/{target}"
        prepared = requests.Request(
            method, url, headers={"Connection": "close", **AUTHORIZATION, **(headers or {})}, data=data
        ).prepare()
        prepared.url = url
        with requests.Session() as session:
            return session.send(prepared, stream=stream, timeout=timeout, allow_redirects=False)

    def put(
        self,
        file_id: int | str,
        body: Any,
        date: str | None = PUT_DATE,
        headers: Mapping[str, str] | None = None,
        timeout: tuple[float, float] = TIMEOUT,
    ) -> requests.Response:
        """PUT ``body``, with ``Last-Modified: date`` unless ``date`` is None."""
        all_headers = dict(headers or {})
        if date is not None:
            all_headers["Last-Modified"] = date
        return self.request("PUT", file_id, headers=all_headers, data=body, timeout=timeout)

    def patch(self, file_id: int | str, body: bytes, content_type: str | None) -> requests.Response:
        """PATCH a raw body with the given content type (None sends no Content-Type)."""
        headers = {} if content_type is None else {"Content-Type": content_type}
        return self.request("PATCH", file_id, headers=headers, data=body)

    def store(self, file_id: int, body: bytes) -> None:
        """PUT and insist it worked: setup for tests that check something else."""
        answer = self.put(file_id, body)
        assert answer.status_code == 201, describe(answer)
        assert answer.json().get("total_bytes") == len(body), describe(answer)

    def assert_holds(self, file_id: int, body: bytes) -> None:
        """Check GET returns exactly ``body`` and a Repr-Digest for it."""
        got = self.request("GET", file_id)
        assert got.status_code == 200, describe(got)
        assert sha256(got.content) == sha256(body), f"{file_id}: got {len(got.content)} other bytes"
        assert repr_sha256(got) == sha256(body), describe(got)

    def assert_absent(self, file_id: int) -> None:
        """Check nothing is stored under ``file_id``."""
        assert_json_error(self.request("GET", file_id), 404)

    def cleanup(self) -> tuple[list[str], bool]:
        """DELETE every id this run used; return (failures, whether deletes are forbidden)."""
        with self._lock:
            ids = sorted(self._ids)
        forbidden = threading.Event()

        def remove(file_id: int) -> str | None:
            if forbidden.is_set():
                return None
            try:
                answer = self.request("DELETE", file_id)
            except requests.RequestException as exc:
                return f"DELETE {file_id}: {exc!r}"
            if answer.status_code == 405:
                forbidden.set()
            elif answer.status_code not in (200, 404):
                return describe(answer)
            return None

        with ThreadPoolExecutor(WORKERS) as pool:
            failures = [failure for failure in pool.map(remove, ids) if failure]
        return failures, forbidden.is_set()


@dataclass(frozen=True)
class StoredFile:
    """A file the suite stored for read-only checks."""

    id: int
    body: bytes

    @property
    def sha256(self) -> bytes:
        """The body's raw sha-256."""
        return sha256(self.body)


class StreamedPayload:
    """Deterministic pseudo-random bytes made chunk by chunk, hashed as they go out.

    Only one chunk and a short tail are ever in memory, so a 1 GiB upload costs
    the test process about one chunk.
    """

    def __init__(self, seed: int, size: int, chunk: int = CHUNK, keep_tail: int = 4096) -> None:
        self.seed = seed
        self.size = size
        self.chunk = chunk
        self.keep_tail = keep_tail
        self.sent = 0
        self.tail = b""
        self._hash = hashlib.sha256()

    def chunks(self) -> Iterator[bytes]:
        """Yield the payload; a generator makes requests send it chunked."""
        rng = random.Random(self.seed)
        remaining = self.size
        while remaining:
            block = rng.randbytes(min(self.chunk, remaining))
            self._hash.update(block)
            self.tail = (self.tail + block[-self.keep_tail :])[-self.keep_tail :]
            self.sent += len(block)
            remaining -= len(block)
            yield block

    @property
    def sha256(self) -> bytes:
        """The digest of everything yielded so far."""
        return self._hash.digest()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def archive() -> Iterator[Archive]:
    """The deployment, checked to be up; DELETEs every id the run used at the end."""
    client = Archive(ARCHIVE_URL)
    try:
        client.request("GET", "")
    except requests.RequestException as exc:
        pytest.exit(f"no archive answers at ARCHIVE_URL={ARCHIVE_URL}: {exc}", returncode=2)
    yield client
    failures, forbidden = client.cleanup()
    if forbidden:
        warnings.warn(
            f"{ARCHIVE_URL} forbids DELETE (405): files this run stored remain in the archive",
            stacklevel=1,
        )
    assert not failures, "cleanup failed:\n" + "\n".join(failures[:10])


@pytest.fixture(scope="session")
def write_once(archive: Archive) -> bool:
    """Find out by trying whether the archive refuses overwrites (409)."""
    file_id = archive.new_id()
    archive.store(file_id, b"first version")
    answer = archive.put(file_id, b"second version")
    assert answer.status_code in (201, 409), describe(answer)
    return answer.status_code == 409


@pytest.fixture(scope="module")
def sample(archive: Archive) -> StoredFile:
    """A 10000-byte file the read-only tests share."""
    file_id = archive.new_id()
    stored = StoredFile(file_id, payload(file_id, 10_000))
    archive.store(stored.id, stored.body)
    return stored


# --------------------------------------------------------------------------- smoke


@pytest.mark.smoke
def test_health_check_says_up(archive: Archive) -> None:
    """``GET /`` is what load balancers poll: exact JSON message."""
    answer = archive.request("GET", "")
    assert answer.status_code == 200, describe(answer)
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json() == {"message": HEALTH_MESSAGE}


@pytest.mark.smoke
@pytest.mark.parametrize("size", [0, 1, 4096, CHUNK + 17])
def test_round_trip_returns_the_bytes_sent(archive: Archive, size: int) -> None:
    """PUT then GET gives the same bytes, and Repr-Digest is their sha-256."""
    file_id = archive.new_id()
    body = payload(file_id, size)
    answer = archive.put(file_id, body)
    assert answer.status_code == 201, describe(answer)
    assert answer.json() == {"message": "File added to archive", "total_bytes": size}
    archive.assert_holds(file_id, body)


# --------------------------------------------------------------------------- contract: reads


@pytest.mark.contract
def test_get_headers(archive: Archive, sample: StoredFile) -> None:
    """GET carries what download clients rely on, Last-Modified being the PUT's date."""
    got = archive.request("GET", sample.id)
    assert got.status_code == 200, describe(got)
    assert got.headers["Content-Type"].split(";")[0] == "application/octet-stream"
    assert got.headers["Content-Length"] == str(len(sample.body))
    assert got.headers["Accept-Ranges"] == "bytes"
    assert got.headers["Last-Modified"] == PUT_DATE
    assert re.fullmatch(r'(W/)?"[^"]+"', got.headers["ETag"]), got.headers["ETag"]
    assert repr_sha256(got) == sample.sha256
    assert got.content == sample.body


@pytest.mark.contract
def test_head_reports_pacifica_headers(archive: Archive, sample: StoredFile) -> None:
    """HEAD answers 204 with Pacifica's header names and value formats."""
    head = archive.request("HEAD", sample.id)
    assert head.status_code == 204, describe(head)
    missing = [name for name in HEAD_HEADERS if name not in head.headers]
    assert not missing, f"HEAD lacks {missing}: {dict(head.headers)}"
    assert head.headers["X-Pacifica-Messsage"] == "File was found"
    relpath = head.headers["X-Pacifica-File"]
    assert relpath, "X-Pacifica-File is empty"
    assert not relpath.startswith("/"), f"X-Pacifica-File leaks an absolute server path: {relpath!r}"
    assert ".." not in relpath.split("/"), relpath
    assert head.headers["X-Content-Length"] == str(len(sample.body))
    last_modified = head.headers["Last-Modified"]
    assert re.fullmatch(r"-?\d+(\.\d+)?", last_modified), f"not epoch seconds: {last_modified!r}"
    assert float(last_modified) == PUT_EPOCH
    assert float(head.headers["X-Pacifica-Ctime"]) > 0
    levels = head.headers["X-Pacifica-Bytes-Per-Level"]
    assert re.fullmatch(r"\(\d+(, \d+)*,?\)", levels), f"not a tuple of ints: {levels!r}"
    media = head.headers["X-Pacifica-File-Storage-Media"]
    assert media in ("disk", "tape")
    if media == "disk":
        assert int(re.findall(r"\d+", levels)[0]) == len(sample.body), levels
    assert repr_sha256(head) == sample.sha256
    assert head.headers["ETag"] == archive.request("GET", sample.id).headers["ETag"]
    assert head.content == b""


@pytest.mark.contract
@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=10-19", 10, 20),
        ("bytes=9990-", 9990, 10_000),
        ("bytes=-7", 9993, 10_000),
        ("bytes=9995-20000", 9995, 10_000),
    ],
)
def test_range_returns_206(
    archive: Archive, sample: StoredFile, range_header: str, start: int, end: int
) -> None:
    """A satisfiable Range gets 206 with exactly those bytes and a Content-Range."""
    got = archive.request("GET", sample.id, headers={"Range": range_header})
    assert got.status_code == 206, describe(got)
    assert got.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(sample.body)}"
    assert got.headers["Content-Length"] == str(end - start)
    assert got.content == sample.body[start:end]


@pytest.mark.contract
@pytest.mark.parametrize("range_header", ["bytes=10000-", "bytes=20000-20010"])
def test_unsatisfiable_range_is_416(archive: Archive, sample: StoredFile, range_header: str) -> None:
    """A Range wholly past the end is 416, telling the client the real size."""
    got = archive.request("GET", sample.id, headers={"Range": range_header})
    assert_json_error(got, 416)
    assert got.headers.get("Content-Range") == f"bytes */{len(sample.body)}"


@pytest.mark.contract
def test_range_with_stale_if_range_returns_whole_file(archive: Archive, sample: StoredFile) -> None:
    """If-Range naming another version means the client's partial copy is stale: send it all."""
    got = archive.request("GET", sample.id, headers={"Range": "bytes=0-9", "If-Range": '"not-this-version"'})
    assert got.status_code == 200, describe(got)
    assert got.content == sample.body


@pytest.mark.contract
@pytest.mark.parametrize(
    ("query", "start", "end"),
    [("0-10", 0, 10), ("5000-5001", 5000, 5001), ("9000-10000", 9000, 10_000), ("0-0", 0, 0)],
)
def test_byte_range_query_is_half_open(
    archive: Archive, sample: StoredFile, query: str, start: int, end: int
) -> None:
    """Pacifica's ``?byte_range=S-E`` answers 200 with bytes [S, E)."""
    got = archive.request("GET", f"{sample.id}?byte_range={query}")
    assert got.status_code == 200, describe(got)
    assert got.headers["Content-Length"] == str(end - start)
    assert got.content == sample.body[start:end]


@pytest.mark.contract
def test_post_stages_a_stored_file(archive: Archive, sample: StoredFile) -> None:
    """POST is Pacifica's stage request; on disk it answers at once."""
    answer = archive.request("POST", sample.id)
    assert answer.status_code == 200, describe(answer)
    assert answer.json() == {"message": "File was staged", "file": str(sample.id)}


@pytest.mark.contract
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_missing_id_is_404(archive: Archive, method: str) -> None:
    """An id never stored is a JSON 404 on every read verb."""
    assert_json_error(archive.request(method, archive.new_id()), 404)


# --------------------------------------------------------------------------- contract: ids

BAD_IDS = {
    "letters": "abc",
    "negative": "-5",
    "plus-sign": "+5",
    "leading-zeros": "007",
    "double-zero": "00",
    "decimal-point": "1.5",
    "exponent": "1e3",
    "hex": "0x1f",
    "two-to-the-63": str(2**63),
    "thirty-digits": "9" * 30,
    "encoded-space": "%201",
    "encoded-dot-dot": "%2E%2E",
    "encoded-slash-dot-dot": "%2F..",
    "encoded-slash-inside": "1%2F2",
}


def _send_with_valid_extras(archive: Archive, method: str, target: str) -> requests.Response:
    """Send ``method`` with everything valid except the target, so only the id can be at fault."""
    if method == "PUT":
        return archive.put(target, b"x")
    if method == "PATCH":
        body = json.dumps({"path": f"/nonexistent-{uuid.uuid4().hex}"}).encode()
        return archive.patch(target, body, "application/json")
    return archive.request(method, target)


@pytest.mark.contract
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize("segment", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_malformed_id_is_400(archive: Archive, method: str, segment: str) -> None:
    """Only canonical decimal ids up to 2**63-1 name files; anything else is a JSON 400."""
    assert_json_error(_send_with_valid_extras(archive, method, segment), 400)


@pytest.mark.contract
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_extra_path_segments_are_json_errors(archive: Archive, method: str) -> None:
    """``/<id>/more`` names no file: a JSON 400 or 404, and nothing is stored at ``<id>``."""
    file_id = archive.new_id()
    answer = _send_with_valid_extras(archive, method, f"{file_id}/extra")
    assert answer.status_code in (400, 404), describe(answer)
    assert_json_error(answer, answer.status_code)
    archive.assert_absent(file_id)


@pytest.mark.contract
@pytest.mark.parametrize("segment", ["0", str(MAX_ID)])
def test_boundary_ids_are_accepted(archive: Archive, segment: str) -> None:
    """0 and 2**63-1 are valid ids (found or not, never a 400)."""
    head = archive.request("HEAD", segment)
    assert head.status_code in (204, 404), describe(head)


# --------------------------------------------------------------------------- contract: writes


@pytest.mark.contract
@pytest.mark.parametrize(
    "date", [PUT_DATE, PUT_DATE_RFC850, PUT_DATE_ASCTIME], ids=["rfc1123", "rfc850", "asctime"]
)
def test_put_accepts_every_http_date_format(archive: Archive, date: str) -> None:
    """Old ingest tools send RFC 850 or asctime dates; all name the same instant."""
    file_id = archive.new_id()
    answer = archive.put(file_id, b"dated", date=date)
    assert answer.status_code == 201, describe(answer)
    head = archive.request("HEAD", file_id)
    assert float(head.headers["Last-Modified"]) == PUT_EPOCH
    got = archive.request("GET", file_id)
    assert parsedate_to_datetime(got.headers["Last-Modified"]).timestamp() == PUT_EPOCH


@pytest.mark.contract
@pytest.mark.parametrize(
    "date",
    ["", "not a date", "1994-11-06T08:49:37Z", "Sun, 31 Feb 1994 08:49:37 GMT"],
    ids=["empty", "words", "iso-8601", "no-such-day"],
)
def test_put_with_an_unusable_last_modified_stores_nothing(archive: Archive, date: str) -> None:
    """The mtime is part of the record: a Last-Modified that is no HTTP date, no file."""
    file_id = archive.new_id()
    assert_json_error(archive.put(file_id, b"undated", date=date), 400)
    archive.assert_absent(file_id)


def test_put_without_last_modified_takes_the_upload_time_or_is_refused(archive: Archive) -> None:
    """Pacifica's clients never send it: stored with the upload time, or 400 with require_last_modified."""
    file_id = archive.new_id()
    before = time.time()
    answer = archive.put(file_id, b"undated", date=None)
    after = time.time()
    if answer.status_code == 400:
        assert "Last-Modified" in assert_json_error(answer, 400)["message"]
        archive.assert_absent(file_id)
        return
    assert answer.status_code == 201, describe(answer)
    archive.assert_holds(file_id, b"undated")
    # Seconds of slack: the server's clock is not ours.
    assert before - 5 <= float(archive.request("HEAD", file_id).headers["Last-Modified"]) <= after + 5


@pytest.mark.integrity
def test_overwrite_replaces_or_is_refused(archive: Archive) -> None:
    """A second PUT replaces the file (201), or a write-once archive refuses it (409)."""
    file_id = archive.new_id()
    first, second = payload(file_id, 3000), payload(file_id + 1, 5000)
    archive.store(file_id, first)
    answer = archive.put(file_id, second)
    if answer.status_code == 409:
        assert_json_error(answer, 409)
        archive.assert_holds(file_id, first)
        return
    assert answer.status_code == 201, describe(answer)
    assert answer.json()["total_bytes"] == len(second)
    archive.assert_holds(file_id, second)
    assert archive.request("HEAD", file_id).headers["X-Content-Length"] == str(len(second))


def digest_headers(kind: str, body: bytes) -> dict[str, str]:
    """Return the integrity header(s) of ``kind`` claiming ``body``'s digest."""
    sha_256, sha_512 = sha256(body), hashlib.sha512(body).digest()
    md5 = hashlib.md5(body, usedforsecurity=False).digest()
    return {
        "repr-digest-sha-256": {"Repr-Digest": f"sha-256=:{b64(sha_256)}:"},
        "repr-digest-sha-512": {"Repr-Digest": f"sha-512=:{b64(sha_512)}:"},
        "content-digest-sha-256": {"Content-Digest": f"sha-256=:{b64(sha_256)}:"},
        "digest-sha-256": {"Digest": f"sha-256={b64(sha_256)}"},
        "content-md5": {"Content-MD5": b64(md5)},
        "sha-256-and-md5": {"Repr-Digest": f"sha-256=:{b64(sha_256)}:", "Content-MD5": b64(md5)},
    }[kind]


DIGEST_KINDS = [
    "repr-digest-sha-256",
    "repr-digest-sha-512",
    "content-digest-sha-256",
    "digest-sha-256",
    "content-md5",
    "sha-256-and-md5",
]


@pytest.mark.integrity
@pytest.mark.parametrize("kind", DIGEST_KINDS)
def test_matching_digest_is_accepted(archive: Archive, kind: str) -> None:
    """A correct integrity header changes nothing but the server's confidence."""
    file_id = archive.new_id()
    body = payload(file_id, 7000)
    answer = archive.put(file_id, body, headers=digest_headers(kind, body))
    assert answer.status_code == 201, describe(answer)
    archive.assert_holds(file_id, body)


@pytest.mark.integrity
@pytest.mark.parametrize("kind", DIGEST_KINDS)
def test_mismatched_digest_stores_nothing(archive: Archive, kind: str) -> None:
    """Bytes that do not hash to the claimed digest are refused (422) and not kept."""
    file_id = archive.new_id()
    body = payload(file_id, 7000)
    answer = archive.put(file_id, body, headers=digest_headers(kind, body + b"corrupted in transit"))
    assert_json_error(answer, 422)
    archive.assert_absent(file_id)


@pytest.mark.integrity
@pytest.mark.parametrize("kind", ["repr-digest-sha-256", "content-md5"])
def test_mismatched_digest_keeps_the_previous_version(archive: Archive, kind: str) -> None:
    """A refused overwrite leaves the stored version whole (422, or 409 if write-once)."""
    file_id = archive.new_id()
    first, second = payload(file_id, 4000), payload(file_id + 1, 6000)
    archive.store(file_id, first)
    answer = archive.put(file_id, second, headers=digest_headers(kind, second + b"corrupted"))
    assert answer.status_code in (409, 422), describe(answer)
    assert_json_error(answer, answer.status_code)
    archive.assert_holds(file_id, first)
    assert archive.request("HEAD", file_id).headers["X-Content-Length"] == str(len(first))


@pytest.mark.integrity
def test_chunked_upload_is_stored_whole(archive: Archive) -> None:
    """A body of unknown length (Transfer-Encoding: chunked) is stored completely."""
    file_id = archive.new_id()
    pieces = [payload(file_id + n, size) for n, size in enumerate([1, 100, 65_536, 3, CHUNK + 5, 777])]
    answer = archive.put(file_id, iter(pieces))
    assert answer.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in answer.request.headers
    assert answer.status_code == 201, describe(answer)
    body = b"".join(pieces)
    assert answer.json()["total_bytes"] == len(body)
    archive.assert_holds(file_id, body)


@pytest.mark.integrity
def test_chunked_upload_with_wrong_digest_stores_nothing(archive: Archive) -> None:
    """Digest checking also covers bodies whose length was not known up front."""
    file_id = archive.new_id()
    pieces = [payload(file_id + n, 50_000) for n in range(4)]
    claim = digest_headers("repr-digest-sha-256", b"".join(pieces[:3]))
    answer = archive.put(file_id, iter(pieces), headers=claim)
    assert answer.request.headers.get("Transfer-Encoding") == "chunked"
    assert_json_error(answer, 422)
    archive.assert_absent(file_id)


# --------------------------------------------------------------------------- contract: PATCH and DELETE

NOWHERE = f"/etc/pacifica-deployment-test-{uuid.uuid4().hex}"


@pytest.mark.contract
@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("text/plain", json.dumps({"path": NOWHERE}).encode(), 415),
        (None, json.dumps({"path": NOWHERE}).encode(), 415),
        ("application/json", b"{not json", 400),
        ("application/json", b"\xff\xfe", 400),
        ("application/json", json.dumps({"path": NOWHERE}).encode(), 403),
        ("application/json; charset=utf-8", json.dumps({"path": NOWHERE}).encode(), 403),
    ],
    ids=["text-plain", "no-content-type", "invalid-json", "not-utf8", "outside-roots", "json-with-charset"],
)
def test_patch_rejections(archive: Archive, content_type: str | None, body: bytes, status: int) -> None:
    """PATCH wants JSON naming a file inside the patch roots; nothing is adopted otherwise.

    The path outside the roots does not exist, so a server with wrong roots
    answers 404 here rather than moving a real file such as /etc/passwd.
    """
    file_id = archive.new_id()
    assert_json_error(archive.patch(file_id, body, content_type), status)
    archive.assert_absent(file_id)


@pytest.mark.contract
@pytest.mark.skipif(PATCH_DIR is None, reason="set ARCHIVE_PATCH_DIR to a directory inside the patch roots")
def test_patch_moves_a_server_side_file_in(archive: Archive) -> None:
    """PATCH adopts a file already on the server: same bytes, source gone."""
    assert PATCH_DIR is not None
    file_id = archive.new_id()
    body = payload(file_id, 5000)
    source = Path(PATCH_DIR) / f"deployment-test-{file_id}.dat"
    source.write_bytes(body)
    try:
        answer = archive.patch(file_id, json.dumps({"path": str(source)}).encode(), "application/json")
        assert answer.status_code == 200, describe(answer)
        assert answer.json() == {"message": "File Moved Successfully"}
        archive.assert_holds(file_id, body)
        assert not source.exists(), "PATCH left its source behind"
    finally:
        source.unlink(missing_ok=True)


@pytest.mark.contract
@pytest.mark.skipif(PATCH_DIR is None, reason="set ARCHIVE_PATCH_DIR to a directory inside the patch roots")
@pytest.mark.parametrize(("where", "status"), [("inside", 404), ("dot-dot-out", 403)])
def test_patch_missing_or_escaping_source(archive: Archive, where: str, status: int) -> None:
    """A missing source inside the roots is 404; ``..`` out of a root is 403."""
    assert PATCH_DIR is not None
    name = f"deployment-test-missing-{uuid.uuid4().hex}"
    path = f"{PATCH_DIR}/{name}" if where == "inside" else f"{PATCH_DIR}/../{name}"
    file_id = archive.new_id()
    assert_json_error(archive.patch(file_id, json.dumps({"path": path}).encode(), "application/json"), status)
    archive.assert_absent(file_id)


@pytest.mark.contract
def test_delete_removes_or_is_disabled(archive: Archive) -> None:
    """DELETE removes the file (200, then 404 everywhere) or is switched off (405)."""
    file_id = archive.new_id()
    body = payload(file_id, 1234)
    archive.store(file_id, body)
    answer = archive.request("DELETE", file_id)
    if answer.status_code == 405:
        assert_json_error(answer, 405)
        assert "DELETE" not in answer.headers.get("Allow", ""), describe(answer)
        archive.assert_holds(file_id, body)
        return
    assert answer.status_code == 200, describe(answer)
    archive.assert_absent(file_id)
    assert_json_error(archive.request("HEAD", file_id), 404)
    assert_json_error(archive.request("DELETE", file_id), 404)


# --------------------------------------------------------------------------- large file


@pytest.mark.large
@pytest.mark.timeout(3600)
def test_large_file_streams_up_and_down(archive: Archive) -> None:
    """LARGE_FILE_SIZE bytes go up chunked and come down streamed, never held in memory."""
    file_id = archive.new_id()
    upload = StreamedPayload(seed=file_id, size=LARGE_FILE_SIZE)
    peak_before = peak_rss_bytes()

    answer = archive.put(file_id, upload.chunks(), timeout=LARGE_TIMEOUT)
    assert answer.status_code == 201, describe(answer)
    assert upload.sent == LARGE_FILE_SIZE
    assert answer.json()["total_bytes"] == LARGE_FILE_SIZE

    head = archive.request("HEAD", file_id)
    assert head.headers["X-Content-Length"] == str(LARGE_FILE_SIZE)
    assert repr_sha256(head) == upload.sha256

    digest, received = hashlib.sha256(), 0
    with archive.request("GET", file_id, stream=True, timeout=LARGE_TIMEOUT) as got:
        assert got.status_code == 200, describe(got)
        assert got.headers["Content-Length"] == str(LARGE_FILE_SIZE)
        assert repr_sha256(got) == upload.sha256
        for chunk in got.iter_content(CHUNK):
            digest.update(chunk)
            received += len(chunk)
    assert received == LARGE_FILE_SIZE
    assert digest.digest() == upload.sha256, "the large file came back different"

    if upload.tail:
        tail = archive.request("GET", file_id, headers={"Range": f"bytes=-{len(upload.tail)}"})
        assert tail.status_code == 206, describe(tail)
        assert tail.content == upload.tail, "the last bytes differ (offset arithmetic on big files)"

    peak_after = peak_rss_bytes()
    if peak_before is not None and peak_after is not None:
        allowed = max(LARGE_FILE_SIZE // 2, 32 << 20)
        assert peak_after - peak_before < allowed, "the test process held the large file in memory"


# --------------------------------------------------------------------------- concurrency


def _size_for(file_id: int) -> int:
    """A few KiB, varying by id so sizes differ across files."""
    return 1024 + file_id % 7168


@pytest.mark.concurrency
def test_many_files_written_then_read_concurrently(archive: Archive) -> None:
    """MANY_FILES_TEST_COUNT small files through WORKERS parallel clients, every body checked."""
    ids = [archive.new_id() for _ in range(MANY_FILES_TEST_COUNT)]

    def write(file_id: int) -> str | None:
        body = payload(file_id, _size_for(file_id))
        try:
            answer = archive.put(file_id, body)
        except requests.RequestException as exc:
            return f"PUT {file_id}: {exc!r}"
        if answer.status_code != 201 or answer.json().get("total_bytes") != len(body):
            return describe(answer)
        return None

    def read(file_id: int) -> str | None:
        expected = sha256(payload(file_id, _size_for(file_id)))
        try:
            got = archive.request("GET", file_id)
        except requests.RequestException as exc:
            return f"GET {file_id}: {exc!r}"
        if got.status_code != 200 or sha256(got.content) != expected or repr_sha256(got) != expected:
            return f"GET {file_id}: wrong body or digest; {describe(got)}"
        return None

    with ThreadPoolExecutor(WORKERS) as pool:
        failures = [failure for failure in pool.map(write, ids) if failure]
        assert not failures, f"{len(failures)} of {len(ids)} writes failed:\n" + "\n".join(failures[:5])
        failures = [failure for failure in pool.map(read, ids) if failure]
        assert not failures, f"{len(failures)} of {len(ids)} reads failed:\n" + "\n".join(failures[:5])


def _versions(seed: int, count: int, base_size: int) -> list[bytes]:
    """Distinct contents of distinct sizes, so any mix of two is detectable."""
    return [payload(seed + n, base_size + 4099 * n) for n in range(count)]


@pytest.mark.concurrency
def test_concurrent_overwrites_never_mix_versions(archive: Archive, write_once: bool) -> None:
    """Racing PUTs to one id while others read it: each read is exactly one version."""
    if write_once:
        pytest.skip("the archive is write-once (409 on overwrite): there is no overwrite to race")
    file_id = archive.new_id()
    versions = _versions(file_id, 6, 256 * 1024)
    known = {sha256(version): len(version) for version in versions}
    archive.store(file_id, versions[0])
    writers_done = threading.Event()

    def writer(n: int) -> list[str]:
        problems = []
        for round_number in range(6):
            answer = archive.put(file_id, versions[(n + round_number) % len(versions)])
            if answer.status_code != 201:
                problems.append(describe(answer))
        return problems

    def reader(n: int) -> tuple[int, list[str]]:
        reads, problems = 0, []
        while not writers_done.is_set() or reads < 2:
            reads += 1
            if (reads + n) % 3:
                got = archive.request("GET", file_id)
                digest = sha256(got.content)
                if got.status_code != 200 or digest not in known:
                    problems.append(f"GET returned bytes of no version ({len(got.content)} bytes)")
                elif repr_sha256(got) != digest or got.headers["Content-Length"] != str(len(got.content)):
                    problems.append(f"GET headers describe another version than its body: {describe(got)}")
            else:
                head = archive.request("HEAD", file_id)
                if head.status_code != 204 or repr_sha256(head) not in known:
                    problems.append(f"HEAD digest of no version: {describe(head)}")
                elif head.headers["X-Content-Length"] not in {str(size) for size in known.values()}:
                    problems.append(f"HEAD size of no version: {describe(head)}")
        return reads, problems

    with ThreadPoolExecutor(12) as pool:
        readers = [pool.submit(reader, n) for n in range(8)]
        writers = [pool.submit(writer, n) for n in range(4)]
        try:
            write_problems = [problem for future in writers for problem in future.result()]
        finally:
            writers_done.set()
        results = [future.result() for future in readers]
    read_problems = [problem for _, found in results for problem in found]
    assert not write_problems, "\n".join(write_problems[:5])
    assert not read_problems, f"{len(read_problems)} bad reads:\n" + "\n".join(read_problems[:5])
    assert sum(reads for reads, _ in results) >= 16
    final = archive.request("GET", file_id)
    assert sha256(final.content) in known


@pytest.mark.concurrency
def test_concurrent_head_reports_one_version(archive: Archive, write_once: bool) -> None:
    """Under racing overwrites, HEAD's size and digest must describe the same version."""
    if write_once:
        pytest.skip("the archive is write-once (409 on overwrite): there is no overwrite to race")
    file_id = archive.new_id()
    versions = _versions(file_id, 6, 1000)
    size_of = {sha256(version): str(len(version)) for version in versions}
    archive.store(file_id, versions[0])
    stop_at = time.monotonic() + 8
    mixed: list[str] = []

    def writer(n: int) -> None:
        round_number = 0
        while time.monotonic() < stop_at and not mixed:
            archive.put(file_id, versions[(n + round_number) % len(versions)])
            round_number += 1

    def reader(_: int) -> None:
        while time.monotonic() < stop_at and not mixed:
            head = archive.request("HEAD", file_id)
            if size_of.get(repr_sha256(head) or b"") != head.headers.get("X-Content-Length"):
                mixed.append(describe(head))

    with ThreadPoolExecutor(11) as pool:
        futures = [pool.submit(writer, n) for n in range(3)] + [pool.submit(reader, n) for n in range(8)]
        for future in futures:
            future.result()
    assert not mixed, "HEAD mixed two versions:\n" + mixed[0]


# --------------------------------------------------------------------------- connections


@pytest.mark.contract
def test_persistent_connection_is_kept_or_declined() -> None:
    """HTTP/1.1 connections persist unless the server says ``Connection: close`` (RFC 9112 9.3)."""
    parts = urlsplit(ARCHIVE_URL)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname or "127.0.0.1", parts.port, timeout=TIMEOUT[1])
    path = (parts.path or "") + "/"
    try:
        connection.request("GET", path)
        first = connection.getresponse()
        first.read()
        if first.version == 10 or "close" in (first.getheader("Connection") or "").lower():
            return  # the server declined to keep the connection, and said so
        try:
            connection.request("GET", path)
            second = connection.getresponse()
            second.read()
        except (ConnectionError, http.client.HTTPException) as exc:
            pytest.fail(f"no 'Connection: close' on the first answer, yet the second request failed: {exc!r}")
        assert second.status == 200
    finally:
        connection.close()


# --------------------------------------------------------------------------- bulk staging


def bulk(archive: Archive, method: str, path: str, body: Any = None) -> requests.Response:
    """Call the bulk-staging API (``/api/v1/...``, or the discovery document) with a JSON body."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "X-Client-Id": "post-deployment-tests"}
    return archive.request(method, path.lstrip("/"), headers=headers, data=data)


@pytest.fixture(scope="module")
def bulk_api(archive: Archive) -> str:
    """The bulk API's base path from the discovery document; skip where this deployment has none."""
    answer = bulk(archive, "GET", "/.well-known/wlcg-tape-rest-api")
    if answer.status_code in (404, 501):
        pytest.skip(f"no bulk-staging API here ({answer.status_code}: the gateway catalog may be off)")
    assert answer.status_code == 200, describe(answer)
    (endpoint,) = [e for e in answer.json()["endpoints"] if e["version"] == "v1"]
    assert endpoint["metadata"]["maxFilesPerRequest"] >= 1, describe(answer)
    base = urlsplit(endpoint["uri"]).path
    queues = bulk(archive, "GET", f"{base}/queues")
    if queues.status_code == 501:  # discovery answers, but requests need the catalog
        pytest.skip(f"bulk staging is off here: {assert_problem(queues, 501)['detail']}")
    assert queues.status_code == 200, describe(queues)
    return base


def assert_problem(answer: requests.Response, status: int) -> dict[str, Any]:
    """Check a bulk API error is ``application/problem+json`` with a detail, never a traceback."""
    assert answer.status_code == status, describe(answer)
    assert answer.headers.get("Content-Type", "").startswith("application/problem+json"), describe(answer)
    assert "Traceback" not in answer.text, describe(answer)
    document = answer.json()
    assert document["status"] == status and document["detail"], describe(answer)
    return document


@pytest.mark.contract
def test_bulk_stage_of_a_stored_file_and_an_unknown_one(archive: Archive, bulk_api: str) -> None:
    """A file on disk completes at once; an unknown id fails alone, with a reason; DELETE forgets it."""
    stored, unknown = archive.new_id(), archive.new_id()
    archive.store(stored, payload(stored, 100))
    files = [{"path": f"/{stored}", "diskLifetime": "PT5M"}, {"path": f"/{unknown}"}]
    created = bulk(archive, "POST", f"{bulk_api}/stage", {"files": files})
    assert created.status_code == 201, describe(created)
    request_id = created.json()["requestId"]
    assert created.headers["Location"].endswith(f"/stage/{request_id}"), describe(created)
    polled = bulk(archive, "GET", f"{bulk_api}/stage/{request_id}")
    assert polled.status_code == 200, describe(polled)
    by_path = {f["path"]: f for f in polled.json()["files"]}
    # The spec: state and onDisk exclude each other.
    done = by_path[f"/{stored}"]
    assert done["state"] == "COMPLETED" and "onDisk" not in done, describe(polled)
    assert by_path[f"/{unknown}"]["state"] == "FAILED" and by_path[f"/{unknown}"]["error"], describe(polled)
    info = bulk(archive, "POST", f"{bulk_api}/archiveinfo", {"paths": [f"/{stored}", f"/{unknown}"]})
    assert info.status_code == 200, describe(info)
    answers = {entry["path"]: entry for entry in info.json()}
    assert answers[f"/{stored}"]["locality"] in ("DISK", "DISK_AND_TAPE"), describe(info)
    # The spec: a file that does not exist gets an error, never a locality.
    assert "locality" not in answers[f"/{unknown}"] and answers[f"/{unknown}"]["error"], describe(info)
    assert bulk(archive, "POST", f"{bulk_api}/release/{request_id}", {"paths": [f"/{stored}"]}).ok
    assert bulk(archive, "DELETE", f"{bulk_api}/stage/{request_id}").status_code == 200
    assert_problem(bulk(archive, "GET", f"{bulk_api}/stage/{request_id}"), 404)


@pytest.mark.contract
@pytest.mark.parametrize(
    "body",
    [b"not json", b"{}", b'{"files": []}'],
    ids=["not-json", "no-files", "empty"],
)
def test_bulk_stage_rejects_bad_requests_as_problem_json(
    archive: Archive, bulk_api: str, body: bytes
) -> None:
    answer = archive.request(
        "POST", f"{bulk_api}/stage".lstrip("/"), headers={"Content-Type": "application/json"}, data=body
    )
    assert_problem(answer, 400)


@pytest.mark.contract
def test_bulk_stage_of_a_path_named_twice_stages_it_once(archive: Archive, bulk_api: str) -> None:
    """As dCache and StoRM do: duplicates (//id is id) are dropped, not a reason to refuse the request."""
    stored = archive.new_id()
    archive.store(stored, payload(stored, 100))
    files = [{"path": f"/{stored}"}, {"path": f"//{stored}"}]
    created = bulk(archive, "POST", f"{bulk_api}/stage", {"files": files})
    assert created.status_code == 201, describe(created)
    request_id = created.json()["requestId"]
    polled = bulk(archive, "GET", f"{bulk_api}/stage/{request_id}")
    assert [f["path"] for f in polled.json()["files"]] == [f"/{stored}"], describe(polled)
    assert bulk(archive, "DELETE", f"{bulk_api}/stage/{request_id}").status_code == 200
