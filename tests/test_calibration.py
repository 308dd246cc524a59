"""Calibration statistics, the threshold artifact, and length lookup."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from topθ_core.attention import RowBlock, topθ_attention_ref
from topθ_core.calibration import CalibrationObserver, calibrate
from topθ_core.row_samples import row_samples_ref
from topθ_core.config import CalibrationConfig, KSchedule, Lookup, Placement, SparseConfig
from topθ_core.thresholds import Thresholds, ThresholdsError, load_thresholds
from topθ_core.fingerprint import ModelFingerprint
from topθ_core.statistics import ThresholdStats

FP = ModelFingerprint(name="m", digest="d" * 64, n_layers=2, n_heads=3, n_kv_heads=3, head_dim=8)


def synthetic_block(logits: torch.Tensor, k: int) -> RowBlock:
    """A RowBlock built from given causal logits (B, H, R, N); only the fields calibration reads matter."""
    B, H, R, N = logits.shape
    vis = torch.ones(R, N, dtype=torch.bool).tril(N - R).view(1, 1, R, N).expand(B, 1, R, N)
    lg = logits.masked_fill(~vis, float("-inf"))
    e = torch.exp(lg - lg.amax(-1, keepdim=True))
    return RowBlock(row_start=0, logits=lg, visible=vis, row_len=vis.sum(-1), kept=vis.expand(B, H, R, N),
                    probs=e, dense_rows=vis.sum(-1) <= k, empty_rows=torch.zeros(B, H, R, dtype=torch.bool),
                    n_kv_heads=H, k=k, q_len=R, kv_len=N)


def test_calibration_recovers_known_kplus1_largest_values():
    """With bin width 1, θ at σ=0 is exactly the mean of each length's (k+1)-th largest visible score."""
    torch.manual_seed(0)
    k, N = 3, 12
    stats = ThresholdStats(2, 3, bin_width=1)
    obs = CalibrationObserver(stats, CalibrationConfig(k=KSchedule(k), bin_width=1, sigma=0.0))
    blocks = [torch.randn(1, 3, N, N, dtype=torch.float64) for _ in range(4)]
    for lg in blocks:
        obs(1, synthetic_block(lg, k))
    th = stats.finalize(0.0, fingerprint=FP, k=KSchedule(k), placement=Placement.PRE)
    for L in range(k + 1, N + 1):
        expected = []
        for lg in blocks:
            row = lg[0, :, L - 1, :L].numpy()  # row with L visible keys
            expected.append(np.sort(row, axis=-1)[:, -(k + 1)])
        exp_mean = np.mean(expected, axis=0)
        np.testing.assert_allclose(th.theta[1, :, L - 1].numpy(), exp_mean, rtol=1e-12)
        assert (th.count[1, :, L - 1] == 4).all()
    assert (th.count[1, :, :k] == 0).all()  # rows with L ≤ k are never sampled
    assert (th.count[0] == 0).all()


def test_theta_is_mean_plus_sigma_population_std():
    stats = ThresholdStats(1, 1, bin_width=4)
    t = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    stats.add(0, torch.tensor([5, 6, 7, 8]), t.view(-1, 1), torch.zeros(4, 1))
    th = stats.finalize(0.5, fingerprint=FP, k=KSchedule(4), placement=Placement.PRE)
    assert th.theta[0, 0, 1].item() == pytest.approx(t.mean().item() + 0.5 * t.std(unbiased=False).item())


def test_merged_statistics_equal_single_pass():
    torch.manual_seed(1)
    cfg = CalibrationConfig(k=KSchedule(2), bin_width=3)
    blocks = [torch.randn(2, 3, 10, 10, dtype=torch.float64) for _ in range(5)]
    one = ThresholdStats(2, 3, 3)
    obs = CalibrationObserver(one, cfg)
    for lg in blocks:
        obs(0, synthetic_block(lg, 2))
    parts = [ThresholdStats(2, 3, 3, n_bins=1), ThresholdStats(2, 3, 3, n_bins=7)]
    for i, lg in enumerate(blocks):
        CalibrationObserver(parts[i % 2], cfg)(0, synthetic_block(lg, 2))
    merged = parts[0].merge(parts[1])
    nb = max(merged.n_bins, one.n_bins)
    one.ensure_bins(nb), merged.ensure_bins(nb)
    pad = lambda t: torch.nn.functional.pad(t, (0, nb - t.shape[-1]))  # noqa: E731
    assert torch.equal(pad(merged.count), pad(one.count)) and one.count.sum() > 0
    for a, b in zip(merged.tensors()[1:], one.tensors()[1:]):
        torch.testing.assert_close(pad(a), pad(b), rtol=1e-12, atol=1e-12)


