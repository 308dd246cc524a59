"""Plugging Top-θ into transformers through its registry (never by subclassing attention).

:func:`prepare_model` registers one attention function and its mask function under the
name ``"top_theta"`` and switches a loaded model to it once.  With no active run the
function is transformers' own ``sdpa`` (dense, bit-for-bit the model's default path), so
one loaded model serves dense and sparse callers alike.

Settings travel with the call, not with the model: :func:`sparse_run` activates a
:class:`RunState` in a :class:`contextvars.ContextVar`, which is per thread and per
asyncio task, so two users of one shared model (two Streamlit sessions) cannot trample
each other.  Inside the context every attention call of the model reads its layer's k,
θ and SDC terms from the state and reports to the state's observers.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .attention import RowBlock, causal_visible, topθ_attention_ref
from .config import ConfigError, PrefillMode, Selection, SparseConfig
from .metrics import SparsityMetrics
from .fingerprint import model_fingerprint
from .thresholds import Thresholds, ThresholdsError

ATTN_NAME = "top_theta"
_DENSE = SparseConfig(selection=Selection.DENSE, sdc="none", vmc=False)

LayerObserver = Callable[[int, RowBlock], None]


@dataclass
class RunState:
    """Everything an attention call needs besides its tensors."""

    config: SparseConfig
    thresholds: Thresholds | None = None
    observers: tuple[LayerObserver, ...] = ()
    metrics: SparsityMetrics | None = None
    use_kernels: bool = True
    k_per_layer: dict[int, int] = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)  # per-run caches of fast paths (e.g. running V sums for VMC)

    def k_for(self, layer: int) -> int:
        return self.k_per_layer.get(layer) or self.config.k.k_for(layer)

    def k_keep(self, layer: int, n_heads: int) -> int | list[int]:
        """The layer's k, or one k per query head when the schedule gives this layer per-head k."""
        if layer not in self.k_per_layer:
            heads = self.config.k.heads_for(layer, n_heads)
            if heads is not None:
                return heads
        return self.k_for(layer)


_ACTIVE: contextvars.ContextVar[RunState | None] = contextvars.ContextVar("topθ_run", default=None)


def active_run() -> RunState | None:
    return _ACTIVE.get()


def check_run(config: SparseConfig, thresholds: Thresholds | None = None,
              model: torch.nn.Module | None = None) -> None:
    """What :func:`sparse_run` checks before it runs, for callers that check once and then open many
    runs without ``model`` (the model check hashes a weight sample on the host: an evaluation's or a
    generation's every model call would pay it).  With ``model``: ``thresholds`` belong to it, the k
    schedule names existing layers and the model is prepared; always: thresholds exist when the
    selection needs them, and their placement and θ kind match the config."""
    if config.needs_thresholds and thresholds is None:
        raise ThresholdsError("top-theta selection needs thresholds: calibrate first or load an artifact")
    if model is not None:
        fp = model_fingerprint(model)
        config.k.validate(fp.n_layers, fp.n_heads)
        if thresholds is not None and config.needs_thresholds:
            thresholds.check_model(fp)
        if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
            raise ConfigError("the model is not prepared for Top-θ: call topθ_core.prepare_model(model) once after loading")
    if thresholds is not None and config.needs_thresholds and thresholds.placement is not config.placement:
        raise ConfigError(f"thresholds were calibrated for {thresholds.placement.value}-softmax placement, "
                          f"but the config asks for {config.placement.value}")
    if thresholds is not None and config.needs_thresholds and thresholds.theta_reference is not config.theta_reference:
        raise ConfigError(f"thresholds hold θ of kind {thresholds.theta_reference.value!r} "
                          f"({'score minus the row max' if thresholds.theta_reference.value == 'row-max' else 'the score itself'}), "
                          f"but the config compares with theta_reference={config.theta_reference.value!r}: set the "
                          f"config's theta_reference to {thresholds.theta_reference.value!r} or calibrate for "
                          f"{config.theta_reference.value!r}")


