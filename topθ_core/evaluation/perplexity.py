"""Perplexity and bits per byte, dense vs sparse on identical tokens, document by document."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..config import SparseConfig
from ..metrics import summarize
from ..models import unwrap
from ..thresholds import Thresholds
from .counts import KeptCounter
from .intervals import ratio_bootstrap
from .pair import ArmState, PairedTask, ProgressFn, evaluate_pair
from .results import EvalResult, summary_row
from .scoring import sliding_windows, token_nll

LN2 = math.log(2.0)
DEFAULT_MAX_LENGTH = 1024


@dataclass(frozen=True)
class Document:
    """One document to score: its index among the texts, token ids, UTF-8 bytes and window plan."""

    index: int
    ids: torch.Tensor
    nbytes: int
    windows: tuple[tuple[int, int, int], ...]

    @property
    def predicted(self) -> int:
        return int(self.ids.numel()) - 1


class PerplexityTask(PairedTask):
    """Each document scored on its own with sliding windows; the first token is context only.

    ``max_length`` (default ``min(1024, model maximum)``) tokens per window, ``stride`` (default
    ``max_length // 2``; a stride equal to ``max_length`` is taken as ``max_length − 1`` so no token
    goes unscored).  Bits per byte divide by the UTF-8 length of the whole document (with
    ``truncate=True``: only the first ``max_length`` tokens are scored and bytes count the decoded
    kept tokens).  ``token_cap`` stops after that many tokens in all (the last document is cut
    there, like ``truncate``).
    """

    def __init__(self, lm, texts: Sequence[str], *, name: str = "perplexity", max_length: int | None = None,
                 stride: int | None = None, add_special_tokens: bool = True, truncate: bool = False,
                 token_cap: int | None = None, n_boot: int = 2000, seed: int = 0):
        model, tok = unwrap(lm)
        texts = list(texts)
        if not texts:
            raise ValueError("no documents to evaluate (empty text list)")
        model_max = int(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH)
        max_length = int(max_length or min(DEFAULT_MAX_LENGTH, model_max))
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        stride = int(stride or max(1, max_length // 2))
        if stride == max_length:
            stride = max_length - 1
        if token_cap is not None and token_cap < 2:
            raise ValueError(f"token_cap must be at least 2 tokens, got {token_cap}")
        docs, used = [], 0
        for i, text in enumerate(texts):
            ids = tok(text, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids[0]
            nbytes = len(text.encode("utf-8"))
            cut = max_length if truncate else None
            if token_cap is not None:
                cut = min(cut or ids.numel(), token_cap - used)
            if cut is not None and ids.numel() > cut:
                ids = ids[:cut]
                nbytes = len(tok.decode(ids.tolist()).encode("utf-8"))
            if ids.numel() >= 2:
                docs.append(Document(i, ids, nbytes, tuple(sliding_windows(ids.numel(), max_length, stride))))
                used += int(ids.numel())
            if token_cap is not None and used >= token_cap - 1:
                break
        if not docs:
            raise ValueError("no document has two or more tokens: nothing to score")
        self.name, self.units = name, docs
        self.max_length, self.stride, self.n_boot, self.seed = max_length, stride, n_boot, seed

    def unit_key(self, doc: Document) -> str:
        return hashlib.sha256(doc.ids.numpy().astype(np.int64).tobytes()).hexdigest()[:32]

    def cache_key(self) -> str:
        return f"perplexity:max_length={self.max_length}:stride={self.stride}"

    def work(self, doc: Document) -> int:
        return doc.predicted

    def total_tokens(self) -> int:
        return sum(int(d.ids.numel()) for d in self.units)

    def score(self, lm, units, state: ArmState, tick, dense=None) -> list[dict]:
        out = []
        with torch.inference_mode():
            for doc in units:
                nll = 0.0
                counter = KeptCounter(state.counter.ks)
                for begin, score_from, end in doc.windows:
                    w = doc.ids[begin:end]
                    nll += float(state.arm.run(lambda: token_nll(lm.model, w, score_from - begin).sum(),
                                               counter, w.numel()))
                    tick(end - score_from)
                state.counter.merge(counter)
                out.append({"nll_sum": nll, **({} if state.arm.dense else counter.fractions())})
        return out

    def items_frame(self, units, dense, sparse) -> pd.DataFrame:
        df = pd.DataFrame([{"doc": doc.index, "tokens": int(doc.ids.numel()), "predicted": doc.predicted,
                            "bytes": doc.nbytes, "windows": len(doc.windows), "dense_nll_sum": d["nll_sum"],
                            "sparse_nll_sum": s["nll_sum"], "kept_attention": s["kept_attention"],
                            "kept_attention_sparse": s["kept_attention_sparse"],
                            "kept_v_rows": s["kept_v_rows_prefill"]}
                           for doc, d, s in zip(units, dense, sparse)])
        df["dense_nll"] = df["dense_nll_sum"] / df["predicted"]
        df["sparse_nll"] = df["sparse_nll_sum"] / df["predicted"]
        df["dense_ppl"] = np.exp(df["dense_nll"])
        df["sparse_ppl"] = np.exp(df["sparse_nll"])
        df["delta_nll"] = df["sparse_nll"] - df["dense_nll"]
        df["delta_ppl"] = df["sparse_ppl"] - df["dense_ppl"]
        df["dense_bpb"] = df["dense_nll_sum"] / (LN2 * df["bytes"])
        df["sparse_bpb"] = df["sparse_nll_sum"] / (LN2 * df["bytes"])
        return df

    def summary_rows(self, df: pd.DataFrame) -> list[dict]:
        n_tok, n_bytes = df["predicted"].sum(), df["bytes"].sum()
        nll_d, nll_s = df["dense_nll_sum"].sum() / n_tok, df["sparse_nll_sum"].sum() / n_tok
        kw = dict(n_boot=self.n_boot, seed=self.seed)
        ppl = ratio_bootstrap(df["dense_nll_sum"], df["sparse_nll_sum"], df["predicted"], transform=np.exp, **kw)
        nll = ratio_bootstrap(df["dense_nll_sum"], df["sparse_nll_sum"], df["predicted"], **kw)
        bpb = ratio_bootstrap(df["dense_nll_sum"] / LN2, df["sparse_nll_sum"] / LN2, df["bytes"], **kw)
        return [summary_row(self.name, "ppl", math.exp(nll_d), math.exp(nll_s), ppl[1:], delta=ppl[0]),
                summary_row(self.name, "nll", nll_d, nll_s, nll[1:], delta=nll[0]),
                summary_row(self.name, "bpb", df["dense_nll_sum"].sum() / (LN2 * n_bytes),
                            df["sparse_nll_sum"].sum() / (LN2 * n_bytes), bpb[1:], delta=bpb[0])]

    def info(self) -> dict:
        return {"tokens": int(sum(d.predicted for d in self.units)), "max_length": self.max_length,
                "stride": self.stride}


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

    @classmethod
    def from_result(cls, r: EvalResult) -> "PerplexityResult":
        df = r.items
        pooled = summarize(r.metrics, "prefill") if len(r.metrics) else {}
        first = r.summary.iloc[0]
        return cls(dense_nll=r.value("nll", "dense"), sparse_nll=r.value("nll"), dense_bpb=r.value("bpb", "dense"),
                   sparse_bpb=r.value("bpb"), kept_attention=float(first["kept_attention"]),
                   kept_attention_sparse=float(first["kept_attention_sparse"]),
                   kept_v_rows=float(first["kept_v_rows_prefill"]), tokens=int(df["predicted"].sum()),
                   bytes=int(df["bytes"].sum()), documents=len(df), windows=int(df["windows"].sum()),
                   seconds=r.seconds, dense_seconds=r.info["dense_seconds"], sparse_seconds=r.info["sparse_seconds"],
                   config_label=r.config.label(), thresholds_id=r.thresholds_id, max_length=r.info["max_length"],
                   stride=r.info["stride"], empty_rows=int(pooled.get("empty_rows", 0)),
                   extrapolated_rows=int(pooled.get("extrapolated_rows", 0)), per_doc=df, metrics=r.metrics)

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


def evaluate_perplexity(lm, texts: Sequence[str], config: SparseConfig, thresholds: Thresholds | None, *,
                        max_length: int | None = None, stride: int | None = None, add_special_tokens: bool = True,
                        progress: ProgressFn | None = None, truncate: bool = False, token_cap: int | None = None,
                        dense_cache=None, should_stop: Callable[[], bool] | None = None) -> PerplexityResult:
    """Token perplexity and bits per byte, dense and sparse, each document scored on its own
    (:class:`PerplexityTask` says how).  ``progress(done_tokens, total_tokens)`` after each window.
    ``dense_cache`` (a :class:`~topθ_core.evaluation.dense_cache.DenseCache`) reuses dense NLLs across
    calls on the same texts: sweeps pass one.

    Raises ValueError on an empty text list or when no document has two or more tokens,
    and the engine's errors for thresholds of another model or a bad k schedule.
    """
    task = PerplexityTask(lm, texts, max_length=max_length, stride=stride, add_special_tokens=add_special_tokens,
                          truncate=truncate, token_cap=token_cap)
    res = evaluate_pair(lm, task, config, thresholds, dense_cache=dense_cache, progress=progress,
                        should_stop=should_stop)
    return PerplexityResult.from_result(res)
