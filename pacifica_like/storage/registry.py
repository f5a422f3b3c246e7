"""Create a backend by name from one registry.

Adding a backend is one line in REGISTRY: the CLI's choices, config
validation and the contract test suite all derive from it. Modules are
imported lazily so a deployment loads only the backend it uses (and its
dependencies: a posix gateway never imports a database driver).
"""

from __future__ import annotations

import importlib

from pacifica_like.core.config import ConfigError, Settings
from pacifica_like.storage.contract import Backend, KeepsSideband, TapeManaged

#: name -> "module:Class". Aliases keep Pacifica configurations working.
REGISTRY: dict[str, str] = {
    "posix": "pacifica_like.storage.posix:PosixBackend",
    "tape": "pacifica_like.storage.tape.backend:TapeBackend",
    "sideband": "pacifica_like.storage.sideband.backend:SidebandBackend",
    "memory": "pacifica_like.storage.memory:MemoryBackend",
}
ALIASES: dict[str, str] = {"hpss": "tape", "hsm_sideband": "sideband"}


def available() -> list[str]:
    """Return every name a backend can be created by (canonical names and aliases)."""
    return sorted([*REGISTRY, *ALIASES])


def resolve(name: str) -> type[Backend]:
    """Import and return the backend class registered under ``name``."""
    canonical = ALIASES.get(name.lower(), name.lower())
    target = REGISTRY.get(canonical)
    if target is None:
        raise KeyError(name)
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def backend_class(settings: Settings) -> type[Backend]:
    """Return the class ``settings.archive.backend`` names; ConfigError if the name is unknown.

    A registered class may pick a variant from the settings with a
    ``for_settings(settings)`` classmethod (sideband: emulated or external HSM).
    """
    name = settings.archive.backend
    try:
        chosen = resolve(name)
    except KeyError:
        where = settings.source_of("archive", "backend")
        raise ConfigError(
            f"{where}: unknown backend {name!r} (available: {', '.join(available())})"
        ) from None
    variant = getattr(chosen, "for_settings", None)
    return variant(settings) if variant is not None else chosen


def check(settings: Settings) -> type[Backend]:
    """Return the class ``settings.archive.backend`` names, after its preflight check.

    Raises ConfigError if the name is unknown or the backend's environment
    (a library, a directory) is not usable.
    """
    chosen = backend_class(settings)
    chosen.preflight(settings)
    return chosen


def create(settings: Settings) -> Backend:
    """Build the backend ``settings.archive.backend`` names; ConfigError if unknown.

    A tape-managed backend that keeps no sideband database itself gets the one
    ``[sideband] database`` names kept true by a subscriber on its events.
    """
    backend = check(settings)(settings)
    if (
        settings.sideband.database is not None
        and isinstance(backend, TapeManaged)
        and isinstance(backend, KeepsSideband)
        and backend.sideband_updater() is None
    ):
        from pacifica_like.storage.sideband.updater import keep_sideband

        try:
            keep_sideband(backend, settings, settings.sideband_url())
        except BaseException:
            backend.close()
            raise
    return backend
