"""Top-θ Explorer: `streamlit run app.py`.

Sets up the page, keeps settings alive across pages and in the URL, draws the shared sidebar and its
jobs panel, then routes with ``st.navigation`` over ``pages/``.  Pages only load → compute (through
``topθ_core``, in background jobs where it takes time) → render.
"""

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="Top-θ Explorer", page_icon=":material/filter_alt:", layout="wide")

from explorer_ui import services, state  # noqa: E402  (after set_page_config)
from explorer_ui.jobs_panel import announce_ended, render_jobs_panel  # noqa: E402
from explorer_ui.sidebar import render_sidebar  # noqa: E402

HERE = Path(__file__).resolve().parent  # absolute page paths: the app also runs from a wrapper script (tests)
PAGES = [
    st.Page(HERE / "pages/overview.py", title="Overview", icon=":material/home:", url_path="overview", default=True),
    st.Page(HERE / "pages/calibrate.py", title="Calibrate", icon=":material/tune:", url_path="calibrate"),
    st.Page(HERE / "pages/thresholds.py", title="Thresholds", icon=":material/show_chart:", url_path="thresholds"),
    st.Page(HERE / "pages/sparsity.py", title="Sparsity", icon=":material/grid_on:", url_path="sparsity"),
    st.Page(HERE / "pages/accuracy.py", title="Accuracy", icon=":material/fact_check:", url_path="accuracy"),
    st.Page(HERE / "pages/compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
    st.Page(HERE / "pages/runs.py", title="Runs", icon=":material/folder_open:", url_path="runs"),
    st.Page(HERE / "pages/kernels.py", title="Kernels", icon=":material/memory:", url_path="kernels"),
]

services.configure_threads()  # leave the browser and the server a core (torch threads thrash otherwise)
state.keep(reassert=True)  # settings outlive the page that draws them, and show when it is back
state.restore_from_url()  # a new session (reload, shared link) starts from the URL's settings
# Streamlit fades stale elements with a 1 s CSS transition on every rerun.  A browser without GPU
# compositing repaints the page on every frame of it, which took CPU from the model on a 2-core
# machine (benchmarks/results/app_speed.md).  Stale elements still dim; they just do not animate.
st.html("<style>*, *::before, *::after { transition: none !important; }</style>")
page = st.navigation(PAGES)
st.sidebar.title("Top-θ Explorer")
announce_ended()  # jobs that ended since the last run: a finished calibration is the active set below
render_sidebar()
render_jobs_panel()
state.write_url(page.url_path)  # this run's settings (widget changes are in the session before a run starts)
try:
    page.run()
finally:
    state.write_url(page.url_path)  # and what the page set itself (defaults on a first visit)
