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
    from .evaluation import evaluate_perplexity
    from .metrics import summarize

    thresholds_for = thresholds_for or (lambda cal: cached_thresholds(lm, corpus, cal, log=log))
    dense_cache: dict = {}
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
    from .evaluation import evaluate_perplexity

    ths = {c: cached_thresholds(lm, c, cal, log=log, **cal_kwargs) for c in calibration_corpora}
    rows = []
    for e in eval_corpora:
        texts = split_corpus(e, "heldout", n_docs, min_chars=min_chars)
        cache: dict = {}
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


# --------------------------------------------------------------------------- per-layer k search
LAYER_K_CANDIDATES = (512, 256, 128, 64, 32, 16, 8)


class DroppedMassObserver:
    """From a dense run: per layer and candidate k, Σ over rows of the probability mass top-k
    would drop (``1 − Σ top-k p``) and Σ ``min(L, k)`` (kept elements), for all heads."""

    def __init__(self, n_layers: int, candidates: Sequence[int]):
        import torch

        self.candidates = tuple(sorted(set(int(k) for k in candidates)))
        self.dropped = torch.zeros(n_layers, len(self.candidates), dtype=torch.float64)
        self.kept = torch.zeros(n_layers, len(self.candidates), dtype=torch.float64)
        self.visible = torch.zeros(n_layers, dtype=torch.float64)

    def __call__(self, layer: int, block) -> None:
        import torch

        probs = block.probs.double()  # dense run: the full softmax, 0 at invisible keys
        L = block.row_len.double()  # (B, 1, R)
        H = probs.shape[1]
        kmax = min(max(self.candidates), probs.shape[-1])
        top = probs.topk(kmax, dim=-1).values.cumsum(-1)  # (B, H, R, kmax)
        for j, k in enumerate(self.candidates):
            kk = min(k, kmax)
            dropped = (1.0 - top[..., kk - 1]).clamp_min(0)
            dropped = torch.where(L <= k, torch.zeros_like(dropped), dropped)  # short rows stay dense: nothing dropped
            self.dropped[layer, j] += float(dropped.sum())
            self.kept[layer, j] += float(torch.minimum(L, torch.full_like(L, k)).sum() * H)
        self.visible[layer] += float(L.sum() * H)


def layer_sensitivity(lm, texts: Sequence[str], candidates: Sequence[int] = LAYER_K_CANDIDATES, *,
                      max_length: int = 512) -> pd.DataFrame:
    """One dense pass over ``texts``: per (layer, k) the mean dropped softmax mass per row and the
    kept fraction top-k would have.  Cheap proxy for how much each layer suffers at each k."""
    import torch

    from .config import DENSE
    from .integration import sparse_run

    n_layers = lm.fingerprint.n_layers
    obs = DroppedMassObserver(n_layers, candidates)
    rows_total = torch.zeros(n_layers, dtype=torch.float64)
    base = getattr(lm.model, lm.model.base_model_prefix, lm.model)
    with torch.inference_mode(), sparse_run(DENSE, observers=(obs,)):
        for t in texts:
            ids = lm.tokenizer(t, return_tensors="pt").input_ids[:, :max_length]
            base(input_ids=ids.to(next(lm.model.parameters()).device), use_cache=False)
    out = []
    for layer in range(n_layers):
        for j, k in enumerate(obs.candidates):
            out.append({"layer": layer, "k": k, "dropped_mass": float(obs.dropped[layer, j]),
                        "kept": float(obs.kept[layer, j]), "visible": float(obs.visible[layer]),
                        "kept_frac": float(obs.kept[layer, j] / obs.visible[layer]) if obs.visible[layer] else 1.0})
    return pd.DataFrame(out)


