"""The Kernels page's headline: per card, the few speed numbers that matter, from the saved benchmark rows.

Pure (no Streamlit).  :func:`headline` reads, under ``benchmarks/results/`` (never ``logs/``):

* every ``kernels_*.csv`` (``benchmarks/bench_kernels.py`` writes ``kernels_<CARD>.csv``).  Columns read:
  ``kernel`` and ``speedup`` (required: a file without them adds nothing); ``card`` (else the ``<CARD>`` of
  the file name); ``run`` (which device call made the row; without it all rows count as one run);
  ``B``, ``N``, ``heads``, ``d``, ``dtype`` (the shape, shown); ``f_target`` / ``f_kept_v`` (decode's kept
  V-row fraction); ``f_kept_elems`` / ``f_target`` (prefill's kept element fraction); ``speedup_graph``
  (both sides under CUDA graphs); ``baseline_backend``; and for end-to-end rows (``kernel`` starting with
  ``e2e``) the tokens/s columns below.
* every ``e2e*.csv``: end-to-end decode rows, one per (shape, baseline).  Columns read: ``speedup`` or both
  tokens/s columns (ours: ``tokens_per_s_topθ`` / ``tokens_per_s_toptheta`` / ``tokens_per_s_ours``;
  baseline: ``tokens_per_s_sdpa`` / ``tokens_per_s_baseline``), and as above ``card``, ``run``, ``kernel``,
  ``data``, ``B``, ``N``, ``baseline_backend``.

What each headline row is (per card, from the card's latest ``run`` of that kind of row):

* **decode, f = 1/3** and **decode, f = 0.15**: ``kernel == "decode"`` rows whose kept V-row fraction
  (``f_target``, else ``f_kept_v``) is within 0.02 of f.  The value is the speed-up over SDPA at the
  largest shape (B·N, then B: the bandwidth-bound case decode sparsity is for); ``low``/``high`` give the
  range over every shape of that run, under CUDA graphs where ``speedup_graph`` was measured (eager timings
  of the small, host-bound shapes are mostly launch overhead), else eager.
* **prefill**: ``kernel == "prefill"`` rows at the largest N of the latest run, the one whose kept element
  fraction is nearest 10% (the prefill target is set at 10% kept).
* **end to end**: the method of the latest run (its ``kernel`` label without the model, e.g. CUDA-graph
  steps rather than an older eager loop), one row per (kernel, data, B, N), from the latest run that
  measured that shape (a later run may re-measure some shapes only); of the baselines measured for a shape,
  the fastest (most baseline tokens/s, else least ``baseline_ms``) is the one compared against, never a
  slower straw man.

A measure with no usable row is still listed, with NaN values and ``note == "not measured"``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

DECODE_FRACTIONS = ((1 / 3, "1/3"), (0.15, "0.15"))
F_TOLERANCE = 0.02
PREFILL_FRACTION = 0.10
NOT_MEASURED = "not measured"
OURS_TPS = ("tokens_per_s_topθ", "tokens_per_s_toptheta", "tokens_per_s_ours")
BASE_TPS = ("tokens_per_s_sdpa", "tokens_per_s_baseline")
COLUMNS = ["card", "measure", "speedup", "low", "high", "speedup_graph", "tokens_per_s", "tokens_per_s_baseline",
           "shape", "baseline", "source", "note"]


def card_from_name(path: Path) -> str:
    """``kernels_H200.csv`` → ``H200``; ``e2e_H100_sxm.csv`` → ``H100_sxm``; ``""`` when the name has none."""
    m = re.match(r"^(?:kernels|e2e)_?(.*)$", path.stem)
    return m.group(1) if m else ""


def _read(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except Exception:  # noqa: BLE001 - an unreadable file adds no rows (the raw view shows why)
        return pd.DataFrame()
    card = card_from_name(path) or "unknown card"
    df["card"] = df["card"].fillna(card).astype(str) if "card" in df else card
    df["_source"] = path.name
    return df


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(np.nan, index=df.index)


def _first(df: pd.DataFrame, cols) -> pd.Series:
    """The first of ``cols`` present, numeric (NaN where absent)."""
    out = pd.Series(np.nan, index=df.index)
    for c in cols:
        if c in df:
            out = out.fillna(_num(df, c))
    return out


def _latest(df: pd.DataFrame) -> pd.DataFrame:
    runs = _num(df, "run")
    if df.empty or runs.isna().all():
        return df
    return df[runs == runs.max()]


def _label_parts(kernel) -> tuple[str, str | None]:
    """An end-to-end row's kernel label as (method, model): "e2e decode, CUDA graph (llama3-8b, random
    weights)" → ("e2e decode, CUDA graph", "llama3-8b")."""
    m = re.fullmatch(r"(.*?)\s*\(([^,)]+)[^)]*\)\s*", str(kernel))
    return (m.group(1), m.group(2)) if m else (str(kernel), None)


