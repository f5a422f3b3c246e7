"""The Authenticator: an ``Authorization`` header in, a Principal (or a refusal) out.

Checked tokens are cached by their sha-256 until they expire (at most
CACHE_SIZE of them, the oldest dropped first), so a client sending the same
token on every request pays one signature check, not one per request. A
service token is looked up in the tokens file each time (a dict lookup and
one hash): a revocation then takes effect at once.

Without a token a request acts as the anonymous Principal, whose scopes come
from ``[identity] anonymous``; unset, that is ``all`` when no identity is
configured (the service then listens on loopback only: see
:func:`check_exposure`) and ``none`` otherwise.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
import time
from collections import OrderedDict

from pacifica_like.core.config import ConfigError, Settings
from pacifica_like.identity.bearer import BearerTokens, InvalidToken
from pacifica_like.identity.scopes import Principal, Scope
from pacifica_like.identity.service import ServiceTokens, is_service_token

#: Checked JWTs kept, by the sha-256 of the token.
CACHE_SIZE = 4096
#: What each ``anonymous`` level grants, on every file.
ANONYMOUS_SCOPES = {
    "none": (),
    "read": ("read",),
    "stage": ("read", "stage"),
    "all": ("read", "modify", "stage"),
}


class Unauthenticated(Exception):
    """The request's credentials are present but not acceptable (a 401 with the reason)."""


def anonymous_level(settings: Settings) -> str:
    """What a request without a token may do: the setting, else all without identity, else none."""
    level = settings.identity.anonymous
    if level is not None:
        return level
    return "none" if settings.identity.configured else "all"


def check_exposure(settings: Settings, addresses: list[str]) -> None:
    """Refuse to serve on a non-loopback address when anyone could do everything there.

    ``addresses``: where the service listens (serve's address; uWSGI's http or
    socket addresses; unix sockets are left out, their front end's exposure is
    its own configuration). Raises ConfigError naming the settings to change.
    """
    if settings.identity.configured or settings.identity.anonymous is not None:
        return
    exposed = [a for a in addresses if not _loopback(a)]
    if exposed:
        raise ConfigError(
            f"refusing to listen on {', '.join(exposed)} without identity: anyone reaching it could "
            "change the archive. Configure [identity] issuers or token_file, or say what anonymous "
            "clients may do with [identity] anonymous = read, stage or all (PAI_ANONYMOUS)"
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m pacifica_like.identity.access --listen ADDRESS``: exit 2 if serving there is refused.

    For front ends started by scripts (the Docker entrypoint's nginx), which
    listen where neither serve nor uWSGI can see.
    """
    import argparse
    import sys

    from pacifica_like.core.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m pacifica_like.identity.access")
    parser.add_argument("--listen", required=True, help="HOST:PORT or :PORT the front end listens on")
    args = parser.parse_args(argv)
    listen = args.listen if not args.listen.startswith(":") else "0.0.0.0" + args.listen
    try:
        check_exposure(load_settings(), [] if listen.startswith("/") else [listen])
    except ConfigError as exc:
        print(f"pacifica-like: {exc}", file=sys.stderr)
        return 2
    return 0


def _loopback(address: str) -> bool:
    if address.startswith("["):  # [IPv6]:port
        host = address[1:].partition("]")[0]
    elif address.count(":") == 1:  # host:port
        host = address.rpartition(":")[0]
    else:  # a bare IPv6 address
        host = address
    host = host or "0.0.0.0"
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Turns a request's ``Authorization`` header into a Principal; thread-safe."""

    def __init__(self, settings: Settings) -> None:
        identity = settings.identity
        self.bearer = BearerTokens(identity) if identity.issuers else None
        self.service = ServiceTokens(identity.token_file) if identity.token_file else None
        self.configured = identity.configured
        level = anonymous_level(settings)
        self.anonymous = Principal(
            issuer="",
            subject="anonymous",
            scopes=tuple(Scope(action, ("",)) for action in ANONYMOUS_SCOPES[level]),
            kind="anonymous",
            admin=level == "all",
        )
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()
        self._lock = threading.Lock()

    def principal(self, authorization: str | None) -> Principal:
        """Return who the header speaks for; Unauthenticated when it carries a token we cannot accept."""
        if not authorization or not self.configured:
            # Without identity nothing can check a token: it is ignored, as on any open archive.
            return self.anonymous
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("send the token as Authorization: Bearer <token>")
        if is_service_token(token):
            found = self.service.check(token) if self.service is not None else None
            if found is None:
                raise Unauthenticated("unknown or revoked service token")
            return found
        if self.bearer is None:
            raise Unauthenticated("this archive trusts no token issuer ([identity] issuers)")
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        now = time.time()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached.expires is not None and cached.expires > now:
            return cached
        try:
            checked = self.bearer.check(token)
        except InvalidToken as exc:
            raise Unauthenticated(str(exc)) from None
        with self._lock:
            self._cache[key] = checked
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return checked


if __name__ == "__main__":
    raise SystemExit(main())
