"""The reference Top-θ / top-k / dense attention in plain PyTorch (SPEC.md, exactly).

This is the oracle every kernel is tested against, and the path the transformers
integration runs on CPU.  It processes query rows in chunks so that the score block
never exceeds a fixed number of elements: memory stays bounded as prompts grow.

Layout: ``q`` (B, Hq, Sq, d), ``k``/``v`` (B, Hkv, Sk, d) with ``Hq % Hkv == 0``;
query head ``h`` reads KV head ``h // (Hq // Hkv)`` (transformers' ``repeat_kv``).
``visible`` (B, Sq, Sk) bool says which keys each query row sees (causality, padding,
sliding windows).  Causal alignment when ``Sq < Sk`` (decode, chunked prefill): query row
``i`` is at absolute position ``Sk − Sq + i`` (see :func:`causal_visible`).
A row's length ``L`` is its number of visible keys.  Rows with ``L ≤ k`` are dense (``k`` per
query head when the layer has per-head k); rows with ``L = 0`` (left padding) output zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from numpy import integer as np_integer

from .compensation import SDC_ESTIMATES, RowTerms, v_mean_compensation
from .config import SDC, Placement, SparseConfig, Selection, ThetaReference
from .selection import SELECTIONS, RowScores, theta_row_rules

# Score-block budget in elements (B·Hq·rows·Sk) per chunk: ~64 MB per fp32 temporary.
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def causal_visible(q_len: int, kv_len: int, device=None, batch: int = 1) -> torch.Tensor:
    """(batch, q_len, kv_len) bool: row i sees keys j ≤ kv_len − q_len + i."""
    offset = kv_len - q_len
    i = torch.arange(q_len, device=device).unsqueeze(-1)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    return (j <= i + offset).unsqueeze(0).expand(batch, q_len, kv_len)


@dataclass
class RowBlock:
    """One chunk of query rows as the attention saw it; handed to observers.

    ``row_start`` is the first query row of the chunk within this call.  ``logits`` are
    the (soft-capped) scaled scores with ``-inf`` at invisible keys; ``probs`` the final
    weights applied to V (after selection and compensation).
    """

    row_start: int
    logits: torch.Tensor  # (B, Hq, R, N)
    visible: torch.Tensor  # (B, 1, R, N) bool
    row_len: torch.Tensor  # (B, 1, R)
    kept: torch.Tensor  # (B, Hq, R, N) bool
    probs: torch.Tensor  # (B, Hq, R, N)
    dense_rows: torch.Tensor  # (B, 1, R) bool, or (B, Hq, R) with per-head k: L ≤ k (kept dense by rule)
    empty_rows: torch.Tensor  # (B, Hq, R) bool: nothing passed θ (before the floor)
    n_kv_heads: int
    k: int  # the layer's k; with per-head k the smallest head's (``k_heads`` has them all)
    q_len: int
    kv_len: int  # keys in this block (the call's keys, or the causal prefix the chunk can see)
    kth_next: torch.Tensor | None = None  # (B, Hq, R) (k+1)-th largest score, when top-k computed it
    exp_scores: torch.Tensor | None = None  # (B, Hq, R, N) e^(a − m), 0 at invisible keys
    dropped_mass: torch.Tensor | None = None  # (B, Hq, R) D_U = Σ_{visible, not kept} e, when exact SDC computed it
    k_heads: torch.Tensor | None = None  # (Hq,) long per-head k, None when every head uses ``k``

    def k_per_head(self) -> torch.Tensor:
        """(Hq,) long: each query head's k (``k`` repeated when the layer has one k)."""
        if self.k_heads is not None:
            return self.k_heads
        return torch.full((self.logits.shape[1],), self.k, dtype=torch.long, device=self.logits.device)

    def thresholded(self) -> torch.Tensor:
        """(B, Hq, R) bool: rows a head thresholds (``L > k`` of that head)."""
        return self.row_len > self.k_per_head().view(1, -1, 1)


class Observer(Protocol):
    def __call__(self, block: RowBlock) -> None: ...


