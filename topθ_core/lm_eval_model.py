"""Top-θ as an lm-evaluation-harness model backend: ``--model toptheta``.

:class:`TopThetaLM` is lm-eval's own ``hf`` backend (``HFLM``) around a model loaded by
:func:`topθ_core.models.load_model`, with every model call (log-likelihoods, rolling
log-likelihoods, generation) run inside :func:`topθ_core.integration.sparse_run`.  lm-eval
tokenizes, batches and scores; this module only chooses the attention.  So any lm-eval task
runs under Top-θ, and ``selection=dense`` is the ``hf`` backend on the same weights.

Model arguments (``--model_args key=value,...``; values as lm-eval parses them):

* ``pretrained``: ``smollm2`` (the bundled model) or a local checkpoint directory;
  ``device`` (default and ``cuda*`` without CUDA: ``cuda`` when available, else ``cpu``), ``dtype`` (``float32``,
  ``bfloat16``, ``float16``, ``float64``; default ``float32``).  From Python it may also be a
  :class:`~topθ_core.models.LoadedModel` (then used as it is, shared with other callers).
* ``thresholds``: a threshold artifact directory (needed for ``selection=top-theta``); one
  calibrated for another model is refused with the engine's one-line error.
* Every :class:`~topθ_core.config.SparseConfig` field: ``selection``, ``placement``, ``sdc``,
  ``sdc_scale``, ``vmc``, ``capk``, ``empty_row``, ``k`` (with ``layer_k`` and ``head_k``,
  e.g. ``layer_k='0:512,1:512'`` quoted inside ``--model_args``, or ``0:512;1:512``),
  ``lookup``, ``sink_tokens``, ``recent_tokens``, ``theta_smoothing``, ``theta_reference``.
  Unset ones follow ``toptheta evaluate``: k schedule, placement and kind of θ from the
  thresholds; SDC ``exact`` (``none`` post-softmax); VMC on unless pre-softmax without SDC.
  A combination that is given explicitly and invalid is a ConfigError, never adjusted.
* ``use_kernels`` (Triton kernels on CUDA for configs they implement), ``metrics`` (count
  what is kept; reported in the results' ``config``), and HFLM's ``batch_size``,
  ``max_batch_size``, ``max_length``, ``add_bos_token``, ``prefix_token_id``, ``truncation``,
  ``logits_cache``, ``softmax_dtype``, ``think_end_token``, ``enable_thinking``,
  ``chat_template_args``.  Any other argument is refused.

lm-eval 0.4.13 resolves ``--model`` names against its own registry before any user code
runs, so its plain ``lm_eval`` command cannot find a backend of another package; releases
with lm-eval's plugin registry find this one through the ``lm_eval.models`` entry point
declared in ``pyproject.toml``.  Until then ``toptheta-lm-eval`` (:func:`main`) is lm-eval's
own command line with this module imported first; from Python, ``import
topθ_core.lm_eval_model`` and call ``lm_eval.simple_evaluate(model="toptheta", ...)``.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .config import (SDC, ConfigError, KSchedule, PAPER_K, Placement, Selection, SparseConfig, ThetaReference,
                     enum_value)
from .integration import sparse_run
from .metrics import SparsityMetrics, summarize
from .models import load_model
from .thresholds import load_thresholds

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TopThetaLM", "sparse_config_from_args", "sample_table", "main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
#: HFLM arguments that mean something for a model loaded here (the rest load or place weights).
HFLM_ARGS = ("batch_size", "max_batch_size", "max_length", "add_bos_token", "prefix_token_id", "truncation",
             "logits_cache", "softmax_dtype", "think_end_token", "enable_thinking", "chat_template_args")


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _coerce(name: str, value, default):
    """A model-argument value as the type of the SparseConfig field's default (Enum, bool, int, float)."""
    if isinstance(default, enum.Enum):
        return enum_value(type(default), name, value)
    if isinstance(default, bool):
        return _flag(name, value)
    if isinstance(default, int):
        return _count(name, value)
    if isinstance(default, float):
        return _number(name, value)
    return value


