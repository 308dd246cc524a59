"""Time Sparsity prompts in the real app and read the snapshot's own seconds from its caption.

    python benchmarks/app_probe_sparsity.py MODE [PROMPTS]

MODE ``plain`` runs the app as it is; ``noanim`` first injects a style rule that turns off every CSS
transition and animation in the page; ``nice`` lowers the browser's priority (nice 19).  Each prompt
(256 tokens, the page's default 8 decode steps) is timed from Ctrl+Enter until the app root's
``data-test-script-state`` returns to ``notRunning``.  Used for the CSS-transition A/B in
benchmarks/results/app_speed.md (run from a checkout of the code before the change).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))  # the browser harness the tests use
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
import app_speed as measure_speed  # noqa: E402
from harness import goto_page, wait_idle  # noqa: E402

STATE = "() => document.querySelector('[data-testid=\"stApp\"]').getAttribute('data-test-script-state')"


def main() -> None:
    from playwright.sync_api import sync_playwright

    mode = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    tmp = Path(tempfile.mkdtemp(prefix="probe-"))
    env = {"TOPTHETA_APP_MODEL": "smollm2", "TOPTHETA_RUNS_DIR": str(tmp / "runs"),
           "TOPTHETA_RESULTS_DIR": str(tmp / "results"), "PYTHONPATH": str(harness.ROOT)}
    with harness.streamlit_server(env, tmp / "server.log") as (url, _), sync_playwright() as p:
        browser = harness.launch_browser(p)
        page = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()
        page.set_default_timeout(300_000)
        page.goto(url)
        page.get_by_text("30 layers").first.wait_for()
        goto_page(page, "Sparsity")
        page.get_by_text("kept attention (prefill)").wait_for()
        page.wait_for_timeout(6000)
        if mode == "nice":
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if "chrom" in Path(f"/proc/{pid}/cmdline").read_text():
                        os.setpriority(os.PRIO_PROCESS, int(pid), 19)
                except OSError:
                    pass
        if mode == "noanim":
            page.add_style_tag(content="*, *::before, *::after { animation: none !important; "
                                       "transition: none !important; }")
        caption = page.locator("[data-testid='stCaptionContainer']").filter(has_text="empty rows").first
        for i in range(n):
            box = page.get_by_label("Prompt", exact=True)
            box.fill(f"Probe {i}. " + measure_speed.harness_prompt())
            t0 = time.perf_counter()
            box.press("Control+Enter")
            page.wait_for_function(f"() => ({STATE})() === 'running'", polling=20)
            page.wait_for_function(f"() => ({STATE})() === 'notRunning'", polling=50)
            print(f"{mode}: prompt {time.perf_counter() - t0:.2f} s | caption: {caption.inner_text()[-50:]}",
                  flush=True)
        browser.close()


if __name__ == "__main__":
    main()