def _latest_per_shape(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The latest run's method (e.g. CUDA-graph steps, not an older eager loop), and of its rows each shape's
    from the latest run that measured it (a later run may re-measure only some shapes)."""
    runs = _num(df, "run")
    if df.empty or runs.isna().all() or not keys:
        return _latest(df)
    if "kernel" in df:
        methods = df["kernel"].map(lambda k: _label_parts(k)[0])
        keep = methods == methods[runs == runs.max()].iloc[0]
        df, runs = df[keep], runs[keep]
    newest = runs.groupby([df[k] for k in keys], dropna=False).transform("max")
    return df[runs == newest]


def _tokens(n) -> str:
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _shape(r: pd.Series) -> str:
    parts = []
    for col, fmt in (("B", lambda v: f"B={int(v)}"), ("N", lambda v: f"N={_tokens(v)}"),
                     ("heads", lambda v: f"{v} heads"), ("d", lambda v: f"d {int(v)}"), ("dtype", str)):
        v = r.get(col)
        if v is not None and not (isinstance(v, float) and np.isnan(v)):
            try:
                parts.append(fmt(v))
            except (TypeError, ValueError):
                continue
    return ", ".join(parts)


def _source(r: pd.Series) -> str:
    run = r.get("run")
    has_run = run is not None and not (isinstance(run, float) and np.isnan(run))
    return f"{r['_source']}" + (f" · run {int(run)}" if has_run else "")


def _row(card: str, measure: str, **values) -> dict:
    row = {c: np.nan for c in COLUMNS}
    row.update(card=card, measure=measure, shape="", baseline="", source="", note="")
    row.update(values)
    return row


def _missing(card: str, measure: str) -> dict:
    return _row(card, measure, note=NOT_MEASURED)


def _decode(card: str, rows: pd.DataFrame) -> list[dict]:
    rows = _latest(rows)
    f = _first(rows, ("f_target", "f_kept_v"))
    out = []
    for target, label in DECODE_FRACTIONS:
        measure = f"decode, f = {label}"
        at = rows[((f - target).abs() <= F_TOLERANCE) & _num(rows, "speedup").notna()]
        if at.empty:
            out.append(_missing(card, measure))
            continue
        size = _num(at, "B").fillna(1) * _num(at, "N").fillna(0)
        order = pd.DataFrame({"size": size, "B": _num(at, "B").fillna(0)}).sort_values(["size", "B"])
        best = at.loc[order.index[-1]]
        graph = _num(at, "speedup_graph")
        spread, how = (graph, "under CUDA graphs") if graph.notna().any() else (_num(at, "speedup"), "eager")
        out.append(_row(card, measure, speedup=float(best["speedup"]), low=float(spread.min()),
                        high=float(spread.max()), speedup_graph=float(graph.loc[best.name]), shape=_shape(best),
                        baseline=str(best.get("baseline_backend", "") or ""), source=_source(best),
                        note=f"largest of {len(at)} shapes; range {how}"))
    return out


def _prefill(card: str, rows: pd.DataFrame) -> list[dict]:
    rows = _latest(rows)
    rows = rows[_num(rows, "speedup").notna()]
    if rows.empty:
        return [_missing(card, "prefill")]
    n = _num(rows, "N")
    if n.notna().any():
        rows = rows[n == n.max()]
    f = _first(rows, ("f_kept_elems", "f_target"))
    best = rows.loc[(f - PREFILL_FRACTION).abs().fillna(np.inf).idxmin()]
    kept = f.loc[best.name]
    note = f"{kept:.0%} of elements kept" if np.isfinite(kept) else ""
    graph = _num(rows, "speedup_graph")  # the same row under CUDA graphs, where measured (as for decode)
    return [_row(card, "prefill", speedup=float(best["speedup"]), low=float(best["speedup"]),
                 high=float(best["speedup"]), speedup_graph=float(graph.loc[best.name]), shape=_shape(best),
                 baseline=str(best.get("baseline_backend", "") or ""), source=_source(best), note=note)]


def _e2e(card: str, rows: pd.DataFrame) -> list[dict]:
    keys = [c for c in ("kernel", "data", "B", "N") if c in rows]
    rows = _latest_per_shape(rows, keys)
    if rows.empty:
        return [_missing(card, "end to end")]
    rows = rows.copy()
    rows["_ours"] = _first(rows, OURS_TPS)
    rows["_base"] = _first(rows, BASE_TPS)
    rows["_speedup"] = _num(rows, "speedup").fillna(rows["_ours"] / rows["_base"])
    rows = rows[rows["_speedup"].notna()]
    if rows.empty:
        return [_missing(card, "end to end")]
    out = []
    for _, g in (rows.groupby(keys, sort=True, dropna=False) if keys else [(None, rows)]):
        if g["_base"].notna().any():  # the fastest baseline measured for this shape
            best = g.loc[g["_base"].idxmax()]
        elif "baseline_ms" in g and _num(g, "baseline_ms").notna().any():
            best = g.loc[_num(g, "baseline_ms").idxmin()]
        else:
            best = g.iloc[0]
        what = str(best.get("kernel", "")) if str(best.get("kernel", "")).lower().startswith("e2e") else ""
        model = _label_parts(what)[1]
        label = "end to end" + (f" ({model})" if model else "") + \
            (f", B={int(best['B'])}" if "B" in g and pd.notna(best.get("B")) else "") + \
            (f", N={_tokens(best['N'])}" if "N" in g and pd.notna(best.get("N")) else "")
        out.append(_row(card, label, speedup=float(best["_speedup"]), low=float(best["_speedup"]),
                        high=float(best["_speedup"]), tokens_per_s=float(best["_ours"]),
                        tokens_per_s_baseline=float(best["_base"]), shape=_shape(best),
                        baseline=str(best.get("baseline_backend", "") or ""), source=_source(best),
                        note=(what + "; " if what else "") + f"fastest of {len(g)} baselines"))
    return out


def headline_from_frames(kernels: pd.DataFrame, e2e: pd.DataFrame | None = None) -> pd.DataFrame:
    """The headline (:data:`COLUMNS`) from kernel rows and end-to-end rows (both as read by :func:`_read`:
    with ``card`` and ``_source``).  One block of rows per card, cards sorted."""
    kernels = kernels if kernels is not None else pd.DataFrame()
    e2e = e2e if e2e is not None else pd.DataFrame()
    kind = kernels["kernel"].astype(str) if "kernel" in kernels else pd.Series("", index=kernels.index)
    ends = pd.concat([kernels[kind.str.lower().str.startswith("e2e")], e2e], ignore_index=True)
    cards = sorted(set(kernels["card"] if "card" in kernels else []) | set(ends["card"] if "card" in ends else []))
    rows = []
    for card in cards:
        mine = kernels[kernels["card"] == card] if "card" in kernels else kernels.iloc[:0]
        k = kind.loc[mine.index]
        rows += _decode(card, mine[k == "decode"])
        rows += _prefill(card, mine[k == "prefill"])
        rows += _e2e(card, ends[ends["card"] == card] if "card" in ends else ends.iloc[:0])
    return pd.DataFrame(rows, columns=COLUMNS)


def headline(root: Path) -> pd.DataFrame:
    """The headline of the result files under ``root`` (see the module docstring for what is read)."""
    root = Path(root)
    if not root.is_dir():
        return pd.DataFrame(columns=COLUMNS)
    kernels = [_read(p) for p in sorted(root.glob("kernels_*.csv"))]
    e2e = [_read(p) for p in sorted(root.glob("e2e*.csv"))]
    cat = lambda fs: pd.concat(fs, ignore_index=True) if fs else pd.DataFrame()  # noqa: E731
    return headline_from_frames(cat(kernels), cat(e2e))


def _ratio(v: float) -> str:
    return f"{v:.2f}×" if np.isfinite(v) else NOT_MEASURED


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One card's headline as text for a table: measure, speed-up vs SDPA (range), graph, tokens/s, shape, …"""
    out = []
    for _, r in df.iterrows():
        measured = np.isfinite(r["speedup"])
        spread = (f"{r['low']:.2f}–{r['high']:.2f}×" if measured and np.isfinite(r["low"]) and r["low"] != r["high"]
                  else "")
        tps = (f"{r['tokens_per_s']:,.1f} vs {r['tokens_per_s_baseline']:,.1f}"
               if np.isfinite(r["tokens_per_s"]) and np.isfinite(r["tokens_per_s_baseline"]) else "")
        out.append({"measure": r["measure"], "speed-up vs SDPA": _ratio(r["speedup"]),
                    "under CUDA graphs": _ratio(r["speedup_graph"]) if np.isfinite(r["speedup_graph"]) else "",
                    "range over shapes": spread, "tokens/s (Top-θ vs SDPA)": tps, "shape": r["shape"],
                    "baseline": r["baseline"], "source": r["source"], "note": r["note"]})
    return pd.DataFrame(out)


def metric_cells(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """One card's headline as (label, value, help) for metric tiles: ``("decode, f = 0.15", "1.23×", "B=32, …")``."""
    out = []
    for _, r in df.iterrows():
        where = "; ".join(x for x in (r["shape"], f"baseline: {r['baseline']}" if r["baseline"] else "",
                                      r["source"], r["note"]) if x)
        out.append((str(r["measure"]), _ratio(r["speedup"]), where))
    return out


def cells_by_card(head: pd.DataFrame) -> dict[str, list[tuple[str, str, str]]]:
    """:func:`metric_cells` of every card of a headline, card by card."""
    return {str(card): metric_cells(rows) for card, rows in head.groupby("card", sort=True)}
