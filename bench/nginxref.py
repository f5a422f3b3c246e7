"""nginx as a second reference: WebDAV PUT and static GET/HEAD of the same small files, in C.

It shows how far our GET and HEAD are from what a C server does with the same
files (sendfile, no Python). Its PUT writes through a temp file and a rename
but never fsyncs, so it is no ceiling for a durable PUT: the fsync probe
(``bench/probe.py``) is that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pacifica_like.web.devserver import RunningServer, free_port, run_server

NGINX = "nginx"


def nginx_binary() -> str | None:
    """Return the nginx executable, or None where it is not installed."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def config(port: int, data: Path, workdir: Path) -> str:
    """An nginx.conf serving ``data`` at / with WebDAV PUT, on 127.0.0.1:``port``."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
worker_processes auto;
pid {workdir / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir / "body"};
    proxy_temp_path {workdir / "proxy"};
    fastcgi_temp_path {workdir / "fastcgi"};
    uwsgi_temp_path {workdir / "uwsgi"};
    scgi_temp_path {workdir / "scgi"};
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {data};
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
        }}
    }}
}}
"""


@contextlib.contextmanager
def serve(workdir: Path) -> Iterator[RunningServer]:
    """Run nginx over a fresh data directory in ``workdir`` until the block ends."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    home = workdir / "nginx"
    data = home / "data"
    data.mkdir(parents=True)
    (data / "index.html").write_text("nginx reference\n", encoding="utf-8")  # GET / answers 200
    port = free_port()
    conf = home / "nginx.conf"
    conf.write_text(config(port, data, home), encoding="utf-8")
    with run_server(
        [binary, "-c", str(conf), "-p", str(home)], port, None, str(home / "nginx.log"), 60
    ) as server:
        yield server
