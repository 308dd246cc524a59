"""Overview: what Top-θ does, the active set's measured figures, the speed measured on a card, the key findings,
where to start.  Works without a model (it says so and shows the saved measurements) and without an active set."""

import pandas as pd
import streamlit as st

from explorer_ui import findings, kernel_headline, nav, runs, services
from explorer_ui.sidebar import context
from topθ_core import evaluation

ctx = context()
st.title("Top-θ Explorer")
st.markdown(findings.WHAT_IT_DOES)
if ctx.lm is None:
    st.info("No model is loaded" + (f" ({ctx.model_error})" if ctx.model_error else "") + ". Calibrate, Sparsity, "
            "Accuracy and Compare need one (choose it in the sidebar); the saved measurements below do not.")

# ---------------------------------------------------------------- the active threshold set
st.subheader("Active threshold set")
if ctx.lm is None:
    st.caption("The active set is chosen among the sets calibrated for the loaded model: load one first.")
elif ctx.thresholds is None:
    st.info(ctx.thresholds_error or "No threshold set is active.")
    nav.link("calibrate", "Calibrate a threshold set", ":material/tune:")
else:
    th = ctx.thresholds
    st.markdown(f"**{ctx.run_name}** · {runs.describe_k(th.meta.get('k'))} · σ = {th.sigma:g} · "
                f"{th.placement.value}-softmax · calibrated on {th.meta.get('data') or 'unrecorded data'}")
    latest = runs.active_results(services.saved_results(), evaluation.thresholds_id(th))
    if latest.empty:
        st.info("No saved evaluation results for this threshold set yet: run one on the Accuracy page to see what "
                "it keeps and what it costs.")
        nav.link("accuracy", "Measure it on Accuracy", ":material/fact_check:")
    else:
        newest = latest.iloc[0]
        m = st.columns(3)
        kept = newest.get("kept_attention")
        m[0].metric("kept attention", "–" if pd.isna(kept) else f"{kept:.1%}",
                    help=f"kept / visible attention elements of the Top-θ pass of the latest saved result "
                         f"({newest['task']}, {newest['created']})")
        signed = lambda v: "–" if pd.isna(v) else f"{v:+.4f}"  # noqa: E731
        m[1].metric(f"Δ {newest['metric']} · {newest['task']}", signed(newest["delta"]),
                    help=f"Top-θ − dense, 95% interval [{signed(newest['ci_low'])}, {signed(newest['ci_high'])}], "
                         f"n = {newest['n']}, {newest['config_label']}")
        m[2].metric("tasks · metrics measured", f"{latest['task'].nunique()} · {len(latest)}")
        st.dataframe(runs.results_display(latest), hide_index=True, width="stretch")
        st.caption("The latest saved result per task and metric for this threshold set (Runs lists them all).")

# ---------------------------------------------------------------- speed
st.subheader("Measured speed")
head = services.kernel_headline_table()
if head.empty:
    st.caption("No kernel measurements are saved under benchmarks/results/.")
for card, cells in kernel_headline.cells_by_card(head).items():
    st.markdown(f"**On {card}** (speed-up over the fastest SDPA measured in the same run)")
    for i in range(0, len(cells), 3):  # three per row: the end-to-end labels (model, B, N) stay readable
        for col, (label, value, where) in zip(st.columns(3), cells[i:i + 3]):
            col.metric(label, value, help=where)
nav.link("kernels", "All kernel measurements", ":material/memory:")

# ---------------------------------------------------------------- findings and where to start
st.subheader("Key findings")
st.markdown("\n".join(f"- **{title}** {detail}" for title, detail in findings.KEY_FINDINGS))
st.subheader("Where to start")
for name, label, text in findings.WHERE_TO_START:
    a, b = st.columns([1, 4])
    nav.link(name, label, container=a)
    b.caption(text)
