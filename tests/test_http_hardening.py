"""Unfriendly clients against real servers: malformed framing, odd request targets, slow sockets.

Every case runs against `pacifica-like serve` (waitress) and the production
shape (nginx in front of uWSGI), over raw sockets so the bytes reach the server
exactly as written. Each stores a good file first and checks afterwards that a
refused request left it byte for byte as it was.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import LAST_MODIFIED
from httpwire import Answer, address, exchange, read_answer

from pacifica_like.web import devserver

pytestmark = pytest.mark.live
TIMEOUT = 10
OLD = b"the good old version\n"
LM = f"Last-Modified: {LAST_MODIFIED}\r\n".encode()


@dataclass
class Live:
    """A running server and the archive directory behind it."""

    url: str
    prefix: Path
    mode: str

    def put(self, file_id: int, body: bytes) -> requests.Response:
        return requests.put(
            f"{self.url}/{file_id}", data=body, headers={"Last-Modified": LAST_MODIFIED}, timeout=TIMEOUT
        )

    def get(self, file_id: int) -> requests.Response:
        return requests.get(f"{self.url}/{file_id}", timeout=TIMEOUT)


def start(mode: str, prefix: Path, **env: str):
    """Return the context manager running ``mode`` over ``prefix``."""
    settings = {"PAI_PREFIX": str(prefix), **env}
    if mode in ("serve", "serve-cherrypy"):  # serve on the WSGI or the CherryPy file API adapter
        settings.setdefault("PAI_FILE_API", "cherrypy" if mode == "serve-cherrypy" else "wsgi")
        return devserver.cli_server([], env=settings)
    return devserver.production_server(settings, processes=2)


@pytest.fixture(scope="module", params=["serve", "serve-cherrypy", "production"])
def live(request, tmp_path_factory) -> Iterator[Live]:
    prefix = tmp_path_factory.mktemp(request.param) / "archive"
    with start(request.param, prefix) as server:
        yield Live(server.url, prefix, request.param)


def put_head(target: bytes, *fields: bytes) -> bytes:
    return (
        b"PUT "
        + target
        + b" HTTP/1.1\r\nHost: archive\r\n"
        + LM
        + b"".join(f + b"\r\n" for f in fields)
        + b"\r\n"
    )


CHUNKED = b"Transfer-Encoding: chunked"

#: Bodies that stop early: the client half-closes so the server sees their end.
UNFINISHED = {"chunk size 2^64-1", "chunked body that stops", "body shorter than Content-Length"}
#: Requests whose body framing is wrong: name -> (head fields, body).
BAD_FRAMING = {
    "chunk size that is not hex": ([CHUNKED], b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunk longer than its size": ([CHUNKED], b"2\r\nhello\r\n0\r\n\r\n"),
    "negative chunk size": ([CHUNKED], b"-5\r\nhello\r\n0\r\n\r\n"),
    "chunk size with a 0x prefix": ([CHUNKED], b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk size 2^64-1": ([CHUNKED], b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    "chunked body that stops": ([CHUNKED], b"5\r\nhel"),
    "two different Content-Lengths": ([b"Content-Length: 3", b"Content-Length: 5"], b"hello"),
    "Content-Length of a superscript two": ([b"Content-Length: \xc2\xb2"], b"hello"),
    "negative Content-Length": ([b"Content-Length: -1"], b"hello"),
    "Content-Length with a plus sign": ([b"Content-Length: +5"], b"hello"),
    "Content-Length of 30 digits": ([b"Content-Length: " + b"9" * 30], b"hello"),
    "body shorter than Content-Length": ([b"Content-Length: 100"], b"hello"),
}


def assert_refused_cleanly(answer: Answer, live: Live, file_id: int) -> None:
    """The request got a 4xx without a traceback (or no answer at all), and the old file is intact."""
    assert answer.status is None or 400 <= answer.status < 500, answer.describe()
    assert b"Traceback" not in answer.body
    stored = live.get(file_id)
    assert stored.status_code == 200 and stored.content == OLD, (answer.describe(), stored.content[:80])


@pytest.mark.parametrize("case", sorted(BAD_FRAMING))
def test_malformed_body_framing_stores_nothing_over_a_good_file(live: Live, case: str):
    file_id = 1000 + sorted(BAD_FRAMING).index(case)
    assert live.put(file_id, OLD).status_code == 201
    fields, body = BAD_FRAMING[case]
    answer = exchange(
        live.url, put_head(f"/{file_id}".encode(), *fields) + body, half_close=case in UNFINISHED
    )
    assert_refused_cleanly(answer, live, file_id)


def test_unknown_transfer_coding_stores_nothing(live: Live):
    """RFC 9112 6.1 answers a coding the server does not know with 501 (waitress); nginx says 400."""
    file_id = 1099
    assert live.put(file_id, OLD).status_code == 201
    head = put_head(b"/1099", b"Transfer-Encoding: gzip, chunked, x")
    answer = exchange(live.url, head + b"5\r\nhello\r\n0\r\n\r\n")
    assert answer.status in (400, 501), answer.describe()
    assert live.get(file_id).content == OLD


def test_content_length_beside_chunked_never_stores_the_framing(live: Live):
    """RFC 9112 6.3: nginx refuses the pair; waitress lets chunked win and stores the decoded body."""
    file_id = 1100
    assert live.put(file_id, OLD).status_code == 201
    head = put_head(b"/1100", b"Content-Length: 15", CHUNKED)
    answer = exchange(live.url, head + b"5\r\nhello\r\n0\r\n\r\n")
    if live.mode == "production":
        assert_refused_cleanly(answer, live, file_id)
    else:
        assert answer.status == 201, answer.describe()
        assert live.get(file_id).content == b"hello"


def test_valid_chunked_upload_is_stored_exactly(live: Live):
    answer = exchange(live.url, put_head(b"/1101", CHUNKED) + b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
    assert answer.status == 201, answer.describe()
    assert live.get(1101).content == b"hello world"


def test_request_target_without_a_slash_names_no_file(live: Live):
    """`PUT 12345` once overwrote id 2345 (the server's path lost its first character)."""
    assert live.put(2345, OLD).status_code == 201
    answer = exchange(live.url, put_head(b"12345", b"Content-Length: 3") + b"new")
    assert_refused_cleanly(answer, live, 2345)
    assert live.get(12345).status_code == 404


@pytest.mark.parametrize("target", [b"/2346/../2347", b"//2347", b"/2347/", b"/%32347/x"])
def test_targets_that_are_not_one_plain_segment_touch_nothing(live: Live, target: bytes):
    assert live.put(2347, OLD).status_code == 201
    answer = exchange(live.url, put_head(target, b"Content-Length: 3") + b"new")
    assert_refused_cleanly(answer, live, 2347)


@pytest.mark.parametrize("line", [b"GET /api/v1/queues FOO/1.1", b"GET / HTTP/2.5", b"GET /1 HTTP/1.1 extra"])
def test_unknown_protocol_tokens_get_no_traceback(live: Live, line: bytes):
    answer = exchange(live.url, line + b"\r\nHost: archive\r\n\r\n")
    assert answer.status is None or answer.status < 500 or answer.status == 505, answer.describe()
    assert b"Traceback" not in answer.body and b".py" not in answer.body


def test_deeply_nested_patch_body_is_a_json_400(live: Live):
    body = b"[" * 100_000
    head = b"PATCH /3000 HTTP/1.1\r\nHost: archive\r\nContent-Type: application/json\r\n"
    answer = exchange(live.url, head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert answer.status == 400, answer.describe()
    assert b"Traceback" not in answer.body


def test_range_with_thousands_of_digits_is_416_not_500(live: Live):
    assert live.put(3001, OLD).status_code == 201
    huge = "9" * 5000
    answer = requests.get(f"{live.url}/3001", headers={"Range": f"bytes={huge}-"}, timeout=TIMEOUT)
    assert answer.status_code == 416, answer.text[:200]
    suffix = requests.get(f"{live.url}/3001", headers={"Range": f"bytes=-{huge}"}, timeout=TIMEOUT)
    assert suffix.status_code == 206 and suffix.content == OLD
    pacifica = requests.get(f"{live.url}/3001?byte_range=0-{huge}", timeout=TIMEOUT)
    assert pacifica.status_code == 200 and pacifica.content == OLD


@pytest.mark.parametrize("mode", ["serve", "serve-cherrypy", "production"])
def test_malformed_chunked_upload_does_not_take_a_write_once_id(tmp_path: Path, mode: str):
    """Under write_once a bad upload used to claim the id for good (an empty file)."""
    with start(mode, tmp_path / "archive", PAI_WRITE_ONCE="true") as server:
        live = Live(server.url, tmp_path / "archive", mode)
        answer = exchange(server.url, put_head(b"/7", CHUNKED) + b"zz\r\nabc\r\n0\r\n\r\n")
        assert answer.status is not None and 400 <= answer.status < 500, answer.describe()
        assert live.get(7).status_code == 404
        assert live.put(7, OLD).status_code == 201
        assert live.put(7, b"again").status_code == 409
        assert live.get(7).content == OLD


def test_uwsgi_http_socket_refuses_what_it_cannot_frame(tmp_path: Path):
    """uWSGI's own HTTP socket reads `zz` as the end of a chunked body: it gets a 411, not a store."""
    prefix = tmp_path / "archive"
    with devserver.uwsgi_server({"PAI_PREFIX": str(prefix)}, processes=2) as server:
        live = Live(server.url, prefix, "uwsgi")
        assert live.put(7, OLD).status_code == 201
        for body in (b"zz\r\nabc\r\n0\r\n\r\n", b"2\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"):
            answer = exchange(server.url, put_head(b"/7", CHUNKED) + body)
            assert answer.status == 411, answer.describe()
            assert b"Content-Length" in answer.body
        both = exchange(
            server.url, put_head(b"/7", b"Content-Length: 15", CHUNKED) + b"5\r\nhello\r\n0\r\n\r\n"
        )
        assert both.status == 400, both.describe()
        stray = exchange(server.url, put_head(b"12345", b"Content-Length: 3") + b"new")
        assert stray.status == 400, stray.describe()
        token = exchange(server.url, b"GET /api/v1/queues FOO/1.1\r\nHost: a\r\n\r\n")
        assert token.status == 400 and b"Traceback" not in token.body, token.describe()
        assert live.get(7).content == OLD
        assert live.get(12345).status_code == 404 and live.get(2345).status_code == 404


SLOW_CLIENTS = 1000


def raise_own_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def test_a_thousand_slow_clients_do_not_stop_the_service(live: Live):
    """Half send an unfinished request head, half an unfinished upload; small requests still pass."""
    raise_own_file_limit(SLOW_CLIENTS * 2 + 256)
    assert live.put(4000, OLD).status_code == 201
    held: list[socket.socket] = []
    try:
        for number in range(SLOW_CLIENTS):
            sock = socket.create_connection(address(live.url), timeout=TIMEOUT)
            held.append(sock)
            if number % 2:
                sock.sendall(b"GET /4000 HTTP/1.1\r\nHost: archive\r\nX-Slow: ")
            else:
                sock.sendall(put_head(f"/{5000 + number}".encode(), b"Content-Length: 1000000") + b"partial")
        slowest = 0.0
        for _ in range(5):
            began = time.monotonic()
            health = requests.get(live.url + "/", timeout=TIMEOUT)
            small = live.get(4000)
            slowest = max(slowest, time.monotonic() - began)
            assert health.status_code == 200 and small.content == OLD
        # Generous against a loaded CI machine; a server that lets these clients hold its
        # workers does not answer at all.
        assert slowest < 5.0, f"GET / and a small GET took {slowest:.2f} s with {SLOW_CLIENTS} slow clients"
        # None of the unfinished uploads became a file.
        assert live.get(5000).status_code == 404
    finally:
        for sock in held:
            sock.close()


def test_serve_closes_a_connection_that_stops_sending(tmp_path: Path):
    """[server] idle_timeout: a half-sent request head is dropped, not held for ever."""
    with start("serve", tmp_path / "archive", PAI_IDLE_TIMEOUT="2") as server:
        with socket.create_connection(address(server.url), timeout=TIMEOUT * 3) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: archive\r\n")
            began = time.monotonic()
            answer = read_answer(sock)
            waited = time.monotonic() - began
        assert answer.status in (None, 408), answer.describe()
        assert waited < TIMEOUT * 3
