"""What the browser tests share: the harness on the import path, Debian's Chromium driven by Playwright
(never a downloaded browser; the tests skip, saying why, where either is missing), and new sessions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
import harness  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    if not Path(harness.CHROMIUM).exists():
        pytest.skip(f"{harness.CHROMIUM} is missing (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")
    with sync_api.sync_playwright() as p:
        b = harness.launch_browser(p)
        yield b
        b.close()
