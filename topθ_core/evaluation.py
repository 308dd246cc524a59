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
    truncate: bool = False,
    dense_cache: dict | None = None,
) -> PerplexityResult:
    """Token perplexity and bits per byte, dense and sparse, each document scored on its own.

    Documents longer than ``max_length`` tokens (default ``min(1024, model maximum)``) are
    scored with sliding windows (:func:`sliding_windows`; ``stride`` default ``max_length // 2``;
    a stride equal to ``max_length`` is taken as ``max_length − 1`` so no token goes unscored).
    The first token of each document is context only.  Bits per byte divide by the UTF-8
    length of the whole document (with ``truncate=True``: only the first ``max_length``
    tokens are scored and bytes count the decoded kept tokens).
    ``progress(done_tokens, total_tokens)`` after each window.  ``dense_cache`` (a dict the
    caller keeps) reuses dense NLLs across calls on the same texts: sweeps pass one dict.

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
        nbytes = len(text.encode("utf-8"))
        if truncate and ids.numel() > max_length:
            ids = ids[:max_length]
            nbytes = len(tok.decode(ids.tolist()).encode("utf-8"))
        if ids.numel() >= 2:
            docs.append((i, ids, nbytes))
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
                key = (tuple(w.tolist()), score_from - begin)
                if dense_cache is not None and key in dense_cache:
                    nll_d += dense_cache[key]
                else:
                    val = float(token_nll(model, w, score_from - begin).sum())
                    nll_d += val
                    if dense_cache is not None:
                        dense_cache[key] = val
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


# --------------------------------------------------------------------------- log-likelihood scoring
@dataclass(frozen=True)
class Request:
    """One scored continuation: ``log p(continuation | prefix + context)``, token ids (1-D)."""

    context: torch.Tensor  # (C,) at least one token
    continuation: torch.Tensor  # (T,) at least one token


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness ``_encode_pair``: trailing spaces of the context move to the
    continuation; ``context_enc = enc(context)``, ``continuation_enc = enc(context +
    continuation)[len(context_enc):]``; no special tokens (the harness default)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return list(ctx), list(whole[len(ctx):])


def _lm_head(model):
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def project(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return project


def _base(model):
    return getattr(model, model.base_model_prefix, model)


_CACHE_KW: str | None = None


def _cache_kw(base) -> str:
    """Name of the cache argument of the base model's forward (``cache`` in transformers ≥ 5.2x)."""
    global _CACHE_KW
    if _CACHE_KW is None:
        import inspect

        params = inspect.signature(base.forward).parameters
        _CACHE_KW = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KW


def _out_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def _layout_mask(key_valid: torch.Tensor, q_start: int) -> torch.Tensor:
    """4-D bool mask (B, 1, Sq, Sk) for queries at key positions ``q_start …`` of a padded layout.

    A real query sees valid keys at or before it; a padding query (its own key invalid) sees
    only itself, so it has a well-defined output, counts as a one-element row in the metrics,
    and is never seen by a real query.
    """
    B, Sk = key_valid.shape
    Sq = Sk - q_start
    qpos = torch.arange(q_start, Sk, device=key_valid.device).view(1, Sq, 1)
    kpos = torch.arange(Sk, device=key_valid.device).view(1, 1, Sk)
    causal = kpos <= qpos  # (1, Sq, Sk)
    q_valid = key_valid[:, q_start:].unsqueeze(-1)  # (B, Sq, 1)
    mask = causal & key_valid.unsqueeze(1) & q_valid
    mask = mask | ((kpos == qpos) & ~q_valid)
    return mask.unsqueeze(1)


def _expand_cache(cache, index: torch.Tensor):
    """A new cache whose batch rows are ``cache``'s rows ``index`` (a copy; ``cache`` is untouched)."""
    import copy

    new = copy.deepcopy(cache)
    new.batch_select_indices(index)
    return new


@dataclass
class _PassCounter:
    """Per-call SparsityMetrics for one pass; frames with weights (a shared prefix counts per item)."""

    ks: list[int]
    counter: _KeptCounter = field(default_factory=_KeptCounter)

    def call(self, frame: pd.DataFrame, seq_len: int, weight: int = 1) -> None:
        if weight != 1:
            frame = frame.copy()
            frame[_COUNT_COLUMNS] = frame[_COUNT_COLUMNS] * weight
        self.counter.add(frame, self.ks, seq_len)


def _run(model, config, thresholds, sparse: bool, fn, counter: _PassCounter | None, seq_len: int, weight: int = 1):
    """Call ``fn()`` dense (plain sdpa) or inside a sparse run, recording metrics for the sparse pass."""
    if not sparse:
        return fn()
    m = SparsityMetrics()
    with sparse_run(config, thresholds, model=model, metrics=m):
        out = fn()
    if counter is not None:
        counter.call(m.to_frame(), seq_len, weight)
    return out


