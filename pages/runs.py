"""Runs: saved threshold sets and evaluation results."""

import streamlit as st

from explorer_ui.sidebar import context

ctx = context()
st.title("Runs")
st.dataframe(ctx.runs.drop(columns=["path", "mtime", "digest"]) if len(ctx.runs) else ctx.runs, hide_index=True)