def topθ_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: SparseConfig,
    k_keep: int | Sequence[int] | torch.Tensor,
    visible: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
    sdc_term: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    upcast: bool = True,
    observer: Observer | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Sparse attention, reference implementation.  Returns (B, Hq, Sq, d) in ``q``'s dtype.

    Args:
        config: selection, placement, compensations (``config.k`` is ignored here:
            the caller passes this layer's ``k_keep``).
        k_keep: target kept elements per row for this layer, one int or one per query head
            (Hq,); rows with ``L ≤ k_keep`` (of their head) stay dense.
        visible: (B, Sq, Sk) bool; ``None`` means causal (bottom-right aligned).
        theta: (B, Hq, Sq) per-row threshold, in logit space (pre) or probability
            space (post).  Required for top-θ.
        sdc_term: (B, Hq, Sq) per-row offline SDC term ``C``.  Required for offline SDC.
        upcast: compute in float32 (float64 inputs stay float64).
        observer: called once per chunk with a :class:`RowBlock`.
    """
    B, Hq, Sq, d = q.shape
    Bk, Hkv, Sk, dk = k.shape
    if Hq % Hkv or Bk != B or dk != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    k_keep = _k_keep(k_keep, Hq, q.device)
    g = Hq // Hkv
    causal = visible is None
    if causal:
        visible = causal_visible(Sq, Sk, q.device, B)
    if visible.shape != (B, Sq, Sk):
        visible = visible.expand(B, Sq, Sk)
    scale = d ** -0.5 if scale is None else scale
    cdtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    qc, kc, vc = q.to(cdtype) * scale, k.to(cdtype), v.to(cdtype)  # scale folded into q: (R, d), not (R, N)
    out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=q.dtype, device=q.device)
    # VMC's row means: with plain causal visibility a prefix sum of V gives every row's visible sum
    v_cum = vc.cumsum(2) if causal and config.vmc and config.selection is not Selection.DENSE else None
    rows = max(1, block_elements // max(1, B * Hq * Sk))
    # Plain causal rows see a key prefix: row chunk [r0, r1) needs keys [0, Sk − Sq + r1) only.
    # Cutting each chunk's keys there skips the masked upper triangle (about half the block
    # work) when nothing downstream needs full-width rows (observers may declare
    # ``accepts_key_prefix``: the calibration observers do; the metrics and maps do not).
    trim = causal and Sq > 1 and (observer is None or getattr(observer, "accepts_key_prefix", False))
    if trim:
        rows = min(rows, max(64, -(-Sq // 8)))
    call = _Call(config, k_keep, softcap, g, Sq, observer)
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        n = Sk - Sq + r1 if trim else Sk
        out[:, :, r0:r1] = _attend_rows(
            call, qc[:, :, r0:r1], kc[:, :, :n], vc[:, :, :n], visible[:, r0:r1, :n].unsqueeze(1), r0,
            None if theta is None else theta[:, :, r0:r1].to(cdtype),
            None if sdc_term is None else sdc_term[:, :, r0:r1].to(cdtype),
            None if v_cum is None else v_cum[:, :, Sk - Sq + r0:Sk - Sq + r1],
        ).to(q.dtype)
    return out


def _k_keep(k_keep, Hq: int, device) -> int | torch.Tensor:
    """One int, or (Hq,) long on ``device`` when the heads' k differ; refuses k < 1 or a wrong length."""
    if isinstance(k_keep, (int, np_integer)) and not isinstance(k_keep, bool):
        ks = [int(k_keep)]
    else:
        ks = [int(x) for x in (k_keep.tolist() if torch.is_tensor(k_keep) else k_keep)]
        if len(ks) != Hq:
            raise ValueError(f"per-head k_keep has {len(ks)} entries, but there are {Hq} query heads")
    if min(ks) < 1:
        raise ValueError(f"k_keep must be at least 1, got {min(ks)}")
    if len(set(ks)) == 1:
        return ks[0]
    return torch.tensor(ks, dtype=torch.long, device=device)


def _grouped_matmul(x: torch.Tensor, y: torch.Tensor, g: int) -> torch.Tensor:
    """(B, Hq, R, a) @ (B, Hkv, a, b) with query heads grouped over KV heads → (B, Hq, R, b)."""
    B, Hq, R, a = x.shape
    Hkv = y.shape[1]
    return (x.reshape(B, Hkv, g * R, a) @ y).reshape(B, Hq, R, y.shape[-1])


@dataclass(frozen=True)
class _Call:
    """What every row chunk of one attention call shares."""

    config: SparseConfig
    k_keep: "int | torch.Tensor"  # one k, or (Hq,) per head
    softcap: float | None
    groups: int  # query heads per KV head
    q_len: int
    observer: Observer | None

    def k_rows(self) -> "int | torch.Tensor":
        """k broadcastable over (B, Hq, R)."""
        return self.k_keep.view(1, -1, 1) if torch.is_tensor(self.k_keep) else self.k_keep


def _attend_rows(call: _Call, q, k, v, vis, row_start: int, theta, sdc_term, v_cum) -> torch.Tensor:
    """One chunk of query rows, (B, Hq, R, d).  ``q`` is already scaled; ``v_cum`` (B, Hkv, R, d) is each
    row's sum of visible V rows when the caller has it from a causal prefix sum (VMC), else ``None``."""
    cfg = call.config
    logits = _grouped_matmul(q, k.transpose(-1, -2), call.groups)  # (B, Hq, R, N)
    if call.softcap is not None:
        logits = call.softcap * torch.tanh(logits / call.softcap)
    logits.masked_fill_(~vis, float("-inf"))
    row_len = vis.sum(-1)  # (B, 1, R)
    has_keys = row_len > 0
    m = logits.amax(-1)  # (B, Hq, R)
    m = torch.where(has_keys, m, torch.zeros_like(m))
    e = (logits - m.unsqueeze(-1)).exp_()  # 0 at invisible keys
    dense_rows = row_len <= call.k_rows()  # (B, 1, R), or (B, Hq, R) with per-head k
    p_dense = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny) if cfg.placement is Placement.POST \
        else None
    rs = RowScores(scores=logits if p_dense is None else p_dense, visible=vis, theta=theta, k=call.k_keep, row_max=m,
                   reference=cfg.theta_reference)
    kept, kth_next = SELECTIONS[cfg.selection](rs)
    if cfg.selection is Selection.TOP_THETA:
        kept, empty = theta_row_rules(kept, rs, cfg)
    else:  # dense and top-k keep at least one element of every row with keys
        empty = torch.zeros(kept.shape[:-1], dtype=torch.bool, device=kept.device)
    if cfg.selection is not Selection.DENSE and bool(dense_rows.any()):
        kept = kept | (vis & dense_rows.unsqueeze(-1))  # short rows are dense
    empty = empty & ~dense_rows
    probs, p_sum, d_u = _weights(cfg, e, p_dense, kept, row_len, m, theta, sdc_term, call.k_rows())
    o = _grouped_matmul(probs, v, call.groups)  # (B, Hq, R, d)
    if cfg.vmc and cfg.selection is not Selection.DENSE:
        o = _v_mean(o, probs, p_sum, v, vis, v_cum, row_len, has_keys, m, call.groups)
    if call.observer is not None:
        per_head = torch.is_tensor(call.k_keep)
        call.observer(RowBlock(row_start=row_start, logits=logits, visible=vis, row_len=row_len, kept=kept,
                               probs=probs, dense_rows=dense_rows, empty_rows=empty, n_kv_heads=k.shape[1],
                               k=int(call.k_keep.min()) if per_head else call.k_keep, q_len=call.q_len,
                               kv_len=k.shape[2], kth_next=kth_next, exp_scores=e, dropped_mass=d_u,
                               k_heads=call.k_keep if per_head else None))
    return o


