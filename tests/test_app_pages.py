"""AppTest for every page of the Streamlit app, on a tiny random Llama (seconds, no bundled model).

The app runs through ``tests/e2e/app_entry.py`` (see there why), so every rerun draws the
shared sidebar and then the page, exactly like ``streamlit run app.py``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("plotly")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENTRY = "e2e/app_entry.py"  # resolved against this file's folder by AppTest.from_file
PAGE = {name: str(ROOT / "pages" / f"{name}.py") for name in
        ("overview", "calibrate", "thresholds", "sparsity", "accuracy", "compare", "runs", "kernels")}
TIMEOUT = 120


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from topθ_core.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("app")
    model = write_tiny_checkpoint(root / "tiny-llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOPTHETA_APP_MODEL", str(model))
        mp.setenv("TOPTHETA_RUNS_DIR", str(root / "runs"))
        mp.setenv("TOPTHETA_RESULTS_DIR", str(root / "results"))
        yield {"root": root, "model": model, "runs": root / "runs", "results": root / "results"}


def new_app() -> AppTest:
    return AppTest.from_file(ENTRY, default_timeout=TIMEOUT)


def open_app(page: str | None = "calibrate") -> AppTest:
    """A new session, run once (it opens on the Overview), then switched to ``page``."""
    at = new_app().run()
    assert_clean(at)
    if page:
        at.switch_page(PAGE[page]).run()
        assert_clean(at)
    return at


def wait_jobs(at: AppTest, timeout: float = TIMEOUT) -> AppTest:
    """Wait until this session's background jobs ended, then rerun (the page shows their results)."""
    import time

    board = at.session_state["app_jobs"] if "app_jobs" in at.session_state else None
    t0 = time.monotonic()
    while board is not None and board.any_active:
        assert time.monotonic() - t0 < timeout, "a background job did not end in time"
        time.sleep(0.1)
    at.run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def image_captions(at: AppTest) -> list[str]:
    return [img.caption for el in at.get("image") for img in el.proto.imgs]


def arr(x) -> list:
    """A plotly JSON array (plain list or base64 typed array) as a list."""
    if isinstance(x, dict) and "bdata" in x:
        import base64

        import numpy as np

        a = np.frombuffer(base64.b64decode(x["bdata"]), dtype=np.dtype(x["dtype"]))
        if "shape" in x:
            shape = x["shape"]
            a = a.reshape([int(v) for v in shape.split(",")] if isinstance(shape, str) else shape)
        return a.tolist()
    return list(x)


def calibrate(at: AppTest, k: int, docs: int = 3, name: str = "", near_dense: bool = False) -> AppTest:
    at.checkbox(key="cal_near_dense").set_value(near_dense)
    at.number_input(key="cal_k").set_value(k)
    at.number_input(key="cal_docs").set_value(docs)
    at.number_input(key="cal_max_tokens").set_value(128)
    if name:
        at.text_input(key="cal_name").input(name)
    at.button(key="cal_run").click().run()
    assert_clean(at)
    return wait_jobs(at)


@pytest.fixture(scope="module")
def calibrated(env):
    """One app session with a finished calibration (k=16) named 'k16'."""
    at = open_app()
    calibrate(at, 16, name="k16")
    return at


def test_start_renders_overview_with_sidebar(env):
    at = new_app().run()
    assert_clean(at)
    assert "Top-θ Explorer" in texts(at.title)
    status = " ".join(texts(at.sidebar.success))
    assert "tiny-llama" in status and "3 layers" in status and "no thresholds" in status
    assert at.sidebar.radio(key="sb_model_choice").value == "local"
    assert at.sidebar.text_input(key="sb_model_path").value == str(env["model"])
    at.switch_page(PAGE["calibrate"]).run()
    assert at.number_input(key="cal_k").value == 64
    assert at.checkbox(key="cal_near_dense").value is True


def test_bad_model_path_is_a_message_not_a_traceback(env):
    at = open_app()
    at.sidebar.text_input(key="sb_model_path").input(str(env["root"] / "nope")).run()
    assert_clean(at)
    assert any("does not exist" in e for e in texts(at.sidebar.error))
    assert any("No model is loaded" in i for i in texts(at.info))


def test_settings_survive_a_page_switch_and_a_reload_from_the_url(env):
    at = open_app()
    at.number_input(key="cal_k").set_value(48).run()
    at.slider(key="cal_sigma").set_value(0.3).run()
    at.checkbox(key="cal_near_dense").uncheck().run()
    at.switch_page(PAGE["thresholds"]).run()
    at.switch_page(PAGE["accuracy"]).run()
    at.number_input(key="acc_limit").set_value(7).run()
    at.switch_page(PAGE["calibrate"]).run()
    assert_clean(at)
    assert (at.number_input(key="cal_k").value, at.slider(key="cal_sigma").value,
            at.checkbox(key="cal_near_dense").value) == (48, 0.3, False)
    url = dict(at.query_params)  # the open page's view is in the URL
    assert (url["cal_k"], url["cal_sigma"], url["cal_near_dense"]) == ("48", "0.3", "false")
    # a reload is a new session that starts from the URL; a value that does not parse is ignored
    again = new_app()
    again.query_params.update({**url, "cal_docs": "many"})
    again.run()
    again.switch_page(PAGE["calibrate"]).run()
    assert_clean(again)
    assert (again.number_input(key="cal_k").value, again.slider(key="cal_sigma").value,
            again.checkbox(key="cal_near_dense").value) == (48, 0.3, False)
    assert again.number_input(key="cal_docs").value == 8  # the default
    at.switch_page(PAGE["accuracy"]).run()
    assert at.number_input(key="acc_limit").value == 7


