"""End to end in a real browser: Debian's Chromium driven by Playwright against `streamlit run app.py`.

A tiny random Llama keeps it fast.  Screenshots of every page go to ``test-output/``.
Skips (with the reason) when ``/usr/bin/chromium`` or Playwright is missing; ``.ci/run``
installs both, so CI runs it.
"""

from __future__ import annotations

import json
import zipfile

import pytest

import harness  # noqa: E402  (tests/e2e/conftest.py puts it on the path)
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402
from harness import goto_page, screenshot, set_number, wait_idle  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from topθ_core.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("e2e")
    env = {"TOPTHETA_APP_MODEL": str(write_tiny_checkpoint(root / "tiny-llama")),
           "TOPTHETA_RUNS_DIR": str(root / "runs"), "TOPTHETA_RESULTS_DIR": str(root / "results")}
    with harness.streamlit_server(env, harness.OUTPUT / "e2e-server.log") as (url, _):
        yield {"url": url, "runs": root / "runs", "root": root}


def run_calibration(page, k: int, name: str, docs: int = 2, max_tokens: int = 96) -> None:
    goto_page(page, "Calibrate")
    nd = page.get_by_label("Layers 0–1 near-dense (k=512, as in the paper)")
    if nd.is_checked():
        nd.uncheck(force=True)
        wait_idle(page)
    set_number(page, "k (kept per row)", k)
    set_number(page, "Documents", docs)
    set_number(page, "Max tokens per document", max_tokens)
    harness.enter(page.get_by_label("Run name"), name)
    page.get_by_role("button", name="Run calibration").click()


def sidebar(page):
    return page.locator('[data-testid="stSidebar"]')


def plot_with(page, text: str):
    return page.locator(".js-plotly-plot").filter(has_text=text).first


def result_files(app) -> list:
    d = app["root"] / "results"
    return sorted(p.name for p in d.glob("*.parquet")) if d.is_dir() else []