def test_row_samples_reference_post_softmax_and_dropped_mass():
    lg = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), 3.0]], dtype=torch.float64)
    t, du = row_samples_ref(lg, 2, Placement.PRE)
    assert t.item() == 2.0
    assert du.item() == pytest.approx(math.exp(-3) + math.exp(-2) + math.exp(-1))
    tp, _ = row_samples_ref(lg, 2, Placement.POST)
    p = torch.softmax(lg, -1)
    assert tp.item() == pytest.approx(p[0, 2].item())


def test_sample_fraction_acts_and_prefers_unseen_lengths():
    torch.manual_seed(0)
    stats = ThresholdStats(1, 3, bin_width=1)
    obs = CalibrationObserver(stats, CalibrationConfig(k=KSchedule(1), bin_width=1, sample_frac=0.5))
    eligible = 0
    for _ in range(6):
        blk = synthetic_block(torch.randn(1, 3, 20, 20), 1)
        eligible += int((blk.row_len > 1).sum())
        obs(0, blk)
    taken = int(stats.count[0, 0].sum())
    assert taken == pytest.approx(eligible / 2, abs=6)
    # biased to the least-seen bins: a length already seen 1000 times is almost never sampled again
    before = stats.count[0, 0, 9].item()
    stats.count[0, :, 9] += 1000
    for _ in range(5):
        obs(0, synthetic_block(torch.randn(1, 3, 20, 20), 1))
    assert stats.count[0, 0, 9].item() - 1000 - before <= 1
    assert (stats.count[0, 0, 1:20] > 0).all()


def test_artifact_round_trip_and_atomic_write(tmp_path):
    torch.manual_seed(0)
    stats = ThresholdStats(2, 3, bin_width=4)
    stats.add(0, torch.tensor([5, 9, 9, 30]), torch.randn(4, 3), torch.rand(4, 3))
    stats.add(1, torch.tensor([6, 7]), torch.randn(2, 3), torch.rand(2, 3))
    th = stats.finalize(0.1, fingerprint=FP, k=KSchedule(4, {0: 8}), placement=Placement.PRE, data="unit")
    out = th.save(tmp_path / "th")
    assert sorted(os.listdir(tmp_path)) == ["th"]  # no temp dirs left behind
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"]["name"] == "m" and meta["k"]["overrides"] == {"0": 8} and meta["sigma"] == 0.1
    back = load_thresholds(out, expect_model=FP)
    for a, b in ((back.count, th.count), (back.t_mean, th.t_mean), (back.t_std, th.t_std), (back.sdc_mean, th.sdc_mean)):
        torch.testing.assert_close(a, b)
    L = torch.tensor([[5, 9, 17, 30, 100]])
    for lk in Lookup:
        for x, y in zip(back.lookup(0, L, lk), th.lookup(0, L, lk)):
            assert torch.equal(x, y)
    with pytest.raises(FileExistsError):
        th.save(out)
    th.with_sigma(0.5).save(out, overwrite=True)
    assert load_thresholds(out).sigma == 0.5
    assert sorted(os.listdir(tmp_path)) == ["th"]


def test_wrong_model_and_broken_artifacts_are_refused(tmp_path):
    stats = ThresholdStats(2, 3, bin_width=4)
    stats.add(0, torch.tensor([5]), torch.randn(1, 3), torch.rand(1, 3))
    th = stats.finalize(0.1, fingerprint=FP, k=KSchedule(4), placement=Placement.PRE)
    path = th.save(tmp_path / "th")
    other = ModelFingerprint(name="other-model", digest="e" * 64, n_layers=2, n_heads=3, n_kv_heads=3, head_dim=8)
    with pytest.raises(ThresholdsError, match=r"calibrated for m .*loaded model is other-model"):
        load_thresholds(path, expect_model=other)
    with pytest.raises(ThresholdsError, match="does not exist"):
        load_thresholds(tmp_path / "nope")
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ThresholdsError, match="not valid JSON"):
        load_thresholds(path)
    th.save(tmp_path / "th2")
    (tmp_path / "th2" / "thresholds.parquet").write_bytes(b"garbage")
    with pytest.raises(ThresholdsError, match="not a readable Parquet"):
        load_thresholds(tmp_path / "th2")


