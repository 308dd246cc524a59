"""Robust θ aggregation (median + σ·1.4826·MAD, trimmed mean + σ·trimmed std) and the mergeable
sample reservoir behind it, against numpy/scipy computed independently on the same samples."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import scipy.stats
import torch

from topθ_core.calibration import calibrate
from topθ_core.cli import main as cli_main
from topθ_core.config import Aggregation, CalibrationConfig, ConfigError, KSchedule, Placement
from topθ_core.thresholds import load_thresholds
from topθ_core.fingerprint import ModelFingerprint
from topθ_core.statistics import SampleReservoir, ThresholdStats, stream_seed

FP = ModelFingerprint(name="m", digest="d" * 64, n_layers=2, n_heads=3, n_kv_heads=3, head_dim=8)
K = KSchedule(4)


def _samples(n: int, H: int, seed: int, max_len: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    """Row lengths (n,) and heavy-tailed float32 threshold samples (n, H): Student-t with 2 dof + outliers."""
    rng = np.random.default_rng(seed)
    lengths = torch.from_numpy(rng.integers(5, max_len, n))
    t = rng.standard_t(2, size=(n, H)) + np.where(rng.random((n, H)) < 0.05, 40.0, 0.0)
    return lengths, torch.from_numpy(t.astype(np.float32))


def _stats(capacity: int, seed: int = 0, bin_width: int = 8) -> ThresholdStats:
    return ThresholdStats(2, 3, bin_width=bin_width, reservoir_capacity=capacity, seed=seed)


def _by_cell(lengths: torch.Tensor, t: torch.Tensor, bin_width: int) -> dict[tuple[int, int], np.ndarray]:
    """{(head, bin): float64 samples} computed directly from the inputs."""
    bins = ((lengths - 1) // bin_width).numpy()
    return {(h, int(b)): t[bins == b, h].double().numpy() for b in np.unique(bins) for h in range(t.shape[1])}


def _ref_median_mad(x: np.ndarray) -> tuple[float, float]:
    med = np.median(x)
    return med, 1.4826 * np.median(np.abs(x - med))


def _ref_trimmed(x: np.ndarray, p: float) -> tuple[float, float]:
    return scipy.stats.trim_mean(x, p), np.std(scipy.stats.trimboth(x, p))  # population std of the kept ones


# ---------------------------------------------------------------------------- exact under capacity
@pytest.mark.parametrize("trim", [0.1, 0.25, 0.0])
def test_robust_theta_equals_numpy_and_scipy_when_every_cell_fits(trim):
    lengths, t = _samples(700, 3, seed=1)  # ≤ ~60 samples per (head, bin of 8 lengths)
    small = torch.tensor([200, 209, 210, 217, 218, 219, 225, 226, 227, 228])  # bins with 1, 2, 3 and 4 samples
    lengths, t = torch.cat([lengths, small]), torch.cat([t, _samples(len(small), 3, seed=9)[1]])
    stats = _stats(capacity=128)
    for part in torch.randperm(len(lengths)).chunk(5):  # several add calls, as calibration makes them
        stats.add(1, lengths[part], t[part], torch.rand(part.numel(), 3))
    cells = _by_cell(lengths, t, 8)
    assert max(len(x) for x in cells.values()) <= 128 and {1, 2, 3, 4} <= {len(x) for x in cells.values()}
    sigma = 0.7
    med = stats.finalize(sigma, fingerprint=FP, k=K, placement=Placement.PRE, aggregation="median")
    tm = stats.finalize(sigma, fingerprint=FP, k=K, placement=Placement.PRE, aggregation="trimmed-mean",
                        trim_fraction=trim)
    err_med, err_tm = [], []
    for (h, b), x in cells.items():
        loc, scale = _ref_median_mad(x)
        assert med.t_mean[1, h, b].item() == loc and med.t_std[1, h, b].item() == pytest.approx(scale, rel=1e-15)
        assert med.theta[1, h, b].item() == pytest.approx(loc + sigma * scale, rel=1e-14, abs=1e-14)
        err_med.append(abs(med.t_std[1, h, b].item() - scale))
        tloc, tscale = _ref_trimmed(x, trim)
        err_tm.append(max(abs(tm.t_mean[1, h, b].item() - tloc), abs(tm.t_std[1, h, b].item() - tscale)))
        assert tm.t_mean[1, h, b].item() == pytest.approx(tloc, rel=1e-12, abs=1e-12)
        assert tm.t_std[1, h, b].item() == pytest.approx(tscale, rel=1e-12, abs=1e-12)
        assert med.count[1, h, b].item() == tm.count[1, h, b].item() == len(x)
    print(f"{len(cells)} cells: median scale max err {max(err_med):.1e}, trimmed (p={trim}) max err {max(err_tm):.1e}")
    for th in (med, tm):  # cells never given a sample stay uncalibrated and zero
        assert (th.count[0] == 0).all() and (th.t_mean[0] == 0).all() and (th.t_std[0] == 0).all()
        assert th.meta["reservoir"]["sampled_cells"] == 0  # every cell exact
    assert med.meta["aggregation"] == "median" and tm.meta["trim_fraction"] == trim


def test_median_is_robust_where_mean_is_not():
    """One extreme sample moves mean + σ·std far; median + σ·MAD barely."""
    stats = ThresholdStats(1, 1, bin_width=100, reservoir_capacity=16)
    t = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 500.0]).view(-1, 1)
    stats.add(0, torch.full((8,), 50), t, torch.zeros(8, 1))
    ms = stats.finalize(1.0, fingerprint=FP, k=K, placement="pre")
    md = stats.finalize(1.0, fingerprint=FP, k=K, placement="pre", aggregation=Aggregation.MEDIAN)
    assert ms.theta[0, 0, 0].item() > 100
    assert md.theta[0, 0, 0].item() == pytest.approx(1.01 + 1.4826 * np.median(np.abs(t.numpy() - 1.01)), rel=1e-6)
    assert md.theta[0, 0, 0].item() < 1.2


# ---------------------------------------------------------------------------- MEAN_STD unchanged
def test_mean_std_is_unchanged_and_keeps_no_samples():
    lengths, t = _samples(500, 3, seed=2)
    d_u = torch.rand(500, 3)
    plain, with_res = ThresholdStats(2, 3, 8), _stats(capacity=4)
    for s in (plain, with_res):
        s.add(0, lengths, t, d_u)
    a = plain.finalize(0.3, fingerprint=FP, k=K, placement="pre")
    b = with_res.finalize(0.3, fingerprint=FP, k=K, placement="pre", aggregation="mean-std")
    for name in ("count", "t_mean", "t_std", "sdc_mean", "theta"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True, msg=name)
    for (h, bn), x in _by_cell(lengths, t, 8).items():  # the formula, independently
        assert a.t_mean[0, h, bn].item() == pytest.approx(x.mean(), rel=1e-12, abs=1e-12)
        assert a.t_std[0, h, bn].item() == pytest.approx(x.std(), rel=1e-9, abs=1e-9)
    assert a.meta["aggregation"] == "mean-std" and "reservoir" not in a.meta
    # statistics for mean-std keep exactly the four sums, nothing else
    cfg = CalibrationConfig(k=K, bin_width=8)
    s = ThresholdStats.for_config(2, 3, cfg)
    assert s.samples is None
    r = ThresholdStats.for_config(2, 3, CalibrationConfig(k=K, bin_width=8, aggregation="median", reservoir_capacity=32))
    assert r.samples.keys.shape == (2, 3, r.n_bins, 32) and r.samples.keys.dtype == torch.int32
    assert r.samples.values.dtype == torch.float32


# ---------------------------------------------------------------------------- the reservoir
def test_reservoir_over_capacity_is_a_deterministic_subset_of_the_right_size():
    n, cap = 1000, 32
    t = torch.randperm(n).float().view(-1, 1)  # distinct values: membership is checkable
    res = []
    for seed in (7, 7, 8):
        r = SampleReservoir(1, 1, 4, cap, seed=seed)
        for part in torch.arange(n).chunk(9):
            r.add(0, torch.full((part.numel(),), 2), t[part])
        res.append(r)
    held = res[0].held()
    assert held[0, 0].tolist() == [0, 0, cap, 0]
    kept = res[0].values[0, 0, 2]
    assert len(set(kept.tolist())) == cap and set(kept.tolist()) <= set(t.view(-1).tolist())
    assert torch.equal(res[0].values, res[1].values) and torch.equal(res[0].keys, res[1].keys)  # same seed
    assert not torch.equal(res[0].values, res[2].values)  # another seed draws another sample


def test_reservoir_is_uniform_over_add_calls():
    """Every sample is kept with probability capacity / n, however the samples arrive."""
    n, cap, trials = 120, 12, 600
    hits = np.zeros(n)
    t = torch.arange(n).float().view(-1, 1)
    for seed in range(trials):
        r = SampleReservoir(1, 1, 1, cap, seed=seed)
        r.add(0, torch.zeros(100, dtype=torch.long), t[:100])  # one big call, then small ones
        for i in range(100, n):
            r.add(0, torch.zeros(1, dtype=torch.long), t[i:i + 1])
        hits[r.values[0, 0, 0].long().numpy()] += 1
    expected = trials * cap / n  # 60 per sample
    print(f"inclusion counts: mean {hits.mean():.1f} (expected {expected}), first 100 {hits[:100].mean():.1f}, "
          f"last 20 {hits[100:].mean():.1f}")
    assert hits.sum() == trials * cap
    assert abs(hits[:100].mean() - expected) < 3 and abs(hits[100:].mean() - expected) < 6
    chi2 = ((hits - expected) ** 2 / expected).sum()  # ≈ χ²(n−1) (a little under: draws without replacement)
    assert chi2 < scipy.stats.chi2.ppf(0.999, n - 1)


# ---------------------------------------------------------------------------- merge
def test_merged_halves_equal_single_pass_when_under_capacity():
    lengths, t = _samples(800, 3, seed=3, max_len=300)
    d_u = torch.rand(800, 3)
    one = _stats(128, seed=0)
    halves = [_stats(128, seed=1), _stats(128, seed=2)]
    for i, part in enumerate(torch.arange(800).chunk(8)):
        one.add(1, lengths[part], t[part], d_u[part])
        halves[i % 2].add(1, lengths[part], t[part], d_u[part])
    merged = halves[0].merge(halves[1])
    for agg in ("median", "trimmed-mean"):
        a = one.finalize(0.2, fingerprint=FP, k=K, placement="pre", aggregation=agg)
        b = merged.finalize(0.2, fingerprint=FP, k=K, placement="pre", aggregation=agg)
        assert torch.equal(a.count, b.count)
        assert torch.equal(a.t_mean, b.t_mean) and torch.equal(a.t_std, b.t_std), agg  # same samples, same order


def test_merge_over_capacity_is_a_count_weighted_uniform_sample_of_the_union():
    na, nb, cap, trials = 300, 100, 40, 300
    ta, tb = torch.arange(na).float().view(-1, 1), (1000 + torch.arange(nb)).float().view(-1, 1)
    from_a = []
    for trial in range(trials):
        a = ThresholdStats(1, 1, bin_width=64, reservoir_capacity=cap, seed=2 * trial)
        b = ThresholdStats(1, 1, bin_width=64, reservoir_capacity=cap, seed=2 * trial + 1)
        a.add(0, torch.full((na,), 10), ta, torch.zeros(na, 1))
        b.add(0, torch.full((nb,), 10), tb, torch.zeros(nb, 1))
        a.merge(b)
        vals = a.samples.values[0, 0, 0]
        assert a.samples.held()[0, 0, 0] == cap and a.count[0, 0, 0] == na + nb
        assert len(set(vals.tolist())) == cap and set(vals.tolist()) <= set(ta.view(-1).tolist()) | set(tb.view(-1).tolist())
        from_a.append(float((vals < 1000).float().mean()))
    frac = float(np.mean(from_a))
    print(f"share of the merged sample from the 300-sample side: {frac:.3f} (expected 0.750)")
    assert abs(frac - na / (na + nb)) < 0.02


def test_merge_refuses_mismatched_parts():
    a, b = _stats(16, seed=1), ThresholdStats(2, 3, 8)
    with pytest.raises(ValueError, match="sample reservoir and statistics without"):
        a.merge(b)
    with pytest.raises(ValueError, match="same random stream"):
        a.merge(copy.deepcopy(a))  # a copy continues the same key stream: the merge would not be uniform
    with pytest.raises(ValueError, match="capacities"):
        a.merge(_stats(8, seed=2))
    assert stream_seed(0, 0) != stream_seed(0, 1) and stream_seed(5, 1) == stream_seed(5, 1)


# ---------------------------------------------------------------------------- config and refusals
@pytest.mark.parametrize("kw,message", [
    (dict(aggregation="mode"), "aggregation='mode' is not one of: mean-std, median, trimmed-mean"),
    (dict(reservoir_capacity=0), r"reservoir_capacity must be an integer in \[1, 65536\]"),
    (dict(reservoir_capacity=1 << 17), r"reservoir_capacity must be an integer in \[1, 65536\]"),
    (dict(reservoir_capacity=True), "reservoir_capacity must be an integer"),
    (dict(reservoir_capacity=12.5), "reservoir_capacity must be an integer"),
    (dict(trim_fraction=0.5), r"trim_fraction must be in \[0, 0.5\)"),
    (dict(trim_fraction=-0.01), r"trim_fraction must be in \[0, 0.5\)"),
])
def test_invalid_config_is_refused_clearly(kw, message):
    with pytest.raises(ConfigError, match=message):
        CalibrationConfig(**kw)


def test_finalize_refuses_what_it_cannot_compute():
    plain = ThresholdStats(2, 3, 8)
    plain.add(0, torch.tensor([9]), torch.ones(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="needs the threshold samples.*ThresholdStats.for_config"):
        plain.finalize(0.1, fingerprint=FP, k=K, placement="pre", aggregation="median")
    with pytest.raises(ConfigError, match="contradicts"):
        plain.finalize(0.1, fingerprint=FP, k=K, placement="pre", aggregation="median",
                       calibration=CalibrationConfig(k=K))
    with pytest.raises(ConfigError, match="trim_fraction"):
        _stats(4).finalize(0.1, fingerprint=FP, k=K, placement="pre", aggregation="trimmed-mean", trim_fraction=0.7)


# ---------------------------------------------------------------------------- artifact
def test_artifact_round_trip_keeps_the_aggregation(tmp_path):
    lengths, t = _samples(300, 3, seed=4)
    stats = _stats(8)  # some cells over capacity
    stats.add(0, lengths, t, torch.rand(300, 3))
    cfg = CalibrationConfig(k=K, bin_width=8, aggregation="trimmed-mean", reservoir_capacity=8, trim_fraction=0.2)
    th = stats.finalize(0.1, fingerprint=FP, k=K, placement="pre", calibration=cfg)
    path = th.save(tmp_path / "th")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["aggregation"] == "trimmed-mean" and meta["trim_fraction"] == 0.2
    assert meta["calibration"]["aggregation"] == "trimmed-mean" and meta["calibration"]["reservoir_capacity"] == 8
    assert "t_mean = mean(t), t_std = population std(t), of the samples left" in meta["statistics"]
    res = meta["reservoir"]
    assert res["capacity"] == 8 and 0 < res["sampled_cells"] < res["calibrated_cells"] == int((th.count > 0).sum())
    back = load_thresholds(path, expect_model=FP)
    assert back.aggregation is Aggregation.TRIMMED_MEAN and back.with_sigma(0.5).aggregation is Aggregation.TRIMMED_MEAN
    assert CalibrationConfig.from_dict(back.meta["calibration"]) == cfg
    for name in ("count", "t_mean", "t_std", "theta"):
        torch.testing.assert_close(getattr(back, name), getattr(th, name), equal_nan=True)
    meta.pop("aggregation")  # artifacts written before robust aggregation
    (path / "meta.json").write_text(json.dumps(meta))
    assert load_thresholds(path).aggregation is Aggregation.MEAN_STD


# ---------------------------------------------------------------------------- end to end
def test_calibrate_median_on_a_tiny_model_matches_the_recorded_samples(tiny_lm, monkeypatch):
    """The engine's own samples, recorded as they reach the statistics, give numpy's median/MAD."""
    recorded = []
    add = ThresholdStats.add

    def spy(self, layer, lengths, t, d_u):
        recorded.append((layer, lengths.clone(), t.clone()))
        add(self, layer, lengths, t, d_u)

    monkeypatch.setattr(ThresholdStats, "add", spy)
    torch.manual_seed(0)
    docs = [torch.randint(0, 300, (n,)) for n in (40, 64, 90)]
    cfg = CalibrationConfig(k=KSchedule(8, {0: 16}), bin_width=8, tac=True, aggregation="median")
    th = calibrate(tiny_lm, docs, cfg)
    assert th.meta["aggregation"] == "median" and th.meta["reservoir"]["sampled_cells"] == 0
    n_checked = 0
    for layer in range(th.n_layers):
        parts = [(L, t) for lay, L, t in recorded if lay == layer]
        cells = _by_cell(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).float(), 8)
        for (h, b), x in cells.items():
            loc, scale = _ref_median_mad(x)
            assert th.t_mean[layer, h, b].item() == loc
            assert th.t_std[layer, h, b].item() == pytest.approx(scale, rel=1e-15, abs=1e-15)
            n_checked += 1
    assert n_checked == int((th.count > 0).sum())
    monkeypatch.setattr(ThresholdStats, "add", add)
    again = calibrate(tiny_lm, docs, cfg)  # deterministic
    assert torch.equal(again.t_mean, th.t_mean) and torch.equal(again.t_std, th.t_std)
    plain = calibrate(tiny_lm, docs, CalibrationConfig(k=cfg.k, bin_width=8, tac=True))
    assert torch.equal(plain.count, th.count)  # same rows sampled, only the aggregation differs


def _cli(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_aggregation_flags(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(["Attention keeps what matters and drops the rest. " * 8,
                                 "def add(a, b):\n    return a + b\n" * 8]))
    code, out, err = _cli(capsys, "calibrate", "--model", tiny_checkpoint, "--data", data, "--k", 8, "--layer-k", "",
                          "--aggregation", "median", "--reservoir-capacity", 64, "--out", tmp_path / "med")
    assert code == 0, err
    assert "median" in out
    meta = json.loads((tmp_path / "med" / "meta.json").read_text())
    assert meta["aggregation"] == "median" and meta["reservoir"]["capacity"] == 64
    assert meta["calibration"]["aggregation"] == "median"
    code, _, err = _cli(capsys, "calibrate", "--model", tiny_checkpoint, "--data", data, "--aggregation",
                        "trimmed-mean", "--trim-fraction", 0.6, "--out", tmp_path / "bad")
    assert code == 2 and "trim_fraction must be in [0, 0.5)" in err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        _cli(capsys, "calibrate", "--data", data, "--aggregation", "mode", "--out", tmp_path / "x")
    assert "invalid choice: 'mode'" in capsys.readouterr().err
    from topθ_core.distributed import _parser  # `toptheta calibrate --distributed` takes the same flags

    args = _parser().parse_args(["--data", "d", "--out", "o", "--aggregation", "trimmed-mean", "--trim-fraction",
                                 "0.2", "--reservoir-capacity", "32"])
    assert (args.aggregation, args.trim_fraction, args.reservoir_capacity) == ("trimmed-mean", 0.2, 32)
