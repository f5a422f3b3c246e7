"""``pacifica-like client ACTION``: the Python client from the command line.

Actions: ``put``, ``get``, ``stat``, ``stage``, ``move``, ``delete``,
``archiveinfo``, ``stage-many`` (bulk recall, followed to the end) and the bulk
request's ``poll``, ``cancel`` and ``release``. The server is ``--url``, by
default the address and port the settings give ``pacifica-like serve``.
Transfers and ``stage-many`` draw a progress bar on stderr when it is a
terminal. Exit status: 0 success, 1 when the server refused or any file
failed (the server's message is printed), 2 for bad arguments, 3 when the
server could not be reached.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from pacifica_like.cli.args import add_output_flags, progress_disabled
from pacifica_like.core.config import Settings
from pacifica_like.core.errors import ArchiveError

#: The top-level commands this module runs.
COMMANDS = ("client",)
EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def add_commands(commands: argparse._SubParsersAction, settings_arguments: Callable) -> None:
    """Add ``client`` and its actions to the CLI's parser."""
    client = commands.add_parser(
        "client", help="talk to a running archive over HTTP (put, get, stat, stage, stage-many...)"
    )
    # The client reads no archive of its own; settings only give the default --url.
    client.set_defaults(config=None, backend=None, prefix=None)
    actions = client.add_subparsers(dest="client_command", metavar="ACTION", required=True)

    def action(name: str, text: str, json_help: str = "print the result as JSON") -> argparse.ArgumentParser:
        command = actions.add_parser(name, help=text, description=text)
        command.add_argument("--url", help="the archive's base URL (default: the configured address, port)")
        command.add_argument(
            "--timeout", type=float, default=120.0, help="seconds to wait for the server (default 120)"
        )
        command.add_argument("--client-id", help="X-Client-Id for the bulk API's per-client limits")
        command.add_argument(
            "--token",
            help="bearer token (default: $BEARER_TOKEN, $BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid>)",
        )
        command.add_argument("--token-file", help="a file holding the bearer token")
        command.add_argument("-c", "--config", help="archive.ini whose [server] gives the default --url")
        add_output_flags(command, json_help)
        return command

    put = action("put", "upload a file (streamed, sha-256 checked by the server)")
    put.add_argument("id", help="file id")
    put.add_argument("file", help="local file to upload")
    put.add_argument("--mtime", type=float, help="Last-Modified as epoch seconds (default: the file's mtime)")
    put.add_argument("--no-digest", action="store_true", help="do not send the file's sha-256 (saves a read)")

    get = action("get", "download a file (to a temp file, renamed into place when complete and verified)")
    get.add_argument("id", help="file id")
    get.add_argument("dest", nargs="?", help="where to write it (default: ./ID; - for stdout)")
    get.add_argument("--stage", action="store_true", help="recall it first if it is offline on tape")
    get.add_argument("--no-verify", action="store_true", help="skip the check against Repr-Digest")

    stat = action("stat", "show files' status (HEAD)")
    stat.add_argument("ids", nargs="+", metavar="ID")

    stage = action("stage", "recall files to disk one by one (POST /<id>)")
    stage.add_argument("ids", nargs="+", metavar="ID")
    stage.add_argument("--no-wait", action="store_true", help="return while recalls still run")

    move = action("move", "move a server-side file into the archive (PATCH)")
    move.add_argument("id", help="file id")
    move.add_argument("path", help="the file's path on the server (inside its patch_roots)")

    delete = action("delete", "delete a file (where the server allows it)")
    delete.add_argument("id", help="file id")

    info = action("archiveinfo", "where files are: DISK, TAPE, DISK_AND_TAPE, LOST, NONE, UNAVAILABLE")
    info.add_argument("ids", nargs="+", metavar="ID")

    many = action("stage-many", "recall many files through the bulk API, in tape order, and follow them")
    many.add_argument("ids", nargs="*", metavar="ID")
    many.add_argument("--from", dest="from_file", help="read ids from this file, one per line (- for stdin)")
    many.add_argument("--lifetime", help="keep the files pinned on disk this long (ISO 8601, e.g. PT1H)")
    many.add_argument("--poll", type=float, help="seconds between polls (never below the server's minimum)")
    many.add_argument("--timeout-total", type=float, help="give up following after this many seconds")

    poll = action("poll", "show a bulk request's summary and files")
    poll.add_argument("request_id")
    poll.add_argument("--state", help="only files in this state")
    poll.add_argument("--limit", type=int, help="at most this many files")
    for name, text in (("cancel", "cancel files of a bulk request"), ("release", "drop a request's pins")):
        command = action(name, text)
        command.add_argument("request_id")
        command.add_argument("ids", nargs="+", metavar="ID")


