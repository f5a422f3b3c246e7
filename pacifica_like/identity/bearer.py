"""Check a WLCG JWT bearer token into a Principal (PyJWT verifies; this decides what to ask of it).

Accepted: RS256 and ES256 only (``alg: none`` and HMAC are never tried, so a
token signed with a public key as an HMAC secret fails too), an ``iss`` among
``[identity] issuers``, an ``aud`` among ``audiences`` or the profile's
``https://wlcg.cern.ch/jwt/v1/any``, and ``exp``, ``nbf``, ``iat`` within
``leeway`` seconds. The subject is ``sub``; scopes come from ``scope``; groups
from ``wlcg.groups``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jwt

from pacifica_like.core.settings_schema import IdentitySettings
from pacifica_like.identity.keys import IssuerKeys, KeyUnavailable, load_jwks_file
from pacifica_like.identity.scopes import Principal, parse_scopes

ALGORITHMS = ("RS256", "ES256")
#: The WLCG profile's audience meaning "any relying party".
ANY_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"


class InvalidToken(Exception):
    """The token cannot be trusted; the message says why (it becomes the 401's description)."""


class BearerTokens:
    """Checks JWTs from the configured issuers."""

    def __init__(self, settings: IdentitySettings) -> None:
        self.settings = settings
        local = load_jwks_file(settings.jwks_file) if settings.jwks_file else None
        self.issuers = {
            issuer: IssuerKeys(issuer, settings.jwks_refresh_seconds, local) for issuer in settings.issuers
        }
        self.audiences: Sequence[str] = (*settings.audiences, ANY_AUDIENCE)
        self.admin_groups = frozenset(settings.admin_groups)

    def check(self, token: str) -> Principal:
        """Return who the token speaks for; InvalidToken with the reason otherwise."""
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"not a JWT: {exc}") from None
        if header.get("alg") not in ALGORITHMS:
            raise InvalidToken(f"signature algorithm {header.get('alg')!r} is not accepted (RS256, ES256)")
        issuer = claims.get("iss")
        keys = self.issuers.get(issuer) if isinstance(issuer, str) else None
        if keys is None:
            raise InvalidToken(f"issuer {issuer!r} is not trusted here")
        try:
            key = keys.key(header.get("kid"))
        except KeyUnavailable as exc:
            raise InvalidToken(str(exc)) from None
        try:
            verified = jwt.decode(
                token,
                key.key,
                algorithms=list(ALGORITHMS),
                audience=list(self.audiences),
                issuer=issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc) or type(exc).__name__) from None
        scopes, refused = parse_scopes(str(verified.get("scope", "")))
        groups = verified.get("wlcg.groups", [])
        groups = tuple(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else ()
        return Principal(
            issuer=issuer,
            subject=str(verified["sub"]),
            scopes=scopes,
            kind="token",
            admin=bool(self.admin_groups.intersection(groups)),
            groups=groups,
            expires=float(verified["exp"]),
            refused=refused,
        )
