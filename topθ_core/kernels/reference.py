"""PyTorch references with the kernels' signatures, built on the engine's oracle.

Every kernel has one here: tests compare against it, benchmarks check against it first, and
it documents in plain PyTorch what the kernel computes.  ``upcast=True`` computes in float32
(the "fp32 reference" of the tolerance rule); ``upcast=False`` computes in the input dtype
(the "low-precision reference" whose error sets the tolerance).
"""

from __future__ import annotations

import torch

from ..attention import RowBlock, causal_visible, topθ_attention_ref
from ..config import Selection, SparseConfig
from ._common import KernelCounts


class _CountObserver:
    """Collects :class:`KernelCounts` from the reference's row blocks (union over chunks)."""

    def __init__(self):
        self.kept = self.empty = self.union = None

    def __call__(self, block: RowBlock) -> None:
        B, H, R, N = block.kept.shape
        g = H // block.n_kv_heads
        kept = block.kept.sum((2, 3))
        empty = block.empty_rows.sum(-1)
        union = block.kept.reshape(B, block.n_kv_heads, g * R, N).any(2)
        if self.kept is None:
            self.kept, self.empty, self.union = kept, empty, union
        else:
            self.kept, self.empty, self.union = self.kept + kept, self.empty + empty, self.union | union

    def counts(self) -> KernelCounts:
        return KernelCounts(kept=self.kept.to(torch.int32), empty=self.empty.to(torch.int32),
                            kept_v_rows=self.union.sum(-1).to(torch.int32))


def _ref(q, k, v, theta, config, k_keep, sdc_term, scale, upcast, visible=None):
    obs = _CountObserver()
    if config.selection is Selection.DENSE:
        theta = None
    out = topθ_attention_ref(q, k, v, config=config, k_keep=k_keep, visible=visible, theta=theta,
                             sdc_term=sdc_term, scale=scale, upcast=upcast, observer=obs)
    return out, obs.counts()


def topθ_decode_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None, *,
                    config: SparseConfig, k_keep: int, sdc_term: torch.Tensor | None = None,
                    v_sum: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                    scale: float | None = None, upcast: bool = True, **_tuning) -> tuple[torch.Tensor, KernelCounts]:
    """Reference of :func:`~topθ_core.kernels.topθ_decode` (``v_sum`` is ignored: v̄ comes from V).

    ``lengths`` (B,): sequence b sees keys [0, lengths[b]) (a static cache's valid prefix).
    """
    B, Hq = q.shape[:2]
    theta = None if theta is None else theta.reshape(B, Hq, 1)
    sdc_term = None if sdc_term is None else sdc_term.reshape(B, Hq, 1)
    visible = None
    if lengths is not None:
        N = k.shape[2]
        visible = (torch.arange(N, device=q.device).view(1, 1, N) < lengths.to(q.device).view(B, 1, 1))
    return _ref(q, k, v, theta, config, k_keep, sdc_term, scale, upcast, visible=visible)


def topθ_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None, *,
                     config: SparseConfig, k_keep: int, sdc_term: torch.Tensor | None = None,
                     scale: float | None = None, upcast: bool = True, **_tuning) -> tuple[torch.Tensor, KernelCounts]:
    """Reference of :func:`~topθ_core.kernels.topθ_prefill` (causal, bottom-right aligned)."""
    return _ref(q, k, v, theta, config, k_keep, sdc_term, scale, upcast,
                visible=causal_visible(q.shape[2], k.shape[2], q.device, q.shape[0]))