def test_calibrate_saves_run_and_activates_it(calibrated, env):
    at = calibrated
    assert any("Saved **k16**" in s for s in texts(at.success))
    meta = json.loads((env["runs"] / "k16" / "meta.json").read_text())
    assert meta["k"]["default"] == 16 and meta["k"]["overrides"] == {}
    assert meta["app_defaults"] == {"sdc": "exact", "vmc": True}
    assert meta["data"].startswith("corpus:")
    assert at.sidebar.selectbox(key="sb_active_run").value == "k16"
    assert "k16" in " ".join(texts(at.sidebar.success))
    # download button carries a zip of the artifact
    zdata = at.get("download_button")[0].proto
    assert zdata.label.startswith("Download thresholds")


def test_a_click_in_the_run_that_first_sees_a_job_ended_is_kept(env):
    """A job that ended since the last run (here a finished generation) is first seen by the run a click
    starts: that run must not be cut short by a rerun (which drops button presses), so the calibration
    the click asked for starts, and the ended job is announced all the same."""
    import time

    at = open_app("calibrate")
    board = at.session_state["app_jobs"]
    ended = board.submit("generate", "generate 0 tokens", "compare", lambda job: {"steps": [], "stopped": False})
    t0 = time.monotonic()
    while ended.active:
        assert time.monotonic() - t0 < TIMEOUT
        time.sleep(0.05)
    assert not ended.announced
    at.number_input(key="cal_k").set_value(16)
    at.number_input(key="cal_docs").set_value(2)
    at.number_input(key="cal_max_tokens").set_value(128)
    at.text_input(key="cal_name").input("click-kept")
    at.button(key="cal_run").click().run()
    assert_clean(at)
    assert [j.label for j in board.jobs(page="calibrate")] == ["calibrate click-kept"]
    assert ended.announced
    wait_jobs(at)
    assert at.sidebar.selectbox(key="sb_active_run").value == "click-kept"


def test_calibrate_zip_export(calibrated, env):
    from explorer_ui import runs

    data = runs.zip_run(env["runs"] / "k16")
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert sorted(names) == ["k16/meta.json", "k16/thresholds.parquet"]


def test_calibrate_rejects_duplicate_and_bad_names(calibrated, env):
    at = calibrated
    saved = lambda: sorted(p.name for p in env["runs"].iterdir() if not p.name.startswith("."))  # noqa: E731
    before = saved()
    at.switch_page(PAGE["calibrate"]).run()
    at.number_input(key="cal_k").set_value(16)
    at.text_input(key="cal_name").input("k16")
    at.button(key="cal_run").click().run()
    assert_clean(at)
    assert any("exists already" in e for e in texts(at.error))
    assert not at.session_state["app_jobs"].any_active  # refused before any job started
    at.text_input(key="cal_name").input("bad name/..")
    at.button(key="cal_run").click().run()
    assert any("letters, digits" in e for e in texts(at.error))
    assert "k16" in before and saved() == before  # neither attempt wrote a run


def test_calibrate_robust_aggregation(env):
    from explorer_ui import runs

    at = open_app()
    assert at.selectbox(key="cal_aggregation").value == "mean-std"  # the default, next to σ
    at.selectbox(key="cal_aggregation").set_value("median")
    calibrate(at, 16, docs=2, name="k16-median")
    meta = json.loads((env["runs"] / "k16-median" / "meta.json").read_text())
    assert meta["aggregation"] == "median" and meta["calibration"]["aggregation"] == "median"
    assert meta["statistics"].startswith("t_mean = median(t)") and meta["reservoir"]["capacity"] == 128
    assert any(line.startswith("θ aggregation: median") for line in runs.provenance_lines(meta))


def test_calibrate_row_max_theta_and_use_it(env):
    """A row-max run: the artifact records the kind of θ, and the Sparsity and Thresholds pages use
    and say it (a page that built an absolute config would fail the run with a mismatch error)."""
    from explorer_ui import runs

    at = open_app()
    assert at.selectbox(key="cal_theta_reference").value == "absolute"  # the default
    at.selectbox(key="cal_theta_reference").set_value("row-max")
    calibrate(at, 16, docs=2, name="k16-rowmax")
    meta = json.loads((env["runs"] / "k16-rowmax" / "meta.json").read_text())
    assert meta["theta_reference"] == "row-max"
    assert any(line.startswith("θ compared with: the score minus") for line in runs.provenance_lines(meta))
    assert at.sidebar.selectbox(key="sb_active_run").value == "k16-rowmax"
    at.switch_page(PAGE["sparsity"]).run()
    assert_clean(at)
    assert not at.error, texts(at.error)
    assert any("θ-row-max" in c for c in texts(at.caption))
    at.switch_page(PAGE["thresholds"]).run()
    assert_clean(at)
    assert any("relative to each row's maximum" in c for c in texts(at.caption))
    at.switch_page(PAGE["calibrate"]).run()
    at.selectbox(key="cal_theta_reference").set_value("row-max")
    at.radio(key="cal_placement").set_value("post").run()
    assert_clean(at)
    assert any("placement=pre" in e for e in texts(at.error))  # refused with a message, nothing runs


