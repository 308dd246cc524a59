"""Top-θ decode: one new query token per sequence against a KV cache, skipping V rows.

Flash-decoding layout: the grid is (batch·KV heads, splits).  One program handles every query
head of a KV head (GQA group, padded to 16 rows for the tensor cores) over one split of the
sequence.  For each block of keys it computes the scores of all heads, compares each with θ of
its head (one compare per element), and loads a V row only when some head of the group keeps it:
the V load is predicated per row (a d=128 bf16 row is 256 contiguous bytes; a masked-off row
issues no memory transaction).  All of K is read (a threshold needs every score); only kept V
rows are.  The V load of a block is issued as soon as its keep mask is known and consumed one
block later (software pipelining by hand), so its latency hides behind the next block's QKᵀ: a
data-dependent load cannot be prefetched by the compiler.

Each split writes partial statistics (running max ``m`` of all visible scores and its index,
``D_S``, the exact dropped mass ``D_U``, kept count, ``Σ p v``, kept-V-row count) to a
workspace.  A merge of the splits of one (batch, KV head) applies the empty-row floor, SDC
(exact / exp-threshold / offline) and VMC (``v̄`` from a running V sum kept beside the cache,
O(d) per step) and writes the output and the kept counts.  It runs in one of two forms, which
:func:`decode_plan` picks per shape:

* fused (latency-bound shapes): one launch.  After its stores each split draws a ticket from its
  (batch, KV head)'s counter (a barrier, then one atomic add with acquire-release semantics); the
  program that draws the last ticket merges and puts the counter back to zero.  The counters are
  zero between launches, so a launch can be captured in a CUDA graph and replayed; they are kept
  per device and stream (launches that run concurrently must come from different streams).
* two launches (bandwidth-bound shapes, where the fused kernel measured 3-9% slower): the split
  kernel, then a combine kernel with one program per (batch, KV head).

Both forms share the key loop (``_split_partials``) and the merge (``_combine_splits``).

Scores are handled in the log2 domain (``s·log2 e``) so the kernels use ``exp2``; θ is scaled
the same way, which can flip a compare only for scores within an ulp of θ.

Layers: ``_decode_fused_kernel`` or ``_decode_split_kernel`` + ``_decode_combine_kernel``
(Triton) → ``_decode_launch`` (checks, allocation, form and grid) → ``toptheta::decode`` (custom
op + fake) → :func:`topθ_decode`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..config import SparseConfig
from ._common import KernelCounts, check_qkv, kernel_variant, last_dim_contiguous, next_pow2

LOG2E = 1.4426950408889634

# Tests set this to fill outputs (and the workspace) with NaN / -1 before every launch.
POISON_OUTPUTS = False


@triton.jit
def _split_partials(
    Q, K, V, THETA, WS,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    pid, sid, Hkv, N, split_len, S, scale_log2,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, HAS_THETA: tl.constexpr,
    SDC_MODE: tl.constexpr, FLOOR: tl.constexpr,
):
    """The key loop of one split of one (batch, KV head); its partial statistics → workspace."""
    b = pid // Hkv
    hkv = pid % Hkv
    Hq = Hkv * G
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    h = hkv * G + offs_g  # query heads of the group
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + offs_d[None, :], mask=mask_g[:, None], other=0.0)  # (G, D)
    if HAS_THETA:
        th = tl.load(THETA + b * Hq + h, mask=mask_g, other=float("inf")) * 1.4426950408889634  # θ·log2 e
    else:  # dense row: everything is kept
        th = tl.where(mask_g, float("-inf"), float("inf"))

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
        if SDC_MODE == 1:  # exact
            du = du * alpha + tl.sum(p_all - p, 1)
        krow = tl.max(keep.to(tl.int32), 0)  # (BLOCK_N,) 1 where some head keeps the row
        kvc += krow
        # only kept rows are read: a fully masked row issues no memory transaction
        v_prev = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=(krow > 0)[:, None], other=0.0)
        p_prev = p.to(V.dtype.element_ty)
    acc += tl.dot(p_prev, v_prev)

    # partials → workspace, structure of arrays over R = B·Hq·S rows: Σpv (R, D), then m, D_S,
    # D_U, kept count, argmax (R each; the integers bit-cast), then the kept-V counts (B·Hkv, S)
    R = tl.num_programs(0) * G * S
    part = (b * Hq + h) * S + sid
    tl.store(WS + part[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None])
    st = WS + R * D + part
    tl.store(st, m, mask=mask_g)
    tl.store(st + R, ds, mask=mask_g)
    tl.store(st + 2 * R, du, mask=mask_g)
    tl.store(st + 3 * R, nk.to(tl.float32, bitcast=True), mask=mask_g)
    tl.store(st + 4 * R, idx.to(tl.float32, bitcast=True), mask=mask_g)
    tl.store(WS + R * (D + 5) + pid * S + sid, tl.sum(kvc, 0).to(tl.float32, bitcast=True))


@triton.jit
def _combine_splits(
    Q, K, V, THETA, SDCT, VSUM, WS, OUT, COUNTS,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    pid, Hkv, N, S, R, scale_log2, sdc_scale,
    G: tl.constexpr, BLOCK_GC: tl.constexpr, CHUNK_S: tl.constexpr, D: tl.constexpr, HAS_THETA: tl.constexpr,
    SDC_MODE: tl.constexpr, FLOOR: tl.constexpr, VMC: tl.constexpr,
):
    """Merge the S splits of one (batch, KV head) from the workspace; write output and counts."""
    b = pid // Hkv
    hkv = pid % Hkv
    Hq = Hkv * G
    BHq = R // S
    offs_g = tl.arange(0, BLOCK_GC)
    mask_g = offs_g < G
    h = hkv * G + offs_g
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, CHUNK_S)
    base = (b * Hq + h) * S  # (G,) first partial row of each head
    ST = WS + R * D  # scalar statistics
    # pass 1: max over the splits (and, for the floor, the position of the first maximum);
    # workspace loads go through L2 (.cg): in the fused form other programs wrote it during this launch
    m = tl.full([BLOCK_GC], float("-inf"), tl.float32)
    idx = tl.zeros([BLOCK_GC], tl.int32)
    for s0 in range(0, S, CHUNK_S):
        sc = s0 + offs_c
        msk = mask_g[:, None] & (sc < S)[None, :]
        pm = tl.load(ST + base[:, None] + sc[None, :], mask=msk, other=float("-inf"), cache_modifier=".cg")
        if FLOOR:
            cmax, carg = tl.max(pm, 1, return_indices=True)
            ci = tl.load(ST + 4 * R + base + s0 + carg, mask=mask_g, other=0.0, cache_modifier=".cg")
            idx = tl.where(cmax > m, ci.to(tl.int32, bitcast=True), idx)
        else:
            cmax = tl.max(pm, 1)
        m = tl.maximum(m, cmax)
    m = tl.where(mask_g, m, 0.0)
    # pass 2: rescale each split to the common max and sum
    ds = tl.zeros([BLOCK_GC], tl.float32)
    du = tl.zeros([BLOCK_GC], tl.float32)
    nk = tl.zeros([BLOCK_GC], tl.int32)
    kvs = tl.zeros([CHUNK_S], tl.int32)
    acc = tl.zeros([BLOCK_GC, D], tl.float32)
    for s0 in range(0, S, CHUNK_S):
        sc = s0 + offs_c
        ms = sc < S
        msk = mask_g[:, None] & ms[None, :]
        rows = base[:, None] + sc[None, :]  # (G, CHUNK_S)
        w = tl.exp2(tl.load(ST + rows, mask=msk, other=float("-inf"), cache_modifier=".cg") - m[:, None])
        ds += tl.sum(tl.load(ST + R + rows, mask=msk, other=0.0, cache_modifier=".cg") * w, 1)
        if SDC_MODE == 1:
            du += tl.sum(tl.load(ST + 2 * R + rows, mask=msk, other=0.0, cache_modifier=".cg") * w, 1)
        nk += tl.sum(tl.load(ST + 3 * R + rows, mask=msk, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True), 1)
        a = tl.load(WS + rows[:, :, None] * D + offs_d[None, None, :], mask=msk[:, :, None], other=0.0,
                    cache_modifier=".cg")  # (G, CHUNK_S, D)
        acc += tl.sum(a * w[:, :, None], 1)
        kvs += tl.load(ST + 5 * R + pid * S + sc, mask=ms, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
    if HAS_THETA:
        th = tl.load(THETA + b * Hq + h, mask=mask_g, other=float("inf")) * 1.4426950408889634
    else:
        th = tl.full([BLOCK_GC], float("-inf"), tl.float32)
    ndrop = N - nk
    kept = nk
    empty = (nk == 0) & mask_g
    kv_extra = 0
    if FLOOR:  # an empty row keeps its maximum element
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
        d_u = tl.zeros([BLOCK_GC], tl.float32)
    denom = ds + sdc_scale * d_u
    denom = tl.where(denom > 0, denom, 1.0)
    o = acc / denom[:, None]
    if VMC:
        vmean = tl.load(VSUM + pid * D + offs_d) / N
        o += (1.0 - ds / denom)[:, None] * vmean[None, :]
    tl.store(OUT + (b * Hq + h)[:, None] * D + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=mask_g[:, None])
    tl.store(COUNTS + b * Hq + h, kept, mask=mask_g)
    tl.store(COUNTS + BHq + b * Hq + h, empty.to(tl.int32), mask=mask_g)
    tl.store(COUNTS + 2 * BHq + pid, tl.sum(kvs, 0) + kv_extra)


@triton.jit
def _decode_fused_kernel(
    Q, K, V, THETA, SDCT, VSUM, WS, TICKETS, OUT, COUNTS,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    Hkv, N, split_len, S, scale_log2, sdc_scale,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GC: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK_S: tl.constexpr, D: tl.constexpr, HAS_THETA: tl.constexpr, SDC_MODE: tl.constexpr,
    FLOOR: tl.constexpr, VMC: tl.constexpr,
):
    """Grid (B·Hkv, S): one split each; the last split of a (batch, KV head) to finish merges."""
    pid = tl.program_id(0)  # b · Hkv + kv head
    _split_partials(Q, K, V, THETA, WS, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    pid, tl.program_id(1), Hkv, N, split_len, S, scale_log2,
                    G, BLOCK_G, BLOCK_N, D, HAS_THETA, SDC_MODE, FLOOR)
    # every thread's stores happen before the ticket (release); the last ticket sees them all (acquire)
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKETS + pid, 1, sem="acq_rel")
    if ticket == S - 1:
        _combine_splits(Q, K, V, THETA, SDCT, VSUM, WS, OUT, COUNTS,
                        sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                        pid, Hkv, N, S, tl.num_programs(0) * G * S, scale_log2, sdc_scale,
                        G, BLOCK_GC, CHUNK_S, D, HAS_THETA, SDC_MODE, FLOOR, VMC)
        tl.store(TICKETS + pid, 0)  # ready for the next launch (graph replay)


@triton.jit
def _decode_split_kernel(
    Q, K, V, THETA, WS,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    Hkv, N, split_len, S, scale_log2,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, HAS_THETA: tl.constexpr,
    SDC_MODE: tl.constexpr, FLOOR: tl.constexpr,
):
    """Grid (B·Hkv, S): one split each, partials only (two-launch form)."""
    _split_partials(Q, K, V, THETA, WS, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    tl.program_id(0), tl.program_id(1), Hkv, N, split_len, S, scale_log2,
                    G, BLOCK_G, BLOCK_N, D, HAS_THETA, SDC_MODE, FLOOR)


@triton.jit
def _decode_combine_kernel(
    Q, K, V, THETA, SDCT, VSUM, WS, OUT, COUNTS,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    Hkv, N, S, scale_log2, sdc_scale,
    G: tl.constexpr, BLOCK_GC: tl.constexpr, CHUNK_S: tl.constexpr, D: tl.constexpr, HAS_THETA: tl.constexpr,
    SDC_MODE: tl.constexpr, FLOOR: tl.constexpr, VMC: tl.constexpr,
):
    """Grid (B·Hkv,): merges the splits that ``_decode_split_kernel`` wrote (two-launch form)."""
    _combine_splits(Q, K, V, THETA, SDCT, VSUM, WS, OUT, COUNTS,
                    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    tl.program_id(0), Hkv, N, S, tl.num_programs(0) * G * S, scale_log2, sdc_scale,
                    G, BLOCK_GC, CHUNK_S, D, HAS_THETA, SDC_MODE, FLOOR, VMC)


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


# Largest B·Hkv·N (key rows over all (batch, KV head) pairs) that takes the fused single launch.
# Measured on an H200 (results/kernels.md, decode; run 6 = two launches, run 10 = fused): the fused
# launch is faster at every benchmark shape up to 2^18 (B=1 N≤32k, B=8 N=4k; graph ratios 0.74-1.07×
# against 0.57-1.01×; B=1 N=4k 12.6 against 15.9 µs; eager host time ~2× lower), the two launches at
# every shape from 2^20 up (B=8 N≥16k, B=32 N≥4k: 3-8% faster at f ≤ 1/3; in one process at B=32
# N=32k, f=0.15, 758.7 against 789.7 µs, logs/ab_two_launch_run10_H200.log).  2^18-2^20 is unmeasured.
FUSED_MAX_KV_ROWS = 1 << 18


class DecodePlan(NamedTuple):
    """Launch form and configuration for one decode shape (a tuple: built on every call)."""

    fused: bool  # one launch (the last split merges) or a split launch then a combine launch
    splits: int
    block_n: int  # keys per block
    num_warps: int
    num_stages: int


def decode_plan(B: int, Hkv: int, N: int, device: torch.device) -> DecodePlan:
    """The tuned launch for a decode shape; the one place that picks the form.

    Measured on an H200 (benchmarks/tune_decode.py, results/decode_tuning_H200.csv):
    * B·Hkv·N ≤ :data:`FUSED_MAX_KV_ROWS` (latency-bound): fused, one wave of about 8 warps per
      SM, splits of at least 256 keys, 4 warps per program when B·Hkv ≤ 16 (run 9, stage 3).  The
      merge in the last program grows with the split count, so more splits than that cost time.
    * larger (bandwidth-bound): two launches with the two-launch kernel's tuned configuration,
      64 keys, 2 warps, 3 stages, 8 programs per SM (stages 1-2, the rows without a ``kernel``
      value: at B=32 N=32k f=0.15 758 µs against 785 µs for 128 keys and 4 warps; B=8 N=32k
      217 against 259 µs).
    """
    if B * Hkv * N <= FUSED_MAX_KV_ROWS:
        warps = 4 if B * Hkv <= 16 else 2
        splits = max(1, min(triton.cdiv(N, 256), triton.cdiv(8 * _sm_count(device) // warps, B * Hkv)))
        return DecodePlan(True, splits, 64, warps, 3)
    return DecodePlan(False, decode_splits(B, Hkv, N, 64, device), 64, 2, 3)


_TICKETS: dict[tuple, torch.Tensor] = {}


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (batch, KV head), kept per device and stream.

    The kernel leaves them at zero.  A buffer first needed during CUDA-graph capture is not
    cached: its zero fill is a node of that graph and has not run yet.
    """
    if device.type == "cuda":
        key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    else:
        key = (-1, 0)
    buf = _TICKETS.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    buf = torch.zeros(max(1024, next_pow2(n)), dtype=torch.int32, device=device)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _TICKETS[key] = buf
    return buf


