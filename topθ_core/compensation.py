"""Compensation variants: SDC estimates of the dropped softmax mass, and VMC.

Notation (SPEC.md): ``m`` the row maximum over all visible elements,
``e = exp(a − m)`` on visible keys (0 elsewhere), ``S`` the kept set, ``U`` the visible
dropped set, ``D_S = Σ_S e``, ``D_U = Σ_U e``.  Pre-softmax with SDC gives

    p̂_ij = e_ij / (D_S + s · D̃_U)      for j ∈ S

Each SDC variant is a pure function returning ``D̃_U`` with shape (B, H, R), keyed by
:class:`~topθ_core.config.SDC`.  Rows whose ``U`` is empty get ``D̃_U = 0`` in every
variant (nothing was dropped, so nothing is compensated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import SDC


@dataclass(frozen=True)
class RowTerms:
    """What an SDC estimate may read for a block of rows (all (B, H, R) unless noted)."""

    e: torch.Tensor  # (B, H, R, N) exp(a − m) on visible keys, 0 elsewhere
    d_s: torch.Tensor  # D_S = Σ_S e
    n_dropped: torch.Tensor  # |U|: visible elements not kept (int)
    m: torch.Tensor  # row max of the logits over visible keys
    theta: "torch.Tensor | None"  # θ per row (logit space), None when not thresholded
    offline: "torch.Tensor | None"  # C[layer, head, L] per row, None when not calibrated


SdcFn = Callable[[RowTerms], torch.Tensor]


def sdc_none(t: RowTerms) -> torch.Tensor:
    """D̃_U = 0: kept probabilities are renormalised to sum to 1."""
    return t.m.new_zeros(t.m.shape)


def sdc_exact(t: RowTerms) -> torch.Tensor:
    """D̃_U = D_U = Σ_{j∈U} e^(a_ij − m_i): with s = 1 kept probabilities equal their dense values.

    Computed as ``Σ_visible e − D_S`` (one reduction instead of a mask and a product; ``e`` is 0
    at invisible keys), and exactly 0 where nothing was dropped.
    """
    return torch.where(t.n_dropped > 0, (t.e.sum(-1) - t.d_s).clamp_min(0.0), 0.0)


def sdc_exp_threshold(t: RowTerms) -> torch.Tensor:
    """D̃_U = |U| · e^(θ − m): an upper bound; |U| counts visible dropped elements only."""
    if t.theta is None:
        raise ValueError("exp-threshold SDC needs θ")
    n_dropped = t.n_dropped.to(t.m.dtype)
    return torch.where(n_dropped > 0, n_dropped * torch.exp(t.theta - t.m), 0.0)


def sdc_offline(t: RowTerms) -> torch.Tensor:
    """D̃_U = C[ℓ, h, L]: the calibration-time mean of D_U for that layer, head and length."""
    if t.offline is None:
        raise ValueError("offline SDC needs calibrated SDC terms (thresholds without them?)")
    return torch.where(t.n_dropped > 0, t.offline.to(t.m.dtype), 0.0)


SDC_ESTIMATES: dict[SDC, SdcFn] = {
    SDC.NONE: sdc_none,
    SDC.EXACT: sdc_exact,
    SDC.EXP_THRESHOLD: sdc_exp_threshold,
    SDC.OFFLINE: sdc_offline,
}


def v_mean_compensation(out: torch.Tensor, p_sum: torch.Tensor, v_mean: torch.Tensor) -> torch.Tensor:
    """VMC: ``o_i = Σ_S p̂_ij v_j + (1 − Σ_S p̂_ij) · v̄_i``.

    ``out`` (B, H, R, d) is ``Σ_S p̂ v``; ``p_sum`` (B, H, R); ``v_mean`` (B, H, R, d) the mean
    of the row's visible V rows.
    """
    return out + (1.0 - p_sum).unsqueeze(-1) * v_mean
