"""Each issuer's signing keys: from its discovery document and JWKS, cached, or from a local file.

Keys are fetched once, again after ``jwks_refresh_seconds``, and at once when a
token names a ``kid`` the cache lacks (an issuer rotating its keys), at most
once per REFETCH_PAUSE so that tokens with made-up kids cannot make us hammer
the issuer. While the issuer is unreachable the cached keys go on serving.
PyJWT parses the keys (``jwt.PyJWKSet``); nothing here does cryptography.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import jwt

log = logging.getLogger("pacifica_like.error")

#: Seconds between refetches caused by unknown kids, per issuer.
REFETCH_PAUSE = 10.0
#: Seconds to wait for an issuer's discovery document or JWKS.
FETCH_TIMEOUT = 5.0
#: Largest discovery document or JWKS read.
MAX_DOCUMENT = 1 << 20


class KeyUnavailable(Exception):
    """No key for this token: unknown kid, or the issuer's keys were never fetched."""


class IssuerKeys:
    """The signing keys of one issuer, by ``kid``."""

    def __init__(self, issuer: str, refresh_seconds: float, local_jwks: dict[str, Any] | None = None) -> None:
        self.issuer = issuer
        self.refresh_seconds = refresh_seconds
        self._local = local_jwks is not None
        self._keys: dict[str, jwt.PyJWK] = _parse(local_jwks) if local_jwks is not None else {}
        self._fetched_at = time.monotonic() if self._local else float("-inf")
        self._last_try = float("-inf")
        self._lock = threading.Lock()

    def key(self, kid: str | None) -> jwt.PyJWK:
        """Return the key ``kid`` names (the only key when the token names none); KeyUnavailable."""
        if not self._local:
            now = time.monotonic()
            if now - self._fetched_at > self.refresh_seconds or self._find(kid) is None:
                self._refresh(now)
        found = self._find(kid)
        if found is None:
            raise KeyUnavailable(f"issuer {self.issuer} has no signing key {kid!r}")
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        keys = self._keys
        if kid is None:
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid)

    def _refresh(self, now: float) -> None:
        """Fetch the JWKS again, at most once per REFETCH_PAUSE; on failure the cached keys stay in use."""
        with self._lock:
            if now - self._last_try < REFETCH_PAUSE:  # read at call time: tests shorten it
                return
            self._last_try = now
            try:
                discovery = _get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
                jwks_uri = discovery.get("jwks_uri")
                if not isinstance(jwks_uri, str):
                    raise ValueError("the discovery document names no jwks_uri")
                self._keys = _parse(_get_json(jwks_uri))
                self._fetched_at = now
            except (OSError, ValueError, jwt.PyJWKSetError) as exc:
                log.warning(
                    "cannot fetch the signing keys of %s (%s); %d cached keys stay in use",
                    self.issuer, exc, len(self._keys),
                )  # fmt: skip


def _get_json(url: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as answer:
        document = json.loads(answer.read(MAX_DOCUMENT))
    if not isinstance(document, dict):
        raise ValueError(f"{url} did not answer a JSON object")
    return document


def _parse(jwks: dict[str, Any]) -> dict[str, jwt.PyJWK]:
    """Return the usable signing keys of a JWKS by kid (keys of other uses or types are left out)."""
    keys: dict[str, jwt.PyJWK] = {}
    for index, entry in enumerate(jwks.get("keys", [])):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError):
            continue
        keys[str(entry.get("kid", index))] = key
    return keys


def load_jwks_file(path: str) -> dict[str, Any]:
    """Read a local JWKS file (``[identity] jwks_file``): one JWKS for every issuer."""
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f"{path} is not a JWKS (a JSON object with a keys list)")
    return document
