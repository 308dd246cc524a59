"""Start the Streamlit app on a free 127.0.0.1 port and drive it with Playwright in Debian's Chromium.

Shared by the browser test (``tests/e2e/test_app_browser.py``) and the speed measurement
(``benchmarks/app_speed.py``).  Never downloads a browser: Chromium comes from
``apt-get install chromium`` and is launched through ``executable_path``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("TOPTHETA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
OUTPUT = ROOT / "test-output"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> float:
    """Seconds until ``/_stcore/health`` answers ok; raises if the server dies or times out."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")


@contextlib.contextmanager
def streamlit_server(env_extra: dict[str, str], log_path: Path):
    """``streamlit run app.py`` in the repo root; yields (url, seconds to healthy)."""
    port = free_port()
    env = dict(os.environ, **env_extra)
    env.setdefault("PYTHONPATH", str(ROOT))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address",
           "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, wait_health(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


# ---------------------------------------------------------------------------- page helpers
POLL_MS = 50  # in-page waits poll every 50 ms, not on every animation frame (Playwright's default)
IDLE_STATES = ("notRunning", "compilationError")  # the app root's data-test-script-state once a run ended


def wait_idle(page, timeout: float = 60_000, delay_ms: float = 150) -> None:
    """Wait until the app has finished its current script run.

    Reads the app root's ``data-test-script-state`` (``running`` / ``notRunning``), which Streamlit
    keeps on every page; the status widget is not drawn with ``toolbarMode = "minimal"``, so it
    cannot tell.  ``delay_ms`` first gives a just-triggered run time to start; pass 0 when the
    caller has already waited for an element the run produces (the speed measurements do)."""
    if delay_ms:
        page.wait_for_timeout(delay_ms)
    page.wait_for_function(
        "(states) => { const app = document.querySelector('[data-testid=\"stApp\"]');"
        " return app && states.includes(app.getAttribute('data-test-script-state')); }",
        arg=list(IDLE_STATES), timeout=timeout, polling=POLL_MS)


HEADINGS = {"Overview": "Top-θ Explorer"}  # a page whose heading is not its title in the navigation


def goto_page(page, title: str, timeout: float = 60_000) -> None:
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text=title).first.click()
    page.locator('h1').filter(has_text=HEADINGS.get(title, title)).first.wait_for(timeout=timeout)
    wait_idle(page, timeout)


def enter(box, value) -> None:
    """Type ``value`` into the input ``box`` (a locator), commit it with Enter, wait for the rerun."""
    box.fill(str(value))
    box.press("Enter")
    wait_idle(box.page)


def set_number(page, label: str, value) -> None:
    enter(page.get_by_label(label, exact=True), value)


def choose(page, opener, option: str, attempts: int = 4) -> None:
    """Open a select box or multiselect (``opener``: the locator to click) and click ``option``.

    A rerun that lands while the list is open (a job finishing redraws the app) closes it; then
    open it again, up to ``attempts`` times."""
    for attempt in range(attempts):
        wait_idle(page)
        opener.click()
        item = page.get_by_role("option", name=option, exact=True)
        try:
            item.wait_for(timeout=10_000)
            item.click()
            return
        except Exception:
            if attempt == attempts - 1:
                raise
            page.keyboard.press("Escape")


SKELETONS = "[data-testid='stSkeleton'], [data-testid='stSkeletonElement'], [data-testid='stAppSkeleton']"


def wait_drawn(page, timeout: float = 30_000) -> None:
    """Wait until no loading placeholder is left: after a run ends, widgets whose code the browser is
    still fetching (on a session's first page) show as grey skeletons for a moment."""
    page.wait_for_function("(sel) => !document.querySelector(sel)", arg=SKELETONS, timeout=timeout, polling=POLL_MS)


def screenshot(page, name: str) -> Path:
    wait_drawn(page)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


VIEWPORT = {"width": 1400, "height": 2000}


def open_session(browser, url: str, ready: str = "3 layers"):
    """A new browser context (a new app session) on ``url``, once the sidebar shows ``ready`` and the run ended."""
    ctx = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_text(ready).first.wait_for()  # the sidebar status line: model loaded
    wait_idle(page)
    return ctx, page
