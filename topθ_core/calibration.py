"""Calibration: run the model on text, record per-row threshold samples, aggregate θ.

For every attention call, every (layer, head) and every sampled row with ``L > k[layer, head]``
the sample is ``t = (k+1)-th largest visible score`` (so "keep > t" keeps exactly k), in
logit space for pre-softmax placement, in probability space for post-softmax; with
``theta_reference = row-max`` it is ``t − m``, ``m`` the row's largest visible logit.  Beside
it goes the dropped mass ``D_U = Σ_{visible j, a_ij ≤ t} e^(a_ij − m_i)`` for offline SDC.
Statistics accumulate in a mergeable :class:`~topθ_core.thresholds.ThresholdStats` (with a
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
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .attention import RowBlock
from .config import CalibrationConfig, ConfigError, KSchedule, Placement, SdcSource, SparseConfig, Selection, ThetaReference
from .integration import model_fingerprint, sparse_run
from .thresholds import ThresholdStats, Thresholds

ProgressFn = Callable[[int, int], None]


class CalibrationCancelled(RuntimeError):
    """Raised when the ``should_stop`` callback asks calibration to stop; nothing is written."""


def row_samples_ref(logits: torch.Tensor, kth: "int | torch.Tensor", placement: Placement = Placement.PRE
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row threshold sample and dropped mass, reference.

    ``logits`` (..., H, N) with ``-inf`` at invisible keys; rows must have at least ``kth``
    visible keys.  ``kth`` is one int or (H,) per head.  Returns ``t`` (..., H) the
    ``kth``-largest score (logit for pre, dense probability for post) and ``d_u`` (..., H)
    ``Σ_{a ≤ t} e^(a − m)`` over visible keys.
    """
    m = logits.amax(-1, keepdim=True)
    e = torch.exp(logits - m)
    if placement is Placement.POST:
        scores = e / e.sum(-1, keepdim=True)
        scores = torch.where(torch.isfinite(logits), scores, torch.full_like(scores, -1.0))
    else:
        scores = logits
    if torch.is_tensor(kth):
        width = min(int(kth.max()), scores.shape[-1])
        values = scores.topk(width, dim=-1).values  # (..., H, width), descending
        idx = (kth.to(values.device).clamp(max=width) - 1).view(-1, 1).expand(*values.shape[:-1], 1)
        t = values.gather(-1, idx).squeeze(-1)
    else:
        t = scores.topk(kth, dim=-1).values[..., -1]
    d_u = (e * (scores <= t.unsqueeze(-1))).sum(-1)
    return t, d_u


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


class DroppedMassObserver:
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
    if hasattr(model, "tokenizer") and hasattr(model, "model"):
        model = model.model
    fp = model_fingerprint(model)
    thresholds.check_model(fp)
    if config is None:
        config = SparseConfig(selection=Selection.TOP_THETA, placement=Placement.PRE, sdc="offline", vmc=True,
                              k=thresholds.k, theta_reference=thresholds.theta_reference)
    if config.selection is not Selection.TOP_THETA or config.placement is not Placement.PRE:
        raise ValueError("the SDC pass runs pre-softmax Top-θ selection")
    device = next(model.parameters()).device
    stats = ThresholdStats(fp.n_layers, fp.n_heads, thresholds.bin_width, device=device)
    observer = DroppedMassObserver(stats)
    base = getattr(model, model.base_model_prefix, model)
    total, done = sum(int(d.numel()) for d in documents), 0
    with torch.inference_mode(), sparse_run(config, thresholds, observers=(observer,)):
        for ids in documents:
            if should_stop is not None and should_stop():
                raise CalibrationCancelled("calibration cancelled")
            base(input_ids=ids.view(1, -1).to(device), use_cache=False)
            done += int(ids.numel())
            if progress:
                progress(done, total)
    count, du_sum = stats.count.cpu(), stats.du_sum.cpu()
    nb = min(count.shape[-1], thresholds.sdc_mean.shape[-1])
    old = thresholds.sdc_mean[..., :nb]
    new = torch.where(count[..., :nb] > 0, du_sum[..., :nb] / count[..., :nb].clamp_min(1), old)
    return thresholds.with_sdc(new, "theta", sdc_pass_config=config.to_dict())


