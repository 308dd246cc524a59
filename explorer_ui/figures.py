"""Pure figure builders: ``DataFrame`` (or arrays) in, ``plotly.graph_objects.Figure`` out.

No Streamlit, no model, no file access: every function here is tested on its own
(``tests/test_app_figures.py``).  Threshold frames are :meth:`Thresholds.to_frame` tables;
metric frames are :meth:`SparsityMetrics.to_frame` tables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .evaluation_view import better_sign

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
# No plotly template: st.plotly_chart applies the Streamlit theme, and templates cost ~50 ms a figure.
_LAYOUT = dict(margin=dict(l=50, r=20, t=50, b=45))


def _figure(data: list[dict], **layout) -> go.Figure:
    """One ``go.Figure`` from trace dicts (building from dicts in one go is several times faster)."""
    return go.Figure(data=data, layout={**_LAYOUT, **layout})


def _empty(title: str, message: str) -> go.Figure:
    return _figure([], title=title, xaxis=dict(visible=False), yaxis=dict(visible=False),
                   annotations=[dict(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")])


def _hline(y: float, color: str = "#444", xref: str = "paper", yref: str = "y") -> dict:
    return dict(type="line", xref=xref, yref=yref, x0=0, x1=1, y0=y, y1=y, line=dict(color=color, width=1))


def _vline(x: float, yref: str = "paper", xref: str = "x", y0: float = 0, y1: float = 1) -> dict:
    return dict(type="line", xref=xref, yref=yref, x0=x, x1=x, y0=y0, y1=y1, line=dict(color="#d62728", dash="dot"))


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
    cols = ["layer", "head", "theta", "extrapolated"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    d = df.sort_values(["layer", "head", "length"])
    key = d["layer"].to_numpy(np.int64) * 100_000 + d["head"].to_numpy(np.int64)
    x, y = d["length"].to_numpy(float), d["theta"].to_numpy(float)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    # per group: the last calibrated bin at or left of `length` (lo) and the next one (hi)
    idx = np.where(x <= length, np.arange(len(x)), -1)
    last_left = np.maximum.reduceat(idx, starts)
    lo = np.where(last_left >= starts, last_left, starts)
    hi = np.where(last_left >= starts, np.minimum(last_left + 1, ends - 1), starts)
    x0, x1, y0, y1 = x[lo], x[hi], y[lo], y[hi]
    w = np.where(x1 > x0, np.clip((length - x0) / np.where(x1 > x0, x1 - x0, 1.0), 0.0, 1.0), 0.0)
    theta = y0 + w * (y1 - y0)
    lo_len = d.groupby(["layer", "head"], sort=True)["length_lo"].min().to_numpy()
    hi_len = d.groupby(["layer", "head"], sort=True)["length_hi"].max().to_numpy()
    return pd.DataFrame({"layer": d["layer"].to_numpy()[starts].astype(int), "head": d["head"].to_numpy()[starts].astype(int),
                         "theta": theta, "extrapolated": (length < lo_len) | (length > hi_len)}, columns=cols)


def theta_vs_length(df: pd.DataFrame, layer: int, heads: list[int], overlay: pd.DataFrame | None = None,
                    names: tuple[str, str] = ("active", "overlay")) -> go.Figure:
    """θ against row length for the chosen heads of one layer; an overlay run is drawn dashed.

    Lines without point markers (hover still reads each bin): a marker per bin was an SVG node each."""
    title = f"θ vs row length · layer {layer}"
    d = df[(df["layer"] == layer) & (df["head"].isin(heads))]
    if d.empty:
        return _empty(title, "no calibrated rows for this layer (rows with L ≤ k stay dense)")
    data = []
    o = None if overlay is None else overlay[(overlay["layer"] == layer) & (overlay["head"].isin(heads))]
    two = o is not None and not o.empty  # one run: the legend names heads only (run names are long)
    for frame, name, dash in ((d, names[0], "solid"), (o, names[1], "dash")):
        if frame is None or frame.empty:
            continue
        for head, g in frame.groupby("head", sort=True):
            g = g.sort_values("length")
            label = f"{name} · head {head}" if two else f"head {head}"
            data.append(dict(
                type="scatter", x=g["length"].to_numpy(), y=g["theta"].to_numpy(), mode="lines",
                name=label, line=dict(color=PALETTE[int(head) % len(PALETTE)], dash=dash),
                customdata=np.stack([g["count"].to_numpy(), g["t_std"].to_numpy()], axis=-1),
                hovertemplate="L≈%{x:.0f}<br>θ=%{y:.3f}<br>n=%{customdata[0]}<br>std=%{customdata[1]:.3f}<extra>"
                              + f"{name} · head {head}</extra>"))
    # the legend below the plot: beside it, long names squeezed the curves into a third of the width
    return _figure(data, title=title, xaxis=dict(title="row length L (bin centre)"), yaxis=dict(title="θ"),
                   legend=dict(title="run · head" if two else "head", orientation="h", yanchor="top", y=-0.25),
                   showlegend=True)


def layer_tick_step(n_layers: int) -> int | None:
    """Whole-layer tick spacing for a layer axis: every layer up to 12, then every 2nd or 5th (a label
    per layer cost ~80 ms of Plotly layout on a 30-layer grid); Plotly's own choice beyond 64 layers."""
    return 1 if n_layers <= 12 else 2 if n_layers <= 24 else 5 if n_layers <= 64 else None


