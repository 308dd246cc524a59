"""Accuracy: dense vs Top-θ on a task, live, with intervals; the trade-off across all saved results."""

import time

import streamlit as st

from explorer_ui import figures, runs
from explorer_ui import session_keys as K
from explorer_ui.controls import sparse_config_controls
from explorer_ui.sidebar import require_model
from topθ_core import evaluation, tasks
from topθ_core.config import ConfigError
from topθ_core.thresholds import ThresholdsError

ctx = require_model()
lm = ctx.lm
st.title("Accuracy")
kinds = ["mc", "cloze", "perplexity", "agreement"]

tab_run, tab_trade = st.tabs(["Run dense vs Top-θ", "Trade-off across saved results"])
with tab_run:
    st.caption("The same loaded model runs every item twice, dense and sparse; deltas are sparse − dense with a "
               "paired bootstrap 95% interval.")
    c1, c2, c3 = st.columns([1, 2, 1])
    kind = c1.radio("Kind", kinds, key=K.ACC_KIND, format_func={"mc": "Multiple choice", "cloze": "Cloze (LAMBADA)",
                                                                "perplexity": "Perplexity",
                                                                "agreement": "Agreement (KL, greedy match)"}.get)
    if kind == "mc":
        task = c2.selectbox("Task", tasks.list_mc_tasks(), key=K.ACC_TASK)
    elif kind == "cloze":
        task = c2.selectbox("Task", tasks.list_cloze_tasks(), key=K.ACC_TASK)
    else:
        task = c2.selectbox("Corpus", tasks.list_corpora(), key=K.ACC_TASK,
                            help="held-out documents of the corpus")
    limit = int(c3.number_input("Items / documents", min_value=1, max_value=2000, value=20, key=K.ACC_LIMIT))
    st.markdown("**Top-θ settings**")
    config, err = sparse_config_controls("acc", ctx.thresholds)
    if err:
        st.error(err)
    run = st.button("Run evaluation", type="primary", key=K.ACC_RUN, disabled=config is None)

    if run and config is not None:
        bar = st.progress(0.0, text="starting…")
        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:
            frac = min(1.0, done / max(1, total))
            el = time.perf_counter() - t0
            eta = f" · ETA {el * (1 - frac) / frac:.0f} s" if 0 < frac < 1 else ""
            bar.progress(frac, text=f"{done:,}/{total:,} · {el:.1f} s{eta}")

        th = ctx.thresholds if config.needs_thresholds else None
        try:
            if kind == "mc":
                result = evaluation.evaluate_multiple_choice(lm, task, limit, config, th, progress=progress)
            elif kind == "cloze":
                result = evaluation.evaluate_cloze(lm, task, limit, config, th, progress=progress)
            else:  # perplexity / agreement on the corpus's held-out documents
                result = evaluation.run_task(lm, kind, limit, config, th, progress, corpus=task)
        except (ValueError, TypeError, ConfigError, ThresholdsError) as e:
            st.error(f"Evaluation failed: {e}")
            st.stop()
        bar.progress(1.0, text=f"done in {time.perf_counter() - t0:.1f} s")
        summary = result.summary
        saved = None
        try:
            saved = evaluation.save_result(result, runs.results_dir())
        except OSError as e:
            st.warning(f"Result not saved: {e}")
        st.session_state[K.ACC_LAST] = {"summary": summary, "saved": str(saved) if saved else None}

    last = st.session_state.get(K.ACC_LAST)
    if last is not None:
        summary = last["summary"]
        if last.get("saved"):
            st.success(f"Saved to {last['saved']}", icon=":material/save:")
        shown = [c for c in ("task", "metric", "dense", "sparse", "delta", "ci_low", "ci_high", "kept_attention",
                             "kept_v_rows_prefill", "kept_v_rows_decode", "kept_v_rows", "config_label", "n")
                 if c in summary.columns]
        st.dataframe(summary[shown], hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.4f") for c in
                                    ("dense", "sparse", "delta", "ci_low", "ci_high")})
        st.plotly_chart(figures.delta_chart(summary), width="stretch", key="acc_delta")

with tab_trade:
    results = evaluation.load_results(runs.results_dir())
    if results.empty:
        st.info("No saved results yet: run an evaluation.")
    else:
        t1, t2 = st.columns(2)
        xs = [c for c in ("kept_attention", "kept_v_rows_prefill", "kept_v_rows_decode", "kept_v_rows")
              if c in results.columns and results[c].notna().any()]
        x = t1.selectbox("x axis", xs or ["kept_attention"], key="acc_trade_x")
        metrics = sorted(results["metric"].dropna().unique()) if "metric" in results else []
        metric = t2.selectbox("metric", metrics, key="acc_trade_metric") if metrics else None
        plot = results.rename(columns={"config_label": "config"})
        st.plotly_chart(figures.tradeoff_chart(plot, x=x, metric=metric), width="stretch", key="acc_trade")
        with st.expander(f"{len(results)} saved result rows", expanded=False):
            st.dataframe(results, hide_index=True, width="stretch")
