"""Multiple choice the lm-evaluation-harness way: ``acc`` and ``acc_norm``, dense vs sparse on the same items."""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..config import SparseConfig
from ..models import unwrap
from ..tasks import FEWSHOT_DELIMITER, TARGET_DELIMITER, MCItem, load_mc_task
from ..thresholds import Thresholds
from .counts import KeptCounter
from .intervals import paired_bootstrap
from .pair import ArmState, PairedTask, ProgressFn, evaluate_pair
from .results import EvalResult, summary_row
from .scoring import ENCODING, Request, cache_prefix, encode_pair, harness_encode, score_requests

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
    return FEWSHOT_DELIMITER.join(s.context + TARGET_DELIMITER + s.choices[s.gold] for s in shots) + FEWSHOT_DELIMITER


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


def item_requests(tokenizer, item: MCItem, special_tokens: bool = True) -> list[Request]:
    """One :class:`Request` per choice: ``log p(" " + choice | context)`` with the harness's tokenization
    (``special_tokens=False`` after a few-shot prefix, which carries the BOS)."""
    out = []
    for cont in item.continuations():
        ctx, c = encode_pair(tokenizer, item.context, cont, special_tokens=special_tokens)
        if not ctx:
            ctx, c = c[:1], c[1:]  # context of whitespace only: its first token becomes context
        out.append(Request(torch.tensor(ctx, dtype=torch.long), torch.tensor(c, dtype=torch.long)))
    return out


