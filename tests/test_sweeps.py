"""topθ_core.sweeps: grid, corpus split, threshold cache, sweep runner, per-layer k search (tiny model, CPU)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from topθ_core import k_allocation as ka
from topθ_core import sweeps as sw
from topθ_core.tasks import heldout_documents
from topθ_core.config import SDC, CalibrationConfig, KSchedule, Selection, SparseConfig

from test_evaluation import _tiny  # noqa: E402  (tests/ is on sys.path under pytest)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm():
    return _tiny()


def test_sweep_configs_cover_the_grid():
    pts = sw.sweep_configs()
    cfgs = [p.config for p in pts]
    assert len(set(cfgs)) == len(cfgs)
    for k in sw.SWEEP_KS:
        sel = {c.selection for c in cfgs if c.k.default == k}
        assert sel == {Selection.TOP_K, Selection.TOP_THETA}
    v = [c for c in cfgs if c.k.default == 64 and c.selection is Selection.TOP_THETA]
    assert {c.sdc for c in v} == {SDC.NONE, SDC.EXACT, SDC.EXP_THRESHOLD, SDC.OFFLINE}
    assert {c.vmc for c in v} == {True, False} and {c.placement.value for c in v} == {"pre", "post"}
    assert all(c.k.k_for(0) == 512 and c.k.k_for(1) == 512 for c in cfgs)
    for p in pts:  # Top-θ points say how to calibrate, for the same placement and schedule
        if p.config.selection is Selection.TOP_THETA:
            assert p.calibration.placement is p.config.placement and p.calibration.k == p.config.k
        else:
            assert p.calibration is None


def test_split_corpus_halves_are_disjoint_and_packed():
    cal = heldout_documents("pydoc", part="calibration", min_chars=3000)
    held = heldout_documents("pydoc", min_chars=3000)
    assert cal and held and all(len(d) >= 3000 for d in cal + held)
    from topθ_core.tasks import load_corpus

    docs = load_corpus("pydoc")
    even, odd = set(docs[0::2]), set(docs[1::2])
    cal_joined, held_joined = "\x00".join(cal), "\x00".join(held)
    for d in odd - even:
        assert d not in cal_joined or d in held_joined and any(d in e for e in even)
    assert all(any(d in c for c in cal) for d in docs[0:20:2] if len(d) > 0)
    assert len(heldout_documents("lambada", 3, min_chars=2000)) == 3  # short passages get packed
    with pytest.raises(ValueError, match="asked|were asked"):
        heldout_documents("pydoc", 10_000)
    with pytest.raises(ValueError, match="part"):
        heldout_documents("pydoc", part="test")


def test_cached_thresholds_calibrates_once(lm, tmp_path, monkeypatch):
    cal = CalibrationConfig(k=KSchedule(4))
    th = sw.cached_thresholds(lm, "pydoc", cal, n_docs=1, max_tokens=48, min_chars=100, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1

    def boom(*a, **k):
        raise AssertionError("recalibrated although cached")

    monkeypatch.setattr(sw, "calibrate", boom)
    again = sw.cached_thresholds(lm, "pydoc", cal, n_docs=1, max_tokens=48, min_chars=100, cache_dir=tmp_path)
    assert torch.equal(again.count, th.count)
    assert torch.allclose(again.t_mean, th.t_mean)


def test_run_sweep_shares_dense_and_skips_missing_thresholds(lm):
    texts = ["sweeping over a few settings of the sparse attention " * 2, "another short held-out text " * 2]
    pts = [sw.SweepPoint(SparseConfig(selection=Selection.TOP_K, sdc=SDC.NONE, vmc=False, k=KSchedule(k))) for k in (4, 8, 512)]
    pts.append(sw.SweepPoint(SparseConfig(k=KSchedule(4)), CalibrationConfig(k=KSchedule(4))))
    df = sw.run_sweep(lm, pts, texts, max_length=64, thresholds_for=lambda cal: None)
    assert list(df["k"]) == [4, 8, 512]  # the Top-θ point had no thresholds: skipped
    assert df["dense_nll"].nunique() == 1
    big = df[df["k"] == 512].iloc[0]
    assert big["sparse_nll"] == pytest.approx(big["dense_nll"], abs=1e-5) and big["kept_attention"] == 1.0
    assert (df.sort_values("k")["kept_attention"].diff().dropna() > 0).all()  # more k, more kept


# --------------------------------------------------------------------------- per-layer k search
def test_layer_sensitivity_against_hand_computation(lm):
    text = "sensitivity of each layer to top-k " * 2
    sens = ka.layer_sensitivity(lm, [text], candidates=(2, 8, 4096))
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    # hand computation for layer 0 from the dense attention probabilities
    captured = {}

    def hook(module, args, kwargs, out):
        captured["w"] = out[1]

    from topθ_core.config import DENSE
    from topθ_core.integration import sparse_run

    attn0 = lm.model.model.layers[0].self_attn
    probs = []

    def obs(layer, block):
        if layer == 0:
            probs.append(block.probs.double())

    with torch.no_grad(), sparse_run(DENSE, observers=(obs,)):
        lm.model(ids)
    p = probs[0][0]  # (H, N, N)
    top = p.sort(-1, descending=True).values.cumsum(-1)
    want = float((1 - top[..., 1]).clamp_min(0).sum())  # k = 2
    got = sens[(sens.layer == 0) & (sens.k == 2)]["dropped_mass"].iloc[0]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    full = sens[sens.k == 4096]
    assert (full["dropped_mass"].abs() < 1e-9).all() and (full["kept_frac"] == 1.0).all()
    for layer, g in sens.groupby("layer"):
        g = g.sort_values("k")
        assert (g["dropped_mass"].diff().dropna() <= 1e-12).all()  # more k, less dropped


def _synthetic_sens():
    # layer 0 is cheap to sparsify, layer 1 expensive, layer 2 fixed
    rows = []
    for layer, cost in ((0, 1.0), (1, 10.0), (2, 5.0)):
        for k, kept in ((64, 100.0), (32, 60.0), (16, 30.0)):
            rows.append({"layer": layer, "k": k, "dropped_mass": cost * (64 - k), "kept": kept, "visible": 100.0})
    return pd.DataFrame(rows)


def test_greedy_path_prefers_cheap_layers_and_respects_fixed():
    path = ka.greedy_schedule_path(_synthetic_sens(), fixed={2: 64})
    assert path[0]["ks"] == {0: 64, 1: 64, 2: 64}
    assert path[1]["ks"] == {0: 32, 1: 64, 2: 64}  # the cheap layer moves first
    assert path[2]["ks"] == {0: 16, 1: 64, 2: 64}
    assert path[-1]["ks"] == {0: 16, 1: 16, 2: 64}
    assert all(s["ks"][2] == 64 for s in path)
    kept = [s["kept_frac"] for s in path]
    proxy = [s["proxy"] for s in path]
    assert kept == sorted(kept, reverse=True) and proxy == sorted(proxy)


def test_search_layer_k_finds_the_last_schedule_within_budget():
    sens = _synthetic_sens()
    path = ka.greedy_schedule_path(sens)
    # a loss that follows the proxy: the answer is the last path step with proxy ≤ budget
    by_sched = {tuple(sorted(ka.schedule_from_ks(s["ks"]).as_list(3))): s["proxy"] for s in path}

    def loss(cfg):
        return by_sched[tuple(sorted(cfg.k.as_list(3)))]

    for budget in (0.0, 32.0, 48.0, 200.0, 1e9):
        res = ka.search_layer_k(None, loss, budget, sens=sens)
        ok = [i for i, s in enumerate(path) if s["proxy"] <= budget]
        assert res["index"] == max(ok)
        assert res["loss"] <= budget
        assert len(res["evaluations"]) <= math.ceil(math.log2(len(path))) + 1


def test_schedule_from_ks():
    s = ka.schedule_from_ks({0: 512, 1: 512, 2: 32, 3: 32, 4: 16})
    assert s.default == 32 and s.as_list(5) == [512, 512, 32, 32, 16]
