"""Cloze the lm-evaluation-harness way (LAMBADA): the target word greedy, and its perplexity."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..config import SparseConfig
from ..models import unwrap
from ..tasks import TARGET_DELIMITER, ClozeItem, load_cloze_task
from ..thresholds import Thresholds
from .intervals import paired_bootstrap, ratio_bootstrap
from .pair import ArmState, PairedTask, ProgressFn, evaluate_pair
from .results import EvalResult, summary_row
from .scoring import ENCODING, Request, encode_pair, score_requests


class ClozeTask(PairedTask):
    """``acc`` = the whole target ``" " + word`` is the greedy continuation; ``ppl`` =
    ``exp(−mean over items of log p(target | context))``."""

    def __init__(self, lm, task: str | Sequence[ClozeItem] = "lambada", limit: int | None = None, *,
                 max_rows: int = 32, max_tokens: int = 16384, n_boot: int = 2000, seed: int = 0):
        _, tok = unwrap(lm)
        items = load_cloze_task(task, limit) if isinstance(task, str) else list(task)[:limit]
        if not items:
            raise ValueError("no items to evaluate")
        self.name = task if isinstance(task, str) else "custom_cloze"
        self.units = items
        self.max_rows, self.max_tokens, self.n_boot, self.seed = max_rows, max_tokens, n_boot, seed
        self._requests = {}
        for item in items:
            ctx, c = encode_pair(tok, item.context, TARGET_DELIMITER + item.target)
            self._requests[item.id] = Request(torch.tensor(ctx, dtype=torch.long), torch.tensor(c, dtype=torch.long))

    def unit_key(self, item: ClozeItem) -> str:
        return item.id

    def cache_key(self) -> str:
        return f"cloze:{self.name}:enc={ENCODING}"

    def total_tokens(self) -> int:
        return sum(r.context.numel() + r.continuation.numel() for r in self._requests.values())

    def score(self, lm, units, state: ArmState, tick, dense=None) -> list[dict]:
        requests = [self._requests[x.id] for x in units]
        with torch.inference_mode():
            res = score_requests(lm.model, requests, max_rows=self.max_rows, max_tokens=self.max_tokens,
                                 call=lambda fn, seq_len, n: state.arm.run(fn, state.counter, seq_len))
        tick(len(requests))
        return [{"ll": ll, "greedy": bool(g)} for ll, g in res]

    def items_frame(self, units, dense, sparse) -> pd.DataFrame:
        return pd.DataFrame({"id": [x.id for x in units],
                             "dense_ll": [d["ll"] for d in dense], "sparse_ll": [s["ll"] for s in sparse],
                             "dense_acc": [float(d["greedy"]) for d in dense],
                             "sparse_acc": [float(s["greedy"]) for s in sparse],
                             "target_tokens": [self._requests[x.id].continuation.numel() for x in units]})

    def summary_rows(self, df: pd.DataFrame) -> list[dict]:
        kw = dict(n_boot=self.n_boot, seed=self.seed)
        dlt, lo, hi = paired_bootstrap(df["dense_acc"], df["sparse_acc"], **kw)
        rows = [summary_row(self.name, "acc", df["dense_acc"].mean(), df["sparse_acc"].mean(), (lo, hi), delta=dlt)]
        p, plo, phi = ratio_bootstrap(-df["dense_ll"], -df["sparse_ll"], np.ones(len(df)), transform=np.exp, **kw)
        rows.append(summary_row(self.name, "ppl", math.exp(-df["dense_ll"].mean()), math.exp(-df["sparse_ll"].mean()),
                                (plo, phi), delta=p))
        return rows


def evaluate_cloze(lm, task="lambada", limit: int | None = None, config: SparseConfig | None = None,
                   thresholds: Thresholds | None = None, progress: ProgressFn | None = None, *, max_rows: int = 32,
                   max_tokens: int = 16384, n_boot: int = 2000, seed: int = 0, dense_cache=None,
                   should_stop: Callable[[], bool] | None = None) -> EvalResult:
    """LAMBADA the harness way (:class:`ClozeTask`), dense vs sparse on the same items."""
    if config is None:
        raise ValueError("config is required")
    t = ClozeTask(lm, task, limit, max_rows=max_rows, max_tokens=max_tokens, n_boot=n_boot, seed=seed)
    return evaluate_pair(lm, t, config, thresholds, dense_cache=dense_cache, progress=progress,
                         should_stop=should_stop)
