"""Calibrate: choose data and settings, run in the background with progress/ETA/Cancel, save under data/runs/."""

from functools import partial

import streamlit as st

from explorer_ui import analysis, controls, figures, runs, services, state
from explorer_ui.jobs import JobState
from explorer_ui.jobs_panel import POLL_S, board, finish, page_job
from explorer_ui import session_keys as K
from explorer_ui.sidebar import require_model
from explorer_ui.uploads import EXTENSIONS, MAX_UPLOAD_MB, UploadError, parse_upload
from topθ_core.calibration import calibrate
from topθ_core.config import SDC, CalibrationConfig, ConfigError, Placement, Selection, allowed_sdc

ctx = require_model()
lm = ctx.lm
st.title("Calibrate")
st.caption("Run the model on calibration text and record, per layer, head and row length, the score that "
           "keeps exactly k elements; θ = mean + σ·std of those samples (or their median + σ·MAD, or "
           "trimmed mean + σ·std).")

# ---------------------------------------------------------------- data
st.subheader("1 · Data")
source = st.radio("Source", ["corpus", "task", "upload"], key=K.CAL_SOURCE, horizontal=True,
                  format_func={"corpus": "Bundled corpus", "task": "Bundled task", "upload": "Upload a file"}.get)
texts: list[str] = []
description = ""
sources = analysis.bundled_sources()
c1, c2, c3 = st.columns([2, 1, 1])
if source == "upload":
    up = c1.file_uploader(f"Text file ({', '.join(EXTENSIONS)}; up to {MAX_UPLOAD_MB} MB)", type=list(EXTENSIONS),
                          key=K.CAL_UPLOAD, help=".txt: documents separated by blank lines; .jsonl: {\"text\": …} "
                                                 "per line; .csv/.parquet: a 'text' column")
    if up is not None:
        try:
            parsed = parse_upload(up.name, up.getvalue())
        except UploadError as e:
            st.error(f"Cannot use this file: {e}", icon=":material/error:")
        else:
            st.success(parsed.describe())
            texts = list(parsed.texts)
            description = f"upload:{parsed.name}"
    n_docs = c2.number_input("Documents", min_value=1, max_value=5000, value=16, key=K.CAL_DOCS)
    texts = texts[: int(n_docs)]
else:
    if source == "corpus":
        if st.session_state.get(K.CAL_CORPUS) not in sources["corpus"]:
            st.session_state[K.CAL_CORPUS] = "pydoc" if "pydoc" in sources["corpus"] else sources["corpus"][0]
        name = c1.selectbox("Corpus", sources["corpus"], key=K.CAL_CORPUS,
                            help="pydoc: English prose · lambada: fiction · code: Python source · humaneval: short "
                                 "Python functions")
    else:
        name = c1.selectbox("Task", sources["task"], key=K.CAL_TASK,
                            help="multiple choice: context + gold answer; gen: generation prompts")
    n_docs = c2.number_input("Documents", min_value=1, max_value=2000, value=8, key=K.CAL_DOCS)
    texts = services.bundled_texts(source, name, int(n_docs))
    description = f"{source}:{name}[:{len(texts)}]"
max_tokens = c3.number_input("Max tokens per document", min_value=16, max_value=8192, value=256, step=64,
                             key=K.CAL_MAX_TOKENS)
if texts:
    st.caption(f"{len(texts)} documents, {sum(len(t) for t in texts):,} characters; each truncated to "
               f"{int(max_tokens)} tokens.")
    if description:
        description += f", max {int(max_tokens)} tokens"

# ---------------------------------------------------------------- settings
st.subheader("2 · Settings")
s1, s2, s3, s4 = st.columns(4)
k_default = s1.number_input("k (kept per row)", min_value=1, max_value=8192, value=64, step=8, key=K.CAL_K)
near_dense = s1.checkbox("Layers 0–1 near-dense (k=512, as in the paper)", value=True, key=K.CAL_NEAR_DENSE)
sigma = s2.slider("σ", min_value=-1.0, max_value=2.0, value=0.1, step=0.05, key=K.CAL_SIGMA,
                  help="θ = mean + σ·std; larger σ keeps fewer elements")
aggregation = controls.aggregation_picker(s2, K.CAL_AGGREGATION)
reference = controls.theta_reference_picker(s4, K.CAL_REFERENCE)
placement = s2.radio("Placement", [p.value for p in Placement], key=K.CAL_PLACEMENT, horizontal=True,
                     format_func=lambda p: f"{p}-softmax")
tac = s3.checkbox("Top-k at calibration (TAC)", value=True, key=K.CAL_TAC)
sample_frac = s3.slider("Row sample fraction", min_value=0.05, max_value=1.0, value=1.0, step=0.05,
                        key=K.CAL_SAMPLE_FRAC)
bin_width = s3.number_input("Length bin width", min_value=1, max_value=256, value=16, key=K.CAL_BIN_WIDTH)
sdc_opts = [s.value for s in sorted(allowed_sdc(Selection.TOP_THETA, placement), key=lambda s: s is not SDC.EXACT)]
sdc_default = s4.selectbox("Default SDC for inference", sdc_opts, key=K.CAL_SDC)
vmc_default = s4.checkbox("Default VMC for inference", value=True, key=K.CAL_VMC)

