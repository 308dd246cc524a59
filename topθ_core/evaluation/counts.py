"""What the sparse passes of an evaluation kept, pooled over calls and items."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

COUNT_COLUMNS = ["kept", "visible", "topk_equiv", "rows", "dense_rows", "empty_rows", "extrapolated_rows",
                 "kept_v_rows", "kv_rows"]


def pool_metrics(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Sum SparsityMetrics frames (same layout) count by count; recompute the fractions."""
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return pd.DataFrame(columns=["layer", "phase", "head", "kv_head", *COUNT_COLUMNS, "kept_frac", "size_factor"])
    df = pd.concat(frames, ignore_index=True)
    df = df.groupby(["layer", "phase", "head", "kv_head"], as_index=False)[COUNT_COLUMNS].sum()
    df["kept_frac"] = df["kept"] / df["visible"].where(df["visible"] > 0)
    df["size_factor"] = df["kept"] / df["topk_equiv"].where(df["topk_equiv"] > 0)
    return df


def _frac(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


@dataclass
class KeptCounter:
    """Pools kept counts over model calls.

    ``ks`` is the k of every layer: "sparse" fractions pool only the layers whose k is below the
    call's length (the layers where Top-θ can drop anything).  A call's frame may be weighted
    (a few-shot prefix computed once stands for every item that reads it).
    """

    ks: list[int]
    kept: int = 0
    visible: int = 0
    kept_sparse: int = 0
    visible_sparse: int = 0
    kept_v: int = 0
    kv_rows: int = 0
    frames: list = field(default_factory=list)

    def add(self, frame: pd.DataFrame, seq_len: int, weight: int = 1, phase: str = "prefill") -> None:
        if weight != 1:
            frame = frame.copy()
            frame[COUNT_COLUMNS] = frame[COUNT_COLUMNS] * weight
        d = frame[frame["phase"] == phase]
        ds = d[d["layer"].isin([i for i, k in enumerate(self.ks) if k < seq_len])]
        self.kept += int(d["kept"].sum())
        self.visible += int(d["visible"].sum())
        self.kept_sparse += int(ds["kept"].sum())
        self.visible_sparse += int(ds["visible"].sum())
        self.kept_v += int(d["kept_v_rows"].sum())
        self.kv_rows += int(d["kv_rows"].sum())
        self.frames.append(frame)

    def merge(self, other: "KeptCounter") -> "KeptCounter":
        for name in ("kept", "visible", "kept_sparse", "visible_sparse", "kept_v", "kv_rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.frames += other.frames
        return self

    def fractions(self, kept_v_rows_decode: float = float("nan")) -> dict[str, float]:
        """The kept fractions every result row carries."""
        return {"kept_attention": _frac(self.kept, self.visible),
                "kept_attention_sparse": _frac(self.kept_sparse, self.visible_sparse),
                "kept_v_rows_prefill": _frac(self.kept_v, self.kv_rows),
                "kept_v_rows_decode": kept_v_rows_decode}

    def pooled(self) -> pd.DataFrame:
        return pool_metrics(self.frames)
