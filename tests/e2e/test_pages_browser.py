"""The Overview, Kernels, Thresholds (save σ) and Runs pages in a real browser: Debian's Chromium driven by
Playwright against `streamlit run app.py`, on a tiny random Llama with one threshold set saved beforehand.

Screenshots go to ``test-output/``.  Skips (with the reason) when ``/usr/bin/chromium`` or Playwright is missing.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

import harness  # noqa: E402  (tests/e2e/conftest.py puts it on the path)
from harness import goto_page, screenshot, set_number, wait_idle  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from explorer_ui import runs
    from topθ_core.calibration import calibrate
    from topθ_core.config import CalibrationConfig, KSchedule
    from topθ_core.models import load_model
    from topθ_core.tiny import TINY_TEXT, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("pages")
    model = write_tiny_checkpoint(root / "tiny-llama")
    th = calibrate(load_model(model), [TINY_TEXT * 4, TINY_TEXT * 3], CalibrationConfig(k=KSchedule(8)),
                   max_length=96, data_description="tiny text")
    runs.save_run(th, "e2e-src", root=root / "runs")
    env = {"TOPTHETA_APP_MODEL": str(model), "TOPTHETA_RUNS_DIR": str(root / "runs"),
           "TOPTHETA_RESULTS_DIR": str(root / "results")}
    with harness.streamlit_server(env, harness.OUTPUT / "e2e-pages-server.log") as (url, _):
        yield {"url": url, "runs": root / "runs"}


def no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0


def sidebar_text(page) -> str:
    return page.locator('[data-testid="stSidebar"]').inner_text()


def test_overview_kernels_thresholds_and_runs(app, browser):
    ctx, page = harness.open_session(browser, app["url"], ready="3 layers · 4/2 heads")
    try:
        # 1. the landing page: what Top-θ does, the active set (no results yet), the speed, findings
        page.locator("h1").filter(has_text="Top-θ Explorer").first.wait_for()
        page.get_by_text("No saved evaluation results for this threshold set yet").wait_for()
        page.get_by_text("decode, f = 0.15").first.wait_for()
        page.get_by_text("Key findings").wait_for()
        assert "e2e-src" in sidebar_text(page)
        no_exception(page)
        screenshot(page, "pages-01-overview")

        # 2. Kernels: the headline per card, raw files behind one expander, one drawn at a time
        goto_page(page, "Kernels")
        page.get_by_text("Measured on H200").wait_for()
        assert page.locator('[data-testid="stMain"] [data-testid="stExpander"]').count() == 1  # one, whatever the files
        page.get_by_text("Raw result files").click()
        wait_idle(page)
        page.get_by_label("File", exact=True).wait_for()
        assert page.locator('[data-testid="stExpander"] [data-testid="stDataFrame"]').count() == 1
        no_exception(page)
        screenshot(page, "pages-02-kernels")

        # 3. Thresholds: a new σ saved as a new set, which becomes the active one
        goto_page(page, "Thresholds")
        set_number(page, "σ", 0.5)
        harness.enter(page.get_by_label("Name of a new threshold set with this σ"), "e2e-s05")
        page.get_by_role("button", name="Save σ = 0.5 as a new set").click()
        page.get_by_text("Saved e2e-s05").wait_for()
        wait_idle(page)
        assert (app["runs"] / "e2e-s05" / "meta.json").is_file()
        assert "e2e-s05" in sidebar_text(page)
        screenshot(page, "pages-03-thresholds-saved")

        # 4. Runs: rename the active set, download it, delete it (the sidebar picks another), import it back
        goto_page(page, "Runs")
        harness.enter(page.get_by_label("New name", exact=True), "e2e-renamed")
        page.get_by_role("button", name="Rename").click()
        page.get_by_text("Renamed e2e-s05 to e2e-renamed").wait_for()
        wait_idle(page)
        assert (app["runs"] / "e2e-renamed").is_dir() and not (app["runs"] / "e2e-s05").exists()
        assert "e2e-renamed" in sidebar_text(page)
        with page.expect_download() as dl:
            page.get_by_role("button", name="Download (.zip)").click()
        data = Path(dl.value.path()).read_bytes()
        assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == ["e2e-renamed/meta.json",
                                                                        "e2e-renamed/thresholds.parquet"]
        page.get_by_label("Yes, delete e2e-renamed").check(force=True)
        wait_idle(page)
        page.get_by_role("button", name="Delete", exact=True).click()
        page.get_by_text("Deleted e2e-renamed").wait_for()
        wait_idle(page)
        assert not (app["runs"] / "e2e-renamed").exists()
        assert "e2e-renamed" not in sidebar_text(page) and "e2e-src" in sidebar_text(page)
        page.get_by_text("Import a threshold set (.zip)").click()
        wait_idle(page)
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
            files=[{"name": "e2e-renamed.zip", "mimeType": "application/zip", "buffer": data}])
        wait_idle(page)
        harness.enter(page.get_by_label("Name", exact=True), "e2e-back")
        page.get_by_role("button", name="Import").click()
        page.get_by_text("Imported e2e-back").wait_for()
        wait_idle(page)
        assert (app["runs"] / "e2e-back" / "thresholds.parquet").is_file()
        assert not [p for p in app["runs"].iterdir() if p.name.startswith(".")]
        no_exception(page)
        screenshot(page, "pages-04-runs")
    finally:
        ctx.close()