@contextlib.contextmanager
def sparse_run(
    config: SparseConfig,
    thresholds: Thresholds | None = None,
    *,
    model: torch.nn.Module | None = None,
    metrics: SparsityMetrics | None = None,
    observers: tuple[LayerObserver, ...] = (),
    use_kernels: bool = True,
) -> Iterator[RunState]:
    """Run the model's attention sparsely inside this block.

    With ``model`` given, checks that ``thresholds`` belong to it and that the k schedule
    names existing layers.  Yields the :class:`RunState` (``state.metrics`` collects what
    was kept when ``metrics`` is passed).
    """
    check_run(config, thresholds, model)
    state = RunState(config=config, thresholds=thresholds, observers=tuple(observers), metrics=metrics,
                     use_kernels=use_kernels)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def _visible_from_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int, device) -> torch.Tensor:
    """transformers' 4-D mask (bool: True = attend, or additive float) → (B, Sq, Sk) bool."""
    if mask is None:
        return causal_visible(q_len, kv_len, device, batch)
    if mask.dim() == 4:
        mask = mask[:, 0]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    mask = mask[..., :kv_len]
    return mask.expand(batch, q_len, kv_len)


def top_theta_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, Hq, Sq, d) → (B, Sq, Hq, d)."""
    state = _ACTIVE.get()
    softcap = kwargs.get("softcap")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by Top-θ attention")
    dense_prefill = state is not None and query.shape[2] > 1 and state.config.prefill is PrefillMode.DENSE
    if dense_prefill and (state.observers or softcap is not None):  # the prompt runs dense, observers see it
        state = dataclasses.replace(state, config=state.config.with_(selection=Selection.DENSE))
    elif state is None or dense_prefill or (state.config.selection is Selection.DENSE and not state.observers
                                            and state.metrics is None):
        if softcap is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                         **kwargs)
            if dense_prefill and state.metrics is not None:
                _report_dense(state, module, query, key, attention_mask)
            return out
        state = RunState(config=_DENSE)
    layer = int(getattr(module, "layer_idx", 0))
    B, Hq, Sq, _ = query.shape
    Sk = key.shape[2]
    static = _static_lengths(state, Sq)
    visible, row_len = _rows(attention_mask, B, Sq, Sk, query.device, static)
    cfg = state.config
    k_keep = state.k_keep(layer, Hq)  # int, or a list of one k per query head
    theta = sdc_term = None
    if cfg.needs_thresholds:
        # one row length for every layer (plain causal, or a static-cache step): looked up once for all layers
        theta, sdc_term, extrap = _lookup(state, layer, row_len,
                                          Sk if attention_mask is None or static is not None else None)
        if state.metrics is not None:
            phase = "prefill" if Sq > 1 else "decode"
            kk = torch.tensor(k_keep, device=row_len.device).view(1, -1, 1) if isinstance(k_keep, list) else k_keep
            state.metrics.add_extrapolated(layer, phase, extrap & (row_len.unsqueeze(1) > kk))
    from . import dispatch  # decides kernel or reference (imported late: it reads TRITON_INTERPRET at import)

    out = dispatch.try_kernels(query, key, value, visible=visible, theta=theta, sdc_term=sdc_term, k_keep=k_keep,
                               scaling=scaling, softcap=softcap, state=state, layer=layer, lengths=static)
    if out is None:
        observer = _observer_for(state, layer)
        out = topθ_attention_ref(query, key, value, config=cfg, k_keep=k_keep, visible=visible, theta=theta,
                                 sdc_term=sdc_term, scale=scaling, softcap=softcap, observer=observer)
    return out.transpose(1, 2).contiguous(), None


def _rows(attention_mask, B: int, Sq: int, Sk: int, device, lengths: torch.Tensor | None = None
          ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(visible (B, Sq, Sk) bool or None for plain causal, row lengths (B, Sq))`` of one call.
    ``lengths`` (B,): the row lengths when the caller already holds them (a static-cache decode step)."""
    if attention_mask is None:  # plain causal: lengths are known, no (B, Sq, Sk) mask is built or scanned
        return None, torch.arange(Sk - Sq + 1, Sk + 1, device=device).expand(B, Sq)
    visible = _visible_from_mask(attention_mask, Sq, Sk, B, device)
    return visible, (visible.sum(-1) if lengths is None else lengths.view(B, Sq))