def theta_grid(cells: pd.DataFrame, length: float) -> go.Figure:
    """Layer × head grid of θ at one row length, as square scatter markers (clickable in Streamlit).

    ``cells``: :func:`theta_at_length` output.  Each marker's ``customdata`` is ``[layer, head]``.
    The figure does not depend on the chosen layer or head, so changing them does not redraw it
    (a redraw cost the browser about as much as the θ curve itself).  Hover names every cell.
    """
    title = f"θ at L = {length:g} (click a cell to open that head)"
    if cells.empty:
        return _empty(title, "no calibrated heads")
    n_layers = int(cells["layer"].max()) + 1
    n_heads = int(cells["head"].max()) + 1
    size = max(8, min(28, int(520 / max(n_layers, n_heads * 2))))
    data = [dict(
        type="scatter", x=cells["head"].to_numpy(), y=cells["layer"].to_numpy(), mode="markers", name="θ",
        marker=dict(symbol="square", size=size, color=cells["theta"].to_numpy(), colorscale="Viridis", showscale=True,
                    colorbar=dict(title=dict(text="θ")),
                    line=dict(width=[1 if e else 0 for e in cells["extrapolated"]], color="#888")),
        customdata=cells[["layer", "head"]].to_numpy(),
        hovertemplate="layer %{y}, head %{x}<br>θ=%{marker.color:.3f}<extra></extra>")]
    return _figure(data, title=title, xaxis=dict(title="query head", dtick=1, range=[-0.7, n_heads - 0.3]),
                   yaxis=dict(title="layer", autorange="reversed", dtick=layer_tick_step(n_layers)),
                   height=max(320, min(900, 60 + n_layers * (size + 4))), showlegend=False, clickmode="event+select")


def theta_histogram(df: pd.DataFrame, layer: int | None = None, overlay: pd.DataFrame | None = None,
                    names: tuple[str, str] = ("active", "overlay")) -> go.Figure:
    """Distribution of θ over (head, length bin) of one layer (all layers when ``None``), two runs overlaid."""
    title = "θ distribution · " + ("all layers" if layer is None else f"layer {layer}")
    data = []
    for frame, name, color in ((df, names[0], PALETTE[0]), (overlay, names[1], PALETTE[1])):
        if frame is None or frame.empty:
            continue
        d = frame if layer is None else frame[frame["layer"] == layer]
        if d.empty:
            continue
        data.append(dict(type="histogram", x=d["theta"].to_numpy(), name=name, opacity=0.6, marker=dict(color=color),
                         nbinsx=40))
    if not data:
        return _empty(title, "no calibrated rows")
    return _figure(data, title=title, barmode="overlay", xaxis=dict(title="θ"),
                   yaxis=dict(title="(head, length bin) cells"))


