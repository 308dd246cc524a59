"""Top-θ prefill: causal FlashAttention-2 tiles with a per-element θ test, in the form of Triton's
fused-attention tutorial (K/V tiles by TMA through tensor descriptors, two causal key loops).

Grid: (batch·query heads, query blocks), heaviest causal blocks launched first across all heads.
One program holds BLOCK_M query rows of one head and walks the key blocks the rows can see
(bottom-right causal alignment, so chunked prefill with ``Sq < Sk`` works): first the blocks
below the diagonal without a mask, then the diagonal blocks with one.  K and V tiles arrive by
TMA (``tl.make_tensor_descriptor`` per (batch, head); out-of-range rows read as zeros).

Every tile computes QKᵀ (a threshold needs every score), the running row maximum over all
visible scores and the denominator steps of FlashAttention.  The θ test is one compare of the
raw score with ``θ/scale`` (θ[layer, head, L] with L the row length; rows with L ≤ k are dense,
θ = −∞), and the dropped probabilities are zeroed before P·V.  What each variant adds per
element, and nothing more:

* exact SDC: the denominator over all elements ``l`` beside the kept one ``D_S``; ``D_U = l − D_S``;
* offline SDC: the row minimum of the scores (a row drops something iff its minimum is ≤ θ);
* exp-threshold SDC and kept counts: the kept count per row;
* the empty-row floor: nothing per element.  A row is empty iff ``D_S = 0`` (whatever passes θ,
  the row's maximum passes too, and it contributes e⁰ = 1).  The loop records which tile last
  raised each row's running maximum; a block that ends with an empty row recomputes QKᵀ for
  those tiles alone to find the argmax.

``skip_tiles`` is the other loop form: when no element of a tile passes θ the program skips the
exponentials, the V tile and P·V (θ is static, so this test does not depend on tile order), and
rescales its accumulators lazily.  Exact SDC still needs every exponential there.

VMC reads ``v̄_i`` from a causal prefix sum of V made by :func:`v_prefix_sum` (two small launches:
per-segment sums, then a scan within each segment).  Kept counts come out per row and the
kept-V-row union as a byte mask over keys per KV head, only when asked for.

Layers: ``_prefill_kernel`` (Triton) → ``_prefill_launch`` → ``toptheta::prefill`` (custom op
+ fake) → :func:`topθ_prefill`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..config import SDC, SparseConfig
from . import decode as _decode_mod
from ._common import KernelCounts, check_qkv, kernel_variant, last_dim_contiguous

LOG2E = tl.constexpr(1.4426950408889634)  # the kernel works in exp2: scores and θ convert once


@triton.jit
def _prefill_tiles(acc, l_i, d_s, m_i, m_acc, n_k, m_t, q_min, q, th_raw, rows_abs, desc_k, desc_v, kvm_base,
                   lo, hi, qk_scale,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, THRESHOLD: tl.constexpr, EXACT: tl.constexpr,
                   COUNT: tl.constexpr, ANY_DROP: tl.constexpr, FLOOR: tl.constexpr, KV_MASK: tl.constexpr,
                   SKIP: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        qk = tl.dot(q, desc_k.load([n0, 0]).T)  # (BLOCK_M, BLOCK_N) raw scores
        if MASKED:
            vis = (n0 + offs_n)[None, :] <= rows_abs[:, None]
            qk = tl.where(vis, qk, float("-inf"))
        t_raw = tl.max(qk, 1)
        t_max = t_raw * qk_scale  # log2 domain
        if FLOOR:  # the tile that last raised the running max (first on ties): the floor's argmax lies there
            m_t = tl.where(t_max > m_i, n0, m_t)
        m_new = tl.maximum(m_i, t_max)
        if THRESHOLD or COUNT or KV_MASK:  # dense: th_raw = −∞ keeps every visible score
            keep = qk > th_raw[:, None]
        if THRESHOLD:
            if ANY_DROP:
                if MASKED:
                    q_min = tl.minimum(q_min, tl.min(tl.where(vis, qk, float("inf")), 1))
                else:
                    q_min = tl.minimum(q_min, tl.min(qk, 1))
        if SKIP and not EXACT:
            # lazily rescaled: acc and d_s stay relative to m_acc, the maximum as of the last kept tile
            m_i = m_new
            if tl.max((t_raw > th_raw).to(tl.int32), 0) > 0:  # does anything pass θ?
                alpha = tl.math.exp2(m_acc - m_new)
                m_acc = m_new
                p = tl.where(keep, tl.math.exp2(qk * qk_scale - m_new[:, None]), 0.0)
                d_s = d_s * alpha + tl.sum(p, 1)
                v = desc_v.load([n0, 0])
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                if COUNT:
                    n_k += tl.sum(keep.to(tl.int32), 1)
                if KV_MASK:
                    krow = tl.max(keep.to(tl.int32), 0)
                    tl.store(kvm_base + n0 + offs_n, krow.to(tl.int8), mask=krow > 0)
        else:
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            if THRESHOLD:
                if EXACT:
                    l_i = l_i * alpha + tl.sum(p, 1)
                p = tl.where(keep, p, 0.0)
            if COUNT:
                n_k += tl.sum(keep.to(tl.int32), 1)
            d_s = d_s * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m_i = m_new
            if SKIP:  # exact SDC: every exponential, but the V tile and P·V only where something passed θ
                if tl.max((t_raw > th_raw).to(tl.int32), 0) > 0:
                    v = desc_v.load([n0, 0])
                    acc = tl.dot(p.to(v.dtype), v, acc)
            else:
                v = desc_v.load([n0, 0])
                acc = tl.dot(p.to(v.dtype), v, acc)
            if KV_MASK:
                krow = tl.max(keep.to(tl.int32), 0)
                tl.store(kvm_base + n0 + offs_n, krow.to(tl.int8), mask=krow > 0)
    return acc, l_i, d_s, m_i, m_acc, n_k, m_t, q_min


@triton.jit
def _row_argmax(q, rows_abs, need, m_t, desc_k, hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Index of the largest visible score of the rows in ``need`` (first on ties).  The main loop
    recorded, per row, the tile ``m_t`` that last raised its running max; only those tiles get a
    second QKᵀ, so the main loop carries no per-element argmax."""
    offs_n = tl.arange(0, BLOCK_N)
    idx = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(0, hi, BLOCK_N):
        here = need & (m_t == n0)
        if tl.max(here.to(tl.int32), 0) > 0:
            qk = tl.dot(q, desc_k.load([n0, 0]).T)
            qk = tl.where((n0 + offs_n)[None, :] <= rows_abs[:, None], qk, float("-inf"))
            _, arg = tl.max(qk, 1, return_indices=True)
            idx = tl.where(here, n0 + arg.to(tl.int32), idx)
    return idx


