"""Looking θ up by row length: gap-filled tables per (layer, head, length bin) and the lookup rules.

A threshold artifact stores θ and the offline SDC term only at calibrated length bins.
:func:`build_tables` fills the gaps (linear or nearest, per :class:`~topθ_core.config.Lookup`),
optionally after a count-weighted smoothing over neighbouring bins, and fits ``θ ≈ a + b·ln L``
per head; :func:`lookup_rows` reads them for a batch of row lengths in a fixed number of tensor
ops (no Python loop over heads or rows).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .config import Lookup


class ThetaTables(NamedTuple):
    """Device tables of one (lookup rule, σ, smoothing): ``theta``/``sdc`` (n_layers, n_heads, n_used)
    float32, the calibrated length range ``lo_len``/``hi_len`` (n_layers, n_heads), the log fit ``a``/``b``."""

    theta: torch.Tensor
    sdc: torch.Tensor
    lo_len: torch.Tensor
    hi_len: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def build_tables(theta: torch.Tensor, sdc: torch.Tensor, count: torch.Tensor, bin_width: int, lookup: Lookup,
                 smoothing: int, device) -> ThetaTables:
    """Gap-filled tables for ``lookup`` from θ/SDC at calibrated bins (NaN θ where uncalibrated)."""
    if smoothing:
        theta, sdc = smooth_bins(theta, sdc, count, smoothing)
    table_lookup = Lookup.INTERPOLATE if lookup is Lookup.FIT_LOG else lookup
    th, sd, lo_bin, hi_bin = _fill_tables(theta, sdc, count, table_lookup)
    lo_len, hi_len = lo_bin * bin_width + 1, (hi_bin + 1) * bin_width  # calibrated length range per head
    a, b = fit_log_length(theta, count, bin_width)
    return ThetaTables(*(t.to(device) for t in (th, sd, lo_len, hi_len, a, b)))


def lookup_rows(tables: ThetaTables, layer: int | None, row_len: torch.Tensor, lookup: Lookup, bin_width: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """θ, SDC term and extrapolated flags for ``row_len`` (B, R) → (B, H, R) each
    (with a leading layer axis when ``layer`` is None); see :meth:`Thresholds.lookup`."""
    layers = slice(None) if layer is None else slice(layer, layer + 1)
    th, sd = tables.theta[layers], tables.sdc[layers]  # (nl, H, nb)
    nb = th.shape[-1]
    w = bin_width
    L = row_len.to(torch.float32)
    if lookup is Lookup.NEAREST:
        b = torch.div(row_len.to(torch.long) - 1, w, rounding_mode="floor").clamp(0, nb - 1)
        theta, sdc = th[:, :, b], sd[:, :, b]  # (nl, H, B, R)
    else:
        pos = (L - (w + 1) / 2) / w
        b0 = pos.floor().clamp(0, nb - 1).to(torch.long)
        b1 = (b0 + 1).clamp(max=nb - 1)
        f = (pos - b0.to(pos.dtype)).clamp(0, 1)
        theta = th[:, :, b0] + f * (th[:, :, b1] - th[:, :, b0])
        sdc = sd[:, :, b0] + f * (sd[:, :, b1] - sd[:, :, b0])
        if lookup is Lookup.FIT_LOG:  # (nl, H, 1, 1); NaN where uncalibrated
            a, bb = tables.a[layers].unsqueeze(-1).unsqueeze(-1), tables.b[layers].unsqueeze(-1).unsqueeze(-1)
            theta = a + bb * torch.log(L.clamp_min(1.0))
    theta, sdc = theta.permute(0, 2, 1, 3), sdc.permute(0, 2, 1, 3)  # (nl, B, H, R)
    lo_l = tables.lo_len[layers].unsqueeze(1).unsqueeze(-1)  # (nl, 1, H, 1)
    hi_l = tables.hi_len[layers].unsqueeze(1).unsqueeze(-1)
    extrap = (row_len.unsqueeze(1) < lo_l) | (row_len.unsqueeze(1) > hi_l)
    uncal = torch.isnan(theta)
    theta = torch.where(uncal, torch.full_like(theta, float("-inf")), theta).float()
    sdc = torch.where(uncal, torch.zeros_like(sdc), sdc).float()
    extrap = extrap | uncal
    if layer is not None:
        theta, sdc, extrap = theta[0], sdc[0], extrap[0]
    return theta.contiguous(), sdc.contiguous(), extrap.contiguous()


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
