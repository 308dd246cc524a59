"""Accuracy side of Top-θ: perplexity, multiple choice, cloze, agreement with dense.

Every evaluation runs the *same* loaded model twice on identical tokens: dense (the
model's own ``sdpa``, outside any sparse run) and sparse (inside
:func:`~topθ_core.integration.sparse_run` with the given config and thresholds), and
reports both, their paired difference and what the sparse pass kept.

Public entry points (all take a :class:`~topθ_core.models.LoadedModel`):

* :func:`evaluate_perplexity` → :class:`PerplexityResult` (token perplexity, bits per
  byte, per-document deltas, sparsity metrics).  Serves ``toptheta evaluate --data``.
* :func:`evaluate_multiple_choice` (lm-evaluation-harness ``acc`` / ``acc_norm``),
  :func:`evaluate_cloze` (LAMBADA), :func:`evaluate_agreement` (KL, top-1, greedy match)
  → :class:`EvalResult` with a tidy ``.summary`` table.
* :func:`run_task` dispatches a task name (``perplexity``, ``arc_easy``, …, ``agreement``)
  and :func:`save_result` / :func:`load_results` write and read ``data/results/*.parquet``.

``progress(done, total)`` callbacks report work units (tokens or items) for a progress bar.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .config import SparseConfig
from .integration import sparse_run
from .metrics import SparsityMetrics, summarize
from .thresholds import Thresholds

ProgressFn = Callable[[int, int], None]

LN2 = math.log(2.0)
DEFAULT_MAX_LENGTH = 1024

_COUNT_COLUMNS = ["kept", "visible", "topk_equiv", "rows", "dense_rows", "empty_rows", "extrapolated_rows",
                  "kept_v_rows", "kv_rows"]


# --------------------------------------------------------------------------- helpers
def thresholds_id(thresholds: Thresholds | None) -> str:
    """A short stable id of a threshold artifact (hash of its provenance), ``"none"`` without one."""
    if thresholds is None:
        return "none"
    meta = json.dumps(thresholds.meta, sort_keys=True, default=str)
    return hashlib.sha256(meta.encode()).hexdigest()[:12]


def _unwrap(lm):
    """(model, tokenizer) from a LoadedModel."""
    if not (hasattr(lm, "model") and hasattr(lm, "tokenizer")):
        raise TypeError("pass a LoadedModel (topθ_core.models.load_model / wrap_model)")
    return lm.model, lm.tokenizer


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_run(lm, config: SparseConfig, thresholds: Thresholds | None) -> None:
    """Fail fast (before any dense pass) on thresholds for another model, a bad k schedule, …"""
    with sparse_run(config, thresholds, model=lm.model):
        pass


def pool_metrics(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Sum SparsityMetrics frames (same layout) count by count; recompute the fractions."""
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return pd.DataFrame(columns=["layer", "phase", "head", "kv_head", *_COUNT_COLUMNS, "kept_frac", "size_factor"])
    df = pd.concat(frames, ignore_index=True)
    df = df.groupby(["layer", "phase", "head", "kv_head"], as_index=False)[_COUNT_COLUMNS].sum()
    df["kept_frac"] = df["kept"] / df["visible"].where(df["visible"] > 0)
    df["size_factor"] = df["kept"] / df["topk_equiv"].where(df["topk_equiv"] > 0)
    return df


def _frac(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


@dataclass
class _KeptCounter:
    """Pools kept counts over calls; 'sparse' pools only layers whose k is below the call's length."""

    kept: int = 0
    visible: int = 0
    kept_sparse: int = 0
    visible_sparse: int = 0
    kept_v: int = 0
    kv_rows: int = 0
    frames: list = field(default_factory=list)

    def add(self, frame: pd.DataFrame, ks: list[int], seq_len: int, phase: str = "prefill") -> dict:
        d = frame[frame["phase"] == phase]
        sparse_layers = [i for i, k in enumerate(ks) if k < seq_len]
        ds = d[d["layer"].isin(sparse_layers)]
        c = dict(kept=int(d["kept"].sum()), visible=int(d["visible"].sum()), kept_sparse=int(ds["kept"].sum()),
                 visible_sparse=int(ds["visible"].sum()), kept_v=int(d["kept_v_rows"].sum()),
                 kv_rows=int(d["kv_rows"].sum()))
        for key, val in c.items():
            setattr(self, key, getattr(self, key) + val)
        self.frames.append(frame)
        return c

    def fractions(self) -> dict[str, float]:
        return {"kept_attention": _frac(self.kept, self.visible),
                "kept_attention_sparse": _frac(self.kept_sparse, self.visible_sparse),
                "kept_v_rows": _frac(self.kept_v, self.kv_rows)}


# --------------------------------------------------------------------------- perplexity
def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, score_from, end)`` that score every token but the first exactly once.

    Window tokens are ``ids[begin:end]`` (at most ``max_length``); it scores the tokens at
    positions ``score_from … end-1``, each predicted from everything before it in the window.
    The first window scores positions ``1 … max_length-1``; each later one scores ``stride``
    new tokens with ``max_length − stride`` tokens of context (``stride ≤ max_length − 1``).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length - 1:
        raise ValueError(f"stride must be in [1, max_length-1] = [1, {max_length - 1}], got {stride}")
    out = []
    pos = 1
    while pos < n_tokens:
        end = min(n_tokens, max_length if pos == 1 else pos + stride)
        begin = max(0, end - max_length)
        out.append((begin, pos, end))
        pos = end
    return out