def greedy_schedule_path(sens: pd.DataFrame, *, fixed: dict[int, int] | None = None) -> list[dict]:
    """Schedules from dense to the smallest k everywhere, one layer step at a time.

    Each step lowers the layer whose next-smaller k adds the least dropped mass per kept
    element saved (the knapsack greedy).  ``fixed`` layers never move.  Returns a list of
    ``{"ks": {layer: k}, "proxy": Σ dropped mass, "kept_frac": pooled kept fraction}``.
    """
    fixed = fixed or {}
    layers = sorted(sens["layer"].unique())
    cands = sorted(sens["k"].unique(), reverse=True)
    table = {(int(r.layer), int(r.k)): (r.dropped_mass, r.kept) for r in sens.itertuples()}
    visible = float(sens.groupby("layer")["visible"].first().sum())
    cur = {l: fixed.get(l, cands[0]) for l in layers}

    def state():
        d = sum(table[(l, cur[l])][0] for l in layers)
        kept = sum(table[(l, cur[l])][1] for l in layers)
        return {"ks": dict(cur), "proxy": d, "kept_frac": kept / visible if visible else 1.0}

    path = [state()]
    while True:
        best = None
        for l in layers:
            if l in fixed:
                continue
            i = cands.index(cur[l])
            if i + 1 >= len(cands):
                continue
            k2 = cands[i + 1]
            dd = table[(l, k2)][0] - table[(l, cur[l])][0]
            saved = table[(l, cur[l])][1] - table[(l, k2)][1]
            ratio = dd / saved if saved > 0 else float("inf")
            if best is None or ratio < best[0]:
                best = (ratio, l, k2)
        if best is None:
            break
        cur[best[1]] = best[2]
        path.append(state())
    return path


def schedule_from_ks(ks: dict[int, int], default: int | None = None) -> KSchedule:
    """A KSchedule from a full per-layer map (the most common k, ties to the smaller, becomes the default)."""
    from collections import Counter

    counts = Counter(ks.values())
    default = default or max(counts, key=lambda k: (counts[k], -k))  # ties: the smaller k
    return KSchedule(default, {l: k for l, k in ks.items() if k != default})


def search_layer_k(lm, loss_fn: Callable[[SparseConfig], float], budget: float, *, sens: pd.DataFrame,
                   base_config: SparseConfig | None = None, fixed: dict[int, int] | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
    """Fewest kept elements under an accuracy budget: binary search along the greedy path.

    ``loss_fn(config)`` returns the accuracy cost of a config against dense (e.g. ΔNLL in
    nats per token or accuracy points lost, on a validation split); ``budget`` is the most
    allowed.  The path (:func:`greedy_schedule_path` over ``sens`` from
    :func:`layer_sensitivity`) is ordered by the proxy, so cost grows along it (roughly);
    the search takes O(log path length) evaluations.  Candidates run as top-k
    (``base_config`` with its k replaced; default top-k, no compensation) so no calibration
    is needed per candidate; calibrate Top-θ once for the schedule found.

    Returns ``{"schedule": KSchedule, "kept_frac": proxy kept fraction, "loss": cost,
    "evaluations": [(index, kept_frac, loss), ...], "path": path}``.
    """
    base_config = base_config or SparseConfig(selection=Selection.TOP_K, sdc=SDC.NONE, vmc=False)
    path = greedy_schedule_path(sens, fixed=fixed)
    evals = []

    def cost(i: int) -> float:
        cfg = replace(base_config, k=schedule_from_ks(path[i]["ks"]))
        c = float(loss_fn(cfg))
        evals.append((i, path[i]["kept_frac"], c))
        if log:
            log(f"k search: step {i}/{len(path) - 1} kept {path[i]['kept_frac']:.3f} loss {c:.4f} "
                f"({'ok' if c <= budget else 'over'})")
        return c

    lo, hi = 0, len(path) - 1  # invariant: path[lo] within budget (dense, by assumption)
    best_loss = 0.0
    if cost(hi) <= budget:
        lo = hi
        best_loss = evals[-1][2]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = cost(mid)
        if c <= budget:
            lo, best_loss = mid, c
        else:
            hi = mid
    return {"schedule": schedule_from_ks(path[lo]["ks"]), "kept_frac": path[lo]["kept_frac"], "loss": best_loss,
            "index": lo, "evaluations": evals, "path": path}