def test_calibrate_per_layer_k_editor_only_when_open_and_edits_kept(env):
    """Collapsed, the per-layer k expander draws nothing (no data grid, no chart to load on a session's
    first page); an edited table saved in the session still sets the calibration's k schedule."""
    import pandas as pd

    def k_box(at):
        return next(e for e in at.expander if e.label == "Per-layer k")

    at = open_app()
    assert not k_box(at).get("dataframe") and not k_box(at).get("plotly_chart") and not plotly_specs(at)
    at.session_state["cal_k_open"] = True
    at.run()
    assert_clean(at)
    assert len(k_box(at).get("dataframe")) == 1
    assert [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in k_box(at).get("plotly_chart")] == ["k per layer"]
    edited = pd.DataFrame({"layer": [0, 1, 2], "k": [16, 32, 16]})
    at.session_state["cal_k_open"] = False
    at.session_state["cal_k_edited"] = ((3, 16, False), edited)
    calibrate(at, 16, docs=2, name="k16-edited")
    meta = json.loads((env["runs"] / "k16-edited" / "meta.json").read_text())
    assert meta["k"]["default"] == 16 and meta["k"]["overrides"] == {"1": 32}


def test_calibrate_k_too_large_fails_cleanly(env):
    at = open_app()
    calibrate(at, 4096, docs=2, name="too-big")
    assert any("nothing was saved" in e for e in texts(at.error))
    assert not (env["runs"] / "too-big").exists()


def test_calibrate_upload_errors_and_success(env):
    at = open_app()
    at.radio(key="cal_source").set_value("upload").run()
    assert_clean(at)
    assert at.button(key="cal_run").disabled  # nothing uploaded yet
    at.get("file_uploader")[0].upload("broken.jsonl", b'{"text": "fine"}\n{nope\n').run()
    assert_clean(at)
    assert any("Cannot use this file: broken.jsonl: line 2 is not valid JSON" in e for e in texts(at.error))
    assert at.button(key="cal_run").disabled
    doc = ("Calibration text from an upload. " * 30 + "\n\n") * 3
    at.get("file_uploader")[0].upload("good.txt", doc.encode()).run()
    assert_clean(at)
    assert any("good.txt: 3 documents" in s for s in texts(at.success))
    calibrate(at, 16, docs=3, name="from-upload")
    meta = json.loads((env["runs"] / "from-upload" / "meta.json").read_text())
    assert meta["data"].startswith("upload:good.txt") and meta["documents"] == 3


def test_thresholds_page(calibrated):
    at = calibrated
    at.switch_page(PAGE["thresholds"]).run()
    assert_clean(at)
    assert "Thresholds" in texts(at.title)
    assert at.selectbox(key="th_run").value == "k16"
    specs = plotly_specs(at)
    titles = [s["layout"]["title"]["text"] for s in specs]
    assert any(t.startswith("θ at L") for t in titles)
    assert any(t.startswith("θ vs row length") for t in titles)
    grid = next(s for s in specs if s["layout"]["title"]["text"].startswith("θ at L"))
    assert grid["data"][0]["marker"]["symbol"] == "square"
    # the histograms and the table are drawn only once their (collapsed) expanders are opened
    assert not any(t.startswith("θ distribution") for t in titles) and not at.dataframe
    at.session_state["th_hist_open"] = True
    at.session_state["th_table_open"] = True
    at.run()
    assert_clean(at)
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert "θ distribution · all layers" in titles and any(t.startswith("θ distribution · layer") for t in titles)
    assert len(at.dataframe) == 1
    # change layer and heads: the curve follows
    layer = at.selectbox(key="th_layer")
    assert layer.options == ["0", "1", "2"]
    other = [o for o in layer.options if o != str(layer.value)][0]
    layer.set_value(int(other)).run()
    assert_clean(at)
    curve = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith("θ vs row length"))
    assert curve["layout"]["title"]["text"].endswith(f"layer {other}")
    at.multiselect(key="th_heads").set_value([1]).run()
    curve = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith("θ vs row length"))
    assert [t["name"] for t in curve["data"]] == ["head 1"]  # one run: the legend names heads only
    assert "k16 · head 1" in curve["data"][0]["hovertemplate"]
    # σ changes θ without recalibrating
    at.number_input(key="th_sigma").set_value(1.0).run()
    assert_clean(at)


def test_thresholds_grid_click_opens_head(calibrated):
    """A click on the grid arrives as the chart's selection state; the page opens that (layer, head)."""
    at = calibrated
    at.switch_page(PAGE["thresholds"]).run()
    at.session_state["th_grid"] = {"selection": {"points": [{"x": 3, "y": 2, "customdata": [2, 3]}]}}
    at.run()
    assert_clean(at)
    assert at.selectbox(key="th_layer").value == 2
    assert at.multiselect(key="th_heads").value == [3]


def test_thresholds_overlay_two_runs(calibrated, env):
    at = calibrated
    at.switch_page(PAGE["calibrate"]).run()
    at.selectbox(key="cal_corpus").set_value("lambada")
    calibrate(at, 16, name="k16-lambada")
    at.switch_page(PAGE["thresholds"]).run()
    at.selectbox(key="th_run").set_value("k16").run()
    at.selectbox(key="th_overlay").set_value("k16-lambada")
    at.session_state["th_hist_open"] = True
    at.run()
    assert_clean(at)
    hist = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith("θ distribution · layer"))
    assert [t["name"] for t in hist["data"]] == ["k16", "k16-lambada"]


