"""Kernels: run the kernel benchmark when CUDA is present; otherwise show saved results with their card."""

import subprocess
import sys

import streamlit as st

from explorer_ui import bench_results, figures, services
from explorer_ui import session_keys as K

st.title("Kernels")
st.caption("Triton Top-θ kernels (decode and prefill) against dense SDPA on the same card. Decode is memory-bound: "
           "a kernel must read all of K but only the kept V rows, so speed-up ≤ 2/(1+f) for a kept V-row "
           "fraction f.")

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

results = services.benchmark_results()
if not results:
    st.warning("No saved benchmark results yet (benchmarks/results/ is empty).")
    st.stop()

# Kernel results first (this page is about them), then the rest in file order.
results = sorted(results, key=lambda r: "kernel" not in r.path.name)


def _result_body(i: int, r) -> None:
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
            x = c1.selectbox("x", nums, index=nums.index(dx) if dx in nums else 0, key=f"ker_x_{i}")
            ys = [c for c in nums if c != x]
            y = c2.selectbox("y", ys, index=ys.index(dy) if dy in ys else 0, key=f"ker_y_{i}")
            groups = ["(none)"] + others
            color = c3.selectbox("group by", groups, index=groups.index(dg) if dg in groups else 0,
                                 key=f"ker_c_{i}")
            st.plotly_chart(figures.kernel_speed_chart(df, x, y, None if color == "(none)" else color),
                            width="stretch", key=f"ker_chart_{i}")


@st.fragment
def _results(results) -> None:
    """One expander per file; only open ones are drawn (27 files with a table and a chart each took the
    browser seconds to draw).  Opening or closing one reruns this fragment only."""
    for i, r in enumerate(results):
        rel = r.path.relative_to(bench_results.ROOT) if r.path.is_relative_to(bench_results.ROOT) else r.path
        box = st.expander(f"{rel}" + (f" · {', '.join(r.cards)}" if r.cards else ""), expanded=i == 0,
                          key=f"{K.KER_OPEN}_{rel}", on_change="rerun")
        if box.open:
            with box:
                _result_body(i, r)


_results(results)
