"""Sparsity: one prompt → attention maps of a chosen head, kept fractions, kept V rows, popularity, decode strip."""

import json

import streamlit as st

from explorer_ui import analysis, figures, state
from explorer_ui import session_keys as K
from explorer_ui.controls import sample_prompt_picker, sparse_config_controls
from explorer_ui.sidebar import require_model
from topθ_core.metrics import summarize
from topθ_core.thresholds import ThresholdsError

ctx = require_model()
lm = ctx.lm
st.title("Sparsity")
st.caption("What Top-θ keeps for one prompt: one prefill (all layers, all heads) and a few greedy decode steps.")

c1, c2 = st.columns([3, 1])
samples = sample_prompt_picker(c2, prompt_key=K.SP_PROMPT, sample_key=K.SP_SAMPLE,
                              applied_key=K.SP_SAMPLE_APPLIED)
if K.SP_PROMPT not in st.session_state:
    st.session_state[K.SP_PROMPT] = next(iter(samples.values()), "The quick brown fox jumps over the lazy dog. " * 20)
prompt = c1.text_area("Prompt", key=K.SP_PROMPT, height=130)
cap = analysis.MAP_CAP
max_tokens = c2.number_input("Max prompt tokens", min_value=8, max_value=4096, value=256, step=64,
                             key=K.SP_MAX_TOKENS, help=f"maps are drawn at most {cap}×{cap} cells; longer "
                                                       "prompts are pooled into blocks")
decode_steps = c2.number_input("Decode steps", min_value=0, max_value=64, value=8, key=K.SP_DECODE)

with st.expander("Sparse settings", expanded=ctx.thresholds is None):
    config, err = sparse_config_controls("sp", ctx.thresholds)
if ctx.thresholds is None:
    st.caption("No threshold set is active for this model, so Top-θ is unavailable: showing top-k. "
               "Calibrate on the Calibrate page to see Top-θ.")
if not prompt.strip():
    st.info("Enter a prompt.")
    st.stop()

# The last snapshot of this session, by its inputs: reruns that change none of them (a layer or head,
# opening the table, coming back to the page) draw it again without a model call.
memo = st.session_state.get(K.SP_SNAPSHOT)
cont = None  # set when decode steps are still to run (after the prefill is drawn)
if err:  # refused: the view (layer, head, last maps) stays where it was, marked as not matching
    st.error(f"{err} The maps below are the last valid run's.")
    if memo is None:
        st.stop()
    snap = memo[1]
else:
    snap_key = (ctx.model_key, ctx.run_key, prompt, json.dumps(config.to_dict(), sort_keys=True), int(max_tokens),
                int(decode_steps))
    if memo is not None and memo[0] == snap_key:
        snap = memo[1]
    else:
        busy = st.empty()
        busy.caption("Running the model…")  # static text: an animated spinner made the browser repaint throughout
        try:
            snap, cont = analysis.sparsity_prefill(lm, prompt, config, ctx.thresholds, max_tokens=int(max_tokens),
                                                   keep_cache=decode_steps > 0)
        except (ValueError, ThresholdsError) as e:
            busy.empty()
            st.error(f"Cannot run this prompt: {e}")
            st.stop()
        busy.empty()

pre = summarize(snap.metrics, "prefill")
m = st.columns(5)
m[0].metric("prompt tokens", snap.n_tokens)
m[1].metric("kept attention (prefill)", f"{pre['kept_attention']:.1%}", help="kept / visible elements, all layers")
m[2].metric("kept V rows (prefill)", f"{pre['kept_v_rows']:.1%}")
decode_metric = m[3].empty()
m[4].metric("size factor vs top-k", f"{pre['size_factor']:.2f}", help="kept / what top-k would keep; 1 is on target")
st.caption(f"{snap.config_label} · prefill {snap.seconds:.2f} s · empty rows {pre['empty_rows']} · extrapolated rows "
           f"{pre['extrapolated_rows']}")


