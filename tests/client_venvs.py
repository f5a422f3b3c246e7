"""Virtualenvs of clients nobody here wrote (pacifica-cartd, pacifica-ingest), built once and cached.

They live under ``~/.cache/pacifica-like-tests`` (``XDG_CACHE_HOME`` honoured), keyed by name,
so test runs after the first start at once; a stamp of this interpreter's version and the
requirements marks one complete, and a change to either rebuilds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest


def cache_home(name: str) -> Path:
    """Return where the virtualenv ``name`` is cached between test runs."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pacifica-like-tests" / name


def ensure_venv(home: Path, requirements: Sequence[str]) -> Path:
    """Return the Python of a venv at ``home`` holding ``requirements``; build it when missing or stale.

    Built by this interpreter's ``venv`` (the project's Python) under a lock, so
    two test sessions never build it at once; a stamp written last marks it complete.
    """
    python = home / "bin" / "python"
    stamp = home / ".pacifica-like-stamp"
    wanted = json.dumps({"python": sys.version, "requirements": list(requirements)})
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / f"{home.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and stamp.exists() and stamp.read_text() == wanted:
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(home)], check=True, timeout=300)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *requirements],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if install.returncode != 0:
            pytest.fail(f"pip could not install {list(requirements)} into {home}:\n{install.stderr[-3000:]}")
        stamp.write_text(wanted)
    return python
