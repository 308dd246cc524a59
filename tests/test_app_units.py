"""The app's pure modules: figures, uploads, runs, analysis, rendering, benchmark results."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import pandas as pd
import pytest

pytest.importorskip("plotly")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer_ui import analysis, bench_results, figures, render, runs, uploads  # noqa: E402
from explorer_ui import session_keys as K  # noqa: E402


# ---------------------------------------------------------------------------- fixtures
def theta_frame(n_layers=3, n_heads=4, bins=(2, 3, 5), w=16, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for l in range(n_layers):
        for h in range(n_heads):
            for b in bins:
                m, s = rng.normal(), abs(rng.normal()) * 0.1
                rows.append({"layer": l, "head": h, "bin": b, "length_lo": b * w + 1, "length_hi": (b + 1) * w,
                             "length": b * w + (w + 1) / 2, "theta": m + 0.1 * s, "t_mean": m, "t_std": s,
                             "count": 10, "sdc_term": 1.0})
    return pd.DataFrame(rows)


def metrics_frame(n_layers=2, n_heads=4, n_kv=2) -> pd.DataFrame:
    rows = []
    g = n_heads // n_kv
    for phase in ("prefill", "decode"):
        for l in range(n_layers):
            for h in range(n_heads):
                first = h % g == 0
                rows.append({"layer": l, "phase": phase, "head": h, "kv_head": h // g, "kept": 10 + h, "visible": 100,
                             "topk_equiv": 20, "rows": 10, "dense_rows": 1, "empty_rows": 0, "extrapolated_rows": 0,
                             "kept_v_rows": 30 if first else 0, "kv_rows": 100 if first else 0})
    df = pd.DataFrame(rows)
    df["kept_frac"] = df["kept"] / df["visible"]
    df["size_factor"] = df["kept"] / df["topk_equiv"]
    return df


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from topθ_core.tiny import write_tiny_checkpoint
    from topθ_core.models import load_model

    return load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


# ---------------------------------------------------------------------------- figures
def test_theta_at_length_interpolates_and_flags_extrapolation():
    df = theta_frame()
    mid = float(df[(df["layer"] == 0) & (df["head"] == 0) & (df["bin"] == 2)]["length"].iloc[0])
    cells = figures.theta_at_length(df, mid)
    assert len(cells) == 12 and set(cells.columns) == {"layer", "head", "theta", "extrapolated"}
    exact = df[(df["layer"] == 0) & (df["head"] == 0) & (df["bin"] == 2)]["theta"].iloc[0]
    assert cells.iloc[0]["theta"] == pytest.approx(exact)
    assert not cells["extrapolated"].any()
    assert figures.theta_at_length(df, 10_000)["extrapolated"].all()


def test_theta_grid_is_square_scatter_with_layer_head_customdata():
    cells = figures.theta_at_length(theta_frame(), 60)
    fig = figures.theta_grid(cells, 60)
    (main,) = fig.data  # one trace, independent of the chosen head: a head change does not redraw the grid
    assert main.type == "scatter" and main.marker.symbol == "square"
    assert [list(x) for x in main.customdata][:3] == [[0, 0], [0, 1], [0, 2]]
    assert list(main.marker.color) == list(cells["theta"])
    assert fig.layout.yaxis.dtick == 1  # a 3-layer grid: whole layers, never Plotly's 0.5 steps
    assert [figures.layer_tick_step(n) for n in (3, 12, 13, 30, 64, 80)] == [1, 1, 2, 5, 5, None]
    assert fig.layout.yaxis.autorange == "reversed"


def test_theta_vs_length_overlay_and_empty():
    df = theta_frame()
    fig = figures.theta_vs_length(df, 1, [0, 2], overlay=theta_frame(seed=1), names=("a", "b"))
    assert [t.name for t in fig.data] == ["a · head 0", "a · head 2", "b · head 0", "b · head 2"]
    assert fig.data[2].line.dash == "dash"
    empty = figures.theta_vs_length(df, 7, [0])
    assert not empty.data and "no calibrated rows" in empty.layout.annotations[0].text


def test_with_sigma_recomputes_theta():
    df = theta_frame()
    out = figures.with_sigma(df, 2.0)
    assert np.allclose(out["theta"], df["t_mean"] + 2 * df["t_std"])
    assert figures.with_sigma(df, None) is df


def test_histogram_overlays_two_runs():
    fig = figures.theta_histogram(theta_frame(), 0, theta_frame(seed=3), names=("x", "y"))
    assert [t.name for t in fig.data] == ["x", "y"] and fig.layout.barmode == "overlay"


def test_attention_maps_grey_dropped_and_blank_future():
    n, H = 6, 2
    vis = np.tril(np.ones((n, n), dtype=np.float32))
    dense = np.tile(vis / vis.sum(-1, keepdims=True), (H, 1, 1))
    kept = np.tile(np.eye(n, dtype=np.float32), (H, 1, 1))
    fig = figures.attention_maps(dense, dense * kept, kept, vis, head=1)
    z_sparse, z_dense = (np.array(t.z, dtype=float) for t in fig.data)
    assert np.isnan(z_dense[0, 5]) and np.isnan(z_sparse[0, 5])  # future: blank on both sides
    assert z_sparse[5, 0] == fig.data[0].zmin == -7.0  # visible but dropped: the grey band below the colours
    assert fig.data[0].colorscale[0][1] == "#d9d9d9"
    assert z_sparse[5, 5] == pytest.approx(np.log10(1 / 6), rel=1e-5)
    assert z_dense[5, 0] == pytest.approx(np.log10(1 / 6), rel=1e-5)
    assert "kept" in fig.layout.annotations[0].text
    # single tokens: kept or dropped is the colour, so no per-cell customdata is sent; pooled cells carry their share
    assert fig.data[0].customdata is None and "dropped" in fig.data[0].hovertemplate
    pooled = figures.attention_maps(dense, dense * kept, kept * 0.5, vis, head=1, pool=2)
    assert np.array(pooled.data[0].customdata, dtype=float)[5, 5] == 0.5
    assert "kept %{customdata" in pooled.data[0].hovertemplate


def test_large_attention_maps_are_images_with_the_heatmap_colours():
    """Maps beyond IMAGE_CELLS cells a side are RGB images coloured server-side: future cells
    white, dropped cells grey, kept cells the colour of log10 w (the heatmaps' scale)."""
    n = figures.IMAGE_CELLS + 4
    vis = np.tril(np.ones((n, n), dtype=np.float32))
    dense = (vis / vis.sum(-1, keepdims=True))[None]
    kept = np.eye(n, dtype=np.float32)[None]
    img_s, img_d, _ = figures.attention_map_images(dense, dense * kept, kept, vis, head=0)
    assert img_s.shape == img_d.shape == (n, n, 3) and img_s.dtype == np.uint8
    assert tuple(img_s[0, 5]) == tuple(img_d[0, 5]) == (255, 255, 255)  # future: blank
    assert tuple(img_s[5, 0]) == (0xd9, 0xd9, 0xd9)  # visible but dropped: grey
    expect = figures.colour_map(np.array([[np.log10(1 / 6)]]), -6.0, 0.0)[0, 0]
    assert tuple(img_s[5, 5]) == tuple(expect) and tuple(img_d[5, 0]) == tuple(expect)
    assert tuple(figures.colour_map(np.array([[0.0]]), -6.0, 0.0)[0, 0]) == (0xfd, 0xe7, 0x25)  # top of Viridis


def test_map_images_upscale_and_legend():
    """The Sparsity page's image maps: the same colours as the chart's images, enlarged without blending."""
    n = figures.IMAGE_CELLS + 4
    vis = np.tril(np.ones((n, n), dtype=np.float32))
    dense = (vis / vis.sum(-1, keepdims=True))[None]
    kept = np.eye(n, dtype=np.float32)[None]
    img_s, img_d, share = figures.attention_map_images(dense, dense * kept, kept, vis, head=0)
    assert share == pytest.approx(n / vis.sum())  # the diagonal of the visible triangle
    big = figures.upscale(img_s, 3)
    assert big.shape == (3 * n, 3 * n, 3) and (big[3:6, 0:3] == img_s[1, 0]).all() and (big[::3, ::3] == img_s).all()
    legend = figures.colour_legend(width=50, height=4)
    assert legend.shape == (4, 50, 3)
    assert tuple(legend[0, 0]) == tuple(figures.colour_map(np.array([[figures.MAP_FLOOR]]), figures.MAP_FLOOR, 0)[0, 0])
    assert tuple(legend[2, -1]) == (0xfd, 0xe7, 0x25)  # top of Viridis at log10 w = 0


def test_layer_head_and_kv_heatmaps():
    m = metrics_frame()
    fig = figures.layer_head_heatmap(m)
    assert np.array(fig.data[0].z).shape == (2, 4)
    assert np.array(fig.data[0].z)[0, 3] == pytest.approx(0.13)
    kv = figures.kv_rows_frame(m)
    assert list(kv["kept_v_frac"]) == [0.3] * 4
    assert np.array(figures.kv_rows_heatmap(m).data[0].z).shape == (2, 2)
    assert not figures.layer_head_heatmap(m, phase="nope").data


def test_popularity_and_decode_strip():
    pop = pd.DataFrame({"layer": [0, 0, 0, 1], "position": [0, 1, 2, 0], "count": [5, 3, 1, 2]})
    fig = figures.popularity_bar(pop, 0, ["a", "b", "c"])
    assert list(fig.data[0].y) == [5, 3, 1] and list(fig.data[0].hovertext) == ["a", "b", "c"]
    dec = pd.DataFrame({"layer": [0, 0, 1, 1], "step": [0, 1, 0, 1], "kept_v_rows": [1, 2, 3, 4],
                        "kv_rows": [10, 10, 10, 10]})
    dec["kept_v_frac"] = dec["kept_v_rows"] / dec["kv_rows"]
    strip = figures.decode_strip(dec, ["x", "y"])
    assert list(strip.data[0].x) == ["0: 'x'", "1: 'y'"]
    assert not figures.decode_strip(dec.iloc[:0]).data


def test_compare_chart_marks_divergence():
    steps = pd.DataFrame({"step": [0, 1, 2], "kl": [0.0, 0.1, 0.5], "diverged": [False, False, True],
                          "dense_tok_s": [5, 6, 7], "sparse_tok_s": [4, 5, 6], "kept_v_rows": [np.nan, 0.3, 0.2]})
    fig = figures.compare_steps_chart(steps)
    assert len(fig.data) == 4
    assert any(s.x0 == 2 for s in fig.layout.shapes)


def test_variant_delta_and_tradeoff_charts_colour_losses_red_whatever_the_metric():
    from explorer_ui import evaluation_view as view

    table = pd.DataFrame({"variant": ["a", "b", "a", "b"], "metric": ["acc", "acc", "ppl", "ppl"],
                          "dense": [0.5, 0.5, 10.0, 10.0], "Top-θ": [0.45, 0.55, 10.5, 9.5],
                          "Δ": [-0.05, 0.05, 0.5, -0.5], "ci_low": [-0.08, 0.01, 0.3, -0.7],
                          "ci_high": [-0.02, 0.09, 0.7, -0.3], "n": [20] * 4})
    table["worse"] = [view.is_worse(m, d) for m, d in zip(table["metric"], table["Δ"])]
    assert list(table["worse"]) == [True, False, True, False]  # a perplexity increase is a loss
    fig = figures.variant_delta_chart(table)
    acc, ppl = fig.data
    assert (acc.xaxis, ppl.xaxis) == ("x", "x2") and (acc.yaxis, ppl.yaxis) == ("y", "y2")  # one axis per metric
    assert list(acc.marker.color) == [figures.WORSE, figures.BETTER]
    assert list(ppl.marker.color) == [figures.WORSE, figures.BETTER]
    assert list(acc.error_y.array) == pytest.approx([0.03, 0.04])
    assert [a.text for a in fig.layout.annotations] == ["Δ acc", "Δ ppl"]
    res = pd.DataFrame({"task": ["arc"], "metric": ["ppl"], "delta": [0.4], "ci_low": [0.1], "ci_high": [0.7],
                        "kept_attention": [0.2], "config": ["top-theta k=64"]})
    trade = figures.tradeoff_chart(res, metric="ppl")
    assert list(trade.data[0].text) == ["top-theta k=64"] and list(trade.data[0].marker.color) == [figures.WORSE]
    assert "Δ ppl" in trade.layout.title.text
    assert not figures.tradeoff_chart(pd.DataFrame()).data


def test_variant_matrix_and_notes():
    from explorer_ui import evaluation_view as view
    from topθ_core.config import ConfigError, KSchedule, SparseConfig

    base = SparseConfig(k=KSchedule(64, {0: 512}))
    configs, refused = view.variant_configs(base, ["none", "exact", "offline"], [True, False], view.parse_k_list("32,64"))
    assert configs[0] == base and len(configs) == 10 and len(set(configs)) == 10
    assert len(refused) == 2 and all("sdc=none, vmc=on" in r for r in refused)  # VMC without SDC does nothing
    assert {c.k.overrides for c in configs} == {((0, 512),)}  # per-layer k kept
    assert view.short_labels(configs[:2]) == ["sdc=exact · vmc=on · k=64", "sdc=none · vmc=off · k=32"]
    with pytest.raises(ConfigError, match="not an integer"):
        view.parse_k_list("32,x")
    table = pd.DataFrame({"n": [3], "kept attention": [0.9], "metric": ["acc"]})
    notes = view.thin_notes(table, 64, 31.5)
    assert len(notes) == 2 and "Only 3 items" in notes[0] and "90%" in notes[1] and "32 tokens" in notes[1]
    est = view.estimate(20, 4000, 20, 2, {"dense": 100.0, "sparse": 400.0})
    assert est.seconds == pytest.approx(2 * 4000 / 400.0) and "dense cached" in est.text("items")
    assert view.estimate(20, 4000, 0, 1, None).seconds is None


def test_k_schedule_bar_and_kernel_chart():
    t = analysis.k_table(4, 64, True)
    assert list(figures.k_schedule_bar(t).data[0].y) == [512, 512, 64, 64]
    df = pd.DataFrame({"n": [1, 2, 1, 2], "ms": [1.0, 2.0, 0.5, 1.0], "variant": ["a", "a", "b", "b"]})
    fig = figures.kernel_speed_chart(df, "n", "ms", "variant")
    assert [t.name for t in fig.data] == ["a", "b"]


# ---------------------------------------------------------------------------- uploads
@pytest.mark.parametrize("name,data,problem", [
    ("a.txt", b"", "empty"),
    ("a.pdf", b"%PDF", "unsupported file type"),
    ("a.jsonl", b'{"text": "ok"}\n{not json}\n', "line 2 is not valid JSON"),
    ("a.jsonl", b'{"body": "x"}\n', "no field 'text'"),
    ("a.csv", b"title\nx\n", "no column 'text'"),
    ("a.txt", b"\xff\xfe\x00bad", "not valid UTF-8"),
    ("a.parquet", b"PAR1garbage", "not a readable Parquet"),
    ("a.txt", b"\n\n  \n", "no usable text"),
])
def test_upload_errors_name_the_problem(name, data, problem):
    with pytest.raises(uploads.UploadError) as e:
        uploads.parse_upload(name, data)
    assert problem in str(e.value) and name in str(e.value)


def test_upload_size_limit():
    with pytest.raises(uploads.UploadError, match="over the"):
        uploads.parse_upload("big.txt", b"x" * 2000, max_bytes=1000)


def test_upload_formats():
    assert uploads.parse_upload("a.txt", b"one doc\n\nsecond doc").texts == ("one doc", "second doc")
    assert uploads.parse_upload("a.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n').texts == ("a", "b")
    assert uploads.parse_upload("a.csv", b"text,x\nhello,1\nworld,2\n").texts == ("hello", "world")
    buf = io.BytesIO()
    pd.DataFrame({"text": ["p", "q"]}).to_parquet(buf)
    up = uploads.parse_upload("a.parquet", buf.getvalue())
    assert up.texts == ("p", "q") and "2 documents" in up.describe()


# ---------------------------------------------------------------------------- runs
def test_run_names():
    assert runs.validate_run_name(" ok-1.x ") == "ok-1.x"
    for bad in ("", "../x", "a b", ".hidden", "-x", "x" * 81):
        with pytest.raises(ValueError):
            runs.validate_run_name(bad)
    name = runs.default_run_name("corpus:pydoc", 64, now=0)
    assert name.startswith("corpus-pydoc-k64-") and runs.validate_run_name(name)


def test_calibration_cancel_and_failure_leave_nothing(tiny, tmp_path):
    from topθ_core.calibration import CalibrationCancelled, calibrate
    from topθ_core.config import CalibrationConfig, KSchedule

    texts = analysis.bundled_texts("corpus", "pydoc", 2)
    cfg = CalibrationConfig(k=KSchedule(16))
    with pytest.raises(CalibrationCancelled):
        calibrate(tiny, texts, cfg, max_length=64, should_stop=lambda: True)
    th = calibrate(tiny, texts, cfg, max_length=64, data_description="pydoc")
    path = runs.save_run(th, "r1", root=tmp_path, app_defaults={"sdc": "offline", "vmc": True})
    with pytest.raises(FileExistsError):
        runs.save_run(th, "r1", root=tmp_path)
    listed = runs.list_runs(tmp_path)
    assert list(listed["name"]) == ["r1"] and listed.iloc[0]["k"] == "k=16"
    assert runs.unique_run_name("r1", tmp_path) == "r1-2"
    (tmp_path / ".r2.tmp-abc").mkdir()  # a temporary folder of an unfinished save is never listed
    assert list(runs.list_runs(tmp_path)["name"]) == ["r1"]
    lines = runs.provenance_lines(json.loads((path / "meta.json").read_text()))
    assert any("data: pydoc" in x for x in lines) and any("sdc=offline" in x for x in lines)
    assert analysis.default_sparse_config(th).sdc.value == "offline"


def _config_controls_script():
    import os

    import streamlit as st

    from explorer_ui.controls import sparse_config_controls
    from topθ_core.thresholds import load_thresholds

    config, err = sparse_config_controls("t", load_thresholds(os.environ["TOPTHETA_TEST_RUN"]))
    st.session_state["result"] = (config.to_dict() if config is not None else None, err)


def test_config_controls_keep_the_runs_per_head_k(tiny, tmp_path, monkeypatch):
    """Top-θ on a run calibrated with per-head k uses that k per head (as the CLI and
    ``default_sparse_config`` do): θ of a head was calibrated on the rows longer than its own k."""
    from streamlit.testing.v1 import AppTest

    from topθ_core.calibration import calibrate
    from topθ_core.config import CalibrationConfig, KSchedule

    sched = KSchedule(16, {0: 24}, {(1, 0): 8, (1, 1): 32})
    th = calibrate(tiny, analysis.bundled_texts("corpus", "pydoc", 2), CalibrationConfig(k=sched), max_length=64)
    monkeypatch.setenv("TOPTHETA_TEST_RUN", str(runs.save_run(th, "headk", root=tmp_path)))
    at = AppTest.from_function(_config_controls_script, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    config, err = at.session_state["result"]
    assert err is None and config["selection"] == "top-theta"
    assert KSchedule.from_dict(config["k"]) == sched
    assert analysis.default_sparse_config(th).k == sched


# ---------------------------------------------------------------------------- analysis
def test_k_table_round_trip():
    t = analysis.k_table(5, 32, near_dense=True)
    assert list(t["k"]) == [512, 512, 32, 32, 32]
    s = analysis.k_schedule_from_table(t, 32)
    assert s.default == 32 and dict(s.overrides) == {0: 512, 1: 512}
    t.loc[3, "k"] = 8
    assert dict(analysis.k_schedule_from_table(t, 32).overrides) == {0: 512, 1: 512, 3: 8}


def test_bundled_sources_and_texts():
    src = analysis.bundled_sources()
    assert "pydoc" in src["corpus"] and "mc:arc_easy" in src["task"] and "gen:gsm8k" in src["task"]
    mc = analysis.bundled_texts("task", "mc:arc_easy", 2)
    assert len(mc) == 2 and all(isinstance(t, str) and t for t in mc)
    assert len(analysis.bundled_texts("corpus", "pydoc", 3)) == 3


def test_sparsity_snapshot_pools_long_prompts_and_keeps_every_layer(tiny):
    from topθ_core.config import KSchedule, SparseConfig

    cfg = SparseConfig(selection="top-k", sdc="exact", vmc=True, k=KSchedule(8))
    snap = analysis.sparsity_snapshot(tiny, "word " * 300, cfg, None, max_tokens=300, decode_steps=3, map_cap=100)
    assert snap.n_tokens == 300 and snap.pool == 3 and snap.n_layers == 3
    assert snap.dense.shape == (3, 4, 100, 100) and snap.visible.shape == (100, 100)
    for layer in range(3):
        dense, sparse, kept = snap.layer_maps(layer)
        assert np.allclose(dense.sum(-1), 1.0, atol=3e-3)  # pooled rows keep their mass (float16 storage)
        assert 0 < kept.mean() < 1 and kept.max() <= 1.0
    assert not np.array_equal(snap.dense[0], snap.dense[1])  # each layer its own maps
    assert len(snap.cell_tokens()) == 100 and "".join(snap.cell_tokens()) == "".join(snap.tokens)
    assert len(snap.generated) == 3 and set(snap.decode["step"]) == {0, 1, 2}
    assert set(snap.popularity["layer"]) == {0, 1, 2}
    with pytest.raises(ValueError):
        analysis.sparsity_snapshot(tiny, "", cfg, None)


def test_sparsity_maps_match_the_reference_weights(tiny):
    """Unpooled, a layer's map is the reference attention's own dense softmax and applied weights."""
    from topθ_core.attention import RowBlock
    from topθ_core.config import KSchedule, SparseConfig
    from topθ_core.integration import sparse_run

    cfg = SparseConfig(selection="top-k", sdc="exact", vmc=True, k=KSchedule(4))
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    snap = analysis.sparsity_snapshot(tiny, text, cfg, None, max_tokens=64, decode_steps=0)
    seen: dict[int, RowBlock] = {}
    ids = tiny.tokenizer(text, return_tensors="pt").input_ids[:, :64]
    with torch.inference_mode(), sparse_run(cfg, None, model=tiny.model, observers=(lambda l, b: seen.setdefault(l, b),)):
        tiny.model(input_ids=ids, use_cache=False)
    for layer, block in seen.items():
        dense, sparse, kept = snap.layer_maps(layer)
        np.testing.assert_allclose(sparse, block.probs[0].float().numpy(), atol=2e-3)
        np.testing.assert_array_equal(kept > 0.5, block.kept[0].numpy())
        assert snap.pool == 1 and len(snap.cell_tokens()) == ids.shape[1]


def test_sparsity_prefill_then_decode_matches_one_call(tiny):
    """The page draws the prefill, then runs the decode steps from the returned continuation: same
    result as one call, and the decode steps run under the prefill's sparse run (outside any run
    here, the decode metrics would be empty)."""
    from topθ_core.config import KSchedule, SparseConfig
    from topθ_core.integration import active_run

    cfg = SparseConfig(selection="top-k", sdc="exact", vmc=True, k=KSchedule(8))
    text = "alpha beta gamma delta " * 20
    one = analysis.sparsity_snapshot(tiny, text, cfg, None, max_tokens=64, decode_steps=4)
    pre, cont = analysis.sparsity_prefill(tiny, text, cfg, None, max_tokens=64, keep_cache=True)
    assert active_run() is None and pre.decode.empty and pre.generated == []
    assert set(pre.metrics["phase"]) == {"prefill"}
    two = analysis.sparsity_decode(tiny, pre, cont, 4)
    assert active_run() is None
    assert two.generated == one.generated and len(two.generated) == 4
    pd.testing.assert_frame_equal(two.decode, one.decode)
    cols = ["phase", "layer", "head", "kept", "visible"]
    pd.testing.assert_frame_equal(two.metrics[cols].reset_index(drop=True), one.metrics[cols].reset_index(drop=True))
    assert np.array_equal(two.kept, one.kept) and two.seconds == pre.seconds and two.decode_seconds > 0
    _, none = analysis.sparsity_prefill(tiny, text, cfg, None, max_tokens=64)
    assert none is None


# ---------------------------------------------------------------------------- render, bench results, keys
def test_tokens_html_escapes_and_marks_divergence():
    steps = [{"step": 0, "dense_text": "<a>", "sparse_text": "<a>", "kl": 0.0, "diverged": False},
             {"step": 1, "dense_text": " x", "sparse_text": " y", "kl": 2.0, "diverged": True},
             {"step": 2, "dense_text": " z", "sparse_text": " z", "kl": float("nan"), "diverged": True}]
    df = render.steps_frame(steps)
    html = render.tokens_html(df, "sparse")
    assert "&lt;a&gt;" in html and "<a>" not in html
    assert html.count("tt-first-divergence") == 1 and 'data-step="1"' in html
    assert render.first_divergent_step(df) == 1
    assert render.kl_color(None) == "rgba(0,0,0,0)" and render.kl_color(5.0).endswith("0.80)")


def test_bench_results(tmp_path):
    pd.DataFrame({"n": [1, 2], "ms": [0.1, 0.2], "card": ["NVIDIA H100", "NVIDIA H100"]}).to_csv(tmp_path / "a.csv")
    (tmp_path / "b.md").write_text("# hi")
    (tmp_path / "c.json").write_text("{broken")
    files = {f.path.name: f for f in bench_results.list_results(tmp_path)}
    assert files["a.csv"].cards == ["NVIDIA H100"] and files["b.md"].text == "# hi"
    assert "cannot be read" in files["c.json"].error


def test_session_keys_are_unique():
    values = [v for k, v in vars(K).items() if k.isupper() and isinstance(v, str)]
    assert len(values) == len(set(values))
    assert K.config_keys("acc")["sdc"] == K.ACC_SDC


@pytest.mark.parametrize("state,expected", [
    (None, None),
    ({"selection": {"points": []}}, None),
    ({"selection": {"points": [{"x": 3, "y": 2, "customdata": [2, 3]}]}}, (2, 3)),
    ({"selection": {"points": [{"x": 3, "y": 2, "customdata": {"0": 2, "1": 3}}]}}, (2, 3)),
    ({"selection": {"points": [{"x": 3, "y": 2}]}}, (2, 3)),
    ({"selection": {"points": [{"customdata": "junk"}]}}, None),
])
def test_grid_click(state, expected):
    assert analysis.grid_click(state) == expected


def test_kl_scale():
    df = render.steps_frame([{"step": 0, "kl": 0.001}, {"step": 1, "kl": float("nan")}, {"step": 2, "kl": 0.3}])
    assert render.kl_scale(df) == pytest.approx(0.3)
    assert render.kl_scale(df.iloc[:1]) == 0.05
    assert render.kl_scale(render.steps_frame([])) == 0.05


def test_bench_default_axes():
    df = pd.DataFrame({"card": ["H200"] * 2, "kernel": ["decode", "prefill"], "N": [1, 2], "f_kept_v": [0.3, 0.1],
                       "speedup": [1.2, 1.5]})
    assert bench_results.default_axes(df) == ("f_kept_v", "speedup", "kernel")
