"""Sweeps over Top-θ settings and distribution shift.

Building blocks (pure functions over a loaded model; no files written unless asked):

* :func:`cached_thresholds` — calibrate once per (model, corpus, calibration config) and
  reuse the artifact from ``data/cache/thresholds/`` afterwards.
* :func:`sweep_configs` — the grid of the issue: k ∈ {8, 16, 32, 64, 128}, placement
  pre/post, SDC none/exact/exp-threshold/offline, VMC on/off, top-k vs Top-θ.
* :func:`run_sweep` — perplexity (and optionally task accuracy) for every config, with the
  dense passes computed once and shared; returns a tidy DataFrame.
* :func:`distribution_shift` — thresholds calibrated on each corpus, evaluated on each
  corpus (in-domain on the diagonal).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from .calibration import calibrate
from .config import SDC, CalibrationConfig, KSchedule, Placement, Selection, SparseConfig
from .paths import DATA_DIR
from .tasks import heldout_documents
from .thresholds import Thresholds, load_thresholds

ProgressFn = Callable[[int, int], None]

CACHE_DIR = DATA_DIR / "cache" / "thresholds"

SWEEP_KS = (8, 16, 32, 64, 128)
PAPER_DENSE_LAYERS = {0: 512, 1: 512}


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
    texts = heldout_documents(corpus, n_docs, min_chars=min_chars, part="calibration")
    t0 = time.perf_counter()
    th = calibrate(lm, texts, cal, max_length=max_tokens, progress=progress,
                   data_description=f"bundled corpus {corpus!r}, calibration half, {n_docs} docs ≤ {max_tokens} tokens")
    if log:
        log(f"calibrated {path.name} in {time.perf_counter() - t0:.1f}s")
    th.save(path, overwrite=True)
    return th


# --------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class SweepPoint:
    """One sweep configuration; ``calibration`` says which thresholds it needs (None: top-k/dense)."""

    config: SparseConfig
    calibration: CalibrationConfig | None = None
    group: str = ""

    @property
    def label(self) -> str:
        return self.config.label()


def _schedule(k: int, dense_layers: dict[int, int] | None) -> KSchedule:
    return KSchedule(k, dict(dense_layers or {}))


def sweep_configs(ks: Iterable[int] = SWEEP_KS, *, dense_layers: dict[int, int] | None = None,
                  variant_ks: Iterable[int] = (64,), variants: bool = True, post: bool = True,
                  sigma: float = 0.1) -> list[SweepPoint]:
    """The issue's grid.

    For every k: top-k (pre-softmax, no compensation) and Top-θ with the paper's setting
    (pre-softmax, offline SDC, VMC).  For every k in ``variant_ks`` also: Top-θ with SDC
    none / exact / exp-threshold / offline without VMC, post-softmax ± VMC (if ``post``),
    capk, and top-k with exact SDC + VMC.  ``dense_layers`` (default layers 0 and 1 at 512,
    as in the paper) override k per layer in every point.
    """
    dense_layers = PAPER_DENSE_LAYERS if dense_layers is None else dense_layers
    pts: list[SweepPoint] = []
    for k in ks:
        sch = _schedule(k, dense_layers)
        cal = CalibrationConfig(k=sch, placement=Placement.PRE, sigma=sigma, tac=True)
        pts.append(SweepPoint(SparseConfig(selection=Selection.TOP_K, sdc=SDC.NONE, vmc=False, k=sch), None, "k"))
        pts.append(SweepPoint(SparseConfig(selection=Selection.TOP_THETA, sdc=SDC.OFFLINE, vmc=True, k=sch), cal, "k"))
    if variants:
        for k in variant_ks:
            sch = _schedule(k, dense_layers)
            cal = CalibrationConfig(k=sch, placement=Placement.PRE, sigma=sigma, tac=True)
            th = dict(selection=Selection.TOP_THETA, k=sch)
            pts += [
                SweepPoint(SparseConfig(sdc=SDC.NONE, vmc=False, **th), cal, "variant"),
                SweepPoint(SparseConfig(sdc=SDC.EXACT, vmc=False, **th), cal, "variant"),
                SweepPoint(SparseConfig(sdc=SDC.EXACT, vmc=True, **th), cal, "variant"),
                SweepPoint(SparseConfig(sdc=SDC.EXP_THRESHOLD, vmc=True, **th), cal, "variant"),
                SweepPoint(SparseConfig(sdc=SDC.OFFLINE, vmc=False, **th), cal, "variant"),
                SweepPoint(SparseConfig(sdc=SDC.OFFLINE, vmc=True, capk=True, **th), cal, "variant"),
                SweepPoint(SparseConfig(selection=Selection.TOP_K, sdc=SDC.EXACT, vmc=True, k=sch), None, "variant"),
            ]
            if post:
                pcal = CalibrationConfig(k=sch, placement=Placement.POST, sigma=sigma, tac=True)
                pts += [SweepPoint(SparseConfig(placement=Placement.POST, sdc=SDC.NONE, vmc=False, **th), pcal, "variant"),
                        SweepPoint(SparseConfig(placement=Placement.POST, sdc=SDC.NONE, vmc=True, **th), pcal, "variant")]
    seen, out = set(), []
    for p in pts:  # the same config may come from both loops
        if p.config not in seen:
            seen.add(p.config)
            out.append(p)
    return out


def run_sweep(lm, points: Sequence[SweepPoint], texts: Sequence[str], *, corpus: str = "pydoc",
              max_length: int = 512, thresholds_for: Callable[[CalibrationConfig], Thresholds | None] | None = None,
              log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Perplexity of every point on ``texts`` (first ``max_length`` tokens of each), dense computed once.

    ``thresholds_for(cal)`` returns the thresholds a point needs (default: calibrate or load
    from the cache on ``corpus``); a point whose thresholds it returns None for is skipped.
    One row per point: config fields, ppl/nll/bpb dense and sparse, deltas, kept fractions,
    size factor, empty rows, seconds.
    """
    from .evaluation import dense_cache_for, evaluate_perplexity
    from .metrics import summarize

    thresholds_for = thresholds_for or (lambda cal: cached_thresholds(lm, corpus, cal, log=log))
    dense_cache = dense_cache_for(lm, on_disk=False)
    rows = []
    for i, p in enumerate(points):
        th = None
        if p.calibration is not None:
            th = thresholds_for(p.calibration)
            if th is None:
                if log:
                    log(f"[{i + 1}/{len(points)}] skip {p.label}: no thresholds")
                continue
        t0 = time.perf_counter()
        r = evaluate_perplexity(lm, texts, p.config, th, max_length=max_length, truncate=True, dense_cache=dense_cache)
        s = summarize(r.metrics, "prefill") if len(r.metrics) else {}
        row = {"group": p.group, "config_label": p.label, "selection": p.config.selection.value,
               "placement": p.config.placement.value, "sdc": p.config.sdc.value, "vmc": p.config.vmc,
               "capk": p.config.capk, "k": p.config.k.default, "k_overrides": p.config.k.to_text(),
               "thresholds_id": r.thresholds_id, "documents": r.documents, "tokens": r.tokens,
               "dense_ppl": r.dense_ppl, "sparse_ppl": r.sparse_ppl, "delta_ppl": r.sparse_ppl - r.dense_ppl,
               "dense_nll": r.dense_nll, "sparse_nll": r.sparse_nll, "delta_nll": r.sparse_nll - r.dense_nll,
               "dense_bpb": r.dense_bpb, "sparse_bpb": r.sparse_bpb,
               "kept_attention": r.kept_attention, "kept_attention_sparse": r.kept_attention_sparse,
               "kept_v_rows_prefill": r.kept_v_rows, "size_factor": s.get("size_factor", float("nan")),
               "empty_rows": r.empty_rows, "extrapolated_rows": r.extrapolated_rows,
               "sparse_seconds": r.sparse_seconds, "seconds": time.perf_counter() - t0}
        rows.append(row)
        if log:
            log(f"[{i + 1}/{len(points)}] {p.label}: ppl {r.dense_ppl:.3f} → {r.sparse_ppl:.3f} "
                f"kept {r.kept_attention_sparse:.3f} ({row['seconds']:.0f}s)")
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- distribution shift
def distribution_shift(lm, calibration_corpora: Sequence[str], eval_corpora: Sequence[str], config: SparseConfig,
                       cal: CalibrationConfig, *, n_docs: int = 3, max_length: int = 512, min_chars: int = 2000,
                       log: Callable[[str], None] | None = None, **cal_kwargs) -> pd.DataFrame:
    """Thresholds calibrated on each corpus, evaluated (perplexity, held-out half) on each corpus.

    Rows: (calibrated_on, evaluated_on, in_domain, ppl dense/sparse, delta, kept fractions).
    The paper claims thresholds are model-specific, not data-specific: then the off-diagonal
    deltas and kept fractions match the diagonal ones.
    """
    from .evaluation import dense_cache_for, evaluate_perplexity

    ths = {c: cached_thresholds(lm, c, cal, log=log, **cal_kwargs) for c in calibration_corpora}
    rows = []
    for e in eval_corpora:
        texts = heldout_documents(e, n_docs, min_chars=min_chars)
        cache = dense_cache_for(lm, on_disk=False)
        for c, th in ths.items():
            r = evaluate_perplexity(lm, texts, config, th, max_length=max_length, truncate=True, dense_cache=cache)
            rows.append({"calibrated_on": c, "evaluated_on": e, "in_domain": c == e, "config_label": config.label(),
                         "dense_ppl": r.dense_ppl, "sparse_ppl": r.sparse_ppl, "delta_ppl": r.sparse_ppl - r.dense_ppl,
                         "delta_nll": r.sparse_nll - r.dense_nll, "kept_attention": r.kept_attention,
                         "kept_attention_sparse": r.kept_attention_sparse, "empty_rows": r.empty_rows,
                         "tokens": r.tokens, "thresholds_id": r.thresholds_id})
            if log:
                log(f"shift: calibrated on {c}, evaluated on {e}: ppl {r.dense_ppl:.3f} → {r.sparse_ppl:.3f}, "
                    f"kept {r.kept_attention_sparse:.3f}")
    return pd.DataFrame(rows)
