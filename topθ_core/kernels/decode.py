"""Top-θ decode: one new query token per sequence against a KV cache, reading only the kept V rows.

Flash-decoding layout: the grid is (batch·KV heads, splits).  One program handles every query
head of a KV head (GQA group, padded to 16 rows for the tensor cores) over one split of the
sequence.  All of K is read (a threshold needs every score); only the V rows some head of the
group keeps are read (a d=128 bf16 row is 256 contiguous bytes).

Key loop, two forms (:class:`DecodePlan` picks; same result up to summation order):

* **one-pass** (the plan's, everywhere): the V rows of a block are loaded as soon as its keep mask is
  known and consumed a block later (software pipelining by hand), inside the K loop.
* **two-pass** (``two_pass=True``; slower at every measured shape, results/kernels.md): each chunk
  of a split (≤ ``chunk`` keys) is read twice.  Pass A streams K (no load in it depends on a
  score, so the compiler pipelines it), computes the scores, the
  running max and its index, ``D_S``, the exact ``D_U`` and the kept count, and compacts the
  chunk's kept rows (any head of the group) into a per-program scratch: their positions and
  scores.  Pass B walks that short list: it gathers only the kept V rows (addresses known one
  block ahead, so each gather is issued a block before its use) and accumulates ``Σ p v``.  The
  scratch (positions + G scores per kept row) is written and read back by the same program, a
  few KB at a time, so it stays in L2.

θ relative to the row maximum (``KernelTheta.ROW_MAX``: keep ``s − m_row > θ_rel``) needs the
row max before any decision.  It runs in two launches: the first streams K and compacts, per
split, the *candidates* ``s − m_run > θ_rel`` (``m_run`` the running max ≤ ``m_row``: a superset
of the kept set) with each split's max, ``Σ 2^(s − m)`` and argmax; the second reads the splits'
maxima (the exact row max), keeps the candidates that pass, gathers their V rows and merges.

Each split writes partial statistics (max ``m`` of all visible scores and its index, ``D_S``,
``D_U``, kept count, ``Σ p v``, kept-V-row count) to a workspace.  A merge of the splits of one
(batch, KV head) applies the empty-row floor, SDC (exact / exp-threshold / offline) and VMC
(``v̄`` from a running V sum kept beside the cache, O(d) per step; with ``update_v_sum`` the merge
itself adds the step's new V row to that sum) and writes the output and the kept counts.  It runs
in one of two forms, which :func:`decode_plan` picks per shape:

* fused (latency-bound shapes, except a single sequence at d 128; always for row-max θ): after
  its stores each split draws a ticket from its (batch, KV head)'s counter (a barrier, then one
  atomic add with acquire-release semantics); the program that draws the last ticket merges and
  puts the counter back to zero.  The counters are zero between launches, so a launch can be
  captured in a CUDA graph and replayed; they are kept per device and stream.
* two launches (bandwidth-bound shapes, and a single sequence at d 128): the split kernel, then a
  combine kernel with one program per (batch, KV head).

Static caches (a preallocated buffer of which each sequence uses a prefix, e.g. a CUDA-graph
decode step): ``lengths`` (B,) int32 on the device gives each sequence's number of valid keys;
splits past it do nothing, and the dense-row rule (``L ≤ k``) is applied per sequence in the
kernel, so one captured launch serves every step.

Scores are handled in the log2 domain (``s·log2 e``) so the kernels use ``exp2``; θ is scaled
the same way, which can flip a compare only for scores within an ulp of θ.

Layers: ``_decode_fused_kernel`` / ``_decode_split_kernel`` + ``_decode_combine_kernel`` /
``_rowmax_scores_kernel`` + ``_rowmax_fused_kernel`` (Triton) → ``_decode_launch`` (checks,
allocation, form and grid) → ``toptheta::decode`` (custom op + fake) → :func:`topθ_decode`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..config import SparseConfig
from ._common import (LOG2E, KernelCounts, KernelSdc, KernelTheta, check_qkv, compensated_output, kernel_variant,
                      last_dim_contiguous, next_pow2)

# Tests set this to fill outputs (and the workspace) with NaN / -1 before every launch.
POISON_OUTPUTS = False

# Workspace: R = B·Hq·S partial rows (one per query head and split).  Σpv (R, D), then these
# statistics (R each; the integers bit-cast into float32), then the kept-V counts (B·Hkv·S).
_WS_M, _WS_DS, _WS_DU, _WS_NK, _WS_IDX, _WS_STATS = 0, 1, 2, 3, 4, 5


# ------------------------------------------------------------------------------------------------
# Pieces shared by the kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _program_setup(Q, THETA, LENS, sq_b, sq_h, pid, Hkv, N_buf, k_keep,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, THETA_MODE: tl.constexpr,
                   HAS_LENS: tl.constexpr):
    """Indices of one (batch, KV head), its valid key count, the group's queries and θ (log2 units).

    θ is +∞ on padded head rows (never kept) and −∞ on every head when the row is dense
    (dense selection, or L ≤ k).
    """
    b = pid // Hkv
    hkv = pid % Hkv
    Hq = Hkv * G
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    h = hkv * G + offs_g  # query heads of the group
    offs_d = tl.arange(0, D)
    if HAS_LENS:
        n_b = tl.load(LENS + b)
    else:
        n_b = N_buf + tl.zeros((), tl.int32)  # a tensor even when Triton specialises N_buf = 1
    q = tl.load(Q + b.to(tl.int64) * sq_b + h[:, None] * sq_h + offs_d[None, :], mask=mask_g[:, None], other=0.0)
    if THETA_MODE == 0:  # dense selection: everything is kept
        th = tl.where(mask_g, float("-inf"), float("inf"))
    else:
        th = tl.load(THETA + b * Hq + h, mask=mask_g, other=float("inf")) * LOG2E
        th = tl.where(mask_g & (n_b <= k_keep), float("-inf"), th)  # rows with L ≤ k are dense
    return b, hkv, h, offs_g, mask_g, q, th, n_b


@triton.jit
def _scores(q, k_base, sk_n, offs_n, mask_n, scale_log2, D: tl.constexpr):
    """(BLOCK_G, BLOCK_N) scores of a key block in the log2 domain, −∞ past the valid keys."""
    offs_d = tl.arange(0, D)
    kt = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=mask_n[:, None], other=0.0)
    s = tl.dot(q, tl.trans(kt)) * scale_log2
    return tl.where(mask_n[None, :], s, float("-inf"))


@triton.jit
def _running_max(s, m, idx, n0, FLOOR: tl.constexpr):
    """Block row max folded into the running max; the floor also tracks its position (first on ties)."""
    if FLOOR:
        tmax, arg = tl.max(s, 1, return_indices=True)
        idx = tl.where(tmax > m, n0 + arg.to(tl.int32), idx)
    else:
        tmax = tl.max(s, 1)
    m_new = tl.maximum(m, tmax)
    return m_new, tl.exp2(m - m_new), idx


@triton.jit
def _compact(scr, scr_s, cnt, s, sel, offs_n, offs_g, mask_g, STRIDE):
    """Append the rows ``sel`` of a block (positions and the group's scores) to a scratch list."""
    krow = sel.to(tl.int32)
    pos = cnt + tl.cumsum(krow, 0) - krow
    tl.store(scr + pos, offs_n.to(tl.float32, bitcast=True), mask=sel)
    tl.store(scr_s + offs_g[:, None] * STRIDE + pos[None, :], s, mask=mask_g[:, None] & sel[None, :])
    return cnt + tl.sum(krow, 0)


@triton.jit
def _kept(sv, th, m, REL: tl.constexpr):
    """Which heads keep a listed row: the score beats θ (``REL``: the score minus the row max ``m``)."""
    if REL:
        return (sv - m[:, None]) > th[:, None]
    return sv > th[:, None]


@triton.jit
def _gather_pass(acc, ds, nk, kvc, scr, scr_s, cnt, th, m, v_base, sv_n, offs_g, mask_g, STRIDE,
                 BLOCK_V: tl.constexpr, D: tl.constexpr, COUNT: tl.constexpr, REL: tl.constexpr):
    """Pass B: ``acc += Σ p v`` over a compacted list of ``cnt`` rows (positions, scores).

    A head keeps a listed row iff its score beats θ (:func:`_kept`); ``p = 2^(s − m)``.  V rows
    that no head keeps are not read.  ``COUNT``: also accumulate ``D_S``, the kept count and the
    kept-V-row count (row-max θ, where pass A could not decide).  Addresses come from the list,
    so each block's gather is issued one block before its use (the list positions two blocks
    before).
    """
    offs_b = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, D)
    ok = offs_b < cnt
    ridx = tl.load(scr + offs_b, mask=ok, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
    sv = tl.load(scr_s + offs_g[:, None] * STRIDE + offs_b[None, :], mask=mask_g[:, None] & ok[None, :],
                 other=float("-inf"), cache_modifier=".cg")
    krow = tl.max(_kept(sv, th, m, REL).to(tl.int32), 0)
    vt = tl.load(v_base + ridx[:, None] * sv_n + offs_d[None, :], mask=(krow > 0)[:, None], other=0.0)
    ok1 = (BLOCK_V + offs_b) < cnt
    ridx1 = tl.load(scr + BLOCK_V + offs_b, mask=ok1, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
    for i0 in range(0, cnt, BLOCK_V):
        nxt = i0 + BLOCK_V + offs_b
        s_nx = tl.load(scr_s + offs_g[:, None] * STRIDE + nxt[None, :], mask=mask_g[:, None] & (nxt < cnt)[None, :],
                       other=float("-inf"), cache_modifier=".cg")
        krow_nx = tl.max(_kept(s_nx, th, m, REL).to(tl.int32), 0)
        vt_nx = tl.load(v_base + ridx1[:, None] * sv_n + offs_d[None, :], mask=(krow_nx > 0)[:, None], other=0.0)
        nxt2 = nxt + BLOCK_V
        ridx1 = tl.load(scr + nxt2, mask=nxt2 < cnt, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
        keep = _kept(sv, th, m, REL)
        p = tl.where(keep, tl.exp2(sv - m[:, None]), 0.0)
        if COUNT:
            ds += tl.sum(p, 1)
            nk += tl.sum(keep.to(tl.int32), 1)
            kvc += tl.sum(tl.max(keep.to(tl.int32), 0), 0)
        acc = tl.dot(p.to(vt.dtype), vt, acc)
        sv, vt = s_nx, vt_nx
    return acc, ds, nk, kvc


@triton.jit
def _store_partials(WS, pid, sid, b, h, mask_g, S, Hq, acc, m, ds, du, nk, idx, kvc,
                    G: tl.constexpr, D: tl.constexpr):
    """A split's partial statistics → the workspace (structure of arrays over R = B·Hq·S rows)."""
    offs_d = tl.arange(0, D)
    R = tl.num_programs(0) * G * S
    part = (b * Hq + h) * S + sid
    tl.store(WS + part[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None])
    st = WS + R * D + part
    tl.store(st, m, mask=mask_g)
    tl.store(st + R, ds, mask=mask_g)
    tl.store(st + 2 * R, du, mask=mask_g)
    tl.store(st + 3 * R, nk.to(tl.float32, bitcast=True), mask=mask_g)
    tl.store(st + 4 * R, idx.to(tl.float32, bitcast=True), mask=mask_g)
    tl.store(WS + R * (D + 5) + pid * S + sid, kvc.to(tl.float32, bitcast=True))


# ------------------------------------------------------------------------------------------------
# The split program (absolute θ or dense): one-pass or two-pass key loop
# ------------------------------------------------------------------------------------------------

@triton.jit
def _split_partials(
    Q, K, V, THETA, LENS, WS, SCR,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    pid, sid, Hkv, N_buf, split_len, S, k_keep, scale_log2,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
    D: tl.constexpr, THETA_MODE: tl.constexpr, SDC_MODE: tl.constexpr, FLOOR: tl.constexpr, HAS_LENS: tl.constexpr,
    TWO_PASS: tl.constexpr,
):
    """The key loop of one split of one (batch, KV head); its partial statistics → workspace."""
    b, hkv, h, offs_g, mask_g, q, th, n_b = _program_setup(Q, THETA, LENS, sq_b, sq_h, pid, Hkv, N_buf, k_keep,
                                                           G, BLOCK_G, D, THETA_MODE, HAS_LENS)
    Hq = Hkv * G
    start = sid * split_len
    end = tl.minimum(start + split_len, n_b)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of all visible scores (log2 domain)
    idx = tl.zeros([BLOCK_G], tl.int32)  # its position (empty-row floor)
    ds = tl.zeros([BLOCK_G], tl.float32)  # Σ_kept 2^(s − m)
    du = tl.zeros([BLOCK_G], tl.float32)  # Σ_dropped 2^(s − m)   (exact SDC)
    nk = tl.zeros([BLOCK_G], tl.int32)  # kept count
    kvc = tl.zeros((), tl.int32)  # kept V rows (union over the group)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    k_base = K + b.to(tl.int64) * sk_b + hkv * sk_h
    v_base = V + b.to(tl.int64) * sv_b + hkv * sv_h
    offs_b = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    if TWO_PASS:
        scr = SCR + (pid * S + sid).to(tl.int64) * (CHUNK * (G + 1))  # CHUNK positions, then G × CHUNK scores
        scr_s = scr + CHUNK
        for c0 in range(start, end, CHUNK):
            c1 = tl.minimum(c0 + CHUNK, end)
            m_prev = m
            cnt = tl.zeros((), tl.int32)
            for n0 in range(c0, c1, BLOCK_N):  # pass A: K only
                offs_n = n0 + offs_b
                s = _scores(q, k_base, sk_n, offs_n, offs_n < c1, scale_log2, D)
                keep = s > th[:, None]
                m, alpha, idx = _running_max(s, m, idx, n0, FLOOR)
                p_all = tl.exp2(s - m[:, None])
                p = tl.where(keep, p_all, 0.0)
                ds = ds * alpha + tl.sum(p, 1)
                if SDC_MODE == 1:  # exact
                    du = du * alpha + tl.sum(p_all - p, 1)
                nk += tl.sum(keep.to(tl.int32), 1)
                cnt = _compact(scr, scr_s, cnt, s, tl.max(keep.to(tl.int32), 0) > 0, offs_n, offs_g, mask_g, CHUNK)
            kvc += cnt
            tl.debug_barrier()  # the list is written by every thread of the program, read by every thread
            acc = acc * tl.exp2(m_prev - m)[:, None]
            acc, ds, nk, kvc = _gather_pass(acc, ds, nk, kvc, scr, scr_s, cnt, th, m, v_base, sv_n, offs_g, mask_g,
                                            CHUNK, BLOCK_V, D, False, False)
            tl.debug_barrier()  # before the next chunk overwrites the list
    else:
        # V loads are software-pipelined by hand: the (row-predicated) load of block i is issued
        # right after its keep mask is known and consumed one iteration later.
        p_prev = tl.zeros([BLOCK_G, BLOCK_N], V.dtype.element_ty)
        v_prev = tl.zeros([BLOCK_N, D], V.dtype.element_ty)
        kv_lane = tl.zeros([BLOCK_N], tl.int32)  # kept V rows per lane, reduced once after the loop
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_b
            s = _scores(q, k_base, sk_n, offs_n, offs_n < end, scale_log2, D)
            keep = s > th[:, None]
            m, alpha, idx = _running_max(s, m, idx, n0, FLOOR)
            nk += tl.sum(keep.to(tl.int32), 1)
            acc = tl.dot(p_prev, v_prev, acc) * alpha[:, None]  # previous block, then rescale
            p_all = tl.exp2(s - m[:, None])
            p = tl.where(keep, p_all, 0.0)
            ds = ds * alpha + tl.sum(p, 1)
            if SDC_MODE == 1:
                du = du * alpha + tl.sum(p_all - p, 1)
            krow = tl.max(keep.to(tl.int32), 0)  # (BLOCK_N,) 1 where some head keeps the row
            kv_lane += krow
            # only kept rows are read: a fully masked row issues no memory transaction
            v_prev = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=(krow > 0)[:, None], other=0.0)
            p_prev = p.to(V.dtype.element_ty)
        acc += tl.dot(p_prev, v_prev)
        kvc = tl.sum(kv_lane, 0)
    _store_partials(WS, pid, sid, b, h, mask_g, S, Hq, acc, m, ds, du, nk, idx, kvc, G, D)


# ------------------------------------------------------------------------------------------------
# The merge of one (batch, KV head)'s splits
# ------------------------------------------------------------------------------------------------

@triton.jit
def _combine_splits(
    Q, K, V, THETA, SDCT, VSUM, LENS, WS, OUT, COUNTS,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    pid, Hkv, N_buf, S, R, k_keep, scale_log2, sdc_scale,
    G: tl.constexpr, BLOCK_GC: tl.constexpr, CHUNK_S: tl.constexpr, D: tl.constexpr, THETA_MODE: tl.constexpr,
    SDC_MODE: tl.constexpr, FLOOR: tl.constexpr, VMC: tl.constexpr, HAS_LENS: tl.constexpr,
    VSUM_UPDATE: tl.constexpr,
):
    """Merge the S splits of one (batch, KV head) from the workspace; write output and counts.

    One pass over chunks of splits with online rescaling (one round trip when S ≤ CHUNK_S).
    Workspace loads go through L2 (.cg): in the fused form other programs wrote it during this
    launch.  Splits past a sequence's valid keys hold m = −∞ and weigh nothing.  ``VSUM_UPDATE``:
    the V sum lacks row ``L − 1`` (the step's new key); this program, the only one of its (batch,
    KV head) to touch the sum, adds it in place before use.
    """
    b, hkv, h, offs_g, mask_g, qf, th, n_b = _program_setup(Q, THETA, LENS, sq_b, sq_h, pid, Hkv, N_buf, k_keep,
                                                            G, BLOCK_GC, D, THETA_MODE, HAS_LENS)
    Hq = Hkv * G
    BHq = R // S
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, CHUNK_S)
    base = (b * Hq + h) * S  # (G,) first partial row of each head
    ST = WS + R * D  # scalar statistics
    if VMC:  # issued first: independent of everything below
        vsum = tl.load(VSUM + pid * D + offs_d)
        if VSUM_UPDATE:
            v_new = V + b.to(tl.int64) * sv_b + hkv * sv_h + (n_b - 1).to(tl.int64) * sv_n
            vsum += tl.load(v_new + offs_d).to(tl.float32)
            tl.store(VSUM + pid * D + offs_d, vsum)
        vmean = vsum[None, :] / n_b.to(tl.float32)
    m = tl.full([BLOCK_GC], float("-inf"), tl.float32)
    idx = tl.zeros([BLOCK_GC], tl.int32)
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
        pm = tl.load(ST + rows, mask=msk, other=float("-inf"), cache_modifier=".cg")
        pds = tl.load(ST + R + rows, mask=msk, other=0.0, cache_modifier=".cg")
        if SDC_MODE == 1:
            pdu = tl.load(ST + 2 * R + rows, mask=msk, other=0.0, cache_modifier=".cg")
        pnk = tl.load(ST + 3 * R + rows, mask=msk, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
        a = tl.load(WS + rows[:, :, None] * D + offs_d[None, None, :], mask=msk[:, :, None], other=0.0,
                    cache_modifier=".cg")  # (G, CHUNK_S, D)
        kvs += tl.load(ST + 5 * R + pid * S + sc, mask=ms, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
        if FLOOR:
            cmax, carg = tl.max(pm, 1, return_indices=True)
            ci = tl.load(ST + 4 * R + base + s0 + carg, mask=mask_g, other=0.0, cache_modifier=".cg")
            idx = tl.where(cmax > m, ci.to(tl.int32, bitcast=True), idx)
        else:
            cmax = tl.max(pm, 1)
        m_new = tl.maximum(m, cmax)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all splits so far empty
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(pm - m_safe[:, None])
        ds = ds * alpha + tl.sum(pds * w, 1)
        if SDC_MODE == 1:
            du = du * alpha + tl.sum(pdu * w, 1)
        nk += tl.sum(pnk, 1)
        acc = acc * alpha[:, None] + tl.sum(a * w[:, :, None], 1)
        m = m_new
    m = tl.where(mask_g, m, 0.0)
    if THETA_MODE == 2:  # θ relative to the row max → the absolute score it stands for
        th = th + m
    ndrop = n_b - nk
    kept = nk
    empty = (nk == 0) & mask_g
    kv_extra = 0
    if FLOOR:  # an empty row keeps its maximum element: p ∝ 2^(m − m) = 1
        ds = tl.where(empty, 1.0, ds)
        du = tl.where(empty, tl.maximum(du - 1.0, 0.0), du)
        ndrop = tl.where(empty, ndrop - 1, ndrop)
        kept = tl.where(empty, 1, nk)
        v_base = V + b.to(tl.int64) * sv_b + hkv * sv_h
        vrow = tl.load(v_base + idx[:, None] * sv_n + offs_d[None, :], mask=empty[:, None], other=0.0)
        acc = tl.where(empty[:, None], vrow.to(tl.float32), acc)
        # the floor row joins the kept-V union unless another head keeps it or an earlier head floors it
        k_base = K + b.to(tl.int64) * sk_b + hkv * sk_h
        krow = tl.load(k_base + idx[:, None] * sk_n + offs_d[None, :], mask=empty[:, None], other=0.0)
        s2 = tl.sum(qf.to(tl.float32)[:, None, :] * krow.to(tl.float32)[None, :, :], 2) * scale_log2  # (g', g)
        by_thr = tl.max(tl.where(mask_g[:, None] & (s2 > th[:, None]), 1, 0), 0) > 0
        dup = tl.max(tl.where((offs_g[:, None] < offs_g[None, :]) & empty[:, None] & (idx[:, None] == idx[None, :]),
                              1, 0), 0) > 0
        kv_extra = tl.sum((empty & (~by_thr) & (~dup)).to(tl.int32), 0)
    if SDC_MODE == 3:
        c_off = tl.load(SDCT + b * Hq + h, mask=mask_g, other=0.0)
    else:
        c_off = ds
    if not VMC:
        vmean = acc  # unused
    o = compensated_output(acc, ds, du, ndrop, th, m, c_off, vmean, sdc_scale, SDC_MODE, VMC)
    tl.store(OUT + (b * Hq + h)[:, None] * D + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=mask_g[:, None])
    tl.store(COUNTS + b * Hq + h, kept, mask=mask_g)
    tl.store(COUNTS + BHq + b * Hq + h, empty.to(tl.int32), mask=mask_g)
    tl.store(COUNTS + 2 * BHq + pid, tl.sum(kvs, 0) + kv_extra)


@triton.jit
def _last_merges(Q, K, V, THETA, SDCT, VSUM, LENS, WS, TICKETS, OUT, COUNTS,
                 sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                 pid, Hkv, N_buf, S, k_keep, scale_log2, sdc_scale,
                 G: tl.constexpr, BLOCK_GC: tl.constexpr, CHUNK_S: tl.constexpr, D: tl.constexpr,
                 THETA_MODE: tl.constexpr, SDC_MODE: tl.constexpr, FLOOR: tl.constexpr, VMC: tl.constexpr,
                 HAS_LENS: tl.constexpr, VSUM_UPDATE: tl.constexpr):
    """After a split's stores: draw a ticket; the last split of the (batch, KV head) merges."""
    # every thread's stores happen before the ticket (release); the last ticket sees them all (acquire)
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKETS + pid, 1, sem="acq_rel")
    if ticket == S - 1:
        _combine_splits(Q, K, V, THETA, SDCT, VSUM, LENS, WS, OUT, COUNTS,
                        sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                        pid, Hkv, N_buf, S, tl.num_programs(0) * G * S, k_keep, scale_log2, sdc_scale,
                        G, BLOCK_GC, CHUNK_S, D, THETA_MODE, SDC_MODE, FLOOR, VMC, HAS_LENS, VSUM_UPDATE)
        tl.store(TICKETS + pid, 0)  # ready for the next launch (graph replay)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _decode_fused_kernel(
    Q, K, V, THETA, SDCT, VSUM, LENS, WS, SCR, TICKETS, OUT, COUNTS,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    Hkv, N_buf, split_len, S, k_keep, scale_log2, sdc_scale,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    CHUNK: tl.constexpr, CHUNK_S: tl.constexpr, D: tl.constexpr, THETA_MODE: tl.constexpr, SDC_MODE: tl.constexpr,
    FLOOR: tl.constexpr, VMC: tl.constexpr, HAS_LENS: tl.constexpr, TWO_PASS: tl.constexpr,
    VSUM_UPDATE: tl.constexpr,
):
    """Grid (B·Hkv, S): one split each; the last split of a (batch, KV head) to finish merges."""
    pid = tl.program_id(0)  # b · Hkv + kv head
    _split_partials(Q, K, V, THETA, LENS, WS, SCR, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    pid, tl.program_id(1), Hkv, N_buf, split_len, S, k_keep, scale_log2,
                    G, BLOCK_G, BLOCK_N, BLOCK_V, CHUNK, D, THETA_MODE, SDC_MODE, FLOOR, HAS_LENS, TWO_PASS)
    _last_merges(Q, K, V, THETA, SDCT, VSUM, LENS, WS, TICKETS, OUT, COUNTS,
                 sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, pid, Hkv, N_buf, S, k_keep, scale_log2, sdc_scale,
                 G, BLOCK_GC, CHUNK_S, D, THETA_MODE, SDC_MODE, FLOOR, VMC, HAS_LENS, VSUM_UPDATE)


@triton.jit
def _decode_split_kernel(
    Q, K, V, THETA, LENS, WS, SCR,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    Hkv, N_buf, split_len, S, k_keep, scale_log2,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
    D: tl.constexpr, THETA_MODE: tl.constexpr, SDC_MODE: tl.constexpr, FLOOR: tl.constexpr, HAS_LENS: tl.constexpr,
    TWO_PASS: tl.constexpr,
):
    """Grid (B·Hkv, S): one split each, partials only (two-launch form)."""
    _split_partials(Q, K, V, THETA, LENS, WS, SCR, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    tl.program_id(0), tl.program_id(1), Hkv, N_buf, split_len, S, k_keep, scale_log2,
                    G, BLOCK_G, BLOCK_N, BLOCK_V, CHUNK, D, THETA_MODE, SDC_MODE, FLOOR, HAS_LENS, TWO_PASS)


@triton.jit
def _decode_combine_kernel(
    Q, K, V, THETA, SDCT, VSUM, LENS, WS, OUT, COUNTS,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    Hkv, N_buf, S, k_keep, scale_log2, sdc_scale,
    G: tl.constexpr, BLOCK_GC: tl.constexpr, CHUNK_S: tl.constexpr, D: tl.constexpr, THETA_MODE: tl.constexpr,
    SDC_MODE: tl.constexpr, FLOOR: tl.constexpr, VMC: tl.constexpr, HAS_LENS: tl.constexpr,
    VSUM_UPDATE: tl.constexpr,
):
    """Grid (B·Hkv,): merges the splits that ``_decode_split_kernel`` wrote (two-launch form)."""
    _combine_splits(Q, K, V, THETA, SDCT, VSUM, LENS, WS, OUT, COUNTS,
                    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    tl.program_id(0), Hkv, N_buf, S, tl.num_programs(0) * G * S, k_keep, scale_log2, sdc_scale,
                    G, BLOCK_GC, CHUNK_S, D, THETA_MODE, SDC_MODE, FLOOR, VMC, HAS_LENS, VSUM_UPDATE)


@triton.jit
def _rowmax_scores_kernel(
    Q, K, THETA, LENS, ST1, SCR,
    sq_b, sq_h, sk_b, sk_h, sk_n,
    Hkv, N_buf, split_len, S, k_keep, scale_log2,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, FLOOR: tl.constexpr,
    HAS_LENS: tl.constexpr,
):
    """Row-max θ, launch 1, grid (B·Hkv, S): stream K, compact the candidates of each split.

    A candidate has ``s − m_run > θ_rel`` with ``m_run`` the running max (≤ the row max), so the
    candidates hold every element the row keeps.  Per split: max, ``Σ 2^(s − max)`` over all
    visible keys, argmax and the candidate count → ``ST1``; candidates → ``SCR``.
    """
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b, hkv, h, offs_g, mask_g, q, th, n_b = _program_setup(Q, THETA, LENS, sq_b, sq_h, pid, Hkv, N_buf, k_keep,
                                                           G, BLOCK_G, D, 2, HAS_LENS)
    Hq = Hkv * G
    start = sid * split_len
    end = tl.minimum(start + split_len, n_b)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    idx = tl.zeros([BLOCK_G], tl.int32)
    dt = tl.zeros([BLOCK_G], tl.float32)  # Σ_visible 2^(s − m)
    cnt = tl.zeros((), tl.int32)
    k_base = K + b.to(tl.int64) * sk_b + hkv * sk_h
    scr = SCR + (pid * S + sid).to(tl.int64) * (split_len * (G + 1))  # split_len positions, G × split_len scores
    scr_s = scr + split_len
    offs_b = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_b
        s = _scores(q, k_base, sk_n, offs_n, offs_n < end, scale_log2, D)
        m, alpha, idx = _running_max(s, m, idx, n0, FLOOR)
        dt = dt * alpha + tl.sum(tl.exp2(s - m[:, None]), 1)
        cand = (s - m[:, None]) > th[:, None]
        cnt = _compact(scr, scr_s, cnt, s, tl.max(cand.to(tl.int32), 0) > 0, offs_n, offs_g, mask_g, split_len)
    R = tl.num_programs(0) * G * S
    part = (b * Hq + h) * S + sid
    tl.store(ST1 + part, m, mask=mask_g)
    tl.store(ST1 + R + part, dt, mask=mask_g)
    tl.store(ST1 + 2 * R + part, idx.to(tl.float32, bitcast=True), mask=mask_g)
    tl.store(ST1 + 3 * R + pid * S + sid, cnt.to(tl.float32, bitcast=True))


@triton.jit
def _rowmax_fused_kernel(
    Q, K, V, THETA, SDCT, VSUM, LENS, ST1, SCR, WS, TICKETS, OUT, COUNTS,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    Hkv, N_buf, split_len, S, k_keep, scale_log2, sdc_scale,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GC: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK_S: tl.constexpr,
    D: tl.constexpr, SDC_MODE: tl.constexpr, FLOOR: tl.constexpr, VMC: tl.constexpr, HAS_LENS: tl.constexpr,
    VSUM_UPDATE: tl.constexpr,
):
    """Row-max θ, launch 2, grid (B·Hkv, S): the exact row max from the splits' maxima, then keep,
    gather and count over this split's candidates; the last split merges."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b, hkv, h, offs_g, mask_g, q, th, n_b = _program_setup(Q, THETA, LENS, sq_b, sq_h, pid, Hkv, N_buf, k_keep,
                                                           G, BLOCK_G, D, 2, HAS_LENS)
    Hq = Hkv * G
    R = tl.num_programs(0) * G * S
    base = (b * Hq + h) * S
    offs_c = tl.arange(0, CHUNK_S)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # the row max over all splits
    ridx = tl.zeros([BLOCK_G], tl.int32)  # its position
    for s0 in range(0, S, CHUNK_S):
        sc = s0 + offs_c
        pm = tl.load(ST1 + base[:, None] + sc[None, :], mask=mask_g[:, None] & (sc < S)[None, :], other=float("-inf"))
        if FLOOR:
            cmax, carg = tl.max(pm, 1, return_indices=True)
            ci = tl.load(ST1 + 2 * R + base + s0 + carg, mask=mask_g, other=0.0)
            ridx = tl.where(cmax > m, ci.to(tl.int32, bitcast=True), ridx)
        else:
            cmax = tl.max(pm, 1)
        m = tl.maximum(m, cmax)
    m = tl.where(mask_g, m, 0.0)
    part = base + sid
    m_s = tl.load(ST1 + part, mask=mask_g, other=float("-inf"))
    dt = tl.load(ST1 + R + part, mask=mask_g, other=0.0) * tl.exp2(m_s - m)  # Σ_visible 2^(s − m) of the split
    cnt = tl.load(ST1 + 3 * R + pid * S + sid).to(tl.int32, bitcast=True)
    scr = SCR + (pid * S + sid).to(tl.int64) * (split_len * (G + 1))
    v_base = V + b.to(tl.int64) * sv_b + hkv * sv_h
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    ds = tl.zeros([BLOCK_G], tl.float32)
    nk = tl.zeros([BLOCK_G], tl.int32)
    kvc = tl.zeros((), tl.int32)
    acc, ds, nk, kvc = _gather_pass(acc, ds, nk, kvc, scr, scr + split_len, cnt, th, m, v_base, sv_n, offs_g, mask_g,
                                    split_len, BLOCK_V, D, True, True)
    du = tl.maximum(dt - ds, 0.0)
    _store_partials(WS, pid, sid, b, h, mask_g, S, Hq, acc, m, ds, du, nk, ridx, kvc, G, D)
    _last_merges(Q, K, V, THETA, SDCT, VSUM, LENS, WS, TICKETS, OUT, COUNTS,
                 sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, pid, Hkv, N_buf, S, k_keep, scale_log2, sdc_scale,
                 G, BLOCK_GC, CHUNK_S, D, 2, SDC_MODE, FLOOR, VMC, HAS_LENS, VSUM_UPDATE)


# ------------------------------------------------------------------------------------------------
# Launch plan
# ------------------------------------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def decode_splits(B: int, Hkv: int, N: int, block_n: int, device: torch.device, waves: int = 8,
                  max_splits: int | None = None) -> int:
    """Number of sequence splits: about ``waves`` programs per SM, at least ``block_n`` keys per split,
    at most ``max_splits`` per (batch, KV head)."""
    splits = min(triton.cdiv(N, block_n), triton.cdiv(waves * _sm_count(device), B * Hkv))
    return max(1, splits if max_splits is None else min(splits, max_splits))


# Largest B·Hkv·N (key rows over all (batch, KV head) pairs) of a latency-bound shape: up to it the plan
# takes the fused single launch (but for one or two sequences at d 128, below), above it the merge runs as
# a second launch.  Why 2^18: results/kernels.md, decode (runs 6, 10, 11).
FUSED_MAX_KV_ROWS = 1 << 18

# Run 17 (results/decode_layers_H200.csv): splits of one 64-key block at least (256 before): SmolLM2 (3 KV
# heads) 12.8 → 11.7 µs per layer at N = 8000 and 10.9 → 6.5 at N = 2048, the same at d 128; at most 64
# splits (132 before) and 8 warps (4 before) in the combine: 123.6 → 104.9 µs per layer at B = 1, N = 128k,
# 77.3 → 58.9 at N = 64k, 107.6 → 106.5 at B = 8, N = 16k.
LAT_MIN_SPLIT = 64
BW_MAX_SPLITS = 64
BW_COMBINE_WARPS = 8
# Run 19: at d 128 with 8-16 (batch, KV head) programs, the latency-bound shapes take two launches too.
FEW_PROGRAMS = range(8, 17)


class DecodePlan(NamedTuple):
    """Launch form and configuration for one decode shape (a tuple: built on every call)."""

    fused: bool  # one launch (the last split merges) or a split launch then a combine launch
    splits: int
    block_n: int  # keys per block
    num_warps: int
    num_stages: int
    two_pass: bool = False  # key loop: K pass then a gather of the kept V rows, or V inside the K loop
    chunk: int = 1024  # two-pass: keys per K pass (the scratch list holds one chunk's kept rows)
    block_v: int = 32  # two-pass and row-max: V rows per gather step
    combine_warps: int = BW_COMBINE_WARPS  # two-launch form: warps of each (batch, KV head)'s combine program


def decode_plan(B: int, Hkv: int, N: int, device: torch.device, d: int, row_max: bool = False) -> DecodePlan:
    """The tuned launch for a decode shape; the one place that picks the form.

    ``N`` is the key buffer's length (a static cache's capacity), ``d`` the head dimension;
    ``row_max``: θ relative to the row max, whose kernels are always a fused pair (they take the
    fused plan's splits and warps).  Measured on an H200 (benchmarks/tune_decode.py,
    results/decode_tuning_H200.csv; benchmarks/tune_decode_layers.py, results/decode_layers_H200.csv,
    which times 32 layers each over its own cold cache, as a decode step runs them; results/kernels.md):
    * B·Hkv·N ≤ :data:`FUSED_MAX_KV_ROWS` (latency-bound), d = 128 and B·Hkv in :data:`FEW_PROGRAMS`
      (one or two sequences of an 8-KV-head model): two launches, 2 warps, about 4 programs per SM,
      splits of at least :data:`LAT_MIN_SPLIT` keys, at most :data:`BW_MAX_SPLITS`, 8 combine warps.
      Run 19 (B = 1, Hkv = 8, CUDA graphs): 27.3 → 24.4 µs per layer at N = 16k, 44.2 → 36.3 at 32k,
      14.3 → 13.9 at 4k against the fused launch; B = 2 is not measured.  An eager call issues two
      launches instead of one (more host time per layer where the host sets the pace: decode on a
      GPU runs in CUDA graphs, :mod:`topθ_core.graph_decode`).
    * other latency-bound shapes: fused, about two programs of 4 warps per SM (8 warps, when
      B·Hkv > 16 programs of 2 warps), splits of at least :data:`LAT_MIN_SPLIT` keys (one block).
    * larger (bandwidth-bound): two launches, 64 keys, 2 warps, 3 stages, 8 programs per SM but at
      most :data:`BW_MAX_SPLITS` splits per (batch, KV head), merged by a combine program of
      :data:`BW_COMBINE_WARPS` warps: each (batch, KV head)'s splits are merged by one program, and
      at B = 1, N = 128k its 132 splits took 14 µs of a 118 µs layer (run 16's profile).
    * the one-pass key loop everywhere: the two-pass loop measured slower at every shape (run 12,
      results/kernels.md), so it is an option (``two_pass=True``), not the plan.
    """
    latency_bound = B * Hkv * N <= FUSED_MAX_KV_ROWS
    if latency_bound and d == 128 and B * Hkv in FEW_PROGRAMS and not row_max:
        return DecodePlan(False, decode_splits(B, Hkv, N, LAT_MIN_SPLIT, device, 4, BW_MAX_SPLITS), 64, 2, 3)
    if latency_bound:
        warps = 4 if B * Hkv <= 16 else 2  # 8 warps per SM
        return DecodePlan(True, decode_splits(B, Hkv, N, LAT_MIN_SPLIT, device, 8 // warps), 64, warps, 3)
    return DecodePlan(False, decode_splits(B, Hkv, N, 64, device, 8, BW_MAX_SPLITS), 64, 2, 3)


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


def _chunk_s(block_gc: int, d: int, num_warps: int) -> int:
    """Splits merged per step of the combine: a (heads, splits, d) fp32 load of ~64 registers a thread."""
    return max(2, 2048 * num_warps // (block_gc * d))


def _f32(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or (x.dtype == torch.float32 and x.is_contiguous()) else x.to(torch.float32).contiguous()


def _decode_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None,
                   sdc_term: torch.Tensor | None, v_sum: torch.Tensor | None, lengths: torch.Tensor | None,
                   scale: float, k_keep: int, theta_mode: int, sdc_mode: int, sdc_scale: float, vmc: bool,
                   update_v_sum: bool, floor_max: bool, fused: bool | None, two_pass: bool | None, num_splits: int, block_n: int,
                   num_warps: int, num_stages: int, chunk: int, block_v: int, combine_warps: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks, allocation and the launch(es).  Returns out (B, Hq, 1, d) and the counts, flat int32:
    kept (B·Hq), empty (B·Hq), kept V rows (B·Hkv).  ``theta_mode``/``sdc_mode`` are the
    :class:`KernelTheta`/:class:`KernelSdc` values (integers only across the custom op);
    ``fused=None``/``two_pass=None`` and zero knobs take the :func:`decode_plan` values."""
    theta_kind, sdc = KernelTheta(theta_mode), KernelSdc(sdc_mode)
    B, Hq, _, D = q.shape
    _, Hkv, N, _ = k.shape
    G = Hq // Hkv
    if N < 1:
        raise ValueError("decode needs at least one key")
    if theta_kind is not KernelTheta.DENSE and (theta is None or theta.numel() != B * Hq):
        raise ValueError(f"theta must be (B, Hq[, 1]) = {(B, Hq)}, got {None if theta is None else tuple(theta.shape)}")
    if sdc is KernelSdc.OFFLINE and (sdc_term is None or sdc_term.numel() != B * Hq):
        raise ValueError("offline SDC needs sdc_term (B, Hq[, 1])")
    if vmc and (v_sum is None or v_sum.shape != (B, Hkv, D)):
        raise ValueError("VMC needs v_sum (B, Hkv, d): the float32 sum of the valid V rows")
    update_v_sum = bool(vmc and update_v_sum)
    if update_v_sum and (v_sum.dtype != torch.float32 or not v_sum.is_contiguous() or v_sum.device != q.device):
        raise ValueError("update_v_sum adds to v_sum in place: it must be a contiguous float32 tensor on q's device")
    if lengths is not None:
        if lengths.shape != (B,) or lengths.device != q.device:
            raise ValueError(f"lengths must be a (B,) = ({B},) tensor on {q.device}, got {tuple(lengths.shape)}")
        lengths = lengths if lengths.dtype == torch.int32 else lengths.to(torch.int32)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    theta, sdc_term, v_sum = _f32(theta), _f32(sdc_term), _f32(v_sum)
    row_max = theta_kind is KernelTheta.ROW_MAX
    plan = decode_plan(B, Hkv, N, q.device, D, row_max)
    fused = plan.fused if fused is None else fused
    two_pass = plan.two_pass if two_pass is None else two_pass
    num_splits, block_n, num_warps, num_stages, chunk, block_v, combine_warps = (x if x > 0 else p for x, p in zip(
        (num_splits, block_n, num_warps, num_stages, chunk, block_v, combine_warps),
        (plan.splits, plan.block_n, plan.num_warps, plan.num_stages, plan.chunk, plan.block_v, plan.combine_warps)))
    split_len = triton.cdiv(triton.cdiv(N, num_splits), block_n) * block_n
    S = triton.cdiv(N, split_len)
    chunk = max(block_n, min(next_pow2(chunk), next_pow2(split_len)))  # a power of two: few compiled variants
    dev = q.device
    R = B * Hq * S
    n_ws = R * (D + 5) + B * Hkv * S
    n_st1 = 3 * R + B * Hkv * S if row_max else 0
    per_prog = (split_len if row_max else chunk) * (G + 1) if (row_max or two_pass) else 0
    ws = torch.empty(n_ws + n_st1 + B * Hkv * S * per_prog, dtype=torch.float32, device=dev)
    ws_part, st1, scr = ws[:n_ws], ws[n_ws:n_ws + n_st1], ws[n_ws + n_st1:]
    out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=dev)
    counts = torch.empty(2 * B * Hq + B * Hkv, dtype=torch.int32, device=dev)
    if POISON_OUTPUTS:
        out.fill_(float("nan")), counts.fill_(-1), ws.fill_(float("nan"))
    # absent optional inputs: any pointer (the kernels never read it)
    th, sdct, vsum, lens = (ws if x is None else x for x in (theta, sdc_term, v_sum, lengths))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    scale_log2 = float(scale) * LOG2E.value
    block_g, block_gc = max(16, next_pow2(G)), max(2, next_pow2(G))
    common = dict(G=G, D=D, FLOOR=floor_max, HAS_LENS=lengths is not None)
    merge = dict(BLOCK_GC=block_gc, SDC_MODE=int(sdc), VMC=vmc, VSUM_UPDATE=update_v_sum)
    if row_max:
        _rowmax_scores_kernel[(B * Hkv, S)](
            q, k, th, lens, st1, scr, *strides[:5], Hkv, N, split_len, S, int(k_keep), scale_log2,
            BLOCK_G=block_g, BLOCK_N=block_n, **common, num_warps=num_warps, num_stages=num_stages)
        _rowmax_fused_kernel[(B * Hkv, S)](
            q, k, v, th, sdct, vsum, lens, st1, scr, ws_part, _tickets(dev, B * Hkv), out, counts, *strides,
            Hkv, N, split_len, S, int(k_keep), scale_log2, float(sdc_scale),
            BLOCK_G=block_g, BLOCK_V=block_v, CHUNK_S=_chunk_s(block_gc, D, num_warps), **common, **merge,
            num_warps=num_warps, num_stages=num_stages)
        return out, counts
    loop = dict(BLOCK_N=block_n, BLOCK_V=block_v, CHUNK=chunk, THETA_MODE=int(theta_kind), TWO_PASS=bool(two_pass))
    if fused:
        _decode_fused_kernel[(B * Hkv, S)](
            q, k, v, th, sdct, vsum, lens, ws_part, scr, _tickets(dev, B * Hkv), out, counts, *strides,
            Hkv, N, split_len, S, int(k_keep), scale_log2, float(sdc_scale),
            BLOCK_G=block_g, CHUNK_S=_chunk_s(block_gc, D, num_warps), **common, **merge, **loop,
            num_warps=num_warps, num_stages=num_stages)
    else:
        _decode_split_kernel[(B * Hkv, S)](
            q, k, v, th, lens, ws_part, scr, *strides, Hkv, N, split_len, S, int(k_keep), scale_log2,
            BLOCK_G=block_g, SDC_MODE=int(sdc), **common, **loop, num_warps=num_warps, num_stages=num_stages)
        _decode_combine_kernel[(B * Hkv,)](
            q, k, v, th, sdct, vsum, lens, ws_part, out, counts, *strides, Hkv, N, S, int(k_keep), scale_log2,
            float(sdc_scale), CHUNK_S=_chunk_s(block_gc, D, combine_warps), THETA_MODE=int(theta_kind),
            **common, **merge, num_warps=combine_warps)
    return out, counts


