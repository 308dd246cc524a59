"""Top-θ decode: one new query token per sequence against a KV cache, skipping V rows.

Flash-decoding layout: the grid is (batch·KV heads, splits).  One program handles every
query head of a KV head (GQA group, padded to 16 rows for the tensor cores) over one split
of the sequence.  For each block of keys it computes the scores of all heads, compares each
with θ of its head (one compare per element), and loads a V row only when some head of the
group keeps it: the V load is predicated per row (a d=128 bf16 row is 256 contiguous bytes;
a masked-off row issues no memory transaction).  All of K is read (a threshold needs every
score); only kept V rows are.  The V load of a block is issued as soon as its keep mask is
known and consumed one block later (software pipelining by hand), so its latency hides behind
the next block's QKᵀ: a data-dependent load cannot be prefetched by the compiler.

Each split writes partial statistics (running max ``m`` of all visible scores and its index,
``D_S``, the exact dropped mass ``D_U``, kept count, ``Σ p v``, kept-V-row count); a combine
kernel merges the splits, applies the empty-row floor, SDC (exact / exp-threshold / offline)
and VMC (``v̄`` from a running V sum kept beside the cache, O(d) per step) and writes the
output and the kept counts.

Scores are handled in the log2 domain (``s·log2 e``) so the kernels use ``exp2``; θ is scaled
the same way, which can flip a compare only for scores within an ulp of θ.

Layers: ``_decode_split_kernel`` / ``_decode_combine_kernel`` (Triton) → ``_decode_launch``
(checks, allocation, grid) → ``toptheta::decode`` (custom op + fake) → :func:`topθ_decode`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..config import SparseConfig
from ._common import KernelCounts, check_qkv, kernel_variant, last_dim_contiguous, next_pow2

LOG2E = 1.4426950408889634

# Tests set this to fill outputs with NaN / -1 before every launch (every element must be written).
POISON_OUTPUTS = False


@triton.jit
def _decode_split_kernel(
    Q, K, V, THETA,
    PM, PI, PDS, PDU, PNK, PACC, PKV,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    Hkv, N, split_len, S, scale_log2,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    EXACT: tl.constexpr, FLOOR: tl.constexpr,
):
    pid = tl.program_id(0)  # b · Hkv + kv head
    sid = tl.program_id(1)  # split
    b = pid // Hkv
    hkv = pid % Hkv
    Hq = Hkv * G
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    h = hkv * G + offs_g  # query heads of the group
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + offs_d[None, :], mask=mask_g[:, None], other=0.0)  # (G, D)
    th = tl.load(THETA + b * Hq + h, mask=mask_g, other=float("inf")) * 1.4426950408889634  # θ·log2 e

    start = sid * split_len
    end = tl.minimum(start + split_len, N)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of all visible scores (log2 domain)
    idx = tl.zeros([BLOCK_G], tl.int32)  # its position (empty-row floor)
    ds = tl.zeros([BLOCK_G], tl.float32)  # Σ_kept 2^(s − m)
    du = tl.zeros([BLOCK_G], tl.float32)  # Σ_dropped 2^(s − m)   (exact SDC)
    nk = tl.zeros([BLOCK_G], tl.int32)  # kept count
    kvc = tl.zeros([BLOCK_N], tl.int32)  # kept V rows (union over the group), per lane
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    k_base = K + b * sk_b + hkv * sk_h
    v_base = V + b * sv_b + hkv * sv_h
    # V loads are software-pipelined by hand: the (row-predicated) load of block i is issued
    # right after its keep mask is known and consumed one iteration later, so its latency
    # overlaps the next block's QKᵀ instead of stalling on it.
    p_prev = tl.zeros([BLOCK_G, BLOCK_N], V.dtype.element_ty)
    v_prev = tl.zeros([BLOCK_N, D], V.dtype.element_ty)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        kt = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kt)) * scale_log2  # (G, BLOCK_N) fp32
        s = tl.where(mask_n[None, :], s, float("-inf"))
        keep = s > th[:, None]
        if FLOOR:  # running argmax (one row reduction gives max and index; first index on ties)
            tmax, arg = tl.max(s, 1, return_indices=True)
            idx = tl.where(tmax > m, n0 + arg.to(tl.int32), idx)
        else:
            tmax = tl.max(s, 1)
        nk += tl.sum(keep.to(tl.int32), 1)
        m_new = tl.maximum(m, tmax)
        alpha = tl.exp2(m - m_new)
        m = m_new
        acc = tl.dot(p_prev, v_prev, acc) * alpha[:, None]  # previous block, then rescale
        p_all = tl.exp2(s - m[:, None])
        p = tl.where(keep, p_all, 0.0)
        ds = ds * alpha + tl.sum(p, 1)
        if EXACT:
            du = du * alpha + tl.sum(p_all - p, 1)
        krow = tl.max(keep.to(tl.int32), 0)  # (BLOCK_N,) 1 where some head keeps the row
        kvc += krow
        # only kept rows are read: a fully masked row issues no memory transaction
        v_prev = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=(krow > 0)[:, None], other=0.0)
        p_prev = p.to(V.dtype.element_ty)
    acc += tl.dot(p_prev, v_prev)

    part = (b * Hq + h) * S + sid
    tl.store(PM + part, m, mask=mask_g)
    tl.store(PI + part, idx, mask=mask_g)
    tl.store(PDS + part, ds, mask=mask_g)
    tl.store(PDU + part, du, mask=mask_g)
    tl.store(PNK + part, nk, mask=mask_g)
    tl.store(PACC + part[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None])
    tl.store(PKV + pid * S + sid, tl.sum(kvc, 0))


@triton.jit
def _decode_combine_kernel(
    Q, K, V, THETA, SDCT, VSUM,
    PM, PI, PDS, PDU, PNK, PACC, PKV,
    OUT, KEPT, EMPTY, KVOUT,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h,
    Hkv, N, S, scale_log2, sdc_scale,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, D: tl.constexpr,
    SDC_MODE: tl.constexpr, FLOOR: tl.constexpr, VMC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // Hkv
    hkv = pid % Hkv
    Hq = Hkv * G
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    h = hkv * G + offs_g
    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    mask_gs = mask_g[:, None] & mask_s[None, :]
    base = (b * Hq + h) * S  # (G,)
    pm = tl.load(PM + base[:, None] + offs_s[None, :], mask=mask_gs, other=float("-inf"))
    m = tl.max(pm, 1)
    m = tl.where(mask_g, m, 0.0)
    w = tl.exp2(pm - m[:, None])  # 0 on padding
    ds = tl.sum(tl.load(PDS + base[:, None] + offs_s[None, :], mask=mask_gs, other=0.0) * w, 1)
    du = tl.sum(tl.load(PDU + base[:, None] + offs_s[None, :], mask=mask_gs, other=0.0) * w, 1)
    nk = tl.sum(tl.load(PNK + base[:, None] + offs_s[None, :], mask=mask_gs, other=0), 1)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    offs_c = tl.arange(0, CHUNK_S)
    for s0 in range(0, S, CHUNK_S):  # CHUNK_S splits at a time: few dependent loads
        sc = s0 + offs_c
        msk = mask_g[:, None] & (sc < S)[None, :]
        ws = tl.exp2(tl.load(PM + base[:, None] + sc[None, :], mask=msk, other=float("-inf")) - m[:, None])
        a = tl.load(PACC + (base[:, None, None] + sc[None, :, None]) * D + offs_d[None, None, :],
                    mask=msk[:, :, None], other=0.0)  # (G, CHUNK_S, D)
        acc += tl.sum(a * ws[:, :, None], 1)
    th = tl.load(THETA + b * Hq + h, mask=mask_g, other=float("inf")) * 1.4426950408889634
    ndrop = N - nk
    kept = nk
    empty = (nk == 0) & mask_g
    kv_extra = 0
    if FLOOR:  # an empty row keeps its maximum element
        s_arg = tl.argmax(pm, 1)
        pi = tl.load(PI + base[:, None] + offs_s[None, :], mask=mask_gs, other=0)
        idx = tl.sum(tl.where(offs_s[None, :] == s_arg[:, None], pi, 0), 1)
        ds = tl.where(empty, 1.0, ds)
        du = tl.where(empty, tl.maximum(du - 1.0, 0.0), du)
        ndrop = tl.where(empty, ndrop - 1, ndrop)
        kept = tl.where(empty, 1, nk)
        vrow = tl.load(V + b * sv_b + hkv * sv_h + idx[:, None] * sv_n + offs_d[None, :], mask=empty[:, None], other=0.0)
        acc = tl.where(empty[:, None], vrow.to(tl.float32), acc)
        # the floor row joins the kept-V union unless another head keeps it or an earlier head floors it
        krow = tl.load(K + b * sk_b + hkv * sk_h + idx[:, None] * sk_n + offs_d[None, :], mask=empty[:, None], other=0.0)
        qf = tl.load(Q + b * sq_b + h[:, None] * sq_h + offs_d[None, :], mask=mask_g[:, None], other=0.0)
        s2 = tl.sum(qf.to(tl.float32)[:, None, :] * krow.to(tl.float32)[None, :, :], 2) * scale_log2  # (g', g)
        by_thr = tl.max(tl.where(mask_g[:, None] & (s2 > th[:, None]), 1, 0), 0) > 0
        dup = tl.max(tl.where((offs_g[:, None] < offs_g[None, :]) & empty[:, None] & (idx[:, None] == idx[None, :]), 1, 0), 0) > 0
        kv_extra = tl.sum((empty & (~by_thr) & (~dup)).to(tl.int32), 0)
    if SDC_MODE == 1:  # exact
        d_u = du
    elif SDC_MODE == 2:  # exp-threshold: |U| · e^(θ − m)
        d_u = tl.where(ndrop > 0, ndrop.to(tl.float32) * tl.exp2(th - m), 0.0)
    elif SDC_MODE == 3:  # offline: C[ℓ, h, L] where something was dropped
        c = tl.load(SDCT + b * Hq + h, mask=mask_g, other=0.0)
        d_u = tl.where(ndrop > 0, c, 0.0)
    else:
        d_u = tl.zeros([BLOCK_G], tl.float32)
    denom = ds + sdc_scale * d_u
    denom = tl.where(denom > 0, denom, 1.0)
    o = acc / denom[:, None]
    if VMC:
        vmean = tl.load(VSUM + pid * D + offs_d) / N
        o += (1.0 - ds / denom)[:, None] * vmean[None, :]
    tl.store(OUT + b * so_b + h[:, None] * so_h + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=mask_g[:, None])
    tl.store(KEPT + b * Hq + h, kept, mask=mask_g)
    tl.store(EMPTY + b * Hq + h, empty.to(tl.int32), mask=mask_g)
    kv = tl.sum(tl.load(PKV + pid * S + offs_s, mask=mask_s, other=0), 0) + kv_extra
    tl.store(KVOUT + pid, kv)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def decode_splits(B: int, Hkv: int, N: int, block_n: int, device: torch.device, waves: int = 8) -> int:
    """Number of sequence splits: about ``waves`` programs per SM, at least one key block per split."""
    target = waves * _sm_count(device)
    return max(1, min(triton.cdiv(N, block_n), triton.cdiv(target, B * Hkv)))


def _decode_launch(q3: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
                   sdc_term: torch.Tensor | None, v_sum: torch.Tensor | None, scale: float, sdc_code: int,
                   sdc_scale: float, vmc: bool, floor_max: bool, num_splits: int, block_n: int, num_warps: int,
                   num_stages: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hq, D = q3.shape
    _, Hkv, N, _ = k.shape
    G = Hq // Hkv
    if N < 1:
        raise ValueError("decode needs at least one key")
    if theta.shape != (B, Hq):
        raise ValueError(f"theta must be (B, Hq) = {(B, Hq)}, got {tuple(theta.shape)}")
    if sdc_code == 3 and (sdc_term is None or sdc_term.shape != (B, Hq)):
        raise ValueError("offline SDC needs sdc_term (B, Hq)")
    if vmc and (v_sum is None or v_sum.shape != (B, Hkv, D)):
        raise ValueError("VMC needs v_sum (B, Hkv, d): the float32 sum of the N V rows")
    q3, k, v = last_dim_contiguous(q3), last_dim_contiguous(k), last_dim_contiguous(v)
    theta = theta.to(torch.float32).contiguous()
    sdc_t = sdc_term.to(torch.float32).contiguous() if sdc_term is not None else theta
    vsum = v_sum.to(torch.float32).contiguous() if v_sum is not None else theta
    # tuned on H200 (benchmarks/tune_decode.py, results/decode_tuning_H200.csv): 64 keys, 2 warps,
    # 8 programs per SM beat 128 keys, 4 warps, 4 per SM by 3-4 % on bandwidth-bound shapes
    block_n = block_n or 64
    if num_splits <= 0:
        num_splits = decode_splits(B, Hkv, N, block_n, q3.device)
    split_len = triton.cdiv(triton.cdiv(N, num_splits), block_n) * block_n
    S = triton.cdiv(N, split_len)
    dev = q3.device
    f32 = dict(dtype=torch.float32, device=dev)
    pm, pds, pdu = (torch.empty(B, Hq, S, **f32) for _ in range(3))
    pi = torch.empty(B, Hq, S, dtype=torch.int32, device=dev)
    pnk = torch.empty(B, Hq, S, dtype=torch.int32, device=dev)
    pacc = torch.empty(B, Hq, S, D, **f32)
    pkv = torch.empty(B, Hkv, S, dtype=torch.int32, device=dev)
    out = torch.empty(B, Hq, D, dtype=q3.dtype, device=dev)
    kept = torch.empty(B, Hq, dtype=torch.int32, device=dev)
    empty = torch.empty(B, Hq, dtype=torch.int32, device=dev)
    kvout = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    if POISON_OUTPUTS:
        out.fill_(float("nan")), kept.fill_(-1), empty.fill_(-1), kvout.fill_(-1)
    scale_log2 = float(scale) * LOG2E
    block_g = max(16, next_pow2(G))
    _decode_split_kernel[(B * Hkv, S)](
        q3, k, v, theta, pm, pi, pds, pdu, pnk, pacc, pkv,
        q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        Hkv, N, split_len, S, scale_log2,
        G=G, BLOCK_G=block_g, BLOCK_N=block_n, D=D, EXACT=sdc_code == 1, FLOOR=floor_max,
        num_warps=num_warps or 2, num_stages=num_stages or 3,
    )
    _decode_combine_kernel[(B * Hkv,)](
        q3, k, v, theta, sdc_t, vsum, pm, pi, pds, pdu, pnk, pacc, pkv, out, kept, empty, kvout,
        q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        Hkv, N, S, scale_log2, float(sdc_scale),
        G=G, BLOCK_G=max(2, next_pow2(G)), BLOCK_S=max(2, next_pow2(S)),
        CHUNK_S=max(2, min(next_pow2(S), max(2, 64 // next_pow2(G)))), D=D,
        SDC_MODE=sdc_code, FLOOR=floor_max, VMC=vmc, num_warps=4,
    )
    return out, kept, empty, kvout


@torch.library.custom_op("toptheta::decode", mutates_args=())
def _decode_op(q3: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
               sdc_term: torch.Tensor | None, v_sum: torch.Tensor | None, scale: float, sdc_code: int,
               sdc_scale: float, vmc: bool, floor_max: bool, num_splits: int, block_n: int, num_warps: int,
               num_stages: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _decode_launch(q3, k, v, theta, sdc_term, v_sum, scale, sdc_code, sdc_scale, vmc, floor_max, num_splits,
                          block_n, num_warps, num_stages)


@_decode_op.register_fake
def _(q3, k, v, theta, sdc_term, v_sum, scale, sdc_code, sdc_scale, vmc, floor_max, num_splits, block_n,
      num_warps, num_stages):
    B, Hq, D = q3.shape
    Hkv = k.shape[1]
    i32 = dict(dtype=torch.int32, device=q3.device)
    return (q3.new_empty(B, Hq, D), torch.empty(B, Hq, **i32), torch.empty(B, Hq, **i32),
            torch.empty(B, Hkv, **i32))


def topθ_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None, *,
                config: SparseConfig, k_keep: int, sdc_term: torch.Tensor | None = None,
                v_sum: torch.Tensor | None = None, scale: float | None = None, num_splits: int = 0,
                block_n: int = 64, num_warps: int = 2, num_stages: int = 3
                ) -> tuple[torch.Tensor, KernelCounts]:
    """Top-θ attention of one new query token per sequence against the whole cache.

    Args:
        q: (B, Hq, 1, d) the new token's queries; k, v: (B, Hkv, N, d) the cache, every key
            visible (no padding).  fp16/bf16, d ∈ {64, 128}; query head h reads KV head
            h // (Hq // Hkv).  Any strides with a contiguous last dimension.
        theta: (B, Hq, 1) or (B, Hq) θ per row in logit space (``None`` only for dense).
        config: selection, SDC, VMC, empty-row floor (top-θ pre-softmax or dense; see
            :func:`~topθ_core.kernels.kernel_variant`).
        k_keep: this layer's k; the row is dense when N ≤ k_keep.
        sdc_term: (B, Hq[, 1]) offline SDC term C, for ``sdc=offline``.
        v_sum: (B, Hkv, d) float32 sum of the N V rows, for VMC (v̄ = v_sum / N).
    Returns:
        out (B, Hq, 1, d) in q's dtype, and :class:`KernelCounts`.
    """
    B, Hq, Hkv, Sq, N, d = check_qkv(q, k, v)
    if Sq != 1:
        raise ValueError(f"decode takes one query token per sequence, got {Sq}")
    var = kernel_variant(config)
    if var is None:
        raise NotImplementedError(f"the decode kernel does not implement {config.label()}")
    if var.dense or N <= k_keep:
        theta = q.new_full((B, Hq), float("-inf"), dtype=torch.float32)
    elif theta is None:
        raise ValueError("top-theta needs theta")
    theta = theta.reshape(B, Hq)
    sdc_term = sdc_term.reshape(B, Hq) if sdc_term is not None else None
    op = torch.ops.toptheta.decode if torch.compiler.is_compiling() else _decode_launch
    out, kept, empty, kv = op(
        q[:, :, 0, :], k, v, theta, sdc_term, v_sum, float(d ** -0.5 if scale is None else scale), var.sdc,
        var.sdc_scale, var.vmc, var.floor_max, int(num_splits), int(block_n), int(num_warps), int(num_stages))
    return out.unsqueeze(2), KernelCounts(kept=kept, empty=empty, kept_v_rows=kv)