class MassSpreadObserver:
    """Observer: per (layer, head), how many elements a row needs to reach a share of its softmax mass.

    For every row with ``L > k[layer]`` it counts the fewest largest elements whose dense
    softmax probabilities sum to at least ``mass`` and accumulates the count per (layer, head):
    ``count[l, h] / rows[l]`` is the head's mean spread.  Reads the logits of the block, so it
    is exact for any selection the run uses (run it dense: the model's own attention).
    """

    accepts_key_prefix = True

    def __init__(self, n_layers: int, n_heads: int, ks: Sequence[int], mass: float = 0.9):
        if not (0.0 < mass <= 1.0):
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        self.ks, self.mass = list(ks), float(mass)
        self.count = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.rows = torch.zeros(n_layers, dtype=torch.float64)

    def __call__(self, layer: int, block: RowBlock) -> None:
        L = block.row_len[:, 0]  # (B, R)
        eligible = torch.nonzero(L > self.ks[layer], as_tuple=False)
        if eligible.numel() == 0:
            return
        b, r = eligible[:, 0], eligible[:, 1]
        p = torch.softmax(block.logits[b, :, r].float(), -1)  # (n, H, N), 0 at invisible keys
        csum = p.sort(-1, descending=True).values.cumsum(-1)
        need = (csum < self.mass * csum[..., -1:]).sum(-1) + 1  # (n, H): elements to reach the share
        self.count[layer] += need.sum(0).to(torch.float64).cpu()
        self.rows[layer] += b.numel()

    def mean_spread(self) -> torch.Tensor:
        """(n_layers, n_heads) mean count per thresholded row; NaN for layers with no such row."""
        return self.count / self.rows.unsqueeze(-1).where(self.rows.unsqueeze(-1) > 0, torch.tensor(float("nan"),
                                                                                                     dtype=torch.float64))


def measure_mass_spread(model, documents: Sequence[torch.Tensor], k: KSchedule, *, mass: float = 0.9,
                        progress: ProgressFn | None = None) -> torch.Tensor:
    """Mean per-row count of elements that reach ``mass`` of the row's softmax mass, per (layer, head).

    Runs the model dense over ``documents`` (1-D token ids) and averages over rows with
    ``L > k[layer]``; returns (n_layers, n_heads) float64 (NaN for a layer with no such row)."""
    if hasattr(model, "tokenizer") and hasattr(model, "model"):
        model = model.model
    fp = model_fingerprint(model)
    ks = k.as_list(fp.n_layers)
    obs = MassSpreadObserver(fp.n_layers, fp.n_heads, ks, mass)
    device = next(model.parameters()).device
    base = getattr(model, model.base_model_prefix, model)
    total, done = sum(int(d.numel()) for d in documents), 0
    dense = SparseConfig(selection=Selection.DENSE, k=KSchedule(k.default, k.overrides), sdc="none", vmc=False)
    with torch.inference_mode(), sparse_run(dense, observers=(obs,)):
        for ids in documents:
            base(input_ids=ids.view(1, -1).to(device), use_cache=False)
            done += int(ids.numel())
            if progress:
                progress(done, total)
    return obs.mean_spread()


def head_k_from_spread(spread: Sequence[float] | torch.Tensor, k: int, k_min: int = 1, k_max: int | None = None
                       ) -> list[int]:
    """Per-head k proportional to ``spread`` (H,), integers in [k_min, k_max] whose mean is exactly ``k``.

    ``x_h = H·k·w_h / Σw`` (w the spread); heads pushed below ``k_min`` or above ``k_max`` are
    fixed there and the rest rescaled to the remaining budget; the integer parts are then
    topped up by largest remainder so that ``Σ k_h = H·k``.
    """
    w = torch.as_tensor(spread, dtype=torch.float64).flatten()
    H = w.numel()
    if H == 0:
        raise ValueError("spread is empty")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("spread must be finite and non-negative")
    k_max = H * k if k_max is None else k_max
    if not (1 <= k_min <= k <= k_max):
        raise ValueError(f"need 1 ≤ k_min ≤ k ≤ k_max, got k_min={k_min}, k={k}, k_max={k_max}")
    w = w.clamp_min(1e-12)
    fixed = torch.zeros(H, dtype=torch.bool)
    x = torch.zeros(H, dtype=torch.float64)
    for _ in range(H + 1):
        budget = H * k - float(x[fixed].sum())
        free = ~fixed
        x[free] = budget * w[free] / w[free].sum()
        high = free & (x > k_max)  # caps first: the budget they free may lift heads off the floor
        low = free & (x < k_min) if not bool(high.any()) else torch.zeros_like(high)
        if not bool(low.any() or high.any()):
            break
        x[low], x[high] = float(k_min), float(k_max)
        fixed |= low | high
    ints = x.floor()
    short = int(round(H * k - float(ints.sum())))
    order = [int(h) for h in torch.argsort(x - ints, descending=True, stable=True)]
    while short > 0:  # largest remainders first (then round again while some room is left)
        room = [h for h in order if ints[h] + 1 <= k_max][:short]
        for h in room:
            ints[h] += 1
        short -= len(room)
    while short < 0:  # only when every head was pinned: take from the smallest remainders above k_min
        room = [h for h in reversed(order) if ints[h] - 1 >= k_min][:-short]
        for h in room:
            ints[h] -= 1
        short += len(room)
    return [int(v) for v in ints]


