"""The Streamlit app's own code (the engine is :mod:`topθ_core`, which never imports Streamlit).

* :mod:`explorer_ui.session_keys` - every ``st.session_state`` key, in one place.
* :mod:`explorer_ui.figures` - pure ``DataFrame → plotly Figure`` builders.
* :mod:`explorer_ui.analysis` - pure computations the pages show (no Streamlit).
* :mod:`explorer_ui.runs` - saved calibration runs under ``data/runs/`` and saved evaluation results: list,
  rename, delete, zip import/export, σ saved as a new set (no Streamlit).
* :mod:`explorer_ui.kernel_headline` - the Kernels/Overview speed headline from ``benchmarks/results/`` (no Streamlit).
* :mod:`explorer_ui.uploads` - validated parsing of uploaded data files (no Streamlit).
* :mod:`explorer_ui.services` - the cached loaders (``st.cache_resource`` / ``st.cache_data``).
* :mod:`explorer_ui.sidebar` - the shared sidebar and the per-session :class:`AppContext`.
"""
