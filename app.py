"""Top-θ Explorer: `streamlit run app.py`.

Sets up the page and the shared sidebar, then routes with ``st.navigation`` over ``pages/``.
Pages only load → compute (through ``topθ_core``, cached) → render.
"""

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="Top-θ Explorer", page_icon=":material/filter_alt:", layout="wide")

from explorer_ui.sidebar import render_sidebar  # noqa: E402  (after set_page_config)

HERE = Path(__file__).resolve().parent  # absolute page paths: the app also runs from a wrapper script (tests)
PAGES = [
    st.Page(HERE / "pages/calibrate.py", title="Calibrate", icon=":material/tune:", default=True),
    st.Page(HERE / "pages/thresholds.py", title="Thresholds", icon=":material/show_chart:"),
    st.Page(HERE / "pages/sparsity.py", title="Sparsity", icon=":material/grid_on:"),
    st.Page(HERE / "pages/accuracy.py", title="Accuracy", icon=":material/fact_check:"),
    st.Page(HERE / "pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page(HERE / "pages/kernels.py", title="Kernels", icon=":material/memory:"),
]

# Streamlit fades stale elements with a 1 s CSS transition on every rerun.  A browser without GPU
# compositing repaints the page on every frame of it, which took CPU from the model on a 2-core
# machine (benchmarks/results/app_speed.md).  Stale elements still dim; they just do not animate.
st.html("<style>*, *::before, *::after { transition: none !important; }</style>")
page = st.navigation(PAGES)
st.sidebar.title("Top-θ Explorer")
render_sidebar()
page.run()
