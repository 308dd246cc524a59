"""Kernels: the measured speed per card on top (explorer_ui.kernel_headline), the raw result files behind one
expander, and the benchmark run where CUDA is present."""

import subprocess
import sys

import streamlit as st

from explorer_ui import bench_results, figures, kernel_headline, services, state
from explorer_ui import session_keys as K

st.title("Kernels")
st.caption("Triton Top-θ kernels (decode and prefill) against dense SDPA on the same card, from "
           "benchmarks/results/. Decode is memory-bound: a kernel must read all of K but only the kept V rows, "
           "so speed-up ≤ 2/(1+f) for a kept V-row fraction f.")

try:
    import torch

    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_name(0) if cuda else None
except Exception:  # noqa: BLE001 - a broken CUDA setup just means "no GPU here"
    cuda, card = False, None

script = bench_results.find_benchmark_script()
if cuda:
    st.success(f"CUDA is available: {card}")
    if script is None:
        st.info("No kernel benchmark script was found under benchmarks/.")
    elif st.button(f"Run {script.name}", type="primary", key=K.KER_RUN):
        with st.spinner(f"Running {script.name} on {card}…"):
            proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1800,
                                  cwd=str(bench_results.ROOT))
        (st.success if proc.returncode == 0 else st.error)(f"{script.name} exited with {proc.returncode}")
        st.code((proc.stdout + proc.stderr)[-6000:] or "(no output)")
else:
    st.info("No CUDA device here: showing the saved results in benchmarks/results/ with the card they came from.")

# ---------------------------------------------------------------- headline per card
head = services.kernel_headline_table()
if head.empty:
    st.warning("No kernel benchmark rows yet (benchmarks/results/kernels_*.csv).")
for card_name, rows in head.groupby("card", sort=True):
    st.subheader(f"Measured on {card_name}")
    st.dataframe(kernel_headline.display_frame(rows), hide_index=True, width="stretch")
if not head.empty:
    st.caption("Speed-up = SDPA time / Top-θ time, both measured in the same run on the same inputs; SDPA is the "
               "fastest backend measured (end to end: the fastest of the baselines of that shape). Decode: at the "
               "largest shape measured, with the range over all shapes of that run. How each row is chosen: "
               "explorer_ui/kernel_headline.py; the full story: benchmarks/results/kernels.md.")

# ---------------------------------------------------------------- raw files, one at a time
results = services.benchmark_results()
if not results:
    st.warning("No saved benchmark results yet (benchmarks/results/ is empty).")
    st.stop()
# Kernel tables first (this page is about them), then kernel reports, then the rest in file order.
results = sorted(results, key=lambda r: ("kernel" not in r.path.name, r.kind == "markdown"))
by_name = {str(r.path.relative_to(bench_results.RESULTS_DIR)) if r.path.is_relative_to(bench_results.RESULTS_DIR)
           else str(r.path): r for r in results}


def _result_body(name: str, r) -> None:
    if r.error:
        st.error(r.error)
    elif r.kind == "markdown":
        st.markdown(r.text)
    else:
        df = r.table
        st.dataframe(df, hide_index=True, width="stretch")
        nums = bench_results.numeric_columns(df)
        if len(df) > 1 and len(nums) >= 2:
            dx, dy, dg = bench_results.default_axes(df)
            others = [c for c in df.columns if c not in nums]
            c1, c2, c3 = st.columns(3)
            x = c1.selectbox("x", nums, index=nums.index(dx) if dx in nums else 0, key=f"{K.KER_AXES}_x_{name}")
            ys = [c for c in nums if c != x]
            y = c2.selectbox("y", ys, index=ys.index(dy) if dy in ys else 0, key=f"{K.KER_AXES}_y_{name}")
            groups = ["(none)"] + others
            color = c3.selectbox("group by", groups, index=groups.index(dg) if dg in groups else 0,
                                 key=f"{K.KER_AXES}_group_{name}")
            st.plotly_chart(figures.kernel_speed_chart(df, x, y, None if color == "(none)" else color),
                            width="stretch", key="ker_chart")


@state.fragment
def _raw(by_name: dict) -> None:
    """One expander; inside it one file at a time (drawn only while open).  A change here reruns this part only."""
    box = st.expander(f"Raw result files ({len(by_name)})", expanded=False, key=K.KER_RAW_OPEN, on_change="rerun")
    if not box.open:
        return
    with box:
        names = list(by_name)
        if st.session_state.get(K.KER_FILE) not in names:
            st.session_state[K.KER_FILE] = names[0]
        cards = {n: f" · {', '.join(r.cards)}" if r.cards else "" for n, r in by_name.items()}
        name = st.selectbox("File", names, key=K.KER_FILE, format_func=lambda n: n + cards[n],
                            help="benchmarks/results/ (development logs are left out)")
        _result_body(name, by_name[name])


_raw(by_name)
