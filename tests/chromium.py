"""Headless Chromium for the browser tests (the reviewer console, an identity provider's sign-in page).

One place knows how to find Debian's Chromium and launch it through Playwright, so the console tests and
the OIDC sign-in tests share it instead of one test module importing another inside a fixture (pytest
rewrites a test module's asserts when it is imported, and doing that lazily, while other threads
compile, once tripped CPython 3.11.7's AST recursion-depth check).
"""

from __future__ import annotations

import os
import shutil
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    """The Chromium executable: ``TETHER_TEST_CHROMIUM`` if set, else the first on PATH; None when absent."""
    for cand in (os.environ.get("TETHER_TEST_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if cand and (shutil.which(cand) or (os.path.isabs(cand) and os.access(cand, os.X_OK))):
            return shutil.which(cand) or cand
    return None


@asynccontextmanager
async def launched_chromium(what: str) -> AsyncIterator[Any]:
    """A launched headless browser, or the test skipped with the reason (``what`` names the tests)."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip(f"Playwright for Python is not installed (pip install playwright); {what} skipped")
    exe = chromium_path()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium, or set TETHER_TEST_CHROMIUM); "
                    f"{what} skipped")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()
