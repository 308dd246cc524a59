"""Widgets shared by several pages: the sparse-config controls, the sample-prompt picker and the
θ-aggregation picker."""

from __future__ import annotations

import streamlit as st

from topθ_core.config import (SDC, Aggregation, CalibrationConfig, ConfigError, EmptyRowFloor, KSchedule, Placement,
                              PrefillMode, Selection, SparseConfig, ThetaReference, allowed_sdc, fit_sdc)
from topθ_core.thresholds import Thresholds

from . import analysis, findings
from . import session_keys as K

SELECTION_LABELS = {"top-theta": "Top-θ", "top-k": "Top-k", "dense": "Dense"}
PREFILL_LABELS = {"top-theta": "sparse", "dense": "dense (decode-only)"}
AGGREGATION_LABELS = {"mean-std": "mean + σ·std", "median": "median + σ·1.4826·MAD",
                      "trimmed-mean": "10%-trimmed mean + σ·std"}


def aggregation_picker(container, key: str) -> Aggregation:
    """How the calibration turns each (layer, head, length bin)'s samples into θ (mean-std by default)."""
    value = container.selectbox("θ aggregation", [a.value for a in Aggregation], key=key,
                                format_func=lambda a: AGGREGATION_LABELS.get(a, a),
                                help="mean-std is the paper's. The robust two keep up to "
                                     f"{CalibrationConfig.reservoir_capacity} samples per (layer, head, length "
                                     "bin) while calibrating; σ then scales 1.4826·MAD or the trimmed std.")
    return Aggregation(value)


REFERENCE_LABELS = {"absolute": "score > θ (GPU kernels)", "row-max": "score − row max > θ (more accurate; prefill on the PyTorch path)"}


def theta_reference_picker(container, key: str) -> ThetaReference:
    """What θ is compared with: the score (the paper's; the GPU kernels run it) or the score minus its row's max."""
    value = container.selectbox("θ compared with", [r.value for r in ThetaReference], key=key,
                                format_func=lambda r: REFERENCE_LABELS.get(r, r),
                                help=findings.THETA_REFERENCE_HELP)
    return ThetaReference(value)


def _unforce_selection(key: str, available: list[str]) -> None:
    """Without thresholds the selection is forced to what is available (top-k); that is not the user's
    choice.  Remember what it was before (``None``: never set), and once thresholds are back, return to
    it (or to the first available, Top-θ) instead of keeping the forced top-k for good."""
    before = f"_{key}_before_forced"  # not a widget: survives page switches by itself
    current = st.session_state.get(key)
    if "top-theta" not in available:
        if current not in available and before not in st.session_state:
            st.session_state[before] = current
    elif before in st.session_state:
        previous = st.session_state.pop(before)
        st.session_state[key] = previous if previous in available else available[0]


def sparse_config_controls(prefix: str, thresholds: Thresholds | None, *, columns: int = 4,
                           selections: tuple[str, ...] = ("top-theta", "top-k")) -> tuple[SparseConfig | None, str | None]:
    """Selection, placement, SDC (+scale), VMC, capk, k and the empty-row floor.

    Defaults come from the active threshold set (its k, placement and saved SDC/VMC defaults); Top-θ
    keeps the set's per-layer and per-head k and compares with θ the way the set was calibrated
    (score, or score minus the row max).
    Returns ``(config, None)`` or ``(None, message)`` when the combination is invalid.
    """
    keys = K.config_keys(prefix)
    base = analysis.default_sparse_config(thresholds)
    if base.selection is Selection.DENSE:
        base = SparseConfig(selection=Selection.TOP_K, sdc=SDC.EXACT, vmc=True)
    available = [s for s in selections if s != "top-theta" or thresholds is not None]
    defaults = {"selection": available[0], "placement": base.placement.value, "sdc": base.sdc.value,
                "sdc_scale": float(base.sdc_scale), "vmc": bool(base.vmc), "capk": False,
                "k": int(base.k.default), "empty_row": base.empty_row.value, "prefill": base.prefill.value}
    _unforce_selection(keys["selection"], available)
    for f, key in keys.items():
        if key not in st.session_state or (f == "selection" and st.session_state[key] not in available):
            st.session_state[key] = defaults[f]
    cols = st.columns(columns)
    selection = cols[0].radio("Selection", available, key=keys["selection"], horizontal=False,
                              format_func=lambda s: SELECTION_LABELS[s], help=findings.SELECTION_HELP)
    top_theta = selection == "top-theta"
    if top_theta:
        st.session_state[keys["placement"]] = thresholds.placement.value
    placement = cols[1].radio("Placement", [p.value for p in Placement], key=keys["placement"], disabled=top_theta,
                              format_func=lambda p: f"{p}-softmax", help=findings.PLACEMENT_HELP)
    sdc_options = [s.value for s in allowed_sdc(selection, placement)]
    if st.session_state[keys["sdc"]] not in sdc_options:
        st.session_state[keys["sdc"]] = fit_sdc(st.session_state[keys["sdc"]], selection, placement).value
    sdc = cols[2].selectbox("SDC", sdc_options, key=keys["sdc"], help="  \n\n".join(
        f"**{o}**: {findings.SDC_HELP[o]}" for o in sdc_options))
    sdc_scale = cols[2].number_input("SDC scale s", min_value=0.0, max_value=4.0, step=0.25, key=keys["sdc_scale"],
                                     disabled=sdc == SDC.NONE.value)
    vmc = cols[3].checkbox("VMC", key=keys["vmc"], help=findings.VMC_HELP)
    capk = cols[3].checkbox("capk", key=keys["capk"], disabled=not top_theta, help=findings.CAPK_HELP)
    prefill = cols[3].radio("Prompt (prefill)", [m.value for m in PrefillMode], key=keys["prefill"],
                            format_func=PREFILL_LABELS.get, help=findings.PREFILL_HELP)
    k_default = cols[1].number_input("k (default)", min_value=1, max_value=1 << 16, step=8, key=keys["k"],
                                     help=findings.K_HELP)
    floor = cols[0].selectbox("Empty rows", [e.value for e in EmptyRowFloor], key=keys["empty_row"],
                              disabled=not top_theta, help=findings.FLOOR_HELP)
    # Top-θ keeps the run's per-layer and per-head k: θ of a head was calibrated on the rows longer than its k
    run_k = thresholds.k if (thresholds is not None and top_theta) else KSchedule()
    reference = thresholds.theta_reference if (thresholds is not None and top_theta) else ThetaReference.ABSOLUTE
    try:
        config = SparseConfig(selection=selection, placement=placement, sdc=sdc, sdc_scale=float(sdc_scale),
                              vmc=bool(vmc), capk=bool(capk and top_theta), empty_row=floor,
                              k=KSchedule(default=int(k_default), overrides=run_k.overrides,
                                          head_overrides=run_k.head_overrides), theta_reference=reference,
                              prefill=prefill)
    except ConfigError as e:
        return None, str(e)
    return config, None


def sample_prompt_picker(container, *, prompt_key: str, sample_key: str, applied_key: str) -> dict[str, str]:
    """A "Sample prompt" select box in ``container`` that copies the chosen sample into the
    prompt text area (session key ``prompt_key``) once per choice, so later edits stay.
    Returns the bundled samples (name → text)."""
    from . import services

    samples = services.sample_prompts()
    sample = container.selectbox("Sample prompt", ["(custom)"] + list(samples), key=sample_key)
    if sample != "(custom)" and st.session_state.get(applied_key) != sample:
        st.session_state[prompt_key] = samples[sample]
        st.session_state[applied_key] = sample
    return samples