def _prefix_cache(model, prefix: torch.Tensor):
    """KV cache (batch 1) of a shared prefix (1-D ids) under whatever attention is active."""
    base = _base(model)
    dev = _device(model)
    out = base(input_ids=prefix.view(1, -1).to(dev), use_cache=True)
    return _out_cache(out)


def score_requests(model, requests: Sequence[Request], *, prefix: torch.Tensor | None = None, prefix_cache=None,
                   groups: Sequence[int] | None = None, max_rows: int = 32, max_tokens: int = 16384,
                   call: Callable | None = None) -> list[tuple[float, bool]]:
    """Summed log-likelihood and greedy flag of each request, batched, context computed once.

    Requests with the same ``groups`` id must share their context (the choices of one item):
    their context runs once (stage 1, a right-padded batch of contexts), then all their
    continuations run against a copy of that cache (stage 2).  ``prefix`` (1-D ids) with its
    ``prefix_cache`` (batch 1) is shared by every request.  Padding never changes a row:
    positions are explicit and padding queries see only themselves (:func:`_layout_mask`).
    ``call(fn, seq_len, n_items)`` wraps each model call (dense or sparse and metrics).
    Returns ``(log p, greedy)`` per request, in input order.
    """
    if not requests:
        return []
    base, project = _base(model), _lm_head(model)
    dev = _device(model)
    kw = _cache_kw(base)
    call = call or (lambda fn, seq_len, n: fn())
    P = 0 if prefix is None else int(prefix.numel())
    if P and prefix_cache is None:
        raise ValueError("a prefix needs its prefix_cache")
    groups = list(range(len(requests))) if groups is None else list(groups)
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for g, idx in by_group.items():
        c0 = requests[idx[0]].context
        if any(not torch.equal(requests[i].context, c0) for i in idx[1:]):
            raise ValueError(f"requests of group {g} do not share their context")
    for r in requests:
        if r.context.numel() < 1 or r.continuation.numel() < 1:
            raise ValueError("every request needs at least one context and one continuation token")
    order = sorted(by_group, key=lambda g: (requests[by_group[g][0]].context.numel(),
                                            max(requests[i].continuation.numel() for i in by_group[g])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    batch: list[int] = []

    def flush(batch_groups: list[int]) -> None:
        ctxs = [requests[by_group[g][0]].context for g in batch_groups]
        rows = [i for g in batch_groups for i in by_group[g]]
        row_item = torch.tensor([bi for bi, g in enumerate(batch_groups) for _ in by_group[g]], device=dev)
        B, R = len(ctxs), len(rows)
        C = max(c.numel() for c in ctxs)
        T = max(requests[i].continuation.numel() for i in rows)
        # stage 1: contexts, right-padded, after the shared prefix
        ctx_ids = torch.zeros(B, C, dtype=torch.long)
        ctx_valid = torch.zeros(B, C, dtype=torch.bool)
        for b, c in enumerate(ctxs):
            ctx_ids[b, : c.numel()] = c
            ctx_valid[b, : c.numel()] = True
        key_valid = torch.cat([torch.ones(B, P, dtype=torch.bool), ctx_valid], 1).to(dev)
        pos = (P + torch.arange(C)).expand(B, C).to(dev)
        cache = _expand_cache(prefix_cache, torch.zeros(B, dtype=torch.long, device=dev)) if P else None

        def stage1():
            kwargs = {kw: cache} if cache is not None else {}
            return base(input_ids=ctx_ids.to(dev), attention_mask=_layout_mask(key_valid, P), position_ids=pos,
                        use_cache=True, **kwargs)

        out1 = call(stage1, P + C, B)
        ctx_len = torch.tensor([c.numel() for c in ctxs], device=dev)
        h_last = out1.last_hidden_state[torch.arange(B, device=dev), ctx_len - 1]  # (B, d)
        # stage 2: every continuation of the batch against its item's context cache
        cont_ids = torch.zeros(R, T, dtype=torch.long)
        cont_valid = torch.zeros(R, T, dtype=torch.bool)
        for r, i in enumerate(rows):
            t = requests[i].continuation
            cont_ids[r, : t.numel()] = t
            cont_valid[r, : t.numel()] = True
        cont_valid = cont_valid.to(dev)
        cache2 = _out_cache(out1)
        cache2.batch_select_indices(row_item)
        key_valid2 = torch.cat([key_valid[row_item], cont_valid], 1)
        pos2 = (P + ctx_len[row_item]).unsqueeze(1) + torch.arange(T, device=dev).unsqueeze(0)

        def stage2():
            return base(input_ids=cont_ids.to(dev), attention_mask=_layout_mask(key_valid2, P + C), position_ids=pos2,
                        use_cache=True, **{kw: cache2})

        h2 = call(stage2, P + C + T, B).last_hidden_state  # (R, T, d)
        # hidden state predicting continuation token j: stage-1 last context state for j = 0,
        # stage-2 state j-1 otherwise
        hid = torch.cat([h_last[row_item].unsqueeze(1), h2[:, :-1]], 1)  # (R, T, d)
        logp = torch.log_softmax(project(hid[cont_valid]), -1)  # (n_valid, V)
        tgt = cont_ids.to(dev)[cont_valid]
        tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double()
        greedy = logp.argmax(-1) == tgt
        counts = cont_valid.sum(1).tolist()
        for r, (lp, gr) in enumerate(zip(tok_lp.split(counts), greedy.split(counts))):
            results[rows[r]] = (float(lp.sum()), bool(gr.all()))

    n_rows = n_tok = 0
    for g in order:
        g_rows = len(by_group[g])
        g_tok = g_rows * (P + requests[by_group[g][0]].context.numel() +
                          max(requests[i].continuation.numel() for i in by_group[g]))
        if batch and (n_rows + g_rows > max_rows or n_tok + g_tok > max_tokens):
            flush(batch)
            batch, n_rows, n_tok = [], 0, 0
        batch.append(g)
        n_rows += g_rows
        n_tok += g_tok
    if batch:
        flush(batch)
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- statistics
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


def _ratio_bootstrap(num_d, num_s, den, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
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


# --------------------------------------------------------------------------- results
SUMMARY_COLUMNS = ["task", "metric", "dense", "sparse", "delta", "ci_low", "ci_high", "kept_attention",
                   "kept_attention_sparse", "kept_v_rows_prefill", "kept_v_rows_decode", "config_label",
                   "thresholds_id", "n"]
RESULT_COLUMNS = SUMMARY_COLUMNS + ["model", "num_fewshot", "seconds", "config_json", "run_id", "created"]


@dataclass
class EvalResult:
    """One evaluation run: a tidy ``summary`` (one row per metric, :data:`SUMMARY_COLUMNS`
    plus provenance), per-item details in ``items`` and the pooled sparsity ``metrics``."""

    task: str
    summary: pd.DataFrame
    items: pd.DataFrame
    metrics: pd.DataFrame
    config: SparseConfig
    thresholds_id: str
    seconds: float
    info: dict = field(default_factory=dict)
    perplexity: PerplexityResult | None = None

    def value(self, metric: str, column: str = "sparse") -> float:
        row = self.summary[self.summary["metric"] == metric]
        if row.empty:
            raise KeyError(f"no metric {metric!r} in this result; have {sorted(self.summary['metric'])}")
        return float(row.iloc[0][column])

    def to_dict(self) -> dict:
        rows = self.summary[SUMMARY_COLUMNS].to_dict("records")
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
        return {"task": self.task, "config": self.config.label(), "thresholds_id": self.thresholds_id,
                "seconds": self.seconds, "info": self.info, "metrics": clean}

    def save(self, directory=None) -> "Path":
        return save_result(self, directory)


def _summary_row(task: str, metric: str, dense: float, sparse: float, ci=(float("nan"), float("nan")),
                 delta: float | None = None, **rest) -> dict:
    return {"task": task, "metric": metric, "dense": float(dense), "sparse": float(sparse),
            "delta": float(sparse - dense if delta is None else delta), "ci_low": float(ci[0]),
            "ci_high": float(ci[1]), **rest}


def _finish(task: str, rows: list[dict], items: pd.DataFrame, metrics: pd.DataFrame, config: SparseConfig,
            thresholds, lm, seconds: float, kept: dict, n: int, info: dict | None = None,
            perplexity: PerplexityResult | None = None, num_fewshot: int = 0) -> EvalResult:
    import uuid
    from datetime import datetime, timezone

    run_id = uuid.uuid4().hex[:12]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tid = thresholds_id(thresholds)
    for r in rows:
        r.update(kept_attention=kept.get("kept_attention", float("nan")),
                 kept_attention_sparse=kept.get("kept_attention_sparse", float("nan")),
                 kept_v_rows_prefill=kept.get("kept_v_rows_prefill", float("nan")),
                 kept_v_rows_decode=kept.get("kept_v_rows_decode", float("nan")),
                 config_label=config.label(), thresholds_id=tid, n=int(n), model=getattr(lm, "name", ""),
                 num_fewshot=int(num_fewshot), seconds=float(seconds), config_json=json.dumps(config.to_dict()),
                 run_id=run_id, created=created)
    summary = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return EvalResult(task=task, summary=summary, items=items, metrics=metrics, config=config, thresholds_id=tid,
                      seconds=seconds, info=dict(info or {}, run_id=run_id, created=created), perplexity=perplexity)


def results_dir(directory=None) -> "Path":
    from pathlib import Path

    from .models import DATA_DIR

    return Path(directory) if directory is not None else DATA_DIR / "results"


def save_result(result: EvalResult, directory=None) -> "Path":
    """Write ``result.summary`` to ``<directory>/<created>-<task>-<run_id>.parquet`` atomically
    (temp file in the same directory, then rename).  Default directory: ``data/results/``."""
    import os
    import tempfile

    d = results_dir(directory)
    d.mkdir(parents=True, exist_ok=True)
    stamp = result.info.get("created", "").replace(":", "").replace("-", "").replace("+0000", "Z")
    safe_task = "".join(c if c.isalnum() or c in "_." else "_" for c in result.task)
    path = d / f"{stamp}-{safe_task}-{result.info.get('run_id', 'run')}.parquet"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=d)
    os.close(fd)
    try:
        result.summary.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_results(dir=None) -> pd.DataFrame:  # noqa: A002 (the app calls load_results(dir=...))
    """Every saved result row under ``dir`` (default ``data/results/``), oldest first.

    Columns: :data:`RESULT_COLUMNS`.  An empty frame with those columns when there is none;
    unreadable files are skipped (a half-written file never exists: writes are atomic).
    """
    d = results_dir(dir)
    frames = []
    if d.is_dir():
        for p in sorted(d.glob("*.parquet")):
            if p.name.startswith(".tmp-"):
                continue
            try:
                frames.append(pd.read_parquet(p))
            except Exception:  # noqa: BLE001 - a foreign or corrupt file must not break the app
                continue
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values("created", kind="stable").reset_index(drop=True) if "created" in df else df


# --------------------------------------------------------------------------- multiple choice
FEWSHOT_DELIMITER = "\n\n"
FEWSHOT_SEED = 1234


def choose_fewshot(pool: Sequence, eval_ids: set, num_fewshot: int, seed: int = FEWSHOT_SEED) -> list:
    """``num_fewshot`` items of ``pool`` (fixed seed), taken from items not evaluated when enough exist."""
    if num_fewshot <= 0:
        return []
    rng = np.random.default_rng(seed)
    outside = [x for x in pool if x.id not in eval_ids]
    source = outside if len(outside) >= num_fewshot else list(pool)
    if len(source) < num_fewshot:
        raise ValueError(f"num_fewshot={num_fewshot} but the task has only {len(source)} items")
    pick = rng.choice(len(source), size=num_fewshot, replace=False)
    return [source[i] for i in sorted(pick)]


def fewshot_text(shots: Sequence) -> str:
    """Harness few-shot block: ``context + " " + gold choice`` per shot, joined and ended by a blank line."""
    if not shots:
        return ""
    from .tasks import TARGET_DELIMITER

    return FEWSHOT_DELIMITER.join(s.context + TARGET_DELIMITER + s.choices[s.gold] for s in shots) + FEWSHOT_DELIMITER


def _score_both(lm, requests: list[Request], groups: list[int], config, thresholds, prefix_ids: torch.Tensor | None,
                n_items: int, progress: ProgressFn | None, max_rows: int, max_tokens: int):
    """Score requests dense then sparse (same batches); returns (dense, sparse, counter, dense_s, sparse_s)."""
    model = lm.model
    ks = config.k.as_list(lm.fingerprint.n_layers)
    counter = _PassCounter(ks)
    out, secs = {}, {}
    P = 0 if prefix_ids is None else int(prefix_ids.numel())
    done = [0]
    total = 2 * len(requests)
    for sparse in (False, True):
        t0 = time.perf_counter()

        def call(fn, seq_len, n, _sparse=sparse):
            return _run(model, config, thresholds, _sparse, fn, counter, seq_len)

        pc = None
        if P:
            pc = _run(model, config, thresholds, sparse, lambda: _prefix_cache(model, prefix_ids), counter, P,
                      weight=n_items)
        chunk = max(1, max_rows * 4)
        res = []
        # score in slices so the progress bar moves (the grouping never splits an item: slices cut at groups)
        start = 0
        while start < len(requests):
            stop = min(len(requests), start + chunk)
            while stop < len(requests) and groups[stop] == groups[stop - 1]:
                stop += 1
            res += score_requests(model, requests[start:stop], groups=groups[start:stop], prefix=prefix_ids,
                                  prefix_cache=pc, max_rows=max_rows, max_tokens=max_tokens, call=call)
            done[0] += stop - start
            if progress:
                progress(done[0], total)
            start = stop
        out[sparse], secs[sparse] = res, time.perf_counter() - t0
    return out[False], out[True], counter, secs[False], secs[True]


def harness_predictions(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """lm-evaluation-harness multiple-choice predictions: ``(argmax ll, argmax ll / len(choice))``.

    ``len(choice)`` counts characters of the choice *without* the leading target delimiter;
    ties go to the first choice (``np.argmax``).
    """
    ll = np.asarray(loglikelihoods, dtype=np.float64)
    if ll.shape != (len(choices),):
        raise ValueError(f"{ll.size} log-likelihoods for {len(choices)} choices")
    lens = np.array([float(len(c)) for c in choices])
    return int(np.argmax(ll)), int(np.argmax(ll / lens))


def evaluate_multiple_choice(lm, task, limit: int | None, config: SparseConfig, thresholds: Thresholds | None,
                             progress: ProgressFn | None = None, *, num_fewshot: int = 0, max_rows: int = 32,
                             max_tokens: int = 16384, n_boot: int = 2000, seed: int = 0) -> EvalResult:
    """lm-evaluation-harness multiple-choice accuracy, dense vs sparse on the same items.

    ``task``: a bundled task name (``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``,
    ``boolq``, ``openbookqa``) or a list of :class:`~topθ_core.tasks.MCItem`.  Each choice is
    scored as ``log p(" " + choice | context)`` (harness tokenization, no special tokens);
    ``acc`` = argmax of the summed log-likelihood, ``acc_norm`` = argmax of log-likelihood
    divided by the choice's length in characters; ties go to the first choice (``np.argmax``).

    ``num_fewshot`` > 0 puts a fixed block of solved items (same task, fixed seed, items
    outside the evaluated ones when possible) before every context, computed once per pass
    through a KV cache; kept fractions count that shared prefix once per item, as if each
    prompt ran on its own.  Deltas are sparse − dense with a paired bootstrap 95% interval.
    ``progress(done, total)`` counts scored choices over both passes.
    """
    from .tasks import MCItem, load_mc_task

    t0 = time.perf_counter()
    model, tok = _unwrap(lm)
    if isinstance(task, str):
        name = task
        items = load_mc_task(task, limit)
        pool = load_mc_task(task) if num_fewshot else items
    else:
        name, items, pool = "custom", list(task)[: limit if limit is not None else None], list(task)
        if limit is not None and limit > len(list(task)):
            raise ValueError(f"limit={limit} but the item list has only {len(list(task))} items")
        if not all(isinstance(x, MCItem) for x in items):
            raise TypeError("task must be a task name or a list of MCItem")
    if not items:
        raise ValueError("no items to evaluate")
    _check_run(lm, config, thresholds)
    shots = choose_fewshot(pool, {x.id for x in items}, num_fewshot, FEWSHOT_SEED + seed)
    shot_ids = {s.id for s in shots}
    items = [x for x in items if x.id not in shot_ids]
    prefix_ids = None
    if shots:
        prefix_ids = torch.tensor(tok(fewshot_text(shots), add_special_tokens=False).input_ids, dtype=torch.long)
    requests, groups = [], []
    for gi, item in enumerate(items):
        for cont in item.continuations():
            ctx, c = encode_pair(tok, item.context, cont)
            if not ctx:
                ctx, c = c[:1], c[1:]  # context of whitespace only: its first token becomes context
            requests.append(Request(torch.tensor(ctx, dtype=torch.long), torch.tensor(c, dtype=torch.long)))
            groups.append(gi)
    with torch.inference_mode():
        dense, sparse, counter, t_d, t_s = _score_both(lm, requests, groups, config, thresholds, prefix_ids, len(items),
                                                       progress, max_rows, max_tokens)
    rows, k = [], 0
    for gi, item in enumerate(items):
        n_c = len(item.choices)
        ll_d = [dense[k + j][0] for j in range(n_c)]
        ll_s = [sparse[k + j][0] for j in range(n_c)]
        k += n_c
        (pd_, pdn), (ps, psn) = harness_predictions(ll_d, item.choices), harness_predictions(ll_s, item.choices)
        rows.append({"id": item.id, "gold": item.gold, "n_choices": n_c, "dense_pred": pd_, "sparse_pred": ps,
                     "dense_pred_norm": pdn, "sparse_pred_norm": psn, "dense_ll": ll_d, "sparse_ll": ll_s})
    df = pd.DataFrame(rows)
    for arm in ("dense", "sparse"):
        df[f"{arm}_acc"] = (df[f"{arm}_pred"] == df["gold"]).astype(float)
        df[f"{arm}_acc_norm"] = (df[f"{arm}_pred_norm"] == df["gold"]).astype(float)
    df["pred_changed"] = df["dense_pred"] != df["sparse_pred"]
    out_rows = []
    for metric in ("acc", "acc_norm"):
        dlt, lo, hi = paired_bootstrap(df[f"dense_{metric}"], df[f"sparse_{metric}"], n_boot=n_boot, seed=seed)
        out_rows.append(_summary_row(name, metric, df[f"dense_{metric}"].mean(), df[f"sparse_{metric}"].mean(),
                                     (lo, hi), delta=dlt))
    out_rows.append(_summary_row(name, "pred_changed", 0.0, float(df["pred_changed"].mean())))
    fr = counter.counter.fractions()
    kept = {"kept_attention": fr["kept_attention"], "kept_attention_sparse": fr["kept_attention_sparse"],
            "kept_v_rows_prefill": fr["kept_v_rows"]}
    seconds = time.perf_counter() - t0
    info = {"dense_seconds": t_d, "sparse_seconds": t_s, "choices": len(requests),
            "prefix_tokens": 0 if prefix_ids is None else int(prefix_ids.numel()),
            "fewshot_ids": [s.id for s in shots],
            "mean_prompt_tokens": float(np.mean([r.context.numel() + r.continuation.numel() for r in requests]))
            + (0 if prefix_ids is None else int(prefix_ids.numel()))}
    return _finish(name, out_rows, df, pool_metrics(counter.counter.frames), config, thresholds, lm, seconds, kept,
                   len(items), info, num_fewshot=num_fewshot)


# --------------------------------------------------------------------------- cloze (LAMBADA)
def evaluate_cloze(lm, task="lambada", limit: int | None = None, config: SparseConfig | None = None,
                   thresholds: Thresholds | None = None, progress: ProgressFn | None = None, *, max_rows: int = 32,
                   max_tokens: int = 16384, n_boot: int = 2000, seed: int = 0) -> EvalResult:
    """LAMBADA the harness way: ``acc`` = the whole target ``" " + word`` is the greedy
    continuation; ``ppl`` = ``exp(−mean over items of log p(target | context))``."""
    from .tasks import TARGET_DELIMITER, load_cloze_task

    if config is None:
        raise ValueError("config is required")
    t0 = time.perf_counter()
    model, tok = _unwrap(lm)
    items = load_cloze_task(task, limit) if isinstance(task, str) else list(task)[:limit]
    name = task if isinstance(task, str) else "custom_cloze"
    if not items:
        raise ValueError("no items to evaluate")
    _check_run(lm, config, thresholds)
    requests = []
    for item in items:
        ctx, c = encode_pair(tok, item.context, TARGET_DELIMITER + item.target)
        requests.append(Request(torch.tensor(ctx, dtype=torch.long), torch.tensor(c, dtype=torch.long)))
    with torch.inference_mode():
        dense, sparse, counter, t_d, t_s = _score_both(lm, requests, list(range(len(requests))), config, thresholds,
                                                       None, len(items), progress, max_rows, max_tokens)
    df = pd.DataFrame({"id": [x.id for x in items],
                       "dense_ll": [d[0] for d in dense], "sparse_ll": [s[0] for s in sparse],
                       "dense_acc": [float(d[1]) for d in dense], "sparse_acc": [float(s[1]) for s in sparse],
                       "target_tokens": [r.continuation.numel() for r in requests]})
    dlt, lo, hi = paired_bootstrap(df["dense_acc"], df["sparse_acc"], n_boot=n_boot, seed=seed)
    rows = [_summary_row(name, "acc", df["dense_acc"].mean(), df["sparse_acc"].mean(), (lo, hi), delta=dlt)]
    ones = np.ones(len(df))
    p, plo, phi = _ratio_bootstrap(-df["dense_ll"], -df["sparse_ll"], ones, n_boot=n_boot, seed=seed, transform=np.exp)
    rows.append(_summary_row(name, "ppl", math.exp(-df["dense_ll"].mean()), math.exp(-df["sparse_ll"].mean()),
                             (plo, phi), delta=p))
    fr = counter.counter.fractions()
    kept = {"kept_attention": fr["kept_attention"], "kept_attention_sparse": fr["kept_attention_sparse"],
            "kept_v_rows_prefill": fr["kept_v_rows"]}
    return _finish(name, rows, df, pool_metrics(counter.counter.frames), config, thresholds, lm,
                   time.perf_counter() - t0, kept, len(items), {"dense_seconds": t_d, "sparse_seconds": t_s})


# --------------------------------------------------------------------------- agreement with dense
def heldout_documents(corpus: str, n: int | None = None, *, min_chars: int = 0, part: str = "heldout") -> list[str]:
    """Documents of a bundled corpus split in two fixed halves: ``part="calibration"`` packs the
    even-indexed documents, ``"heldout"`` the odd-indexed ones, so evaluation text is never
    calibration text.  Consecutive documents of a half are packed (joined by a blank line)
    until each has at least ``min_chars`` characters; ``n`` takes the first n packed ones."""
    from .tasks import load_corpus

    if part not in ("calibration", "heldout"):
        raise ValueError(f"part must be 'calibration' or 'heldout', got {part!r}")
    docs = load_corpus(corpus)
    packed, buf = [], []
    for d in docs[(0 if part == "calibration" else 1)::2]:
        buf.append(d)
        if sum(len(b) for b in buf) + 2 * (len(buf) - 1) >= min_chars:
            packed.append(FEWSHOT_DELIMITER.join(buf))
            buf = []
            if n is not None and len(packed) == n:
                break
    if n is not None and len(packed) < n:
        raise ValueError(f"corpus {corpus!r} gives only {len(packed)} {part} documents of ≥ {min_chars} characters, "
                         f"but {n} were asked for")
    return packed


def _kl_top1(dense_logits: torch.Tensor, sparse_logits: torch.Tensor, chunk: int = 128):
    """Per-position KL(dense ‖ sparse) (float64) and top-1 agreement for (S, V) logits."""
    kls, agree = [], []
    for s in range(0, dense_logits.shape[0], chunk):
        ld = torch.log_softmax(dense_logits[s:s + chunk].double(), -1)
        ls = torch.log_softmax(sparse_logits[s:s + chunk].double(), -1)
        kls.append((ld.exp() * (ld - ls)).sum(-1).clamp_min(0.0))
        agree.append(ld.argmax(-1) == ls.argmax(-1))
    return torch.cat(kls), torch.cat(agree)


def evaluate_agreement(lm, texts: Sequence[str], config: SparseConfig, thresholds: Thresholds | None, *,
                       prompts: Sequence[str] = (), max_length: int = 512, max_new_tokens: int = 32,
                       progress: ProgressFn | None = None, task: str = "agreement") -> EvalResult:
    """How closely the sparse model follows the dense one.

    Teacher-forced on ``texts`` (each truncated to ``max_length`` tokens, one forward each):
    next-token KL(dense ‖ sparse) per position (mean, p95, max, in nats) and top-1 agreement.
    Free-running on ``prompts`` (greedy, ``max_new_tokens``, through
    :func:`topθ_core.generation.generate_pair`): token match rate and first-divergence
    position (``max_new_tokens`` when the streams never diverge), plus the sparse stream's
    kept V-row fraction in decode.  Summary rows put the dense-vs-dense value (0 KL, full
    agreement) in ``dense`` and the measured value in ``sparse``.
    """
    model, tok = _unwrap(lm)
    texts, prompts = list(texts), list(prompts)
    if not texts and not prompts:
        raise ValueError("agreement needs texts (teacher-forced) or prompts (free-running)")
    _check_run(lm, config, thresholds)
    t0 = time.perf_counter()
    ks = config.k.as_list(lm.fingerprint.n_layers)
    counter = _KeptCounter()
    total, done = len(texts) + len(prompts), 0
    kls, agrees, doc_rows = [], [], []
    base, project = _base(model), _lm_head(model)
    with torch.inference_mode():
        for i, text in enumerate(texts):
            ids = tok(text, add_special_tokens=True, return_tensors="pt").input_ids[0][:max_length]
            if ids.numel() < 2:
                continue
            x = ids.view(1, -1).to(_device(model))
            ld = project(base(input_ids=x, use_cache=False).last_hidden_state[0])
            m = SparsityMetrics()
            with sparse_run(config, thresholds, model=model, metrics=m):
                ls = project(base(input_ids=x, use_cache=False).last_hidden_state[0])
            counter.add(m.to_frame(), ks, ids.numel())
            kl, ag = _kl_top1(ld, ls)
            kls.append(kl.cpu())
            agrees.append(ag.cpu())
            doc_rows.append({"kind": "teacher-forced", "doc": i, "tokens": int(ids.numel()),
                             "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": float(ag.float().mean())})
            done += 1
            if progress:
                progress(done, total)
    gen_rows = []
    if prompts:
        from .generation import generate_pair

        for i, prompt in enumerate(prompts):
            g = generate_pair(lm, prompt, config, thresholds, max_new_tokens=max_new_tokens)
            n_gen = len(g["dense_ids"])
            fd = g["first_divergence"]
            gen_rows.append({"kind": "free-running", "doc": i, "tokens": n_gen, "match_rate": g["match_rate"],
                             "first_divergence": n_gen if fd is None else fd, "diverged": fd is not None,
                             "gen_mean_kl": g["mean_kl"], "kept_v_rows_decode": g["kept_v_rows_decode"],
                             "dense_text": g["dense_text"], "sparse_text": g["sparse_text"]})
            done += 1
            if progress:
                progress(done, total)
    rows = []
    if kls:
        kl = torch.cat(kls).numpy()
        ag = torch.cat(agrees).numpy().astype(float)
        rows += [_summary_row(task, "kl_mean", 0.0, float(kl.mean())),
                 _summary_row(task, "kl_p95", 0.0, float(np.quantile(kl, 0.95))),
                 _summary_row(task, "kl_max", 0.0, float(kl.max()))]
        dlt, lo, hi = paired_bootstrap(np.ones_like(ag), ag)
        rows.append(_summary_row(task, "top1_agreement", 1.0, float(ag.mean()), (lo, hi), delta=dlt))
    kept_decode = float("nan")
    if gen_rows:
        g = pd.DataFrame(gen_rows)
        rows += [_summary_row(task, "greedy_match_rate", 1.0, float(g["match_rate"].mean())),
                 _summary_row(task, "first_divergence_mean", float(max_new_tokens), float(g["first_divergence"].mean())),
                 _summary_row(task, "diverged_fraction", 0.0, float(g["diverged"].mean()))]
        kept_decode = float(g["kept_v_rows_decode"].mean())
    fr = counter.fractions()
    kept = {"kept_attention": fr["kept_attention"], "kept_attention_sparse": fr["kept_attention_sparse"],
            "kept_v_rows_prefill": fr["kept_v_rows"], "kept_v_rows_decode": kept_decode}
    items = pd.DataFrame(doc_rows + gen_rows)
    return _finish(task, rows, items, pool_metrics(counter.frames), config, thresholds, lm, time.perf_counter() - t0,
                   kept, len(doc_rows) + len(gen_rows),
                   {"teacher_forced_tokens": int(sum(len(k) for k in kls)), "max_new_tokens": max_new_tokens})


# --------------------------------------------------------------------------- dispatcher
MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "openbookqa")
TASKS = ("perplexity", *MC_TASKS, "lambada", "agreement")


def run_task(lm, task: str, limit: int | None, config: SparseConfig, thresholds: Thresholds | None,
             progress: ProgressFn | None = None, **options) -> EvalResult:
    """Evaluate one named task, dense vs sparse; returns an :class:`EvalResult` (not saved:
    call ``result.save()`` to write ``data/results/``).

    Tasks and what ``limit`` counts:

    * ``perplexity`` — documents of the held-out half of a bundled corpus (``corpus=``,
      default ``"pydoc"``; ``max_length=`` default 1024, ``stride=``); metrics ``ppl``,
      ``nll``, ``bpb``.  ``result.perplexity`` is the :class:`PerplexityResult`.
    * ``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``, ``boolq``, ``openbookqa`` —
      items (``num_fewshot=`` default 0); metrics ``acc``, ``acc_norm``, ``pred_changed``.
    * ``lambada`` — items; metrics ``acc``, ``ppl``.
    * ``agreement`` — ``limit`` held-out documents of ``corpus`` (teacher-forced, ``max_length=``
      default 512) and ``limit`` HumanEval prompts (free-running, ``prompt_task=``,
      ``max_new_tokens=`` default 32); ``limit`` defaults to 8.

    ``limit=None`` takes everything (agreement: 8).  Unknown tasks, unknown options and limits
    larger than the data raise ValueError.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")

    def opts(**allowed):
        bad = set(options) - set(allowed)
        if bad:
            raise ValueError(f"task {task!r} does not take option(s) {sorted(bad)}; it takes {sorted(allowed)}")
        return {**allowed, **options}

    if task == "perplexity":
        o = opts(corpus="pydoc", max_length=None, stride=None, add_special_tokens=True)
        texts = heldout_documents(o["corpus"], limit)
        t0 = time.perf_counter()
        pr = evaluate_perplexity(lm, texts, config, thresholds, max_length=o["max_length"], stride=o["stride"],
                                 add_special_tokens=o["add_special_tokens"], progress=progress)
        pd_ = pr.per_doc
        ppl = _ratio_bootstrap(pd_["dense_nll_sum"], pd_["sparse_nll_sum"], pd_["predicted"], transform=np.exp)
        nll = _ratio_bootstrap(pd_["dense_nll_sum"], pd_["sparse_nll_sum"], pd_["predicted"])
        bpb = _ratio_bootstrap(pd_["dense_nll_sum"] / LN2, pd_["sparse_nll_sum"] / LN2, pd_["bytes"])
        name = f"perplexity:{o['corpus']}"
        rows = [_summary_row(name, "ppl", pr.dense_ppl, pr.sparse_ppl, ppl[1:], delta=ppl[0]),
                _summary_row(name, "nll", pr.dense_nll, pr.sparse_nll, nll[1:], delta=nll[0]),
                _summary_row(name, "bpb", pr.dense_bpb, pr.sparse_bpb, bpb[1:], delta=bpb[0])]
        kept = {"kept_attention": pr.kept_attention, "kept_attention_sparse": pr.kept_attention_sparse,
                "kept_v_rows_prefill": pr.kept_v_rows}
        return _finish(name, rows, pr.per_doc, pr.metrics, config, thresholds, lm, time.perf_counter() - t0, kept,
                       pr.documents, {"tokens": pr.tokens, "dense_seconds": pr.dense_seconds,
                                      "sparse_seconds": pr.sparse_seconds}, perplexity=pr)
    if task in MC_TASKS:
        o = opts(num_fewshot=0, max_rows=32, max_tokens=16384, n_boot=2000, seed=0)
        return evaluate_multiple_choice(lm, task, limit, config, thresholds, progress, **o)
    if task == "lambada":
        o = opts(max_rows=32, max_tokens=16384, n_boot=2000, seed=0)
        return evaluate_cloze(lm, "lambada", limit, config, thresholds, progress, **o)
    # agreement
    o = opts(corpus="pydoc", prompt_task="humaneval", max_length=512, max_new_tokens=32)
    from .tasks import load_generation_prompts

    n = limit or 8
    texts = heldout_documents(o["corpus"], n, min_chars=1000)
    prompts = load_generation_prompts(o["prompt_task"], n)
    return evaluate_agreement(lm, texts, config, thresholds, prompts=prompts, max_length=o["max_length"],
                              max_new_tokens=o["max_new_tokens"], progress=progress)