def k_schedule_bar(table: pd.DataFrame) -> go.Figure:
    """Target k per layer (the Calibrate page's k table)."""
    return _figure([dict(type="bar", x=table["layer"].to_numpy(), y=table["k"].to_numpy(),
                         marker=dict(color=PALETTE[0]), hovertemplate="layer %{x}: k=%{y}<extra></extra>")],
                   title="k per layer", xaxis=dict(title="layer"), yaxis=dict(title="k"), height=220)


# ---------------------------------------------------------------------------- sparsity
_VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
            "#fde725"]
DROPPED_GREY = "#d9d9d9"
IMAGE_CELLS = 96  # maps larger than this many cells a side are drawn as images (attention_map_images), not heatmaps


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def colour_map(values: np.ndarray, lo: float, hi: float, stops: list[str] = _VIRIDIS) -> np.ndarray:
    """(n, m) values → (n, m, 3) uint8 colours, piecewise linear over ``stops`` on [lo, hi] (clipped)."""
    t = np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo), 0.0, 1.0) * (len(stops) - 1)
    i = np.minimum(t.astype(np.int64), len(stops) - 2)
    f = (t - i)[..., None]
    pal = np.array([_rgb(c) for c in stops], dtype=np.float64)
    return np.rint(pal[i] * (1 - f) + pal[i + 1] * f).astype(np.uint8)


MAP_FLOOR = -6.0  # log10 of the smallest weight the maps colour; below it is the bottom colour


def attention_map_images(dense: np.ndarray, sparse: np.ndarray, kept: np.ndarray, visible: np.ndarray, *,
                         head: int) -> tuple[np.ndarray, np.ndarray, float]:
    """One head's maps as (n, n, 3) uint8 RGB images: (Top-θ, dense, kept share of visible cells).

    Colour is Viridis over log10 of the weight on [:data:`MAP_FLOOR`, 0]; on the Top-θ image,
    visible cells with nothing kept are grey (:data:`DROPPED_GREY`); future (masked) cells are
    white on both.  The pages show these with ``st.image`` when a map is too large for a heatmap.
    """
    d, s, k = dense[head], sparse[head], kept[head]
    vis = visible > 0
    log_dense = np.where(vis, np.log10(np.maximum(d, 10 ** MAP_FLOOR)), np.nan)
    log_sparse = np.where(vis & (k > 0), np.log10(np.maximum(s, 10 ** MAP_FLOOR)), np.nan)
    white = np.array(_rgb("#ffffff"), dtype=np.uint8)
    img_d = np.where(vis[..., None], colour_map(log_dense, MAP_FLOOR, 0.0), white)
    img_s = np.where((vis & (k > 0))[..., None], colour_map(log_sparse, MAP_FLOOR, 0.0),
                     np.where(vis[..., None], np.array(_rgb(DROPPED_GREY), dtype=np.uint8), white))
    share = float(k[vis].mean()) if vis.any() else 0.0
    return img_s.astype(np.uint8), img_d.astype(np.uint8), share


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement (cells stay crisp when the browser scales the image)."""
    return img if factor <= 1 else img.repeat(factor, axis=0).repeat(factor, axis=1)


def colour_legend(width: int = 256, height: int = 14) -> np.ndarray:
    """The maps' colour scale as a (height, width, 3) image: log10 weight MAP_FLOOR (left) … 0 (right)."""
    row = colour_map(np.linspace(MAP_FLOOR, 0.0, width)[None, :], MAP_FLOOR, 0.0)
    return np.repeat(row, height, axis=0)


