"""Every ``st.session_state`` key the app uses, in one module.

Widget keys are prefixed by their page so two pages never share a widget by accident.
Values that are not widgets (results, flags) say so in their comment.  :data:`SETTINGS` lists the
settings that outlive a page switch and live in the URL (``explorer_ui.state``), with their types.
"""

# ---- sidebar (every page) -------------------------------------------------------------
MODEL_CHOICE = "sb_model_choice"  # "bundled" | "local"
MODEL_PATH = "sb_model_path"  # local checkpoint path (text input)
DEVICE = "sb_device"
DTYPE = "sb_dtype"
ACTIVE_RUN = "sb_active_run"  # name of the active threshold set (selectbox)
ACTIVE_BY_MODEL = "sb_active_by_model"  # not a widget: {model digest: active run name}, kept across model switches
JOBS = "app_jobs"  # not a widget: this session's JobBoard (background calibration, evaluation, generation)
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
SP_ROW = "sp_row"  # the query row inspected below the maps
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
ACC_CANCEL = "acc_cancel"  # button
ACC_LIVE = "acc_live"  # re-run automatically when a setting changes
ACC_TOKEN_CAP = "acc_token_cap"  # perplexity: tokens in all, at most
ACC_MATRIX_SDC = "acc_matrix_sdc"  # variant matrix: SDC variants (multiselect)
ACC_MATRIX_VMC = "acc_matrix_vmc"  # variant matrix: VMC on/off (multiselect)
ACC_MATRIX_K = "acc_matrix_k"  # variant matrix: k values (text, e.g. "32,64")

# ---- Compare ----------------------------------------------------------------------------
CMP_SAMPLE = "cmp_sample"
CMP_PROMPT = "cmp_prompt"
CMP_MAX_NEW = "cmp_max_new"
CMP_CHAT = "cmp_chat"
CMP_RUN = "cmp_run"  # button
CMP_STOP = "cmp_stop"  # button
CMP_SAMPLE_APPLIED = "cmp_sample_applied"  # not a widget: the sample last copied into the prompt

# ---- Kernels ----------------------------------------------------------------------------
KER_RUN = "ker_run"  # button
KER_RAW_OPEN = "ker_raw_open"  # expander open state (raw result files)
KER_FILE = "ker_file"  # the raw result file drawn (selectbox)
KER_AXES = "ker_axes"  # prefix of the raw table's chart pickers: f"{KER_AXES}_x_{file}", …_y_…, …_group_…

# ---- Thresholds: save the chosen σ as a new set ------------------------------------------
TH_SAVE_NAME = "th_save_name"
TH_SAVE = "th_save"  # button
TH_SAVED = "th_saved"  # not a widget: ("ok" | "error", message) of the last save, shown once

# ---- Runs ----------------------------------------------------------------------------------
RUNS_PICK = "runs_pick"  # the saved threshold set the actions apply to
RUNS_NEW_NAME = "runs_new_name"
RUNS_RENAME = "runs_rename"  # button
RUNS_DELETE_CONFIRM = "runs_delete_confirm"
RUNS_DELETE = "runs_delete"  # button
RUNS_IMPORT_OPEN = "runs_import_open"  # expander open state (import a zip)
RUNS_UPLOAD = "runs_upload"  # prefix of the zip uploader's key (+ a counter: a new uploader after an import)
RUNS_UPLOADS = "runs_uploads"  # not a widget: that counter
RUNS_IMPORT_NAME = "runs_import_name"
RUNS_IMPORT = "runs_import"  # button
RUNS_RESULT = "runs_result"  # the saved result file shown
RUNS_RESULT_DELETE_CONFIRM = "runs_result_delete_confirm"
RUNS_RESULT_DELETE = "runs_result_delete"  # button
RUNS_MESSAGE = "runs_message"  # not a widget: ("ok" | "warning" | "error", message) of the last action


# ---- sparse-config controls (shared by Sparsity, Accuracy, Compare) ---------------------
CONFIG_FIELDS = ("selection", "placement", "sdc", "sdc_scale", "vmc", "capk", "k", "empty_row", "prefill")
_CONFIG_TYPES = dict(selection=str, placement=str, sdc=str, sdc_scale=float, vmc=bool, capk=bool, k=int, empty_row=str,
                     prefill=str)


def config_keys(prefix: str) -> dict[str, str]:
    """Widget keys of the sparse-config controls of one page, e.g. ``config_keys("acc")["sdc"] == "acc_sdc"``."""
    return {f: f"{prefix}_{f}" for f in CONFIG_FIELDS}


# ---- settings that survive page switches and reloads, and live in the URL ----------------
def _settings() -> dict[str, tuple[str, type]]:
    out: dict[str, tuple[str, type]] = {}

    def add(page: str, **keys: type) -> None:
        for key, kind in keys.items():
            out[globals()[key]] = (page, kind)

    add("sidebar", MODEL_CHOICE=str, MODEL_PATH=str, DEVICE=str, DTYPE=str, ACTIVE_RUN=str)
    add("calibrate", CAL_SOURCE=str, CAL_CORPUS=str, CAL_TASK=str, CAL_DOCS=int, CAL_MAX_TOKENS=int, CAL_K=int,
        CAL_NEAR_DENSE=bool, CAL_SIGMA=float, CAL_AGGREGATION=str, CAL_REFERENCE=str, CAL_PLACEMENT=str,
        CAL_TAC=bool, CAL_SAMPLE_FRAC=float, CAL_BIN_WIDTH=int, CAL_SDC=str, CAL_VMC=bool, CAL_NAME=str)
    add("thresholds", TH_RUN=str, TH_OVERLAY=str, TH_LAYER=int, TH_HEADS=list, TH_LENGTH=int, TH_SIGMA=float)
    add("sparsity", SP_SAMPLE=str, SP_PROMPT=str, SP_MAX_TOKENS=int, SP_LAYER=int, SP_HEAD=int, SP_DECODE=int)
    add("accuracy", ACC_KIND=str, ACC_TASK=str, ACC_LIMIT=int, ACC_LIVE=bool, ACC_TOKEN_CAP=int, ACC_MATRIX_SDC=list,
        ACC_MATRIX_VMC=list, ACC_MATRIX_K=str)
    add("compare", CMP_SAMPLE=str, CMP_PROMPT=str, CMP_MAX_NEW=int, CMP_CHAT=bool)
    for page, prefix in (("sparsity", "sp"), ("accuracy", "acc"), ("compare", "cmp")):
        for f, key in config_keys(prefix).items():
            out[key] = (page, _CONFIG_TYPES[f])
    add("kernels", KER_FILE=str)
    add("runs", RUNS_PICK=str, RUNS_RESULT=str)
    return out


SETTINGS: dict[str, tuple[str, type]] = _settings()
