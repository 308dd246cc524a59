"""Pure figure builders: ``DataFrame`` (or arrays) in, ``plotly.graph_objects.Figure`` out.

No Streamlit, no model, no file access: every function here is tested on its own
(``tests/test_app_figures.py``).  Threshold frames are :meth:`Thresholds.to_frame` tables;
metric frames are :meth:`SparsityMetrics.to_frame` tables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
_LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=50, b=45))


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, **_LAYOUT)
    return fig


# ---------------------------------------------------------------------------- thresholds
def with_sigma(df: pd.DataFrame, sigma: float | None) -> pd.DataFrame:
    """The threshold frame with ``theta`` recomputed as ``t_mean + σ·t_std`` (unchanged when σ is None)."""
    if sigma is None or df.empty:
        return df
    out = df.copy()
    out["theta"] = out["t_mean"] + float(sigma) * out["t_std"]
    return out


def theta_at_length(df: pd.DataFrame, length: float) -> pd.DataFrame:
    """θ per (layer, head) at one row length, linear in L between calibrated bins, flat beyond.

    Returns columns layer, head, theta, extrapolated (length outside the head's calibrated range).
    """
    rows = []
    for (layer, head), g in df.groupby(["layer", "head"], sort=True):
        g = g.sort_values("length")
        x, y = g["length"].to_numpy(float), g["theta"].to_numpy(float)
        rows.append({"layer": int(layer), "head": int(head), "theta": float(np.interp(length, x, y)),
                     "extrapolated": bool(length < g["length_lo"].min() or length > g["length_hi"].max())})
    return pd.DataFrame(rows, columns=["layer", "head", "theta", "extrapolated"])


def theta_vs_length(df: pd.DataFrame, layer: int, heads: list[int], overlay: pd.DataFrame | None = None,
                    names: tuple[str, str] = ("active", "overlay")) -> go.Figure:
    """θ against row length for the chosen heads of one layer; an overlay run is drawn dashed."""
    title = f"θ vs row length · layer {layer}"
    d = df[(df["layer"] == layer) & (df["head"].isin(heads))]
    if d.empty:
        return _empty(title, "no calibrated rows for this layer (rows with L ≤ k stay dense)")
    fig = go.Figure()
    for frame, name, dash in ((d, names[0], "solid"),
                              (None if overlay is None else overlay[(overlay["layer"] == layer)
                                                                    & (overlay["head"].isin(heads))],
                               names[1], "dash")):
        if frame is None or frame.empty:
            continue
        for head, g in frame.groupby("head", sort=True):
            g = g.sort_values("length")
            fig.add_trace(go.Scatter(
                x=g["length"], y=g["theta"], mode="lines+markers", name=f"{name} · head {head}",
                line=dict(color=PALETTE[int(head) % len(PALETTE)], dash=dash), marker=dict(size=4),
                customdata=np.stack([g["count"], g["t_std"]], axis=-1),
                hovertemplate="L≈%{x:.0f}<br>θ=%{y:.3f}<br>n=%{customdata[0]}<br>std=%{customdata[1]:.3f}<extra>"
                              + f"{name} · head {head}</extra>"))
    fig.update_layout(title=title, xaxis_title="row length L (bin centre)", yaxis_title="θ", legend_title="run · head",
                      showlegend=True,
                      **_LAYOUT)
    return fig


def theta_grid(cells: pd.DataFrame, length: float, selected: tuple[int, int] | None = None) -> go.Figure:
    """Layer × head grid of θ at one row length, as square scatter markers (clickable in Streamlit).

    ``cells``: :func:`theta_at_length` output.  Each marker's ``customdata`` is ``[layer, head]``.
    """
    title = f"θ at L = {length:g} (click a cell to open that head)"
    if cells.empty:
        return _empty(title, "no calibrated heads")
    n_layers = int(cells["layer"].max()) + 1
    n_heads = int(cells["head"].max()) + 1
    size = max(8, min(28, int(520 / max(n_layers, n_heads * 2))))
    fig = go.Figure(go.Scatter(
        x=cells["head"], y=cells["layer"], mode="markers",
        marker=dict(symbol="square", size=size, color=cells["theta"], colorscale="Viridis", showscale=True,
                    colorbar=dict(title="θ"), line=dict(width=[1 if e else 0 for e in cells["extrapolated"]],
                                                        color="#888")),
        customdata=cells[["layer", "head"]].to_numpy(),
        hovertemplate="layer %{y}, head %{x}<br>θ=%{marker.color:.3f}<extra></extra>", name="θ"))
    if selected is not None:
        fig.add_trace(go.Scatter(x=[selected[1]], y=[selected[0]], mode="markers", hoverinfo="skip", showlegend=False,
                                 marker=dict(symbol="square-open", size=size + 6, color="#d62728", line=dict(width=3))))
    fig.update_layout(title=title, xaxis=dict(title="query head", dtick=1, range=[-0.7, n_heads - 0.3]),
                      yaxis=dict(title="layer", dtick=1 if n_layers <= 32 else None, autorange="reversed"),
                      height=max(320, min(900, 60 + n_layers * (size + 4))), showlegend=False, clickmode="event+select",
                      **_LAYOUT)
    return fig


def theta_histogram(df: pd.DataFrame, layer: int | None = None, overlay: pd.DataFrame | None = None,
                    names: tuple[str, str] = ("active", "overlay")) -> go.Figure:
    """Distribution of θ over (head, length bin) of one layer (all layers when ``None``), two runs overlaid."""
    title = "θ distribution · " + ("all layers" if layer is None else f"layer {layer}")
    fig = go.Figure()
    for frame, name, color in ((df, names[0], PALETTE[0]), (overlay, names[1], PALETTE[1])):
        if frame is None or frame.empty:
            continue
        d = frame if layer is None else frame[frame["layer"] == layer]
        if d.empty:
            continue
        fig.add_trace(go.Histogram(x=d["theta"], name=name, opacity=0.6, marker_color=color, nbinsx=40))
    if not fig.data:
        return _empty(title, "no calibrated rows")
    fig.update_layout(title=title, barmode="overlay", xaxis_title="θ", yaxis_title="(head, length bin) cells",
                      **_LAYOUT)
    return fig


def k_schedule_bar(table: pd.DataFrame) -> go.Figure:
    """Target k per layer (the Calibrate page's k table)."""
    fig = go.Figure(go.Bar(x=table["layer"], y=table["k"], marker_color=PALETTE[0],
                           hovertemplate="layer %{x}: k=%{y}<extra></extra>"))
    fig.update_layout(title="k per layer", xaxis_title="layer", yaxis_title="k", height=220, **_LAYOUT)
    return fig


# ---------------------------------------------------------------------------- sparsity
def attention_maps(dense: np.ndarray, sparse: np.ndarray, kept: np.ndarray, visible: np.ndarray, *, head: int,
                   pool: int = 1, title: str = "") -> go.Figure:
    """Side by side for one head: the Top-θ map (weights applied to V, dropped cells grey) and the dense softmax.

    ``dense``/``sparse``/``kept``: (H, n, n) arrays (pooled: ``pool`` tokens per cell);
    ``visible`` (n, n).  Colour is log10 of the weight; cells with nothing kept are grey on
    the left, future (masked) cells are blank on both sides.
    """
    d, s, k = dense[head], sparse[head], kept[head]
    vis = visible > 0
    floor = -6.0
    log_dense = np.where(vis, np.log10(np.maximum(d, 10 ** floor)), np.nan)
    log_sparse = np.where(vis & (k > 0), np.log10(np.maximum(s, 10 ** floor)), np.nan)
    dropped = np.where(vis & (k == 0), 1.0, np.nan)
    unit = "token" if pool == 1 else f"{pool}-token block"
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08, shared_yaxes=True,
                        subplot_titles=(f"Top-θ: kept weights (grey = dropped), {k[vis].mean() if vis.any() else 0:.1%} kept",
                                        "dense softmax probabilities"))
    fig.add_trace(go.Heatmap(z=dropped, colorscale=[[0, "#d9d9d9"], [1, "#d9d9d9"]], showscale=False,
                             hoverinfo="skip", name="dropped"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=log_sparse, customdata=k, zmin=floor, zmax=0, colorscale="Viridis", showscale=False,
                             hovertemplate="query %{y}, key %{x}<br>log10 w=%{z:.2f}<br>kept %{customdata:.0%}"
                                           "<extra>Top-θ</extra>", name="Top-θ"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=log_dense, zmin=floor, zmax=0, colorscale="Viridis",
                             colorbar=dict(title="log10 p", x=1.02),
                             hovertemplate="query %{y}, key %{x}<br>log10 p=%{z:.2f}<extra>dense</extra>",
                             name="dense"), row=1, col=2)
    fig.update_yaxes(autorange="reversed", title_text=f"query ({unit})", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_xaxes(title_text=f"key ({unit})", scaleanchor=None)
    fig.update_layout(title=title or f"head {head}", height=480, **_LAYOUT)
    return fig


def layer_head_heatmap(metrics: pd.DataFrame, value: str = "kept_frac", phase: str = "prefill",
                       title: str | None = None) -> go.Figure:
    """Layer × query-head heatmap of a metrics column (default: kept attention fraction)."""
    title = title or f"kept attention fraction · {phase}"
    d = metrics[metrics["phase"] == phase]
    if d.empty:
        return _empty(title, f"no {phase} calls recorded")
    z = d.pivot_table(index="layer", columns="head", values=value, aggfunc="mean")
    fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=z.columns, y=z.index, colorscale="Blues", zmin=0,
                               zmax=max(1e-9, float(np.nanmax(z.to_numpy()))) if value != "kept_frac" else 1,
                               colorbar=dict(title=value),
                               hovertemplate="layer %{y}, head %{x}<br>%{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis=dict(title="query head", dtick=1), yaxis=dict(title="layer", autorange="reversed"),
                      height=max(300, 40 + 16 * len(z.index)), **_LAYOUT)
    return fig


def kv_rows_frame(metrics: pd.DataFrame, phase: str = "prefill") -> pd.DataFrame:
    """Kept V-row fraction per (layer, KV head): rows that any query head of the group keeps."""
    d = metrics[(metrics["phase"] == phase) & (metrics["kv_rows"] > 0)]
    g = d.groupby(["layer", "kv_head"], as_index=False)[["kept_v_rows", "kv_rows"]].sum()
    g["kept_v_frac"] = g["kept_v_rows"] / g["kv_rows"]
    return g


def kv_rows_heatmap(metrics: pd.DataFrame, phase: str = "prefill") -> go.Figure:
    title = f"kept V rows per KV head · {phase}"
    g = kv_rows_frame(metrics, phase)
    if g.empty:
        return _empty(title, f"no {phase} calls recorded")
    z = g.pivot_table(index="layer", columns="kv_head", values="kept_v_frac")
    fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=z.columns, y=z.index, colorscale="Oranges", zmin=0, zmax=1,
                               colorbar=dict(title="kept V"),
                               hovertemplate="layer %{y}, KV head %{x}<br>%{z:.1%} of V rows read<extra></extra>"))
    fig.update_layout(title=title, xaxis=dict(title="KV head", dtick=1), yaxis=dict(title="layer", autorange="reversed"),
                      height=max(300, 40 + 16 * len(z.index)), **_LAYOUT)
    return fig


