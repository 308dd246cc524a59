"""Thresholds: θ vs length per head, a clickable layer × head grid, histograms, two runs overlaid."""

from functools import partial
from pathlib import Path

import streamlit as st

from explorer_ui import analysis, figures, nav, runs, services, state
from explorer_ui import session_keys as K
from explorer_ui.sidebar import NO_RUN, require_model
from topθ_core.thresholds import ThresholdsError

ctx = require_model()
st.title("Thresholds")

all_runs = ctx.runs
if all_runs.empty:
    st.info("No saved calibration runs yet. Run one on the **Calibrate** page.")
    nav.link("calibrate", "Go to Calibrate", ":material/tune:")
    st.stop()

names = list(all_runs["name"])
default_run = ctx.run_name if ctx.run_name in names else names[0]
if st.session_state.get(K.TH_RUN) not in names:
    st.session_state[K.TH_RUN] = default_run
c1, c2, c3 = st.columns([2, 2, 1])
run_name = c1.selectbox("Run", names, key=K.TH_RUN, help="defaults to the active threshold set")
overlay_name = c2.selectbox("Overlay a second run (distribution shift)", [NO_RUN] + [n for n in names if n != run_name],
                            key=K.TH_OVERLAY, format_func=lambda n: "(none)" if n == NO_RUN else n)
row = all_runs[all_runs["name"] == run_name].iloc[0]
meta = runs.read_meta(Path(row["path"])) or {}
sigma = c3.number_input("σ", value=float(meta.get("sigma", 0.1)), step=0.05, key=K.TH_SIGMA,
                        help="θ = mean + σ·std (median + σ·1.4826·MAD or trimmed mean + σ·std for robust runs), "
                             "recomputed from the saved statistics (no recalibration)")

df = figures.with_sigma(services.threshold_frame(row["path"], services.artifact_mtime(row["path"])), sigma)
overlay = None
if overlay_name != NO_RUN:
    orow = all_runs[all_runs["name"] == overlay_name].iloc[0]
    overlay = figures.with_sigma(services.threshold_frame(orow["path"], services.artifact_mtime(orow["path"])), sigma)
    if orow["digest"] != row["digest"]:
        st.warning(f"{overlay_name} was calibrated for another model ({orow['model']}); heads may not correspond.")

if meta.get("theta_reference", "absolute") == "row-max":
    st.caption("This run's θ is relative to each row's maximum score (kept: score − row max > θ), so its values "
               "are ≤ 0.")


def _save_sigma(path: str, source: str, for_loaded_model: bool) -> None:
    """Button callback (runs before the next rerun, so the sidebar lists the new set at once)."""
    sigma = float(st.session_state[K.TH_SIGMA])
    name = (st.session_state.get(K.TH_SAVE_NAME) or "").strip() or runs.sigma_run_name(source, sigma)
    try:
        saved = runs.save_sigma_run(services.get_thresholds(path, services.artifact_mtime(path)), sigma, name, source)
    except (runs.RunsError, ThresholdsError, OSError) as e:
        st.session_state[K.TH_SAVED] = ("error", f"Not saved: {e}")
        return
    st.session_state[K.TH_SAVE_NAME] = ""
    st.session_state[K.TH_RUN] = saved.name
    if for_loaded_model:
        st.session_state[K.PENDING_ACTIVE_RUN] = saved.name
    st.session_state[K.TH_SAVED] = ("ok", f"Saved **{saved.name}**: {source}'s statistics at σ = {sigma:g}, no "
                                          "recalibration" + (", now the active threshold set." if for_loaded_model
                                                             else "."))


own_sigma = float(meta.get("sigma", 0.1))
n1, n2 = st.columns([4, 1], vertical_alignment="bottom")
n1.text_input("Name of a new threshold set with this σ", key=K.TH_SAVE_NAME,
              placeholder=runs.sigma_run_name(run_name, sigma))
n2.button(f"Save σ = {sigma:g} as a new set", key=K.TH_SAVE, on_click=_save_sigma,
          args=(row["path"], run_name, ctx.lm is not None and row["digest"] == ctx.lm.fingerprint.digest),
          disabled=sigma == own_sigma, width="stretch", icon=":material/save:",
          help=f"θ re-aggregated from {run_name}'s stored statistics with this σ (no recalibration), saved as a "
               f"new set; {run_name} keeps σ = {own_sigma:g}" if sigma != own_sigma else
               f"σ is {run_name}'s own ({own_sigma:g}): change σ first")
