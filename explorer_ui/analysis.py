"""Pure computations behind the pages (no Streamlit): data choices, k tables, sparsity snapshots.

Everything here takes plain values and a :class:`~topθ_core.models.LoadedModel` and returns
plain values or DataFrames, so it is tested without a browser or a script runner.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from topθ_core import tasks
from topθ_core.config import DENSE, SDC, KSchedule, Placement, Selection, SparseConfig, fit_sdc
from topθ_core.integration import sparse_run
from topθ_core.metrics import SparsityMetrics
from topθ_core.models import base_model, cache_kwarg, output_cache
from topθ_core.thresholds import Thresholds

MAP_CAP = 256  # at most MAP_CAP × MAP_CAP cells are drawn per attention map
PAPER_NEAR_DENSE_K = 512


# ---------------------------------------------------------------------------- data sources
def bundled_sources() -> dict[str, list[str]]:
    """Names the Calibrate page offers, by kind."""
    return {"corpus": tasks.list_corpora(),
            "task": [f"mc:{t}" for t in tasks.list_mc_tasks()] + [f"gen:{t}" for t in tasks.list_generation_tasks()]}


def bundled_texts(kind: str, name: str, limit: int) -> list[str]:
    """Texts of a bundled corpus (``kind="corpus"``) or task (``"mc:arc_easy"``, ``"gen:gsm8k"``).

    Multiple-choice items become ``context + " " + gold choice`` (what the model reads when
    it is scored); generation tasks give their prompts.  ``limit`` is capped at what exists.
    """
    if kind == "corpus":
        texts = tasks.load_corpus(name)
    elif name.startswith("mc:"):
        texts = [it.context + it.continuations()[it.gold] for it in tasks.load_mc_task(name[3:])]
    elif name.startswith("gen:"):
        texts = tasks.load_generation_prompts(name[4:])
    else:
        raise ValueError(f"unknown bundled source {kind}:{name}")
    return texts[: max(1, int(limit))]


def sample_prompts() -> dict[str, str]:
    """A few prompts for the Sparsity and Compare pages, label → text."""
    out: dict[str, str] = {}
    try:
        out["Python docs (prose)"] = tasks.load_corpus("pydoc", limit=1)[0]
        out["Fiction (LAMBADA)"] = tasks.load_corpus("lambada", limit=1)[0]
        out["Python source"] = tasks.load_corpus("code", limit=1)[0]
        out["GSM8K question"] = tasks.load_generation_prompts("gsm8k", limit=1)[0]
        out["HumanEval prompt"] = tasks.load_generation_prompts("humaneval", limit=1)[0]
    except (FileNotFoundError, ValueError):
        pass
    return out


# ---------------------------------------------------------------------------- k schedules
def k_table(n_layers: int, default: int, near_dense: bool) -> pd.DataFrame:
    """Editable per-layer k table: ``default`` everywhere, 512 on layers 0 and 1 when ``near_dense``."""
    ks = [PAPER_NEAR_DENSE_K if near_dense and layer < 2 else default for layer in range(n_layers)]
    return pd.DataFrame({"layer": np.arange(n_layers, dtype=np.int64), "k": np.asarray(ks, dtype=np.int64)})


def k_schedule_from_table(table: pd.DataFrame, default: int) -> KSchedule:
    """The :class:`KSchedule` of an edited k table (layers whose k differs from ``default`` override it)."""
    overrides = {}
    for layer, k in zip(table["layer"], table["k"]):
        if k is None or (isinstance(k, float) and math.isnan(k)):
            continue
        if int(k) != int(default):
            overrides[int(layer)] = int(k)
    return KSchedule(default=int(default), overrides=tuple(sorted(overrides.items())))


# ---------------------------------------------------------------------------- sparsity snapshot
@dataclass
class SparsitySnapshot:
    """What the Sparsity page draws for one prompt and one config: every layer's maps, so a layer or head
    change only redraws.  Maps are pooled to at most :data:`MAP_CAP` cells a side and stored compactly
    (float16 weights, uint8 kept share): about 5 bytes per cell per head and layer."""

    tokens: list[str]
    metrics: pd.DataFrame  # SparsityMetrics.to_frame()
    popularity: pd.DataFrame  # layer, position, count (prefill, all query heads)
    decode: pd.DataFrame  # layer, step, kept_v_rows, kv_rows, kept_v_frac
    generated: list[str]
    dense: np.ndarray  # (L, H, n, n) float16 dense softmax of each layer's scores, pooled (row mass kept)
    sparse: np.ndarray  # (L, H, n, n) float16 weights applied to V after selection and compensation, pooled
    kept: np.ndarray  # (L, H, n, n) uint8 share of kept elements per cell, 0-255
    visible: np.ndarray  # (n, n) share of visible elements per cell
    pool: int  # tokens per drawn cell along each axis
    seconds: float  # the prefill's compute time
    config_label: str = ""
    decode_seconds: float = 0.0  # the decode steps' compute time
    extra: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_layers(self) -> int:
        return self.dense.shape[0]

    def layer_maps(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dense, sparse, kept share) of one layer, float32, (H, n, n)."""
        return (self.dense[layer].astype(np.float32), self.sparse[layer].astype(np.float32),
                self.kept[layer].astype(np.float32) / 255.0)

    def cell_tokens(self) -> list[str]:
        """The text of each drawn cell along an axis (the tokens it pools, joined)."""
        f = self.pool
        return ["".join(self.tokens[i:i + f]) for i in range(0, self.n_tokens, f)]


