"""Service tokens: long random secrets for service accounts (ingest, cartd, a metrics scraper).

A token is ``plt_<id>_<secret>``: the id names it in listings and revocations,
the 256-bit secret is shown once, at creation, and only its sha-256 is kept.
The tokens file (``[identity] token_file``) is JSON, written through
``core.durable.atomic_write`` (mode 0600), so a reader sees the old file or the
new one. Serving processes read it again when its mtime or size changes,
looked at no more than once a second, so a revocation takes effect within a
second on every worker.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field

from pacifica_like.core import durable
from pacifica_like.identity.scopes import Principal, Scope, ScopeError

PREFIX = "plt_"
ISSUER = "pacifica-like"
#: Seconds between looks at the tokens file's mtime.
RELOAD_CHECK = 1.0


class TokenFileError(Exception):
    """The tokens file cannot be read or names something unusable."""


@dataclass(frozen=True)
class ServiceToken:
    """One service account's token as stored (never the secret)."""

    id: str
    name: str
    sha256: str
    scopes: tuple[str, ...]
    admin: bool = False
    created: float = field(default_factory=time.time)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def is_service_token(token: str) -> bool:
    """True when ``token`` has the form of one of ours (anything else is tried as a JWT)."""
    return token.startswith(PREFIX)


class ServiceTokens:
    """The tokens file: create, list, revoke (the CLI), and check (the server)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tokens: dict[str, ServiceToken] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()

    # -- reading -------------------------------------------------------------------

    def tokens(self) -> list[ServiceToken]:
        """Every token in the file, oldest first."""
        self._reload(force=True)
        return sorted(self._tokens.values(), key=lambda t: t.created)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_CHECK:
            return
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._tokens, self._stamp = {}, None
                return
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # every write is a new inode
            if stamp == self._stamp and not force:
                return
            self._tokens = self._read()
            self._stamp = stamp

    def _read(self) -> dict[str, ServiceToken]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                document = json.load(handle)
            found = {}
            for entry in document.get("tokens", []):
                token = ServiceToken(
                    id=str(entry["id"]), name=str(entry["name"]), sha256=str(entry["sha256"]),
                    scopes=tuple(entry["scopes"]), admin=bool(entry.get("admin", False)),
                    created=float(entry["created"]),
                )  # fmt: skip
                found[token.id] = token
            return found
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TokenFileError(f"cannot read the service tokens file {self.path}: {exc}") from exc

    def check(self, token: str) -> Principal | None:
        """Return the service account ``token`` is the secret of, or None (unknown, revoked, malformed)."""
        token_id, _, secret = token[len(PREFIX) :].partition("_")
        if not secret:
            return None
        self._reload()
        found = self._tokens.get(token_id)
        if found is None or not hmac.compare_digest(found.sha256, _hash(token)):
            return None
        return Principal(
            issuer=ISSUER,
            subject=f"service:{found.name}",
            scopes=tuple(Scope.parse(s) for s in found.scopes),
            kind="service",
            admin=found.admin,
        )

    # -- changing (pacifica-like token ...) -------------------------------------------

    def create(self, name: str, scopes: list[str], admin: bool = False) -> tuple[ServiceToken, str]:
        """Add a token; return it and its secret (shown once, never stored)."""
        for scope in scopes:
            try:
                Scope.parse(scope)
            except ScopeError as exc:
                raise TokenFileError(str(exc)) from None
        if not scopes and not admin:
            raise TokenFileError("a service token needs at least one --scope (or --admin)")
        current = {t.id: t for t in self.tokens()}
        if any(t.name == name for t in current.values()):
            raise TokenFileError(f"a token named {name!r} exists; revoke it first")
        token_id = secrets.token_hex(6)
        secret = f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        token = ServiceToken(token_id, name, _hash(secret), tuple(scopes), admin)
        current[token_id] = token
        self._write(current)
        return token, secret

    def revoke(self, which: str) -> ServiceToken:
        """Remove the token with id or name ``which``; return it. TokenFileError when there is none."""
        current = {t.id: t for t in self.tokens()}
        found = next((t for t in current.values() if which in (t.id, t.name)), None)
        if found is None:
            raise TokenFileError(f"no service token with id or name {which!r}")
        del current[found.id]
        self._write(current)
        return found

    def _write(self, tokens: dict[str, ServiceToken]) -> None:
        document = {"tokens": [asdict(t) | {"scopes": list(t.scopes)} for t in tokens.values()]}
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with durable.atomic_write(self.path, binary=False, mode=0o600) as handle:
            json.dump(document, handle, indent=2)
        self._reload(force=True)
