"""Run a transaction again when it lost a race for a lock: jittered, growing pauses, bounded.

Only :class:`~pacifica_like.db.errors.Contention` is retried (the transaction
was rolled back, so running it again is safe); anything else leaves at once.
Pauses are random within [p/2, p], so processes that collided do not collide
again in step, and double up to ``max_pause``. The bound is a time
(``seconds``) and, optionally, a number of attempts; past it the caller gets
StorageUnavailable saying how long it tried, the last contention as the cause.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pacifica_like.core.errors import StorageUnavailable
from pacifica_like.db.errors import Contention, ErrorTranslator

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry: ``seconds`` in all, pauses ``first_pause`` to ``max_pause``."""

    seconds: float = 30.0
    first_pause: float = 0.0005
    max_pause: float = 0.05
    #: At most this many attempts in all (None: as many as ``seconds`` allows).
    attempts: int | None = None


def retry(
    call: Callable[[], T], policy: RetryPolicy, give_up: Callable[[Contention], Exception] | None = None
) -> T:
    """Return ``call()``, run again after a pause each time it raises Contention, within ``policy``.

    Past the bound, raises ``give_up(last)`` (default: the last Contention itself).
    """
    deadline = time.monotonic() + policy.seconds
    pause = policy.first_pause
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Contention as exc:
            out_of_attempts = policy.attempts is not None and attempt >= policy.attempts
            if out_of_attempts or time.monotonic() >= deadline:
                if give_up is None:
                    raise
                raise give_up(exc) from exc.__cause__
        time.sleep(random.uniform(pause / 2, pause))
        pause = min(2 * pause, policy.max_pause)


def still_locked(label: str, what: str, policy: RetryPolicy) -> Callable[[Contention], Exception]:
    """Return a ``give_up`` for :func:`retry` that says how long ``what`` waited."""

    def give_up(last: Contention) -> Exception:
        return StorageUnavailable(f"{label}: {what}: still locked after {policy.seconds:g} s")

    return give_up


class Translated(Protocol):
    """An object whose database calls run in ``errors`` (its :class:`ErrorTranslator`)."""

    errors: ErrorTranslator


def transaction(
    what: str, policy: RetryPolicy, prepare: Callable[[Any], None] | None = None
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a method that is one transaction: errors translated, contention retried within ``policy``.

    ``prepare(self)`` runs first in the same translated attempt (making sure the schema is there).
    """

    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def wrapper(self: Translated, *args: Any, **kwargs: Any) -> T:
            def attempt() -> T:
                with self.errors(what):
                    if prepare is not None:
                        prepare(self)
                    return method(self, *args, **kwargs)

            return retry(attempt, policy, still_locked(self.errors.label, what, policy))

        return wrapper

    return decorate
