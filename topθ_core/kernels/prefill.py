"""Top-θ prefill: causal FlashAttention-2-style tiles with a per-element θ test.

Grid: (query blocks, batch·query heads), heaviest causal blocks first.  One program holds
BLOCK_M query rows of one head and walks the key blocks the rows can see (bottom-right causal
alignment, so chunked prefill with ``Sq < Sk`` works).  Every tile computes QKᵀ (a threshold
needs every score), the tile's row maxima (the running maximum ``m`` over all visible scores,
needed by offline/exp-threshold SDC and the empty-row floor) and one compare per element with
the row's θ (θ[layer, head, L] with L the row length; rows with L ≤ k are dense, θ = −∞).

Two loop forms, same result:
* straight-line (default): every tile does the FlashAttention step with the dropped
  elements' probabilities zeroed;
* ``skip_tiles``: when no element of a tile passes θ the program skips the exponentials,
  the V-tile load and P·V.  θ is static, so this test does not depend on tile order.
  Accumulators are then rescaled lazily (``acc`` and ``D_S`` stay relative to the maximum as
  of the last kept tile, ``m_acc``).  Exact SDC needs ``D_U`` and so every exponential; it
  still skips the V load and P·V.  The CTA-wide test and the branch cost more than they save
  unless whole tiles are empty, which they rarely are (``benchmarks/results/kernels.md``).

The empty-row floor needs each empty row's argmax.  The main loop only records which tile last
raised each row's running maximum; a block that ends with an empty row recomputes QKᵀ for those
tiles alone.  VMC reads ``v̄_i`` from a causal prefix sum of V (scanned along the last axis of a
(B, Hkv, d, Sk) copy).  Kept counts come out per row and the kept-V-row union as a byte mask
over keys per KV head, both only when asked for.

Layers: ``_prefill_kernel`` (Triton) → ``_prefill_launch`` → ``toptheta::prefill`` (custom op
+ fake) → :func:`topθ_prefill`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import SparseConfig
from . import decode as _decode_mod
from ._common import KernelCounts, check_qkv, kernel_variant, last_dim_contiguous

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_tiles(acc, ds, du, m, m_acc, nk, mt, q, th, rows_abs, k_base, v_base, kvm_base, sk_n, sv_n, Sk,
                   lo, hi, scale_log2,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr,
                   SKIP: tl.constexpr, COUNTS: tl.constexpr, FLOOR: tl.constexpr):
    offs_d = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kt = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=(offs_n < Sk)[:, None], other=0.0)
        else:
            kt = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :])
        s = tl.dot(q, tl.trans(kt)) * scale_log2  # (BLOCK_M, BLOCK_N), log2 domain
        if MASKED:
            s = tl.where((offs_n[None, :] <= rows_abs[:, None]) & (offs_n < Sk)[None, :], s, float("-inf"))
        tmax = tl.max(s, 1)
        if FLOOR:  # the tile that last raised the running max (first on ties): the floor's argmax lies there
            mt = tl.where(tmax > m, n0, mt)
        m_new = tl.maximum(m, tmax)
        if SKIP:
            # the tile test: does any element pass θ?  One row-vector reduction, no mask needed.
            any_keep = tl.max((tmax > th).to(tl.int32), 0) > 0
        else:
            any_keep = True
        if EXACT or not SKIP:  # straight-line FlashAttention step (exact SDC needs every exponential)
            keep = s > th[:, None]
            nk += tl.sum(keep.to(tl.int32), 1)
            alpha = tl.exp2(m - m_new)
            m = m_new
            p_all = tl.exp2(s - m[:, None])
            p = tl.where(keep, p_all, 0.0)
            ds = ds * alpha + tl.sum(p, 1)
            if EXACT:
                du = du * alpha + tl.sum(p_all - p, 1)
            acc = acc * alpha[:, None]
            if any_keep:
                if MASKED:
                    vt = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=(offs_n < Sk)[:, None],
                                 other=0.0)
                else:
                    vt = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :])
                acc = tl.dot(p.to(vt.dtype), vt, acc)
                if COUNTS:
                    krow = tl.max(keep.to(tl.int32), 0)
                    tl.store(kvm_base + offs_n, krow.to(tl.int8), mask=krow > 0)
        else:
            m = m_new
            if any_keep:  # the skip: no compare mask, exp, V load or P·V when nothing passed θ
                keep = s > th[:, None]
                nk += tl.sum(keep.to(tl.int32), 1)
                alpha = tl.exp2(m_acc - m)
                m_acc = m
                p = tl.where(keep, tl.exp2(s - m[:, None]), 0.0)
                ds = ds * alpha + tl.sum(p, 1)
                if MASKED:
                    vt = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=(offs_n < Sk)[:, None],
                                 other=0.0)
                else:
                    vt = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :])
                acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
                if COUNTS:
                    krow = tl.max(keep.to(tl.int32), 0)
                    tl.store(kvm_base + offs_n, krow.to(tl.int8), mask=krow > 0)
    return acc, ds, du, m, m_acc, nk, mt


@triton.jit
def _row_argmax(q, rows_abs, need, mt, k_base, sk_n, Sk, hi, scale_log2, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Index of the largest visible score of the rows in ``need`` (first on ties).  The main loop
    recorded, per row, the tile ``mt`` that last raised its running max; only those tiles get a
    second QKᵀ, so the main loop carries no per-element argmax."""
    offs_d = tl.arange(0, D)
    idx = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(0, hi, BLOCK_N):
        here = need & (mt == n0)
        if tl.max(here.to(tl.int32), 0) > 0:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kt = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=(offs_n < Sk)[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kt)) * scale_log2
            s = tl.where((offs_n[None, :] <= rows_abs[:, None]) & (offs_n < Sk)[None, :], s, float("-inf"))
            _, arg = tl.max(s, 1, return_indices=True)
            idx = tl.where(here, n0 + arg.to(tl.int32), idx)
    return idx