def test_sparsity_page(calibrated, monkeypatch):
    from explorer_ui import analysis, figures

    drawn = []  # (n, n) of every map image the page draws
    prefills = []  # model calls: a rerun with unchanged inputs draws the session's last snapshot again
    real_prefill = analysis.sparsity_prefill
    monkeypatch.setattr(analysis, "sparsity_prefill", lambda *a, **kw: prefills.append(1) or real_prefill(*a, **kw))

    def spy(*a, **kw):
        out = real(*a, **kw)
        drawn.append(out[0].shape[:2])
        return out

    real = figures.attention_map_images
    monkeypatch.setattr(figures, "attention_map_images", spy)
    at = calibrated
    at.sidebar.selectbox(key="sb_active_run").set_value("k16").run()
    at.switch_page(PAGE["sparsity"]).run()
    assert_clean(at)
    assert "Sparsity" in texts(at.title)
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["prompt tokens"]) == 256
    kept = float(metrics["kept attention (prefill)"].rstrip("%")) / 100
    assert 0 < kept < 1
    assert 0 < float(metrics["kept V rows (decode)"].rstrip("%")) <= 100  # filled in after the decode steps
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert "kept attention fraction · prefill" in titles and "decode steps · kept V rows" in titles
    # 256 tokens: the maps are images (beyond IMAGE_CELLS a side), titled by layer and head
    assert "**layer 2 · head 0**" in texts(at.markdown)
    caps = image_captions(at)
    sparse_cap = next(c for c in caps if c.startswith("Top-θ: kept weights (grey = dropped)"))
    assert "dense softmax probabilities" in caps
    share = float(sparse_cap.split(", ")[-1].split("%")[0]) / 100
    assert 0 < share < 1
    at.selectbox(key="sp_head").set_value(3).run()
    assert_clean(at)
    assert "**layer 2 · head 3**" in texts(at.markdown)
    assert len(prefills) == 1
    # long prompt: the maps are pooled, never more than 256 cells a side
    at.text_area(key="sp_prompt").input("word " * 700)
    at.number_input(key="sp_max_tokens").set_value(600)
    at.number_input(key="sp_decode_steps").set_value(0).run()
    assert_clean(at)
    assert any(t.startswith("**layer 2 · head 3 · 3 tokens per cell") for t in texts(at.markdown))
    assert drawn[0] == (256, 256) and 150 < drawn[-1][0] <= 256 and drawn[-1][0] == drawn[-1][1]


def test_sparsity_layer_change_only_redraws_and_invalid_settings_keep_the_view(calibrated, monkeypatch):
    from explorer_ui import analysis

    prefills = []
    real_prefill = analysis.sparsity_prefill
    monkeypatch.setattr(analysis, "sparsity_prefill", lambda *a, **kw: prefills.append(1) or real_prefill(*a, **kw))
    at = calibrated
    at.sidebar.selectbox(key="sb_active_run").set_value("k16").run()
    at.switch_page(PAGE["sparsity"]).run()
    at.text_area(key="sp_prompt").input("alpha beta gamma delta epsilon " * 8)
    at.number_input(key="sp_max_tokens").set_value(48)  # small enough for heatmaps (token labels, hover)
    at.number_input(key="sp_decode_steps").set_value(0).run()
    assert_clean(at)
    n_runs = len(prefills)
    at.selectbox(key="sp_layer").set_value(1).run()
    at.selectbox(key="sp_head").set_value(2).run()
    assert_clean(at)
    assert len(prefills) == n_runs  # every layer's maps came with the one prefill
    maps = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith("layer 1 · head 2"))
    assert " → " in str(maps["data"][0]["text"][3][1])  # token strings in the hover ("query token → key token")
    assert maps["layout"]["xaxis"]["ticktext"]  # and on the axes
    row = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith("query "))
    assert "head 2" in row["layout"]["title"]["text"]
    # an invalid combination is refused; the view stays on layer 1, head 2 with the last maps
    at.radio(key="sp_selection").set_value("top-theta").run()
    at.selectbox(key="sp_sdc").set_value("none")
    at.checkbox(key="sp_vmc").check().run()
    assert_clean(at)
    assert any("VMC" in e for e in texts(at.error))
    assert at.selectbox(key="sp_layer").value == 1 and at.selectbox(key="sp_head").value == 2
    assert any(s["layout"]["title"]["text"].startswith("layer 1 · head 2") for s in plotly_specs(at))
    assert len(prefills) == n_runs


def test_sparsity_without_thresholds_uses_top_k(env):
    at = open_app(None)
    at.sidebar.selectbox(key="sb_active_run").set_value("(none: dense only)").run()
    at.switch_page(PAGE["sparsity"]).run()
    assert_clean(at)
    assert at.radio(key="sp_selection").value == "top-k"
    assert any("Top-θ is unavailable" in c for c in texts(at.caption))


