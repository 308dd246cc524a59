"""Shared pieces of the Triton kernels: variant codes, support checks, count containers."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import SDC, EmptyRowFloor, Placement, Selection, SparseConfig

# The kernels take the SDC variant as a compile-time code; the public functions take the Enum.
SDC_CODE: dict[SDC, int] = {SDC.NONE: 0, SDC.EXACT: 1, SDC.EXP_THRESHOLD: 2, SDC.OFFLINE: 3}

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)


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

    sdc: int  # SDC_CODE
    sdc_scale: float
    vmc: bool
    floor_max: bool
    dense: bool  # selection=dense: θ = −∞ everywhere, no compensation


def kernel_variant(config: SparseConfig) -> KernelVariant | None:
    """Map a config to a kernel variant, or ``None`` when the kernels do not implement it.

    Supported: dense, and top-θ with pre-softmax placement, any SDC, VMC, floor none/max.
    Not supported (the reference runs): top-k, post-softmax placement, capk.
    """
    if config.selection is Selection.DENSE:
        return KernelVariant(sdc=0, sdc_scale=1.0, vmc=False, floor_max=False, dense=True)
    if config.selection is not Selection.TOP_THETA or config.placement is not Placement.PRE or config.capk:
        return None
    return KernelVariant(sdc=SDC_CODE[config.sdc], sdc_scale=float(config.sdc_scale), vmc=bool(config.vmc),
                         floor_max=config.empty_row is EmptyRowFloor.MAX, dense=False)


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
