"""Identity through live servers: ``pacifica-like serve`` and nginx + uWSGI checking tokens from a
local issuer; both refusing to listen beyond loopback without identity; the Python client and the
CLI sending tokens; gfal2 with ``BEARER_TOKEN`` against the tape backend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bulk_helpers import content, live_tape_ini, store_offline
from test_gfal2_client import _gfal_env, outcome_lines
from token_issuer import AUDIENCE, Issuer

from pacifica_like.client import ArchiveClient, Forbidden, NotAuthenticated, discover_token
from pacifica_like.core.config import load_settings
from pacifica_like.storage import registry
from pacifica_like.web import devserver
from pacifica_like.wsgi import uwsgi_addresses

pytestmark = pytest.mark.live
TIMEOUT = 30
BODY = b"checked at the door\n" * 100


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    running = Issuer()
    yield running
    running.stop()


def identity_env(issuer: Issuer, prefix: Path) -> dict[str, str]:
    return {"PAI_PREFIX": str(prefix), "PAI_ISSUERS": issuer.url, "PAI_AUDIENCES": AUDIENCE}


@pytest.fixture(params=["serve", "production"])
def gateway(request: pytest.FixtureRequest, issuer: Issuer, tmp_path: Path):
    env = identity_env(issuer, tmp_path / "archive")
    if request.param == "serve":
        with devserver.cli_server([], env=env) as running:
            yield running
    else:
        with devserver.production_server(env, processes=2) as running:
            yield running


def call(
    url: str, method: str = "GET", data: bytes | None = None, token: str | None = None
) -> tuple[int, Any, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as answer:
        return answer.code, answer.headers, answer.read()


def test_tokens_are_checked_on_serve_and_behind_nginx(gateway, issuer: Issuer):
    url = gateway.url
    writer, reader = issuer.mint("storage.create:/ storage.read:/"), issuer.mint("storage.read:/")
    code, headers, _ = call(f"{url}/5", "PUT", BODY)
    assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert call(f"{url}/5", "PUT", BODY, reader)[0] == 403
    assert call(f"{url}/5", "PUT", BODY, writer)[0] == 201
    assert call(f"{url}/5", token=reader)[2] == BODY
    assert call(f"{url}/5", "PUT", b"over", writer)[0] == 403  # create only
    assert call(f"{url}/5", token=reader)[2] == BODY
    expired = issuer.mint("storage.read:/", lifetime=-3600, iat=0, nbf=0)
    assert call(f"{url}/5", token=expired)[0] == 401
    # The Python client sends its token; its errors are the classes.
    with ArchiveClient(url, token=reader) as client:
        assert client.stat(5).size == len(BODY)
        with pytest.raises(Forbidden):
            client.delete(5)
    with ArchiveClient(url, token="") as client, pytest.raises(NotAuthenticated):
        client.stat(5)
    # The audit trail names the subject (uWSGI's log is the one the server keeps).
    audit = [json.loads(line) for line in gateway.log().splitlines() if '"log": "audit"' in line]
    assert ("put", "alice", 201) in {(a["action"], a["subject"], a["status"]) for a in audit}


def test_the_cli_takes_a_token_from_its_flag_a_file_and_bearer_token(gateway, issuer: Issuer, tmp_path: Path):
    reader = issuer.mint("storage.read:/")
    writer = issuer.mint("storage.create:/")
    source = tmp_path / "in.bin"
    source.write_bytes(BODY)
    base = [sys.executable, "-m", "pacifica_like", "client"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEARER_TOKEN", "PAI_"))}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # no bt_u<uid> file there

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=TIMEOUT, env={**env, **extra}
        )

    assert run("put", "7", str(source), "--url", gateway.url, "--token", writer).returncode == 0
    token_file = tmp_path / "token"
    token_file.write_text(reader + "\n")
    out = tmp_path / "out.bin"
    assert run("get", "7", str(out), "--url", gateway.url, "--token-file", str(token_file)).returncode == 0
    assert out.read_bytes() == BODY
    assert run("stat", "7", "--url", gateway.url, BEARER_TOKEN=reader).returncode == 0
    refused = run("stat", "7", "--url", gateway.url)
    assert refused.returncode != 0 and "401" in refused.stderr + refused.stdout


def test_discover_token_follows_the_wlcg_order(tmp_path: Path):
    uid = os.geteuid()
    (tmp_path / f"bt_u{uid}").write_text("from-runtime-dir\n")
    (tmp_path / "file").write_text(" from-file \n")
    assert discover_token({"BEARER_TOKEN": "direct", "BEARER_TOKEN_FILE": str(tmp_path / "file")}) == "direct"
    assert discover_token({"BEARER_TOKEN_FILE": str(tmp_path / "file")}) == "from-file"
    assert discover_token({"XDG_RUNTIME_DIR": str(tmp_path)}) == "from-runtime-dir"


# -- secure by default ------------------------------------------------------------------------


def test_serve_refuses_a_public_address_without_identity_naming_the_setting(tmp_path: Path):
    port = devserver.free_port()
    command = [sys.executable, "-m", "pacifica_like", "serve", "-a", "0.0.0.0", "-p", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAI_")} | {
        "PAI_PREFIX": str(tmp_path / "a")
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 2
    assert "0.0.0.0" in done.stderr and "PAI_ANONYMOUS" in done.stderr
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_serve_on_a_public_address_with_anonymous_read_serves_reads_only(tmp_path: Path):
    port = devserver.free_port()
    command = [sys.executable, "-m", "pacifica_like", "serve", "-a", "0.0.0.0", "-p", str(port)]
    env = {"PAI_PREFIX": str(tmp_path / "a"), "PAI_ANONYMOUS": "read"}
    with devserver.run_server(command, port, env) as server:
        assert call(f"{server.url}/")[0] == 200
        assert call(f"{server.url}/5", "PUT", BODY)[0] == 401
        assert call(f"{server.url}/5")[0] == 404


def test_uwsgi_refuses_a_public_http_socket_without_identity(tmp_path: Path):
    port = devserver.free_port()
    command = devserver.uwsgi_command(port, processes=1)
    command[command.index("--http-socket") + 1] = f"0.0.0.0:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAI_")} | {
        "PAI_PREFIX": str(tmp_path / "a")
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    assert "PAI_ANONYMOUS" in done.stdout + done.stderr
    found = uwsgi_addresses({"http-socket": b"0.0.0.0:80", "socket": [b"/run/u.sock", b"127.0.0.1:9"]})
    assert sorted(found) == ["0.0.0.0:80", "127.0.0.1:9"]


# -- gfal2 with BEARER_TOKEN ---------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("gfal-bringonline") is None, reason="gfal2's tools are not installed (.ci/run)"
)
def test_gfal2_stages_polls_and_releases_with_bearer_token_and_fails_without(issuer: Issuer, tmp_path: Path):
    ini = live_tape_ini(
        tmp_path,
        "[bulk]\nmount_min_files = 1\nmax_wait_seconds = 0\npoll_seconds = 0.05\n"
        f"[identity]\nissuers = {issuer.url}\naudiences = {AUDIENCE}\n",
    )
    settings = load_settings(config_file=str(ini), env={})
    backend = registry.create(settings)
    try:
        store_offline(backend, {1: 3001, 2: 3002})
    finally:
        backend.close()
    env = _gfal_env()
    for key in ("BEARER_TOKEN", "BEARER_TOKEN_FILE"):
        env.pop(key, None)
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    with devserver.cli_server(["--config", str(ini)]) as server:
        url = f"{server.url}/1"

        def gfal(*args: str, token: str | None) -> subprocess.CompletedProcess[str]:
            extra = {"BEARER_TOKEN": token} if token else {}
            return subprocess.run(
                [args[0], "-t", "30", *args[1:]],
                env={**env, **extra},
                capture_output=True,
                text=True,
                timeout=90,
            )

        refused = gfal("gfal-bringonline", "--polling-timeout", "20", url, token=None)
        assert "READY" not in refused.stdout
        stager = issuer.mint("storage.stage:/ storage.read:/", sub="fts")
        done = gfal("gfal-bringonline", "--polling-timeout", "20", url, token=stager)
        assert done.returncode == 0 and outcome_lines(done) == {url: "READY"}, (done.stdout, done.stderr)
        assert call(url, token=issuer.mint("storage.read:/"))[2] == content(1, 3001)
        polled = gfal("gfal-archivepoll", url, token=stager)
        assert outcome_lines(polled) == {url: "READY"}, (polled.stdout, polled.stderr)
        evicted = gfal("gfal-evict", url, token=stager)
        assert evicted.returncode == 0, (evicted.stdout, evicted.stderr)
        assert gfal("gfal-evict", url, token=None).returncode != 0


# -- TLS and proxies -------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with cryptography."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        # Its own trust anchor: what strict verification (urllib3 2) asks of a self-signed certificate.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert, private = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, private


def test_serve_speaks_https_when_given_a_certificate_and_key(issuer: Issuer, tmp_path: Path, monkeypatch):
    import ssl
    import time

    cert, key = self_signed(tmp_path)
    port = devserver.free_port()
    env = {
        **os.environ,
        **identity_env(issuer, tmp_path / "archive"),
        "PAI_TLS_CERT": str(cert),
        "PAI_TLS_KEY": str(key),
    }
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below, after the process
    process = subprocess.Popen(
        [sys.executable, "-m", "pacifica_like", "serve", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=5, context=context) as answer:
                    assert answer.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(0.1)
        writer = issuer.mint("storage.create:/ storage.read:/")
        request = urllib.request.Request(
            url + "/8", data=BODY, method="PUT", headers={"Authorization": f"Bearer {writer}"}
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as answer:
            assert answer.status == 201
        # requests lets these variables beat a session's own CA file.
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        with ArchiveClient(url, token=writer) as client:
            client.session.verify = str(cert)
            assert client.stat(8).size == len(BODY)
        # Plain HTTP on the TLS port gets no answer a client could take for one.
        with pytest.raises((urllib.error.URLError, ConnectionError, http_client_errors())):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
    finally:
        devserver.stop_group(process)
        log.close()


def http_client_errors() -> type[Exception]:
    import http.client

    return http.client.HTTPException


def test_forwarded_addresses_are_believed_only_from_trusted_proxies(issuer: Issuer, tmp_path: Path):
    writer = issuer.mint("storage.create:/", sub="dave")
    remotes = {}
    for trusted in ("", "127.0.0.1"):
        env = identity_env(issuer, tmp_path / f"archive-{trusted or 'none'}") | {
            "PAI_TRUSTED_PROXIES": trusted
        }
        with devserver.production_server(env, processes=1) as server:
            request = urllib.request.Request(
                f"{server.url}/9", data=BODY, method="PUT",
                headers={"Authorization": f"Bearer {writer}", "X-Forwarded-For": "198.51.100.1, 203.0.113.9"},
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
                assert answer.status == 201
            audit = [json.loads(line) for line in server.log().splitlines() if '"log": "audit"' in line]
            remotes[trusted] = audit[-1]["remote"]
    # nginx reaches uWSGI from 127.0.0.1: trusted, the hop it was handed is the client.
    assert remotes == {"": "127.0.0.1", "127.0.0.1": "203.0.113.9"}
