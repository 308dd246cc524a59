"""Calibration samples on the GPU without the N × N score matrix.

For every causal query row the calibration records ``t`` = the (k+1)-th largest visible logit
and ``D_U = Σ_{a ≤ t} e^(a − m)`` (SPEC.md, Calibration).  The PyTorch path materialises the
score matrix and runs ``topk``; this kernel walks key tiles the way attention does and keeps,
per row, the top ``KB`` scores seen so far (KB = next power of two ≥ kth) in registers:

* a tile is merged only when one of its scores beats the current kth-largest (after the first
  tiles almost none do);
* merging is one bitonic half-clean: with the buffer sorted descending and the tile sorted
  ascending, ``max(buf_i, tile_i)`` holds the top KB of the union, which one more sort orders;
* ``D_U`` comes in the same pass as the dense denominator minus the mass of the scores above t.

Layers: ``_row_samples_kernel`` → ``_row_samples_launch`` → ``toptheta::row_samples`` (custom op
+ fake) → :func:`row_samples`.  Pre-softmax (logit space) only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_qkv, last_dim_contiguous, next_pow2

MAX_KTH = 256  # largest kth the kernel keeps in registers (buffer of next_pow2(kth) scores per row)


@triton.jit
def _row_samples_kernel(
    Q, K, T, DU,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n,
    Hq, Sq, Sk, kth, scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, KB: tl.constexpr, D: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hkv = h // G
    offset = Sk - Sq
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Sq
    rows_abs = offs_m + offset
    offs_d = tl.arange(0, D)
    offs_b = tl.arange(0, KB)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    buf = tl.full([BLOCK_M, KB], float("-inf"), tl.float32)  # top-KB so far, sorted descending
    t = tl.full([BLOCK_M], float("-inf"), tl.float32)  # kth largest so far
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    dtot = tl.zeros([BLOCK_M], tl.float32)  # Σ e^(a − m) over all visible keys
    k_base = K + b * sk_b + hkv * sk_h
    hi = tl.minimum(start_m * BLOCK_M + BLOCK_M + offset, Sk)
    for n0 in range(0, hi, KB):
        offs_n = n0 + offs_b
        kt = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=(offs_n < Sk)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kt)) * scale
        s = tl.where((offs_n[None, :] <= rows_abs[:, None]) & (offs_n < Sk)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        dtot = dtot * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
        if tl.max(tl.max((s > t[:, None]).to(tl.int32), 1), 0) > 0:
            asc = tl.sort(s, 1)
            buf = tl.sort(tl.maximum(buf, asc), 1, descending=True)
            t = tl.sum(tl.where(offs_b[None, :] == kth - 1, buf, 0.0), 1)
    above = tl.where((offs_b[None, :] < kth - 1) & (buf > t[:, None]), tl.exp(buf - m[:, None]), 0.0)
    d_u = tl.maximum(dtot - tl.sum(above, 1), 0.0)
    ok = (rows_abs + 1) >= kth
    row = (b * Hq + h) * Sq + offs_m
    tl.store(T + row, tl.where(ok, t, float("nan")), mask=mask_m)
    tl.store(DU + row, tl.where(ok, d_u, float("nan")), mask=mask_m)


def _row_samples_launch(q: torch.Tensor, k: torch.Tensor, kth: int, scale: float, block_m: int, num_warps: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if kth < 1:
        raise ValueError(f"kth must be at least 1, got {kth}")
    if Sk < Sq:
        raise ValueError("row_samples needs kv_len ≥ q_len")
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    kb = max(16, next_pow2(kth))
    block_m = block_m or (16 if q.device.type != "cuda" or kb >= 512 else 32)
    t = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    d_u = torch.empty_like(t)
    from . import decode as _d

    if _d.POISON_OUTPUTS:
        t.fill_(123.0), d_u.fill_(123.0)
    _row_samples_kernel[(triton.cdiv(Sq, block_m), B * Hq)](
        q, k, t, d_u, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        Hq, Sq, Sk, int(kth), float(scale),
        G=Hq // Hkv, BLOCK_M=block_m, KB=kb, D=D, num_warps=num_warps or (8 if kb >= 512 else 4),
    )
    return t, d_u


@torch.library.custom_op("toptheta::row_samples", mutates_args=())
def _row_samples_op(q: torch.Tensor, k: torch.Tensor, kth: int, scale: float, block_m: int, num_warps: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _row_samples_launch(q, k, kth, scale, block_m, num_warps)


@_row_samples_op.register_fake
def _(q, k, kth, scale, block_m, num_warps):
    B, Hq, Sq, _ = q.shape
    return q.new_empty(B, Hq, Sq, dtype=torch.float32), q.new_empty(B, Hq, Sq, dtype=torch.float32)


def row_samples(q: torch.Tensor, k: torch.Tensor, kth: int, *, scale: float | None = None, block_m: int = 0,
                num_warps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration samples of every causal query row, without materialising the scores.

    Args:
        q: (B, Hq, Sq, d); k: (B, Hkv, Sk, d), Sk ≥ Sq, bottom-right causal (row i sees keys
            j ≤ Sk − Sq + i).  fp16/bf16, d ∈ {64, 128}.
        kth: which largest score to return (k + 1 for a target of k kept elements).  Above
            ``MAX_KTH`` (256) this falls back to the PyTorch path, which materialises the scores.
    Returns:
        ``t`` (B, Hq, Sq) the kth-largest visible logit (scaled by ``scale``) and ``d_u``
        (B, Hq, Sq) ``Σ_{a ≤ t} e^(a − m)``, float32; NaN on rows with fewer than kth keys.
    """
    check_qkv(q, k, k)
    d = q.shape[-1]
    scale = float(d ** -0.5 if scale is None else scale)
    if kth > MAX_KTH:  # the register buffer would not fit: the PyTorch path (dense scores + topk)
        from .reference import row_samples_causal_ref

        return row_samples_causal_ref(q, k, kth, scale=scale)
    op = torch.ops.toptheta.row_samples if torch.compiler.is_compiling() else _row_samples_launch
    return op(q, k, int(kth), scale, int(block_m), int(num_warps))