def test_full_tour(app, browser):
    ctx, page = harness.open_session(browser, app["url"])
    try:
        screenshot(page, "00-overview")
        # 1. a small calibration on bundled data
        run_calibration(page, 16, "e2e-k16")
        page.get_by_text("Saved e2e-k16").wait_for(timeout=120_000)
        wait_idle(page)
        assert (app["runs"] / "e2e-k16" / "meta.json").is_file()
        sidebar(page).get_by_text("thresholds e2e-k16").wait_for()
        screenshot(page, "02-calibrate-done")

        # 2. download the thresholds
        with page.expect_download() as dl:
            page.get_by_role("button", name="Download thresholds (.zip)").first.click()
        target = harness.OUTPUT / "e2e-k16.zip"
        dl.value.save_as(str(target))
        assert sorted(zipfile.ZipFile(target).namelist()) == ["e2e-k16/meta.json", "e2e-k16/thresholds.parquet"]

        # 3. a long calibration outlives two page switches, then finishes and becomes the active set
        harness.choose(page, page.get_by_label("Corpus", exact=True), "lambada")
        wait_idle(page)
        run_calibration(page, 16, "e2e-long", docs=150, max_tokens=96)
        sidebar(page).get_by_text("calibrate e2e-long").wait_for()  # the jobs panel
        goto_page(page, "Thresholds")
        goto_page(page, "Sparsity")
        assert "calibrate e2e-long" in sidebar(page).inner_text()
        goto_page(page, "Calibrate")
        progress = page.get_by_text("calibrate e2e-long:").first
        progress.wait_for()
        assert "%" in progress.inner_text()  # still running, with its progress
        screenshot(page, "03-calibrate-still-running")
        # the page's settings are intact although the jobs panel reran alone every second meanwhile
        assert page.get_by_label("k (kept per row)", exact=True).input_value() == "16"
        assert page.get_by_label("Documents", exact=True).input_value() == "150"
        page.get_by_text("Saved e2e-long").wait_for(timeout=300_000)
        sidebar(page).get_by_text("thresholds e2e-long").wait_for(timeout=30_000)
        assert (app["runs"] / "e2e-long" / "meta.json").is_file()

        # 4. cancel a long calibration: a message, and nothing is written
        run_calibration(page, 16, "to-cancel", docs=150, max_tokens=96)
        page.get_by_text("calibrate to-cancel:").first.wait_for()
        page.get_by_role("button", name="Cancel").first.click()
        page.get_by_text("Calibration cancelled; nothing was saved.").wait_for(timeout=60_000)
        assert not (app["runs"] / "to-cancel").exists()
        assert not [p for p in app["runs"].iterdir() if p.name.startswith(".")]  # no temporary folder left
        screenshot(page, "04-calibrate-cancelled")

        # 5. upload a broken file: a message, never a traceback
        page.get_by_text("Upload a file").click()
        wait_idle(page)
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
            files=[{"name": "broken.jsonl", "mimeType": "application/octet-stream",
                    "buffer": b'{"text": "fine"}\n{this is not json\n'}])
        page.get_by_text("Cannot use this file").wait_for()
        assert "line 2 is not valid JSON" in page.get_by_text("Cannot use this file").inner_text()
        assert page.locator('[data-testid="stException"]').count() == 0
        screenshot(page, "05-calibrate-upload-error")

        # 6. thresholds: open a head by clicking a grid cell
        goto_page(page, "Thresholds")
        grid = plot_with(page, "θ at L")
        grid.wait_for()
        points = grid.locator(".scatterlayer .trace").first.locator(".points path")
        assert points.count() == 12  # 3 layers × 4 heads
        wait_idle(page)
        opened = plot_with(page, "θ vs row length · layer 1")
        for attempt in range(4):  # plotly binds its click handler a moment after drawing
            box = points.nth(5).bounding_box()  # layer 1, head 1
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.wait_for_timeout(300)
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            try:
                opened.wait_for(timeout=10_000)
                break
            except PlaywrightTimeout:
                if attempt == 3:
                    raise
        wait_idle(page)
        assert "head 1" in plot_with(page, "θ vs row length · layer 1").inner_text()
        assert "th_layer=1" in page.url  # a fragment's change is in the link too
        screenshot(page, "06-thresholds")

        # 7. sparsity page renders the maps and heatmaps
        goto_page(page, "Sparsity")
        page.get_by_text("kept attention (prefill)").wait_for()
        page.get_by_text("layer 2 · head 0", exact=True).first.wait_for()
        page.get_by_text("dense softmax probabilities").first.wait_for()
        page.wait_for_function(  # the two map images and the colour legend are loaded and drawn
            "() => { const im = [...document.querySelectorAll('[data-testid=\"stImage\"] img')];"
            " return im.length >= 3 && im.every(i => i.complete && i.naturalWidth > 0); }")
        assert page.locator(".js-plotly-plot").count() >= 4  # kept-fraction and V-row heatmaps, popularity, decode
        screenshot(page, "07-sparsity")

        # 8. a comparison streams both generations
        goto_page(page, "Compare")
        set_number(page, "New tokens", 6)
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("per-step agreement and cost").first.wait_for(timeout=60_000)
        wait_idle(page)
        assert page.locator(".tt-stream").count() == 2
        assert page.locator('.tt-stream [data-step="5"]').count() == 2
        screenshot(page, "08-compare")

        # 9. accuracy: a 4-item run; an SDC toggle marks it stale, then updates by itself (live)
        goto_page(page, "Accuracy")
        set_number(page, "Items", 4)
        page.get_by_role("button", name="Run", exact=True).click()
        plot_with(page, "Δ acc_norm").wait_for(timeout=120_000)
        page.get_by_text("all items scored").wait_for(timeout=120_000)
        wait_idle(page)
        screenshot(page, "09-accuracy")
        harness.choose(page, page.get_by_label("SDC", exact=True), "offline")
        page.get_by_text("these results are for other settings").wait_for(timeout=30_000)
        screenshot(page, "10-accuracy-stale")
        plot_with(page, "sdc=offline").wait_for(timeout=120_000)  # the new run's numbers, labelled by its config
        page.get_by_text("these results are for other settings").wait_for(state="detached", timeout=60_000)
        screenshot(page, "11-accuracy-updated")

        # 10. a variant matrix of 2 variants (VMC on and off) fills both rows
        page.get_by_text("Variant matrix: several variants side by side").click()
        vmc_box = page.locator('[data-testid="stMultiSelect"]').filter(has_text="VMC").locator("input")
        harness.choose(page, vmc_box, "on")
        harness.choose(page, vmc_box, "off")
        page.keyboard.press("Escape")
        plot_with(page, "vmc=off").wait_for(timeout=120_000)
        page.get_by_text("all items scored").wait_for(timeout=120_000)
        assert "vmc=on" in plot_with(page, "vmc=off").inner_text()
        screenshot(page, "12-accuracy-matrix")

        # 11. Cancel on Accuracy leaves no result file
        saved = result_files(app)
        set_number(page, "Items", 500)
        run = page.get_by_role("button", name="Run", exact=True)
        if run.is_enabled():
            run.click()
        cancel = page.locator('[data-testid="stMain"]').get_by_role("button", name="Cancel")
        page.wait_for_function("() => [...document.querySelectorAll('[data-testid=\"stMain\"] button')]"
                               ".some(b => b.innerText.trim() === 'Cancel' && !b.disabled)")  # the run started
        cancel.click()
        page.get_by_text("Cancelled: no result was saved.").wait_for(timeout=60_000)
        assert result_files(app) == saved
        page.get_by_role("tab", name="Trade-off across saved results").click()
        plot_with(page, "trade-off").wait_for()
        screenshot(page, "13-accuracy-tradeoff")

        # 12. kernels
        goto_page(page, "Kernels")
        screenshot(page, "14-kernels")
        assert page.locator('[data-testid="stException"]').count() == 0
    finally:
        ctx.close()