def test_lookup_interpolates_between_bins_nearest_snaps_and_extrapolation_is_flagged():
    stats = ThresholdStats(1, 1, bin_width=10)
    # bins 1 (lengths 11-20, centre 15.5) and 3 (31-40, centre 35.5); bin 2 is a gap
    stats.add(0, torch.tensor([15, 35]), torch.tensor([[1.0], [3.0]], dtype=torch.float64), torch.tensor([[0.5], [1.5]]))
    th = stats.finalize(0.0, fingerprint=FP, k=KSchedule(1), placement=Placement.PRE)
    L = torch.tensor([[15, 25, 30, 36, 60, 5]])
    theta, sdc, extrap = th.lookup(0, L, Lookup.INTERPOLATE)
    # filled table: bin 0 flat at 1, bin 1 = 1, gap bin 2 = 2 (linear), bin 3 = 3; pos = (L − 5.5) / 10
    np.testing.assert_allclose(theta[0, 0].numpy(), [1.0, 1.95, 2.45, 3.0, 3.0, 1.0], rtol=1e-6)
    assert extrap[0, 0].tolist() == [False, False, False, False, True, True]
    theta_n, _, _ = th.lookup(0, L, Lookup.NEAREST)
    assert theta_n[0, 0].tolist() == [1.0, 1.0, 1.0, 3.0, 3.0, 1.0]  # gap bin 2 (21-30) takes bin 1 on a tie
    np.testing.assert_allclose(sdc[0, 0, 3].item(), 1.5)


@pytest.mark.parametrize("lookup", list(Lookup))
@pytest.mark.parametrize("smoothing", [0, 1])
def test_lookup_of_all_layers_equals_each_layer(lookup, smoothing):
    """``lookup(None, …)`` (one call per decode step) is every layer's own lookup, stacked."""
    g = torch.Generator().manual_seed(3)
    stats = ThresholdStats(2, 3, bin_width=8)
    for layer in range(2):
        lengths = torch.randint(9, 60, (40,), generator=g)
        if layer == 1:
            lengths = lengths.clamp(max=30)  # a narrower calibrated range: extrapolation differs per layer
        t = torch.randn(40, 3, generator=g, dtype=torch.float64) + layer
        stats.add(layer, lengths, t, t.abs())
    th = stats.finalize(0.2, fingerprint=FP, k=KSchedule(4), placement=Placement.PRE)
    rows = torch.tensor([[1, 9, 17, 31, 44, 70], [5, 12, 28, 29, 30, 200]])
    every = th.lookup(None, rows, lookup, smoothing)
    for layer in range(2):
        for got, want in zip(every, th.lookup(layer, rows, lookup, smoothing)):
            assert got[layer].shape == want.shape == (2, 3, 6)
            torch.testing.assert_close(got[layer], want, rtol=0, atol=0, equal_nan=True)
    assert every[2][1].any() and not torch.equal(every[2][0], every[2][1])


def test_calibrate_end_to_end_on_tiny_model_and_bounded_memory(tiny_lm):
    torch.manual_seed(0)
    docs = [torch.randint(0, 300, (n,)) for n in (40, 64, 90)]
    cfg = CalibrationConfig(k=KSchedule(8, {0: 64}), bin_width=8, tac=True)
    progress = []
    th = calibrate(tiny_lm, docs, cfg, progress=lambda d, t: progress.append((d, t)))
    assert progress[0] == (0, 194) and progress[-1] == (194, 194)
    df = th.to_frame()
    assert set(df["layer"]) == {0, 1, 2}
    assert df[df.layer == 0]["length_lo"].min() > 64 - 8  # layer 0 only sees rows longer than its k=64
    assert th.meta["documents"] == 3 and th.meta["tokens"] == 194
    with pytest.raises(ValueError, match="not longer than the smallest k"):
        calibrate(tiny_lm, [torch.randint(0, 300, (5,))], cfg)
    with pytest.raises(ValueError, match="empty"):
        calibrate(tiny_lm, [], cfg)


def test_chunked_scores_bound_memory_at_8192():
    """At N = 8192 the score block per chunk stays at the budget (never (B, H, N, N) at once)."""
    seen = []
    N, H = 8192, 2
    q = torch.randn(1, H, N, 16)
    k = torch.randn(1, 1, N, 16)
    v = torch.randn(1, 1, N, 16)
    budget = 1 << 22
    topθ_attention_ref(q[:, :, -300:], k, v, config=SparseConfig(selection="top-k", sdc="none", vmc=False),
                       k_keep=64, block_elements=budget, observer=lambda b: seen.append(b.logits.numel()))
    assert len(seen) > 1 and max(seen) <= budget


