"""Identity through HTTP, in process (both file API adapters): WLCG tokens from a local issuer,
service tokens, scopes per verb and path, ownership of bulk requests, admin-only views, the audit
trail. Every refusal is checked to have changed nothing: bytes on disk, catalog rows."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import webtest
from bulk_helpers import store_offline
from conftest import LAST_MODIFIED, files_under, init_tape_library
from token_issuer import AUDIENCE, Issuer

from pacifica_like.bulk.store import BulkStore
from pacifica_like.core.config import ConfigError, load_settings
from pacifica_like.identity import keys, service
from pacifica_like.identity.access import check_exposure
from pacifica_like.identity.scopes import Scope, ScopeError
from pacifica_like.identity.service import ServiceTokens
from pacifica_like.storage import registry
from pacifica_like.web.app import build_app

BODY = b"only for those who may\n" * 20
ADMINS = "/archive-admins"


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    running = Issuer()
    yield running
    running.stop()


@pytest.fixture
def make(tmp_path: Path, issuer: Issuer, file_api: str):
    """Build (settings, app) for an archive trusting ``issuer``; keyword args override [identity] keys."""
    built = []

    def build(backend: str = "posix", **identity: Any):
        flags: dict[str, dict[str, Any]] = {
            "archive": {"backend": backend, "prefix": str(tmp_path / "archive"), "allow_delete": True},
            "identity": {
                "issuers": issuer.url, "audiences": AUDIENCE, "admin_groups": ADMINS,
                "token_file": str(tmp_path / "tokens.json"), **identity,
            },
            "bulk": {"scheduler": "off"},
        }  # fmt: skip
        if backend == "tape":
            tape = {"library": str(tmp_path / "library"), "time_scale": 0.0, "volume_capacity": 64 << 20}
            init_tape_library(load_settings(flags={"tape": tape}, env={}))
            flags["tape"] = tape
        settings = load_settings(flags=flags, env={})
        storage = registry.create(settings)
        built.append(storage)
        return settings, storage, webtest.TestApp(build_app(settings, storage, file_api=file_api))

    yield build
    for storage in built:
        storage.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def put(app: webtest.TestApp, file_id: int, body: bytes, token: str | None, status: int = 201):
    headers = {"Last-Modified": LAST_MODIFIED, **(bearer(token) if token else {})}
    return app.put(f"/{file_id}", body, headers=headers, status=status)


def stored(prefix: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(prefix)): p.read_bytes() for p in files_under(prefix) if ".sqlite" not in p.name
    }


# -- tokens: which are accepted ------------------------------------------------------------


def test_a_valid_token_reads_and_a_missing_one_is_a_401_challenge(make, issuer: Issuer, tmp_path: Path):
    _, _, app = make()
    writer = issuer.mint("storage.modify:/ storage.read:/")
    put(app, 5, BODY, writer)
    assert app.get("/5", headers=bearer(issuer.mint("storage.read:/"))).body == BODY
    refused = app.get("/5", status=401)
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert refused.json["status"] == 401 and "token" in refused.json["message"]
    assert app.get("/").status_int == 200  # the liveness check needs nothing


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "expired"),
        ("not yet valid", "not yet valid"),
        ("wrong audience", "audience"),
        ("wrong issuer", "not trusted"),
        ("alg none", "algorithm"),
        ("hmac with the public key", "algorithm"),
        ("bad signature", "Signature"),
        ("garbage", "not a JWT"),
    ],
)
def test_tokens_that_cannot_be_trusted_are_401_invalid_token(make, issuer: Issuer, case: str, reason: str):
    _, _, app = make()
    put(app, 5, BODY, issuer.mint("storage.modify:/"))
    now = int(time.time())
    if case == "expired":
        token = issuer.mint(exp=now - 3600, iat=now - 7200, nbf=now - 7200)
    elif case == "not yet valid":
        token = issuer.mint(nbf=now + 3600)
    elif case == "wrong audience":
        token = issuer.mint(aud="https://elsewhere.example.org")
    elif case == "wrong issuer":
        token = issuer.mint(iss="https://evil.example.org")
    elif case == "alg none":
        claims = jwt.decode(issuer.mint(), options={"verify_signature": False})
        token = jwt.encode(claims, None, algorithm="none")
    elif case == "hmac with the public key":
        claims = jwt.decode(issuer.mint(), options={"verify_signature": False})
        public = json.dumps(issuer.jwks()["keys"][0]).encode()
        head = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": issuer.kid()}).encode()).rstrip(
            b"="
        )
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
        mac = hmac.new(public, head + b"." + payload, hashlib.sha256).digest()
        token = (head + b"." + payload + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()
    elif case == "bad signature":
        good = issuer.mint()
        token = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    else:
        token = "not.a.token"
    refused = app.get("/5", headers=bearer(token), status=401)
    challenge = refused.headers["WWW-Authenticate"]
    assert 'error="invalid_token"' in challenge
    assert reason.lower() in refused.json["message"].lower(), refused.json


def test_an_unknown_kid_fetches_the_keys_again_and_cached_keys_outlive_the_issuer(
    make, issuer: Issuer, monkeypatch
):
    monkeypatch.setattr(keys, "REFETCH_PAUSE", 0.0)
    _, _, app = make()
    put(app, 5, BODY, issuer.mint("storage.modify:/"))
    before = issuer.fetches
    app.get("/5", headers=bearer(issuer.mint(alg="ES256")))  # ES256 works too, from the cache
    assert issuer.fetches == before
    issuer.rotate()
    assert app.get("/5", headers=bearer(issuer.mint())).body == BODY  # new kid: fetched again
    assert issuer.fetches == before + 1


def test_keys_from_a_local_jwks_file_need_no_issuer(make, issuer: Issuer, tmp_path: Path):
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    before = issuer.fetches
    _, _, app = make(jwks_file=str(jwks))
    put(app, 6, BODY, issuer.mint("storage.create:/"))
    assert issuer.fetches == before


def test_cached_keys_serve_while_the_issuer_is_down(tmp_path: Path, file_api: str, monkeypatch):
    monkeypatch.setattr(keys, "REFETCH_PAUSE", 0.0)
    down = Issuer()
    flags = {
        "archive": {"prefix": str(tmp_path / "archive")},
        "identity": {"issuers": down.url, "audiences": AUDIENCE, "jwks_refresh_seconds": "0"},
    }
    settings = load_settings(flags=flags, env={})
    app = webtest.TestApp(build_app(settings, registry.create(settings), file_api=file_api))
    token = down.mint("storage.create:/ storage.read:/")
    put(app, 7, BODY, token)
    other = down.mint("storage.read:/", sub="bob")  # not yet checked: needs the keys again
    down.stop()
    assert app.get("/7", headers=bearer(other)).body == BODY


# -- scopes to verbs -----------------------------------------------------------------------


def test_each_verb_needs_its_scope_and_a_refusal_changes_nothing(make, issuer: Issuer, tmp_path: Path):
    _, _, app = make()
    prefix = tmp_path / "archive"
    reader, creator = issuer.mint("storage.read:/"), issuer.mint("storage.create:/")
    modifier, stager = issuer.mint("storage.modify:/ storage.read:/"), issuer.mint("storage.stage:/")
    # PUT of a new id: create (or modify); not read.
    assert "storage.create" in put(app, 9, BODY, reader, status=403).json["message"]
    assert stored(prefix) == {}
    put(app, 9, BODY, creator)
    before = stored(prefix)
    # Over an existing id: create is not enough; modify is.
    assert "storage.modify" in put(app, 9, b"other bytes", creator, status=403).json["message"]
    assert stored(prefix) == before
    put(app, 9, BODY[::-1], modifier)
    assert app.get("/9", headers=bearer(reader)).body == BODY[::-1]
    # GET, HEAD, PROPFIND: read.
    app.get("/9", headers=bearer(creator), status=403)
    app.head("/9", headers=bearer(stager), status=403)
    app.request("/9", method="PROPFIND", headers={"Depth": "0", **bearer(creator)}, status=403)
    assert app.head("/9", headers=bearer(reader)).status_int == 204
    # POST (stage): stage.
    app.post("/9", headers=bearer(reader), status=403)
    assert app.post("/9", headers=bearer(stager)).status_int == 200
    # DELETE and PATCH: modify.
    app.delete("/9", headers=bearer(creator), status=403)
    app.patch("/9", b"{}", headers={"Content-Type": "application/json", **bearer(creator)}, status=403)
    assert stored(prefix) == {k: BODY[::-1] for k in before}
    assert app.delete("/9", headers=bearer(modifier)).status_int == 200
    assert stored(prefix) == {}
    # The WebDAV door follows the same rules.
    app.put("/webdav/10", BODY, headers=bearer(reader), status=403)
    assert app.put("/webdav/10", BODY, headers=bearer(creator)).status_int == 201
    # Listing every file needs read on /.
    app.request(
        "/", method="PROPFIND", headers={"Depth": "1", **bearer(issuer.mint("storage.read:/10"))}, status=403
    )
    listed = app.request("/webdav/", method="PROPFIND", headers={"Depth": "1", **bearer(reader)})
    assert b"/webdav/10" in listed.body


def test_scope_paths_match_per_segment_and_ranges_are_one_segment(make, issuer: Issuer):
    _, _, app = make()
    admin = issuer.mint("storage.modify:/")
    for file_id in (12, 123, 1500, 2000):
        put(app, file_id, BODY, admin)
    one = issuer.mint("storage.read:/12")
    assert app.get("/12", headers=bearer(one)).status_int == 200
    app.get("/123", headers=bearer(one), status=403)  # /12 is not a prefix of /123
    ranged = issuer.mint("storage.read:/1000-1999")
    assert app.get("/1500", headers=bearer(ranged)).status_int == 200
    app.get("/2000", headers=bearer(ranged), status=403)
    assert Scope.parse("storage.read:/1000-1999").covers("read", "/1999")
    assert not Scope.parse("storage.read:/1000-1999").covers("read", "/999")
    assert Scope.parse("storage.modify:/").covers("create", "/5")  # modify includes create
    assert not Scope.parse("storage.create:/").covers("modify", "/5")


def test_a_scope_without_a_path_grants_nothing_and_the_403_says_so(make, issuer: Issuer):
    _, _, app = make()
    put(app, 5, BODY, issuer.mint("storage.modify:/"))
    refused = app.get("/5", headers=bearer(issuer.mint("storage.read")), status=403)
    assert "storage.read" in refused.json["message"] and "without a path" in refused.json["message"]
    with pytest.raises(ScopeError):
        Scope.parse("storage.read")


def test_a_create_only_upload_never_replaces_a_file_that_appears_meanwhile(make, issuer: Issuer):
    _, backend, _ = make()
    with backend.open_writer(20, 1.0, exclusive=True) as first:
        first.write(b"first")
        with backend.open_writer(20, 1.0) as racing:  # someone allowed to replace, faster
            racing.write(b"racing")
            racing.commit()
        with pytest.raises(Exception, match="already exists"):
            first.commit()
    with backend.open_reader(20) as reader:
        assert reader.read() == b"racing"


# -- service tokens ------------------------------------------------------------------------


def test_service_tokens_work_until_revoked(make, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(service, "RELOAD_CHECK", 0.0)
    _, _, app = make()
    tokens = ServiceTokens(str(tmp_path / "tokens.json"))
    record, secret = tokens.create("ingest", ["storage.create:/", "storage.read:/"])
    assert record.sha256 != secret and secret not in (tmp_path / "tokens.json").read_text()
    put(app, 30, BODY, secret)
    assert app.get("/30", headers=bearer(secret)).body == BODY
    put(app, 30, b"again", secret, status=403)  # create only
    tokens.revoke("ingest")
    refused = app.get("/30", headers=bearer(secret), status=401)
    assert "revoked" in refused.json["message"]
    app.get("/30", headers=bearer(secret[:-3] + "xyz"), status=401)


# -- admins --------------------------------------------------------------------------------


def test_metrics_queues_and_ready_details_are_for_admins(make, issuer: Issuer):
    _, _, app = make()
    user, admin = issuer.mint("storage.read:/"), issuer.mint("storage.read:/", groups=[ADMINS])
    app.get("/metrics", headers=bearer(user), status=403)
    app.get("/metrics", status=401)
    assert b"pacifica_like_http_requests_total" in app.get("/metrics", headers=bearer(admin)).body
    assert app.get("/ready").json == {"status": "ready"}
    assert "checks" in app.get("/ready", headers=bearer(admin)).json
    app.get("/api/v1/queues", headers=bearer(user), status=403)
    assert app.get("/api/v1/queues", headers=bearer(admin)).json == {"volumes": []}


# -- bulk requests: scopes and ownership ------------------------------------------------------


def test_bulk_requests_belong_to_their_subject(make, issuer: Issuer):
    settings, backend, app = make(backend="tape")
    store_offline(backend, {1: 100, 2: 200})
    alice, bob = issuer.mint("storage.stage:/", sub="alice"), issuer.mint("storage.stage:/", sub="bob")
    admin = issuer.mint("storage.read:/", groups=[ADMINS])
    body = {"files": [{"path": "/1"}, {"path": "/2"}]}
    # Stage needs storage.stage on every file; a refused request is not stored.
    refused = app.post_json(
        "/api/v1/stage", body, headers=bearer(issuer.mint("storage.stage:/1")), status=403
    )
    assert "/2" in refused.json["detail"]
    store = BulkStore.open(settings.archive.catalog)
    try:
        store.ensure_schema()
        assert store.Request.select().count() == 0
        request_id = app.post_json("/api/v1/stage", body, headers=bearer(alice)).json["requestId"]
        assert store.request(request_id).client == f"alice ({issuer.url})"
        # Bob sees nothing of it: as if it did not exist.
        for method, path, data in (
            ("GET", f"/api/v1/stage/{request_id}", None),
            ("POST", f"/api/v1/stage/{request_id}/cancel", {"paths": ["/1"]}),
            ("POST", f"/api/v1/release/{request_id}", {"paths": ["/1"]}),
            ("DELETE", f"/api/v1/stage/{request_id}", None),
        ):
            answer = app.request(
                path, method=method, headers={**bearer(bob), "Content-Type": "application/json"},
                body=json.dumps(data).encode() if data else b"", status=404,
            )  # fmt: skip
            assert answer.content_type == "application/problem+json"
        assert store.request(request_id) is not None
        assert {f.state for f in store.files(request_id)[0]} == {"SUBMITTED"}
        # Alice and an admin may.
        assert app.get(f"/api/v1/stage/{request_id}", headers=bearer(alice)).json["id"] == request_id
        assert app.get(f"/api/v1/stage/{request_id}", headers=bearer(admin)).json["id"] == request_id
        # Without a token: 401, the challenge names Bearer.
        assert "Bearer" in app.get(f"/api/v1/stage/{request_id}", status=401).headers["WWW-Authenticate"]
        app.post_json(f"/api/v1/stage/{request_id}/cancel", {"paths": ["/1"]}, headers=bearer(alice))
        assert app.delete(f"/api/v1/stage/{request_id}", headers=bearer(alice)).status_int == 200
    finally:
        store.close()
    # archiveinfo: read, stage or poll on each path.
    info = app.post_json(
        "/api/v1/archiveinfo", {"paths": ["/1"]}, headers=bearer(issuer.mint("storage.read:/"))
    )
    assert info.json == [{"path": "/1", "locality": "TAPE"}]
    app.post_json(
        "/api/v1/archiveinfo", {"paths": ["/1"]}, headers=bearer(issuer.mint("storage.create:/")), status=403
    )
    # The discovery document stays public.
    assert app.get("/.well-known/wlcg-tape-rest-api").status_int == 200


# -- the audit trail ------------------------------------------------------------------------


def test_every_change_is_audited_with_its_subject_and_never_the_token(make, issuer: Issuer, capsys):
    _, _, app = make()
    token = issuer.mint("storage.modify:/ storage.read:/", sub="carol")
    put(app, 40, BODY, token)
    app.delete("/40", headers=bearer(issuer.mint("storage.read:/", sub="mallory")), status=403)
    app.get("/40", headers=bearer(token))
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    audit = [line for line in lines if line.get("log") == "audit"]
    assert [(a["action"], a["subject"], a["status"], a["outcome"]) for a in audit] == [
        ("put", "carol", 201, "done"),
        ("delete", "mallory", 403, "refused"),
    ]
    assert all(a["issuer"] == issuer.url and a["path"] == "/40" for a in audit)
    assert token not in json.dumps(lines) and "Bearer" not in json.dumps(lines)


# -- secure by default ----------------------------------------------------------------------


def test_without_identity_only_loopback_unless_anonymous_says_what_anyone_may_do(tmp_path: Path):
    plain = load_settings(flags={"archive": {"prefix": str(tmp_path)}}, env={})
    check_exposure(plain, ["127.0.0.1:8080", "[::1]:8080", "localhost:8080"])
    with pytest.raises(ConfigError, match=r"anonymous = read, stage or all \(PAI_ANONYMOUS\)"):
        check_exposure(plain, ["0.0.0.0:8080"])
    for level in ("read", "none"):
        check_exposure(
            load_settings(flags={"archive": {"prefix": str(tmp_path)}}, env={"PAI_ANONYMOUS": level}),
            ["0.0.0.0:80"],
        )


def test_anonymous_read_reads_but_changes_nothing(tmp_path: Path, file_api: str):
    flags = {"archive": {"prefix": str(tmp_path / "a")}, "identity": {"anonymous": "read"}}
    settings = load_settings(flags=flags, env={})
    app = webtest.TestApp(build_app(settings, registry.create(settings), file_api=file_api))
    put(app, 1, BODY, None, status=401)
    assert stored(tmp_path / "a") == {}
