"""Dispatch from the transformers attention function to the Triton GPU kernels.

``try_kernels`` returns the attention output (B, Hq, Sq, d) when a kernel supports the
call (CUDA, fp16/bf16, head dim 64/128, a supported variant) and ``None`` otherwise, in
which case the caller runs the PyTorch reference with identical semantics.

Supported: dense and top-θ pre-softmax selection with any SDC, VMC and empty-row floor;
decode (one query row, every cached key visible) and causal prefill (``Sq ≤ Sk``,
bottom-right aligned: chunked prefill included).  Not supported, so the reference runs:
top-k, post-softmax placement, capk, soft-capping, padding/sliding-window masks, observers
(they need the reference's row blocks), V-row popularity tracking, and every config whose
``SparseConfig.kernel_compatible`` is False (θ relative to the row max, per-head k, always-kept
positions).

VMC in decode reads ``v̄`` from a float32 running sum of the cache's V rows kept in
``state.scratch[("topθ.vsum", layer)] = (rows summed, (B, Hkv, d) sum)``: a prefill through
the kernel seeds it, each decode step adds the rows appended since (O(d) per step), and it is
rebuilt from the cache when it cannot belong to it (fewer cached rows than summed, another
batch shape).  Kept counts go to ``state.metrics.add_counts`` without a kept mask.
"""

from __future__ import annotations

import os

import torch

from .attention import causal_visible

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once at import: CPU tensors allowed (tests)
_VSUM_KEY = "topθ.vsum"

try:  # Triton is optional (CPU-only installs run the reference)
    from .kernels import kernel_variant, topθ_decode, topθ_prefill
    from .kernels._common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    _KERNELS = True
except ImportError:  # pragma: no cover - depends on the install
    _KERNELS = False


def kernels_available() -> bool:
    """Whether the Triton kernels could be imported."""
    return _KERNELS


def _supported_tensors(query, key, value) -> bool:
    if not (query.is_cuda or (_INTERPRET and query.device.type == "cpu")):
        return False
    if query.dtype not in SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        return False
    B, Hq, Sq, d = query.shape
    Bk, Hkv, Sk, dk = key.shape
    return d in SUPPORTED_HEAD_DIMS and dk == d and Bk == B and Hkv > 0 and Hq % Hkv == 0 and 1 <= Sq <= Sk


def _running_v_sum(state, layer: int, value: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, d) float32 sum of the N cached V rows, updated incrementally (O(d) per new row)."""
    B, Hkv, N, d = value.shape
    entry = state.scratch.get((_VSUM_KEY, layer))
    if entry is not None:
        n, vsum = entry
        if vsum.shape == (B, Hkv, d) and vsum.device == value.device and n <= N:
            # in place, one small kernel per step (the sum is only held here; launches are stream-ordered)
            if n == N - 1:
                vsum.add_(value[:, :, n])
            elif n < N:
                vsum.add_(value[:, :, n:N].sum(2, dtype=torch.float32))
            state.scratch[(_VSUM_KEY, layer)] = (N, vsum)
            return vsum
    vsum = value.sum(2, dtype=torch.float32)
    state.scratch[(_VSUM_KEY, layer)] = (N, vsum)
    return vsum


def _report(state, layer: int, phase: str, counts, B: int, Hq: int, Hkv: int, Sq: int, Sk: int, k_keep: int,
            device) -> None:
    """Kernel counts → ``SparsityMetrics.add_counts`` (same numbers the reference observer adds)."""
    offset = Sk - Sq
    L = torch.arange(offset + 1, Sk + 1, dtype=torch.long)  # row lengths, causal
    full = lambda n, val: torch.full((n,), int(val), dtype=torch.long, device=device)  # noqa: E731
    state.metrics.add_counts(
        layer, phase,
        kept=counts.kept.sum(0, dtype=torch.long), visible=full(Hq, B * int(L.sum())),
        topk_equiv=full(Hq, B * int(L.clamp(max=k_keep).sum())), rows=full(Hq, B * Sq),
        dense_rows=full(Hq, B * int((L <= k_keep).sum())), empty_rows=counts.empty.sum(0, dtype=torch.long),
        kept_v_rows=counts.kept_v_rows.sum(0, dtype=torch.long), kv_rows=full(Hkv, B * Sk),
    )


def try_kernels(query, key, value, visible, is_causal, theta, sdc_term, cfg, k_keep, scaling, softcap, state,
                layer, module):
    """Run the Triton kernel for this attention call, or return ``None`` (the reference runs).

    ``query`` (B, Hq, Sq, d), ``key``/``value`` (B, Hkv, Sk, d), ``visible`` (B, Sq, Sk) bool (``None`` when ``is_causal``),
    ``is_causal`` True when transformers passed no mask (plain causal), ``theta``/``sdc_term``
    (B, Hq, Sq) float32 or ``None``.  Returns (B, Hq, Sq, d) in ``query``'s dtype.
    """
    if not _KERNELS or softcap is not None or state.observers or not cfg.kernel_compatible:
        return None  # kernel-incompatible configs (row-max θ, per-head k, always-kept positions) run the reference
    metrics = state.metrics
    if metrics is not None and getattr(metrics, "track_popularity", False):
        return None
    var = kernel_variant(cfg)
    if var is None or not _supported_tensors(query, key, value):
        return None
    if not var.dense and (theta is None or (var.sdc == 3 and sdc_term is None)):
        return None
    B, Hq, Sq, d = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]
    scale = float(d ** -0.5 if scaling is None else scaling)
    if Sq == 1:
        if not is_causal and not bool(visible.all()):
            return None  # padding in the cache: the reference handles arbitrary visibility
        v_sum = _running_v_sum(state, layer, value) if var.vmc else None
        out, counts = topθ_decode(query, key, value, theta, config=cfg, k_keep=k_keep, sdc_term=sdc_term,
                                  v_sum=v_sum, scale=scale)
        phase = "decode"
    else:
        if not is_causal and not torch.equal(visible, causal_visible(Sq, Sk, visible.device, B)):
            return None
        out, counts, v_total = topθ_prefill(query, key, value, theta, config=cfg, k_keep=k_keep, sdc_term=sdc_term,
                                            scale=scale, counts=metrics is not None, return_v_sum=True)
        if v_total is not None:
            state.scratch[(_VSUM_KEY, layer)] = (Sk, v_total)
        phase = "prefill"
    if metrics is not None:
        _report(state, layer, phase, counts, B, Hq, Hkv, Sq, Sk, k_keep, query.device)
    return out