_COMBINE_WARPS = 4  # the separate combine kernel (two-launch form), as before the fused launch


def _chunk_s(block_gc: int, d: int, num_warps: int) -> int:
    """Splits merged per step of the combine: a (heads, splits, d) fp32 load of ~64 registers a thread."""
    return max(2, 2048 * num_warps // (block_gc * d))


def _f32(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or (x.dtype == torch.float32 and x.is_contiguous()) else x.to(torch.float32).contiguous()


def _decode_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None,
                   sdc_term: torch.Tensor | None, v_sum: torch.Tensor | None, scale: float, sdc_code: int,
                   sdc_scale: float, vmc: bool, floor_max: bool, fused: bool | None, num_splits: int, block_n: int,
                   num_warps: int, num_stages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks, allocation and the launch(es).  Returns out (B, Hq, 1, d) and the counts, flat int32:
    kept (B·Hq), empty (B·Hq), kept V rows (B·Hkv).  ``theta=None``: every element kept (dense
    row).  ``fused=None`` and zero knobs take the :func:`decode_plan` values."""
    B, Hq, _, D = q.shape
    _, Hkv, N, _ = k.shape
    G = Hq // Hkv
    if N < 1:
        raise ValueError("decode needs at least one key")
    if theta is not None and theta.numel() != B * Hq:
        raise ValueError(f"theta must be (B, Hq[, 1]) = {(B, Hq)}, got {tuple(theta.shape)}")
    if sdc_code == 3 and (sdc_term is None or sdc_term.numel() != B * Hq):
        raise ValueError("offline SDC needs sdc_term (B, Hq[, 1])")
    if vmc and (v_sum is None or v_sum.shape != (B, Hkv, D)):
        raise ValueError("VMC needs v_sum (B, Hkv, d): the float32 sum of the N V rows")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    theta, sdc_term, v_sum = _f32(theta), _f32(sdc_term), _f32(v_sum)
    if fused is None or num_splits <= 0 or block_n <= 0 or num_warps <= 0 or num_stages <= 0:
        plan = decode_plan(B, Hkv, N, q.device)
        fused = plan.fused if fused is None else fused
        num_splits, block_n, num_warps, num_stages = (x if x > 0 else p for x, p in zip(
            (num_splits, block_n, num_warps, num_stages),
            (plan.splits, plan.block_n, plan.num_warps, plan.num_stages)))
    split_len = triton.cdiv(triton.cdiv(N, num_splits), block_n) * block_n
    S = triton.cdiv(N, split_len)
    dev = q.device
    R = B * Hq * S
    ws = torch.empty(R * (D + 5) + B * Hkv * S, dtype=torch.float32, device=dev)
    out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=dev)
    counts = torch.empty(2 * B * Hq + B * Hkv, dtype=torch.int32, device=dev)
    if POISON_OUTPUTS:
        out.fill_(float("nan")), counts.fill_(-1), ws.fill_(float("nan"))
    # absent optional inputs: any pointer (the kernels never read it)
    th, sdct, vsum = (ws if x is None else x for x in (theta, sdc_term, v_sum))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    scale_log2 = float(scale) * LOG2E
    block_g, block_gc = max(16, next_pow2(G)), max(2, next_pow2(G))
    variant = dict(D=D, HAS_THETA=theta is not None, SDC_MODE=sdc_code, FLOOR=floor_max)
    if fused:
        _decode_fused_kernel[(B * Hkv, S)](
            q, k, v, th, sdct, vsum, ws, _tickets(dev, B * Hkv), out, counts, *strides,
            Hkv, N, split_len, S, scale_log2, float(sdc_scale),
            G=G, BLOCK_G=block_g, BLOCK_GC=block_gc, BLOCK_N=block_n, CHUNK_S=_chunk_s(block_gc, D, num_warps),
            VMC=vmc, **variant, num_warps=num_warps, num_stages=num_stages,
        )
    else:
        _decode_split_kernel[(B * Hkv, S)](
            q, k, v, th, ws, *strides, Hkv, N, split_len, S, scale_log2,
            G=G, BLOCK_G=block_g, BLOCK_N=block_n, **variant, num_warps=num_warps, num_stages=num_stages,
        )
        _decode_combine_kernel[(B * Hkv,)](
            q, k, v, th, sdct, vsum, ws, out, counts, *strides, Hkv, N, S, scale_log2, float(sdc_scale),
            G=G, BLOCK_GC=block_gc, CHUNK_S=_chunk_s(block_gc, D, _COMBINE_WARPS), VMC=vmc, **variant,
            num_warps=_COMBINE_WARPS,
        )
    return out, counts


@torch.library.custom_op("toptheta::decode", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None,
               sdc_term: torch.Tensor | None, v_sum: torch.Tensor | None, scale: float, sdc_code: int,
               sdc_scale: float, vmc: bool, floor_max: bool, fused: bool | None, num_splits: int, block_n: int,
               num_warps: int, num_stages: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _decode_launch(q, k, v, theta, sdc_term, v_sum, scale, sdc_code, sdc_scale, vmc, floor_max, fused,
                          num_splits, block_n, num_warps, num_stages)


@_decode_op.register_fake
def _(q, k, v, theta, sdc_term, v_sum, scale, sdc_code, sdc_scale, vmc, floor_max, fused, num_splits, block_n,
      num_warps, num_stages):
    B, Hq, _, D = q.shape
    return q.new_empty(B, Hq, 1, D), torch.empty(2 * B * Hq + B * k.shape[1], dtype=torch.int32, device=q.device)


def topθ_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None, *,
                config: SparseConfig, k_keep: int, sdc_term: torch.Tensor | None = None,
                v_sum: torch.Tensor | None = None, scale: float | None = None, fused: bool | None = None,
                num_splits: int = 0, block_n: int = 0, num_warps: int = 0, num_stages: int = 0
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
        fused: one launch (the last split merges) or two (splits, then a combine kernel);
            ``None`` takes the form :func:`decode_plan` picks for the shape.
        num_splits, block_n, num_warps, num_stages: launch configuration; 0 takes the tuned
            :func:`decode_plan` value.
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
        theta = None  # dense row: the kernel keeps everything
    elif theta is None:
        raise ValueError("top-theta needs theta")
    op = torch.ops.toptheta.decode if torch.compiler.is_compiling() else _decode_launch
    out, counts = op(q, k, v, theta, sdc_term, v_sum, float(d ** -0.5 if scale is None else scale), var.sdc,
                     var.sdc_scale, var.vmc, var.floor_max, fused, int(num_splits), int(block_n),
                     int(num_warps), int(num_stages))
    kept, empty, kv = counts.split((B * Hq, B * Hq, B * Hkv))
    return out, KernelCounts(kept=kept.view(B, Hq), empty=empty.view(B, Hq), kept_v_rows=kv.view(B, Hkv))
