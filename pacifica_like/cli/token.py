"""``pacifica-like token create|list|revoke``: the service tokens of ``[identity] token_file``.

A service token is for an account that cannot get WLCG tokens from an issuer
(Pacifica ingest, cartd, a metrics scraper). ``create`` prints the secret once;
only its hash is kept. Every change is written to the audit log.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Callable

from pacifica_like.core.config import ConfigError, Settings
from pacifica_like.identity.service import ServiceToken, ServiceTokens, TokenFileError
from pacifica_like.web import logs

#: The top-level commands this module runs.
COMMANDS = ("token",)


def add_commands(commands: argparse._SubParsersAction, settings_arguments: Callable) -> None:
    """Add ``token create|list|revoke`` to the CLI's parser."""
    token = commands.add_parser("token", help="manage service tokens ([identity] token_file)")
    settings_arguments(token)
    actions = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a token and print its secret (shown once)")
    create.add_argument("name", help="the service account's name (unique): ingest, cartd, scraper")
    create.add_argument(
        "--scope",
        action="append",
        default=[],
        help="a WLCG storage scope it holds, repeatable: storage.read:/ storage.create:/ storage.stage:/",
    )
    create.add_argument("--admin", action="store_true", help="may read /metrics, the queues and any request")
    create.add_argument("--json", action="store_true", help="print the token as JSON")
    actions.add_parser("list", help="list the tokens (never their secrets)").add_argument(
        "--json", action="store_true", help="print JSON"
    )
    revoke = actions.add_parser("revoke", help="remove a token: it stops working within a second")
    revoke.add_argument("which", help="the token's id or name")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one token action; 2 with a message when the tokens file is not configured or unusable."""
    path = settings.identity.token_file
    if not path:
        raise ConfigError("service tokens live in [identity] token_file (PAI_TOKEN_FILE), which is not set")
    tokens = ServiceTokens(path)
    try:
        if args.token_command == "create":
            token, secret = tokens.create(args.name, args.scope, args.admin)
            _audit("token-create", token.id, token.name)
            if args.json:
                print(
                    json.dumps(
                        {"id": token.id, "name": token.name, "scopes": list(token.scopes), "token": secret}
                    )
                )
            else:
                print(secret)
                print(f"# token {token.id} for {token.name}: shown once, keep it safe", flush=True)
            return 0
        if args.token_command == "list":
            found = tokens.tokens()
            if args.json:
                print(json.dumps([_public(t) for t in found]))
            else:
                for t in found:
                    scopes = " ".join(t.scopes) + (" admin" if t.admin else "")
                    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t.created))
                    print(f"{t.id}  {t.name}  {created}  {scopes}")
            return 0
        revoked = tokens.revoke(args.which)
        _audit("token-revoke", revoked.id, revoked.name)
        print(f"revoked {revoked.id} ({revoked.name})")
        return 0
    except TokenFileError as exc:
        print(f"pacifica-like token: {exc}", file=sys.stderr)
        return 2


def _public(token: ServiceToken) -> dict[str, object]:
    """A token's listing: everything but its hash."""
    return {"id": token.id, "name": token.name, "scopes": list(token.scopes), "admin": token.admin,
            "created": token.created}  # fmt: skip


def _audit(action: str, token_id: str, name: str) -> None:
    logs.install("json")
    logs.emit_audit(
        action=action, subject=f"local:{getpass.getuser()}", token=token_id, name=name, outcome="done"
    )