def _schedule(text) -> str | None:
    return None if text is None else str(text).replace(";", ",")  # ';' survives lm-eval's comma split


#: model arguments that build the SparseConfig: its fields plus the k schedule's per-layer / per-head parts
SPARSE_ARGS = tuple(f.name for f in dataclasses.fields(SparseConfig)) + ("layer_k", "head_k")


def sparse_config_from_args(thresholds=None, *, k=None, layer_k=None, head_k=None, placement=None, sdc=None,
                            vmc=None, theta_reference=None, **fields) -> SparseConfig:
    """The :class:`SparseConfig` of lm-eval model arguments (strings, numbers or booleans): every
    field of the dataclass by its name, plus ``layer_k`` / ``head_k`` for the k schedule.

    Unset fields take the dataclass default, except those ``toptheta evaluate`` derives (see the
    module docstring): k schedule, placement and kind of θ from ``thresholds``, SDC, VMC.
    """
    defaults = SparseConfig()
    unknown = sorted(set(fields) - set(SPARSE_ARGS))
    if unknown:
        raise ConfigError(f"{unknown} are not SparseConfig fields; they are: {', '.join(SPARSE_ARGS)}")
    values = {name: _coerce(name, v, getattr(defaults, name)) for name, v in fields.items()}
    selection = values.setdefault("selection", defaults.selection)
    if k is not None:
        values["k"] = KSchedule.parse(_count("k", k), _schedule(layer_k), _schedule(head_k))
    else:
        base = thresholds.k if thresholds is not None else PAPER_K
        values["k"] = KSchedule.parse(base.default,
                                      _schedule(layer_k) if layer_k is not None else dict(base.overrides),
                                      _schedule(head_k) if head_k is not None else dict(base.head_overrides))
    if placement is None:
        placement = thresholds.placement if thresholds is not None else Placement.PRE
    place = values["placement"] = enum_value(Placement, "placement", placement)
    if sdc is None:
        sdc = SDC.EXACT if place is Placement.PRE else SDC.NONE
    values["sdc"] = enum_value(SDC, "sdc", sdc)
    values["vmc"] = (place is Placement.POST or values["sdc"] is not SDC.NONE) if vmc is None else _flag("vmc", vmc)
    if theta_reference is None:
        theta_reference = thresholds.theta_reference if thresholds is not None and selection is Selection.TOP_THETA \
            else ThetaReference.ABSOLUTE
    values["theta_reference"] = enum_value(ThetaReference, "theta_reference", theta_reference)
    return SparseConfig(**values)


