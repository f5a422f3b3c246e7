"""Start the two servers under test with the same uWSGI command line.

Both use ``pacifica_like.web.devserver.uwsgi_command`` (our deployment flags); the
peer only adds ``--home`` and swaps ``--module``. Each gets its own data
directory on the benchmark's filesystem.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import peer
from pacifica_like.web.devserver import RunningServer, free_port, run_server, uwsgi_command

OURS = "ours"
PEER = "peer"


@dataclass
class Target:
    """One server to benchmark: how to start it and where it keeps files."""

    name: str
    label: str
    data_dir: Path
    env: dict[str, str]
    extra_flags: list[str] = field(default_factory=list)
    module: str | None = None

    def command(self, port: int, processes: int) -> list[str]:
        """Return the uWSGI command line for ``port``."""
        command = uwsgi_command(port, processes, extra=self.extra_flags)
        if self.module is not None:
            command[command.index("--module") + 1] = self.module
        return command


def make_targets(workdir: Path, peer_home: Path, peer_version: str) -> list[Target]:
    """Return [ours, peer], each with a fresh data directory under ``workdir``."""
    ours_dir = workdir / "data-ours"
    peer_dir = workdir / "data-peer"
    ours_dir.mkdir()
    peer_dir.mkdir()
    ours = Target(
        OURS,
        "pacifica_like",
        ours_dir,
        {"PAI_PREFIX": os.fspath(ours_dir), "PAI_BACKEND_TYPE": "posix"},
    )
    reference = Target(
        PEER,
        f"{peer.PEER_PACKAGE} {peer_version}",
        peer_dir,
        peer.peer_environment(workdir, peer_dir),
        extra_flags=["--home", os.fspath(peer_home)],
        module=peer.PEER_MODULE,
    )
    return [ours, reference]


@contextlib.contextmanager
def serve(target: Target, processes: int, workdir: Path) -> Iterator[RunningServer]:
    """Run ``target`` on a free loopback port until the block ends (devserver stops it)."""
    port = free_port()
    log_path = workdir / f"{target.name}-uwsgi.log"
    with run_server(target.command(port, processes), port, target.env, os.fspath(log_path), 60) as server:
        yield server


def port_of(server: RunningServer) -> int:
    """Return the TCP port ``server`` listens on."""
    return int(server.url.rsplit(":", 1)[1])