def test_two_sessions_jobs_stay_separate(app, browser):
    """Two browser contexts calibrate different k at the same time on one shared model; each sees its own jobs."""
    (ca, a), (cb, b) = harness.open_session(browser, app["url"]), harness.open_session(browser, app["url"])
    try:
        run_calibration(a, 8, "sess-a-k8", docs=300)
        sidebar(a).get_by_text("calibrate sess-a-k8").wait_for()
        run_calibration(b, 24, "sess-b-k24", docs=3)
        sidebar(b).get_by_text("calibrate sess-b-k24").wait_for()
        assert "sess-b-k24" not in sidebar(a).inner_text() and "sess-a-k8" not in sidebar(b).inner_text()
        a.get_by_text("Saved sess-a-k8").wait_for(timeout=180_000)
        b.get_by_text("Saved sess-b-k24").wait_for(timeout=180_000)
        wait_idle(a)
        wait_idle(b)
        screenshot(a, "15-session-a")
        screenshot(b, "16-session-b")
        meta_a = json.loads((app["runs"] / "sess-a-k8" / "meta.json").read_text())
        meta_b = json.loads((app["runs"] / "sess-b-k24" / "meta.json").read_text())
        assert meta_a["k"]["default"] == 8 and meta_b["k"]["default"] == 24
        # each session's active set is its own run, and its jobs panel lists only its own job
        sidebar(a).get_by_text("thresholds sess-a-k8").wait_for(timeout=30_000)
        sidebar(b).get_by_text("thresholds sess-b-k24").wait_for(timeout=30_000)
        assert "sess-b-k24" not in sidebar(a).inner_text() and "sess-a-k8" not in sidebar(b).inner_text()
        import pandas as pd

        ta = pd.read_parquet(app["runs"] / "sess-a-k8" / "thresholds.parquet")
        tb = pd.read_parquet(app["runs"] / "sess-b-k24" / "thresholds.parquet")
        assert ta["theta"].mean() > tb["theta"].mean()  # smaller k → higher θ
    finally:
        ca.close()
        cb.close()


def test_settings_show_after_a_job_ended_on_another_page(app, browser):
    """A calibration that ends while another page is open: back on Calibrate, the widgets show the
    values the user set (the job's end reran the app while the Calibrate widgets were out of view;
    before state.keep(reassert=True) the browser then drew their defaults, k 64 and 8 documents)."""
    ctx, page = harness.open_session(browser, app["url"])
    try:
        run_calibration(page, 24, "ended-elsewhere", docs=3)
        goto_page(page, "Thresholds")
        sidebar(page).get_by_text("thresholds ended-elsewhere").wait_for(timeout=120_000)  # ended, made active
        wait_idle(page)
        goto_page(page, "Calibrate")
        page.wait_for_timeout(1500)  # the defaults came with a later rerun (the jobs panel's), not the first
        wait_idle(page)
        assert page.get_by_label("k (kept per row)", exact=True).input_value() == "24"
        assert page.get_by_label("Documents", exact=True).input_value() == "3"
        assert not page.get_by_label("Layers 0–1 near-dense (k=512, as in the paper)").is_checked()
    finally:
        ctx.close()
