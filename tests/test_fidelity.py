"""Fidelity options (issue 7) against independent references.

Always-kept positions (sink / recent), θ smoothing, the fitted θ(L) = a + b·ln L lookup,
SDC terms calibrated under Top-θ, and the kernel-compatibility gate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from topθ_core.attention import RowBlock, causal_visible, topθ_attention_ref
from topθ_core.calibration import ThetaDroppedMass, calibrate, calibrate_sdc_under_theta
from topθ_core.config import (SDC, CalibrationConfig, ConfigError, EmptyRowFloor, KSchedule, Lookup, Placement,
                              SdcSource, Selection, SparseConfig)
from topθ_core.selection import always_kept
from topθ_core.thresholds import load_thresholds
from topθ_core.fingerprint import ModelFingerprint
from topθ_core.statistics import ThresholdStats
from topθ_core.lookup import fit_log_length, smooth_bins

FP = ModelFingerprint(name="m", digest="d" * 64, n_layers=2, n_heads=3, n_kv_heads=3, head_dim=8)


# --------------------------------------------------------------------------- config
def test_new_options_validate_serialise_label_and_gate_kernels():
    cfg = SparseConfig(sink_tokens=1, recent_tokens=2, theta_smoothing=3, lookup=Lookup.FIT_LOG)
    assert SparseConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.label().endswith("fit-log smooth=3 sink=1 recent=2")
    assert not cfg.kernel_compatible
    assert SparseConfig().kernel_compatible  # defaults are the kernels' semantics
    assert SparseConfig(theta_smoothing=2, lookup=Lookup.FIT_LOG).kernel_compatible  # θ values only
    old = SparseConfig().to_dict()
    for key in ("sink_tokens", "recent_tokens", "theta_smoothing"):
        old.pop(key)
    assert SparseConfig.from_dict(old) == SparseConfig()  # dicts written before these options still load
    with pytest.raises(ConfigError, match="sink_tokens"):
        SparseConfig(sink_tokens=-1)
    with pytest.raises(ConfigError, match="top-theta selection only"):
        SparseConfig(selection=Selection.TOP_K, sdc=SDC.NONE, vmc=False, recent_tokens=1)
    cc = CalibrationConfig(sdc_source="theta")
    assert cc.sdc_source is SdcSource.THETA and CalibrationConfig.from_dict(cc.to_dict()) == cc
    d = cc.to_dict()
    d.pop("sdc_source")
    assert CalibrationConfig.from_dict(d).sdc_source is SdcSource.TOP_K
    with pytest.raises(ConfigError, match="post-softmax"):
        CalibrationConfig(sdc_source="theta", placement="post")


# --------------------------------------------------------------------------- always-kept positions
def _always_kept_loop(visible: np.ndarray, sink: int, recent: int) -> np.ndarray:
    out = np.zeros_like(visible)
    for idx in np.ndindex(visible.shape[:-1]):
        pos = np.nonzero(visible[idx])[0]
        out[idx + (pos[:sink],)] = True
        if recent:
            out[idx + (pos[-recent:],)] = True
    return out


@pytest.mark.parametrize("sink,recent", [(0, 1), (1, 0), (1, 1), (3, 4)])
def test_always_kept_counts_visible_keys_only(sink, recent):
    torch.manual_seed(0)
    vis = causal_visible(9, 13, batch=2).clone()
    vis[1, :, :3] = False  # left padding in the second sequence
    vis[0, 4, 6] = False  # a hole (e.g. a custom mask)
    got = always_kept(vis.unsqueeze(1), sink, recent)[:, 0]
    np.testing.assert_array_equal(got.numpy(), _always_kept_loop(vis.numpy(), sink, recent))


def _ref_sink_attention(q, k, v, theta, c, k_keep, sink, recent):
    """float64 hand computation of pre-softmax Top-θ with offline SDC, VMC, floor=max and kept positions."""
    B, H, S, d = q.shape
    out = np.zeros((B, H, S, d))
    for b in range(B):
        for h in range(H):
            for i in range(S):
                L = i + 1
                a = q[b, h, i] @ k[b, h, :L].T / np.sqrt(d)
                m = a.max()
                e = np.exp(a - m)
                if L <= k_keep:
                    out[b, h, i] = e @ v[b, h, :L] / e.sum()
                    continue
                keep = a > theta[b, h, i]
                if not keep.any():
                    keep[np.argmax(a)] = True
                keep[:sink] = True
                if recent:
                    keep[L - recent:] = True
                d_u = c[b, h, i] if (~keep).any() else 0.0
                p = np.where(keep, e, 0.0) / (e[keep].sum() + d_u)
                out[b, h, i] = p @ v[b, h, :L] + (1 - p.sum()) * v[b, h, :L].mean(0)
    return out


def test_sink_and_diagonal_attention_matches_float64_reference():
    torch.manual_seed(1)
    B, H, S, d, kk = 2, 2, 23, 16, 4
    q, k, v = (torch.randn(B, H, S, d, dtype=torch.float64) for _ in range(3))
    theta = torch.randn(B, H, S, dtype=torch.float64) + 1.5  # high: many rows keep only the floor + positions
    c = torch.rand(B, H, S, dtype=torch.float64)
    cfg = SparseConfig(k=KSchedule(kk), sdc=SDC.OFFLINE, sink_tokens=1, recent_tokens=2)
    got = topθ_attention_ref(q, k, v, config=cfg, k_keep=kk, theta=theta, sdc_term=c)
    ref = _ref_sink_attention(q.numpy(), k.numpy(), v.numpy(), theta.numpy(), c.numpy(), kk, 1, 2)
    err = np.abs(got.numpy() - ref).max()
    print(f"max abs error vs float64 reference: {err:.3e}")
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10)


# --------------------------------------------------------------------------- θ over lengths
def test_fit_log_length_matches_weighted_least_squares():
    rng = np.random.default_rng(0)
    w_bin = 16
    theta = torch.full((2, 3, 10), float("nan"), dtype=torch.float64)
    count = torch.zeros(2, 3, 10, dtype=torch.float64)
    cal = [2, 3, 5, 8]
    centre = np.arange(10) * w_bin + (w_bin + 1) / 2
    for l in range(2):
        for h in range(3):
            n = rng.integers(1, 50, size=len(cal)).astype(float)
            y = rng.normal(size=len(cal)) + 0.7 * np.log(centre[cal])
            theta[l, h, cal] = torch.from_numpy(y)
            count[l, h, cal] = torch.from_numpy(n)
    theta[1, 2] = float("nan")
    count[1, 2] = 0  # a head never calibrated
    theta[1, 1, :] = float("nan")
    count[1, 1, :] = 0
    theta[1, 1, 4], count[1, 1, 4] = 2.5, 7  # one bin only: flat fit
    a, b = fit_log_length(theta, count, w_bin)
    for l in range(2):
        for h in range(3):
            c = count[l, h].numpy() > 0
            if c.sum() < 2:
                continue
            X = np.stack([np.ones(c.sum()), np.log(centre[c])], 1)
            W = np.diag(count[l, h].numpy()[c])
            coef = np.linalg.solve(X.T @ W @ X, X.T @ W @ theta[l, h].numpy()[c])
            np.testing.assert_allclose([a[l, h].item(), b[l, h].item()], coef, rtol=1e-5, atol=1e-5)
    assert b[1, 1].item() == 0.0 and a[1, 1].item() == pytest.approx(2.5)
    assert np.isnan(a[1, 2].item())


def test_fit_log_lookup_extrapolates_in_log_length_and_flags_it():
    stats = ThresholdStats(1, 1, bin_width=8)
    a, b = 0.3, 1.2
    L = torch.arange(9, 100)
    centres = ((L - 1) // 8) * 8 + 4.5
    t = (a + b * torch.log(centres.double())).view(-1, 1)  # samples exactly on the curve at bin centres
    stats.add(0, L, t, torch.zeros_like(t))
    th = stats.finalize(0.0, fingerprint=FP, k=KSchedule(8), placement=Placement.PRE)
    rows = torch.tensor([[20, 64, 500, 2000]])
    theta, _, extrap = th.lookup(0, rows, Lookup.FIT_LOG)
    np.testing.assert_allclose(theta[0, 0].numpy(), a + b * np.log(rows[0].numpy()), rtol=1e-5)
    assert extrap[0, 0].tolist() == [False, False, True, True]
    flat, _, _ = th.lookup(0, rows, Lookup.INTERPOLATE)
    assert flat[0, 0, 2] == flat[0, 0, 3]  # interpolation is flat beyond the calibrated range


def test_smooth_bins_is_a_count_weighted_moving_average():
    rng = np.random.default_rng(3)
    theta = torch.from_numpy(rng.normal(size=(2, 2, 12)))
    sdc = torch.from_numpy(rng.random((2, 2, 12)))
    count = torch.from_numpy(rng.integers(0, 5, size=(2, 2, 12)).astype(float))
    theta = torch.where(count > 0, theta, torch.full_like(theta, float("nan")))
    th_s, sd_s = smooth_bins(theta, sdc, count, 2)
    for idx in np.ndindex(2, 2):
        n, t, s = count[idx].numpy(), np.nan_to_num(theta[idx].numpy()), sdc[idx].numpy()
        for bb in range(12):
            if n[bb] == 0:
                assert np.isnan(th_s[idx][bb].item())
                continue
            win = slice(max(0, bb - 2), bb + 3)
            assert th_s[idx][bb].item() == pytest.approx((n[win] * t[win]).sum() / n[win].sum())
            assert sd_s[idx][bb].item() == pytest.approx((n[win] * s[win]).sum() / n[win].sum())


# --------------------------------------------------------------------------- SDC under θ
def test_dropped_mass_observer_records_what_top_theta_dropped():
    torch.manual_seed(0)
    B, H, R, N, k = 1, 3, 10, 10, 3
    vis = torch.ones(R, N, dtype=torch.bool).tril().view(1, 1, R, N)
    logits = torch.randn(B, H, R, N, dtype=torch.float64).masked_fill(~vis, float("-inf"))
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    kept = (logits > 0.3) & vis
    block = RowBlock(row_start=0, logits=logits, visible=vis, row_len=vis.sum(-1), kept=kept, probs=e,
                     dense_rows=vis.sum(-1) <= k, empty_rows=torch.zeros(B, H, R, dtype=torch.bool), n_kv_heads=H,
                     k=k, q_len=R, kv_len=N, exp_scores=e)
    stats = ThresholdStats(1, H, bin_width=1)
    ThetaDroppedMass(stats)(0, block)
    lg, kp = logits.numpy(), kept.numpy()
    for L in range(1, N + 1):
        i = L - 1
        for h in range(H):
            if L <= k:
                assert stats.count[0, h, i] == 0
                continue
            row = lg[0, h, i, :L]
            expect = np.exp(row - row.max())[~kp[0, h, i, :L]].sum()
            assert stats.count[0, h, i] == 1
            assert stats.du_sum[0, h, i].item() == pytest.approx(expect)


def test_calibrate_with_sdc_source_theta_replaces_only_sdc_terms(tiny_lm, tmp_path):
    docs = [torch.randint(3, 250, (40,)) for _ in range(3)]
    cfg = CalibrationConfig(k=KSchedule(6), bin_width=4, sigma=0.0)
    th = calibrate(tiny_lm, docs, cfg)
    th2 = calibrate(tiny_lm, docs, CalibrationConfig(k=KSchedule(6), bin_width=4, sigma=0.0, sdc_source="theta"))
    assert torch.equal(th.t_mean, th2.t_mean) and torch.equal(th.count, th2.count)
    assert th2.sdc_source == "theta" and th.sdc_source == "top-k"
    # the same as running the second pass by hand
    th3 = calibrate_sdc_under_theta(tiny_lm, docs, th)
    torch.testing.assert_close(th3.sdc_mean, th2.sdc_mean)
    assert not torch.equal(th2.sdc_mean, th.sdc_mean)
    # Top-θ at σ=0 drops more than top-k on some rows and less on others, but never a negative mass
    assert (th2.sdc_mean >= 0).all()
    back = load_thresholds(th2.save(tmp_path / "th"))
    assert back.sdc_source == "theta"
    torch.testing.assert_close(back.sdc_mean, th2.sdc_mean)
    meta = json.loads((tmp_path / "th" / "meta.json").read_text())
    assert meta["sdc_pass_config"]["selection"] == "top-theta"


def test_sparse_run_with_new_options_on_tiny_model(tiny_lm):
    docs = [torch.randint(3, 250, (48,)) for _ in range(2)]
    th = calibrate(tiny_lm, docs, CalibrationConfig(k=KSchedule(8), bin_width=4))
    from topθ_core.integration import sparse_run
    from topθ_core.metrics import SparsityMetrics, summarize

    x = docs[0].view(1, -1)
    kept = {}
    for name, cfg in {"plain": SparseConfig(k=KSchedule(8)),
                      "sink+diag": SparseConfig(k=KSchedule(8), sink_tokens=1, recent_tokens=1),
                      "fit": SparseConfig(k=KSchedule(8), lookup=Lookup.FIT_LOG, theta_smoothing=1),
                      "nofloor": SparseConfig(k=KSchedule(8), empty_row=EmptyRowFloor.NONE)}.items():
        m = SparsityMetrics()
        with torch.inference_mode(), sparse_run(cfg, th, model=tiny_lm.model, metrics=m):
            out = tiny_lm.model(input_ids=x).logits
        assert torch.isfinite(out).all()
        kept[name] = summarize(m.to_frame())["kept_attention"]
    assert kept["sink+diag"] >= kept["plain"]


def test_dropped_mass_observer_and_metrics_honour_per_head_k():
    """With per-head k a row counts for the heads whose k it exceeds; top-k's reference count is Σ min(L, k_h)."""
    from topθ_core.metrics import SparsityMetrics

    torch.manual_seed(1)
    B, H, R, N = 1, 3, 10, 10
    ks = torch.tensor([2, 7, 4])
    vis = torch.ones(R, N, dtype=torch.bool).tril().view(1, 1, R, N)
    logits = torch.randn(B, H, R, N, dtype=torch.float64).masked_fill(~vis, float("-inf"))
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    kept = (logits > 0.3) & vis
    L = vis.sum(-1)
    block = RowBlock(row_start=0, logits=logits, visible=vis, row_len=L, kept=kept, probs=e,
                     dense_rows=L <= ks.view(1, -1, 1), empty_rows=torch.zeros(B, H, R, dtype=torch.bool),
                     n_kv_heads=H, k=int(ks.min()), q_len=R, kv_len=N, exp_scores=e, k_heads=ks)
    stats = ThresholdStats(1, H, bin_width=1)
    ThetaDroppedMass(stats)(0, block)
    for h, kh in enumerate(ks.tolist()):
        assert stats.count[0, h, :N].tolist() == [0.0] * kh + [1.0] * (N - kh) and stats.count[0, h, N:].sum() == 0
    m = SparsityMetrics()
    m(0, block)
    df = m.to_frame()
    for h, kh in enumerate(ks.tolist()):
        row = df[df["head"] == h].iloc[0]
        assert row["topk_equiv"] == sum(min(l, kh) for l in range(1, N + 1))
        assert row["dense_rows"] == kh
