"""Mergeable calibration statistics and the aggregations that turn them into θ.

Calibration accumulates :class:`ThresholdStats`: per (layer, query head, length bin) the
count, sum and sum of squares of the per-row threshold samples ``t`` (the (k+1)-th largest
visible score) and the sum of the dropped softmax mass ``D_U``.  Statistics from several
batches, processes or machines merge by addition (:meth:`ThresholdStats.merge`).  The robust
aggregations (median, trimmed mean) also need the samples: a :class:`SampleReservoir` keeps a
uniform sample of at most ``capacity`` of them per cell, and merges too.

:meth:`ThresholdStats.finalize` turns them into the artifact :class:`~topθ_core.thresholds.Thresholds`:
a location ``t_mean`` and a scale ``t_std`` per cell (mean and std, median and 1.4826·MAD, or
trimmed mean and trimmed std: :data:`AGGREGATIONS`), θ = t_mean + σ·t_std.

Length bins: bin ``b`` holds row lengths ``b·w+1 … (b+1)·w`` (``w = bin_width``); its
centre is ``b·w + (w+1)/2``.  With ``w = 1`` a bin is one exact length.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import Aggregation, CalibrationConfig, ConfigError, KSchedule, Placement, ThetaReference, enum_value
from .fingerprint import ModelFingerprint
from .thresholds import FORMAT_VERSION, Thresholds


def bin_of(lengths: torch.Tensor, bin_width: int) -> torch.Tensor:
    """Length bin of each row length (bin ``b`` holds lengths ``b·w+1 … (b+1)·w``)."""
    return torch.div(lengths - 1, bin_width, rounding_mode="floor")

EMPTY_KEY = torch.iinfo(torch.int32).max  # key of an unused reservoir slot; drawn keys are smaller


def stream_seed(seed: int, stream: int = 0) -> int:
    """The reservoir key seed of one independent sample stream (a distributed rank) of a calibration seed."""
    ss = np.random.SeedSequence(int(seed) % (1 << 64), spawn_key=(int(stream),))
    return int(ss.generate_state(1, dtype=np.uint64)[0]) >> 1


def _keep_smallest(keys: torch.Tensor, values: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell (last dim), the ``capacity`` entries with the smallest keys (ties: the earlier entry)."""
    order = torch.sort(keys, dim=-1, stable=True).indices[..., :capacity]
    return keys.gather(-1, order), values.gather(-1, order)


