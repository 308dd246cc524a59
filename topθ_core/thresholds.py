"""The threshold artifact inference reads: :class:`Thresholds`, saved and loaded.

θ = t_mean + σ·t_std per (layer, head, length bin) with the offline SDC term ``C`` beside it,
made by :meth:`~topθ_core.statistics.ThresholdStats.finalize`.  ``Thresholds.save`` writes a
directory (``thresholds.parquet`` + ``meta.json``) atomically; :func:`load_thresholds` refuses
an artifact made for another model; :meth:`Thresholds.lookup` reads θ by row length
(:mod:`topθ_core.lookup`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .atomic import atomic_dir
from .config import Aggregation, KSchedule, Lookup, Placement, ThetaReference
from .fingerprint import ModelFingerprint
from .lookup import build_tables, lookup_rows

FORMAT_VERSION = 1
TABLE_FILE = "thresholds.parquet"
META_FILE = "meta.json"


class ThresholdsError(ValueError):
    """A threshold artifact that cannot be used (missing, malformed, or for another model)."""


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
        (:func:`~topθ_core.lookup.smooth_bins`).  ``Lookup.FIT_LOG`` reads θ from the per-head fit
        ``a + b·ln L`` (:func:`~topθ_core.lookup.fit_log_length`), which extrapolates in ln L beyond
        the calibrated range; its SDC term is interpolated (flat beyond).
        """
        key = (lookup, str(row_len.device), self.sigma, smoothing)
        if key not in self._tables:  # gap-filled device tables, built once per key
            self._tables[key] = build_tables(self.theta, self.sdc_mean, self.count, self.bin_width, lookup,
                                             smoothing, row_len.device)
        return lookup_rows(self._tables[key], layer, row_len, lookup, self.bin_width)

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
        with atomic_dir(path, overwrite) as tmp:
            self.to_frame().to_parquet(tmp / TABLE_FILE, index=False)
            meta = dict(self.meta, shape=list(self.count.shape))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(path)

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