@register_model("toptheta")
class TopThetaLM(HFLM):
    """lm-eval's HFLM whose model calls run under a Top-θ :class:`SparseConfig` (arguments: module docstring)."""

    def __init__(self, pretrained="smollm2", thresholds: str | None = None, *, device: str | None = None,
                 dtype: str = "float32", use_kernels: bool = True, metrics: bool = True, **args: Any) -> None:
        unknown = sorted(set(args) - set(SPARSE_ARGS) - set(HFLM_ARGS))
        if unknown:
            raise ConfigError(f"toptheta does not take model argument(s) {unknown}; it takes pretrained, thresholds, "
                              f"device, dtype, use_kernels, metrics, {', '.join(SPARSE_ARGS)}, {', '.join(HFLM_ARGS)}")
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not one of: {', '.join(_DTYPES)}")
        if hasattr(pretrained, "model") and hasattr(pretrained, "fingerprint"):  # a LoadedModel (Python API)
            lm = pretrained
        else:
            if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                # lm-eval's command line passes cuda:0 unless told otherwise; its hf backend then falls back too
                device = "cuda" if torch.cuda.is_available() else "cpu"
            lm = load_model(pretrained, device=device, dtype=_DTYPES[dtype])
        th = load_thresholds(thresholds, expect_model=lm.fingerprint) if thresholds else None
        self.sparse_config = sparse_config_from_args(th, **{a: v for a, v in args.items() if a in SPARSE_ARGS})
        with sparse_run(self.sparse_config, th, model=lm.model):  # refuses a bad config before any request
            pass
        self.thresholds, self.thresholds_path = th, str(thresholds) if thresholds else None
        self.loaded = lm
        self.use_kernels = _flag("use_kernels", use_kernels)
        # dense selection without metrics is the model's own sdpa; metrics would route it through the reference
        count = _flag("metrics", metrics) and self.sparse_config.selection is not Selection.DENSE
        self.sparsity = SparsityMetrics() if count else None
        super().__init__(pretrained=lm.model, tokenizer=lm.tokenizer, backend="causal",
                         **{a: v for a, v in args.items() if a in HFLM_ARGS})

    def _sparse(self):
        if self.sparse_config.selection is Selection.DENSE and self.sparsity is None:
            return nullcontext()  # outside a run the prepared model is its own sdpa, bit for bit
        return sparse_run(self.sparse_config, self.thresholds, metrics=self.sparsity, use_kernels=self.use_kernels)

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self._sparse():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self._sparse():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        """Provenance for lm-eval's results ``config`` (no hub look-up): model, config, thresholds, kept fractions.

        Kept fractions pool every row the model computed, all layers: with ``batch_size`` above 1
        that includes the right-padding positions lm-eval adds to batched log-likelihood requests.
        """
        info = {"model_name": self.loaded.name, "model_fingerprint": self.loaded.fingerprint.describe(),
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype),
                "toptheta_config": self.sparse_config.label(),
                "toptheta_config_json": self.sparse_config.to_dict(),
                "thresholds": self.thresholds_path}
        if self.sparsity is not None:
            frame = self.sparsity.to_frame()
            for phase in ("prefill", "decode"):
                if len(frame) and (frame["phase"] == phase).any():
                    s = summarize(frame, phase)
                    info[f"kept_attention_{phase}"] = s["kept_attention"]
                    info[f"kept_v_rows_{phase}"] = s["kept_v_rows"]
            info["kept_fractions_include_padding"] = str(self.batch_size) != "1"
        return info


def sample_table(samples: list[dict]) -> "pd.DataFrame":
    """lm-eval's per-sample log of one log-likelihood task (``results["samples"][task]`` with
    ``log_samples=True``) as one row per document, in ``doc_id`` order: ``doc_id``, ``ll``
    (summed log-likelihood per request: per choice, or the one target), ``greedy`` (per request)
    and every per-document metric lm-eval computed (``acc``, ``acc_norm``, ``perplexity``, …).

    Pairing two runs' tables on ``doc_id`` (dense vs Top-θ) gives per-item deltas.
    """
    import pandas as pd

    rows = []
    for s in samples:
        resps = [r[0] if isinstance(r, (list, tuple)) and r and isinstance(r[0], (list, tuple)) else r
                 for r in s["resps"]]
        row = {"doc_id": int(s["doc_id"]), "ll": [float(r[0]) for r in resps], "greedy": [bool(r[1]) for r in resps]}
        row.update({m: s[m] for m in s.get("metrics", []) if m in s})
        rows.append(row)
    return pd.DataFrame(rows).sort_values("doc_id", kind="stable").reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    """``toptheta-lm-eval``: lm-eval's own command line (same arguments) with ``--model toptheta`` registered.

    Bad model arguments (missing model, thresholds of another model, invalid config) are one
    line on stderr and exit status 2, as with ``toptheta``.
    """
    from lm_eval.__main__ import cli_evaluate

    from .models import ModelLoadError
    from .thresholds import ThresholdsError

    if argv is not None:
        sys.argv[1:] = list(argv)
    try:
        cli_evaluate()
    except (ModelLoadError, ThresholdsError, ConfigError) as e:
        print(f"toptheta-lm-eval: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
