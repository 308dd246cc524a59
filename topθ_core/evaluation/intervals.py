"""Paired intervals: how sure a sparse − dense difference is, resampling the evaluated items."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def paired_bootstrap(dense: Sequence[float], sparse: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean paired difference ``sparse − dense`` and its percentile bootstrap interval.

    Items are resampled with replacement (the same items for both arms), ``n_boot`` times;
    the interval is the ``alpha/2`` and ``1 − alpha/2`` percentiles of the resampled means.
    """
    a, b = np.asarray(dense, dtype=np.float64), np.asarray(sparse, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("dense and sparse must be 1-D and of equal length (paired items)")
    n = a.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    d = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s in range(0, n_boot, 256):  # bounded memory: (256, n) indices at a time
        idx = rng.integers(0, n, size=(min(256, n_boot - s), n))
        means[s:s + idx.shape[0]] = d[idx].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(d.mean()), float(lo), float(hi)


def ratio_bootstrap(num_d, num_s, den, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
                    transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float, float, float]:
    """Paired bootstrap over documents of ``f(Σnum_s/Σden) − f(Σnum_d/Σden)`` (pooled ratios)."""
    nd, ns, dn = (np.asarray(x, dtype=np.float64) for x in (num_d, num_s, den))
    f = transform or (lambda x: x)
    point = float(f(ns.sum() / dn.sum()) - f(nd.sum() / dn.sum()))
    n = dn.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    den_b = dn[idx].sum(1)
    diffs = f(ns[idx].sum(1) / den_b) - f(nd[idx].sum(1) / den_b)
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)