saved_note = st.session_state.pop(K.TH_SAVED, None)
if saved_note:
    (st.success if saved_note[0] == "ok" else st.error)(saved_note[1])

with st.expander(f"Provenance of {run_name}", expanded=False):
    st.markdown("\n".join(f"- {line}" for line in runs.provenance_lines(meta)))
    st.download_button("Download thresholds (.zip)", data=partial(runs.zip_run, row["path"]),
                       file_name=f"{run_name}.zip", mime="application/zip", key="th_download",
                       icon=":material/download:", on_click="ignore")

if df.empty:
    st.warning("This run has no calibrated cells (were all documents shorter than k?).")
    st.stop()

n_layers = int(meta.get("model", {}).get("n_layers", df["layer"].max() + 1))
n_heads = int(meta.get("model", {}).get("n_heads", df["head"].max() + 1))
layers_with_theta = sorted(int(x) for x in df["layer"].unique())

heads_all = list(range(n_heads))
lo, hi = int(df["length_lo"].min()), int(df["length_hi"].max())
missing = sorted(set(range(n_layers)) - set(layers_with_theta))


@state.fragment
def _explore(df, overlay, names, layers_with_theta, heads_all, lo, hi, missing) -> None:
    """Grid, layer/head pickers, curve and histograms: a change here reruns only this part of the page."""
    # A click in the grid (previous rerun) opens that head: apply it before the widgets are drawn.
    click = analysis.grid_click(st.session_state.get(K.TH_GRID))
    if click is not None and click != st.session_state.get(K.TH_GRID_SEEN):
        st.session_state[K.TH_GRID_SEEN] = click
        if click[0] in layers_with_theta:
            st.session_state[K.TH_LAYER] = click[0]
            st.session_state[K.TH_HEADS] = [click[1]]

    if st.session_state.get(K.TH_LAYER) not in layers_with_theta:
        st.session_state[K.TH_LAYER] = layers_with_theta[min(len(layers_with_theta) - 1, 2)]
    if not st.session_state.get(K.TH_HEADS) or any(h not in heads_all for h in st.session_state[K.TH_HEADS]):
        st.session_state[K.TH_HEADS] = heads_all[: min(4, len(heads_all))]
    if st.session_state.get(K.TH_LENGTH) is None or not lo <= st.session_state[K.TH_LENGTH] <= hi:
        st.session_state[K.TH_LENGTH] = int(df["length"].median())

    left, right = st.columns([3, 2])
    with right:
        length = st.slider("Row length L for the grid", min_value=lo, max_value=hi, key=K.TH_LENGTH)
        cells = figures.theta_at_length(df, float(length))
        st.plotly_chart(figures.theta_grid(cells, float(length)), key=K.TH_GRID,
                        on_select="rerun", selection_mode="points", width="stretch")
    with left:
        s1, s2 = st.columns([1, 3])
        layer = s1.selectbox("Layer", layers_with_theta, key=K.TH_LAYER)
        heads = s2.multiselect("Heads", heads_all, key=K.TH_HEADS)
        st.plotly_chart(figures.theta_vs_length(df, layer, heads, overlay, names=names), width="stretch",
                        key="th_curve")
        hist = st.expander("θ distributions (this layer, all layers)", expanded=False, key=K.TH_HIST_OPEN,
                           on_change="rerun")
        if hist.open:  # drawn only when opened: two more charts made every page switch and layer change slower
            h1, h2 = hist.columns(2)
            h1.plotly_chart(figures.theta_histogram(df, layer, overlay, names=names), width="stretch",
                            key="th_hist_layer")
            h2.plotly_chart(figures.theta_histogram(df, None, overlay, names=names), width="stretch",
                            key="th_hist_all")

    if missing:
        st.caption(f"Layers without θ (every row had L ≤ k, so they stay dense): {missing}")
    table = st.expander("Table", expanded=False, key=K.TH_TABLE_OPEN, on_change="rerun")
    if table.open:  # drawn only when opened: a data grid costs the browser even when collapsed
        with table:
            st.dataframe(df[df["layer"] == layer], hide_index=True, width="stretch")


_explore(df, overlay, (run_name, overlay_name), layers_with_theta, heads_all, lo, hi, missing)