@state.fragment
def _maps(snap) -> None:
    """Layer and head pickers, the maps, one query's weights and V-row popularity: every layer's maps are in
    the snapshot, so a change here only redraws (no model call)."""
    n_layers, n_heads = snap.dense.shape[:2]
    if st.session_state.get(K.SP_LAYER) not in range(n_layers):
        st.session_state[K.SP_LAYER] = min(2, n_layers - 1)
    if st.session_state.get(K.SP_HEAD, 0) not in range(n_heads):
        st.session_state[K.SP_HEAD] = 0
    h1, h2, _ = st.columns([1, 1, 2])
    layer = h1.selectbox("Layer", list(range(n_layers)), key=K.SP_LAYER)
    head = h2.selectbox("Head", list(range(n_heads)), key=K.SP_HEAD)
    dense, sparse, kept = snap.layer_maps(int(layer))
    cells = snap.cell_tokens()
    title = f"layer {layer} · head {head}" + (f" · {snap.pool} tokens per cell" if snap.pool > 1 else "")
    n = dense.shape[-1]
    if n <= figures.IMAGE_CELLS:  # small maps: heatmaps with per-cell hover and token labels
        st.plotly_chart(figures.attention_maps(dense, sparse, kept, snap.visible, head=int(head), pool=snap.pool,
                                               title=title, tokens=cells), width="stretch", key="sp_maps")
    else:  # large maps: two images (a browser draws them far faster than a chart)
        img_s, img_d, share = figures.attention_map_images(dense, sparse, kept, snap.visible, head=int(head))
        unit = "token" if snap.pool == 1 else f"{snap.pool}-token block"
        st.markdown(f"**{title}**")
        a, b = st.columns(2)
        up = max(1, 512 // n)
        a.image(figures.upscale(img_s, up), caption=f"Top-θ: kept weights (grey = dropped), {share:.1%} kept",
                width="stretch", output_format="PNG")
        b.image(figures.upscale(img_d, up), caption="dense softmax probabilities", width="stretch",
                output_format="PNG")
        c, _ = st.columns([2, 3])
        c.image(figures.colour_legend(), output_format="PNG", width="stretch",
                caption=f"log10 weight {figures.MAP_FLOOR:.0f} … 0 · grey: dropped · white: future keys · "
                        f"rows: queries, columns: keys (one {unit} per pixel)")
    row = st.select_slider("Query (row) to inspect", options=list(range(n)), value=n - 1, key=K.SP_ROW,
                           format_func=lambda i: f"{i}: {cells[i]!r}")
    st.plotly_chart(figures.row_attention(dense, sparse, kept, head=int(head), row=int(row), tokens=cells),
                    width="stretch", key="sp_row_chart")
    st.plotly_chart(figures.popularity_bar(snap.popularity, int(layer), snap.tokens), width="stretch", key="sp_pop")


_maps(snap)
a, b = st.columns(2)
a.plotly_chart(figures.layer_head_heatmap(snap.metrics, "kept_frac", "prefill"), width="stretch", key="sp_kept")
b.plotly_chart(figures.kv_rows_heatmap(snap.metrics, "prefill"), width="stretch", key="sp_kv")
if decode_steps:
    strip = st.empty()
    if cont is not None:  # the prefill is on screen; the browser draws it while the decode steps run
        strip.caption(f"Running {int(decode_steps)} decode steps…")
        snap = analysis.sparsity_decode(lm, snap, cont, int(decode_steps))
    dec = summarize(snap.metrics, "decode")
    decode_metric.metric("kept V rows (decode)", "–" if dec["kept_v_rows"] != dec["kept_v_rows"] else
                         f"{dec['kept_v_rows']:.1%}")
    with strip.container():
        st.plotly_chart(figures.decode_strip(snap.decode, snap.generated), width="stretch", key="sp_decode")
        st.caption(f"{len(snap.generated)} greedy decode steps · {snap.decode_seconds:.2f} s")
else:
    decode_metric.metric("kept V rows (decode)", "–", help="set decode steps > 0")
if not err:
    st.session_state[K.SP_SNAPSHOT] = (snap_key, snap)
table = st.expander("Metrics table", expanded=False, key=K.SP_TABLE_OPEN, on_change="rerun")
if table.open:  # drawn only when opened: a data grid costs the browser even when collapsed
    with table:
        st.dataframe(snap.metrics, hide_index=True, width="stretch")