def popularity_bar(popularity: pd.DataFrame, layer: int, tokens: list[str] | None = None) -> go.Figure:
    """V-row popularity of one layer: how many (query head, row) pairs keep each V row."""
    title = f"V-row popularity · layer {layer}"
    d = popularity[popularity["layer"] == layer]
    if d.empty:
        return _empty(title, "no prefill recorded for this layer")
    text = None
    if tokens is not None and len(tokens) >= len(d):
        text = [tokens[int(p)] for p in d["position"]]
    fig = go.Figure(go.Bar(x=d["position"], y=d["count"], marker_color=PALETTE[2], hovertext=text,
                           hovertemplate="position %{x}<br>kept by %{y} (head,row) pairs<br>%{hovertext}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="key position", yaxis_title="kept by (head, row) pairs", height=300,
                      bargap=0, **_LAYOUT)
    return fig


def decode_strip(decode: pd.DataFrame, generated: list[str] | None = None) -> go.Figure:
    """Layer × decode-step strip of the kept V-row fraction (pooled over KV heads)."""
    title = "decode steps · kept V rows"
    if decode.empty:
        return _empty(title, "no decode steps recorded (set decode steps > 0)")
    z = decode.pivot_table(index="layer", columns="step", values="kept_v_frac")
    labels = [f"{s}: {generated[s]!r}" if generated and s < len(generated) else str(s) for s in z.columns]
    fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=labels, y=z.index, colorscale="Oranges", zmin=0, zmax=1,
                               colorbar=dict(title="kept V"),
                               hovertemplate="layer %{y}, step %{x}<br>%{z:.1%} of V rows read<extra></extra>"))
    fig.update_layout(title=title, xaxis=dict(title="decode step (token produced)"),
                      yaxis=dict(title="layer", autorange="reversed"), height=max(260, 40 + 12 * len(z.index)), **_LAYOUT)
    return fig


