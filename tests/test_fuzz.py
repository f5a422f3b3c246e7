"""A bounded, fixed-seed fuzz of every endpoint over real sockets: no 5xx, no traceback, no file touched.

Hypothesis draws methods, request targets (valid ids, near-misses of the
pre-stored ids, every API path with odd suffixes and queries), headers and
bodies (bytes, JSON nested deep or holding huge numbers, bulk-API documents
with odd paths), sends each as raw HTTP/1.1 to `pacifica-like serve`, to
nginx + uWSGI and to uWSGI's own HTTP socket, and checks every answer. The pre-stored files must be byte for
byte the same afterwards: nothing the fuzz sends may name them. The seed is
fixed (``derandomize``), so a failure reproduces on every run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
import requests
from conftest import LAST_MODIFIED
from httpwire import exchange
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pacifica_like.web import devserver

pytestmark = pytest.mark.live
TIMEOUT = 10
EXAMPLES = 600
#: Files stored before the fuzz, and their bytes: none of them may change.
STORED = {7: b"seven\n", 2345: b"two three four five\n", 12345: b"one two three four five\n", 0: b"zero\n"}
#: Ids the fuzz may write: far from the stored ones.
FUZZ_IDS = st.integers(min_value=10**6, max_value=10**6 + 50)

API_PATHS = [
    "/",
    "/metrics",
    "/ready",
    "/.well-known/wlcg-tape-rest-api",
    "/api/v1/stage",
    "/api/v1/stage/0123abcd",
    "/api/v1/stage/0123abcd/cancel",
    "/api/v1/release/0123abcd",
    "/api/v1/archiveinfo",
    "/api/v1/queues",
    "/webdav",
    "/webdav/7",
]
#: Targets that try to reach a stored file some other way than its own path.
NEAR_MISSES = [
    "12345",
    "/%2F2345",
    "/2345%00",
    "/%32345/",
    "/7/",
    "//7",
    "/7/../12345",
    "/7%2F..%2F2345",
    "/07",
    "/+7",
    "/7.0",
    "/-7",
    "/7?x=1/../2345",
    "/\u0667",
    "/9" * 30,
    "/" + "9" * 5000,
]
TOKEN = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
QUERY = st.one_of(
    st.just(""),
    st.builds(lambda k, v: f"?{k}={v}", TOKEN, TOKEN),
    st.sampled_from(["?byte_range=0-3", "?byte_range=9-1", "?byte_range=" + "9" * 5000, "?state=X&limit=-1"]),
)
TARGET = st.one_of(
    st.builds(lambda i, q: f"/{i}{q}", FUZZ_IDS, QUERY),
    st.sampled_from(NEAR_MISSES),
    st.builds(
        lambda p, s, q: p + s + q, st.sampled_from(API_PATHS), st.sampled_from(["", "/", "/x", "/%00"]), QUERY
    ),
    st.builds(lambda t: "/" + t, TOKEN),
)
METHOD = st.one_of(
    st.sampled_from(["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "MKCOL"]),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8),
)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


JSON_BODY = st.one_of(
    # Depths and digit counts around the interpreter's limits (recursion, int() of 4,300 digits).
    st.builds(nested, st.sampled_from([1, 3, 999, 1001, 5000, 30_000])),
    st.builds(lambda n: '{"path": ' + "9" * n + "}", st.sampled_from([1, 19, 4300, 4301, 9000])),
    st.builds(lambda n: '{"files": [{"path": ' + "1" * n + "}]}", st.sampled_from([1, 19, 4301, 9000])),
    st.builds(
        lambda paths: json.dumps({"files": [{"path": p} for p in paths]}),
        st.lists(st.one_of(st.sampled_from(NEAR_MISSES), TOKEN, st.just("/7")), max_size=5),
    ),
    st.builds(lambda paths: json.dumps({"paths": paths}), st.lists(st.sampled_from(NEAR_MISSES), max_size=5)),
    st.builds(
        lambda v: json.dumps({"path": v}), st.one_of(TOKEN, st.integers(), st.none(), st.just("/etc/passwd"))
    ),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TOKEN),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TOKEN, inner, max_size=3)),
        max_leaves=8,
    ).map(json.dumps),
)
BODY = st.one_of(st.just(b""), st.binary(max_size=300), JSON_BODY.map(str.encode))
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "Last-Modified",
            "Content-Type",
            "Range",
            "If-Range",
            "Repr-Digest",
            "Content-Digest",
            "Digest",
            "Content-MD5",
            "Want-Digest",
            "X-Request-Id",
            "X-Client-Id",
            "Authorization",
            "Expect",
            "Accept",
            "X-Fuzz",
        ]
    ),
    st.one_of(
        HEADER_VALUE,
        st.sampled_from(
            [
                LAST_MODIFIED,
                "application/json",
                "bytes=0-1",
                "bytes=" + "9" * 3000 + "-",
                "sha-256=:AAAA:",
                "sha-256=:" + "A" * 200 + ":",
                "md5=zz",
            ]
        ),
    ),
    max_size=5,
)


@st.composite
def requests_to_send(draw) -> tuple[str, str, dict[str, str], bytes]:
    """Draw (method, target, headers, body), steering half of them at the handlers that parse bodies."""
    headers = draw(HEADERS)
    kind = draw(st.sampled_from(["file-json", "bulk-json", "anything"]))
    if kind == "file-json":
        method = draw(st.sampled_from(["PATCH", "PUT", "POST"]))
        target = draw(st.one_of(st.builds(lambda i: f"/{i}", FUZZ_IDS), st.sampled_from(NEAR_MISSES)))
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Last-Modified", LAST_MODIFIED)
        return method, target, headers, draw(JSON_BODY).encode()
    if kind == "bulk-json":
        method = draw(st.sampled_from(["POST", "GET", "DELETE"]))
        target = draw(st.sampled_from(API_PATHS)) + draw(QUERY)
        headers.setdefault("Content-Type", "application/json")
        return method, target, headers, draw(JSON_BODY).encode()
    return draw(METHOD), draw(TARGET), headers, draw(BODY)


REQUEST = requests_to_send()


def build_request(method: str, target: str, headers: dict[str, str], body: bytes, chunked: bool) -> bytes:
    """Return the raw request: well-framed, so every answer comes from the service's own code."""
    lines = [f"{method} {target} HTTP/1.1", "Host: archive"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        framed = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        framed = body
    return "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + framed


def start(mode: str, prefix: Path):
    env = {"PAI_PREFIX": str(prefix)}
    if mode in ("serve", "serve-cherrypy"):  # serve on the WSGI or the CherryPy file API adapter
        env["PAI_FILE_API"] = "cherrypy" if mode == "serve-cherrypy" else "wsgi"
        return devserver.cli_server([], env=env)
    if mode == "uwsgi":  # uWSGI's own HTTP socket, as the benchmark runs it
        return devserver.uwsgi_server(env, processes=2)
    return devserver.production_server(env, processes=2)


@pytest.fixture(scope="module", params=["serve", "serve-cherrypy", "production", "uwsgi"])
def fuzzed(request, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    prefix = tmp_path_factory.mktemp("fuzz-" + request.param) / "archive"
    with start(request.param, prefix) as server:
        for file_id, data in STORED.items():
            answer = requests.put(
                f"{server.url}/{file_id}",
                data=data,
                headers={"Last-Modified": LAST_MODIFIED},
                timeout=TIMEOUT,
            )
            assert answer.status_code == 201
        yield server.url, prefix


def test_fuzzed_requests_get_no_5xx_no_traceback_and_touch_no_stored_file(fuzzed):
    url, prefix = fuzzed
    seen: dict[int | None, int] = {}

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        # No shrinking: a failure reports the request as drawn, at once, instead of minutes later.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(REQUEST, st.booleans())
    def one_request(request, chunked):
        method, target, headers, body = request
        if unquote(target.split("?")[0]) in {f"/{i}" for i in STORED}:
            return  # a stored file's own path (%32345 is /2345 too): the way to overwrite it on purpose
        answer = exchange(url, build_request(method, target, headers, body, chunked), timeout=TIMEOUT)
        seen[answer.status] = seen.get(answer.status, 0) + 1
        assert answer.status is not None, f"{method} {target}: connection closed without an answer"
        assert answer.status < 500, f"{method} {target} {headers}: {answer.describe()}"
        assert b"Traceback" not in answer.body, answer.describe()
        assert str(prefix).encode() not in answer.body, answer.describe()

    one_request()
    for file_id, data in STORED.items():
        got = requests.get(f"{url}/{file_id}", timeout=TIMEOUT)
        assert got.status_code == 200 and got.content == data, (file_id, got.status_code, got.content[:80])
    # The fuzz reached the service's own answers, not only framing refusals.
    assert sum(count for status, count in seen.items() if status is not None and status < 300) > 0, seen
    assert sum(count for status, count in seen.items() if status is not None and 400 <= status < 500) > 0, (
        seen
    )