@torch.library.custom_op("toptheta::decode", mutates_args=("v_sum",))
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None,
               sdc_term: torch.Tensor | None, v_sum: torch.Tensor | None, lengths: torch.Tensor | None, scale: float,
               k_keep: int, theta_mode: int, sdc_mode: int, sdc_scale: float, vmc: bool, update_v_sum: bool,
               floor_max: bool, fused: bool | None, two_pass: bool | None, num_splits: int, block_n: int, num_warps: int,
               num_stages: int, chunk: int, block_v: int, combine_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _decode_launch(q, k, v, theta, sdc_term, v_sum, lengths, scale, k_keep, theta_mode, sdc_mode, sdc_scale,
                          vmc, update_v_sum, floor_max, fused, two_pass, num_splits, block_n, num_warps, num_stages,
                          chunk, block_v, combine_warps)


@_decode_op.register_fake
def _(q, k, v, theta, sdc_term, v_sum, lengths, scale, k_keep, theta_mode, sdc_mode, sdc_scale, vmc, update_v_sum,
      floor_max, fused, two_pass, num_splits, block_n, num_warps, num_stages, chunk, block_v, combine_warps):
    B, Hq, _, D = q.shape
    return q.new_empty(B, Hq, 1, D), torch.empty(2 * B * Hq + B * k.shape[1], dtype=torch.int32, device=q.device)


