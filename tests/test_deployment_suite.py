"""Run the post-deployment suite against our own service in its production shape (nginx + uWSGI).

Why: ``post_deployment_tests/`` is what operators point at a live deployment.
Running it here, on every ``pytest``, keeps it passing against the code it
describes, and lets us check from outside what it cannot see itself: that it
leaves no archive file behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from token_issuer import AUDIENCE, Issuer

from pacifica_like.gateway.catalog import GatewayCatalog
from pacifica_like.web import devserver

REPO = Path(__file__).resolve().parents[1]
SUITE_TIMEOUT = 600
LARGE_FILE_SIZE = 64 << 20
MANY_FILES_TEST_COUNT = 200


def _text(output: str | bytes | None) -> str:
    """Return captured output as text (TimeoutExpired may hold bytes or None)."""
    if isinstance(output, bytes):
        return output.decode("utf-8", errors="replace")
    return output or ""


def non_directories(root: Path) -> list[str]:
    """Return every entry under ``root`` that is not a real directory, hidden ones included."""
    found = []
    for directory, subdirs, files in os.walk(root):
        # os.walk lists symlinks to directories among subdirs (and never enters them).
        links = [name for name in subdirs if os.path.islink(os.path.join(directory, name))]
        found += [os.path.relpath(os.path.join(directory, name), root) for name in files + links]
    return sorted(found)


@pytest.mark.live
@pytest.mark.timeout(SUITE_TIMEOUT + 120)
@pytest.mark.parametrize("identity", [False, True], ids=["open", "token"])
def test_post_deployment_suite_passes_against_production(tmp_path: Path, identity: bool) -> None:
    """The whole suite passes against nginx and 4 uWSGI workers and leaves only directories behind.

    ``token``: the gateway checks WLCG tokens (a local issuer) and the suite sends BEARER_TOKEN.
    """
    data = tmp_path / "data"
    patch_root = tmp_path / "patch-root"
    data.mkdir()
    patch_root.mkdir()
    env = {"PAI_PREFIX": str(data), "PAI_ALLOW_DELETE": "true", "PAI_PATCH_ROOTS": str(patch_root)}
    token: dict[str, str] = {}
    issuer = Issuer() if identity else None
    if issuer is not None:
        env |= {"PAI_ISSUERS": issuer.url, "PAI_AUDIENCES": AUDIENCE, "PAI_ADMIN_GROUPS": "/admins"}
        scopes = "storage.read:/ storage.modify:/ storage.stage:/"
        token["BEARER_TOKEN"] = issuer.mint(scopes, lifetime=SUITE_TIMEOUT + 600, groups=["/admins"])
    command = [sys.executable, "-m", "pytest", "post_deployment_tests", "-q", "-p", "no:cacheprovider"]
    with devserver.production_server(env, processes=4) as server:
        suite_env = {
            **os.environ,
            "ARCHIVE_URL": server.url,
            "LARGE_FILE_SIZE": str(LARGE_FILE_SIZE),
            "MANY_FILES_TEST_COUNT": str(MANY_FILES_TEST_COUNT),
            # Same host, so the suite can also check a successful PATCH.
            "ARCHIVE_PATCH_DIR": str(patch_root),
            **token,
        }
        try:
            result = subprocess.run(
                command, cwd=REPO, env=suite_env, capture_output=True, text=True, timeout=SUITE_TIMEOUT
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(
                f"post-deployment suite still running after {SUITE_TIMEOUT} s:\n"
                f"{_text(exc.stdout)}{_text(exc.stderr)}\nserver log:\n{server.log()[-5000:]}"
            )
        server_log = server.log()
    if issuer is not None:
        issuer.stop()
        audit = [line for line in server_log.splitlines() if '"log": "audit"' in line]
        assert audit and all('"subject": "alice"' in line for line in audit)
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, (
        f"post-deployment suite failed (exit {result.returncode}):\n{output}\n"
        f"server log (last 5000 characters):\n{server_log[-5000:]}"
    )
    # The gateway catalog (SQLite under the prefix by default) is the one file that stays.
    leftovers = [name for name in non_directories(data) if not name.startswith(".catalog.sqlite")]
    assert not leftovers, f"the suite left {len(leftovers)} files in the archive: {leftovers[:20]}"
    # Every file the suite wrote through 4 workers was deleted again, so the inventory is empty.
    assert (data / ".catalog.sqlite").is_file(), "the workers recorded nothing in the catalog"
    catalog = GatewayCatalog("sqlite:///" + str(data / ".catalog.sqlite"))
    try:
        assert catalog.count() == 0
        assert catalog.operations() == []
    finally:
        catalog.close()
    assert not non_directories(patch_root), "the PATCH test left files in the patch root"