class MultipleChoiceTask(PairedTask):
    """Items of a bundled multiple-choice task (or a list of :class:`MCItem`), each choice scored
    as ``log p(" " + choice | few-shot prefix + context)``."""

    def __init__(self, lm, task: str | Sequence[MCItem], limit: int | None = None, *, num_fewshot: int = 0,
                 max_rows: int = 32, max_tokens: int = 16384, n_boot: int = 2000, seed: int = 0):
        _, tok = unwrap(lm)
        if isinstance(task, str):
            name, items = task, load_mc_task(task, limit)
            pool = load_mc_task(task) if num_fewshot else items
        else:
            pool = list(task)
            if limit is not None and limit > len(pool):
                raise ValueError(f"limit={limit} but the item list has only {len(pool)} items")
            name, items = "custom", pool[: limit if limit is not None else None]
            if not all(isinstance(x, MCItem) for x in items):
                raise TypeError("task must be a task name or a list of MCItem")
        if not items:
            raise ValueError("no items to evaluate")
        shots = choose_fewshot(pool, {x.id for x in items}, num_fewshot, FEWSHOT_SEED + seed)
        shot_ids = {s.id for s in shots}
        self.name, self.num_fewshot, self.tokenizer = name, num_fewshot, tok
        self.units = [x for x in items if x.id not in shot_ids]
        self.shots = shots
        self.prefix_text = fewshot_text(shots)
        self.prefix = torch.tensor(harness_encode(tok, self.prefix_text), dtype=torch.long) if shots else None
        self.max_rows, self.max_tokens, self.n_boot, self.seed = max_rows, max_tokens, n_boot, seed
        self._requests = {x.id: item_requests(tok, x, special_tokens=not shots) for x in self.units}

    def unit_key(self, item: MCItem) -> str:
        return item.id

    def cache_key(self) -> str:
        prefix = hashlib.sha256(self.prefix_text.encode()).hexdigest()[:16]
        return f"mc:{self.name}:fewshot={self.num_fewshot}:prefix={prefix}:enc={ENCODING}"

    def work(self, item: MCItem) -> int:
        return len(item.choices)

    def _prefix(self, lm, state: ArmState):
        """The few-shot prefix's KV cache under this arm (computed once per run) and its metrics frame."""
        if self.prefix is None:
            return None
        if "prefix" not in state.scratch:
            probe = KeptCounter(state.counter.ks)
            with torch.inference_mode():
                pc = state.arm.run(lambda: cache_prefix(lm.model, self.prefix), probe,
                                   self.prefix.numel())
            state.scratch["prefix"] = (pc, probe.frames)
        return state.scratch["prefix"]

    def score(self, lm, units, state: ArmState, tick, dense=None) -> list[dict]:
        P = 0 if self.prefix is None else int(self.prefix.numel())
        prefix = self._prefix(lm, state)
        if prefix is not None:  # the shared prefix counts once per item, as if each prompt ran alone
            for frame in prefix[1]:
                state.counter.add(frame, P, weight=len(units))
        requests, groups = [], []
        for gi, item in enumerate(units):
            for r in self._requests[item.id]:
                requests.append(r)
                groups.append(gi)
        with torch.inference_mode():
            res = score_requests(lm.model, requests, groups=groups, prefix=self.prefix,
                                 prefix_cache=None if prefix is None else prefix[0], max_rows=self.max_rows,
                                 max_tokens=self.max_tokens,
                                 call=lambda fn, seq_len, n: state.arm.run(fn, state.counter, seq_len))
        tick(len(requests))
        out, k = [], 0
        for item in units:
            out.append({"ll": [res[k + j][0] for j in range(len(item.choices))]})
            k += len(item.choices)
        return out

    def items_frame(self, units, dense, sparse) -> pd.DataFrame:
        rows = []
        for item, d, s in zip(units, dense, sparse):
            (pd_, pdn), (ps, psn) = harness_predictions(d["ll"], item.choices), harness_predictions(s["ll"], item.choices)
            rows.append({"id": item.id, "gold": item.gold, "n_choices": len(item.choices), "dense_pred": pd_,
                         "sparse_pred": ps, "dense_pred_norm": pdn, "sparse_pred_norm": psn, "dense_ll": d["ll"],
                         "sparse_ll": s["ll"]})
        df = pd.DataFrame(rows)
        for arm in ("dense", "sparse"):
            df[f"{arm}_acc"] = (df[f"{arm}_pred"] == df["gold"]).astype(float)
            df[f"{arm}_acc_norm"] = (df[f"{arm}_pred_norm"] == df["gold"]).astype(float)
        df["pred_changed"] = df["dense_pred"] != df["sparse_pred"]
        return df

    def summary_rows(self, df: pd.DataFrame) -> list[dict]:
        rows = []
        for metric in ("acc", "acc_norm"):
            dlt, lo, hi = paired_bootstrap(df[f"dense_{metric}"], df[f"sparse_{metric}"], n_boot=self.n_boot,
                                           seed=self.seed)
            rows.append(summary_row(self.name, metric, df[f"dense_{metric}"].mean(), df[f"sparse_{metric}"].mean(),
                                    (lo, hi), delta=dlt))
        rows.append(summary_row(self.name, "pred_changed", 0.0, float(df["pred_changed"].mean())))
        return rows

    def info(self) -> dict:
        P = 0 if self.prefix is None else int(self.prefix.numel())
        reqs = [r for x in self.units for r in self._requests[x.id]]
        return {"choices": len(reqs), "prefix_tokens": P, "fewshot_ids": [s.id for s in self.shots],
                "mean_prompt_tokens": float(np.mean([r.context.numel() + r.continuation.numel() for r in reqs])) + P}

    def total_tokens(self) -> int:
        """Tokens one arm runs through the model (each item's context once, every choice, the prefix per item)."""
        P = 0 if self.prefix is None else int(self.prefix.numel())
        return sum(P + rs[0].context.numel() + sum(r.continuation.numel() for r in rs)
                   for rs in self._requests.values())


def evaluate_multiple_choice(lm, task, limit: int | None, config: SparseConfig, thresholds: Thresholds | None,
                             progress: ProgressFn | None = None, *, num_fewshot: int = 0, max_rows: int = 32,
                             max_tokens: int = 16384, n_boot: int = 2000, seed: int = 0, dense_cache=None,
                             should_stop: Callable[[], bool] | None = None) -> EvalResult:
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
    t = MultipleChoiceTask(lm, task, limit, num_fewshot=num_fewshot, max_rows=max_rows, max_tokens=max_tokens,
                           n_boot=n_boot, seed=seed)
    return evaluate_pair(lm, t, config, thresholds, dense_cache=dense_cache, progress=progress,
                         should_stop=should_stop)
