"""A token issuer the tests start on 127.0.0.1: an OpenID discovery document, a JWKS, and minting.

Keys are made with ``cryptography`` (RSA 2048 for RS256, P-256 for ES256) and
tokens signed with PyJWT, as a real WLCG issuer (INDIGO IAM, CILogon) would:
``iss``, ``sub``, ``aud``, ``exp``, ``nbf``, ``iat``, ``scope``, ``wlcg.ver``,
and ``wlcg.groups`` when asked. ``rotate()`` replaces the keys the JWKS
publishes; ``stop()`` takes the issuer down (the gateway must go on with the keys it cached).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

AUDIENCE = "https://archive.example.org"


class Issuer:
    """One issuer: its keys, its HTTP endpoints, and the tokens it signs."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[str, Any]] = {}
        self.rotate()
        self.fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    issuer.fetches += 1
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def rotate(self) -> None:
        """Publish new keys (one RSA, one EC) in place of the old ones."""
        self._keys = {
            f"rsa-{uuid.uuid4().hex[:8]}": (
                "RS256",
                rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ),
            f"ec-{uuid.uuid4().hex[:8]}": ("ES256", ec.generate_private_key(ec.SECP256R1())),
        }

    def kid(self, alg: str = "RS256") -> str:
        return next(kid for kid, (algorithm, _) in self._keys.items() if algorithm == alg)

    def private_key(self, alg: str = "RS256") -> Any:
        return self._keys[self.kid(alg)][1]

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWKS."""
        keys = []
        for kid, (alg, key) in self._keys.items():
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": keys}

    def mint(
        self,
        scope: str = "storage.read:/",
        sub: str = "alice",
        alg: str = "RS256",
        lifetime: float = 600,
        groups: list[str] | None = None,
        **claims: Any,
    ) -> str:
        """Sign a WLCG token; ``claims`` override the defaults (``aud=``, ``iss=``, ``nbf=``, ``kid=``)."""
        now = time.time()
        kid = claims.pop("kid", None) or self.kid(alg)
        body = {
            "iss": self.url, "sub": sub, "aud": AUDIENCE, "iat": int(now), "nbf": int(now),
            "exp": int(now + lifetime), "jti": uuid.uuid4().hex, "wlcg.ver": "1.0", "scope": scope,
        }  # fmt: skip
        if groups is not None:
            body["wlcg.groups"] = groups
        body.update(claims)
        key = self._keys[kid][1] if kid in self._keys else self.private_key(alg)
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