def _static_lengths(state: RunState, Sq: int) -> torch.Tensor | None:
    """A static-cache decode step's valid keys per sequence (B,), which its mask's prefix equals by
    construction (:mod:`graph_decode`): no reduction over the mask in every layer of the step."""
    from . import dispatch

    return state.scratch.get(dispatch.STATIC_LENGTHS) if Sq == 1 else None


def _report_dense(state: RunState, module, query, key, attention_mask) -> None:
    """Metrics of a call the model's dense SDPA ran (decode-only mode's prompt): every visible element kept."""
    layer = int(getattr(module, "layer_idx", 0))
    B, Hq, Sq, _ = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]
    visible, row_len = _rows(attention_mask, B, Sq, Sk, query.device)
    k = torch.as_tensor(state.k_keep(layer, Hq), device=row_len.device).view(-1, 1, 1)  # (1 or Hq, 1, 1)
    per_head = lambda x: x.expand(Hq, B, Sq).sum((1, 2))  # noqa: E731  (Hq,) totals over the call's rows
    seen = (torch.ones(B, Sk, dtype=torch.bool, device=row_len.device) if visible is None else visible.any(1))
    kv = seen.sum().expand(Hkv).clone()  # keys visible to any row, per KV head
    state.metrics.add_counts(layer, "prefill", kept=per_head(row_len.unsqueeze(0)), visible=per_head(row_len.unsqueeze(0)),
                             topk_equiv=per_head(torch.minimum(row_len.unsqueeze(0), k)),
                             rows=per_head((row_len > 0).unsqueeze(0).long()),
                             dense_rows=per_head((row_len > 0).unsqueeze(0).long()),
                             empty_rows=torch.zeros(Hq, dtype=torch.long), kept_v_rows=kv, kv_rows=kv)


THETA_LOOKUP = "theta_lookup"  # scratch key: this call's θ for every layer (a static-cache decoder drops it each step)
LOOKUP_ALL_LAYERS_MAX_ROWS = 4096  # up to this many rows (B·Sq) a call's θ is looked up for every layer at once


def _lookup(state: RunState, layer: int, row_len: torch.Tensor, causal_len: int | None):
    """θ, SDC term and extrapolated flags of ``layer``'s rows.

    Plain causal calls (``causal_len`` = Sk, no mask) and static-cache decode steps (their lengths held
    by the decoder, which drops the cached lookup at each step) give every layer the same row lengths, so
    small calls (decode steps) look θ up for all layers at once on the first layer and the others
    take their slice: one set of tensor ops per step instead of one per layer, which on a GPU
    was ~0.3 ms of host time per layer call, more than the decode kernel itself.
    """
    cfg, th = state.config, state.thresholds
    if causal_len is None or row_len.numel() > LOOKUP_ALL_LAYERS_MAX_ROWS:
        return th.lookup(layer, row_len, cfg.lookup, cfg.theta_smoothing)
    key = (tuple(row_len.shape), causal_len, str(row_len.device))
    cached = state.scratch.get(THETA_LOOKUP)
    if cached is None or cached[0] != key:
        cached = (key, th.lookup(None, row_len, cfg.lookup, cfg.theta_smoothing))
        state.scratch[THETA_LOOKUP] = cached
    return tuple(t[layer] for t in cached[1])


def _observer_for(state: RunState, layer: int):
    fns = list(state.observers)
    if state.metrics is not None:
        fns.append(state.metrics)
    if not fns:
        return None

    def observe(block: RowBlock) -> None:
        for fn in fns:
            fn(layer, block)

    observe.accepts_key_prefix = all(getattr(fn, "accepts_key_prefix", False) for fn in fns)
    return observe


_REGISTERED = False


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, top_theta_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _REGISTERED = True


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a loaded transformers model to Top-θ-capable attention (dense until a run is active)."""
    register()
    model.set_attn_implementation(ATTN_NAME)
    return model
