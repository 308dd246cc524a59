"""Pure functions behind the Accuracy page (no Streamlit): the variant matrix, the result table,
the notes that flag thin results, and the estimate shown before Run."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from topθ_core.config import ConfigError, KSchedule, SparseConfig

# metrics where a larger value is better; every other metric (ppl, nll, bpb, KL, changed predictions) is
# better when smaller
HIGHER_IS_BETTER = {"acc", "acc_norm", "top1_agreement", "greedy_match_rate", "first_divergence_mean"}
ACCURACY_METRICS = ("acc", "acc_norm", "top1_agreement", "greedy_match_rate")
THIN_N = 30  # fewer items than this: the paired interval spans several points
BARELY_ACTIVE = 0.8  # Top-θ kept at least this share of attention: most rows were dense by rule


def better_sign(metric: str) -> int:
    """+1 when a larger value of ``metric`` is better, −1 when a smaller one is."""
    return 1 if metric in HIGHER_IS_BETTER else -1


def is_worse(metric: str, delta: float, tol: float = 1e-12) -> bool:
    """Whether a sparse − dense difference is a loss, whatever the metric's direction."""
    return bool(np.isfinite(delta) and better_sign(metric) * delta < -tol)


def parse_k_list(text: str) -> list[int]:
    """``"32, 64"`` → [32, 64]; empty → []; anything else is a ConfigError naming the entry."""
    out = []
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            k = int(part)
        except ValueError:
            raise ConfigError(f"k list entry {part!r} is not an integer (write e.g. 32,64)") from None
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        if k not in out:
            out.append(k)
    return out


def variant_configs(base: SparseConfig, sdcs=(), vmcs=(), ks=()) -> tuple[list[SparseConfig], list[str]]:
    """The variant matrix: every combination of the chosen SDC variants × VMC settings × k values,
    the others as in ``base`` (an empty choice keeps ``base``'s value).  Returns the valid configs
    (``base`` first when it is one of them, no duplicates) and one line per refused combination."""
    combos = itertools.product(list(sdcs) or [base.sdc.value], list(vmcs) or [base.vmc], list(ks) or [base.k.default])
    configs, refused = [], []
    for sdc, vmc, k in combos:
        try:
            cfg = base.with_(sdc=sdc, vmc=bool(vmc), k=KSchedule(int(k), base.k.overrides, base.k.head_overrides))
        except ConfigError as e:
            refused.append(f"sdc={sdc}, vmc={'on' if vmc else 'off'}, k={k}: {e}")
            continue
        if cfg not in configs:
            configs.append(cfg)
    if base in configs:
        configs.remove(base)
        configs.insert(0, base)
    return configs, refused


def _dims(cfg: SparseConfig) -> dict[str, str]:
    return {"sdc": cfg.sdc.value, "vmc": "on" if cfg.vmc else "off", "k": str(cfg.k.default),
            "prefill": cfg.prefill.value}


def short_labels(configs: list[SparseConfig]) -> list[str]:
    """What tells the variants apart (``"sdc=exact · vmc=off"``); the full label when nothing varies."""
    dims = [_dims(c) for c in configs]
    varying = [d for d in ("sdc", "vmc", "k", "prefill") if len({x[d] for x in dims}) > 1]
    if not varying:
        return [c.label() for c in configs]
    return [" · ".join(f"{d}={x[d]}" for d in varying) for x in dims]


def result_table(results) -> pd.DataFrame:
    """One row per (variant, metric) over every result of a run: both arms, Δ, interval, worse flag."""
    rows = []
    labels = short_labels([r.config for r in results])
    for label, r in zip(labels, results):
        for rec in r.summary.to_dict("records"):
            rows.append({"variant": label, "metric": rec["metric"], "dense": rec["dense"], "Top-θ": rec["sparse"],
                         "Δ": rec["delta"], "ci_low": rec["ci_low"], "ci_high": rec["ci_high"], "n": rec["n"],
                         "kept attention": rec["kept_attention"],
                         "kept (sparse layers)": rec["kept_attention_sparse"],
                         "kept V rows": rec["kept_v_rows_prefill"], "worse": is_worse(rec["metric"], rec["delta"]),
                         "config": rec["config_label"], "task": rec["task"]})
    return pd.DataFrame(rows, columns=["variant", "metric", "dense", "Top-θ", "Δ", "ci_low", "ci_high", "n",
                                       "kept attention", "kept (sparse layers)", "kept V rows", "worse", "config",
                                       "task"])


def thin_notes(table: pd.DataFrame, k: int, mean_tokens: float | None = None) -> list[str]:
    """Why a result may say little: too few items for the interval, or Top-θ barely active."""
    if table.empty:
        return []
    notes = []
    n = int(table["n"].max())
    if n < THIN_N:
        notes.append(f"Only {n} item{'s' if n != 1 else ''}: a paired 95% interval over so few items is wide (or, "
                     "with one item, a single point); differences of a few points are not evidence either way.")
    kept = table["kept attention"].dropna()
    if len(kept) and float(kept.min()) >= BARELY_ACTIVE:
        tokens = f" (mean prompt {mean_tokens:.0f} tokens)" if mean_tokens else ""
        notes.append(f"Top-θ was barely active: it kept {float(kept.min()):.0%} or more of the attention. Rows no "
                     f"longer than k={k}{tokens} stay dense by rule, so most of these prompts were not sparsified; "
                     "use longer inputs (few-shot, perplexity) or a smaller k to see an effect.")
    return notes


@dataclass(frozen=True)
class Estimate:
    """What a run will cost before it starts: tokens per pass, how many are cached, the time at measured rates."""

    units: int
    tokens: int  # tokens one pass runs (dense or one variant)
    dense_cached: int  # units whose dense values are on disk
    variants: int
    seconds: float | None  # None until this model's rates were measured

    def text(self, unit_name: str) -> str:
        dense = "dense cached" if self.dense_cached == self.units else \
            f"dense cached for {self.dense_cached}/{self.units}" if self.dense_cached else "dense to compute"
        when = f"≈ {self.seconds:.0f} s at this model's measured speed" if self.seconds is not None else \
            "time unknown until a first run measures this model's speed"
        return (f"{self.units} {unit_name} · {self.tokens:,} tokens per pass · {self.variants} variant"
                f"{'s' if self.variants != 1 else ''} · {dense} · {when}")


def estimate(units: int, tokens: int, dense_cached: int, variants: int, rates: dict | None) -> Estimate:
    """``rates``: measured tokens/s ``{"dense": r, "sparse": r}`` for this model and kind of task, or None."""
    seconds = None
    if rates and rates.get("dense") and rates.get("sparse"):
        dense_tokens = tokens * (units - dense_cached) / max(1, units)
        seconds = dense_tokens / rates["dense"] + variants * tokens / rates["sparse"]
    return Estimate(units, tokens, dense_cached, variants, seconds)


def measured_rates(results, tokens: int, dense_computed_share: float) -> dict:
    """Tokens/s of the dense and the sparse passes of a finished run (for the next estimate)."""
    sparse_s = sum(r.info.get("sparse_seconds", 0.0) for r in results)
    dense_s = results[0].info.get("dense_seconds", 0.0) if results else 0.0
    out = {}
    if sparse_s > 0:
        out["sparse"] = tokens * len(results) / sparse_s
    if dense_s > 0 and dense_computed_share > 0:
        out["dense"] = tokens * dense_computed_share / dense_s
    return out


def interval_text(lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "–"
    return f"[{lo:+.4f}, {hi:+.4f}]"