def allocate_head_k(model, documents: Sequence[torch.Tensor], k: KSchedule, *, mass: float = 0.9,
                    layers: Sequence[int] | None = None, k_min: int = 1, k_max: int | None = None,
                    spread: torch.Tensor | None = None) -> tuple[KSchedule, torch.Tensor]:
    """A per-(layer, head) k schedule proportional to each head's attention spread on ``documents``.

    The spread of a head is its mean per-row count of elements that reach ``mass`` of the row's
    softmax mass (:func:`measure_mass_spread`, dense, rows with ``L > k[layer]``).  In each of
    ``layers`` (default: every layer at the schedule's default k, so per-layer overrides such as
    near-dense first layers stay as they are) the heads get k proportional to it, with the
    layer's mean k unchanged (:func:`head_k_from_spread`).  Pass ``spread`` to reuse a
    measurement.  Returns the schedule (``head_overrides`` for every head of those layers) and
    the spread (n_layers, n_heads).
    """
    if hasattr(model, "tokenizer") and hasattr(model, "model"):
        model = model.model
    fp = model_fingerprint(model)
    ks = k.as_list(fp.n_layers)
    if spread is None:
        spread = measure_mass_spread(model, documents, k, mass=mass)
    if tuple(spread.shape) != (fp.n_layers, fp.n_heads):
        raise ValueError(f"spread has shape {tuple(spread.shape)}, the model needs ({fp.n_layers}, {fp.n_heads})")
    chosen = [l for l in range(fp.n_layers) if ks[l] == k.default and l not in dict(k.overrides)] \
        if layers is None else list(layers)
    heads = {}
    for layer in chosen:
        if not (0 <= layer < fp.n_layers):
            raise ConfigError(f"layer {layer} is outside the model's {fp.n_layers} layers")
        row = spread[layer]
        if not bool(torch.isfinite(row).all()):
            continue  # no thresholded row seen at this layer: keep its uniform k
        for h, kh in enumerate(head_k_from_spread(row, ks[layer], k_min, k_max)):
            heads[(layer, h)] = kh
    return KSchedule(k.default, k.overrides, tuple(sorted(heads.items()))), spread


@dataclass
class CalibrationReport:
    documents: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


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
    device = next(model.parameters()).device
    if stats is None:
        stats = ThresholdStats.for_config(fp.n_layers, fp.n_heads, config, device=device)
    elif config.aggregation.needs_samples and stats.samples is None:
        raise ValueError(f"aggregation={config.aggregation.value} needs a sample reservoir, which the given "
                         "statistics lack: create them with ThresholdStats.for_config(..., config)")
    observer = CalibrationObserver(stats, config)
    run_cfg = config.tac_config() if config.tac else SparseConfig(selection=Selection.DENSE, k=config.k, sdc="none", vmc=False)
    base = getattr(model, model.base_model_prefix, model)  # skip the LM head: logits are not needed
    total = sum(int(d.numel()) for d in documents)
    done = 0
    if progress:
        progress(0, total)
    with torch.inference_mode(), sparse_run(run_cfg, observers=(observer,)):
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
    if hasattr(model, "tokenizer") and hasattr(model, "model"):
        tokenizer = tokenizer or model.tokenizer
        model = model.model
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