def _weights(cfg: SparseConfig, e, p_dense, kept, row_len, m, theta, sdc_term, kk):
    """Weights applied to V: ``(probs, p_sum, d_u)``.  Post-softmax keeps the dense probabilities
    of the kept set; pre-softmax divides ``e`` by ``D_S + s·D̃_U`` (the SDC variant's estimate).
    ``p_sum`` is the kept weight per row when known (VMC's share), ``d_u`` the exact dropped mass
    when exact SDC computed it (calibration reuses it), else None."""
    if p_dense is not None:
        return p_dense * kept, None, None
    e_kept = e * kept
    d_s = e_kept.sum(-1)
    sdc = SDC.NONE if cfg.selection is Selection.DENSE else cfg.sdc
    if sdc is SDC.NONE:
        d_u = torch.zeros_like(d_s)
    else:
        if cfg.selection is Selection.TOP_K:  # exactly min(k, L) kept: no need to count
            n_dropped = (row_len - kk).clamp_min(0).expand(d_s.shape)
        else:
            n_dropped = row_len - kept.sum(-1)
        theta_logit = theta if cfg.selection is Selection.TOP_THETA else None
        if theta_logit is not None and cfg.theta_reference is ThetaReference.ROW_MAX:
            theta_logit = theta_logit + m  # θ_rel → the absolute logit it stands for (exp-threshold SDC)
        d_u = SDC_ESTIMATES[sdc](RowTerms(e=e, d_s=d_s, n_dropped=n_dropped, m=m, theta=theta_logit,
                                          offline=sdc_term))
    denom = d_s + cfg.sdc_scale * d_u
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    probs = e_kept.div_(denom.unsqueeze(-1))
    return probs, d_s / denom, d_u if sdc is SDC.EXACT else None


def _v_mean(o, probs, p_sum, v, vis, v_cum, row_len, has_keys, m, g):
    """VMC: the share of weight not on kept elements goes to the mean of the row's visible V rows."""
    B, Hkv, N = v.shape[0], v.shape[1], v.shape[2]
    if v_cum is None:
        v_cum = vis.to(v.dtype).expand(B, Hkv, vis.shape[2], N) @ v  # (B, Hkv, R, d) visible sums
    v_mean = (v_cum / row_len.clamp_min(1).unsqueeze(-1).to(v.dtype)).repeat_interleave(g, dim=1)
    p_sum = torch.where(has_keys, probs.sum(-1) if p_sum is None else p_sum, torch.ones_like(m))
    return v_mean_compensation(o, p_sum, v_mean)


def dense_attention_ref(q, k, v, *, visible=None, scale=None, softcap=None, upcast=True) -> torch.Tensor:
    """Plain softmax attention with the same layout and masking rules (k_keep = ∞)."""
    from .config import DENSE

    return topθ_attention_ref(q, k, v, config=DENSE, k_keep=1 << 62, visible=visible, scale=scale,
                              softcap=softcap, upcast=upcast)