def attention_maps(dense: np.ndarray, sparse: np.ndarray, kept: np.ndarray, visible: np.ndarray, *, head: int,
                   pool: int = 1, title: str = "", tokens: list[str] | None = None) -> go.Figure:
    """Side by side for one head, as heatmaps: the Top-θ map (weights applied to V, dropped cells grey)
    and the dense softmax, with per-cell hover.

    ``dense``/``sparse``/``kept``: (H, n, n) arrays (pooled: ``pool`` tokens per cell);
    ``visible`` (n, n).  Colour is log10 of the weight; cells with nothing kept are grey on
    the left, future (masked) cells are blank on both sides.  ``tokens`` (one string per cell) label
    the axes and the hover, as llm-transparency-tool does.  For maps of more than
    :data:`IMAGE_CELLS` cells a side the page draws :func:`attention_map_images` instead: a
    browser draws two images far faster than two large heatmaps.
    """
    d, s, k = dense[head], sparse[head], kept[head]
    vis = visible > 0
    floor = MAP_FLOOR
    grey = floor - 1.0  # one value below the colour range: dropped cells
    log_dense = np.where(vis, np.log10(np.maximum(d, 10 ** floor)), np.nan).astype(np.float32)
    log_sparse = np.where(vis & (k > 0), np.log10(np.maximum(s, 10 ** floor)), np.where(vis, grey, np.nan))
    log_sparse = log_sparse.astype(np.float32)
    unit = "token" if pool == 1 else f"{pool}-token block"
    kept_share = float(k[vis].mean()) if vis.any() else 0.0
    # Viridis over [floor, 0]; the bottom 1/7 of [grey, 0] is flat grey for dropped cells
    cut = 1.0 / 7.0
    scale = [[0.0, DROPPED_GREY], [cut - 1e-6, DROPPED_GREY]] + [
        [cut + (1 - cut) * i / (len(_VIRIDIS) - 1), c] for i, c in enumerate(_VIRIDIS)]
    # Pooled cells carry their kept share for the hover; single tokens are kept or dropped (grey), which the
    # colour already says, so they send no customdata (a third of the payload at 256 × 256).
    sparse_map = dict(type="heatmap", z=log_sparse, zmin=grey, zmax=0, colorscale=scale, showscale=False,
                      xaxis="x", yaxis="y", name="Top-θ",
                      hovertemplate=f"query %{{y}}, key %{{x}}<br>log10 w=%{{z:.2f}} ({grey:.0f}: dropped)"
                                    "<extra>Top-θ</extra>")
    if pool > 1:
        sparse_map.update(customdata=k.astype(np.float32),
                          hovertemplate="query %{y}, key %{x}<br>log10 w=%{z:.2f}"
                                        "<br>kept %{customdata:.0%}<extra>Top-θ</extra>")
    dense_map = dict(type="heatmap", z=log_dense, zmin=floor, zmax=0, colorscale="Viridis", xaxis="x2", yaxis="y2",
                     colorbar=dict(title=dict(text="log10 p"), x=1.02), name="dense",
                     hovertemplate="query %{y}, key %{x}<br>log10 p=%{z:.2f}<extra>dense</extra>")
    axis_ticks = {}
    if tokens is not None:
        n = len(tokens)
        label = [repr(t)[1:-1] for t in tokens]
        pair = np.array([[f"{label[i]} → {label[j]}" for j in range(n)] for i in range(n)], dtype=object)
        for trace in (sparse_map, dense_map):
            trace["text"] = pair
            trace["hovertemplate"] = trace["hovertemplate"].replace("<br>", "<br>%{text}<br>", 1)
        step = max(1, n // 32)
        axis_ticks = dict(tickmode="array", tickvals=list(range(0, n, step)), ticktext=label[::step],
                          tickfont=dict(size=8))
    data = [sparse_map, dense_map]
    ann = [dict(text=f"Top-θ: kept weights (grey = dropped), {kept_share:.1%} kept", x=0.23, y=1.0, xref="paper",
                yref="paper", showarrow=False, yanchor="bottom"),
           dict(text="dense softmax probabilities", x=0.77, y=1.0, xref="paper", yref="paper", showarrow=False,
                yanchor="bottom")]
    return _figure(data, title=title or f"head {head}", height=480, annotations=ann,
                   xaxis=dict(domain=[0.0, 0.46], title=f"key ({unit})", **axis_ticks),
                   xaxis2=dict(domain=[0.54, 1.0], title=f"key ({unit})", **axis_ticks),
                   yaxis=dict(autorange="reversed", title=f"query ({unit})", **axis_ticks),
                   yaxis2=dict(autorange="reversed", anchor="x2", matches="y", showticklabels=False))


def row_attention(dense: np.ndarray, sparse: np.ndarray, kept: np.ndarray, *, head: int, row: int,
                  tokens: list[str]) -> go.Figure:
    """One query's weights over the keys it sees, labelled by token: the dense softmax (outline) and what
    Top-θ applies to V (filled; dropped keys drawn grey at their dense weight)."""
    label = [repr(t)[1:-1] for t in tokens]
    title = f"query {row} {label[row]!r} · head {head}: weight per key (dense outline, Top-θ filled, grey dropped)"
    keys = np.arange(row + 1)
    d, s_, k = dense[head, row, : row + 1], sparse[head, row, : row + 1], kept[head, row, : row + 1]
    colours = [PALETTE[0] if x > 0 else DROPPED_GREY for x in k]
    return _figure([dict(type="bar", x=keys, y=np.where(k > 0, s_, d), marker=dict(color=colours), name="Top-θ",
                         customdata=[label[j] for j in keys],
                         hovertemplate="key %{x} %{customdata}<br>weight %{y:.4f}<extra>Top-θ</extra>"),
                    dict(type="scatter", x=keys, y=d, mode="markers", name="dense", marker=dict(
                        symbol="line-ew", size=12, line=dict(width=2, color="#222")),
                         hovertemplate="key %{x}<br>dense p %{y:.4f}<extra>dense</extra>")],
                   title=title, height=320, bargap=0.1,
                   xaxis=dict(title="key", tickmode="array", tickvals=list(keys[:: max(1, len(keys) // 40)]),
                              ticktext=label[: row + 1][:: max(1, len(keys) // 40)], tickfont=dict(size=8)),
                   yaxis=dict(title="weight", type="log"), legend=dict(orientation="h"))


def layer_head_heatmap(metrics: pd.DataFrame, value: str = "kept_frac", phase: str = "prefill",
                       title: str | None = None) -> go.Figure:
    """Layer × query-head heatmap of a metrics column (default: kept attention fraction)."""
    title = title or f"kept attention fraction · {phase}"
    d = metrics[metrics["phase"] == phase]
    if d.empty:
        return _empty(title, f"no {phase} calls recorded")
    z = d.pivot_table(index="layer", columns="head", values=value, aggfunc="mean")
    zmax = 1 if value == "kept_frac" else max(1e-9, float(np.nanmax(z.to_numpy())))
    return _figure([dict(type="heatmap", z=z.to_numpy(), x=z.columns.to_numpy(), y=z.index.to_numpy(),
                         colorscale="Blues", zmin=0, zmax=zmax, colorbar=dict(title=dict(text=value)),
                         hovertemplate="layer %{y}, head %{x}<br>%{z:.3f}<extra></extra>")],
                   title=title, xaxis=dict(title="query head", dtick=1),
                   yaxis=dict(title="layer", autorange="reversed"), height=max(300, 40 + 16 * len(z.index)))


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
    return _figure([dict(type="heatmap", z=z.to_numpy(), x=z.columns.to_numpy(), y=z.index.to_numpy(),
                         colorscale="Oranges", zmin=0, zmax=1, colorbar=dict(title=dict(text="kept V")),
                         hovertemplate="layer %{y}, KV head %{x}<br>%{z:.1%} of V rows read<extra></extra>")],
                   title=title, xaxis=dict(title="KV head", dtick=1), yaxis=dict(title="layer", autorange="reversed"),
                   height=max(300, 40 + 16 * len(z.index)))


def popularity_bar(popularity: pd.DataFrame, layer: int, tokens: list[str] | None = None) -> go.Figure:
    """V-row popularity of one layer: how many (query head, row) pairs keep each V row."""
    title = f"V-row popularity · layer {layer}"
    d = popularity[popularity["layer"] == layer]
    if d.empty:
        return _empty(title, "no prefill recorded for this layer")
    text = None
    if tokens is not None and len(tokens) >= len(d):
        text = [tokens[int(p)] for p in d["position"]]
    return _figure([dict(type="bar", x=d["position"].to_numpy(), y=d["count"].to_numpy(),
                         marker=dict(color=PALETTE[2]), hovertext=text,
                         hovertemplate="position %{x}<br>kept by %{y} (head,row) pairs<br>%{hovertext}<extra></extra>")],
                   title=title, xaxis=dict(title="key position"), yaxis=dict(title="kept by (head, row) pairs"),
                   height=300, bargap=0)


def decode_strip(decode: pd.DataFrame, generated: list[str] | None = None) -> go.Figure:
    """Layer × decode-step strip of the kept V-row fraction (pooled over KV heads)."""
    title = "decode steps · kept V rows"
    if decode.empty:
        return _empty(title, "no decode steps recorded (set decode steps > 0)")
    z = decode.pivot_table(index="layer", columns="step", values="kept_v_frac")
    labels = [f"{s}: {generated[s]!r}" if generated and s < len(generated) else str(s) for s in z.columns]
    return _figure([dict(type="heatmap", z=z.to_numpy(), x=labels, y=z.index.to_numpy(), colorscale="Oranges",
                         zmin=0, zmax=1, colorbar=dict(title=dict(text="kept V")),
                         hovertemplate="layer %{y}, step %{x}<br>%{z:.1%} of V rows read<extra></extra>")],
                   title=title, xaxis=dict(title="decode step (token produced)"),
                   yaxis=dict(title="layer", autorange="reversed"), height=max(260, 40 + 12 * len(z.index)))


# ---------------------------------------------------------------------------- compare
def compare_steps_chart(steps: pd.DataFrame) -> go.Figure:
    """Per decode step: KL(dense‖sparse), tokens/s of both streams, kept V rows."""
    title = "per-step agreement and cost"
    if steps.empty:
        return _empty(title, "no steps yet")
    x = steps["step"].to_numpy()
    data = [
        dict(type="bar", x=x, y=steps["kl"].to_numpy(float), name="KL", marker=dict(color=PALETTE[3]),
             xaxis="x", yaxis="y"),
        dict(type="scatter", x=x, y=steps["dense_tok_s"].to_numpy(float), name="dense tok/s", mode="lines",
             line=dict(color=PALETTE[0]), xaxis="x", yaxis="y2"),
        dict(type="scatter", x=x, y=steps["sparse_tok_s"].to_numpy(float), name="Top-θ tok/s", mode="lines",
             line=dict(color=PALETTE[1]), xaxis="x", yaxis="y2"),
        dict(type="scatter", x=x, y=steps["kept_v_rows"].to_numpy(float), name="kept V rows", mode="lines",
             line=dict(color=PALETTE[2]), xaxis="x", yaxis="y3"),
    ]
    doms = {"y": [0.70, 1.0], "y2": [0.36, 0.64], "y3": [0.0, 0.30]}
    ann = [dict(text=t, x=0.5, y=doms[a][1], xref="paper", yref="paper", showarrow=False, yanchor="bottom")
           for a, t in (("y", "next-token KL(dense‖Top-θ)"), ("y2", "tokens/s"), ("y3", "kept V rows"))]
    shapes = []
    first = steps.index[steps["diverged"]] if "diverged" in steps else []
    if len(first):
        shapes.append(_vline(float(steps.loc[first[0], "step"])))
    return _figure(data, title=title, height=520, annotations=ann, shapes=shapes,
                   xaxis=dict(title="step", anchor="y3"),
                   yaxis=dict(domain=doms["y"]), yaxis2=dict(domain=doms["y2"]),
                   yaxis3=dict(domain=doms["y3"], tickformat=".0%", range=[0, 1.05]))


# ---------------------------------------------------------------------------- accuracy
WORSE, BETTER, NEUTRAL = PALETTE[3], PALETTE[2], "#9e9e9e"


def variant_delta_chart(table: pd.DataFrame) -> go.Figure:
    """Top-θ − dense per variant, one panel (and y axis) per metric, with the 95% paired interval.

    ``table``: :func:`explorer_ui.evaluation_view.result_table`.  A bar is red when the change is a
    loss for its metric (lower accuracy, higher perplexity), green when it is a gain.
    """
    title = "Δ = Top-θ − dense per variant (bars: 95% paired bootstrap interval; red: worse)"
    if table is None or table.empty:
        return _empty(title, "no results yet")
    from plotly.subplots import make_subplots

    metrics = list(dict.fromkeys(table["metric"]))
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[f"Δ {m}" for m in metrics],
                        horizontal_spacing=min(0.08, 0.5 / max(1, len(metrics))))
    for i, metric in enumerate(metrics, start=1):
        d = table[table["metric"] == metric]
        delta = d["Δ"].to_numpy(float)
        colour = [NEUTRAL if not np.isfinite(x) or x == 0 else (WORSE if w else BETTER)
                  for x, w in zip(delta, d["worse"])]
        err = dict(type="data", array=np.abs(d["ci_high"].to_numpy(float) - delta),
                   arrayminus=np.abs(delta - d["ci_low"].to_numpy(float)), visible=True)
        fig.add_trace(go.Bar(x=d["variant"].astype(str), y=delta, marker_color=colour, error_y=err, name=metric,
                             showlegend=False, customdata=np.stack([d["dense"], d["Top-θ"], d["n"]], -1),
                             hovertemplate="%{x}<br>Δ=%{y:.4f}<br>dense %{customdata[0]:.4f} → Top-θ "
                                           "%{customdata[1]:.4f}<br>n=%{customdata[2]}<extra>" + metric + "</extra>"),
                      row=1, col=i)
        fig.add_hline(y=0, line_color="#444", line_width=1, row=1, col=i)
    fig.update_layout(title=title, height=360, **_LAYOUT)
    return fig


def tradeoff_chart(results: pd.DataFrame, x: str = "kept_attention", metric: str | None = None) -> go.Figure:
    """Δ of one metric (Top-θ − dense) against the kept fraction, one point per saved result, labelled by
    variant; points that are a loss for the metric are red."""
    title = f"trade-off: Δ {metric or 'metric'} (Top-θ − dense) vs {x.replace('_', ' ')}"
    if results is None or results.empty or x not in results:
        return _empty(title, "no saved results yet: run an evaluation")
    d = results
    if metric is not None and "metric" in d:
        d = d[d["metric"] == metric]
    d = d.dropna(subset=[x, "delta"])
    if d.empty:
        return _empty(title, "no saved results with these columns")
    label_col = "config" if "config" in d else ("label" if "label" in d else None)
    data = []
    for i, (task, g) in enumerate(d.groupby("task", sort=True)):
        delta = g["delta"].to_numpy(float)
        err = None
        if "ci_low" in g and "ci_high" in g:
            err = dict(type="data", array=np.abs(g["ci_high"].to_numpy(float) - delta),
                       arrayminus=np.abs(delta - g["ci_low"].to_numpy(float)))
        worse = [better_sign(str(m)) * v < 0 for m, v in zip(g["metric"], delta)]
        data.append(dict(type="scatter", x=g[x].to_numpy(float), y=delta, mode="markers+text", name=str(task),
                         text=g[label_col].astype(str).to_numpy() if label_col else None, textposition="top center",
                         textfont=dict(size=9), error_y=err,
                         marker=dict(size=10, color=[WORSE if w else BETTER for w in worse],
                                     symbol=SYMBOLS[i % len(SYMBOLS)], line=dict(width=1, color="#333")),
                         hovertemplate="%{text}<br>" + x + "=%{x:.3f}<br>Δ=%{y:.4f}<extra>" + str(task) + "</extra>"))
    return _figure(data, title=title, xaxis=dict(title=x.replace("_", " "), tickformat=".0%", range=[0, 1.02]),
                   yaxis=dict(title=f"Δ {metric or ''} (Top-θ − dense)"), height=420, shapes=[_hline(0)])


SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "x"]


# ---------------------------------------------------------------------------- kernels
def kernel_speed_chart(df: pd.DataFrame, x: str, y: str, color: str | None = None) -> go.Figure:
    """A benchmark scatter (e.g. speed-up vs kept fraction per kernel)."""
    title = f"{y} vs {x}"
    if df.empty or x not in df or y not in df:
        return _empty(title, "no benchmark rows")
    groups = df.groupby(color, sort=True) if color and color in df else [("all", df)]
    data = []
    for i, (name, g) in enumerate(groups):
        g = g.sort_values(x)
        data.append(dict(type="scatter", x=g[x].to_numpy(), y=g[y].to_numpy(), mode="markers", name=str(name),
                         marker=dict(size=8, color=PALETTE[i % len(PALETTE)])))
    return _figure(data, title=title, xaxis=dict(title=x), yaxis=dict(title=y), height=380)
