"""Overview: what Top-θ does, the active set's figures, the key findings, where to start."""

import streamlit as st

from explorer_ui import nav
from explorer_ui.sidebar import context

ctx = context()
st.title("Top-θ Explorer")
st.markdown("Top-θ attention keeps an attention element only if its score beats a calibrated threshold θ per "
            "(layer, head, row length), then compensates for what was dropped.")
nav.link("calibrate", "Start: calibrate thresholds", ":material/tune:")