def token_nll(model, ids: torch.Tensor, score_from: int) -> torch.Tensor:
    """NLL (nats, float64) of tokens ``ids[score_from:]`` given their prefix in ``ids`` (1-D).

    Only the needed positions go through the LM head (``logits_to_keep``).
    """
    n = ids.numel()
    keep = n - score_from + 1  # logits at positions score_from-1 … n-1; the last one is dropped
    out = model(input_ids=ids.view(1, -1).to(_device(model)), use_cache=False, logits_to_keep=keep)
    logits = out.logits[0, :-1].float()  # (n - score_from, V)
    targets = ids[score_from:].to(logits.device)
    return F.cross_entropy(logits, targets, reduction="none").double().cpu()


@dataclass
class PerplexityResult:
    """Dense vs sparse perplexity on identical tokens.

    ``*_nll`` are mean nats per predicted token pooled over all documents; ``*_ppl`` =
    ``exp(nll)``; ``*_bpb`` = total nats / (ln 2 · UTF-8 bytes of the documents).
    ``per_doc``: one row per document (tokens, bytes, dense/sparse nll and ppl, deltas,
    kept attention).  ``metrics``: the pooled SparsityMetrics frame of the sparse passes.
    """

    dense_nll: float
    sparse_nll: float
    dense_bpb: float
    sparse_bpb: float
    kept_attention: float
    kept_attention_sparse: float
    kept_v_rows: float
    tokens: int
    bytes: int
    documents: int
    windows: int
    seconds: float
    dense_seconds: float
    sparse_seconds: float
    config_label: str
    thresholds_id: str
    max_length: int
    stride: int
    empty_rows: int = 0
    extrapolated_rows: int = 0
    per_doc: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    @property
    def dense_ppl(self) -> float:
        return math.exp(self.dense_nll)

    @property
    def sparse_ppl(self) -> float:
        return math.exp(self.sparse_nll)

    def to_dict(self) -> dict:
        """JSON-serialisable summary (no DataFrames)."""
        d = {
            "dense_nll": self.dense_nll, "dense_ppl": self.dense_ppl,
            "sparse_nll": self.sparse_nll, "sparse_ppl": self.sparse_ppl,
            "delta_nll": self.sparse_nll - self.dense_nll, "delta_ppl": self.sparse_ppl - self.dense_ppl,
            "dense_bpb": self.dense_bpb, "sparse_bpb": self.sparse_bpb,
            "kept_attention": self.kept_attention, "kept_attention_sparse": self.kept_attention_sparse,
            "kept_v_rows": self.kept_v_rows, "empty_rows": self.empty_rows,
            "extrapolated_rows": self.extrapolated_rows,
            "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents, "windows": self.windows,
            "max_length": self.max_length, "stride": self.stride,
            "seconds": self.seconds, "dense_seconds": self.dense_seconds, "sparse_seconds": self.sparse_seconds,
            "config": self.config_label, "thresholds_id": self.thresholds_id,
        }
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def evaluate_perplexity(
    lm,
    texts: Sequence[str],
    config: SparseConfig,
    thresholds: Thresholds | None,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    add_special_tokens: bool = True,
    progress: ProgressFn | None = None,
) -> PerplexityResult:
    """Token perplexity and bits per byte, dense and sparse, each document scored on its own.

    Documents longer than ``max_length`` tokens (default ``min(1024, model maximum)``) are
    scored with sliding windows (:func:`sliding_windows`; ``stride`` default ``max_length // 2``;
    a stride equal to ``max_length`` is taken as ``max_length − 1`` so no token goes unscored).
    The first token of each document is context only.  Bits per byte divide by the UTF-8
    length of the whole document.  ``progress(done_tokens, total_tokens)`` after each window.

    Raises ValueError on an empty text list or when no document has two or more tokens,
    and the engine's errors for thresholds of another model or a bad k schedule.
    """
    model, tok = _unwrap(lm)
    texts = list(texts)
    if not texts:
        raise ValueError("no documents to evaluate (empty text list)")
    _check_run(lm, config, thresholds)
    model_max = int(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH)
    max_length = int(max_length or min(DEFAULT_MAX_LENGTH, model_max))
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    stride = int(stride or max(1, max_length // 2))
    if stride == max_length:
        stride = max_length - 1
    docs = []
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids[0]
        if ids.numel() >= 2:
            docs.append((i, ids, len(text.encode("utf-8"))))
    if not docs:
        raise ValueError("no document has two or more tokens: nothing to score")
    plans = [(i, ids, nbytes, sliding_windows(ids.numel(), max_length, stride)) for i, ids, nbytes in docs]
    total = sum(ids.numel() - 1 for _, ids, _, _ in plans)
    ks = config.k.as_list(lm.fingerprint.n_layers)
    counter = _KeptCounter()
    rows, done, n_windows = [], 0, 0
    t_dense = t_sparse = 0.0
    t0 = time.perf_counter()
    if progress:
        progress(0, total)
    with torch.inference_mode():
        for doc_i, ids, nbytes, windows in plans:
            nll_d = nll_s = 0.0
            doc_counts = _KeptCounter()
            for begin, score_from, end in windows:
                w = ids[begin:end]
                t1 = time.perf_counter()
                nll_d += float(token_nll(model, w, score_from - begin).sum())
                t2 = time.perf_counter()
                m = SparsityMetrics()
                with sparse_run(config, thresholds, model=model, metrics=m):
                    nll_s += float(token_nll(model, w, score_from - begin).sum())
                t3 = time.perf_counter()
                t_dense, t_sparse = t_dense + t2 - t1, t_sparse + t3 - t2
                frame = m.to_frame()
                counter.add(frame, ks, w.numel())
                doc_counts.add(frame, ks, w.numel())
                n_windows += 1
                done += end - score_from
                if progress:
                    progress(done, total)
            n_pred = ids.numel() - 1
            fr = doc_counts.fractions()
            rows.append({"doc": doc_i, "tokens": int(ids.numel()), "predicted": n_pred, "bytes": nbytes,
                         "windows": len(windows), "dense_nll_sum": nll_d, "sparse_nll_sum": nll_s,
                         "dense_nll": nll_d / n_pred, "sparse_nll": nll_s / n_pred,
                         "kept_attention": fr["kept_attention"], "kept_attention_sparse": fr["kept_attention_sparse"],
                         "kept_v_rows": fr["kept_v_rows"]})
    per_doc = pd.DataFrame(rows)
    per_doc["dense_ppl"] = np.exp(per_doc["dense_nll"])
    per_doc["sparse_ppl"] = np.exp(per_doc["sparse_nll"])
    per_doc["delta_nll"] = per_doc["sparse_nll"] - per_doc["dense_nll"]
    per_doc["delta_ppl"] = per_doc["sparse_ppl"] - per_doc["dense_ppl"]
    per_doc["dense_bpb"] = per_doc["dense_nll_sum"] / (LN2 * per_doc["bytes"])
    per_doc["sparse_bpb"] = per_doc["sparse_nll_sum"] / (LN2 * per_doc["bytes"])
    n_tok, n_bytes = int(per_doc["predicted"].sum()), int(per_doc["bytes"].sum())
    metrics = pool_metrics(counter.frames)
    pooled = summarize(metrics, "prefill") if len(metrics) else {}
    fr = counter.fractions()
    return PerplexityResult(
        dense_nll=float(per_doc["dense_nll_sum"].sum() / n_tok), sparse_nll=float(per_doc["sparse_nll_sum"].sum() / n_tok),
        dense_bpb=float(per_doc["dense_nll_sum"].sum() / (LN2 * n_bytes)),
        sparse_bpb=float(per_doc["sparse_nll_sum"].sum() / (LN2 * n_bytes)),
        kept_attention=fr["kept_attention"], kept_attention_sparse=fr["kept_attention_sparse"],
        kept_v_rows=fr["kept_v_rows"], tokens=n_tok, bytes=n_bytes, documents=len(per_doc), windows=n_windows,
        seconds=time.perf_counter() - t0, dense_seconds=t_dense, sparse_seconds=t_sparse,
        config_label=config.label(), thresholds_id=thresholds_id(thresholds), max_length=max_length, stride=stride,
        empty_rows=int(pooled.get("empty_rows", 0)), extrapolated_rows=int(pooled.get("extrapolated_rows", 0)),
        per_doc=per_doc, metrics=metrics,
    )
