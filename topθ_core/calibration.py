"""Calibration: run the model on text, record per-row threshold samples, aggregate θ.

For every attention call, every (layer, head) and every sampled row with ``L > k[layer, head]``
the sample is ``t = (k+1)-th largest visible score`` (so "keep > t" keeps exactly k), in
logit space for pre-softmax placement, in probability space for post-softmax; with
``theta_reference = row-max`` it is ``t − m``, ``m`` the row's largest visible logit.  Beside
it goes the dropped mass ``D_U = Σ_{visible j, a_ij ≤ t} e^(a_ij − m_i)`` for offline SDC.
Statistics accumulate in a mergeable :class:`~topθ_core.statistics.ThresholdStats` (with a
sample reservoir when ``config.aggregation`` is median or trimmed-mean); ``θ = location +
σ·scale`` (mean and std by default) is formed only at the end (:meth:`ThresholdStats.finalize`).

With top-k at calibration (TAC) each thresholded row is replaced by its exact top-k
(with exact SDC standing in for offline SDC, and VMC as configured), so later layers are
calibrated on the activations they will see.  Row sampling takes a fraction of the
eligible rows of each call, weighted towards the length bins seen least so far.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch

from .attention import RowBlock
from .config import CalibrationConfig, Placement, SdcSource, SparseConfig, Selection, ThetaReference
from .fingerprint import model_fingerprint
from .integration import sparse_run
from .models import as_module, base_model, model_device
from .row_samples import row_samples_ref
from .statistics import ThresholdStats
from .thresholds import Thresholds

ProgressFn = Callable[[int, int], None]


class CalibrationCancelled(RuntimeError):
    """Raised when the ``should_stop`` callback asks calibration to stop; nothing is written."""


class CalibrationObserver:
    """Observer that feeds :class:`ThresholdStats` from the attention's row blocks."""

    accepts_key_prefix = True  # per-row samples: causal chunks may hand over only their visible key prefix

    def __init__(self, stats: ThresholdStats, config: CalibrationConfig, generator: torch.Generator | None = None):
        self.stats, self.config = stats, config
        self.generator = generator or torch.Generator().manual_seed(config.seed)

    def _sample(self, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """Indices of rows to record among ``lengths`` (n,), biased to the least-seen bins."""
        n = lengths.numel()
        take = math.ceil(self.config.sample_frac * n)
        if take >= n:
            return torch.arange(n, device=lengths.device)
        counts = self.stats.bin_counts(layer)
        bins = torch.div(lengths.cpu() - 1, self.stats.bin_width, rounding_mode="floor")
        seen = torch.where(bins < counts.numel(), counts.cpu()[bins.clamp(max=counts.numel() - 1)], torch.zeros(()))
        weights = 1.0 / (1.0 + seen.to(torch.float64))
        idx = torch.multinomial(weights, take, replacement=False, generator=self.generator)
        return idx.sort().values.to(lengths.device)

    def __call__(self, layer: int, block: RowBlock) -> None:
        k = block.k  # the smallest head k of the layer: rows no longer than it are no head's sample
        L = block.row_len[:, 0]  # (B, R)
        eligible = torch.nonzero(L > k, as_tuple=False)  # (n, 2): batch, row
        if eligible.numel() == 0:
            return
        lengths = L[eligible[:, 0], eligible[:, 1]]
        pick = self._sample(layer, lengths)
        eligible, lengths = eligible[pick], lengths[pick]
        b, r = eligible[:, 0], eligible[:, 1]
        k_heads = block.k_heads  # (H,) or None
        if block.kth_next is not None and block.dropped_mass is not None and self.config.placement is Placement.PRE:
            # top-k at calibration (exact SDC) already found the (k+1)-th largest logit and D_U of each row
            t, d_u = block.kth_next[b, :, r], block.dropped_mass[b, :, r]
        else:
            t, d_u = row_samples_ref(block.logits[b, :, r], k + 1 if k_heads is None else k_heads + 1,
                                     self.config.placement)
        if self.config.theta_reference is ThetaReference.ROW_MAX:
            t = t - block.logits[b, :, r].amax(-1)  # (n, H): the sample relative to its row's maximum
        if k_heads is None:
            self.stats.add(layer, lengths, t, d_u)
        else:  # a row is a sample of the heads whose k it exceeds
            self.stats.add(layer, lengths, t, d_u, mask=lengths.unsqueeze(-1) > k_heads.view(1, -1))


class ThetaDroppedMass:
    """Observer for the second calibration pass (``sdc_source=theta``): the dropped mass of Top-θ.

    For every thresholded row (``L > k``) it records ``D_U = Σ_{visible j ∉ S} e^(a_ij − m_i)``
    of the set the running selection actually dropped (floor and always-kept positions
    included), into ``stats.du_sum`` / ``stats.count`` per (layer, head, length bin).
    """

    accepts_key_prefix = True

    def __init__(self, stats: ThresholdStats):
        self.stats = stats

    def __call__(self, layer: int, block: RowBlock) -> None:
        L = block.row_len[:, 0]  # (B, R)
        eligible = torch.nonzero(L > block.k, as_tuple=False)
        if eligible.numel() == 0 or block.exp_scores is None:
            return
        b, r = eligible[:, 0], eligible[:, 1]
        dropped = block.visible & ~block.kept  # (B, H, R, N)
        d_u = (block.exp_scores * dropped).sum(-1)  # (B, H, R)
        d_u = d_u[b, :, r]  # (n, H)
        if block.k_heads is None:
            self.stats.add(layer, L[b, r], torch.zeros_like(d_u), d_u)
        else:
            self.stats.add(layer, L[b, r], torch.zeros_like(d_u), d_u, mask=L[b, r].unsqueeze(-1) > block.k_heads.view(1, -1))


def run_documents(model: torch.nn.Module, documents: Sequence[torch.Tensor], config: SparseConfig,
                  thresholds: Thresholds | None = None, *, observers: tuple = (), progress: ProgressFn | None = None,
                  should_stop: Callable[[], bool] | None = None, decode_tokens: int = 0) -> None:
    """Run the decoder (no LM head: logits are not needed) over each document, batch 1, inside one
    sparse run of ``config`` whose ``observers`` see every attention call.

    ``progress(done_tokens, total_tokens)`` after each document; ``should_stop()`` returning True
    raises :class:`CalibrationCancelled`.  With ``decode_tokens > 0`` each document is continued
    greedily for that many tokens instead, so decode rows (one query row a step) are observed too.
    """
    device, base = model_device(model), base_model(model)
    total, done = sum(int(d.numel()) for d in documents), 0
    if progress:
        progress(0, total)
    with torch.inference_mode(), sparse_run(config, thresholds, observers=observers):
        for ids in documents:
            if should_stop is not None and should_stop():
                raise CalibrationCancelled("calibration cancelled")
            if decode_tokens > 0:
                model.generate(ids.view(1, -1).to(device), max_new_tokens=decode_tokens, do_sample=False,
                               min_new_tokens=decode_tokens, pad_token_id=0)
            else:
                base(input_ids=ids.view(1, -1).to(device), use_cache=False)
            done += int(ids.numel())
            if progress:
                progress(done, total)


def calibrate_sdc_under_theta(model, documents: Sequence[torch.Tensor], thresholds: Thresholds,
                              config: SparseConfig | None = None, *, progress: ProgressFn | None = None,
                              should_stop: Callable[[], bool] | None = None) -> Thresholds:
    """Second calibration pass: run Top-θ with ``thresholds`` and recalibrate the offline SDC term.

    ``C[ℓ, h, L]`` becomes the mean dropped mass ``D_U`` of the set Top-θ itself drops (not
    the exact top-k's): the compensation then matches what inference leaves out.  ``config``
    is the Top-θ inference config to run (default: pre-softmax, offline SDC with the current
    terms, the thresholds' k schedule and VMC).  Returns new :class:`Thresholds` with the
    same θ statistics and ``meta["sdc_source"] = "theta"``.
    """
    model = as_module(model)
    fp = model_fingerprint(model)
    thresholds.check_model(fp)
    if config is None:
        config = SparseConfig(selection=Selection.TOP_THETA, placement=Placement.PRE, sdc="offline", vmc=True,
                              k=thresholds.k, theta_reference=thresholds.theta_reference)
    if config.selection is not Selection.TOP_THETA or config.placement is not Placement.PRE:
        raise ValueError("the SDC pass runs pre-softmax Top-θ selection")
    stats = ThresholdStats(fp.n_layers, fp.n_heads, thresholds.bin_width, device=model_device(model))
    run_documents(model, documents, config, thresholds, observers=(ThetaDroppedMass(stats),), progress=progress,
                  should_stop=should_stop)
    count, du_sum = stats.count.cpu(), stats.du_sum.cpu()
    nb = min(count.shape[-1], thresholds.sdc_mean.shape[-1])
    old = thresholds.sdc_mean[..., :nb]
    new = torch.where(count[..., :nb] > 0, du_sum[..., :nb] / count[..., :nb].clamp_min(1), old)
    return thresholds.with_sdc(new, "theta", sdc_pass_config=config.to_dict())


def tokenize_documents(tokenizer, texts: Sequence[str], max_length: int | None = None,
                       add_special_tokens: bool = True) -> list[torch.Tensor]:
    """Token ids per document (1-D LongTensors), truncated to ``max_length``; empty ones dropped."""
    docs = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids[0]
        if max_length is not None:
            ids = ids[:max_length]
        if ids.numel() > 1:
            docs.append(ids)
    return docs


def prepare_documents(data, tokenizer=None, max_length: int | None = None,
                      add_special_tokens: bool = True) -> list[torch.Tensor]:
    """Texts (tokenized) or token-id sequences → 1-D LongTensors truncated to ``max_length``."""
    if len(data) == 0:
        raise ValueError("calibration data is empty")
    if isinstance(data[0], str):
        if tokenizer is None:
            raise ValueError("text data needs a tokenizer")
        docs = tokenize_documents(tokenizer, data, max_length, add_special_tokens)
    else:
        docs = [torch.as_tensor(d).view(-1)[:max_length] for d in data]
    if not docs:
        raise ValueError("calibration data has no document of two or more tokens")
    return docs


def collect_stats(model: torch.nn.Module, documents: Sequence[torch.Tensor], config: CalibrationConfig, *,
                  stats: ThresholdStats | None = None, progress: ProgressFn | None = None,
                  should_stop: Callable[[], bool] | None = None, decode_tokens: int = 0) -> ThresholdStats:
    """Accumulate statistics over tokenized documents (one forward of the base model each).

    With ``decode_tokens > 0`` each document is instead continued greedily for that many
    tokens, so decode rows (one query row a step over the KV cache) are calibrated too.
    """
    fp = model_fingerprint(model)
    config.k.validate(fp.n_layers, fp.n_heads)  # refuses layers or heads the model lacks
    if stats is None:
        stats = ThresholdStats.for_config(fp.n_layers, fp.n_heads, config, device=model_device(model))
    elif config.aggregation.needs_samples and stats.samples is None:
        raise ValueError(f"aggregation={config.aggregation.value} needs a sample reservoir, which the given "
                         "statistics lack: create them with ThresholdStats.for_config(..., config)")
    run_cfg = config.tac_config() if config.tac else SparseConfig(selection=Selection.DENSE, k=config.k, sdc="none", vmc=False)
    run_documents(model, documents, run_cfg, observers=(CalibrationObserver(stats, config),), progress=progress,
                  should_stop=should_stop, decode_tokens=decode_tokens)
    return stats


def calibrate(model, data: Sequence[str] | Sequence[torch.Tensor], config: CalibrationConfig | None = None, *,
              tokenizer=None, max_length: int | None = None, add_special_tokens: bool = True,
              progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
              data_description: str = "", decode_tokens: int = 0,
              sdc_config: SparseConfig | None = None) -> Thresholds:
    """Calibrate Top-θ thresholds for ``model`` on ``data``.

    ``model`` is a prepared transformers causal LM or a :class:`~topθ_core.models.LoadedModel`;
    ``data`` is a list of texts (tokenized with ``tokenizer`` or the LoadedModel's) or of 1-D
    token-id tensors.  ``progress(done_tokens, total_tokens)`` is called after each document;
    ``should_stop()`` returning True cancels with :class:`CalibrationCancelled`.
    ``decode_tokens``: also calibrate that many greedy decode steps per document.
    With ``config.sdc_source = theta`` a second pass (:func:`calibrate_sdc_under_theta`) runs
    ``sdc_config`` (default :meth:`CalibrationConfig.theta_pass_config`) over the same documents
    and replaces the offline SDC terms.
    """
    config = config or CalibrationConfig()
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    model = as_module(model)
    docs = prepare_documents(data, tokenizer, max_length, add_special_tokens)
    longest = max(int(d.numel()) for d in docs)
    fp = model_fingerprint(model)
    ks = config.k.as_list(fp.n_layers) + [k for _, k in config.k.head_overrides]
    if longest <= min(ks):
        raise ValueError(f"every calibration document is at most {longest} tokens, not longer than the smallest "
                         f"k ({min(ks)}): no row would be thresholded; use longer texts or a smaller k")
    t0 = time.perf_counter()
    stats = collect_stats(model, docs, config, progress=progress, should_stop=should_stop,
                          decode_tokens=decode_tokens)
    tokens = sum(int(d.numel()) for d in docs)
    th = stats.finalize(config.sigma, fingerprint=fp, k=config.k, placement=config.placement, calibration=config,
                        data=data_description, extra={"documents": len(docs), "tokens": tokens})
    if config.sdc_source is SdcSource.THETA:
        th = calibrate_sdc_under_theta(model, docs, th, sdc_config or config.theta_pass_config(),
                                       should_stop=should_stop)
    th.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return th