def test_compare_page_streams_both(calibrated):
    at = calibrated
    at.switch_page(PAGE["compare"]).run()
    assert_clean(at)
    at.text_area(key="cmp_prompt").input("The quick brown fox jumps over the lazy dog. " * 6)
    at.number_input(key="cmp_max_new").set_value(5)
    at.button(key="cmp_run").click().run()
    wait_jobs(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["tokens"] == "5"
    htmls = [h.proto.body for h in at.get("html")]
    assert len(htmls) >= 2 and all('data-step="4"' in h for h in htmls[:2])
    chart = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"] == "per-step agreement and cost")
    assert arr(chart["data"][0]["x"]) == [0, 1, 2, 3, 4]
    # a changed setting keeps the last result on screen, marked stale, without generating again
    at.number_input(key="cmp_max_new").set_value(7).run()
    assert {m.label: m.value for m in at.metric}["tokens"] == "5"
    assert any(w.startswith("**Stale**") for w in texts(at.warning))


def test_compare_stop_keeps_the_partial_generation(calibrated):
    """Stop ends the generation where it is: its tokens stay on screen under its own run's header."""
    import time

    from explorer_ui.jobs import JobState

    at = calibrated
    at.switch_page(PAGE["compare"]).run()
    at.text_area(key="cmp_prompt").input("Stop me. " * 10)
    at.number_input(key="cmp_max_new").set_value(400).run()
    at.button(key="cmp_run").click().run()
    job = at.session_state["app_jobs"].latest("compare")
    t0 = time.monotonic()
    while job.partial is None or len(job.partial) < 3:
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
    job.cancel()  # what the Stop button's click does
    wait_jobs(at)
    assert job.state is JobState.DONE and job.result["stopped"]
    n = len(job.result["steps"])
    assert 3 <= n < 400
    assert {m.label: m.value for m in at.metric}["tokens"] == str(n)
    assert any(f"stopped after {n} tokens" in t for t in texts(at.markdown))


def _run_accuracy(at, task: str, limit: int, **choices):
    """Open the Accuracy page, set the radios/select boxes in ``choices`` (key → value) in order, run
    ``task`` on ``limit`` items in the background, wait for it, and return the result table."""
    at.switch_page(PAGE["accuracy"]).run()
    assert_clean(at)
    for key, value in choices.items():
        (at.radio if key in ("acc_kind", "acc_selection") else at.selectbox)(key=key).set_value(value).run()
    at.selectbox(key="acc_task").set_value(task)
    at.number_input(key="acc_limit").set_value(limit)
    at.button(key="acc_run").click().run()
    assert_clean(at)
    assert not at.error, texts(at.error)
    wait_jobs(at)
    assert not at.error, texts(at.error)
    return at.dataframe[0].value


def test_accuracy_page_runs_and_saves(calibrated, env):
    at = calibrated
    df = _run_accuracy(at, "arc_easy", 3)
    assert set(df["metric"]) >= {"acc", "acc_norm"} and len(df["variant"].unique()) == 1
    assert list(env["results"].glob("*.parquet"))
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert any(t.startswith("Δ = Top-θ − dense per variant") for t in titles)
    assert any(t.startswith("trade-off: Δ") for t in titles)
    assert any("Only 3 items" in c for c in texts(at.caption))  # a thin result says so


def test_accuracy_dense_cache_skips_the_dense_pass_and_marks_stale(calibrated, env, monkeypatch):
    """A second run on the same items (another variant) takes dense from the disk cache: the task scores
    only the sparse arm.  Until the new run has numbers, the old ones are marked stale."""
    from topθ_core.evaluation.multiple_choice import MultipleChoiceTask

    calls = []
    real = MultipleChoiceTask.score
    monkeypatch.setattr(MultipleChoiceTask, "score",
                        lambda self, lm, units, state, tick, dense=None:
                        calls.append((state.arm.dense, len(units))) or real(self, lm, units, state, tick, dense))
    at = calibrated
    at.switch_page(PAGE["accuracy"]).run()
    at.toggle(key="acc_live").set_value(False).run()
    _run_accuracy(at, "arc_easy", 4, acc_kind="mc", acc_selection="top-theta")
    first = list(calls)
    assert sum(n for dense, n in first if dense) <= 4  # at most the 4 items (fewer when cached by an earlier test)
    calls.clear()
    at.selectbox(key="acc_sdc").set_value("offline").run()
    assert_clean(at)
    assert any(w.startswith("**Stale**") for w in texts(at.warning))  # live is off: the old run stays, marked
    at.button(key="acc_run").click().run()
    wait_jobs(at)
    assert calls and not any(dense for dense, _ in calls), calls  # dense came from the cache
    assert sum(n for _, n in calls) == 4
    assert not any(w.startswith("**Stale**") for w in texts(at.warning))
    legend = next(t for t in texts(at.markdown) if "` " in t or t.count("`") >= 2 and "top-theta" in t)
    assert "sdc=offline" in legend and "sdc=exact" not in legend  # each variant's exact config is named


def test_accuracy_variant_matrix_fills_every_row(calibrated):
    at = calibrated
    at.switch_page(PAGE["accuracy"]).run()
    at.radio(key="acc_selection").set_value("top-theta").run()
    at.selectbox(key="acc_sdc").set_value("exact").run()
    at.multiselect(key="acc_matrix_vmc").set_value([True, False]).run()
    df = _run_accuracy(at, "arc_easy", 3)
    assert sorted(df["variant"].unique()) == ["vmc=off", "vmc=on"]
    assert set(df.groupby("variant")["metric"].apply(frozenset)) == {frozenset({"acc", "acc_norm", "pred_changed"})}
    assert df["n"].eq(3).all()


def test_accuracy_invalid_combination_is_a_message(calibrated):
    at = calibrated
    at.switch_page(PAGE["accuracy"]).run()
    at.radio(key="acc_selection").set_value("top-theta").run()
    at.selectbox(key="acc_sdc").set_value("none")
    at.checkbox(key="acc_vmc").check().run()
    assert_clean(at)
    assert any("VMC" in e for e in texts(at.error))
    assert at.button(key="acc_run").disabled


def test_kernels_page(env):
    """The headline tables on top hold what explorer_ui.kernel_headline computes from the CSV (its decode cell
    checked here against the row the rule picks); the raw files sit behind one expander, one file drawn at a
    time, development logs left out."""
    import pandas as pd

    from explorer_ui import bench_results, kernel_headline

    at = open_app(None)
    at.switch_page(PAGE["kernels"]).run()
    assert_clean(at)
    assert "Kernels" in texts(at.title)
    results = ROOT / "benchmarks" / "results"
    head = kernel_headline.headline(results)
    cards = sorted(head["card"].unique())
    assert "H200" in cards
    assert [s for s in texts(at.subheader) if s.startswith("Measured on")] == [f"Measured on {c}" for c in cards]
    for i, card in enumerate(cards):
        pd.testing.assert_frame_equal(at.dataframe[i].value.reset_index(drop=True),
                                      kernel_headline.display_frame(head[head["card"] == card]).reset_index(drop=True))
    csv = pd.read_csv(results / "kernels_H200.csv")
    decode = csv[csv["kernel"] == "decode"]
    decode = decode[decode["run"] == decode["run"].max()]
    third = decode[(pd.to_numeric(decode["f_target"], errors="coerce") - 1 / 3).abs() <= 0.02]
    big = third.assign(size=third["B"] * third["N"]).sort_values(["size", "B"]).iloc[-1]
    h200 = at.dataframe[cards.index("H200")].value.set_index("measure")
    assert h200.loc["decode, f = 1/3", "speed-up vs SDPA"] == f"{big['speedup']:.2f}×"
    assert h200.loc["decode, f = 1/3", "shape"].startswith(f"B={big['B']}, N={big['N'] // 1024}k")
    # raw files: one expander, drawn only when opened, one file at a time, no logs
    files = bench_results.result_paths(results)
    assert files and not any(p.suffix == ".log" or "logs" in p.relative_to(results).parts for p in files)
    (raw,) = at.main.expander
    assert raw.label == f"Raw result files ({len(files)})" and len(raw.children) == 0
    at.session_state["ker_raw_open"] = True
    at.run()
    assert_clean(at)
    box = at.main.expander[0]
    pick = box.selectbox(key="ker_file")
    order = sorted(files, key=lambda p: ("kernel" not in p.name, p.suffix == ".md"))  # the page's order
    names = [str(p.relative_to(results)) for p in order]
    assert len(pick.options) == len(files) and pick.value == names[0] and names[0].startswith("kernels_")
    assert len(box.dataframe) == 1 and len(box.get("plotly_chart")) == 1
    report = next(n for n in names if n.endswith(".md"))
    pick.set_value(report).run()
    assert_clean(at)
    box = at.main.expander[0]
    assert not box.dataframe and any(m.value.startswith("#") for m in box.markdown)


def test_accuracy_perplexity(calibrated, env):
    at = calibrated
    # acc_sdc: an earlier test left an invalid combination
    df = _run_accuracy(at, "pydoc", 2, acc_kind="perplexity", acc_selection="top-theta", acc_sdc="offline")
    assert "ppl" in set(df["metric"])
    assert (df.loc[df["metric"] == "ppl", "dense"] > 1).all()


# ---------------------------------------------------------------------------- Overview, Thresholds σ, Runs
def _speed_metrics_match_the_headline(at: AppTest) -> None:
    from explorer_ui import kernel_headline

    head = kernel_headline.headline(ROOT / "benchmarks" / "results")
    shown = {m.label: m.value for m in at.metric}
    for card, rows in head.groupby("card"):
        for label, value, _ in kernel_headline.metric_cells(rows):
            assert shown[label] == value
    assert shown["decode, f = 0.15"].endswith("×")


def _findings_shown(at: AppTest) -> None:
    from explorer_ui import findings

    body = " ".join(texts(at.markdown))
    assert all(title in body for title, _ in findings.KEY_FINDINGS)
    assert {"Key findings", "Where to start", "Measured speed", "Active threshold set"} <= set(texts(at.subheader))


def _result_rows(tid: str, task: str, created: str, delta: float, kept: float, metric: str = "acc"):
    from result_rows import result_frame

    return result_frame(tid, task, created, delta, metric, kept, half_width=0.05, n=7, label="Top-θ test")


def test_overview_without_active_set(env):
    at = open_app(None)
    at.sidebar.selectbox(key="sb_active_run").set_value("(none: dense only)").run()
    assert_clean(at)
    assert "Top-θ Explorer" in texts(at.title)
    assert any("No calibration for this model yet" in i or "No threshold set is selected" in i for i in texts(at.info))
    _speed_metrics_match_the_headline(at)
    _findings_shown(at)


def test_overview_without_model(env):
    at = open_app(None)
    at.sidebar.text_input(key="sb_model_path").input(str(env["root"] / "nope")).run()
    assert_clean(at)
    assert any(i.startswith("No model is loaded (") and "does not exist" in i for i in texts(at.info))
    assert any("load one first" in c for c in texts(at.caption))
    _speed_metrics_match_the_headline(at)  # what needs no model is still there
    _findings_shown(at)


def test_overview_shows_the_active_sets_latest_results(calibrated, env):
    from explorer_ui import runs
    from topθ_core.evaluation import thresholds_id
    from topθ_core.thresholds import load_thresholds

    at = calibrated
    runs.save_sigma_run(load_thresholds(env["runs"] / "k16"), 0.3, "k16-ov", "k16", env["runs"])
    at.switch_page(PAGE["overview"]).run()
    at.sidebar.selectbox(key="sb_active_run").set_value("k16-ov").run()
    assert_clean(at)
    assert any(m.startswith("**k16-ov** · k=16 · σ = 0.3") for m in texts(at.markdown))
    assert any("No saved evaluation results for this threshold set" in i for i in texts(at.info))
    tid = thresholds_id(load_thresholds(env["runs"] / "k16-ov"))
    env["results"].mkdir(exist_ok=True)
    _result_rows(tid, "arc_easy", "2026-01-01T00:00:01", 0.02, 0.30).to_parquet(env["results"] / "ov-old.parquet")
    _result_rows(tid, "arc_easy", "2026-01-02T00:00:02", -0.01, 0.25).to_parquet(env["results"] / "ov-new.parquet")
    other = _result_rows("another-set0", "arc_easy", "2026-01-03T00:00:03", 0.5, 0.9)  # another set's: not shown
    other.to_parquet(env["results"] / "ov-x.parquet")
    at.run()
    assert_clean(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["kept attention"] == "25.0%" and metrics["Δ acc · arc_easy"] == "-0.0100"
    table = at.dataframe[0].value
    assert list(table["task"]) == ["arc_easy"] and list(table["Δ (Top-θ − dense)"]) == [-0.01]  # the latest only
    assert list(table["95% interval"]) == ["[-0.0600, +0.0400]"] and list(table["n"]) == [7]
    _speed_metrics_match_the_headline(at)


def test_thresholds_save_sigma_as_new_set(calibrated, env, monkeypatch):
    import torch

    import topθ_core.calibration as calibration
    from topθ_core.statistics import ThresholdStats
    from topθ_core.thresholds import load_thresholds

    def refuse(*a, **kw):
        raise AssertionError("saving σ must not recalibrate")

    monkeypatch.setattr(calibration, "calibrate", refuse)
    monkeypatch.setattr(ThresholdStats, "finalize", refuse)
    at = calibrated
    at.switch_page(PAGE["thresholds"]).run()
    at.selectbox(key="th_run").set_value("k16").run()
    at.number_input(key="th_sigma").set_value(0.1).run()
    assert_clean(at)
    assert at.button(key="th_save").disabled  # σ is k16's own
    at.number_input(key="th_sigma").set_value(0.6).run()
    assert not at.button(key="th_save").disabled
    at.text_input(key="th_save_name").input("bad name/..")
    at.button(key="th_save").click().run()
    assert_clean(at)
    assert any(e.startswith("Not saved:") and "letters, digits" in e for e in texts(at.error))
    at.text_input(key="th_save_name").input("k16-s06")
    at.button(key="th_save").click().run()
    assert_clean(at)
    assert any(s.startswith("Saved **k16-s06**") and "now the active threshold set" in s for s in texts(at.success))
    src, new = load_thresholds(env["runs"] / "k16"), load_thresholds(env["runs"] / "k16-s06")
    assert new.sigma == 0.6 and src.sigma == 0.1
    assert torch.allclose(new.theta, src.with_sigma(0.6).theta, equal_nan=True)
    assert torch.equal(new.count, src.count) and torch.equal(new.sdc_mean, src.sdc_mean)
    assert new.meta["derived_from"]["run"] == "k16" and new.meta["derived_from"]["sigma"] == 0.1
    assert at.sidebar.selectbox(key="sb_active_run").value == "k16-s06"
    assert at.selectbox(key="th_run").value == "k16-s06" and at.button(key="th_save").disabled
    at.selectbox(key="th_run").set_value("k16").run()
    at.text_input(key="th_save_name").input("k16-s06")
    at.button(key="th_save").click().run()
    assert any("exists already" in e for e in texts(at.error))


def test_runs_page_rename_and_delete_the_active_set(calibrated, env):
    from explorer_ui import runs
    from topθ_core.thresholds import load_thresholds

    at = calibrated
    runs.save_sigma_run(load_thresholds(env["runs"] / "k16"), 0.9, "tmp-a", "k16", env["runs"])
    at.switch_page(PAGE["runs"]).run()
    assert_clean(at)
    assert "Runs" in texts(at.title)
    assert "tmp-a" in list(at.dataframe[0].value["name"])
    at.sidebar.selectbox(key="sb_active_run").set_value("tmp-a").run()
    at.selectbox(key="runs_pick").set_value("tmp-a").run()
    at.text_input(key="runs_new_name").input("bad name/..")
    at.button(key="runs_rename").click().run()
    assert_clean(at)
    assert any(e.startswith("Not renamed:") and "letters, digits" in e for e in texts(at.error))
    assert (env["runs"] / "tmp-a").is_dir()
    before = (env["runs"] / "tmp-a" / "meta.json").read_bytes()
    at.text_input(key="runs_new_name").input("tmp-b")
    at.button(key="runs_rename").click().run()
    assert_clean(at)
    assert "Renamed **tmp-a** to **tmp-b**." in texts(at.success)
    assert not (env["runs"] / "tmp-a").exists() and (env["runs"] / "tmp-b" / "meta.json").read_bytes() == before
    assert at.sidebar.selectbox(key="sb_active_run").value == "tmp-b"  # the renamed active set stays active
    assert at.selectbox(key="runs_pick").value == "tmp-b"
    # delete the active set: the sidebar picks another, every page still runs
    assert at.button(key="runs_delete").disabled
    at.checkbox(key="runs_delete_confirm").check().run()
    at.button(key="runs_delete").click().run()
    assert_clean(at)
    assert any(s.startswith("Deleted **tmp-b**. It was the active threshold set") for s in texts(at.success))
    assert not (env["runs"] / "tmp-b").exists() and not [p for p in env["runs"].iterdir() if p.name.startswith(".")]
    active = at.sidebar.selectbox(key="sb_active_run")
    assert active.value != "tmp-b" and "tmp-b" not in option_names(active) and active.value in option_names(active)
    assert "tmp-b" not in list(at.dataframe[0].value["name"])
    for page in ("overview", "thresholds", "runs"):
        at.switch_page(PAGE[page]).run()
        assert_clean(at)


def option_names(box) -> list[str]:
    """A select box's options as names (the sidebar's run picker shows "name · k… σ=…")."""
    return [o.split(" · ")[0] for o in box.options]


def test_runs_page_imports_zips(calibrated, env):
    from result_rows import make_zip

    from explorer_ui import runs

    at = calibrated
    at.switch_page(PAGE["runs"]).run()
    assert_clean(at)
    assert not at.get("file_uploader")  # drawn once its expander is opened
    at.session_state["runs_import_open"] = True
    at.run()
    assert at.button(key="runs_import").disabled  # nothing uploaded yet

    def upload_and_import(name: str, data: bytes, as_name: str = "") -> None:
        at.get("file_uploader")[0].upload(name, data).run()
        if as_name:
            at.text_input(key="runs_import_name").input(as_name)
        at.button(key="runs_import").click().run()
        assert_clean(at)

    listing = lambda: sorted(p.name for p in env["runs"].iterdir())  # noqa: E731 - hidden ones included
    before = listing()
    k16 = env["runs"] / "k16"
    upload_and_import("k16.zip", runs.zip_run(k16))
    assert any("k16.zip was not imported" in e and "'k16' exists already" in e for e in texts(at.error))
    upload_and_import("junk.zip", b"this is not a zip")
    assert any("junk.zip was not imported: not a zip file" in e for e in texts(at.error))
    upload_and_import("evil.zip", make_zip({"../evil/meta.json": b"{}"}))
    assert any("unsafe or hidden path" in e for e in texts(at.error))
    upload_and_import("half.zip", make_zip({"half/meta.json": (k16 / "meta.json").read_bytes()}))
    assert any("lacks thresholds.parquet" in e for e in texts(at.error))
    assert listing() == before  # every refusal left nothing behind
    upload_and_import("k16.zip", runs.zip_run(k16), as_name="k16-imported")
    assert any(s.startswith("Imported **k16-imported**") for s in texts(at.success))
    assert (env["runs"] / "k16-imported" / "meta.json").read_bytes() == (k16 / "meta.json").read_bytes()
    assert "k16-imported" in option_names(at.sidebar.selectbox(key="sb_active_run"))
    assert at.get("file_uploader")[0].value is None and at.selectbox(key="runs_pick").value == "k16-imported"
    # a set calibrated for another model: imported, says for which model, not offered in the sidebar
    meta = json.loads((k16 / "meta.json").read_text())
    meta["model"].update(name="other-model", digest="0" * 64)
    upload_and_import("foreign.zip", make_zip({"foreign/thresholds.parquet": (k16 / "thresholds.parquet").read_bytes(),
                                           "foreign/meta.json": json.dumps(meta).encode()}))
    assert any("Imported **foreign**, calibrated for other-model" in w and "not the loaded model" in w
               for w in texts(at.warning))
    table = at.dataframe[0].value.set_index("name")
    assert bool(table.loc["foreign", "for loaded model"]) is False and bool(table.loc["k16", "for loaded model"])
    assert "foreign" not in option_names(at.sidebar.selectbox(key="sb_active_run"))


def test_runs_page_results_table_csv_and_delete(calibrated, env, monkeypatch):
    import pandas as pd

    from explorer_ui import runs

    made = []  # every CSV the page offers: (columns, bytes)
    real = runs.table_csv
    monkeypatch.setattr(runs, "table_csv", lambda df: made.append((list(df.columns), real(df))) or made[-1][1])
    env["results"].mkdir(exist_ok=True)
    _result_rows("none", "pydoc", "2099-01-01T00:00:00", 0.25, 1.0, metric="ppl").to_parquet(
        env["results"] / "zz-newest.parquet")
    at = calibrated
    at.switch_page(PAGE["runs"]).run()
    assert_clean(at)
    files = next(d.value for d in at.dataframe if "file" in d.value.columns)
    on_disk = sorted(p.name for p in env["results"].glob("*.parquet"))
    assert sorted(files["file"]) == on_disk and files["file"].iloc[0] == "zz-newest.parquet"  # newest first
    at.selectbox(key="runs_result").set_value("zz-newest.parquet").run()
    assert_clean(at)
    labels = [b.proto.label for b in at.get("download_button")]
    assert {"Table as CSV", "This result as CSV", "Download (.zip)"} <= set(labels)
    assert any(label.startswith("All ") and label.endswith("result rows as CSV") for label in labels)
    # the CSV of the shown result is that file's table
    shown = pd.read_csv(io.BytesIO(made[-1][1]))
    saved = pd.read_parquet(env["results"] / "zz-newest.parquet")
    assert list(shown.columns) == list(saved.columns) and shown["delta"].tolist() == [0.25]
    everything = pd.read_csv(io.BytesIO(made[-2][1]))
    assert len(everything) == sum(len(pd.read_parquet(env["results"] / f)) for f in on_disk)
    at.checkbox(key="runs_result_delete_confirm").check().run()
    at.button(key="runs_result_delete").click().run()
    assert_clean(at)
    assert "Deleted the saved result **zz-newest.parquet**." in texts(at.success)
    assert not (env["results"] / "zz-newest.parquet").exists()
    assert "zz-newest.parquet" not in list(next(d.value for d in at.dataframe if "file" in d.value.columns)["file"])


def test_selection_forced_to_top_k_without_thresholds_returns_to_top_theta(env):
    """Accuracy opened before any calibration can only offer top-k; once a threshold set is active the
    page offers Top-θ again and selects it (the forced top-k was never the user's choice), while a
    top-k the user picked with thresholds active stays picked."""
    at = open_app(None)
    at.sidebar.selectbox(key="sb_active_run").set_value("(none: dense only)").run()
    at.switch_page(PAGE["accuracy"]).run()
    assert_clean(at)
    assert at.radio(key="acc_selection").options == ["Top-k"]
    at.switch_page(PAGE["calibrate"]).run()
    calibrate(at, 16, name="forced-k16")
    assert at.sidebar.selectbox(key="sb_active_run").value == "forced-k16"
    at.switch_page(PAGE["accuracy"]).run()
    assert_clean(at)
    assert at.radio(key="acc_selection").value == "top-theta"
    at.radio(key="acc_selection").set_value("top-k").run()  # the user's own choice
    at.switch_page(PAGE["overview"]).run()
    at.switch_page(PAGE["accuracy"]).run()
    assert at.radio(key="acc_selection").value == "top-k"