def _pool_cols(x: torch.Tensor, f: int, reduce: str) -> torch.Tensor:
    """(..., N) → (..., ceil(N/f)) by sum or mean over groups of ``f`` columns."""
    if f == 1:
        return x
    n = x.shape[-1]
    pad = (-n) % f
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(*x.shape[:-1], -1, f)
    return x.sum(-1) if reduce == "sum" else x.sum(-1) / f


class _MapCapture:
    """Observer that keeps every layer's prefill maps, column-pooled as chunks arrive."""

    def __init__(self, pool: int):
        self.pool = pool
        self.chunks: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.visible: list[torch.Tensor] = []

    def __call__(self, layer: int, block) -> None:
        if block.q_len <= 1:
            return
        logits = block.logits[0].float()  # (H, R, N)
        m = logits.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(logits - m)
        dense = e / e.sum(-1, keepdim=True).clamp_min(1e-30)
        f = self.pool
        c = self.chunks.setdefault(layer, {"dense": [], "sparse": [], "kept": []})
        c["dense"].append(_pool_cols(dense, f, "sum"))
        c["sparse"].append(_pool_cols(block.probs[0].float(), f, "sum"))
        c["kept"].append(_pool_cols(block.kept[0].float(), f, "mean"))
        if layer == min(self.chunks):
            self.visible.append(_pool_cols(block.visible[0, 0].float(), f, "mean"))

    def _rows(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        n = max(x.shape[-1] for x in chunks)  # causal chunks may see growing key prefixes
        x = torch.cat([torch.nn.functional.pad(c, (0, n - c.shape[-1])) for c in chunks], dim=-2)
        return _pool_cols(x.transpose(-1, -2), self.pool, "mean").transpose(-1, -2)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        layers = sorted(self.chunks)
        dense = np.stack([self._rows(self.chunks[l]["dense"]).numpy() for l in layers]).astype(np.float16)
        sparse = np.stack([self._rows(self.chunks[l]["sparse"]).numpy() for l in layers]).astype(np.float16)
        kept = np.stack([np.rint(self._rows(self.chunks[l]["kept"]).numpy() * 255) for l in layers]).astype(np.uint8)
        return dense, sparse, kept, self._rows(self.visible).numpy().astype(np.float32)


def pool_factor(n_tokens: int, cap: int = MAP_CAP) -> int:
    return max(1, math.ceil(n_tokens / cap))


@dataclass
class DecodeContinuation:
    """What decode steps after :func:`sparsity_prefill` need: the prefill's context (its sparse run stays
    active in it, running V sums included), the model output holding the KV cache, and the metrics."""

    run_context: contextvars.Context
    out: object
    metrics: SparsityMetrics


def sparsity_prefill(lm, text: str, config: SparseConfig, thresholds: Thresholds | None, *,
                     max_tokens: int = 256, map_cap: int = MAP_CAP,
                     keep_cache: bool = False) -> tuple[SparsitySnapshot, DecodeContinuation | None]:
    """One sparse prefill of ``text`` (truncated to ``max_tokens``): :class:`SparsityMetrics` (with V-row
    popularity) and the maps of every layer and query head, pooled to at most ``map_cap`` cells a side.
    With ``keep_cache`` it also returns what :func:`sparsity_decode` needs, so a page can draw the
    prefill before the decode steps run."""
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise ValueError("the prompt needs at least two tokens")
    n = int(ids.shape[1])
    metrics = SparsityMetrics(track_popularity=True)
    capture = _MapCapture(pool_factor(n, map_cap))
    cont = None
    t0 = time.perf_counter()
    with torch.inference_mode(), sparse_run(config, thresholds if config.needs_thresholds else None,
                                            model=lm.model, metrics=metrics, observers=(capture,)):
        if keep_cache:
            out = lm.model(input_ids=ids.to(lm.device), use_cache=True, logits_to_keep=1)
            cont = DecodeContinuation(contextvars.copy_context(), out, metrics)
        else:
            base_model(lm.model)(input_ids=ids.to(lm.device), use_cache=False)
    seconds = time.perf_counter() - t0
    dense, sparse, kept, visible = capture.arrays()
    pop_rows = [pd.DataFrame({"layer": lay, "position": np.arange(p.numel()), "count": p.cpu().numpy()})
                for lay, p in sorted(metrics.popularity.items())]
    popularity = (pd.concat(pop_rows, ignore_index=True) if pop_rows
                  else pd.DataFrame(columns=["layer", "position", "count"]))
    snap = SparsitySnapshot(
        tokens=[lm.tokenizer.decode([t]) for t in ids[0].tolist()], metrics=metrics.to_frame(),
        popularity=popularity, decode=_decode_frame(metrics), generated=[],
        dense=dense, sparse=sparse, kept=kept, visible=visible, pool=capture.pool, seconds=seconds,
        config_label=config.label())
    return snap, cont


def sparsity_decode(lm, snap: SparsitySnapshot, cont: DecodeContinuation, steps: int) -> SparsitySnapshot:
    """``steps`` greedy decode steps after :func:`sparsity_prefill` (stops at EOS): the snapshot with its
    decode strip, generated tokens and metrics of both phases.  Consumes ``cont`` (its cache grows)."""
    generated: list[int] = []
    eos = getattr(lm.tokenizer, "eos_token_id", None)

    def run() -> None:  # inside the prefill's context: its sparse run is the active one
        out = cont.out
        with torch.inference_mode():
            for _ in range(steps):  # step i feeds the i-th generated token (the strip's column i)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(int(nxt))
                if eos is not None and int(nxt) == eos:
                    break
                out = lm.model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{cache_kwarg(lm.model): output_cache(out)})

    t0 = time.perf_counter()
    if steps > 0:
        cont.run_context.run(run)
    return dataclasses.replace(snap, metrics=cont.metrics.to_frame(), decode=_decode_frame(cont.metrics),
                               generated=[lm.tokenizer.decode([t]) for t in generated],
                               decode_seconds=time.perf_counter() - t0)


