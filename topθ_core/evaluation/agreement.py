"""How closely the sparse model follows the dense one: next-token KL, top-1 and greedy agreement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..config import SparseConfig
from ..models import base_model, lm_head, model_device, unwrap
from ..thresholds import Thresholds
from .intervals import paired_bootstrap
from .pair import ArmState, PairedTask, ProgressFn, evaluate_pair
from .results import EvalResult, summary_row


def kl_top1(dense_logits: torch.Tensor, sparse_logits: torch.Tensor, chunk: int = 128):
    """Per-position KL(dense ‖ sparse) (float64) and top-1 agreement for (S, V) logits."""
    kls, agree = [], []
    for s in range(0, dense_logits.shape[0], chunk):
        ld = torch.log_softmax(dense_logits[s:s + chunk].double(), -1)
        ls = torch.log_softmax(sparse_logits[s:s + chunk].double(), -1)
        kls.append((ld.exp() * (ld - ls)).sum(-1).clamp_min(0.0))
        agree.append(ld.argmax(-1) == ls.argmax(-1))
    return torch.cat(kls), torch.cat(agree)


@dataclass(frozen=True)
class _Unit:
    kind: str  # "teacher-forced" | "free-running"
    index: int
    ids: torch.Tensor | None = None
    prompt: str = ""


class AgreementTask(PairedTask):
    """Teacher-forced on ``texts`` (each truncated to ``max_length`` tokens, one forward each):
    next-token KL(dense ‖ sparse) per position (mean, p95, max, in nats) and top-1 agreement.
    Free-running on ``prompts`` (greedy, ``max_new_tokens``, through
    :func:`topθ_core.generation.generate_pair`): token match rate and first-divergence position
    (``max_new_tokens`` when the streams never diverge), plus the sparse stream's kept V-row
    fraction in decode.  Summary rows put the dense-vs-dense value (0 KL, full agreement) in
    ``dense`` and the measured value in ``sparse``.  Dense logits are never cached (too large).
    """

    def __init__(self, lm, texts: Sequence[str], prompts: Sequence[str] = (), *, name: str = "agreement",
                 max_length: int = 512, max_new_tokens: int = 32):
        _, tok = unwrap(lm)
        texts, prompts = list(texts), list(prompts)
        if not texts and not prompts:
            raise ValueError("agreement needs texts (teacher-forced) or prompts (free-running)")
        units = []
        for i, text in enumerate(texts):
            ids = tok(text, add_special_tokens=True, return_tensors="pt").input_ids[0][:max_length]
            if ids.numel() >= 2:
                units.append(_Unit("teacher-forced", i, ids=ids))
        units += [_Unit("free-running", i, prompt=p) for i, p in enumerate(prompts)]
        if not units:
            raise ValueError("no text has two or more tokens and there are no prompts")
        self.name, self.units, self.max_new_tokens = name, units, max_new_tokens

    def unit_key(self, unit: _Unit) -> str:
        return f"{unit.kind}:{unit.index}"

    def score(self, lm, units, state: ArmState, tick, dense=None) -> list[dict]:
        model = lm.model
        base, project = base_model(model), lm_head(model)
        out = []
        for j, u in enumerate(units):
            if u.kind == "teacher-forced":
                x = u.ids.view(1, -1).to(model_device(model))
                with torch.inference_mode():
                    logits = state.arm.run(lambda: project(base(input_ids=x, use_cache=False).last_hidden_state[0]),
                                           state.counter, u.ids.numel())
                if state.arm.dense:
                    out.append({"logits": logits})
                else:
                    kl, ag = kl_top1(dense[j]["logits"], logits)
                    out.append({"kl": kl.cpu().numpy(), "top1": ag.cpu().numpy().astype(float)})
            elif state.arm.dense:
                out.append({})  # the pair of streams runs with the sparse arm
            else:
                from ..generation import generate_pair

                g = generate_pair(lm, u.prompt, state.arm.config, state.arm.thresholds,
                                  max_new_tokens=self.max_new_tokens)
                out.append(g)
            tick(1)
        return out

    def items_frame(self, units, dense, sparse) -> pd.DataFrame:
        rows = []
        for u, s in zip(units, sparse):
            if u.kind == "teacher-forced":
                rows.append({"kind": u.kind, "doc": u.index, "tokens": int(u.ids.numel()),
                             "kl_mean": float(s["kl"].mean()), "kl_max": float(s["kl"].max()),
                             "top1": float(s["top1"].mean()), "kl": s["kl"], "top1_flags": s["top1"]})
            else:
                n_gen, fd = len(s["dense_ids"]), s["first_divergence"]
                rows.append({"kind": u.kind, "doc": u.index, "tokens": n_gen, "match_rate": s["match_rate"],
                             "first_divergence": n_gen if fd is None else fd, "diverged": fd is not None,
                             "gen_mean_kl": s["mean_kl"], "kept_v_rows_decode": s["kept_v_rows_decode"],
                             "dense_text": s["dense_text"], "sparse_text": s["sparse_text"]})
        return pd.DataFrame(rows)

    def summary_rows(self, df: pd.DataFrame) -> list[dict]:
        rows, task = [], self.name
        tf = df[df["kind"] == "teacher-forced"] if len(df) else df
        if len(tf):
            kl = np.concatenate(list(tf["kl"]))
            ag = np.concatenate(list(tf["top1_flags"]))
            rows += [summary_row(task, "kl_mean", 0.0, float(kl.mean())),
                     summary_row(task, "kl_p95", 0.0, float(np.quantile(kl, 0.95))),
                     summary_row(task, "kl_max", 0.0, float(kl.max()))]
            dlt, lo, hi = paired_bootstrap(np.ones_like(ag), ag)
            rows.append(summary_row(task, "top1_agreement", 1.0, float(ag.mean()), (lo, hi), delta=dlt))
        fr = df[df["kind"] == "free-running"] if len(df) else df
        if len(fr):
            rows += [summary_row(task, "greedy_match_rate", 1.0, float(fr["match_rate"].mean())),
                     summary_row(task, "first_divergence_mean", float(self.max_new_tokens),
                                 float(fr["first_divergence"].mean())),
                     summary_row(task, "diverged_fraction", 0.0, float(fr["diverged"].mean()))]
        return rows

    def kept_v_rows_decode(self, df: pd.DataFrame) -> float:
        if "kept_v_rows_decode" not in df:
            return float("nan")
        return float(df["kept_v_rows_decode"].dropna().mean())

    def total_tokens(self) -> int:
        return sum(int(u.ids.numel()) if u.ids is not None else self.max_new_tokens for u in self.units)

    def info(self) -> dict:
        return {"teacher_forced_tokens": int(sum(u.ids.numel() for u in self.units if u.ids is not None)),
                "max_new_tokens": self.max_new_tokens}


def evaluate_agreement(lm, texts: Sequence[str], config: SparseConfig, thresholds: Thresholds | None, *,
                       prompts: Sequence[str] = (), max_length: int = 512, max_new_tokens: int = 32,
                       progress: ProgressFn | None = None, task: str = "agreement",
                       should_stop: Callable[[], bool] | None = None) -> EvalResult:
    """How closely the sparse model follows the dense one (:class:`AgreementTask` says how)."""
    t = AgreementTask(lm, texts, prompts, name=task, max_length=max_length, max_new_tokens=max_new_tokens)
    return evaluate_pair(lm, t, config, thresholds, progress=progress, should_stop=should_stop)
