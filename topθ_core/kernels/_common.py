"""Shared pieces of the Triton kernels: constants, variant Enums, support checks, count containers,
and the compensation tail (SDC + VMC) every kernel ends with."""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..config import SDC, EmptyRowFloor, Placement, Selection, SparseConfig, ThetaReference

# log2(e): the kernels work in the log2 domain (scores · log2 e, exp2).  A constexpr so that
# @triton.jit code may read it; Python code uses ``LOG2E.value``.
LOG2E = tl.constexpr(1.4426950408889634)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)


class KernelSdc(enum.IntEnum):
    """The SDC variant as the kernels take it: a compile-time integer only at the Triton call."""

    NONE = 0
    EXACT = 1
    EXP_THRESHOLD = 2
    OFFLINE = 3

    @classmethod
    def of(cls, sdc: SDC) -> "KernelSdc":
        return cls[SDC(sdc).name]


class KernelTheta(enum.IntEnum):
    """What a kernel compares with θ (decode): nothing (dense), the score, or the score minus the row max."""

    DENSE = 0  # keep everything (dense selection, or a dense row)
    ABSOLUTE = 1  # keep s > θ
    ROW_MAX = 2  # keep s − max_j s_j > θ_rel


class KernelCounts(NamedTuple):
    """What a kernel kept, without a kept mask: per (batch, query head) and per (batch, KV head).

    ``kept`` (B, Hq) kept elements (floor element and dense rows included), ``empty`` (B, Hq)
    thresholded rows where nothing passed θ, ``kept_v_rows`` (B, Hkv) V rows kept by any query
    head of the group (and, in prefill, any row of the call).  All int32.
    """

    kept: torch.Tensor
    empty: torch.Tensor
    kept_v_rows: torch.Tensor


class KernelVariant(NamedTuple):
    """The compile-time variant a config maps to (``None`` from :func:`kernel_variant` = unsupported)."""

    sdc: KernelSdc
    sdc_scale: float
    vmc: bool
    floor_max: bool
    dense: bool  # selection=dense: θ = −∞ everywhere, no compensation
    row_max: bool = False  # θ relative to the row maximum (decode kernel only)

    @property
    def theta(self) -> KernelTheta:
        if self.dense:
            return KernelTheta.DENSE
        return KernelTheta.ROW_MAX if self.row_max else KernelTheta.ABSOLUTE


def kernel_variant(config: SparseConfig, *, decode: bool = False) -> KernelVariant | None:
    """Map a config to a kernel variant, or ``None`` when the kernel does not implement it.

    Supported: dense, and top-θ with pre-softmax placement, any SDC, VMC, floor none/max, one k
    per layer.  θ relative to the row maximum (``theta_reference=row-max``) only in decode
    (``decode=True``: the decode kernel reads all scores before it decides).  Not supported (the
    reference runs): top-k, post-softmax placement, capk, always-kept sink/recent positions,
    per-head k.
    """
    if config.selection is Selection.DENSE:
        return KernelVariant(sdc=KernelSdc.NONE, sdc_scale=1.0, vmc=False, floor_max=False, dense=True)
    if config.selection is not Selection.TOP_THETA or config.placement is not Placement.PRE or config.capk:
        return None
    if config.sink_tokens or config.recent_tokens or config.k.head_overrides:
        return None
    row_max = config.theta_reference is ThetaReference.ROW_MAX
    if row_max and not decode:
        return None
    return KernelVariant(sdc=KernelSdc.of(config.sdc), sdc_scale=float(config.sdc_scale), vmc=bool(config.vmc),
                         floor_max=config.empty_row is EmptyRowFloor.MAX, dense=False, row_max=row_max)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate (B, Hq, Sq, d) / (B, Hkv, Sk, d) inputs; returns B, Hq, Hkv, Sq, Sk, d."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-D q/k/v, got {q.dim()}, {k.dim()}, {v.dim()}")
    B, Hq, Sq, d = q.shape
    Bk, Hkv, Sk, dk = k.shape
    if Bk != B or dk != d or tuple(v.shape) != (B, Hkv, Sk, d) or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q/k/v must share one dtype among {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    return B, Hq, Hkv, Sq, Sk, d


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def compensated_output(acc, ds, du, ndrop, th, m, c_off, v_mean, sdc_scale,
                       SDC_MODE: tl.constexpr, VMC: tl.constexpr):
    """The compensation tail of a row block (SPEC.md, Compensations), in the log2 domain.

    Rows (R,): ``acc`` (R, D) = Σ_kept 2^(s − m) v, ``ds`` = D_S, ``du`` = the exact dropped mass
    D_U (read by exact SDC only), ``ndrop`` = |U|, ``th`` the absolute threshold (log2 units) and
    ``m`` the row max (exp-threshold SDC), ``c_off`` the offline term C (offline SDC), ``v_mean``
    (R, D) the mean of the visible V rows (VMC).  Returns
    ``o = acc / (D_S + s·D̃_U) + (1 − D_S / (D_S + s·D̃_U)) · v̄`` (the VMC term only with VMC).
    """
    if SDC_MODE == 1:  # exact: D̃_U = D_U (exactly 0 where nothing was dropped)
        d_u = tl.where(ndrop > 0, du, 0.0)
    elif SDC_MODE == 2:  # exp-threshold: |U| · e^(θ − m)
        d_u = tl.where(ndrop > 0, ndrop.to(tl.float32) * tl.exp2(th - m), 0.0)
    elif SDC_MODE == 3:  # offline: C[ℓ, h, L] where something was dropped
        d_u = tl.where(ndrop > 0, c_off, 0.0)
    else:
        d_u = tl.zeros_like(ds)
    denom = ds + sdc_scale * d_u
    denom = tl.where(denom > 0, denom, 1.0)
    o = acc / denom[:, None]
    if VMC:
        o += (1.0 - ds / denom)[:, None] * v_mean
    return o
