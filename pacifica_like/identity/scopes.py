"""WLCG storage scopes and the Principal a request acts as.

A scope is ``storage.<action>:<path>`` (WLCG JWT profile 1.0): actions ``read``,
``create``, ``modify``, ``stage`` (and the profile's ``poll``). A file's path is
``/<id>``, below ``[server] namespace`` when one is set (``/archive/12345``).
Paths match per segment: ``/`` covers every file, ``/archive`` covers
``/archive/12345`` but not ``/archives/1``. Ids have no hierarchy, so a range
is written as one segment ``<first>-<last>`` (``storage.read:/1000-1999``,
both ends included). ``modify`` includes ``create`` (the profile: modify may
add, change and delete data). A scope without a path is refused: it would
grant everything by accident.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ACTIONS = ("read", "create", "modify", "stage", "poll")
#: What holding an action grants beyond itself.
IMPLIED = {"modify": ("create",), "stage": ("poll",)}


class ScopeError(ValueError):
    """A scope string that names no action or no path."""


@dataclass(frozen=True)
class Scope:
    """One granted action on a path: ``storage.read:/`` is Scope("read", ("",)) (every file)."""

    action: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Parse ``storage.<action>:<path>``; ScopeError for anything else (a scope without a path too)."""
        name, sep, path = text.partition(":")
        prefix, _, action = name.partition(".")
        if prefix != "storage" or action not in ACTIONS:
            raise ScopeError(f"{text!r} is not a storage scope")
        if not sep or not path.startswith("/"):
            raise ScopeError(f"{text!r} has no path (storage.{action}:/ grants every file)")
        return cls(action, _segments(path))

    def covers(self, action: str, path: str) -> bool:
        """True when this scope grants ``action`` on ``path`` (per segment; a last ``A-B`` is a range)."""
        if action != self.action and action not in IMPLIED.get(self.action, ()):
            return False
        wanted = _segments(path)
        mine = self.segments
        if mine == ("",):
            return True
        if len(wanted) < len(mine):
            return False
        for index, (granted, asked) in enumerate(zip(mine, wanted, strict=False)):
            if granted == asked:
                continue
            if index == len(mine) - 1 and index == len(wanted) - 1 and _in_range(granted, asked):
                continue
            return False
        return True

    def __str__(self) -> str:
        return f"storage.{self.action}:/" + "/".join(s for s in self.segments if s)


def _segments(path: str) -> tuple[str, ...]:
    parts = tuple(part for part in path.split("/") if part)
    return parts or ("",)


def _in_range(granted: str, asked: str) -> bool:
    first, sep, last = granted.partition("-")
    if not sep or not (first.isdigit() and last.isdigit() and asked.isdigit()):
        return False
    return int(first) <= int(asked) <= int(last)


def parse_scopes(text: str | Iterable[str]) -> tuple[tuple[Scope, ...], tuple[str, ...]]:
    """Return the storage scopes in a ``scope`` claim (space separated) and the ones refused.

    Other scopes (``openid``, ``offline_access``) are ignored; a storage scope
    that cannot be used (no path) is returned in the second list, so the
    refusal can say why.
    """
    words = text.split() if isinstance(text, str) else list(text)
    granted, refused = [], []
    for word in words:
        if not word.startswith("storage."):
            continue
        try:
            granted.append(Scope.parse(word))
        except ScopeError:
            refused.append(word)
    return tuple(granted), tuple(refused)


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: ``(issuer, subject)``, what it may do, and until when.

    ``kind``: ``token`` (a JWT), ``service`` (a service token) or ``anonymous``.
    ``admin``: may read /metrics, /api/v1/queues and any bulk request.
    """

    issuer: str
    subject: str
    scopes: tuple[Scope, ...]
    kind: str
    admin: bool = False
    groups: tuple[str, ...] = ()
    expires: float | None = None
    #: Storage scopes the token carried that grant nothing (no path), for the 403's message.
    refused: tuple[str, ...] = ()

    @property
    def owner(self) -> str:
        """The key bulk requests and per-subject limits are kept under."""
        return f"{self.subject} ({self.issuer})" if self.kind != "anonymous" else self.subject

    def may(self, action: str, path: str) -> bool:
        """True when one of the scopes grants ``action`` on ``path``."""
        return any(scope.covers(action, path) for scope in self.scopes)
