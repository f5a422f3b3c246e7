"""Pytest wiring for the post-deployment suite: markers and a header naming the target.

Kept apart from ``deployment_test.py`` so the test module reads as the contract
it checks. Only pytest and the standard library are used here.
"""

from __future__ import annotations

import os

import pytest

MARKERS = {
    "smoke": "the deployment answers at all (run first when in a hurry)",
    "contract": "wire contract: statuses, headers and JSON bodies of each verb",
    "integrity": "bytes stored are the bytes sent: digests, overwrites, chunked bodies",
    "large": "streams LARGE_FILE_SIZE bytes up and down (slow on big sizes)",
    "concurrency": "many clients at once: MANY_FILES_TEST_COUNT files, racing overwrites",
}


def pytest_configure(config: pytest.Config) -> None:
    """Register the suite's markers so ``-m`` selections work without warnings."""
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    if not config.pluginmanager.hasplugin("timeout"):
        # The large test asks pytest-timeout for more time; without the plugin the mark is inert.
        config.addinivalue_line("markers", "timeout(seconds): per-test limit read by pytest-timeout")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which deployment is under test, so a saved log names its target."""
    return [
        f"ARCHIVE_URL={os.environ.get('ARCHIVE_URL', 'http://127.0.0.1:8080')}",
        f"LARGE_FILE_SIZE={os.environ.get('LARGE_FILE_SIZE', '1073741824')}",
        f"MANY_FILES_TEST_COUNT={os.environ.get('MANY_FILES_TEST_COUNT', '1000')}",
        f"ARCHIVE_PATCH_DIR={os.environ.get('ARCHIVE_PATCH_DIR', '(unset: PATCH success test skipped)')}",
    ]