def sparsity_snapshot(lm, text: str, config: SparseConfig, thresholds: Thresholds | None, *,
                      max_tokens: int = 256, decode_steps: int = 8, map_cap: int = MAP_CAP) -> SparsitySnapshot:
    """:func:`sparsity_prefill` of ``text`` followed by ``decode_steps`` greedy steps (:func:`sparsity_decode`)."""
    snap, cont = sparsity_prefill(lm, text, config, thresholds, max_tokens=max_tokens, map_cap=map_cap,
                                  keep_cache=decode_steps > 0)
    return sparsity_decode(lm, snap, cont, decode_steps) if cont is not None else snap


def _decode_frame(metrics: SparsityMetrics) -> pd.DataFrame:
    rows = [{"layer": lay, "step": i, "kept_v_rows": kv, "kv_rows": tot}
            for lay, steps in sorted(metrics.decode_steps.items()) for i, (kv, tot) in enumerate(steps)]
    decode = pd.DataFrame(rows, columns=["layer", "step", "kept_v_rows", "kv_rows"])
    decode["kept_v_frac"] = decode["kept_v_rows"] / decode["kv_rows"].where(decode["kv_rows"] > 0)
    return decode


def default_sparse_config(thresholds: Thresholds | None) -> SparseConfig:
    """Top-θ with the run's k, placement and kind of θ and its saved SDC/VMC defaults; dense without thresholds."""
    if thresholds is None:
        return DENSE
    d = thresholds.meta.get("app_defaults") or {}
    placement = thresholds.placement
    sdc = fit_sdc(d.get("sdc", SDC.EXACT.value), Selection.TOP_THETA, placement)
    vmc = bool(d.get("vmc", True)) if (sdc is not SDC.NONE or placement is Placement.POST) else False
    return SparseConfig(k=thresholds.k, placement=placement, sdc=sdc, vmc=vmc,
                        theta_reference=thresholds.theta_reference)


def grid_click(state) -> tuple[int, int] | None:
    """(layer, head) of the first selected point of the θ grid chart's selection state, or None.

    The state is Streamlit's plotly selection (a dict-like with ``selection.points``); each
    point carries ``customdata`` ``[layer, head]`` (a list, or a dict keyed by position) and
    ``x`` = head, ``y`` = layer as a fallback.
    """
    if state is None:
        return None
    try:
        selection = state["selection"] if "selection" in state else getattr(state, "selection", None)
        points = (selection or {}).get("points") or []
    except (TypeError, KeyError, AttributeError):
        return None
    if not points:
        return None
    p = points[0]
    cd = p.get("customdata")
    try:
        if isinstance(cd, dict):
            vals = [cd[k] for k in sorted(cd, key=lambda k: int(k))]
            return int(vals[0]), int(vals[1])
        if isinstance(cd, (list, tuple)) and len(cd) >= 2:
            return int(cd[0]), int(cd[1])
        return int(p["y"]), int(p["x"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
