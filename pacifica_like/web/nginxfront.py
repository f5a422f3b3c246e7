"""The top-level nginx.conf of the production front, for the Docker entrypoint and devserver.

Both run nginx unprivileged beside uWSGI: no ``user`` directive (unless run
as root), the pid file and every temp path in a private work directory, the
error log on stderr, and the shipped ``deploy/nginx/pacifica-like.conf``
included in the one ``server {}``, because that file holds the settings that
matter (timeouts, buffering, strict framing, JSON errors). This module only
places them; ``python -m pacifica_like.web.nginxfront`` prints the file for the
entrypoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

#: Longest unix socket path the kernel takes (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def listen_directive(address: str) -> str:
    """Return nginx's ``listen`` argument for a uWSGI-style address.

    ``:8080`` (every IPv4 interface, as uWSGI reads it) becomes ``8080``;
    ``127.0.0.1:8080`` and ``[::]:8080`` stay as they are; an absolute path
    becomes a unix socket. Raises ValueError for anything else.
    """
    if address.startswith("/"):
        return "unix:" + address
    host, colon, port = address.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT, :PORT or a socket path")
    if host.startswith("[") != host.endswith("]") or any(c.isspace() or c in ";{}'\"" for c in host):
        raise ValueError(f"{address!r} has a malformed host")
    return f"{host}:{int(port)}" if host else str(int(port))


def quoted(path: str) -> str:
    """Return ``path`` as an nginx string literal (spaces or ``;`` would end the directive)."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(
    listen: str,
    upstream_socket: str,
    workdir: str,
    site: str,
    upload_dir: str | None = None,
    workers: int = 2,
) -> str:
    """Return an nginx.conf serving ``listen`` in front of ``upstream_socket`` with ``site`` included.

    ``workdir`` holds the pid file and the temp paths nginx never fills here;
    ``upload_dir`` (default ``workdir``) holds request bodies being received
    and responses being drained, so it belongs on a filesystem with room for
    the largest file. Raises ValueError for an address or socket it cannot use.
    """
    if len(os.fsencode(upstream_socket)) > MAX_SOCKET_PATH:
        raise ValueError(f"unix socket path {upstream_socket} is longer than {MAX_SOCKET_PATH} bytes")
    if workers < 1:
        raise ValueError(f"nginx needs at least one worker process, not {workers}")
    uploads = upload_dir or workdir
    # Root's nginx would run its workers as nobody, who cannot enter the private directories.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""# Written at start by pacifica_like.web.nginxfront; edit {site} instead.
{user}daemon off;
worker_processes {workers};
# Each client connection and each upstream connection is a descriptor.
worker_rlimit_nofile 8192;
pid {quoted(os.path.join(workdir, "nginx.pid"))};
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;  # the gateway logs every request itself, with its request id
    client_body_temp_path {quoted(os.path.join(uploads, "body"))};
    uwsgi_temp_path {quoted(os.path.join(uploads, "uwsgi"))};
    proxy_temp_path {quoted(os.path.join(workdir, "proxy"))};
    fastcgi_temp_path {quoted(os.path.join(workdir, "fastcgi"))};
    scgi_temp_path {quoted(os.path.join(workdir, "scgi"))};
    upstream pacifica_like_uwsgi {{ server {quoted("unix:" + upstream_socket)}; }}
    server {{
        listen {quoted(listen_directive(listen))};
        include {quoted(site)};
    }}
}}
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Print the configuration; a bad argument exits 2 with one line naming it."""
    parser = argparse.ArgumentParser(prog="python -m pacifica_like.web.nginxfront", description=__doc__)
    parser.add_argument("--listen", required=True, help="uWSGI-style address: :8080, HOST:PORT, /path")
    parser.add_argument("--upstream", required=True, help="uWSGI's unix socket")
    parser.add_argument("--workdir", required=True, help="private directory: pid file, small temp paths")
    parser.add_argument("--site", required=True, help="deploy/nginx/pacifica-like.conf to include")
    parser.add_argument("--upload-dir", help="request body and response temp files (default: workdir)")
    parser.add_argument("--workers", type=int, default=2, help="nginx worker processes (default 2)")
    args = parser.parse_args(argv)
    try:
        text = render(args.listen, args.upstream, args.workdir, args.site, args.upload_dir, args.workers)
    except ValueError as exc:
        parser.exit(2, f"nginxfront: {exc}\n")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