class SampleReservoir:
    """A fixed-capacity uniform sample of the threshold samples per (layer, head, length bin), mergeable.

    Bottom-k sampling: every sample gets an independent uniform random key (int32, from a
    generator seeded with ``seed``), and a cell keeps the ``capacity`` samples with the
    smallest keys seen so far.  That is a uniform sample without replacement of everything
    the cell was given, and all of it while the cell has at most ``capacity`` samples.
    Merging takes the ``capacity`` smallest keys of the union: again a uniform sample of the
    union, so each side is represented in proportion to its count, *provided* the sides drew
    their keys from independent streams (different seeds; :meth:`merge` refuses a stream it
    holds already; distributed ranks use :func:`stream_seed` (seed, rank)).  Deterministic
    given the seed and the order of :meth:`add` calls.

    ``keys`` (n_layers, n_heads, n_bins, capacity) int32, :data:`EMPTY_KEY` where unused;
    ``values`` the same shape, float32 (the precision attention scores are computed in;
    float64 inputs are rounded).  Memory: 8 bytes · n_layers · n_heads · n_bins · capacity.
    """

    def __init__(self, n_layers: int, n_heads: int, n_bins: int, capacity: int, seed: int = 0, device=None):
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.keys = torch.full((n_layers, n_heads, n_bins, capacity), EMPTY_KEY, dtype=torch.int32, device=device)
        self.values = torch.zeros(n_layers, n_heads, n_bins, capacity, dtype=torch.float32, device=device)
        self.generator = torch.Generator().manual_seed(int(seed))  # CPU: the same keys on every device
        self.streams = frozenset({int(seed)})

    @property
    def n_bins(self) -> int:
        return self.keys.shape[2]

    def ensure_bins(self, n_bins: int) -> None:
        """Grow to exactly ``n_bins`` length bins (new bins empty); never shrinks."""
        extra = n_bins - self.n_bins
        if extra <= 0:
            return
        shape = (*self.keys.shape[:2], extra, self.capacity)
        self.keys = torch.cat([self.keys, self.keys.new_full(shape, EMPTY_KEY)], 2)
        self.values = torch.cat([self.values, self.values.new_zeros(shape)], 2)

    def truncate_bins(self, n_bins: int) -> None:
        """Drop length bins from ``n_bins`` on (they must hold nothing that matters)."""
        self.keys, self.values = self.keys[:, :, :n_bins].contiguous(), self.values[:, :, :n_bins].contiguous()

    def held(self) -> torch.Tensor:
        """(n_layers, n_heads, n_bins) int64: samples held per cell (= min(count, capacity))."""
        return (self.keys != EMPTY_KEY).sum(-1)

    def add(self, layer: int, bins: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Offer samples to a layer's cells: ``bins`` (n,) length-bin indices, ``t`` (n, n_heads);
        ``mask`` (n, n_heads) bool offers only the True entries (per-head k)."""
        n, H = t.shape
        dev = self.keys.device
        keys = torch.randint(0, EMPTY_KEY, (n, H), generator=self.generator, dtype=torch.int32).to(dev)
        if mask is not None:  # an empty key is never held (it sorts last and is not counted)
            keys = torch.where(mask.to(dev), keys, torch.full_like(keys, EMPTY_KEY))
        bins = bins.to(dev)
        cells, group, sizes = torch.unique(bins, return_inverse=True, return_counts=True)  # (U,), (n,), (U,)
        order = torch.argsort(group, stable=True)
        first = torch.cumsum(sizes, 0) - sizes  # (U,) start of each bin's run in ``order``
        slot = torch.empty_like(order)
        slot[order] = torch.arange(n, device=dev) - first[group[order]]  # position of each sample within its bin
        width = int(sizes.max())
        new_k = keys.new_full((H, cells.numel(), width), EMPTY_KEY)  # (H, U, m)
        new_v = self.values.new_zeros((H, cells.numel(), width))
        new_k[:, group, slot] = keys.T
        new_v[:, group, slot] = t.T.to(dev, torch.float32)
        lk, lv = self.keys[layer], self.values[layer]  # views (H, n_bins, C)
        k_all = torch.cat([lk[:, cells], new_k], -1)
        v_all = torch.cat([lv[:, cells], new_v], -1)
        lk[:, cells], lv[:, cells] = _keep_smallest(k_all, v_all, self.capacity)

    def merge(self, other: "SampleReservoir") -> "SampleReservoir":
        """In place: a uniform sample of both reservoirs' samples together (same shape and capacity)."""
        if other.capacity != self.capacity or other.keys.shape[:2] != self.keys.shape[:2]:
            raise ValueError(f"cannot merge sample reservoirs of different shapes or capacities "
                             f"({tuple(self.keys.shape)} vs {tuple(other.keys.shape)})")
        if self.streams & other.streams:
            raise ValueError("cannot merge sample reservoirs drawn from the same random stream (seed "
                             f"{sorted(self.streams & other.streams)[0]}): the merged sample would not be uniform; "
                             "give each part its own seed (ThresholdStats(..., seed=i), or stream=i in for_config)")
        nb = max(self.n_bins, other.n_bins)
        self.ensure_bins(nb)
        ok = torch.cat([other.keys, other.keys.new_full((*other.keys.shape[:2], nb - other.n_bins, self.capacity),
                                                        EMPTY_KEY)], 2).to(self.keys.device)
        ov = torch.cat([other.values, other.values.new_zeros((*other.keys.shape[:2], nb - other.n_bins,
                                                             self.capacity))], 2).to(self.values.device)
        self.keys, self.values = _keep_smallest(torch.cat([self.keys, ok], -1), torch.cat([self.values, ov], -1),
                                                self.capacity)
        self.streams = self.streams | other.streams
        return self

    def sorted_samples(self, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples of the first ``n_bins`` bins, CPU float64, ascending per cell with +inf past the
        held ones: ``(n_layers, n_heads, n_bins, capacity)``, and ``held`` (n_layers, n_heads, n_bins)."""
        self.ensure_bins(n_bins)
        keys, values = self.keys[:, :, :n_bins].cpu(), self.values[:, :, :n_bins].cpu()
        valid = keys != EMPTY_KEY
        x = torch.where(valid, values.to(torch.float64), torch.full((), float("inf"), dtype=torch.float64))
        return x.sort(-1).values, valid.sum(-1)


# ---- aggregations: samples of one (layer, head, length bin) → θ = location + σ·scale ------------

MAD_TO_STD = 1.4826  # 1 / Φ⁻¹(3/4): 1.4826·MAD estimates the std of normally distributed samples


@dataclass(frozen=True)
class BinSamples:
    """What an aggregation reads, per cell (n_layers, n_heads, n_bins): the exact moments of all
    samples, and (for the robust aggregations) the held samples sorted ascending,
    (…, capacity) float64 with +inf past ``held`` (all samples while count ≤ capacity)."""

    count: torch.Tensor
    t_sum: torch.Tensor
    t_sumsq: torch.Tensor
    sorted: torch.Tensor | None = None
    held: torch.Tensor | None = None


def _median_sorted(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Median of the first ``n`` entries of each ascending row of ``x`` (mean of the two middle ones
    for even ``n``, as numpy); 0 where ``n`` = 0."""
    lo = ((n - 1).clamp_min(0) // 2).unsqueeze(-1)
    hi = (n // 2).clamp(max=x.shape[-1] - 1).unsqueeze(-1)
    med = (x.gather(-1, lo) + x.gather(-1, hi)).squeeze(-1) / 2
    return torch.where(n > 0, med, torch.zeros_like(med))


def aggregate_mean_std(s: BinSamples, trim_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """θ = mean(t) + σ·std(t), population std, from count, Σt and Σt² (all samples, any count)."""
    n = s.count.clamp_min(1)
    mean = s.t_sum / n
    var = (s.t_sumsq / n - mean * mean).clamp_min(0.0)
    return mean, var.sqrt()


def aggregate_median_mad(s: BinSamples, trim_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """θ = median(t) + σ·1.4826·MAD(t), MAD = median(|t − median(t)|), over the held samples."""
    med = _median_sorted(s.sorted, s.held)
    dev = (s.sorted - med.unsqueeze(-1)).abs().sort(-1).values  # +inf padding stays last
    return med, MAD_TO_STD * _median_sorted(dev, s.held)


def aggregate_trimmed_mean_std(s: BinSamples, trim_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """θ = mean + σ·std (population) of the held samples left after cutting ⌊p·n⌋ off each end
    (p = ``trim_fraction``, n samples held; ``scipy.stats.trim_mean``'s rule).

    The trimmed std is not rescaled to estimate the full std (unlike MAD's 1.4826): for normal
    samples and p = 0.1 it is about 0.66× the std, so the same σ > 0 gives a lower θ and keeps
    more than mean-std or median (the fidelity table's σ 0.5 rows show it)."""
    n = s.held
    cut = torch.floor(trim_fraction * n.to(torch.float64)).to(torch.long)
    pos = torch.arange(s.sorted.shape[-1])
    keep = (pos >= cut.unsqueeze(-1)) & (pos < (n - cut).unsqueeze(-1))
    m = keep.sum(-1).clamp_min(1).to(torch.float64)
    mean = torch.where(keep, s.sorted, 0.0).sum(-1) / m
    var = torch.where(keep, (s.sorted - mean.unsqueeze(-1)) ** 2, 0.0).sum(-1) / m
    return mean, var.sqrt()


AggregationFn = Callable[[BinSamples, float], tuple[torch.Tensor, torch.Tensor]]
AGGREGATIONS: dict[Aggregation, AggregationFn] = {
    Aggregation.MEAN_STD: aggregate_mean_std,
    Aggregation.MEDIAN: aggregate_median_mad,
    Aggregation.TRIMMED_MEAN: aggregate_trimmed_mean_std,
}
# what ``t_mean`` and ``t_std`` of an artifact hold, written into its meta.json
STATISTICS = {
    Aggregation.MEAN_STD: "t_mean = mean(t), t_std = population std(t)",
    Aggregation.MEDIAN: "t_mean = median(t), t_std = 1.4826·MAD(t), MAD = median(|t - median(t)|)",
    Aggregation.TRIMMED_MEAN: "t_mean = mean(t), t_std = population std(t), of the samples left after cutting "
                              "floor(trim_fraction·n) off each end",
}


def _setting(kind: type[enum.Enum], name: str, value, from_config, default):
    """A setting given to :meth:`ThresholdStats.finalize`: the call's value, else the calibration
    config's, else ``default``.  An unknown value, or one that contradicts the config, is a ConfigError
    (the artifact records both)."""
    if value is not None:
        chosen = enum_value(kind, name, value)
    else:
        chosen = from_config if from_config is not None else default
    if from_config is not None and chosen is not from_config:
        raise ConfigError(f"{name}={chosen.value} contradicts the calibration config's {from_config.value} "
                          "(the artifact records both)")
    return chosen


class ThresholdStats:
    """Mergeable calibration statistics, float64, shape (n_layers, n_heads, n_bins).

    ``reservoir_capacity > 0`` also keeps a :class:`SampleReservoir` (``samples``) of that many
    threshold samples per cell, drawn with ``seed``, for the robust aggregations; 0 (the
    default, all mean-std needs) keeps none.  :meth:`for_config` picks both from a
    :class:`CalibrationConfig`.
    """

    def __init__(self, n_layers: int, n_heads: int, bin_width: int, n_bins: int = 64, device=None, *,
                 reservoir_capacity: int = 0, seed: int = 0):
        self.n_layers, self.n_heads, self.bin_width = n_layers, n_heads, bin_width
        z = lambda: torch.zeros(n_layers, n_heads, n_bins, dtype=torch.float64, device=device)  # noqa: E731
        self.count, self.t_sum, self.t_sumsq, self.du_sum = z(), z(), z(), z()
        self.rows_seen = 0
        self.samples = (SampleReservoir(n_layers, n_heads, n_bins, reservoir_capacity, seed, device)
                        if reservoir_capacity > 0 else None)

    @classmethod
    def for_config(cls, n_layers: int, n_heads: int, config: CalibrationConfig, device=None, *,
                   stream: int = 0) -> "ThresholdStats":
        """Empty statistics for ``config``: with a sample reservoir only when its aggregation needs one.

        ``stream``: which independent key stream of ``config.seed`` the reservoir draws from
        (:func:`stream_seed`); parts that will be merged need different streams (a distributed
        rank passes its rank)."""
        cap = config.reservoir_capacity if config.aggregation.needs_samples else 0
        return cls(n_layers, n_heads, config.bin_width, device=device, reservoir_capacity=cap,
                   seed=stream_seed(config.seed, stream))

    @property
    def n_bins(self) -> int:
        return self.count.shape[-1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.count, self.t_sum, self.t_sumsq, self.du_sum]

    def ensure_bins(self, n_bins: int) -> None:
        if n_bins <= self.n_bins:
            return
        new = max(n_bins, 2 * self.n_bins)
        pad = lambda t: torch.nn.functional.pad(t, (0, new - t.shape[-1]))  # noqa: E731
        self.count, self.t_sum, self.t_sumsq, self.du_sum = map(pad, self.tensors())
        if self.samples is not None:
            self.samples.ensure_bins(new)

    def bin_counts(self, layer: int) -> torch.Tensor:
        """(n_bins,) samples so far in each length bin of a layer (the most of any head: all heads see the
        same rows, and with per-head k a head thresholds the rows longer than its k)."""
        return self.count[layer].amax(0)

    def add(self, layer: int, lengths: torch.Tensor, t: torch.Tensor, d_u: torch.Tensor,
            mask: torch.Tensor | None = None) -> None:
        """Add samples: ``lengths`` (n,) row lengths, ``t`` and ``d_u`` (n, n_heads).

        ``mask`` (n, n_heads) bool: add only the True entries (with per-head k a row is a sample
        for the heads whose k it exceeds); ``None`` adds all."""
        if lengths.numel() == 0:
            return
        bins = bin_of(lengths.to(torch.long), self.bin_width)
        self.ensure_bins(int(bins.max()) + 1)
        t64, du64 = t.to(torch.float64), d_u.to(torch.float64)
        one = torch.ones_like(t64)
        if mask is not None:
            w = mask.to(t64.device, torch.float64)
            one, t64, du64 = w, torch.where(mask.to(t64.device), t64, 0.0), torch.where(mask.to(t64.device), du64, 0.0)
        for acc, val in ((self.count[layer], one), (self.t_sum[layer], t64),
                         (self.t_sumsq[layer], t64 * t64), (self.du_sum[layer], du64)):
            acc.index_add_(1, bins.to(acc.device), val.T.to(acc.device))  # acc (H, n_bins), val.T (H, n)
        if self.samples is not None:
            self.samples.add(layer, bins, t, mask)
        self.rows_seen += int(lengths.numel())

    def merge(self, other: "ThresholdStats") -> "ThresholdStats":
        """In-place sum with another set of statistics (same model shape and bin width).

        Sample reservoirs merge into a uniform sample of both sides' samples (see
        :meth:`SampleReservoir.merge`); both sides must keep one, or neither."""
        if (other.n_layers, other.n_heads, other.bin_width) != (self.n_layers, self.n_heads, self.bin_width):
            raise ValueError("cannot merge statistics of different shapes or bin widths")
        if (self.samples is None) != (other.samples is None):
            raise ValueError("cannot merge statistics with a sample reservoir and statistics without one: "
                             "the merged samples would miss one side (build both with the same aggregation)")
        if self.samples is not None:
            self.samples.merge(other.samples)  # first: it raises on a bad pair before anything changes
        self.ensure_bins(other.n_bins)
        nb = other.n_bins
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine[..., :nb] += theirs.to(mine.device)
        self.rows_seen += other.rows_seen
        return self

    def finalize(self, sigma: float, *, fingerprint: ModelFingerprint, k: KSchedule, placement: Placement,
                 calibration: CalibrationConfig | None = None, data: str = "", extra: dict | None = None,
                 aggregation: Aggregation | str | None = None, trim_fraction: float | None = None,
                 theta_reference: ThetaReference | str | None = None) -> "Thresholds":
        """The artifact: per cell a location ``t_mean`` and scale ``t_std`` (θ = t_mean + σ·t_std).

        ``aggregation`` (default: ``calibration.aggregation``, else mean-std) picks the pair from
        :data:`AGGREGATIONS`; ``trim_fraction`` (default: ``calibration.trim_fraction``, else 0.1)
        is the trimmed mean's cut.  Median and trimmed mean read the sample reservoir (exact
        where a cell has at most its capacity of samples) and need one.  ``meta.json`` records
        the aggregation, what ``t_mean``/``t_std`` hold, and the reservoir's capacity and use.
        ``theta_reference`` (default: ``calibration.theta_reference``, else absolute) says what the
        samples were (``t`` or ``t − row max``); it must match the calibration config and is recorded
        so inference refuses the other kind.
        """
        agg, trim = self._aggregation(calibration, aggregation, trim_fraction)
        ref = _setting(ThetaReference, "theta_reference", theta_reference,
                       calibration.theta_reference if calibration is not None else None, ThetaReference.ABSOLUTE)
        used = torch.nonzero(self.count.sum((0, 1)))
        nb = int(used.max()) + 1 if used.numel() else 1  # trailing empty bins carry nothing: shape is order-free
        count, t_sum, t_sumsq, du_sum = (t[..., :nb].cpu() for t in self.tensors())
        cells = BinSamples(count, t_sum, t_sumsq)
        if agg.needs_samples:
            x, held = self.samples.sorted_samples(nb)
            cells = BinSamples(count, t_sum, t_sumsq, x, held)
        loc, scale = AGGREGATIONS[agg](cells, trim)
        if agg.needs_samples:  # uncalibrated cells hold 0, as mean-std leaves them
            loc, scale = torch.where(count > 0, loc, 0.0), torch.where(count > 0, scale, 0.0)
        du = du_sum / count.clamp_min(1)
        meta = {
            "format_version": FORMAT_VERSION,
            "model": fingerprint.to_dict(),
            "k": k.to_dict(),
            "sigma": sigma,
            "placement": Placement(placement).value,
            "bin_width": self.bin_width,
            "calibration": calibration.to_dict() if calibration else None,
            "data": data,
            "rows_sampled": self.rows_seen,
            "aggregation": agg.value,
            "statistics": STATISTICS[agg],
            "theta_reference": ref.value,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if agg is Aggregation.TRIMMED_MEAN:
            meta["trim_fraction"] = trim
        if agg.needs_samples:
            cal = count > 0
            meta["reservoir"] = {"capacity": self.samples.capacity, "calibrated_cells": int(cal.sum()),
                                 "sampled_cells": int((count > self.samples.capacity).sum()),  # the rest are exact
                                 "max_count": int(count.max())}
        meta.update(extra or {})
        return Thresholds(count=count, t_mean=loc, t_std=scale, sdc_mean=du, meta=meta)

    def _aggregation(self, calibration: CalibrationConfig | None, aggregation,
                     trim_fraction) -> tuple[Aggregation, float]:
        agg = _setting(Aggregation, "aggregation", aggregation,
                       calibration.aggregation if calibration is not None else None, Aggregation.MEAN_STD)
        trim = trim_fraction if trim_fraction is not None else (calibration.trim_fraction if calibration else 0.1)
        if not (0.0 <= trim < 0.5):
            raise ConfigError(f"trim_fraction must be in [0, 0.5), got {trim!r}")
        if agg.needs_samples and self.samples is None:
            raise ValueError(f"aggregation={agg.value} needs the threshold samples, but these statistics keep no "
                             "sample reservoir: build them with ThresholdStats.for_config(config) or "
                             "reservoir_capacity > 0")
        return agg, float(trim)


