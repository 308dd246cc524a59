"""Where to spend k: per-layer k schedules under an accuracy budget, per-head k by attention spread.

* :func:`layer_sensitivity`, :func:`greedy_schedule_path`, :func:`search_layer_k` — one dense pass
  measures what top-k at each candidate k would drop per layer; a greedy path orders per-layer
  schedules by that proxy and a binary search along it finds the fewest kept elements under a
  loss budget.
* :func:`measure_mass_spread`, :func:`head_k_from_spread`, :func:`allocate_head_k` — per-(layer,
  head) k proportional to how many elements each head's rows need to reach a share of their mass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Callable, Sequence

import pandas as pd
import torch

from .attention import RowBlock
from .config import DENSE, SDC, ConfigError, KSchedule, Selection, SparseConfig
from .fingerprint import model_fingerprint
from .calibration import run_documents
from .integration import sparse_run
from .models import as_module, base_model, model_device

ProgressFn = Callable[[int, int], None]


LAYER_K_CANDIDATES = (512, 256, 128, 64, 32, 16, 8)


class TopKDroppedMass:
    """From a dense run: per layer and candidate k, Σ over rows of the probability mass top-k
    would drop (``1 − Σ top-k p``) and Σ ``min(L, k)`` (kept elements), for all heads."""

    def __init__(self, n_layers: int, candidates: Sequence[int]):
        self.candidates = tuple(sorted(set(int(k) for k in candidates)))
        self.dropped = torch.zeros(n_layers, len(self.candidates), dtype=torch.float64)
        self.kept = torch.zeros(n_layers, len(self.candidates), dtype=torch.float64)
        self.visible = torch.zeros(n_layers, dtype=torch.float64)

    def __call__(self, layer: int, block) -> None:
        probs = block.probs.double()  # dense run: the full softmax, 0 at invisible keys
        L = block.row_len.double()  # (B, 1, R)
        H = probs.shape[1]
        kmax = min(max(self.candidates), probs.shape[-1])
        top = probs.topk(kmax, dim=-1).values.cumsum(-1)  # (B, H, R, kmax)
        for j, k in enumerate(self.candidates):
            kk = min(k, kmax)
            dropped = (1.0 - top[..., kk - 1]).clamp_min(0)
            dropped = torch.where(L <= k, torch.zeros_like(dropped), dropped)  # short rows stay dense: nothing dropped
            self.dropped[layer, j] += float(dropped.sum())
            self.kept[layer, j] += float(torch.minimum(L, torch.full_like(L, k)).sum() * H)
        self.visible[layer] += float(L.sum() * H)


def layer_sensitivity(lm, texts: Sequence[str], candidates: Sequence[int] = LAYER_K_CANDIDATES, *,
                      max_length: int = 512) -> pd.DataFrame:
    """One dense pass over ``texts``: per (layer, k) the mean dropped softmax mass per row and the
    kept fraction top-k would have.  Cheap proxy for how much each layer suffers at each k."""
    n_layers = lm.fingerprint.n_layers
    obs = TopKDroppedMass(n_layers, candidates)
    base = base_model(lm.model)
    with torch.inference_mode(), sparse_run(DENSE, observers=(obs,)):
        for t in texts:
            ids = lm.tokenizer(t, return_tensors="pt").input_ids[:, :max_length]
            base(input_ids=ids.to(model_device(lm.model)), use_cache=False)
    out = []
    for layer in range(n_layers):
        for j, k in enumerate(obs.candidates):
            out.append({"layer": layer, "k": k, "dropped_mass": float(obs.dropped[layer, j]),
                        "kept": float(obs.kept[layer, j]), "visible": float(obs.visible[layer]),
                        "kept_frac": float(obs.kept[layer, j] / obs.visible[layer]) if obs.visible[layer] else 1.0})
    return pd.DataFrame(out)


def greedy_schedule_path(sens: pd.DataFrame, *, fixed: dict[int, int] | None = None) -> list[dict]:
    """Schedules from dense to the smallest k everywhere, one layer step at a time.

    Each step lowers the layer whose next-smaller k adds the least dropped mass per kept
    element saved (the knapsack greedy).  ``fixed`` layers never move.  Returns a list of
    ``{"ks": {layer: k}, "proxy": Σ dropped mass, "kept_frac": pooled kept fraction}``.
    """
    fixed = fixed or {}
    layers = sorted(sens["layer"].unique())
    cands = sorted(sens["k"].unique(), reverse=True)
    table = {(int(r.layer), int(r.k)): (r.dropped_mass, r.kept) for r in sens.itertuples()}
    visible = float(sens.groupby("layer")["visible"].first().sum())
    cur = {l: fixed.get(l, cands[0]) for l in layers}

    def state():
        d = sum(table[(l, cur[l])][0] for l in layers)
        kept = sum(table[(l, cur[l])][1] for l in layers)
        return {"ks": dict(cur), "proxy": d, "kept_frac": kept / visible if visible else 1.0}

    path = [state()]
    while True:
        best = None
        for l in layers:
            if l in fixed:
                continue
            i = cands.index(cur[l])
            if i + 1 >= len(cands):
                continue
            k2 = cands[i + 1]
            dd = table[(l, k2)][0] - table[(l, cur[l])][0]
            saved = table[(l, cur[l])][1] - table[(l, k2)][1]
            ratio = dd / saved if saved > 0 else float("inf")
            if best is None or ratio < best[0]:
                best = (ratio, l, k2)
        if best is None:
            break
        cur[best[1]] = best[2]
        path.append(state())
    return path


def schedule_from_ks(ks: dict[int, int], default: int | None = None) -> KSchedule:
    """A KSchedule from a full per-layer map (the most common k, ties to the smaller, becomes the default)."""
    counts = Counter(ks.values())
    default = default or max(counts, key=lambda k: (counts[k], -k))  # ties: the smaller k
    return KSchedule(default, {l: k for l, k in ks.items() if k != default})


def search_layer_k(lm, loss_fn: Callable[[SparseConfig], float], budget: float, *, sens: pd.DataFrame,
                   base_config: SparseConfig | None = None, fixed: dict[int, int] | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
    """Fewest kept elements under an accuracy budget: binary search along the greedy path.

    ``loss_fn(config)`` returns the accuracy cost of a config against dense (e.g. ΔNLL in
    nats per token or accuracy points lost, on a validation split); ``budget`` is the most
    allowed.  The path (:func:`greedy_schedule_path` over ``sens`` from
    :func:`layer_sensitivity`) is ordered by the proxy, so cost grows along it (roughly);
    the search takes O(log path length) evaluations.  Candidates run as top-k
    (``base_config`` with its k replaced; default top-k, no compensation) so no calibration
    is needed per candidate; calibrate Top-θ once for the schedule found.

    Returns ``{"schedule": KSchedule, "kept_frac": proxy kept fraction, "loss": cost,
    "evaluations": [(index, kept_frac, loss), ...], "path": path}``.
    """
    base_config = base_config or SparseConfig(selection=Selection.TOP_K, sdc=SDC.NONE, vmc=False)
    path = greedy_schedule_path(sens, fixed=fixed)
    evals = []

    def cost(i: int) -> float:
        cfg = replace(base_config, k=schedule_from_ks(path[i]["ks"]))
        c = float(loss_fn(cfg))
        evals.append((i, path[i]["kept_frac"], c))
        if log:
            log(f"k search: step {i}/{len(path) - 1} kept {path[i]['kept_frac']:.3f} loss {c:.4f} "
                f"({'ok' if c <= budget else 'over'})")
        return c

    lo, hi = 0, len(path) - 1  # invariant: path[lo] within budget (dense, by assumption)
    best_loss = 0.0
    if cost(hi) <= budget:
        lo = hi
        best_loss = evals[-1][2]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = cost(mid)
        if c <= budget:
            lo, best_loss = mid, c
        else:
            hi = mid
    return {"schedule": schedule_from_ks(path[lo]["ks"]), "kept_frac": path[lo]["kept_frac"], "loss": best_loss,
            "index": lo, "evaluations": evals, "path": path}


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
    model = as_module(model)
    fp = model_fingerprint(model)
    ks = k.as_list(fp.n_layers)
    obs = MassSpreadObserver(fp.n_layers, fp.n_heads, ks, mass)
    dense = SparseConfig(selection=Selection.DENSE, k=KSchedule(k.default, k.overrides), sdc="none", vmc=False)
    run_documents(model, documents, dense, observers=(obs,), progress=progress)
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
    model = as_module(model)
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
