"""Pure HTML/text rendering for the Compare page (no Streamlit).

Tokens are HTML-escaped; the Top-θ stream colours each token by the next-token
KL(dense‖Top-θ) of its step, and the first divergent token is outlined on both sides.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

STEP_COLUMNS = ["step", "dense_token", "dense_text", "sparse_token", "sparse_text", "kl", "diverged",
                "dense_tok_s", "sparse_tok_s", "kept_v_rows"]


def steps_frame(steps) -> pd.DataFrame:
    """GenStep objects (or dicts) → a DataFrame with :data:`STEP_COLUMNS`."""
    rows = []
    for s in steps:
        rows.append({c: (s.get(c) if isinstance(s, dict) else getattr(s, c, None)) for c in STEP_COLUMNS})
    df = pd.DataFrame(rows, columns=STEP_COLUMNS)
    if not df.empty:
        df["diverged"] = df["diverged"].fillna(False).astype(bool)
    return df


def kl_color(kl: float | None, scale: float = 1.0) -> str:
    """White (KL 0) → red (KL ≥ scale), as an rgba CSS colour."""
    if kl is None or (isinstance(kl, float) and math.isnan(kl)):
        return "rgba(0,0,0,0)"
    a = max(0.0, min(1.0, float(kl) / scale))
    return f"rgba(214,39,40,{0.08 + 0.72 * a:.2f})"


def kl_scale(df: pd.DataFrame, floor: float = 0.05) -> float:
    """Colour scale for a run: its largest finite KL, at least ``floor`` nats (so tiny KL stays pale)."""
    kl = pd.to_numeric(df["kl"], errors="coerce") if len(df) else pd.Series(dtype=float)
    kl = kl[np.isfinite(kl)] if len(kl) else kl
    return max(floor, float(kl.max())) if len(kl) else floor


def first_divergent_step(df: pd.DataFrame) -> int | None:
    d = df[df["diverged"]] if not df.empty else df
    return None if d.empty else int(d["step"].iloc[0])


def tokens_html(df: pd.DataFrame, stream: str, kl_scale: float = 1.0) -> str:
    """HTML of one stream (``"dense"`` or ``"sparse"``); ``data-step`` marks each token."""
    first = first_divergent_step(df)
    parts = ['<div class="tt-stream" style="font-family: ui-monospace, monospace; white-space: pre-wrap; '
             'line-height: 1.7; font-size: 0.9rem">']
    for _, r in df.iterrows():
        text = r[f"{stream}_text"]
        text = "" if text is None else str(text)
        style = []
        if stream == "sparse":
            style.append(f"background:{kl_color(r['kl'], kl_scale)}")
        if first is not None and int(r["step"]) == first:
            style.append("outline:2px solid #d62728; border-radius:3px")
            cls = "tt-tok tt-first-divergence"
        elif first is not None and int(r["step"]) > first:
            style.append("text-decoration: underline dotted #999")
            cls = "tt-tok tt-after-divergence"
        else:
            cls = "tt-tok"
        kl = r["kl"]
        title = f"step {int(r['step'])}" + ("" if kl is None or pd.isna(kl) else f", KL={float(kl):.4f}")
        parts.append(f'<span class="{cls}" data-step="{int(r["step"])}" title="{html.escape(title)}" '
                     f'style="{";".join(style)}">{html.escape(text)}</span>')
    parts.append("</div>")
    return "".join(parts)