@triton.jit
def _prefill_kernel(
    Q, K, V, THETA, SDCT, VCUM, OUT, NK, EMPTY, KVM,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, sc_b, sc_h, sc_n,
    Hq, Sq, Sk, k_keep, qk_scale, sdc_scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    THRESHOLD: tl.constexpr, SDC_MODE: tl.constexpr, FLOOR: tl.constexpr, VMC: tl.constexpr,
    COUNTS: tl.constexpr, SKIP: tl.constexpr,
):
    EXACT: tl.constexpr = SDC_MODE == "exact"
    COUNT: tl.constexpr = COUNTS or SDC_MODE == "exp-threshold"
    ANY_DROP: tl.constexpr = SDC_MODE == "offline"
    bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)  # longest causal rows first, every head
    b = bh // Hq
    h = bh % Hq
    hkv = h // G
    offset = Sk - Sq
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Sq
    rows_abs = tl.minimum(offs_m + offset, Sk - 1)  # last visible key of each row (padding rows: the last key)
    L = offs_m + offset + 1
    desc_q = tl.make_tensor_descriptor(Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h, shape=[Sq, D],
                                       strides=[sq_m, 1], block_shape=[BLOCK_M, D])
    desc_k = tl.make_tensor_descriptor(K + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h, shape=[Sk, D],
                                       strides=[sk_n, 1], block_shape=[BLOCK_N, D])
    desc_v = tl.make_tensor_descriptor(V + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h, shape=[Sk, D],
                                       strides=[sv_n, 1], block_shape=[BLOCK_N, D])
    q = desc_q.load([m0, 0])
    row = bh * Sq + offs_m
    if THRESHOLD:
        theta = tl.load(THETA + row, mask=mask_m, other=float("inf"))
        theta = tl.where(mask_m & (L <= k_keep), float("-inf"), theta)  # rows with L ≤ k are dense
        th_raw = theta * LOG2E / qk_scale  # compared with the raw score q·k
    else:
        theta = tl.full([BLOCK_M], float("-inf"), tl.float32)
        th_raw = theta

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_acc = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    d_s = tl.zeros([BLOCK_M], tl.float32)
    n_k = tl.zeros([BLOCK_M], tl.int32)
    m_t = tl.zeros([BLOCK_M], tl.int32)
    q_min = tl.full([BLOCK_M], float("inf"), tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    kvm_base = KVM + (b * (Hq // G) + hkv) * Sk
    full_hi = tl.minimum(((m0 + offset + 1) // BLOCK_N) * BLOCK_N, Sk)  # tiles below the diagonal
    hi = tl.minimum(m0 + BLOCK_M + offset, Sk)
    acc, l_i, d_s, m_i, m_acc, n_k, m_t, q_min = _prefill_tiles(
        acc, l_i, d_s, m_i, m_acc, n_k, m_t, q_min, q, th_raw, rows_abs, desc_k, desc_v, kvm_base, 0, full_hi,
        qk_scale, BLOCK_N, False, THRESHOLD, EXACT, COUNT, ANY_DROP, FLOOR, COUNTS, SKIP)
    acc, l_i, d_s, m_i, m_acc, n_k, m_t, q_min = _prefill_tiles(
        acc, l_i, d_s, m_i, m_acc, n_k, m_t, q_min, q, th_raw, rows_abs, desc_k, desc_v, kvm_base, full_hi, hi,
        qk_scale, BLOCK_N, True, THRESHOLD, EXACT, COUNT, ANY_DROP, FLOOR, COUNTS, SKIP)
    if SKIP and not EXACT:  # bring the lazily rescaled accumulators to the final maximum
        alpha = tl.math.exp2(m_acc - m_i)
        acc = acc * alpha[:, None]
        d_s = d_s * alpha
    kept = n_k
    empty = (d_s == 0.0) & mask_m  # nothing passed θ (the row maximum would have, with e⁰ = 1)
    d_u = tl.maximum(l_i - d_s, 0.0)  # exact SDC's dropped mass (unused by the other variants)
    if FLOOR:  # an empty row keeps its maximum element: p ∝ e^(m − m) = 1
        if tl.max(empty.to(tl.int32), 0) > 0:  # rare: only then find the argmax
            idx = _row_argmax(q, rows_abs, empty, m_t, desc_k, hi, BLOCK_M, BLOCK_N)
            d_s = tl.where(empty, 1.0, d_s)
            d_u = tl.where(empty, tl.maximum(l_i - 1.0, 0.0), d_u)
            kept = tl.where(empty, 1, n_k)
            offs_d = tl.arange(0, D)
            vrow = tl.load(V + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h + idx[:, None] * sv_n + offs_d[None, :],
                           mask=empty[:, None], other=0.0)
            acc = tl.where(empty[:, None], vrow.to(tl.float32), acc)
            if COUNTS:
                tl.store(kvm_base + idx, tl.full([BLOCK_M], 1, tl.int8), mask=empty)
    _store_rows(acc, d_s, d_u, q_min <= th_raw, theta, m_i, kept, L, row, rows_abs, mask_m, b, h, hkv, SDCT, VCUM,
                OUT, sc_b, sc_h, sc_n, so_b, so_h, so_m, offs_m, sdc_scale, SDC_MODE, VMC, D)
    if COUNTS:
        tl.store(NK + row, kept, mask=mask_m)
        tl.store(EMPTY + row, empty.to(tl.int8), mask=mask_m)


@triton.jit
def _store_rows(acc, d_s, d_u_exact, any_drop, theta, m_i, kept, L, row, rows_abs, mask_rows, b, h, hkv, SDCT, VCUM,
                OUT, sc_b, sc_h, sc_n, so_b, so_h, so_m, offs_m, sdc_scale, SDC_MODE: tl.constexpr, VMC: tl.constexpr,
                D: tl.constexpr):
    """o = acc / (D_S + s·D̃_U) (+ VMC's (1 − D_S/denominator)·v̄), stored for the rows in ``mask_rows``."""
    if SDC_MODE == "exact":
        d_u = d_u_exact
    elif SDC_MODE == "exp-threshold":
        ndrop = L - kept
        d_u = tl.where(ndrop > 0, ndrop.to(tl.float32) * tl.math.exp2(theta * LOG2E - m_i), 0.0)
    elif SDC_MODE == "offline":
        d_u = tl.where(any_drop, tl.load(SDCT + row, mask=mask_rows, other=0.0), 0.0)
    else:
        d_u = tl.zeros_like(d_s)
    denom = d_s + sdc_scale * d_u
    denom = tl.where(denom > 0, denom, 1.0)
    o = acc / denom[:, None]
    offs_d = tl.arange(0, D)
    if VMC:
        vsum = tl.load(VCUM + b.to(tl.int64) * sc_b + hkv.to(tl.int64) * sc_h + rows_abs[:, None] * sc_n
                       + offs_d[None, :], mask=mask_rows[:, None], other=0.0)
        o += (1.0 - d_s / denom)[:, None] * (vsum / L.to(tl.float32)[:, None])
    tl.store(OUT + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h + offs_m[:, None] * so_m + offs_d[None, :],
             o.to(OUT.dtype.element_ty), mask=mask_rows[:, None])


@triton.jit
def _v_segment_sums_kernel(V, SEGS, sv_b, sv_h, sv_n, Hkv, Sk, n_seg, SEG: tl.constexpr, CHUNK: tl.constexpr,
                           D: tl.constexpr):
    """SEGS[b, h, s] = Σ of V rows [s·SEG, (s+1)·SEG) in float32."""
    bh = tl.program_id(0)
    s = tl.program_id(1)
    offs_d = tl.arange(0, D)
    base = V + (bh // Hkv).to(tl.int64) * sv_b + (bh % Hkv).to(tl.int64) * sv_h
    tot = tl.zeros([D], tl.float32)
    for r0 in tl.range(s * SEG, s * SEG + SEG, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        x = tl.load(base + rows[:, None] * sv_n + offs_d[None, :], mask=(rows < Sk)[:, None], other=0.0)
        tot += tl.sum(x.to(tl.float32), 0)
    tl.store(SEGS + (bh * n_seg + s) * D + offs_d, tot)


@triton.jit
def _v_prefix_kernel(V, SEGS, VCUM, VTOT, sv_b, sv_h, sv_n, Hkv, Sk, n_seg, SEG: tl.constexpr,
                     CHUNK: tl.constexpr, D: tl.constexpr, NSEG_P2: tl.constexpr):
    """VCUM[b, h, j] = Σ_{i ≤ j} V[b, h, i] in float32 (the earlier segments' sums, then a scan
    within this segment); the last segment also writes the total, VTOT[b, h]."""
    bh = tl.program_id(0)
    s = tl.program_id(1)
    offs_d = tl.arange(0, D)
    segs = tl.arange(0, NSEG_P2)
    prev = tl.load(SEGS + (bh * n_seg + segs)[:, None] * D + offs_d[None, :], mask=(segs < s)[:, None], other=0.0)
    carry = tl.sum(prev, 0)
    base = V + (bh // Hkv).to(tl.int64) * sv_b + (bh % Hkv).to(tl.int64) * sv_h
    out = VCUM + bh.to(tl.int64) * Sk * D
    for r0 in tl.range(s * SEG, s * SEG + SEG, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        x = tl.load(base + rows[:, None] * sv_n + offs_d[None, :], mask=(rows < Sk)[:, None], other=0.0)
        c = tl.cumsum(x.to(tl.float32), 0) + carry[None, :]
        tl.store(out + rows[:, None] * D + offs_d[None, :], c, mask=(rows < Sk)[:, None])
        carry += tl.sum(x.to(tl.float32), 0)
    if s == n_seg - 1:
        tl.store(VTOT + bh * D + offs_d, carry)


def v_prefix_sum(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal prefix sum of V and its total: ((B, Hkv, Sk, d), (B, Hkv, d)), float32."""
    B, Hkv, Sk, D = v.shape
    seg = 256 if Sk > 256 else max(16, triton.next_power_of_2(Sk))
    chunk = min(64, seg)
    n_seg = triton.cdiv(Sk, seg)
    segs = torch.empty(B * Hkv, n_seg, D, dtype=torch.float32, device=v.device)
    vcum = torch.empty(B, Hkv, Sk, D, dtype=torch.float32, device=v.device)
    vtot = torch.empty(B, Hkv, D, dtype=torch.float32, device=v.device)
    grid = (B * Hkv, n_seg)
    _v_segment_sums_kernel[grid](v, segs, v.stride(0), v.stride(1), v.stride(2), Hkv, Sk, n_seg, SEG=seg, CHUNK=chunk,
                                 D=D, num_warps=4)
    _v_prefix_kernel[grid](v, segs, vcum, vtot, v.stride(0), v.stride(1), v.stride(2), Hkv, Sk, n_seg, SEG=seg,
                           CHUNK=chunk, D=D, NSEG_P2=max(2, triton.next_power_of_2(n_seg)), num_warps=4)
    return vcum, vtot


class PrefillLaunch(NamedTuple):
    """Launch configuration: tile sizes, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Default launches per (head dim, counting), chosen by benchmarks/tune_prefill.py on an H200.  A counting
# launch (kept counts and the kept-V-row mask) needs more shared memory, so it has its own entry.
_LAUNCHES: dict[tuple[int, bool], PrefillLaunch] = {
    (64, False): PrefillLaunch(64, 64, 4, 3),
    (64, True): PrefillLaunch(64, 64, 4, 3),
    (128, False): PrefillLaunch(128, 128, 8, 3),
    (128, True): PrefillLaunch(128, 64, 8, 3),
}


def prefill_config(d: int, device: torch.device, counts: bool = False) -> PrefillLaunch:
    """The default launch for a head dim, for a call with or without counts."""
    if device.type != "cuda":
        return PrefillLaunch(16, 16, 4, 1)
    return _LAUNCHES[(d, bool(counts))]


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """In-kernel tensor descriptors need Triton's global-memory allocator; set one if none is."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _tma_ready(x: torch.Tensor) -> torch.Tensor:
    """TMA needs a 16-byte aligned base and 16-byte multiples for every stride but the last."""
    x = last_dim_contiguous(x)
    es = x.element_size()
    if x.data_ptr() % 16 or any((s * es) % 16 for s in x.stride()[:-1]):
        x = x.contiguous()
    return x


def _prefill_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None,
                    sdc_term: torch.Tensor | None, scale: float, k_keep: int, sdc: SDC, sdc_scale: float,
                    vmc: bool, floor_max: bool, counts: bool, launch: PrefillLaunch, skip: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, _ = k.shape
    if Sk < Sq:
        raise ValueError(f"prefill needs kv_len ≥ q_len (bottom-right causal), got {Sk} < {Sq}")
    threshold = theta is not None
    if threshold and theta.shape != (B, Hq, Sq):
        raise ValueError(f"theta must be (B, Hq, Sq) = {(B, Hq, Sq)}, got {tuple(theta.shape)}")
    if sdc is SDC.OFFLINE and (sdc_term is None or sdc_term.shape != (B, Hq, Sq)):
        raise ValueError("offline SDC needs sdc_term (B, Hq, Sq)")
    q, k, v = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    dev = q.device
    th = theta.to(torch.float32).contiguous() if threshold else q.new_empty(1, dtype=torch.float32)
    sdc_t = sdc_term.to(torch.float32).contiguous() if sdc is SDC.OFFLINE else th
    if vmc:
        vcum, v_total = v_prefix_sum(v)
    else:
        vcum, v_total = th.new_empty(1, 1, 1, 1), th.new_empty(0)
    out = torch.empty(B, Sq, Hq, D, dtype=q.dtype, device=dev)  # (B, Sq, Hq, d): what transformers wants next
    if counts:
        nk = torch.empty(B, Hq, Sq, dtype=torch.int32, device=dev)
        empty = torch.empty(B, Hq, Sq, dtype=torch.int8, device=dev)
        kvm = torch.zeros(B, Hkv, Sk, dtype=torch.int8, device=dev)
    else:
        nk = torch.empty(1, 1, 1, dtype=torch.int32, device=dev)
        empty = torch.empty(1, 1, 1, dtype=torch.int8, device=dev)
        kvm = torch.empty(1, 1, 1, dtype=torch.int8, device=dev)
    if _decode_mod.POISON_OUTPUTS:
        out.fill_(float("nan"))
        if counts:
            nk.fill_(-1), empty.fill_(-1)
    if dev.type == "cuda":
        _ensure_allocator()
    grid = (B * Hq, triton.cdiv(Sq, launch.block_m))
    _prefill_kernel[grid](
        q, k, v, th, sdc_t, vcum, out, nk, empty, kvm,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(2), out.stride(1), vcum.stride(0), vcum.stride(1), vcum.stride(2),
        Hq, Sq, Sk, int(k_keep), float(scale) * LOG2E.value, float(sdc_scale),
        G=Hq // Hkv, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, D=D, THRESHOLD=threshold, SDC_MODE=sdc.value,
        FLOOR=floor_max and threshold, VMC=vmc, COUNTS=counts, SKIP=skip,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out, nk, empty, kvm, v_total


@torch.library.custom_op("toptheta::prefill", mutates_args=())
def _prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None,
                sdc_term: torch.Tensor | None, scale: float, k_keep: int, sdc: str, sdc_scale: float, vmc: bool,
                floor_max: bool, counts: bool, launch: list[int], skip: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _prefill_launch(q, k, v, theta, sdc_term, scale, k_keep, SDC(sdc), sdc_scale, vmc, floor_max, counts,
                           PrefillLaunch(*launch), skip)


@_prefill_op.register_fake
def _(q, k, v, theta, sdc_term, scale, k_keep, sdc, sdc_scale, vmc, floor_max, counts, launch, skip):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    shp = (B, Hq, Sq) if counts else (1, 1, 1)
    return (q.new_empty(B, Sq, Hq, D), q.new_empty(shp, dtype=torch.int32), q.new_empty(shp, dtype=torch.int8),
            q.new_empty((B, Hkv, Sk) if counts else (1, 1, 1), dtype=torch.int8),
            q.new_empty((B, Hkv, D) if vmc else (0,), dtype=torch.float32))


def topθ_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None, *,
                 config: SparseConfig, k_keep: int, sdc_term: torch.Tensor | None = None,
                 scale: float | None = None, counts: bool = True, return_v_sum: bool = False,
                 block_m: int = 0, block_n: int = 0, num_warps: int = 0, num_stages: int = 0,
                 skip_tiles: bool = False):
    """Causal Top-θ attention (prefill or chunked prefill).

    Args:
        q: (B, Hq, Sq, d); k, v: (B, Hkv, Sk, d) with Sk ≥ Sq.  Query row i sits at absolute
            position Sk − Sq + i and sees keys j ≤ Sk − Sq + i (row length L = Sk − Sq + i + 1).
            fp16/bf16, d ∈ {64, 128}; any strides with a contiguous last dimension.
        theta: (B, Hq, Sq) θ per row in logit space (``None`` only for dense).
        config: top-θ pre-softmax (any SDC, VMC, floor) or dense.
        k_keep: this layer's k: rows with L ≤ k_keep are dense.
        sdc_term: (B, Hq, Sq) offline SDC term C, for ``sdc=offline``.
        counts: also return :class:`KernelCounts` (otherwise ``None``).
        return_v_sum: also return the float32 sum of all V rows (B, Hkv, d) (VMC only), which
            seeds the running sum the decode kernel reads.
        block_m, block_n, num_warps, num_stages: launch configuration (0: :func:`prefill_config`'s
            default for the head dim).
        skip_tiles: test each tile for a survivor and skip the exponentials, the V load and P·V
            of empty tiles.  The result is the same either way.  Off by default: the test and the
            branch cost more than they save unless whole tiles are empty, which real attention
            rarely has (``benchmarks/results/kernels.md``).
    Returns:
        ``(out, counts)`` or ``(out, counts, v_sum)``; ``out`` is (B, Hq, Sq, d) in q's dtype, a
        transposed view of a contiguous (B, Sq, Hq, d) buffer.
    """
    B, Hq, Hkv, Sq, Sk, d = check_qkv(q, k, v)
    var = kernel_variant(config)
    if var is None:
        raise NotImplementedError(f"the prefill kernel does not implement {config.label()}")
    if var.dense:
        theta, sdc = None, SDC.NONE
    elif theta is None:
        raise ValueError("top-theta needs theta")
    else:
        sdc = config.sdc
    skip = bool(skip_tiles) and not var.dense
    dflt = prefill_config(d, q.device, counts)
    launch = PrefillLaunch(block_m or dflt.block_m, block_n or dflt.block_n, num_warps or dflt.num_warps,
                           num_stages or dflt.num_stages)
    scale = float(d ** -0.5 if scale is None else scale)
    if torch.compiler.is_compiling():
        out, nk, empty, kvm, v_total = torch.ops.toptheta.prefill(
            q, k, v, theta, sdc_term, scale, int(k_keep), sdc.value, var.sdc_scale, var.vmc, var.floor_max,
            bool(counts), list(launch), skip)
    else:  # eager: no op overhead
        out, nk, empty, kvm, v_total = _prefill_launch(q, k, v, theta, sdc_term, scale, int(k_keep), sdc,
                                                       var.sdc_scale, var.vmc, var.floor_max, bool(counts), launch,
                                                       skip)
    kc = None
    if counts:
        kc = KernelCounts(kept=nk.sum(-1, dtype=torch.int32), empty=empty.sum(-1, dtype=torch.int32),
                          kept_v_rows=kvm.sum(-1, dtype=torch.int32))
    out = out.transpose(1, 2)
    if return_v_sum:
        return out, kc, (v_total if var.vmc else None)
    return out, kc
