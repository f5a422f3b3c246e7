"""The ``pacifica-like`` command line: ``serve``, ``check-config`` and the tape maintenance commands.

Flags beat PAI_* variables, which beat archive.ini, which beats server.conf
for the listening address, which beats the built-in defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pacifica_like import __version__
from pacifica_like.cli import (
    audit as audit_cli,
)
from pacifica_like.cli import bulk as bulk_cli
from pacifica_like.cli import (
    client as client_cli,
)
from pacifica_like.cli import db as db_cli
from pacifica_like.cli import (
    sideband as sideband_cli,
)
from pacifica_like.cli import (
    tape as tape_cli,
)
from pacifica_like.cli import (
    token as token_cli,
)
from pacifica_like.core.config import ConfigError, Settings, add_flags, describe, flag_values, load_settings

#: Modules adding maintenance sub-commands: each has ``COMMANDS``, ``add_commands(commands,
#: add_settings)`` and ``run(args, settings) -> exit status``.
COMMAND_MODULES = (tape_cli, audit_cli, client_cli, sideband_cli, bulk_cli, db_cli, token_cli)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every sub-command."""
    from pacifica_like.storage import registry

    parser = argparse.ArgumentParser(
        prog="pacifica-like", description="REST archive gateway for hierarchical storage."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the HTTP service (the default command)")
    add_serve_arguments(serve, registry.available())
    check = commands.add_parser("check-config", help="load and validate the settings, then print them")
    add_serve_arguments(check, registry.available())
    for module in COMMAND_MODULES:
        module.add_commands(commands, lambda command: add_settings_arguments(command, registry.available()))
    return parser


def add_settings_arguments(parser: argparse.ArgumentParser, backends: Sequence[str]) -> None:
    """Add the flags that choose the archive: config file, backend and prefix."""
    parser.add_argument(
        "-c", "--config", help="archive.ini path (default: $PAI_CONFIG, else built-in defaults)"
    )
    add_flags(parser, "archive", backend=backends)


def add_serve_arguments(parser: argparse.ArgumentParser, backends: Sequence[str]) -> None:
    """Add the flags that select settings (shared by serve and check-config)."""
    add_settings_arguments(parser, backends)
    parser.add_argument(
        "--cpconfig",
        "--cherrypy-config",
        dest="cpconfig",
        help="CherryPy server.conf path (default: $PAI_CPCONFIG)",
    )
    add_flags(parser, "server")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Merge the parsed flags (checked by their declared parsers) with env, files and defaults."""
    return load_settings(
        flags=flag_values(args), config_file=args.config, cpconfig_file=getattr(args, "cpconfig", None)
    )


def serve(settings: Settings) -> int:
    """Run the service under waitress (``pacifica_like.web.httpserver``) until interrupted.

    CherryPy's engine runs the process: signals, the in-process bulk scheduler,
    and the HTTP server through its public ServerAdapter.
    """
    import cherrypy
    from cherrypy.process.servers import ServerAdapter

    from pacifica_like.identity.access import check_exposure
    from pacifica_like.storage import registry
    from pacifica_like.web.app import build_app
    from pacifica_like.web.httpserver import WaitressServer

    check_exposure(settings, [f"{settings.server.address}:{settings.server.port}"])
    backend = registry.create(settings)
    app = build_app(settings, backend, settings.server.file_api)
    listen = {
        "server.socket_host": ("address", settings.server.address),
        "server.socket_port": ("port", settings.server.port),
        "server.thread_pool": ("threads", settings.server.threads),
        "server.socket_timeout": ("idle_timeout", settings.server.idle_timeout),
    }
    cherrypy.config.update(
        {
            "engine.autoreload.on": False,
            "checker.on": False,
            "log.screen": True,
            **{option: value for option, (_, value) in listen.items()},
        }
    )
    # server.conf beats the built-in defaults; archive.ini, env and flags beat server.conf.
    if settings.cpconfig_file:
        cherrypy.config.update(settings.cpconfig_file)
    explicit = {key for (section, key) in settings.sources if section == "server"}
    cherrypy.config.update({option: value for option, (key, value) in listen.items() if key in explicit})
    # CherryPy prints its engine log itself; passing it on to the root logger would print it twice.
    logging.getLogger("cherrypy").propagate = False
    host, port = cherrypy.config["server.socket_host"], cherrypy.config["server.socket_port"]
    # Without identity, anyone reaching the port could change the archive: loopback only.
    check_exposure(settings, [f"{host}:{port}"])
    http: Any
    if settings.server.tls_cert or settings.server.tls_key:
        http = tls_server(settings, app, host, port)
    else:
        http = WaitressServer(
            app,
            host=host,
            port=port,
            threads=cherrypy.config["server.thread_pool"],
            connection_limit=settings.server.connection_limit,
            idle_timeout=int(cherrypy.config["server.socket_timeout"]),
        )
    # cheroot, CherryPy's default server, is replaced, not run beside ours.
    cherrypy.server.unsubscribe()
    ServerAdapter(cherrypy.engine, http, (host, port)).subscribe()
    # [bulk] scheduler = in-process: recalls for bulk requests run in this process, with the engine.
    from pacifica_like.bulk.scheduler import run_in_engine

    run_in_engine(settings, backend)
    # Close the backend when the engine stops, after the HTTP server and the scheduler (higher
    # priority runs later): engine.block() then joins every non-daemon thread, and the tape
    # backend's recall executor ends only in close(), so closing after block() never returned.
    cherrypy.engine.subscribe("stop", backend.close, priority=90)
    print(
        f"pacifica-like {__version__}: {settings.archive.backend} archive at {settings.archive.prefix}, "
        f"serving {'https' if settings.server.tls_cert else 'http'}://{host}:{port}/",
        flush=True,
    )
    cherrypy.engine.signals.subscribe()
    cherrypy.engine.start()
    cherrypy.engine.block()
    return 0


def tls_server(settings: Settings, app: Any, host: str, port: int) -> Any:
    """Return an HTTPS server for ``app``: cheroot (CherryPy's own server) with its builtin TLS adapter.

    waitress has no TLS, and a TLS handshake inside its single event loop would
    let one slow client stall every connection; cheroot handshakes on its
    worker threads. For small sites: production terminates TLS at nginx.
    """
    from cheroot import wsgi
    from cheroot.ssl.builtin import BuiltinSSLAdapter

    cert, key = settings.server.tls_cert, settings.server.tls_key
    if not (cert and key):
        raise ConfigError("[server] tls_cert and tls_key go together (PAI_TLS_CERT, PAI_TLS_KEY)")
    for path in (cert, key):
        if not os.path.isfile(path):
            raise ConfigError(f"TLS file {path}: no such file")
    server = wsgi.Server(
        (host, port), app, numthreads=settings.server.threads, timeout=settings.server.idle_timeout
    )
    try:
        server.ssl_adapter = BuiltinSSLAdapter(cert, key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot use the TLS certificate {cert} and key {key}: {exc}") from None
    return server


def check_config(settings: Settings) -> int:
    """Validate the settings and the backend name; print the effective values."""
    from pacifica_like.storage import registry

    registry.check(settings)
    for section, key, value, source in describe(settings):
        print(f"[{section}] {key} = {value}    ({source})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = settings_from_args(args)
        if args.command == "check-config":
            return check_config(settings)
        for module in COMMAND_MODULES:
            if args.command in module.COMMANDS:
                return module.run(args, settings)
        return serve(settings)
    except ConfigError as exc:
        print(f"pacifica-like: configuration error: {exc}", file=sys.stderr)
        return 2
