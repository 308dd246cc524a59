"""Sweeps over Top-θ settings, distribution shift, and automatic per-layer k search.

Building blocks (pure functions over a loaded model; no files written unless asked):

* :func:`split_corpus` — a fixed calibration / held-out split of a bundled corpus
  (even-indexed documents calibrate, odd-indexed ones evaluate), so no evaluated text
  was seen by the calibration.
* :func:`cached_thresholds` — calibrate once per (model, corpus, calibration config) and
  reuse the artifact from ``data/cache/thresholds/`` afterwards.
* :func:`sweep_configs` — the grid of the issue: k ∈ {8, 16, 32, 64, 128}, placement
  pre/post, SDC none/exact/exp-threshold/offline, VMC on/off, top-k vs Top-θ.
* :func:`run_sweep` — perplexity (and optionally task accuracy) for every config, with the
  dense passes computed once and shared; returns a tidy DataFrame.
* :func:`distribution_shift` — thresholds calibrated on each corpus, evaluated on each
  corpus (in-domain on the diagonal).
* :func:`search_layer_k` — greedy per-layer k search under an accuracy budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from .calibration import calibrate
from .config import SDC, CalibrationConfig, KSchedule, Placement, Selection, SparseConfig
from .thresholds import Thresholds, load_thresholds
from . import tasks
from .evaluation import heldout_documents

ProgressFn = Callable[[int, int], None]

DATA_DIR = Path(os.environ.get("TOPTHETA_DATA", Path(__file__).resolve().parents[1] / "data"))
CACHE_DIR = DATA_DIR / "cache" / "thresholds"

SWEEP_KS = (8, 16, 32, 64, 128)
PAPER_DENSE_LAYERS = {0: 512, 1: 512}


# --------------------------------------------------------------------------- data
def split_corpus(name: str, part: str, n: int | None = None, *, min_chars: int = 0) -> list[str]:
    """See :func:`topθ_core.evaluation.heldout_documents` (even documents calibrate, odd ones evaluate)."""
    return heldout_documents(name, n, min_chars=min_chars, part=part)


# --------------------------------------------------------------------------- thresholds
def _cache_key(lm, corpus: str, cal: CalibrationConfig, n_docs: int, max_tokens: int, min_chars: int) -> str:
    payload = json.dumps({"model": lm.fingerprint.digest, "corpus": corpus, "cal": cal.to_dict(),
                          "n": n_docs, "max_tokens": max_tokens, "min_chars": min_chars}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_thresholds(lm, corpus: str, cal: CalibrationConfig, *, n_docs: int = 6, max_tokens: int = 1024,
                      min_chars: int = 4000,
                      cache_dir: Path | None = None, progress: ProgressFn | None = None,
                      log: Callable[[str], None] | None = None) -> Thresholds:
    """Calibrate on the calibration half of ``corpus`` (first ``n_docs`` packed documents of
    ≥ ``min_chars`` characters, each truncated to ``max_tokens`` tokens), caching the artifact
    under ``data/cache/thresholds/`` keyed by model, corpus and calibration settings."""
    cache_dir = Path(cache_dir or CACHE_DIR)
    key = _cache_key(lm, corpus, cal, n_docs, max_tokens, min_chars)
    path = cache_dir / f"{corpus}-k{cal.k.default}-{cal.placement.value}-{key}"
    if path.is_dir():
        return load_thresholds(path, expect_model=lm.fingerprint)
    texts = split_corpus(corpus, "calibration", n_docs, min_chars=min_chars)
    t0 = time.perf_counter()
    th = calibrate(lm, texts, cal, max_length=max_tokens, progress=progress,
                   data_description=f"bundled corpus {corpus!r}, calibration half, {n_docs} docs ≤ {max_tokens} tokens")
    if log:
        log(f"calibrated {path.name} in {time.perf_counter() - t0:.1f}s")
    th.save(path, overwrite=True)
    return th
