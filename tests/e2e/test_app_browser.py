"""End to end in a real browser: Debian's Chromium driven by Playwright against `streamlit run app.py`.

A tiny random Llama keeps it fast.  Screenshots of every page go to ``test-output/``.
Skips (with the reason) when ``/usr/bin/chromium`` or Playwright is missing; ``.ci/run``
installs both, so CI runs it.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
import harness  # noqa: E402
from harness import goto_page, screenshot, set_number, wait_idle  # noqa: E402

if not Path(harness.CHROMIUM).exists():
    pytest.skip(f"{harness.CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")

VIEWPORT = {"width": 1400, "height": 2000}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from topθ_core.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("e2e")
    env = {"TOPTHETA_APP_MODEL": str(write_tiny_checkpoint(root / "tiny-llama")),
           "TOPTHETA_RUNS_DIR": str(root / "runs"), "TOPTHETA_RESULTS_DIR": str(root / "results")}
    with harness.streamlit_server(env, harness.OUTPUT / "e2e-server.log") as (url, _):
        yield {"url": url, "runs": root / "runs", "root": root}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = harness.launch_browser(p)
        yield b
        b.close()


def open_app(browser, url):
    ctx = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_text("3 layers").first.wait_for()  # the sidebar status line: model loaded
    wait_idle(page)
    return ctx, page


def run_calibration(page, k: int, name: str, docs: int = 2) -> None:
    nd = page.get_by_label("Layers 0–1 near-dense (k=512, as in the paper)")
    if nd.is_checked():
        nd.uncheck(force=True)
        wait_idle(page)
    set_number(page, "k (kept per row)", k)
    set_number(page, "Documents", docs)
    set_number(page, "Max tokens per document", 96)
    box = page.get_by_label("Run name")
    box.fill(name)
    box.press("Enter")
    wait_idle(page)
    page.get_by_role("button", name="Run calibration").click()


def test_full_tour(app, browser):
    ctx, page = open_app(browser, app["url"])
    try:
        screenshot(page, "01-calibrate-start")
        # 1. a small calibration on bundled data
        run_calibration(page, 16, "e2e-k16")
        page.get_by_text("Saved e2e-k16").wait_for(timeout=120_000)
        wait_idle(page)
        assert (app["runs"] / "e2e-k16" / "meta.json").is_file()
        assert "e2e-k16" in page.locator('[data-testid="stSidebar"]').inner_text()
        screenshot(page, "02-calibrate-done")

        # 2. download the thresholds
        with page.expect_download() as dl:
            page.get_by_role("button", name="Download thresholds (.zip)").first.click()
        target = harness.OUTPUT / "e2e-k16.zip"
        dl.value.save_as(str(target))
        assert sorted(zipfile.ZipFile(target).namelist()) == ["e2e-k16/meta.json", "e2e-k16/thresholds.parquet"]

        # 3. cancel a long calibration: a message, and nothing is written
        page.get_by_label("Corpus", exact=True).click()
        page.get_by_role("option", name="lambada", exact=True).click()
        wait_idle(page)
        run_calibration(page, 16, "to-cancel", docs=400)
        page.get_by_text("ETA").first.wait_for()
        page.get_by_role("button", name="Cancel").click()
        page.get_by_text("Calibration cancelled; nothing was saved.").wait_for()
        assert not (app["runs"] / "to-cancel").exists()
        assert not [p for p in app["runs"].iterdir() if p.name.startswith(".")]  # no temporary folder left
        screenshot(page, "03a-calibrate-cancelled")

        # 4. upload a broken file: a message, never a traceback
        page.get_by_text("Upload a file").click()
        wait_idle(page)
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
            files=[{"name": "broken.jsonl", "mimeType": "application/octet-stream",
                    "buffer": b'{"text": "fine"}\n{this is not json\n'}])
        page.get_by_text("Cannot use this file").wait_for()
        assert "line 2 is not valid JSON" in page.get_by_text("Cannot use this file").inner_text()
        assert page.locator('[data-testid="stException"]').count() == 0
        screenshot(page, "03-calibrate-upload-error")

        # 5. thresholds: open a head by clicking a grid cell
        goto_page(page, "Thresholds")
        grid = page.locator(".js-plotly-plot").filter(has_text="θ at L").first
        grid.wait_for()
        points = grid.locator(".scatterlayer .trace").first.locator(".points path")
        assert points.count() == 12  # 3 layers × 4 heads
        wait_idle(page)
        opened = page.locator(".js-plotly-plot").filter(has_text="θ vs row length · layer 1").first
        for attempt in range(4):  # plotly binds its click handler a moment after drawing
            box = points.nth(5).bounding_box()  # layer 1, head 1
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.wait_for_timeout(300)
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            try:
                opened.wait_for(timeout=10_000)
                break
            except sync_api.TimeoutError:
                if attempt == 3:
                    raise
        wait_idle(page)
        curve = page.locator(".js-plotly-plot").filter(has_text="θ vs row length · layer 1").first
        assert "head 1" in curve.inner_text()
        screenshot(page, "04-thresholds")

        # 6. sparsity page renders the maps and heatmaps
        goto_page(page, "Sparsity")
        page.get_by_text("kept attention (prefill)").wait_for()
        page.get_by_text("layer 2 · head 0", exact=True).first.wait_for()
        page.get_by_text("dense softmax probabilities").first.wait_for()
        page.wait_for_function(  # the two map images and the colour legend are loaded and drawn
            "() => { const im = [...document.querySelectorAll('[data-testid=\"stImage\"] img')];"
            " return im.length >= 3 && im.every(i => i.complete && i.naturalWidth > 0); }")
        assert page.locator(".js-plotly-plot").count() >= 4  # kept-fraction and V-row heatmaps, popularity, decode
        screenshot(page, "05-sparsity")

        # 7. a comparison streams both generations
        goto_page(page, "Compare")
        set_number(page, "New tokens", 6)
        page.get_by_role("button", name="Generate").click()
        page.locator('.tt-stream [data-step="5"]').first.wait_for()
        page.get_by_text("per-step agreement and cost").first.wait_for()
        wait_idle(page)
        assert page.locator(".tt-stream").count() == 2
        assert page.locator('.tt-stream [data-step="5"]').count() == 2
        screenshot(page, "06-compare")

        # 8. accuracy: a 3-item run, then the trade-off tab
        goto_page(page, "Accuracy")
        set_number(page, "Items / documents", 3)
        page.get_by_role("button", name="Run evaluation").click()
        page.get_by_text("Saved to").wait_for(timeout=120_000)
        wait_idle(page)
        screenshot(page, "07-accuracy")
        page.get_by_role("tab", name="Trade-off across saved results").click()
        page.locator(".js-plotly-plot").filter(has_text="trade-off").first.wait_for()
        screenshot(page, "08-accuracy-tradeoff")

        # 9. kernels
        goto_page(page, "Kernels")
        screenshot(page, "09-kernels")
        assert page.locator('[data-testid="stException"]').count() == 0
    finally:
        ctx.close()


def test_two_sessions_calibrate_at_once(app, browser):
    """Two browser contexts calibrate different k at the same time on one shared model."""
    (ca, a), (cb, b) = open_app(browser, app["url"]), open_app(browser, app["url"])
    try:
        run_calibration(a, 8, "sess-a-k8", docs=3)
        run_calibration(b, 24, "sess-b-k24", docs=3)
        a.get_by_text("Saved sess-a-k8").wait_for(timeout=180_000)
        b.get_by_text("Saved sess-b-k24").wait_for(timeout=180_000)
        wait_idle(a)
        wait_idle(b)
        screenshot(a, "10-session-a")
        screenshot(b, "11-session-b")
        meta_a = json.loads((app["runs"] / "sess-a-k8" / "meta.json").read_text())
        meta_b = json.loads((app["runs"] / "sess-b-k24" / "meta.json").read_text())
        assert meta_a["k"]["default"] == 8 and meta_b["k"]["default"] == 24
        # each session's active set is its own run
        assert "sess-a-k8" in a.locator('[data-testid="stSidebar"]').inner_text()
        assert "sess-b-k24" in b.locator('[data-testid="stSidebar"]').inner_text()
        # and the thresholds differ as k says they should (smaller k → higher θ)
        import pandas as pd

        ta = pd.read_parquet(app["runs"] / "sess-a-k8" / "thresholds.parquet")
        tb = pd.read_parquet(app["runs"] / "sess-b-k24" / "thresholds.parquet")
        assert ta["theta"].mean() > tb["theta"].mean()
    finally:
        ca.close()
        cb.close()