@triton.jit
def _prefill_kernel(
    Q, K, V, THETA, SDCT, VCUM, OUT, NK, EMPTY, KVM,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, sc_b, sc_h, sc_d, sc_n,
    Hq, Sq, Sk, k_keep, scale_log2, sdc_scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    SDC_MODE: tl.constexpr, EXACT: tl.constexpr, FLOOR: tl.constexpr, VMC: tl.constexpr, COUNTS: tl.constexpr,
    SKIP: tl.constexpr,
):
    num_m = tl.cdiv(Sq, BLOCK_M)
    start_m = num_m - 1 - tl.program_id(0)  # longest causal rows first
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hkv = h // G
    offset = Sk - Sq
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Sq
    rows_abs = offs_m + offset  # last visible key of each row
    L = rows_abs + 1
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    row = (b * Hq + h) * Sq + offs_m
    th = tl.load(THETA + row, mask=mask_m, other=float("inf")) * 1.4426950408889634
    th = tl.where(mask_m & (L <= k_keep), float("-inf"), th)  # rows with L ≤ k are dense

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_acc = tl.full([BLOCK_M], float("-inf"), tl.float32)
    ds = tl.zeros([BLOCK_M], tl.float32)
    du = tl.zeros([BLOCK_M], tl.float32)
    nk = tl.zeros([BLOCK_M], tl.int32)
    mt = tl.zeros([BLOCK_M], tl.int32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    k_base = K + b * sk_b + hkv * sk_h
    v_base = V + b * sv_b + hkv * sv_h
    kvm_base = KVM + (b * (Hq // G) + hkv) * Sk
    full_hi = tl.minimum(((m0 + offset + 1) // BLOCK_N) * BLOCK_N, Sk)
    hi = tl.minimum(m0 + BLOCK_M + offset, Sk)
    acc, ds, du, m, m_acc, nk, mt = _prefill_tiles(
        acc, ds, du, m, m_acc, nk, mt, q, th, rows_abs, k_base, v_base, kvm_base, sk_n, sv_n, Sk, 0, full_hi,
        scale_log2, BLOCK_N, D, False, EXACT, SKIP, COUNTS, FLOOR)
    acc, ds, du, m, m_acc, nk, mt = _prefill_tiles(
        acc, ds, du, m, m_acc, nk, mt, q, th, rows_abs, k_base, v_base, kvm_base, sk_n, sv_n, Sk, full_hi, hi,
        scale_log2, BLOCK_N, D, True, EXACT, SKIP, COUNTS, FLOOR)
    if SKIP and not EXACT:  # bring the lazily rescaled accumulators to the final maximum
        alpha = tl.exp2(m_acc - m)
        acc = acc * alpha[:, None]
        ds = ds * alpha
    ndrop = L - nk
    kept = nk
    empty = (nk == 0) & mask_m
    if FLOOR:  # an empty row keeps its maximum element: p ∝ e^(m − m) = 1
        if tl.max(empty.to(tl.int32), 0) > 0:  # rare: only then find the argmax
            idx = _row_argmax(q, rows_abs, empty, mt, k_base, sk_n, Sk, hi, scale_log2, BLOCK_M, BLOCK_N, D)
            ds = tl.where(empty, 1.0, ds)
            du = tl.where(empty, tl.maximum(du - 1.0, 0.0), du)
            ndrop = tl.where(empty, ndrop - 1, ndrop)
            kept = tl.where(empty, 1, nk)
            vrow = tl.load(v_base + idx[:, None] * sv_n + offs_d[None, :], mask=empty[:, None], other=0.0)
            acc = tl.where(empty[:, None], vrow.to(tl.float32), acc)
            if COUNTS:
                tl.store(kvm_base + idx, tl.full([BLOCK_M], 1, tl.int8), mask=empty)
    if SDC_MODE == 1:
        d_u = du
    elif SDC_MODE == 2:
        d_u = tl.where(ndrop > 0, ndrop.to(tl.float32) * tl.exp2(th - m), 0.0)
    elif SDC_MODE == 3:
        c = tl.load(SDCT + row, mask=mask_m, other=0.0)
        d_u = tl.where(ndrop > 0, c, 0.0)
    else:
        d_u = tl.zeros([BLOCK_M], tl.float32)
    denom = ds + sdc_scale * d_u
    denom = tl.where(denom > 0, denom, 1.0)
    o = acc / denom[:, None]
    if VMC:
        vsum = tl.load(VCUM + b * sc_b + hkv * sc_h + rows_abs[:, None] * sc_n + offs_d[None, :] * sc_d,
                       mask=mask_m[:, None],
                       other=0.0)
        o += (1.0 - ds / denom)[:, None] * (vsum / L.to(tl.float32)[:, None])
    tl.store(OUT + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :], o.to(OUT.dtype.element_ty),
             mask=mask_m[:, None])
    if COUNTS:
        tl.store(NK + row, kept, mask=mask_m)
        tl.store(EMPTY + row, empty.to(tl.int8), mask=mask_m)


def prefill_config(d: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if d <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def _prefill_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
                    sdc_term: torch.Tensor | None, scale: float, k_keep: int, sdc_code: int, sdc_scale: float,
                    vmc: bool, floor_max: bool, counts: bool, block_m: int, block_n: int, num_warps: int,
                    num_stages: int, skip: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, _ = k.shape
    if Sk < Sq:
        raise ValueError(f"prefill needs kv_len ≥ q_len (bottom-right causal), got {Sk} < {Sq}")
    if theta.shape != (B, Hq, Sq):
        raise ValueError(f"theta must be (B, Hq, Sq) = {(B, Hq, Sq)}, got {tuple(theta.shape)}")
    if sdc_code == 3 and (sdc_term is None or sdc_term.shape != (B, Hq, Sq)):
        raise ValueError("offline SDC needs sdc_term (B, Hq, Sq)")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    theta = theta.to(torch.float32).contiguous()
    sdc_t = sdc_term.to(torch.float32).contiguous() if sdc_term is not None else theta
    # VMC's causal prefix sum of V, scanned along the last dimension of a (B, Hkv, d, Sk) copy:
    # torch scans a middle dimension one sequential thread per column (milliseconds at 16k keys),
    # the last dimension in parallel.  The kernel reads it through strides.
    if vmc:
        vcum = torch.cumsum(v.transpose(2, 3).to(torch.float32, memory_format=torch.contiguous_format), dim=-1)
    else:
        vcum = theta.new_empty(1, 1, 1, 1)
    dm, dn, dw, dst = prefill_config(D, q.device)
    block_m, block_n = block_m or dm, block_n or dn
    num_warps, num_stages = num_warps or dw, num_stages or dst
    dev = q.device
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
    grid = (triton.cdiv(Sq, block_m), B * Hq)
    _prefill_kernel[grid](
        q, k, v, theta, sdc_t, vcum, out, nk, empty, kvm,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(2), out.stride(1),
        vcum.stride(0), vcum.stride(1), vcum.stride(2), vcum.stride(3),
        Hq, Sq, Sk, int(k_keep), float(scale) * LOG2E, float(sdc_scale),
        G=Hq // Hkv, BLOCK_M=block_m, BLOCK_N=block_n, D=D, SDC_MODE=sdc_code, EXACT=sdc_code == 1, FLOOR=floor_max,
        VMC=vmc, COUNTS=counts, SKIP=bool(skip), num_warps=num_warps, num_stages=num_stages,
    )
    v_total = vcum[..., -1].clone() if vmc else theta.new_empty(0)
    return out, nk, empty, kvm, v_total


@torch.library.custom_op("toptheta::prefill", mutates_args=())
def _prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, sdc_term: torch.Tensor | None,
                scale: float, k_keep: int, sdc_code: int, sdc_scale: float, vmc: bool, floor_max: bool, counts: bool,
                block_m: int, block_n: int, num_warps: int, num_stages: int, skip: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _prefill_launch(q, k, v, theta, sdc_term, scale, k_keep, sdc_code, sdc_scale, vmc, floor_max, counts,
                           block_m, block_n, num_warps, num_stages, skip)


@_prefill_op.register_fake
def _(q, k, v, theta, sdc_term, scale, k_keep, sdc_code, sdc_scale, vmc, floor_max, counts, block_m, block_n,
      num_warps, num_stages, skip):
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
        skip_tiles: test each tile for a survivor and skip the exponentials, the V load and P·V
            of empty tiles.  The result is the same either way.  Off by default: the CTA-wide
            test and the branch around P·V add 14-27 % to a run with no empty tile (H200,
            ``benchmarks/results/kernels.md``), and 76-92 % of the tiles of real SmolLM2
            attention still hold a survivor, so skipping rarely pays.
    Returns:
        ``(out, counts)`` or ``(out, counts, v_sum)``; ``out`` is (B, Hq, Sq, d) in q's dtype, a
        transposed view of a contiguous (B, Sq, Hq, d) buffer.
    """
    B, Hq, Hkv, Sq, Sk, d = check_qkv(q, k, v)
    var = kernel_variant(config)
    if var is None:
        raise NotImplementedError(f"the prefill kernel does not implement {config.label()}")
    if var.dense:
        theta = q.new_full((B, Hq, Sq), float("-inf"), dtype=torch.float32)
    elif theta is None:
        raise ValueError("top-theta needs theta")
    op = torch.ops.toptheta.prefill if torch.compiler.is_compiling() else _prefill_launch  # eager: no op overhead
    out, nk, empty, kvm, v_total = op(
        q, k, v, theta, sdc_term, float(d ** -0.5 if scale is None else scale), int(k_keep), var.sdc, var.sdc_scale,
        var.vmc, var.floor_max, bool(counts), int(block_m), int(block_n), int(num_warps), int(num_stages),
        bool(skip_tiles) and not var.dense)
    kc = None
    if counts:
        kc = KernelCounts(kept=nk.sum(-1, dtype=torch.int32), empty=empty.sum(-1, dtype=torch.int32),
                          kept_v_rows=kvm.sum(-1, dtype=torch.int32))
    out = out.transpose(1, 2)
    if return_v_sum:
        return out, kc, (v_total if var.vmc else None)
    return out, kc
