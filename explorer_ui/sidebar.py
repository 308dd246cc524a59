"""The sidebar every page shares, and the :class:`AppContext` it hands the pages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import streamlit as st

from topθ_core.models import BUNDLED, BUNDLED_NAME, LoadedModel, ModelLoadError
from topθ_core.thresholds import Thresholds, ThresholdsError

from . import nav, runs, services
from . import session_keys as K

NO_RUN = "(none: dense only)"


@dataclass
class AppContext:
    """What the sidebar resolved for this rerun: the model, the active threshold set, their errors."""

    model_spec: str
    device: str
    dtype: str
    lm: LoadedModel | None = None
    model_error: str | None = None
    load_seconds: float = 0.0
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # every saved run
    compatible: pd.DataFrame = field(default_factory=pd.DataFrame)  # runs made for the loaded model
    run_name: str | None = None
    run_path: str | None = None
    thresholds: Thresholds | None = None
    thresholds_error: str | None = None

    @property
    def model_key(self) -> str:
        return f"{self.model_spec}|{self.device}|{self.dtype}"

    @property
    def run_key(self) -> str:
        if self.run_path is None:
            return "none"
        return f"{self.run_path}|{services.artifact_mtime(self.run_path)}"


def context() -> AppContext:
    """The context of this rerun; call once per page run.

    ``app.py`` draws the sidebar before the page and leaves the context in session state;
    the page takes it (so a stale one is never reused).  A page run without ``app.py``
    having run first (Streamlit's AppTest reruns only the page script when the app has a
    ``pages/`` folder) draws the sidebar itself.
    """
    ctx = st.session_state.pop(K.CONTEXT, None)
    if ctx is None:
        ctx = render_sidebar()
        st.session_state.pop(K.CONTEXT, None)
    return ctx


def require_model() -> AppContext:
    """The context, or stop the page with a clear message when no model is loaded."""
    ctx = context()
    if ctx.lm is None:
        st.info("No model is loaded. " + (f"**{ctx.model_error}**" if ctx.model_error else
                                           "Choose a model in the sidebar."))
        st.stop()
    return ctx


def _model_widgets() -> tuple[str, str, str]:
    default = services.default_model_spec()
    if K.MODEL_CHOICE not in st.session_state:
        st.session_state[K.MODEL_CHOICE] = "bundled" if default == BUNDLED else "local"
        st.session_state[K.MODEL_PATH] = "" if default == BUNDLED else default
    choice = st.sidebar.radio("Model", ["bundled", "local"], key=K.MODEL_CHOICE, horizontal=True,
                              format_func=lambda c: f"Bundled {BUNDLED_NAME}" if c == "bundled" else "Local checkpoint")
    spec = BUNDLED
    if choice == "local":
        path = st.sidebar.text_input("Checkpoint folder", key=K.MODEL_PATH,
                                     placeholder="/path/to/hf-checkpoint (with config.json)").strip()
        spec = path
    c1, c2 = st.sidebar.columns(2)
    devices = services.available_devices()
    device = c1.selectbox("Device", devices, key=K.DEVICE)
    dtypes = services.dtypes_for(device)
    if st.session_state.get(K.DTYPE) not in dtypes:
        st.session_state[K.DTYPE] = dtypes[0]
    dtype = c2.selectbox("dtype", dtypes, key=K.DTYPE)
    return spec, device, dtype


def _load(ctx: AppContext) -> None:
    if not ctx.model_spec:
        ctx.model_error = "Enter the folder of a local transformers checkpoint."
        return
    t0 = time.perf_counter()
    label = BUNDLED_NAME if ctx.model_spec == BUNDLED else Path(ctx.model_spec).name
    try:
        with st.spinner(f"Loading {label} on {ctx.device}/{ctx.dtype}… (the very first load of the bundled "
                        "model converts its GGUF once, about a minute)"):
            ctx.lm = services.get_model(ctx.model_spec, ctx.device, ctx.dtype)
    except ModelLoadError as e:
        ctx.model_error = str(e)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        ctx.model_error = f"could not load {ctx.model_spec}: {type(e).__name__}: {e}"
    ctx.load_seconds = time.perf_counter() - t0


def _run_label(df: pd.DataFrame):
    by_name = {r["name"]: r for _, r in df.iterrows()}

    def fmt(name: str) -> str:
        if name == NO_RUN or name not in by_name:
            return name
        r = by_name[name]
        return f"{name} · {r['k']} σ={r['sigma']}"

    return fmt


def _threshold_widgets(ctx: AppContext) -> None:
    ctx.runs = services.list_runs()
    if ctx.lm is None:
        return
    digest = ctx.lm.fingerprint.digest
    ctx.compatible = ctx.runs[ctx.runs["digest"] == digest].reset_index(drop=True)
    names = list(ctx.compatible["name"])
    options = names + [NO_RUN]
    remembered = st.session_state.setdefault(K.ACTIVE_BY_MODEL, {})  # survives switching to another model and back
    pending = st.session_state.pop(K.PENDING_ACTIVE_RUN, None)
    if pending in options:
        st.session_state[K.ACTIVE_RUN] = pending
    if st.session_state.get(K.ACTIVE_RUN) not in options:
        st.session_state[K.ACTIVE_RUN] = remembered.get(digest) if remembered.get(digest) in options else options[0]
    st.sidebar.selectbox("Active threshold set", options, key=K.ACTIVE_RUN, format_func=_run_label(ctx.compatible),
                         help="Saved calibration runs for the loaded model (data/runs/). Runs made for "
                              "another model are not listed.")
    name = st.session_state[K.ACTIVE_RUN]
    remembered[digest] = name
    if name == NO_RUN:
        ctx.thresholds_error = ("No calibration for this model yet." if not names else
                                "No threshold set is selected.")
        return
    row = ctx.compatible[ctx.compatible["name"] == name].iloc[0]
    ctx.run_name, ctx.run_path = name, row["path"]
    try:
        ctx.thresholds = services.get_thresholds(row["path"], services.artifact_mtime(row["path"]))
        ctx.thresholds.check_model(ctx.lm.fingerprint)
    except ThresholdsError as e:
        ctx.thresholds, ctx.thresholds_error = None, str(e)
        return
    with st.sidebar.expander("Provenance", expanded=False):
        st.markdown("\n".join(f"- {line}" for line in runs.provenance_lines(ctx.thresholds.meta)))


def _status(ctx: AppContext) -> None:
    if ctx.lm is None:
        st.sidebar.error(f"Model not loaded: {ctx.model_error}")
        return
    th = f"thresholds **{ctx.run_name}**" if ctx.thresholds is not None else "no thresholds (dense / top-k only)"
    fp = ctx.lm.fingerprint
    st.sidebar.success(f"{ctx.lm.name} · {fp.n_layers} layers · {fp.n_heads}/{fp.n_kv_heads} heads · "
                       f"{ctx.device}/{ctx.dtype} · {th}", icon=":material/check_circle:")
    if ctx.thresholds_error and ctx.thresholds is None:
        st.sidebar.caption(ctx.thresholds_error)


def render_sidebar() -> AppContext:
    """Draw the shared sidebar, load the model (cached) and resolve the active threshold set."""
    spec, device, dtype = _model_widgets()
    ctx = AppContext(model_spec=spec, device=device, dtype=dtype)
    _load(ctx)
    _threshold_widgets(ctx)
    _status(ctx)
    st.session_state[K.CONTEXT] = ctx
    return ctx
