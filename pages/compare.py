"""Compare: dense and Top-θ greedy generations side by side, streaming, divergence and per-token KL."""

import math

import pandas as pd
import streamlit as st

from explorer_ui import figures, render
from explorer_ui import session_keys as K
from explorer_ui.controls import sample_prompt_picker, sparse_config_controls
from explorer_ui.sidebar import require_model
from topθ_core.config import ConfigError
from topθ_core.thresholds import ThresholdsError

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
    st.stop()

b1, b2, _ = st.columns([1, 1, 4])
run = b1.button("Generate", type="primary", key=K.CMP_RUN, width="stretch", disabled=not prompt.strip())
b2.button("Stop", key=K.CMP_STOP, width="stretch", help="stops a generation in progress")

left, right = st.columns(2)
left.markdown("**Dense**")
right.markdown(f"**Top-θ** · {config.label()}")
dense_box, sparse_box = left.empty(), right.empty()
metrics_box = st.empty()
chart_box = st.empty()


def draw(df: pd.DataFrame, final: bool) -> None:
    scale = render.kl_scale(df)
    dense_box.html(render.tokens_html(df, "dense"))
    sparse_box.html(render.tokens_html(df, "sparse", kl_scale=scale)
                    + f'<div style="font-size:0.75rem;color:#888">colour: KL 0 → {scale:.3g} nats</div>')
    first = render.first_divergent_step(df)
    kv = df["kept_v_rows"].dropna()
    with metrics_box.container():
        m = st.columns(5)
        m[0].metric("tokens", len(df))
        m[1].metric("first divergence", "none" if first is None else f"step {first}")
        m[2].metric("mean KL (nats)", f"{df['kl'].mean():.4f}" if len(df) else "–")
        m[3].metric("kept V rows (decode)", f"{kv.mean():.1%}" if len(kv) else "–")
        last = df.iloc[-1] if len(df) else None
        m[4].metric("tok/s dense · Top-θ", "–" if last is None else
                    f"{last['dense_tok_s']:.1f} · {last['sparse_tok_s']:.1f}")
    if final or len(df) % 8 == 0:
        chart_box.plotly_chart(figures.compare_steps_chart(df), width="stretch", key=f"cmp_chart_{len(df)}_{final}")


if run:
    steps = []
    try:
        for s in compare_generate(lm, prompt, config, ctx.thresholds if config.needs_thresholds else None,
                                  max_new_tokens=int(max_new), chat=bool(chat and has_template)):
            steps.append(s)
            df = render.steps_frame(steps)
            draw(df, final=False)
            if not math.isfinite(s.kl):
                break
    except (ValueError, ThresholdsError, ConfigError) as e:
        st.error(f"Generation failed: {e}")
        st.stop()
    df = render.steps_frame(steps)
    st.session_state[K.CMP_LAST] = {"prompt": prompt, "label": config.label(), "steps": df.to_dict("records")}
    draw(df, final=True)
elif st.session_state.get(K.CMP_LAST):
    last = st.session_state[K.CMP_LAST]
    df = pd.DataFrame(last["steps"], columns=render.STEP_COLUMNS)
    right.caption(f"last run: {last['label']}")
    draw(df, final=True)
else:
    st.info("Press **Generate** to stream both continuations.")
