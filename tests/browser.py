"""Headless Chromium for browser tests: Debian's chromium driven by playwright.

playwright's own browser download cannot work here (no internet), so the tests
launch the system browser by path. The flags keep Chromium from reaching out to
the network at start (background services, component updates, sync).
"""
import contextlib
import os
import shutil
import tempfile

import pytest

CHROMIUM = os.environ.get("PIPERT_TEST_CHROMIUM", "/usr/bin/chromium")
_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def chromium_page():
    """A fresh page in a fresh headless Chromium profile; browser and profile are gone afterwards."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="pipert-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=_FLAGS)
            try:
                yield context.pages[0] if context.pages else context.new_page()
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