# ---------------------------------------------------------------------------- compare
def compare_steps_chart(steps: pd.DataFrame) -> go.Figure:
    """Per decode step: KL(dense‖sparse), tokens/s of both streams, kept V rows."""
    title = "per-step agreement and cost"
    if steps.empty:
        return _empty(title, "no steps yet")
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("next-token KL(dense‖Top-θ)", "tokens/s", "kept V rows"))
    fig.add_trace(go.Bar(x=steps["step"], y=steps["kl"], name="KL", marker_color=PALETTE[3]), row=1, col=1)
    fig.add_trace(go.Scatter(x=steps["step"], y=steps["dense_tok_s"], name="dense tok/s", mode="lines",
                             line=dict(color=PALETTE[0])), row=2, col=1)
    fig.add_trace(go.Scatter(x=steps["step"], y=steps["sparse_tok_s"], name="Top-θ tok/s", mode="lines",
                             line=dict(color=PALETTE[1])), row=2, col=1)
    fig.add_trace(go.Scatter(x=steps["step"], y=steps["kept_v_rows"], name="kept V rows", mode="lines",
                             line=dict(color=PALETTE[2])), row=3, col=1)
    first = steps.index[steps["diverged"]] if "diverged" in steps else []
    if len(first):
        x0 = int(steps.loc[first[0], "step"])
        for r in (1, 2, 3):
            fig.add_vline(x=x0, line_dash="dot", line_color="#d62728", row=r, col=1)
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05], row=3, col=1)
    fig.update_xaxes(title_text="step", row=3, col=1)
    fig.update_layout(title=title, height=520, **_LAYOUT)
    return fig


