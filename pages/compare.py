"""Compare: dense and Top-θ greedy generations side by side, streaming, divergence and per-token KL."""

import json
import math

import streamlit as st

from explorer_ui import figures, render, state
from explorer_ui import session_keys as K
from explorer_ui.controls import sample_prompt_picker, sparse_config_controls
from explorer_ui.jobs import JobState
from explorer_ui.jobs_panel import POLL_S, board, finish, page_job
from explorer_ui.sidebar import require_model
from topθ_core.generation import compare_generate

ctx = require_model()
lm = ctx.lm
st.title("Compare")
st.caption("Greedy dense and Top-θ continuations of one prompt on the same model. The Top-θ side is coloured by the "
           "next-token KL(dense‖Top-θ) on its own prefix; the first divergent token is outlined.")

c1, c2 = st.columns([3, 1])
sample_prompt_picker(c2, prompt_key=K.CMP_PROMPT, sample_key=K.CMP_SAMPLE, applied_key=K.CMP_SAMPLE_APPLIED)
if K.CMP_PROMPT not in st.session_state:
    st.session_state[K.CMP_PROMPT] = "Explain in two sentences why the sky is blue."
prompt = c1.text_area("Prompt", key=K.CMP_PROMPT, height=110)
max_new = c2.number_input("New tokens", min_value=1, max_value=512, value=32, key=K.CMP_MAX_NEW)
has_template = bool(getattr(lm.tokenizer, "chat_template", None))
chat = c2.checkbox("Chat template", value=has_template, key=K.CMP_CHAT, disabled=not has_template,
                   help="wrap the prompt as a user turn (instruct models)")

with st.expander("Sparse settings", expanded=ctx.thresholds is None):
    config, err = sparse_config_controls("cmp", ctx.thresholds)
if err:
    st.error(err)
    st.stop()  # the settings stay as they are (they outlive this run): fix the combination to go on

inputs = {"model": ctx.model_key, "thresholds": ctx.run_key, "prompt": prompt, "max_new": int(max_new),
          "chat": bool(chat and has_template), "config": json.dumps(config.to_dict(), sort_keys=True),
          "label": config.label()}
job = page_job("compare")
running = job is not None and job.active
b1, b2, _ = st.columns([1, 1, 4])
run = b1.button("Generate", type="primary", key=K.CMP_RUN, width="stretch", disabled=not prompt.strip() or running)
b2.button("Stop", key=K.CMP_STOP, width="stretch", disabled=not running, on_click=job.cancel if running else None,
          help="stops the generation; what was generated so far stays on screen")

if run and prompt.strip() and not running:
    th = ctx.thresholds if config.needs_thresholds else None

    def work(job, prompt=prompt, config=config, max_new=int(max_new), chat=bool(chat and has_template)):
        job.unit = "tokens"
        steps = []
        for s in compare_generate(lm, prompt, config, th, max_new_tokens=max_new, chat=chat):
            steps.append(s)
            job.publish(list(steps))
            job.progress(len(steps), max_new)
            if job.should_stop() or not math.isfinite(s.kl):
                break
        return {"steps": steps, "stopped": job.should_stop()}

    board().submit("generate", f"generate {int(max_new)} tokens", "compare", work, inputs=inputs, replace=True)
    st.rerun()  # draw the app again: the sidebar's jobs panel lists the new job and polls it


@state.fragment(run_every=POLL_S if job is not None and job.active else None)
def _streams(inputs) -> None:
    """Both streams as they grow; after Stop, the partial generation under its own run's header."""
    job = page_job("compare")
    if job is None or job.partial is None:
        if job is not None and job.state is JobState.FAILED:
            st.error(f"Generation failed: {job.error}")
        elif job is None:
            st.info("Press **Generate** to stream both continuations.")
        else:
            st.caption("Starting…")
        return
    df = render.steps_frame(job.partial)
    stopped = job.state is JobState.DONE and job.result.get("stopped")
    if job.inputs != inputs:
        st.warning("**Stale**: this generation ran with other settings or another prompt than the ones above.",
                   icon=":material/history:")
    if job.state is JobState.FAILED:
        st.error(f"Generation failed after {len(df)} tokens: {job.error}")
    left, right = st.columns(2)
    left.markdown("**Dense**")
    right.markdown(f"**Top-θ** · {job.inputs['label']}" + (f" · stopped after {len(df)} tokens" if stopped else ""))
    scale = render.kl_scale(df)
    left.html(render.tokens_html(df, "dense"))
    right.html(render.tokens_html(df, "sparse", kl_scale=scale)
               + f'<div style="font-size:0.75rem;color:#888">colour: KL 0 → {scale:.3g} nats</div>')
    first = render.first_divergent_step(df)
    kv = df["kept_v_rows"].dropna()
    m = st.columns(5)
    m[0].metric("tokens", len(df))
    m[1].metric("first divergence", "none" if first is None else f"step {first}")
    m[2].metric("mean KL (nats)", f"{df['kl'].mean():.4f}" if len(df) else "–")
    m[3].metric("kept V rows (decode)", f"{kv.mean():.1%}" if len(kv) else "–")
    last = df.iloc[-1] if len(df) else None
    m[4].metric("tok/s dense · Top-θ", "–" if last is None else f"{last['dense_tok_s']:.1f} · {last['sparse_tok_s']:.1f}",
                help="both streams timed in the same run on this device")
    if not job.active:
        st.plotly_chart(figures.compare_steps_chart(df), width="stretch", key="cmp_chart")
        finish(job)


_streams(inputs)