def test_decode_rows_are_calibrated_with_the_same_statistics(tiny_lm):
    """Greedy decode steps add one row per step at the growing length; prefill rows are unchanged."""
    torch.manual_seed(0)
    docs = [torch.randint(2, 300, (30,))]
    cfg = CalibrationConfig(k=KSchedule(4), bin_width=1, tac=False)
    pre = calibrate(tiny_lm, docs, cfg)
    both = calibrate(tiny_lm, docs, cfg, decode_tokens=6)
    pad = lambda t: torch.nn.functional.pad(t, (0, both.count.shape[-1] - t.shape[-1]))  # noqa: E731
    extra = both.count - pad(pre.count)
    assert (extra[:, :, 30:35] == 1).all()  # lengths 31..35: one decode row per step after the prefill
    assert (extra[:, :, :30] == 0).all()
    torch.testing.assert_close(both.t_mean[:, :, :30], pre.t_mean[:, :, :30])


def test_causal_key_prefix_chunks_give_the_same_statistics_as_full_width_rows():
    """Observers that accept a key prefix let causal row chunks skip the masked upper triangle;
    the recorded samples (and the attention output) must not change."""
    torch.manual_seed(3)
    B, Hq, Hkv, S, d = 2, 4, 2, 300, 16
    q, kk, v = torch.randn(B, Hq, S, d), torch.randn(B, Hkv, S, d), torch.randn(B, Hkv, S, d)
    cc = CalibrationConfig(k=KSchedule(8), bin_width=4, tac=True, vmc=True)
    cfg = cc.tac_config()
    trimmed, full = ThresholdStats(1, Hq, 4), ThresholdStats(1, Hq, 4)
    obs_trim, obs_full = CalibrationObserver(trimmed, cc), CalibrationObserver(full, cc)
    assert obs_trim.accepts_key_prefix
    widths_t, widths_f = [], []

    class Prefix:  # declares it reads per-row values only
        accepts_key_prefix = True

        def __call__(self, block):
            widths_t.append(block.logits.shape[-1])
            obs_trim(0, block)

    def full_width(block):  # a plain function: no accepts_key_prefix, so every chunk is full width
        widths_f.append(block.logits.shape[-1])
        obs_full(0, block)

    out_t = topθ_attention_ref(q, kk, v, config=cfg, k_keep=8, observer=Prefix())
    out_f = topθ_attention_ref(q, kk, v, config=cfg, k_keep=8, observer=full_width)
    torch.testing.assert_close(out_t, out_f)
    for a, b in zip(trimmed.tensors(), full.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert set(widths_f) == {S} and min(widths_t) < S and max(widths_t) == S and len(widths_t) > 1


# ---- θ relative to the row max, per-head k (issue 7) ---------------------------------------------------

def test_row_max_calibration_records_kplus1_largest_minus_row_max():
    """θ_rel at σ=0 (bin width 1) is the mean over documents of (k+1)-th largest − max of each row."""
    from topθ_core.config import ThetaReference

    torch.manual_seed(1)
    k, N = 3, 12
    cfg = CalibrationConfig(k=KSchedule(k), bin_width=1, sigma=0.0, theta_reference="row-max")
    stats = ThresholdStats(2, 3, bin_width=1)
    obs = CalibrationObserver(stats, cfg)
    blocks = [torch.randn(1, 3, N, N, dtype=torch.float64) for _ in range(3)]
    for lg in blocks:
        obs(0, synthetic_block(lg, k))
    th = stats.finalize(0.0, fingerprint=FP, k=KSchedule(k), placement=Placement.PRE, calibration=cfg)
    assert th.theta_reference is ThetaReference.ROW_MAX and th.meta["theta_reference"] == "row-max"
    for L in range(k + 1, N + 1):
        rows = [np.sort(lg[0, :, L - 1, :L].numpy(), axis=-1) for lg in blocks]
        want = np.mean([r[:, -(k + 1)] - r[:, -1] for r in rows], axis=0)
        np.testing.assert_allclose(th.theta[0, :, L - 1].numpy(), want, rtol=1e-12)
    assert (th.theta[0, :, k:] <= 0).all()  # never above the row max
    with pytest.raises(Exception, match="contradicts"):
        stats.finalize(0.0, fingerprint=FP, k=KSchedule(k), placement=Placement.PRE, calibration=cfg,
                       theta_reference="absolute")


def test_per_head_k_calibration_uses_each_heads_kplus1_largest():
    """With per-head k a row is a sample only for the heads whose k it exceeds, and t is that head's (k_h+1)-th."""
    torch.manual_seed(2)
    N, ks = 10, [2, 6, 4]
    sched = KSchedule(4, {}, {(1, 0): 2, (1, 1): 6})
    lg = torch.randn(1, 3, N, N, dtype=torch.float64)
    for tac in (False, True):  # TAC hands over top-k's own (k+1)-th; the dense run recomputes it
        stats = ThresholdStats(2, 3, bin_width=1)
        obs = CalibrationObserver(stats, CalibrationConfig(k=sched, bin_width=1, sigma=0.0))
        if tac:  # as the TAC top-k hands them over: its per-head (k_h+1)-th score and dropped mass
            from topθ_core.selection import top_k_with_next

            blk = synthetic_block(lg, min(ks))
            kept, nxt = top_k_with_next(blk.logits, blk.visible, torch.tensor(ks))
            e = torch.exp(blk.logits - blk.logits.amax(-1, keepdim=True))
            blk.kth_next, blk.dropped_mass = nxt, (e * ~kept).sum(-1)
        else:
            blk = synthetic_block(lg, min(ks))
        blk.k_heads = torch.tensor(ks)
        obs(1, blk)
        th = stats.finalize(0.0, fingerprint=FP, k=sched, placement=Placement.PRE)
        for h, kh in enumerate(ks):
            for L in range(1, N + 1):
                if L <= kh:
                    assert th.count[1, h, L - 1] == 0, (tac, h, L)
                else:
                    want = lg[0, h, L - 1, :L].topk(kh + 1).values[-1].item()
                    assert th.count[1, h, L - 1] == 1
                    assert th.theta[1, h, L - 1].item() == pytest.approx(want, rel=1e-12), (tac, h, L)


def test_k_schedule_head_overrides_validate_and_round_trip():
    from topθ_core.config import ConfigError, parse_head_k

    s = KSchedule.parse(64, "0:512", "2.0:48,2.1:80")
    assert s.heads_for(2, 3) == [48, 80, 64] and s.heads_for(3, 3) is None and s.heads_for(0, 3) is None
    assert KSchedule.from_dict(s.to_dict()) == s
    assert KSchedule.from_dict({"default": 64, "overrides": {"0": 512}}) == KSchedule(64, {0: 512})  # old artifacts
    assert "head_overrides" not in KSchedule(64, {0: 512}).to_dict()  # per-layer schedules serialise as before
    assert parse_head_k(s.head_text()) == dict(s.head_overrides)
    assert KSchedule(64, {}, {(2, 1): 64}).heads_for(2, 3) is None  # equal to the layer's k: uniform
    s.validate(30, 9)
    with pytest.raises(ConfigError, match=r"\(layer, head\) \[\(2, 3\)\]"):
        KSchedule(64, {}, {(2, 3): 8}).validate(30, 3)
    with pytest.raises(ConfigError, match="layer"):
        KSchedule(64, {}, {(40, 0): 8}).validate(30, 9)
    with pytest.raises(ConfigError, match="query heads"):
        KSchedule(64, {}, {(2, 5): 8}).heads_for(2, 3)
    with pytest.raises(ConfigError, match="at least 1"):
        KSchedule(64, {}, {(2, 0): 0})
    with pytest.raises(ConfigError, match="non-negative"):
        KSchedule(64, {}, {(2, -1): 8})
    with pytest.raises(ConfigError, match="twice"):
        KSchedule.parse(64, None, "2.0:8,2.0:9")
    with pytest.raises(ConfigError, match="LAYER.HEAD:K"):
        KSchedule.parse(64, None, "2:8")


def test_head_k_from_spread_keeps_the_layer_mean_and_is_proportional():
    from topθ_core.k_allocation import head_k_from_spread

    ks = head_k_from_spread([1, 2, 3, 6], 30)
    assert sum(ks) == 120 and ks == [10, 20, 30, 60]
    ks = head_k_from_spread([0.0, 1, 1, 100], 16, k_min=4, k_max=40)
    assert sum(ks) == 64 and ks[0] == 4 and ks[3] == 40 and ks[1] == ks[2] == 10
    ks = head_k_from_spread(torch.rand(9, generator=torch.Generator().manual_seed(0)) * 50, 64, k_min=16, k_max=256)
    assert sum(ks) == 9 * 64 and min(ks) >= 16 and max(ks) <= 256
    with pytest.raises(ValueError, match="k_min"):
        head_k_from_spread([1, 2], 8, k_min=10)
    with pytest.raises(ValueError, match="finite"):
        head_k_from_spread([1, float("nan")], 8)


def test_mass_spread_counts_elements_to_reach_the_share_by_brute_force():
    from topθ_core.k_allocation import MassSpreadObserver

    torch.manual_seed(3)
    N, k = 9, 2
    lg = torch.randn(1, 3, N, N, dtype=torch.float64) * 2
    obs = MassSpreadObserver(1, 3, [k], mass=0.8)
    obs(0, synthetic_block(lg, k))
    want = np.zeros(3)
    for h in range(3):
        for L in range(k + 1, N + 1):
            p = np.sort(torch.softmax(lg[0, h, L - 1, :L], -1).numpy())[::-1]
            want[h] += int(np.argmax(np.cumsum(p) >= 0.8 - 1e-12)) + 1
    np.testing.assert_allclose(obs.mean_spread()[0].numpy(), want / (N - k))


def test_row_max_and_per_head_k_end_to_end_on_tiny_model(tiny_lm, tmp_path):
    """Calibrate both kinds, save, reload; inference refuses the other kind of θ; old artifacts read as absolute."""
    import json as _json

    from topθ_core.k_allocation import allocate_head_k
    from topθ_core.config import ConfigError, ThetaReference
    from topθ_core.integration import sparse_run

    torch.manual_seed(0)
    docs = [torch.randint(0, 300, (n,)) for n in (48, 64)]
    rel = calibrate(tiny_lm, docs, CalibrationConfig(k=KSchedule(8), bin_width=8, theta_reference="row-max"))
    rel.save(tmp_path / "rel")
    rel = load_thresholds(tmp_path / "rel", expect_model=tiny_lm.fingerprint)
    assert rel.theta_reference is ThetaReference.ROW_MAX
    ids = docs[0].view(1, -1)
    with pytest.raises(ConfigError, match="row-max"):
        with sparse_run(SparseConfig(k=KSchedule(8)), rel, model=tiny_lm.model):
            pass
    with torch.inference_mode(), sparse_run(SparseConfig(k=KSchedule(8), theta_reference="row-max"), rel,
                                            model=tiny_lm.model):
        assert torch.isfinite(tiny_lm.model(ids).logits).all()

    sched, spread = allocate_head_k(tiny_lm, docs, KSchedule(8), mass=0.9)
    assert spread.shape == (3, 4) and len(sched.head_overrides) == 12
    assert all(sum(sched.heads_for(l, 4) or [8] * 4) == 32 for l in range(3))
    absolute = calibrate(tiny_lm, docs, CalibrationConfig(k=sched, bin_width=8))
    absolute.save(tmp_path / "abs")
    meta = _json.loads((tmp_path / "abs" / "meta.json").read_text())
    meta.pop("theta_reference")  # an artifact written before the option
    (tmp_path / "abs" / "meta.json").write_text(_json.dumps(meta))
    old = load_thresholds(tmp_path / "abs")
    assert old.theta_reference is ThetaReference.ABSOLUTE and old.k == sched
    with pytest.raises(ConfigError, match="absolute"):
        with sparse_run(SparseConfig(k=sched, theta_reference="row-max"), old, model=tiny_lm.model):
            pass
    with pytest.raises(ConfigError, match="query heads"):
        with sparse_run(SparseConfig(k=KSchedule(8, {}, {(1, 7): 4})), old, model=tiny_lm.model):
            pass


def test_masked_samples_reach_neither_the_sums_nor_the_reservoir():
    """Per-head k masks: a masked (row, head) adds nothing to count, Σt, Σt² or the median's sample."""
    stats = ThresholdStats(1, 2, bin_width=4, reservoir_capacity=8, seed=0)
    t = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, -1e9]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    stats.add(0, torch.tensor([5, 6, 7]), t, torch.zeros(3, 2), mask=mask)
    assert stats.count[0, :, 1].tolist() == [3.0, 2.0]
    assert stats.t_sum[0, :, 1].tolist() == [6.0, 30.0]
    assert stats.samples.held()[0, :, 1].tolist() == [3, 2]
    th = stats.finalize(0.0, fingerprint=FP, k=KSchedule(4), placement=Placement.PRE, aggregation="median")
    assert th.t_mean[0, :, 1].tolist() == [2.0, 15.0]
