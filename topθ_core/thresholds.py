"""Threshold statistics (mergeable) and the threshold artifact inference reads.

Calibration accumulates :class:`ThresholdStats`: per (layer, query head, length bin) the
count, sum and sum of squares of the per-row threshold samples ``t`` (the (k+1)-th largest
visible score) and the sum of the dropped softmax mass ``D_U``.  Statistics from several
batches, processes or machines merge by addition (:meth:`ThresholdStats.merge`).  The robust
aggregations (median, trimmed mean) also need the samples: a :class:`SampleReservoir` keeps a
uniform sample of at most ``capacity`` of them per cell, and merges too.

:meth:`ThresholdStats.finalize` turns them into :class:`Thresholds`: a location ``t_mean`` and
a scale ``t_std`` per cell (mean and std, median and 1.4826·MAD, or trimmed mean and trimmed
std: :data:`AGGREGATIONS`), θ = t_mean + σ·t_std, and dense tensors ``θ[layer, head, bin]``
and ``C[layer, head, bin]`` with the gaps between calibrated bins filled, ready for
vectorised lookup by row length.  ``Thresholds.save`` writes a directory
(``thresholds.parquet`` + ``meta.json``) atomically; ``load_thresholds`` refuses an
artifact made for another model.

Length bins: bin ``b`` holds row lengths ``b·w+1 … (b+1)·w`` (``w = bin_width``); its
centre is ``b·w + (w+1)/2``.  With ``w = 1`` a bin is one exact length.
"""

from __future__ import annotations

import enum
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from .config import (Aggregation, CalibrationConfig, ConfigError, KSchedule, Lookup, Placement, ThetaReference,
                     enum_value)

FORMAT_VERSION = 1
TABLE_FILE = "thresholds.parquet"
META_FILE = "meta.json"


