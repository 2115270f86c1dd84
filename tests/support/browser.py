"""Headless Chromium (Debian's, driven by Playwright from PyPI) for page tests against a live server."""

import os
import shutil

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def chromium_or_skip() -> str:
    """The browser path; a missing browser skips the test, except in CI where it must be there."""
    if shutil.which(CHROMIUM) is None:
        if os.environ.get("KITEMESH_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{CHROMIUM} is missing (.ci/run installs it with apt-get)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    return CHROMIUM
