"""Top-θ attention: calibrated-threshold sparse attention for transformers causal LMs.

    lm = load_model("smollm2")                       # or a local checkpoint directory
    th = calibrate(lm, texts, CalibrationConfig(k=KSchedule.parse(64, "0:512,1:512"), tac=True))
    th.save("runs/k64")
    with sparse_run(SparseConfig(k=th.k), th, model=lm.model, metrics=SparsityMetrics()) as run:
        logits = lm.model(ids).logits               # sparse; outside the block the model is dense
    run.metrics.to_frame()

The reference attention is :func:`topθ_attention_ref` (``attention.py``); the Triton kernels
in ``kernels/`` are tested against it.
"""

from .attention import topθ_attention_ref
from .calibration import CalibrationCancelled, calibrate
from .config import (SDC, CalibrationConfig, ConfigError, EmptyRowFloor, KSchedule, Lookup, Placement, Selection,
                     SparseConfig, ThetaReference)
from .integration import prepare_model, sparse_run
from .metrics import SparsityMetrics
from .models import load_model
from .thresholds import Thresholds, ThresholdsError, load_thresholds

__all__ = [
    "SDC", "CalibrationCancelled", "CalibrationConfig", "ConfigError", "EmptyRowFloor", "KSchedule", "Lookup",
    "Placement", "Selection", "SparseConfig", "SparsityMetrics", "ThetaReference", "Thresholds", "ThresholdsError",
    "calibrate",
    "load_model", "load_thresholds", "prepare_model", "sparse_run", "topθ_attention_ref",
]