class ThresholdsError(ValueError):
    """A threshold artifact that cannot be used (missing, malformed, or for another model)."""


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the model thresholds belong to."""

    name: str
    digest: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFingerprint":
        return cls(**{k: d[k] for k in ("name", "digest", "n_layers", "n_heads", "n_kv_heads", "head_dim")})

    def describe(self) -> str:
        return f"{self.name} ({self.n_layers} layers, {self.n_heads}/{self.n_kv_heads} heads, digest {self.digest[:12]})"


def _bin_of(lengths: torch.Tensor, bin_width: int) -> torch.Tensor:
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
        bins = _bin_of(lengths.to(torch.long), self.bin_width)
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


@dataclass
class Thresholds:
    """Calibrated thresholds for one model: θ = t_mean + σ·t_std per (layer, head, length bin).

    ``count``, ``t_mean``, ``t_std``, ``sdc_mean``: (n_layers, n_heads, n_bins) float64 CPU
    tensors (bins with count 0 are uncalibrated).  ``t_mean``/``t_std`` are the location and
    scale of the calibration's :attr:`aggregation`: mean and population std (mean-std),
    median and 1.4826·MAD (median), or trimmed mean and trimmed std (trimmed-mean); everything
    downstream (σ, lookup, smoothing) treats them alike.  Derived, gap-filled device tables are
    built lazily per (device, lookup) and cached.
    """

    count: torch.Tensor
    t_mean: torch.Tensor
    t_std: torch.Tensor
    sdc_mean: torch.Tensor
    meta: dict[str, Any]
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- provenance -------------------------------------------------------------------
    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint.from_dict(self.meta["model"])

    @property
    def k(self) -> KSchedule:
        return KSchedule.from_dict(self.meta["k"])

    @property
    def sigma(self) -> float:
        return float(self.meta["sigma"])

    @property
    def placement(self) -> Placement:
        return Placement(self.meta["placement"])

    @property
    def aggregation(self) -> Aggregation:
        """How ``t_mean``/``t_std`` were formed (artifacts written before robust aggregation: mean-std)."""
        return Aggregation(self.meta.get("aggregation", Aggregation.MEAN_STD.value))

    @property
    def theta_reference(self) -> ThetaReference:
        """What θ is compared with: the score (``absolute``; artifacts written before the option) or the
        score minus its row's maximum (``row-max``)."""
        try:
            return ThetaReference(self.meta.get("theta_reference", ThetaReference.ABSOLUTE.value))
        except ValueError:
            raise ThresholdsError(f"unknown theta_reference {self.meta.get('theta_reference')!r} in the "
                                  "thresholds' meta") from None

    @property
    def bin_width(self) -> int:
        return int(self.meta["bin_width"])

    @property
    def n_layers(self) -> int:
        return self.count.shape[0]

    @property
    def n_heads(self) -> int:
        return self.count.shape[1]

    @property
    def theta(self) -> torch.Tensor:
        """(n_layers, n_heads, n_bins) θ at calibrated bins (NaN where uncalibrated)."""
        th = self.t_mean + self.sigma * self.t_std
        return torch.where(self.count > 0, th, torch.full_like(th, float("nan")))

    def with_sigma(self, sigma: float) -> "Thresholds":
        """The same statistics with another σ (no recalibration needed)."""
        meta = dict(self.meta, sigma=float(sigma))
        return Thresholds(self.count, self.t_mean, self.t_std, self.sdc_mean, meta)

    @property
    def sdc_source(self) -> str:
        """What the offline SDC term is the mean dropped mass of: ``"top-k"`` (old artifacts) or ``"theta"``."""
        return str(self.meta.get("sdc_source", "top-k"))

    def with_sdc(self, sdc_mean: torch.Tensor, source: str, **meta) -> "Thresholds":
        """The same θ statistics with another offline SDC term table (n_layers, n_heads, n_bins).

        Bins beyond ``sdc_mean``'s last one keep the current term."""
        new = self.sdc_mean.clone()
        nb = min(new.shape[-1], sdc_mean.shape[-1])
        new[..., :nb] = sdc_mean[..., :nb].to(new)
        return Thresholds(self.count, self.t_mean, self.t_std, new, dict(self.meta, sdc_source=source, **meta))

    def check_model(self, fingerprint: ModelFingerprint) -> None:
        mine = self.fingerprint
        if mine.digest != fingerprint.digest or (mine.n_layers, mine.n_heads) != (fingerprint.n_layers, fingerprint.n_heads):
            raise ThresholdsError(
                f"these thresholds were calibrated for {mine.describe()}, "
                f"but the loaded model is {fingerprint.describe()}; calibrate for this model first"
            )

    # ---- lookup -----------------------------------------------------------------------
    def _filled(self, lookup: Lookup, device, smoothing: int = 0) -> tuple[torch.Tensor, ...]:
        key = (lookup, str(device), self.sigma, smoothing)
        if key not in self._tables:
            theta, sdc = self.theta, self.sdc_mean
            if smoothing:
                theta, sdc = smooth_bins(theta, sdc, self.count, smoothing)
            table_lookup = Lookup.INTERPOLATE if lookup is Lookup.FIT_LOG else lookup
            th, sdc, lo_bin, hi_bin = _fill_tables(theta, sdc, self.count, table_lookup)
            w = self.bin_width
            lo_len, hi_len = lo_bin * w + 1, (hi_bin + 1) * w  # calibrated length range per head
            a, b = fit_log_length(theta, self.count, w)
            self._tables[key] = tuple(t.to(device) for t in (th, sdc, lo_len, hi_len, a, b))
        return self._tables[key]

    def lookup(self, layer: int | None, row_len: torch.Tensor, lookup: Lookup = Lookup.INTERPOLATE, smoothing: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ and the offline SDC term for rows of a layer.

        ``row_len`` (B, R) int → ``theta`` (B, H, R) float32, ``sdc`` (B, H, R) float32 and
        ``extrapolated`` (B, H, R) bool (length outside the calibrated range of that head, or
        a head never calibrated at this layer: such rows get θ = −∞, i.e. they stay dense).
        ``layer=None`` looks up every layer at once: each output gains a leading layer axis,
        (n_layers, B, H, R), in the same number of tensor ops as one layer (a decode step's
        rows have one length for all layers, so :mod:`integration` does this once per step).
        ``smoothing``: half-width in bins of a count-weighted moving average applied first
        (:func:`smooth_bins`).  ``Lookup.FIT_LOG`` reads θ from the per-head fit
        ``a + b·ln L`` (:func:`fit_log_length`), which extrapolates in ln L beyond the
        calibrated range; its SDC term is interpolated (flat beyond).
        """
        theta_t, sdc_t, lo, hi, fa, fb = self._filled(lookup, row_len.device, smoothing)
        layers = slice(None) if layer is None else slice(layer, layer + 1)
        th, sd = theta_t[layers], sdc_t[layers]  # (nl, H, nb)
        nb = th.shape[-1]
        w = self.bin_width
        L = row_len.to(torch.float32)
        if lookup is Lookup.NEAREST:
            b = _bin_of(row_len.to(torch.long), w).clamp(0, nb - 1)
            theta, sdc = th[:, :, b], sd[:, :, b]  # (nl, H, B, R)
        else:
            pos = (L - (w + 1) / 2) / w
            b0 = pos.floor().clamp(0, nb - 1).to(torch.long)
            b1 = (b0 + 1).clamp(max=nb - 1)
            f = (pos - b0.to(pos.dtype)).clamp(0, 1)
            theta = th[:, :, b0] + f * (th[:, :, b1] - th[:, :, b0])
            sdc = sd[:, :, b0] + f * (sd[:, :, b1] - sd[:, :, b0])
            if lookup is Lookup.FIT_LOG:  # (nl, H, 1, 1); NaN where uncalibrated
                a, bb = fa[layers].unsqueeze(-1).unsqueeze(-1), fb[layers].unsqueeze(-1).unsqueeze(-1)
                theta = a + bb * torch.log(L.clamp_min(1.0))
        theta, sdc = theta.permute(0, 2, 1, 3), sdc.permute(0, 2, 1, 3)  # (nl, B, H, R)
        lo_l, hi_l = lo[layers].unsqueeze(1).unsqueeze(-1), hi[layers].unsqueeze(1).unsqueeze(-1)  # (nl, 1, H, 1)
        extrap = (row_len.unsqueeze(1) < lo_l) | (row_len.unsqueeze(1) > hi_l)
        uncal = torch.isnan(theta)
        theta = torch.where(uncal, torch.full_like(theta, float("-inf")), theta).float()
        sdc = torch.where(uncal, torch.zeros_like(sdc), sdc).float()
        extrap = extrap | uncal
        if layer is not None:
            theta, sdc, extrap = theta[0], sdc[0], extrap[0]
        return theta.contiguous(), sdc.contiguous(), extrap.contiguous()

    # ---- persistence ------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per calibrated (layer, head, length bin)."""
        idx = torch.nonzero(self.count > 0, as_tuple=False)
        if idx.numel() == 0:
            return pd.DataFrame(columns=["layer", "head", "bin", "length_lo", "length_hi", "length", "theta",
                                         "t_mean", "t_std", "count", "sdc_term"])
        l, h, b = idx.T
        w = self.bin_width
        theta = self.theta
        return pd.DataFrame({
            "layer": l.numpy().astype(np.int32),
            "head": h.numpy().astype(np.int32),
            "bin": b.numpy().astype(np.int32),
            "length_lo": (b * w + 1).numpy().astype(np.int64),
            "length_hi": ((b + 1) * w).numpy().astype(np.int64),
            "length": (b * w + (w + 1) / 2).numpy().astype(np.float64),
            "theta": theta[l, h, b].numpy(),
            "t_mean": self.t_mean[l, h, b].numpy(),
            "t_std": self.t_std[l, h, b].numpy(),
            "count": self.count[l, h, b].numpy().astype(np.int64),
            "sdc_term": self.sdc_mean[l, h, b].numpy(),
        })

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``path/`` atomically (temp dir beside it, then rename)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            self.to_frame().to_parquet(tmp / TABLE_FILE, index=False)
            meta = dict(self.meta, shape=list(self.count.shape))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def from_frame(cls, df: pd.DataFrame, meta: dict) -> "Thresholds":
        n_layers, n_heads, n_bins = meta["shape"]
        z = lambda: torch.zeros(n_layers, n_heads, n_bins, dtype=torch.float64)  # noqa: E731
        count, mean, std, sdc = z(), z(), z(), z()
        if len(df):
            l = torch.as_tensor(df["layer"].to_numpy().copy(), dtype=torch.long)
            h = torch.as_tensor(df["head"].to_numpy().copy(), dtype=torch.long)
            b = torch.as_tensor(df["bin"].to_numpy().copy(), dtype=torch.long)
            if int(l.max()) >= n_layers or int(h.max()) >= n_heads or int(b.max()) >= n_bins or int(l.min()) < 0:
                raise ThresholdsError("threshold table indices fall outside the shape its meta.json declares")
            count[l, h, b] = torch.as_tensor(df["count"].to_numpy().copy(), dtype=torch.float64)
            mean[l, h, b] = torch.as_tensor(df["t_mean"].to_numpy().copy(), dtype=torch.float64)
            std[l, h, b] = torch.as_tensor(df["t_std"].to_numpy().copy(), dtype=torch.float64)
            sdc[l, h, b] = torch.as_tensor(df["sdc_term"].to_numpy().copy(), dtype=torch.float64)
        meta = {k: v for k, v in meta.items() if k != "shape"}
        return cls(count=count, t_mean=mean, t_std=std, sdc_mean=sdc, meta=meta)


REQUIRED_COLUMNS = {"layer", "head", "bin", "t_mean", "t_std", "count", "sdc_term"}


def load_thresholds(path: str | os.PathLike, expect_model: ModelFingerprint | None = None) -> Thresholds:
    """Read an artifact directory; with ``expect_model`` refuse thresholds for another model."""
    path = Path(path)
    if not path.is_dir():
        raise ThresholdsError(f"threshold directory {path} does not exist")
    table, meta_file = path / TABLE_FILE, path / META_FILE
    for f in (table, meta_file):
        if not f.is_file():
            raise ThresholdsError(f"{path} is not a threshold artifact: {f.name} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ThresholdsError(f"{meta_file} is not valid JSON: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ThresholdsError(f"{meta_file}: format version {meta.get('format_version')!r} is not supported "
                              f"(this version reads {FORMAT_VERSION})")
    for key in ("model", "k", "sigma", "placement", "bin_width", "shape"):
        if key not in meta:
            raise ThresholdsError(f"{meta_file} lacks the field {key!r}")
    try:
        df = pd.read_parquet(table)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise ThresholdsError(f"{table} is not a readable Parquet file: {e}") from None
    missing = REQUIRED_COLUMNS - set(df.columns)
    if missing:
        raise ThresholdsError(f"{table} lacks columns {sorted(missing)}")
    th = Thresholds.from_frame(df, meta)
    th.theta_reference  # refuses an unknown kind of θ now, not at the first forward
    if expect_model is not None:
        th.check_model(expect_model)
    return th


def smooth_bins(theta: torch.Tensor, sdc: torch.Tensor, count: torch.Tensor, half_width: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Count-weighted moving average over ±``half_width`` length bins, per (layer, head).

    ``θ'[b] = Σ_{|b'−b|≤w} n[b']·θ[b'] / Σ_{|b'−b|≤w} n[b']`` (same for the SDC term), at
    calibrated bins only (uncalibrated bins stay NaN for θ).  Shapes (n_layers, n_heads, n_bins).
    """
    if half_width <= 0:
        return theta, sdc
    n = count.to(torch.float64)
    cal = n > 0
    kernel = torch.ones(1, 1, 2 * half_width + 1, dtype=torch.float64)

    def conv(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, 1, x.shape[-1])
        return torch.nn.functional.conv1d(flat, kernel, padding=half_width).reshape(x.shape)

    den = conv(n)
    th = torch.where(cal, theta.to(torch.float64), 0.0)
    out_th = conv(n * th) / den.clamp_min(1e-300)
    out_sd = conv(n * sdc.to(torch.float64)) / den.clamp_min(1e-300)
    nan = torch.full_like(out_th, float("nan"))
    return torch.where(cal, out_th, nan), torch.where(cal, out_sd, torch.zeros_like(out_sd))


def fit_log_length(theta: torch.Tensor, count: torch.Tensor, bin_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (layer, head) weighted least-squares fit ``θ ≈ a + b·ln L`` over calibrated bins.

    ``L`` is the bin centre, the weight of a bin its sample count.  Returns ``a`` and ``b``
    (n_layers, n_heads) float32; a head with one calibrated bin gets ``b = 0``, one with none NaN.
    """
    n_bins = theta.shape[-1]
    centre = torch.arange(n_bins, dtype=torch.float64) * bin_width + (bin_width + 1) / 2
    x = torch.log(centre).expand_as(theta)
    w = count.to(torch.float64) * (count > 0)
    y = torch.where(count > 0, theta.to(torch.float64), 0.0)
    sw = w.sum(-1)
    mx = (w * x).sum(-1) / sw.clamp_min(1e-300)
    my = (w * y).sum(-1) / sw.clamp_min(1e-300)
    sxx = (w * (x - mx.unsqueeze(-1)) ** 2).sum(-1)
    sxy = (w * (x - mx.unsqueeze(-1)) * (y - my.unsqueeze(-1))).sum(-1)
    b = torch.where(sxx > 1e-12, sxy / sxx.clamp_min(1e-300), torch.zeros_like(sxx))
    a = my - b * mx
    none = sw <= 0
    a = torch.where(none, torch.full_like(a, float("nan")), a)
    return a.float(), b.float()


def _fill_tables(theta: torch.Tensor, sdc: torch.Tensor, count: torch.Tensor, lookup: Lookup):
    """Fill uncalibrated bins between calibrated ones (linear or nearest), per (layer, head).

    Returns ``theta`` and ``sdc`` (n_layers, n_heads, n_used) float32, where ``n_used`` is one
    past the last calibrated bin of any head, and the calibrated length range ``lo``/``hi``
    (n_layers, n_heads) in bins (lo > hi where a head has no calibrated bin).  Heads with no
    calibrated bin at all get NaN (their rows stay dense).
    """
    n_layers, n_heads, n_bins = count.shape
    cal = count > 0
    any_bins = torch.nonzero(cal.any(0).any(0))
    n_used = int(any_bins.max()) + 1 if any_bins.numel() else 1
    th_out = np.full((n_layers, n_heads, n_used), np.nan)
    sd_out = np.zeros((n_layers, n_heads, n_used))
    lo = np.full((n_layers, n_heads), 1 << 40, dtype=np.int64)
    hi = np.zeros((n_layers, n_heads), dtype=np.int64)
    bins = np.arange(n_used)
    cal_np, th_np, sd_np = cal.numpy(), theta.numpy(), sdc.numpy()
    for l in range(n_layers):
        for h in range(n_heads):
            c = np.nonzero(cal_np[l, h, :n_used])[0]
            if c.size == 0:
                continue
            lo[l, h], hi[l, h] = c[0], c[-1]
            if lookup is Lookup.NEAREST:
                pos = np.searchsorted(c, bins).clip(1, c.size - 1) if c.size > 1 else np.zeros_like(bins)
                if c.size > 1:
                    left, right = c[pos - 1], c[pos]
                    pick = np.where(np.abs(bins - left) <= np.abs(right - bins), left, right)
                else:
                    pick = np.full_like(bins, c[0])
                th_out[l, h] = th_np[l, h, pick]
                sd_out[l, h] = sd_np[l, h, pick]
            else:
                th_out[l, h] = np.interp(bins, c, th_np[l, h, c])
                sd_out[l, h] = np.interp(bins, c, sd_np[l, h, c])
    return (torch.from_numpy(th_out).float(), torch.from_numpy(sd_out).float(),
            torch.from_numpy(lo), torch.from_numpy(hi))
