"""The reference server: pacifica-archiveinterface 0.4.2 in its own virtualenv.

It runs under our uWSGI binary (``--home`` points the embedded Python at the
peer's venv), so both servers share one uWSGI build and identical flags and
the comparison measures the applications, not the servers around them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PEER_PACKAGE = "pacifica-archiveinterface"
PEER_VERSION = "0.4.2"
PEER_MODULE = "pacifica.archiveinterface.wsgi"
DEFAULT_HOME = Path(__file__).resolve().parent / ".peer-venv"

CHERRYPY_CONFIG = """\
[global]
log.screen: False
engine.autoreload.on: False

[/]
request.dispatch: cherrypy.dispatch.MethodDispatcher()
"""
ARCHIVE_CONFIG = "[posix]\nuse_id2filename = true\n"

_PROBE = (
    "import sys, importlib.metadata as m; "
    f"print('{{}}.{{}}'.format(*sys.version_info[:2]), m.version({PEER_PACKAGE!r}))"
)


def installed_version(home: Path) -> str | None:
    """Return the peer version installed in ``home``, or None if it is unusable.

    The venv's Python must be the minor version uWSGI embeds, or ``--home``
    would load the wrong site-packages.
    """
    python = home / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        return None
    python_version, version = probe.stdout.split()
    if python_version != "{}.{}".format(*sys.version_info[:2]):
        return None
    return version


def setup_peer(home: Path = DEFAULT_HOME) -> str:
    """Create ``home`` with the pinned peer installed; return its version.

    Uses this interpreter's ``venv`` so the peer runs on the Python our uWSGI links.
    """
    print(f"bench: creating {home} with {PEER_PACKAGE}=={PEER_VERSION}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(home)], check=True, timeout=300)
    subprocess.run(
        [str(home / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{PEER_PACKAGE}=={PEER_VERSION}"],
        check=True,
        timeout=900,
    )
    version = installed_version(home)
    if version != PEER_VERSION:
        raise RuntimeError(f"{home}: expected {PEER_PACKAGE} {PEER_VERSION}, found {version}")
    return version


def ensure_peer(home: Path = DEFAULT_HOME) -> str:
    """Return the installed peer version, creating the venv first when missing or stale."""
    version = installed_version(home)
    if version == PEER_VERSION:
        return version
    return setup_peer(home)


def peer_environment(workdir: Path, data_dir: Path) -> dict[str, str]:
    """Write the peer's two config files into ``workdir``; return the env it needs."""
    cherrypy_config = workdir / "peer-cpconfig.ini"
    cherrypy_config.write_text(CHERRYPY_CONFIG, encoding="utf-8")
    archive_config = workdir / "peer-config.ini"
    archive_config.write_text(ARCHIVE_CONFIG, encoding="utf-8")
    return {
        "ARCHIVEINTERFACE_CPCONFIG": os.fspath(cherrypy_config),
        "ARCHIVEINTERFACE_CONFIG": os.fspath(archive_config),
        "PAI_PREFIX": os.fspath(data_dir),
        "PAI_BACKEND_TYPE": "posix",
    }