def default_url(settings: Settings) -> str:
    """Return the URL of the server these settings describe (a wildcard address means this host)."""
    host = settings.server.address
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.server.port}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one client action; return the exit status."""
    from pacifica_like.client import ArchiveClient, TransportError

    url = args.url or default_url(settings)
    name = args.client_command
    # urllib3 logs each retried connection; the one error printed below says it all.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        token = args.token
        if token is None and args.token_file:
            with open(args.token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        with ArchiveClient(url, timeout=args.timeout, client_id=args.client_id, token=token) as client:
            return ACTIONS[name](client, args)
    except TransportError as exc:
        print(f"pacifica-like client {name}: cannot talk to {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ArchiveError as exc:
        status = getattr(exc, "status", None)
        where = f"{status} {type(exc).__name__}" if status else type(exc).__name__
        print(f"pacifica-like client {name}: {where}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError) as exc:
        print(f"pacifica-like client {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED


@contextmanager
def _bar(args: argparse.Namespace, total: int | None, what: str, unit: str = "B") -> Iterator[Any]:
    from tqdm import tqdm

    scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    with tqdm(total=total, unit=unit, desc=what, disable=progress_disabled(args.progress), **scaled) as bar:
        yield bar


def _print(args: argparse.Namespace, document: Any, text: str) -> None:
    print(json.dumps(document, indent=2) if args.json else text)


def _put(client: Any, args: argparse.Namespace) -> int:
    import os

    with _bar(args, os.path.getsize(args.file), f"put {args.id}") as bar:
        digest = False if args.no_digest else None
        done = client.put(args.id, args.file, mtime=args.mtime, sha256=digest, progress=bar.update)
    _print(args, asdict(done), f"stored file {done.file_id}: {done.total_bytes} bytes, sha-256 {done.sha256}")
    return 0


def _get(client: Any, args: argparse.Namespace) -> int:
    dest = args.dest or args.id
    to_stdout = dest == "-"
    size = None if args.stage else client.stat(args.id).size
    with _bar(args, size, f"get {args.id}") as bar:
        done = client.get(
            args.id,
            sys.stdout.buffer if to_stdout else dest,
            verify=not args.no_verify,
            stage=args.stage,
            progress=bar.update,
        )
    if not to_stdout:
        check = "verified" if done.verified else "not verified (no Repr-Digest)"
        _print(args, asdict(done), f"wrote {dest}: {done.size} bytes, sha-256 {done.sha256} {check}")
    return 0


def _stat(client: Any, args: argparse.Namespace) -> int:
    infos = [client.stat(file_id) for file_id in args.ids]
    lines = [
        f"{i.file_id}: {i.size} bytes, {i.media}{', ' + i.state if i.state else ''}, "
        f"on disk {i.bytes_on_disk}, on tape {i.bytes_on_tape}, sha-256 {i.sha256 or '-'}"
        for i in infos
    ]
    _print(args, [asdict(i) for i in infos], "\n".join(lines))
    return 0


def _stage(client: Any, args: argparse.Namespace) -> int:
    states = {file_id: client.stage(file_id, wait=not args.no_wait) for file_id in args.ids}
    text = "\n".join(f"{i}: {'on disk' if on_disk else 'recall running'}" for i, on_disk in states.items())
    _print(args, {i: ("on disk" if d else "recall running") for i, d in states.items()}, text)
    return 0 if args.no_wait or all(states.values()) else EXIT_FAILED


def _move(client: Any, args: argparse.Namespace) -> int:
    client.move(args.id, args.path)
    _print(args, {"file": args.id, "moved": args.path}, f"moved {args.path} to file {args.id}")
    return 0


def _delete(client: Any, args: argparse.Namespace) -> int:
    client.delete(args.id)
    _print(args, {"file": args.id, "deleted": True}, f"deleted file {args.id}")
    return 0


def _archiveinfo(client: Any, args: argparse.Namespace) -> int:
    found = client.archiveinfo(args.ids)
    text = "\n".join(f"{e.path}: {e.locality or 'error: ' + str(e.error)}" for e in found)
    _print(args, [asdict(e) for e in found], text)
    return 0


def _read_ids(args: argparse.Namespace) -> list[str]:
    ids = list(args.ids)
    if args.from_file:
        with sys.stdin if args.from_file == "-" else open(args.from_file, encoding="utf-8") as handle:
            ids += [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise ValueError("name file ids, or --from FILE")
    return ids


def _stage_many(client: Any, args: argparse.Namespace) -> int:
    ids = _read_ids(args)
    with _bar(args, len(dict.fromkeys(ids)), "stage", unit="file") as bar:

        def progress(state: Any) -> None:
            bar.update(state.done - bar.n)
            failed = state.states.get("FAILED", 0)
            bar.set_postfix_str(
                f"{state.states.get('STARTED', 0)} started, {failed} failed"
                + (f", eta {state.eta_seconds:.0f} s" if state.eta_seconds is not None else "")
            )

        results = client.stage_many(
            ids, progress, disk_lifetime=args.lifetime, poll_interval=args.poll, timeout=args.timeout_total
        )
    counts: dict[str, int] = {}
    for staged in results.values():
        counts[staged.state] = counts.get(staged.state, 0) + 1
    bad = {str(i): s for i, s in results.items() if s.state != "COMPLETED"}
    if args.json:
        files = {str(i): asdict(s) for i, s in results.items()}
        print(json.dumps({"states": counts, "files": files}, indent=2))
    else:
        for file_id, staged in bad.items():
            print(f"{staged.state.lower()} file {file_id}: {staged.error or '-'}", file=sys.stderr)
        print("stage-many: " + ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())))
    return EXIT_FAILED if bad else 0


def _poll(client: Any, args: argparse.Namespace) -> int:
    if args.limit is not None:
        page = client.poll(args.request_id, limit=args.limit, state=args.state)
        files, summary = page.files, page.summary
    else:
        summary = client.poll(args.request_id, limit=1).summary
        files = list(client.files(args.request_id, state=args.state))
    lines = [f"{f.path}: {f.state}" + (f" ({f.error})" if f.error else "") for f in files]
    counts = ", ".join(f"{n} {s.lower()}" for s, n in summary.states.items() if n)
    lines.append(f"request {args.request_id}: {summary.files} files: {counts}")
    _print(args, {"summary": asdict(summary), "files": [asdict(f) for f in files]}, "\n".join(lines))
    return 0


def _cancel(client: Any, args: argparse.Namespace) -> int:
    client.cancel(args.request_id, args.ids)
    _print(args, {"cancelled": args.ids}, f"cancelled {len(args.ids)} files of request {args.request_id}")
    return 0


def _release(client: Any, args: argparse.Namespace) -> int:
    client.release(args.request_id, args.ids)
    _print(args, {"released": args.ids}, f"released {len(args.ids)} files of request {args.request_id}")
    return 0


ACTIONS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "put": _put,
    "get": _get,
    "stat": _stat,
    "stage": _stage,
    "move": _move,
    "delete": _delete,
    "archiveinfo": _archiveinfo,
    "stage-many": _stage_many,
    "poll": _poll,
    "cancel": _cancel,
    "release": _release,
}