# ---------------------------------------------------------------------------- accuracy
def delta_chart(summary: pd.DataFrame) -> go.Figure:
    """Top-θ minus dense per task/metric with its interval."""
    title = "Top-θ − dense (with interval)"
    if summary is None or summary.empty:
        return _empty(title, "no results yet")
    d = summary.copy()
    d["label"] = d["task"].astype(str) + " · " + d["metric"].astype(str)
    err_hi = (d["ci_high"] - d["delta"]).abs() if "ci_high" in d else None
    err_lo = (d["delta"] - d["ci_low"]).abs() if "ci_low" in d else None
    fig = go.Figure(go.Bar(x=d["label"], y=d["delta"], marker_color=np.where(d["delta"] >= 0, PALETTE[2], PALETTE[3]),
                           error_y=dict(type="data", array=err_hi, arrayminus=err_lo, visible=err_hi is not None),
                           hovertemplate="%{x}<br>Δ=%{y:.4f}<extra></extra>"))
    fig.add_hline(y=0, line_color="#444")
    fig.update_layout(title=title, yaxis_title="Δ (sparse − dense)", height=340, **_LAYOUT)
    return fig


def tradeoff_chart(results: pd.DataFrame, x: str = "kept_attention", metric: str | None = None) -> go.Figure:
    """Accuracy (Δ vs dense) against the kept fraction, one point per saved result, labelled by variant."""
    title = f"trade-off: Δ accuracy vs {x.replace('_', ' ')}"
    if results is None or results.empty or x not in results:
        return _empty(title, "no saved results yet: run an evaluation")
    d = results.copy()
    if metric is not None and "metric" in d:
        d = d[d["metric"] == metric]
    d = d.dropna(subset=[x, "delta"])
    if d.empty:
        return _empty(title, "no saved results with these columns")
    label_col = "config" if "config" in d else ("label" if "label" in d else None)
    fig = go.Figure()
    for i, (task, g) in enumerate(d.groupby("task", sort=True)):
        labels = g[label_col].astype(str) if label_col else None
        err = None
        if "ci_low" in g and "ci_high" in g:
            err = dict(type="data", array=(g["ci_high"] - g["delta"]).abs(), arrayminus=(g["delta"] - g["ci_low"]).abs())
        fig.add_trace(go.Scatter(x=g[x], y=g["delta"], mode="markers+text", name=str(task), text=labels,
                                 textposition="top center", textfont=dict(size=9), error_y=err,
                                 marker=dict(size=9, color=PALETTE[i % len(PALETTE)]),
                                 hovertemplate="%{text}<br>" + x + "=%{x:.3f}<br>Δ=%{y:.4f}<extra>" + str(task)
                                               + "</extra>"))
    fig.add_hline(y=0, line_color="#444")
    fig.update_layout(title=title, xaxis=dict(title=x.replace("_", " "), tickformat=".0%", range=[0, 1.02]),
                      yaxis_title="Δ (sparse − dense)", height=420, **_LAYOUT)
    return fig


# ---------------------------------------------------------------------------- kernels
def kernel_speed_chart(df: pd.DataFrame, x: str, y: str, color: str | None = None) -> go.Figure:
    """A generic benchmark line chart (e.g. speed-up vs sequence length per variant)."""
    title = f"{y} vs {x}"
    if df.empty or x not in df or y not in df:
        return _empty(title, "no benchmark rows")
    fig = go.Figure()
    groups = df.groupby(color, sort=True) if color and color in df else [("all", df)]
    for i, (name, g) in enumerate(groups):
        g = g.sort_values(x)
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="markers", name=str(name),
                                 marker=dict(size=8, color=PALETTE[i % len(PALETTE)])))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=380, **_LAYOUT)
    return fig
