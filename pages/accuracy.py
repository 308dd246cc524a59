"""Accuracy: dense vs Top-θ on a task, live per item, several variants side by side; the trade-off of all results."""

import json

import streamlit as st

from explorer_ui import evaluation_view as view
from explorer_ui import figures, runs, services, state
from explorer_ui import session_keys as K
from explorer_ui.controls import sparse_config_controls
from explorer_ui.jobs import JobState
from explorer_ui.jobs_panel import POLL_S, board, finish, page_job
from explorer_ui.sidebar import require_model
from topθ_core import evaluation, tasks
from topθ_core.config import ConfigError, SDC
from topθ_core.evaluation import Arm

LIVE_MAX_S = 90  # live mode re-runs by itself only when the estimate is at most this long
KINDS = {"mc": "Multiple choice", "cloze": "Cloze (LAMBADA)", "perplexity": "Perplexity",
         "agreement": "Agreement (KL, greedy match)"}
UNITS = {"mc": "items", "cloze": "items", "perplexity": "documents", "agreement": "documents + prompts"}

ctx = require_model()
lm = ctx.lm
st.title("Accuracy")
tab_run, tab_trade = st.tabs(["Dense vs Top-θ", "Trade-off across saved results"])

with tab_run:
    st.caption("The same loaded model scores every item dense (its own attention, SDPA) and with each Top-θ "
               "variant; Δ is Top-θ − dense with a paired bootstrap 95% interval. Dense results are cached on "
               "disk per model and item, so changing a variant runs only the Top-θ side. Runs continue in the "
               "background when you switch pages.")
    c1, c2, c3, c4 = st.columns([1, 2, 1, 1])
    kind = c1.radio("Kind", list(KINDS), key=K.ACC_KIND, format_func=KINDS.get)
    names = {"mc": tasks.list_mc_tasks(), "cloze": tasks.list_cloze_tasks()}.get(kind, tasks.list_corpora())
    if st.session_state.get(K.ACC_TASK) not in names:
        st.session_state[K.ACC_TASK] = names[0]
    task = c2.selectbox("Task" if kind in ("mc", "cloze") else "Corpus (held-out documents)", names, key=K.ACC_TASK)
    limit = int(c3.number_input(UNITS[kind].capitalize(), min_value=1, max_value=2000, value=20, key=K.ACC_LIMIT))
    token_cap = None
    if kind == "perplexity":
        token_cap = int(c4.number_input("Token cap (all documents)", min_value=64, max_value=1_000_000, value=4096,
                                        step=512, key=K.ACC_TOKEN_CAP,
                                        help="scoring stops after this many tokens in all: the last document is "
                                             "cut there"))
    st.markdown("**Top-θ settings**")
    config, err = sparse_config_controls("acc", ctx.thresholds)
    with st.expander("Variant matrix: several variants side by side", expanded=False):
        m1, m2, m3 = st.columns(3)
        sdcs = m1.multiselect("SDC variants", [s.value for s in SDC], key=K.ACC_MATRIX_SDC,
                              help="each chosen SDC × each VMC choice × each k is one variant; empty: the setting above")
        vmcs = m2.multiselect("VMC", [True, False], key=K.ACC_MATRIX_VMC,
                              format_func=lambda v: "on" if v else "off")
        k_text = m3.text_input("k values", key=K.ACC_MATRIX_K, placeholder="e.g. 32,64")
    configs, refused = [], []
    if config is not None:
        try:
            configs, refused = view.variant_configs(config, sdcs, vmcs, view.parse_k_list(k_text))
        except ConfigError as e:
            err = str(e)
    if err:
        st.error(err)
    for line in refused:
        st.caption(f"Skipped (invalid combination): {line}")

    # ---- what a run will be, before it starts ----------------------------------------------------------
    options = {"corpus": task, "token_cap": token_cap} if kind == "perplexity" else \
        {"corpus": task} if kind == "agreement" else {}
    task_name = {"mc": task, "cloze": "lambada", "perplexity": "perplexity", "agreement": "agreement"}[kind]
    th = ctx.thresholds
    inputs = {"model": ctx.model_key, "thresholds": ctx.run_key, "kind": kind, "task": task_name, "limit": limit,
              "options": options, "configs": [json.dumps(c.to_dict(), sort_keys=True) for c in configs]}
    built = None
    try:
        built = services.paired_task(ctx.model_key, task_name, limit, json.dumps(options, sort_keys=True), lm)
    except (ValueError, TypeError) as e:
        st.error(f"Cannot evaluate this: {e}")
    cache = services.dense_cache(ctx.model_key, str(runs.results_folder()), lm)
    est = None
    if built is not None and configs:
        keys = [built.unit_key(u) for u in built.units]
        cached = cache.known(built.cache_key(), keys) if built.cache_key() else 0
        rates = services.measured_rates().get((ctx.model_key, kind))
        est = view.estimate(len(keys), built.total_tokens(), cached, len(configs), rates)
        st.caption(est.text(UNITS[kind]))

    jobs = board()
    job = page_job("accuracy")
    running = job is not None and job.active
    b1, b2, b3, _ = st.columns([1, 1, 2, 2])
    run = b1.button("Run", type="primary", key=K.ACC_RUN, width="stretch", disabled=not configs or built is None)
    b2.button("Cancel", key=K.ACC_CANCEL, width="stretch", disabled=not running,
              on_click=job.cancel if running else None, help="stops the run; no result is saved")
    live = b3.toggle("Live: re-run on every change", value=True, key=K.ACC_LIVE,
                     help=f"after a first Run, a changed setting starts a new run by itself when it is estimated "
                          f"at {LIVE_MAX_S} s or less")
    changed = job is not None and job.inputs != inputs
    auto = (live and changed and configs and built is not None and est is not None and est.seconds is not None
            and est.seconds <= LIVE_MAX_S)
    if (run or auto) and configs and built is not None:
        arms = [Arm(c, th if c.needs_thresholds else None) for c in configs]
        rate_key, tokens = (ctx.model_key, kind), built.total_tokens()
        dense_share = 1 - (est.dense_cached / max(1, est.units) if est else 0)

        def work(job, task=built, arms=arms, cache=cache):
            job.unit = "tokens" if kind == "perplexity" else "choices" if kind in ("mc", "cloze") else "documents"
            last = None
            for update in evaluation.stream_task(lm, task, None, arms, dense_cache=cache, progress=job.progress,
                                                 should_stop=job.should_stop):
                job.publish(update)
                last = update
            job.check()  # cancelled after the last item: still nothing saved
            saved = [str(evaluation.save_result(r, runs.results_dir())) for r in last.results]
            services.measured_rates()[rate_key] = {**services.measured_rates().get(rate_key, {}),
                                                   **view.measured_rates(last.results, tokens, dense_share)}
            return {"update": last, "saved": saved}

        label = f"{task} · {len(configs)} variant{'s' if len(configs) > 1 else ''}"
        jobs.submit("evaluate", label, "accuracy", work, inputs=inputs, replace=True)
        st.rerun()  # draw the app again: the sidebar's jobs panel lists the new job and polls it
    elif live and changed and est is not None and not running:
        st.info("Settings changed since the result below. " + ("Press **Run**: the estimate is longer than live "
                "mode runs by itself." if est.seconds is not None else "Press **Run** (no speed measured yet)."))

    @state.fragment(run_every=POLL_S if job is not None and job.active else None)
    def _results(inputs) -> None:
        """The run's results so far (per item as they complete), or the last run's, marked stale when the
        controls no longer match what it ran."""
        job = page_job("accuracy")
        if job is None:
            st.info("Press **Run** to score dense and Top-θ side by side.")
            return
        shown = job
        if job.partial is None:  # nothing of the new run yet: keep the previous run's numbers on screen
            previous = [j for j in board().jobs(page="accuracy", kind="evaluate") if j.partial is not None
                        and j is not job]
            shown = previous[-1] if previous else job
        if job.active:
            st.progress(job.fraction, text=f"{job.label}: {job.status_text()}")
        elif job.state is JobState.CANCELLED:
            st.warning("Cancelled: no result was saved." + (" The numbers below are the items done before." if
                                                            job.partial is not None else ""))
        elif job.state is JobState.FAILED:
            st.error(f"Evaluation failed: {job.error}")
        update = shown.partial
        if update is None:
            return
        if shown.inputs != inputs:
            st.warning("**Stale**: these results are for other settings than the ones above"
                       + (" (the new run is starting)." if job.active else "; press Run."), icon=":material/history:")
        table = view.result_table(update.results)
        done = "all" if update.finished else f"{update.done} of {update.total}"
        st.markdown(f"**{done} {UNITS[shown.inputs.get('kind', 'mc')]} scored** · "
                    f"dense = the model's own attention ({lm.name}, {ctx.dtype}); dense values of "
                    f"{update.dense_cached} came from the cache")
        shown_cols = ["variant", "metric", "dense", "Top-θ", "Δ", "95% interval", "n", "kept attention",
                      "kept (sparse layers)"]
        shown_table = table.assign(**{"95% interval": [view.interval_text(lo, hi) for lo, hi in
                                                       zip(table["ci_low"], table["ci_high"])]})
        styled = shown_table[shown_cols].style.apply(
            lambda col: [f"color: {figures.WORSE}" if w else "" for w in table["worse"]], subset=["Δ"]).format(
            {c: "{:.4f}" for c in ("dense", "Top-θ", "Δ")} |
            {c: "{:.1%}" for c in ("kept attention", "kept (sparse layers)")}, na_rep="–")
        st.dataframe(styled, hide_index=True, width="stretch")
        legend = [f"**{v}** = `{c}`" if v != c else f"`{c}`" for v, c in dict(zip(table["variant"],
                                                                               table["config"])).items()]
        st.markdown("  \n".join(legend) + f"  \nthresholds: {ctx.run_name or 'none'}; Δ in red: worse than dense "
                    "for that metric")
        st.plotly_chart(figures.variant_delta_chart(table), width="stretch", key="acc_delta")
        mean_tokens = update.results[0].info.get("mean_prompt_tokens")
        for note in view.thin_notes(table, update.results[0].config.k.default, mean_tokens):
            st.caption(f":material/info: {note}")
        if job.state is JobState.DONE and job is shown:
            st.caption(f"Saved {len(job.result['saved'])} result file(s) under {runs.results_folder()}.")
        finish(job)  # the run ended while this page was open

    _results(inputs)

with tab_trade:
    results = services.saved_results()
    if results.empty:
        st.info("No saved results yet: run an evaluation.")
    else:
        t1, t2 = st.columns(2)
        xs = [c for c in ("kept_attention", "kept_attention_sparse", "kept_v_rows_prefill", "kept_v_rows_decode")
              if c in results.columns and results[c].notna().any()]
        x = t1.selectbox("x axis", xs or ["kept_attention"], key="acc_trade_x")
        metrics = sorted(results["metric"].dropna().unique()) if "metric" in results else []
        metric = t2.selectbox("metric", metrics, key="acc_trade_metric") if metrics else None
        plot = results.rename(columns={"config_label": "config"})
        st.plotly_chart(figures.tradeoff_chart(plot, x=x, metric=metric), width="stretch", key="acc_trade")
        with st.expander(f"{len(results)} saved result rows", expanded=False):
            st.dataframe(results, hide_index=True, width="stretch")
