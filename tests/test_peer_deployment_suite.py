"""Pacifica's own post-deployment suite, as it ships in pacifica-archiveinterface 0.4.2's sdist.

Every client written against the peer behaves like it: no ``Last-Modified``
on PUT, Pacifica's HEAD headers. It runs unchanged against ``serve`` and the
production shape (nginx in front of uWSGI). Two of its tests expect the
peer's 500 on a second PUT of an id (its posix backend cannot reopen a file
for writing); we replace the file atomically and answer 201, so those two
fail, and only those.

The sdist comes from the package index once and is kept in a cache
directory; without the index the module is skipped, saying so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from pacifica_like.web import devserver

PEER = "pacifica-archiveinterface"
VERSION = "0.4.2"
SUITE = f"pacifica-archiveinterface-{VERSION}/post_deployment_tests/deployment_test.py"
CACHE = Path(os.environ.get("PL_TEST_CACHE", Path.home() / ".cache" / "pacifica-like-tests"))
#: The peer's tests that expect its 500 on a second PUT, where we answer 201.
EXPECTED_FAILURES = {"test_file_rewrite", "test_binary_file_rewrite"}


@pytest.fixture(scope="module")
def peer_suite() -> Path:
    """The peer's deployment_test.py, fetched from the package index into the cache once."""
    target = CACHE / f"peer-{VERSION}" / "deployment_test.py"
    if target.exists():
        return target
    download = CACHE / f"peer-{VERSION}" / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"{PEER}=={VERSION}", "-d", str(download)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    archives = sorted(download.glob("*.tar.gz"))
    if fetched.returncode != 0 or not archives:
        pytest.skip(f"cannot fetch {PEER}=={VERSION}'s sdist from the package index: {fetched.stderr[-300:]}")
    with tarfile.open(archives[0]) as sdist:
        member = sdist.extractfile(SUITE)
        assert member is not None, f"{archives[0]} has no {SUITE}"
        partial = target.with_suffix(".part")
        partial.write_bytes(member.read())
        partial.replace(target)
    return target


@pytest.fixture(params=["serve", "production"])
def live(request: pytest.FixtureRequest, tmp_path: Path):
    """A live gateway with DELETE allowed (the suite deletes a file), as the peer's docs deploy it."""
    env = {"PAI_PREFIX": str(tmp_path / "archive"), "PAI_ALLOW_DELETE": "true"}
    if request.param == "serve":
        with devserver.cli_server(["--prefix", str(tmp_path / "archive")], env=env) as running:
            yield running
    else:
        with devserver.production_server(env, processes=4) as running:
            yield running


def test_the_peers_own_suite_passes_but_for_its_two_rewrite_tests(peer_suite: Path, live, tmp_path: Path):
    """Its many-files test hangs (threads die on their first failure) when PUT needs Last-Modified."""
    report = tmp_path / "report.xml"
    env = {
        **os.environ,
        "ARCHIVE_URL": live.url,
        # Its defaults are a 1 GiB file and 1,000 files; the benchmark measures those sizes.
        "LARGE_FILE_SIZE": str(8 << 20),
        "MANY_FILES_TEST_COUNT": "200",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         str(peer_suite)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    cases = list(ElementTree.parse(report).getroot().iter("testcase"))
    problems = {case.get("name"): case.findall("failure") + case.findall("error") for case in cases}
    assert len(problems) == 16, done.stdout[-2000:]
    failed = {name for name, found in problems.items() if found}
    assert failed == EXPECTED_FAILURES, done.stdout[-4000:]
    # They fail on the status the peer gets wrong, not on anything else. The report's own failure
    # messages, not the terminal text, whose summary lines depend on the terminal's width.
    messages = [problem.get("message", "") for name in failed for problem in problems[name]]
    assert len(messages) == 2 and all("201 != 500" in message for message in messages), messages
