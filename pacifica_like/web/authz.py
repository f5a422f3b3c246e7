"""Who may do what, decided before a request reaches a handler (WLCG scopes, ``pacifica_like.identity``).

Every request is authenticated (``Authorization: Bearer``; none is the
anonymous principal) and the principal is left in the environ for the
handlers, the bulk API and the audit line. Then, by path and verb:

=====================================  ==========================================
``GET /``, OPTIONS, the discovery doc  anyone
GET, HEAD, PROPFIND of a file          ``storage.read`` on its path
PROPFIND of ``/`` or ``/webdav/``      ``storage.read`` on every file (``/``)
PUT                                    ``storage.modify``; or ``storage.create``
                                       when no file has the id (then the upload
                                       may not replace one that appears meanwhile)
PATCH, DELETE                          ``storage.modify``
POST ``/<id>`` (stage)                 ``storage.stage``
``/metrics``                           an admin (``admin_groups``, an admin
                                       service token, or anonymous ``all``)
``/ready``                             anyone; its checks' details for admins only
``/api/v1/...``                        per file and per request, in the bulk API
=====================================  ==========================================

A file's path is ``/<id>`` below ``[server] namespace``. A missing or bad token
where one is needed is a 401 with ``WWW-Authenticate: Bearer``; a token whose
scopes do not reach is a 403. Either way nothing has been read or changed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from pacifica_like.core.errors import (
    ArchiveError,
    FileNotInArchive,
    Forbidden,
    InvalidRequest,
    NotAuthenticated,
)
from pacifica_like.core.ids import parse_id
from pacifica_like.identity.access import Authenticator, Unauthenticated
from pacifica_like.identity.scopes import Principal, Scope
from pacifica_like.storage.contract import Backend
from pacifica_like.web import errors
from pacifica_like.web.filehandlers import CREATE_ONLY_KEY

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
#: environ keys: the request's Principal, and its client's address (X-Forwarded-For from trusted proxies).
PRINCIPAL_KEY = "pacifica_like.principal"
CLIENT_KEY = "pacifica_like.client"
#: Who a request is when no Guard saw it (an app built without one, as before identity): anyone, all rights.
ANYONE = Principal(
    issuer="",
    subject="anonymous",
    scopes=tuple(Scope(action, ("",)) for action in ("read", "modify", "stage")),
    kind="anonymous",
    admin=True,
)
#: Paths anyone may use, whatever the token.
PUBLIC_MOUNTS = frozenset((".well-known",))
READ_VERBS = frozenset(("GET", "HEAD", "PROPFIND"))


class Guard:
    """WSGI middleware: authenticate, decide, then pass the request on or refuse it."""

    def __init__(
        self,
        app: WSGIApp,
        authenticator: Authenticator,
        backend: Backend,
        namespace: str = "",
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.backend = backend
        self.namespace = namespace
        self.trusted = tuple(ipaddress.ip_network(network) for network in trusted_proxies)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Refuse (401/403) or serve the request."""
        path = environ.get("PATH_INFO") or "/"
        environ[CLIENT_KEY] = client_address(environ, self.trusted)
        try:
            principal = self._principal(environ, path)
            environ[PRINCIPAL_KEY] = principal
            self._decide(principal, environ["REQUEST_METHOD"], path, environ)
        except Exception as exc:
            return errors.answer_error(environ, start_response, exc, errors.shape_for(path))
        return self.app(environ, start_response)

    def _principal(self, environ: dict[str, Any], path: str) -> Principal:
        try:
            return self.authenticator.principal(environ.get("HTTP_AUTHORIZATION"))
        except Unauthenticated as exc:
            if path[1:].partition("/")[0] in PUBLIC_MOUNTS:
                return self.authenticator.anonymous
            raise _unauthenticated(str(exc), invalid=True) from None

    def _decide(self, principal: Principal, method: str, path: str, environ: dict[str, Any]) -> None:
        first, _, rest = path[1:].partition("/")
        if method == "OPTIONS" or first in PUBLIC_MOUNTS or first in ("api", "ready"):
            return  # the bulk API checks per file and per request; /ready shows details to admins only
        if first == "metrics":
            if not principal.admin:
                raise refusal(principal, "reading /metrics needs an admin token")
            return
        if first == "webdav":
            first, _, rest = rest.partition("/")
            namespace = self.namespace[1:]
            if namespace and first == namespace:
                first, _, rest = rest.partition("/")
        if not first:  # "/" or "/webdav/": the health check, or a listing of every file
            if method == "PROPFIND" and not principal.may("read", self.namespace or "/"):
                raise refusal(principal, "listing every file needs storage.read on /")
            return
        try:
            file_id = parse_id(first)
        except (InvalidRequest, ValueError):
            return  # not an id: the handler answers its 400 (nothing is read or changed)
        target = f"{self.namespace}/{file_id}"
        if method in READ_VERBS:
            self._need(principal, "read", target)
        elif method == "PUT":
            if not principal.may("modify", target):
                self._need(principal, "create", target)
                if self._exists(file_id):
                    raise refusal(principal, f"{target} exists: replacing it needs storage.modify")
                environ[CREATE_ONLY_KEY] = True
        elif method in ("PATCH", "DELETE"):
            self._need(principal, "modify", target)
        elif method == "POST":
            self._need(principal, "stage", target)

    def _need(self, principal: Principal, action: str, target: str) -> None:
        if not principal.may(action, target):
            raise refusal(principal, f"this needs storage.{action} on {target}")

    def _exists(self, file_id: int) -> bool:
        try:
            self.backend.status(file_id)
        except FileNotInArchive:
            return False
        return True


def _unauthenticated(reason: str, invalid: bool = False) -> NotAuthenticated:
    refusal = NotAuthenticated(f"authentication needed: {reason}")
    challenge = 'Bearer realm="pacifica-like"'
    if invalid:
        challenge += ', error="invalid_token", error_description="' + reason.replace('"', "'")[:200] + '"'
    refusal.headers = {"WWW-Authenticate": challenge}
    return refusal


def refusal(principal: Principal, reason: str) -> ArchiveError:
    """401 for the anonymous principal (a token would help), 403 for a token that does not reach."""
    if principal.kind == "anonymous":
        return _unauthenticated(reason + "; send a token (Authorization: Bearer ...)")
    extra = (
        f" (scopes without a path grant nothing: {', '.join(principal.refused)})" if principal.refused else ""
    )
    return Forbidden(f"{principal.subject}: {reason}{extra}")


def client_address(environ: dict[str, Any], trusted: tuple[Any, ...]) -> str | None:
    """The client's address: the peer's, or from X-Forwarded-For when the peer is a trusted proxy.

    The chain is read from the right, skipping trusted proxies; the first other
    address is the client (what a proxy appended, not what a client claimed).
    """
    peer = environ.get("REMOTE_ADDR")
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if not trusted or not forwarded or not _trusted(peer, trusted):
        return peer
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if not _trusted(hop, trusted):
            return hop
    return peer


def _trusted(address: str | None, trusted: tuple[Any, ...]) -> bool:
    try:
        found = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(found in network for network in trusted)


def principal_of(environ: dict[str, Any]) -> Principal | None:
    """The request's Principal, when a Guard saw it first."""
    return environ.get(PRINCIPAL_KEY)


def is_admin(environ: dict[str, Any]) -> bool:
    """True when the request may see the installation's details (no Guard: as before identity, yes)."""
    principal = principal_of(environ)
    return principal is None or principal.admin