def topθ_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None, *,
                config: SparseConfig, k_keep: int, sdc_term: torch.Tensor | None = None,
                v_sum: torch.Tensor | None = None, update_v_sum: bool = False, lengths: torch.Tensor | None = None,
                scale: float | None = None, fused: bool | None = None, two_pass: bool | None = None,
                num_splits: int = 0, block_n: int = 0, num_warps: int = 0, num_stages: int = 0, chunk: int = 0,
                block_v: int = 0, combine_warps: int = 0) -> tuple[torch.Tensor, KernelCounts]:
    """Top-θ attention of one new query token per sequence against the whole cache.

    Args:
        q: (B, Hq, 1, d) the new token's queries; k, v: (B, Hkv, N, d) the cache.  fp16/bf16,
            d ∈ {64, 128}; query head h reads KV head h // (Hq // Hkv).  Any strides with a
            contiguous last dimension.
        theta: (B, Hq, 1) or (B, Hq) θ per row in logit space (``None`` only for dense); with
            ``config.theta_reference = row-max`` θ_rel, compared with the score minus the row max.
        config: selection, SDC, VMC, empty-row floor, θ reference (top-θ pre-softmax or dense; see
            :func:`~topθ_core.kernels.kernel_variant` with ``decode=True``).
        k_keep: this layer's k; a row is dense when its length L ≤ k_keep.
        sdc_term: (B, Hq[, 1]) offline SDC term C, for ``sdc=offline``.
        v_sum: (B, Hkv, d) float32 sum of the valid V rows, for VMC (v̄ = v_sum / L).
        update_v_sum: ``v_sum`` holds every valid V row but the last (row L_b − 1, a decode step's
            new key); the kernel adds that row to ``v_sum`` in place, then uses the sum.  A decode
            step then needs no separate update of its running V sum.  ``v_sum`` must be a
            contiguous float32 tensor.
        lengths: (B,) int32 valid keys per sequence (keys [0, L_b) are visible, 1 ≤ L_b ≤ N, not
            checked: a device tensor, read by the kernel, so one CUDA graph serves every step of a
            static cache); ``None``: every key is visible (L = N).
        fused: one launch (the last split merges) or two (splits, then a combine kernel);
            ``None`` takes the form :func:`decode_plan` picks for the shape.
        two_pass: key loop (K pass + kept-V gather, or V inside the K loop); ``None``: the plan's.
        num_splits, block_n, num_warps, num_stages, chunk, block_v, combine_warps: launch
            configuration; 0 takes the tuned :func:`decode_plan` value.
    Returns:
        out (B, Hq, 1, d) in q's dtype, and :class:`KernelCounts`.
    """
    B, Hq, Hkv, Sq, N, d = check_qkv(q, k, v)
    if Sq != 1:
        raise ValueError(f"decode takes one query token per sequence, got {Sq}")
    var = kernel_variant(config, decode=True)
    if var is None:
        raise NotImplementedError(f"the decode kernel does not implement {config.label()}")
    theta_kind = var.theta
    if theta_kind is KernelTheta.DENSE:
        theta = None
    elif theta is None:
        raise ValueError("top-theta needs theta")
    elif lengths is None and N <= k_keep:  # dense row, known on the host: no θ to read
        theta_kind, theta = KernelTheta.DENSE, None
    op = torch.ops.toptheta.decode if torch.compiler.is_compiling() else _decode_launch
    out, counts = op(q, k, v, theta, sdc_term, v_sum, lengths, float(d ** -0.5 if scale is None else scale),
                     int(k_keep), int(theta_kind), int(var.sdc), var.sdc_scale, var.vmc, bool(update_v_sum),
                     var.floor_max, fused, two_pass, int(num_splits), int(block_n), int(num_warps), int(num_stages),
                     int(chunk), int(block_v), int(combine_warps))
    kept, empty, kv = counts.split((B * Hq, B * Hq, B * Hkv))
    return out, KernelCounts(kept=kept.view(B, Hq), empty=empty.view(B, Hq), kept_v_rows=kv.view(B, Hkv))
