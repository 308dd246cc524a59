"""Evaluation results: one tidy summary row per metric, saved as Parquet under the results folder."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
import pandas as pd

from ..atomic import atomic_file
from ..config import SparseConfig
from ..paths import results_dir
from ..thresholds import Thresholds

SUMMARY_COLUMNS = ["task", "metric", "dense", "sparse", "delta", "ci_low", "ci_high", "kept_attention",
                   "kept_attention_sparse", "kept_v_rows_prefill", "kept_v_rows_decode", "config_label",
                   "thresholds_id", "n"]
RESULT_COLUMNS = SUMMARY_COLUMNS + ["model", "num_fewshot", "seconds", "config_json", "run_id", "created"]
KEPT_COLUMNS = ("kept_attention", "kept_attention_sparse", "kept_v_rows_prefill", "kept_v_rows_decode")


def thresholds_id(thresholds: Thresholds | None) -> str:
    """A short stable id of a threshold artifact (hash of its provenance), ``"none"`` without one."""
    if thresholds is None:
        return "none"
    meta = json.dumps(thresholds.meta, sort_keys=True, default=str)
    return hashlib.sha256(meta.encode()).hexdigest()[:12]


def summary_row(task: str, metric: str, dense: float, sparse: float, ci=(float("nan"), float("nan")),
                delta: float | None = None) -> dict:
    """One metric: both arms, the difference (``sparse − dense`` unless given) and its interval."""
    return {"task": task, "metric": metric, "dense": float(dense), "sparse": float(sparse),
            "delta": float(sparse - dense if delta is None else delta), "ci_low": float(ci[0]),
            "ci_high": float(ci[1])}


@dataclass
class EvalResult:
    """One evaluation run: a tidy ``summary`` (one row per metric, :data:`RESULT_COLUMNS`), per-item
    details in ``items`` (dense and sparse side by side) and the pooled sparsity ``metrics``."""

    task: str
    summary: pd.DataFrame
    items: pd.DataFrame
    metrics: pd.DataFrame
    config: SparseConfig
    thresholds_id: str
    seconds: float
    info: dict = field(default_factory=dict)
    perplexity: object | None = None  # a perplexity task's PerplexityResult (evaluation.perplexity)

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

    def save(self, directory=None) -> Path:
        return save_result(self, directory)


def make_result(task: str, rows: list[dict], items: pd.DataFrame, metrics: pd.DataFrame, config: SparseConfig,
                thresholds: Thresholds | None, model_name: str, seconds: float, kept: dict, n: int,
                info: dict | None = None, *, num_fewshot: int = 0, run_id: str | None = None,
                created: str | None = None) -> EvalResult:
    """An :class:`EvalResult` whose summary rows carry the kept fractions and the run's provenance."""
    run_id = run_id or uuid.uuid4().hex[:12]
    created = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    tid = thresholds_id(thresholds)
    for r in rows:
        r.update({c: kept.get(c, float("nan")) for c in KEPT_COLUMNS})
        r.update(config_label=config.label(), thresholds_id=tid, n=int(n), model=model_name,
                 num_fewshot=int(num_fewshot), seconds=float(seconds), config_json=json.dumps(config.to_dict()),
                 run_id=run_id, created=created)
    summary = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return EvalResult(task=task, summary=summary, items=items, metrics=metrics, config=config, thresholds_id=tid,
                      seconds=seconds, info=dict(info or {}, run_id=run_id, created=created))


def result_path(result: EvalResult, directory=None) -> Path:
    """Where :func:`save_result` writes ``result``: ``<created>-<task>-<run_id>.parquet``."""
    stamp = result.info.get("created", "").replace(":", "").replace("-", "").replace("+0000", "Z")
    safe_task = "".join(c if c.isalnum() or c in "_." else "_" for c in result.task)
    return results_dir(directory) / f"{stamp}-{safe_task}-{result.info.get('run_id', 'run')}.parquet"


def save_result(result: EvalResult, directory=None) -> Path:
    """Write ``result.summary`` atomically under ``directory`` (default: :func:`topθ_core.paths.results_dir`)."""
    path = result_path(result, directory)
    with atomic_file(path) as tmp:
        result.summary.to_parquet(tmp, index=False)
    return path


def load_results(dir=None) -> pd.DataFrame:  # noqa: A002 (the app calls load_results(dir=...))
    """Every saved result row under ``dir`` (default: :func:`topθ_core.paths.results_dir`), oldest first.

    Columns: :data:`RESULT_COLUMNS`.  An empty frame with those columns when there is none;
    unreadable files are skipped (a half-written file never exists: writes are atomic).
    """
    d = results_dir(dir)
    frames = []
    if d.is_dir():
        for p in sorted(d.glob("*.parquet")):
            if p.name.startswith("."):
                continue
            try:
                frames.append(pd.read_parquet(p))
            except Exception:  # noqa: BLE001 - a foreign or corrupt file must not break the app
                continue
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values("created", kind="stable").reset_index(drop=True) if "created" in df else df
