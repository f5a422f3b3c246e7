"""What checking tokens costs: in process (the Authenticator alone) and on 4 KiB GET through uWSGI.

In process, per call to ``Authenticator.principal``: a JWT seen before (the
cache hit every request after a client's first pays), a fresh RS256 and ES256
JWT (a full signature check), and a service token (a hash and a lookup).

Over HTTP, one server (ours, uWSGI, ``--processes`` workers) with identity
configured from a local JWKS file and ``anonymous = all``, so the same GET
cells run without a token (anonymous) and with one (a cache hit after the first
request on each worker), alternating, as the HTTP section does ours and the peer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench import servers, smallfiles
from bench.content import SMALL_SIZE
from pacifica_like.core.config import load_settings
from pacifica_like.identity.access import Authenticator
from pacifica_like.identity.service import ServiceTokens
from pacifica_like.web.devserver import RunningServer

ISSUER = "https://issuer.bench.invalid"
AUDIENCE = "https://archive.bench.invalid"
CONCURRENCY = (1, 16)
HIT_CALLS = 200_000
CHECK_CALLS = 2_000


def _keys(workdir: Path) -> tuple[dict[str, Any], Path]:
    """Make an RSA and an EC key; write their JWKS; return the private keys by alg and the file."""
    private = {"RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
               "ES256": ec.generate_private_key(ec.SECP256R1())}  # fmt: skip
    keys = []
    for alg, key in private.items():
        public = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
        keys.append({**public, "kid": alg.lower(), "alg": alg, "use": "sig"})
    path = workdir / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return private, path


def _mint(private: dict[str, Any], alg: str = "RS256", sub: str = "bench") -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": sub, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 86400,
              "scope": "storage.read:/ storage.create:/", "jti": os.urandom(8).hex()}  # fmt: skip
    return jwt.encode(claims, private[alg], algorithm=alg, headers={"kid": alg.lower()})


def _per_call_us(call: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def run_identity(
    workdir: Path, processes: int, duration: int, files: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Measure in process, then over HTTP; return the figures for the report."""
    workdir.mkdir(parents=True)
    private, jwks = _keys(workdir)
    tokens_file = workdir / "tokens.json"
    _, service_token = ServiceTokens(str(tokens_file)).create("bench", ["storage.read:/"])
    env = {
        "PAI_PREFIX": str(workdir / "data"), "PAI_ISSUERS": ISSUER, "PAI_AUDIENCES": AUDIENCE,
        "PAI_JWKS_FILE": str(jwks), "PAI_TOKEN_FILE": str(tokens_file), "PAI_ANONYMOUS": "all",
    }  # fmt: skip
    authenticator = Authenticator(load_settings(env=env))
    token = _mint(private)
    header = f"Bearer {token}"
    authenticator.principal(header)
    in_process = {
        "cache_hit_us": _per_call_us(lambda: authenticator.principal(header), HIT_CALLS),
        "rs256_check_us": _per_call_us(lambda: authenticator.bearer.check(_mint(private)), CHECK_CALLS),
        "es256_check_us": _per_call_us(
            lambda: authenticator.bearer.check(_mint(private, "ES256")), CHECK_CALLS
        ),
        "mint_rs256_us": _per_call_us(lambda: _mint(private), CHECK_CALLS),
        "mint_es256_us": _per_call_us(lambda: _mint(private, "ES256"), CHECK_CALLS),
        "service_token_us": _per_call_us(
            lambda: authenticator.principal(f"Bearer {service_token}"), HIT_CALLS
        ),
    }
    log("identity in process: " + ", ".join(f"{k} {v:.2f}" for k, v in in_process.items()))
    target = servers.Target("ours", "pacifica_like", workdir / "data", env)
    (workdir / "data").mkdir()
    cells: list[dict[str, Any]] = []
    with servers.serve(target, processes, workdir) as server:
        smallfiles.populate(servers.port_of(server), 0, files)
        for connections in CONCURRENCY:
            for label, headers in (("anonymous", ()), ("token", (f"Authorization: {header}",))):
                cell = _cell(server, connections, duration, files, headers)
                log(
                    f"identity GET c={connections} {label:<9} {cell.ops_per_s:8.0f} ops/s, "
                    f"errors {cell.errors}"
                )
                cells.append({"connections": connections, "label": label, **cell.as_dict()})
    return {"in_process": in_process, "cells": cells}


def _cell(
    server: RunningServer, connections: int, duration: int, files: int, headers: tuple[str, ...]
) -> Any:
    os.sync()
    return smallfiles.run_cell(
        "ours", server.url, "get", connections, duration, 0, files, SMALL_SIZE, headers
    )


def identity_table(results: dict[str, Any]) -> str:
    """The section's table: in-process costs, then GET without and with a token."""
    found = results["in_process"]
    lines = [
        "identity (pacifica_like.identity): cost of checking a token",
        f"  cache hit (same token again)         {found['cache_hit_us']:8.2f} us per request",
        f"  service token (hash and lookup)      {found['service_token_us']:8.2f} us",
        f"  first sight of an RS256 JWT          {found['rs256_check_us'] - found['mint_rs256_us']:8.2f} us"
        " (check alone, minting subtracted)",
        f"  first sight of an ES256 JWT          {found['es256_check_us'] - found['mint_es256_us']:8.2f} us",
        "  GET 4 KiB (ops/s)        anonymous      token     token/anonymous",
    ]
    by_key = {(c["connections"], c["label"]): c for c in results["cells"]}
    for connections in CONCURRENCY:
        plain, token = by_key[connections, "anonymous"], by_key[connections, "token"]
        ratio = token["ops_per_s"] / plain["ops_per_s"] if plain["ops_per_s"] else 0.0
        lines.append(
            f"    c={connections:<2}                 {plain['ops_per_s']:9.0f}  {token['ops_per_s']:9.0f}"
            f"     {ratio:.2f}x (errors {plain['errors']}/{token['errors']})"
        )
    return "\n".join(lines)