# The per-layer k editor and its chart are drawn only while their expander is open: drawn collapsed,
# they made a new session's first page load the data-grid and Plotly code (app start 5.9 s, target 5).
# The edited table outlives the editor in the session, keyed by what it was built from.
k_signature = (lm.n_layers, int(k_default), bool(near_dense))
saved = st.session_state.get(K.CAL_K_EDITED)
table = saved[1] if saved is not None and saved[0] == k_signature else analysis.k_table(*k_signature)
k_box = st.expander("Per-layer k", expanded=False, key=K.CAL_K_OPEN, on_change="rerun")
if k_box.open:
    with k_box:
        table = st.data_editor(table, key=f"{K.CAL_K_TABLE}_{lm.n_layers}_{int(k_default)}_{near_dense}",
                               hide_index=True, disabled=["layer"], width="stretch",
                               column_config={"k": st.column_config.NumberColumn("k", min_value=1, max_value=1 << 16,
                                                                                  step=1)})
        st.session_state[K.CAL_K_EDITED] = (k_signature, table)
        st.plotly_chart(figures.k_schedule_bar(table), width="stretch", key="cal_k_chart")
schedule = analysis.k_schedule_from_table(table, int(k_default))

cal_error = None
try:
    cal_config = CalibrationConfig(k=schedule, placement=placement, sigma=float(sigma), tac=bool(tac),
                                   sample_frac=float(sample_frac), bin_width=int(bin_width), vmc=bool(vmc_default),
                                   aggregation=aggregation, theta_reference=reference)
    cal_config.k.as_list(lm.n_layers)
except (ConfigError, ValueError) as e:
    cal_config, cal_error = None, str(e)
if cal_error:
    st.error(f"Invalid settings: {cal_error}")

# ---------------------------------------------------------------- run
st.subheader("3 · Run")
jobs = board()
job = page_job("calibrate")
running = job is not None and job.active
r1, r2, r3 = st.columns([2, 1, 1])
run_name = r1.text_input("Run name", key=K.CAL_NAME, placeholder="automatic, e.g. "
                         + runs.default_run_name(description.split("[")[0] or "data", int(k_default)))
run = r2.button("Run calibration", type="primary", key=K.CAL_RUN, width="stretch",
                disabled=cal_config is None or not texts or running,
                help="Runs in the background: switch pages freely; the sidebar's jobs panel shows it.")
r3.button("Cancel", key=K.CAL_CANCEL, width="stretch", disabled=not running,
          on_click=job.cancel if running else None, help="stops the calibration; nothing is saved")

if run and cal_config is not None and not running:
    try:
        name = runs.validate_run_name(run_name) if run_name.strip() else runs.unique_run_name(
            runs.default_run_name(description.split("[")[0] or "data", int(k_default)))
    except ValueError as e:
        st.error(str(e))
        st.stop()
    if (runs.runs_dir() / name).exists():
        st.error(f"A run named {name!r} exists already; choose another name.")
        st.stop()
    defaults = {"sdc": sdc_default, "vmc": bool(vmc_default)}

    def work(job, texts=list(texts), cfg=cal_config, max_tokens=int(max_tokens), description=description):
        job.unit = "tokens"
        th = calibrate(lm, texts, cfg, max_length=max_tokens, progress=job.progress, should_stop=job.should_stop,
                       data_description=description)
        job.check()  # a cancel after the last document still saves nothing
        path = runs.save_run(th, name, app_defaults=defaults)
        return {"name": name, "path": str(path), "seconds": job.elapsed, "rows": th.meta.get("rows_sampled"),
                "tokens": th.meta.get("tokens")}

    jobs.submit("calibrate", f"calibrate {name}", "calibrate", work, inputs={"name": name})
    st.rerun()  # draw the app again: the sidebar's jobs panel lists the new job and polls it


@state.fragment(run_every=POLL_S if job is not None and job.active else None)
def _status() -> None:
    """The calibration's progress while it runs; its result (or why there is none) once it ended."""
    job = page_job("calibrate")
    if job is None:
        return
    if job.active:
        st.progress(job.fraction, text=f"{job.label}: {job.status_text()}")
        return
    if job.state is JobState.CANCELLED:
        st.warning("Calibration cancelled; nothing was saved.", icon=":material/cancel:")
    elif job.state is JobState.FAILED:
        st.error(f"Calibration failed, nothing was saved: {job.error}")
    elif (runs.runs_dir() / job.result["name"]).is_dir():
        last = job.result
        st.success(f"Saved **{last['name']}** ({last['tokens']} tokens, {last['rows']} rows sampled, "
                   f"{last['seconds']:.1f} s) and made it the active threshold set.", icon=":material/check:")
        frame = services.threshold_frame(last["path"], services.artifact_mtime(last["path"]))
        m1, m2, m3 = st.columns(3)
        m1.metric("calibrated (layer, head, bin) cells", f"{len(frame):,}")
        m2.metric("layers with θ", int(frame["layer"].nunique()) if len(frame) else 0)
        m3.metric("mean θ", f"{frame['theta'].mean():.3f}" if len(frame) else "–")
        st.download_button("Download thresholds (.zip)", data=partial(runs.zip_run, last["path"]),
                           file_name=f"{last['name']}.zip", mime="application/zip", key="cal_download",
                           icon=":material/download:", on_click="ignore")
    finish(job)  # ended while this page was open: the sidebar shows the new active set


_status()

with st.expander("Saved runs", expanded=False):
    table_runs = ctx.runs.drop(columns=["path", "mtime", "digest"]) if len(ctx.runs) else ctx.runs
    st.dataframe(table_runs, hide_index=True, width="stretch")
