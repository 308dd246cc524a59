"""Every ``st.session_state`` key the app uses, in one module.

Widget keys are prefixed by their page so two pages never share a widget by accident.
Values that are not widgets (results, flags) say so in their comment.
"""

# ---- sidebar (every page) -------------------------------------------------------------
MODEL_CHOICE = "sb_model_choice"  # "bundled" | "local"
MODEL_PATH = "sb_model_path"  # local checkpoint path (text input)
DEVICE = "sb_device"
DTYPE = "sb_dtype"
ACTIVE_RUN = "sb_active_run"  # name of the active threshold set (selectbox)
PENDING_ACTIVE_RUN = "pending_active_run"  # not a widget: a run to select on the next rerun
CONTEXT = "app_context"  # not a widget: the AppContext the sidebar built for this rerun

# ---- Calibrate --------------------------------------------------------------------------
CAL_SOURCE = "cal_source"
CAL_CORPUS = "cal_corpus"
CAL_TASK = "cal_task"
CAL_UPLOAD = "cal_upload"
CAL_DOCS = "cal_docs"
CAL_MAX_TOKENS = "cal_max_tokens"
CAL_K = "cal_k"
CAL_NEAR_DENSE = "cal_near_dense"
CAL_K_TABLE = "cal_k_table"
CAL_K_OPEN = "cal_k_open"  # expander open state (per-layer k editor)
CAL_K_EDITED = "cal_k_edited"  # not a widget: (signature, edited per-layer k table)
CAL_SIGMA = "cal_sigma"
CAL_AGGREGATION = "cal_aggregation"
CAL_REFERENCE = "cal_theta_reference"
CAL_PLACEMENT = "cal_placement"
CAL_TAC = "cal_tac"
CAL_SAMPLE_FRAC = "cal_sample_frac"
CAL_BIN_WIDTH = "cal_bin_width"
CAL_SDC = "cal_sdc"
CAL_VMC = "cal_vmc"
CAL_NAME = "cal_name"
CAL_RUN = "cal_run"  # button
CAL_CANCEL = "cal_cancel"  # button
CAL_LAST = "cal_last"  # not a widget: {"name", "path", "summary"} of this session's last finished run
CAL_RUNNING = "cal_running"  # not a widget: True while this session's calibration loop runs

# ---- Thresholds -------------------------------------------------------------------------
TH_RUN = "th_run"
TH_OVERLAY = "th_overlay"
TH_LAYER = "th_layer"
TH_HEADS = "th_heads"
TH_LENGTH = "th_length"
TH_SIGMA = "th_sigma"
TH_GRID = "th_grid"  # plotly chart selection state
TH_TABLE_OPEN = "th_table_open"  # expander open state
TH_HIST_OPEN = "th_hist_open"  # expander open state (histograms)
TH_GRID_SEEN = "th_grid_seen"  # not a widget: the last grid click already applied

# ---- Sparsity ---------------------------------------------------------------------------
SP_SAMPLE = "sp_sample"
SP_PROMPT = "sp_prompt"
SP_MAX_TOKENS = "sp_max_tokens"
SP_LAYER = "sp_layer"
SP_HEAD = "sp_head"
SP_DECODE = "sp_decode_steps"
SP_TABLE_OPEN = "sp_table_open"  # expander open state
SP_SAMPLE_APPLIED = "sp_sample_applied"  # not a widget: the sample last copied into the prompt
SP_SNAPSHOT = "sp_snapshot"  # not a widget: (inputs, SparsitySnapshot) of the last run in this session

# ---- Accuracy ---------------------------------------------------------------------------
ACC_KIND = "acc_kind"
ACC_TASK = "acc_task"
ACC_LIMIT = "acc_limit"
ACC_SELECTION = "acc_selection"
ACC_PLACEMENT = "acc_placement"
ACC_SDC = "acc_sdc"
ACC_SDC_SCALE = "acc_sdc_scale"
ACC_VMC = "acc_vmc"
ACC_CAPK = "acc_capk"
ACC_K = "acc_k"
ACC_RUN = "acc_run"  # button
ACC_LAST = "acc_last"  # not a widget: summary DataFrame of this session's last evaluation

# ---- Compare ----------------------------------------------------------------------------
CMP_SAMPLE = "cmp_sample"
CMP_PROMPT = "cmp_prompt"
CMP_MAX_NEW = "cmp_max_new"
CMP_CHAT = "cmp_chat"
CMP_RUN = "cmp_run"  # button
CMP_STOP = "cmp_stop"  # button
CMP_SAMPLE_APPLIED = "cmp_sample_applied"  # not a widget: the sample last copied into the prompt
CMP_LAST = "cmp_last"  # not a widget: list of GenStep rows of this session's last comparison

# ---- Kernels ----------------------------------------------------------------------------
KER_RUN = "ker_run"  # button
KER_OPEN = "ker_open"  # prefix of the result expanders' keys (open state)


# ---- sparse-config controls (shared by Sparsity, Accuracy, Compare) ---------------------
CONFIG_FIELDS = ("selection", "placement", "sdc", "sdc_scale", "vmc", "capk", "k", "empty_row")


def config_keys(prefix: str) -> dict[str, str]:
    """Widget keys of the sparse-config controls of one page, e.g. ``config_keys("acc")["sdc"] == "acc_sdc"``."""
    return {f: f"{prefix}_{f}" for f in CONFIG_FIELDS}
